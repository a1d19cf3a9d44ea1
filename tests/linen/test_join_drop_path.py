"""Tests of regjax.linen.JoinDropPath: the module is regjax.join_drop_path with the stream's key."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import IMPLS, TRACED_MSG

import regjax
import regjax.linen as rnn

BRANCHES = jax.random.normal(jax.random.key(0), (3, 16, 4))


def test_fields_are_the_function_arguments():
  fields = {f.name: f.default for f in dataclasses.fields(rnn.JoinDropPath) if f.init}
  assert {k: v for k, v in fields.items() if k not in ("parent", "name")} == {
    "rate": dataclasses.MISSING,
    "mode": "local",
    "deterministic": None,
    "rng_collection": "dropout",
    "rng_impl": "hash",
  }


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("impl", IMPLS)
def test_module_equals_function(mode, impl):
  module = rnn.JoinDropPath(0.5, mode=mode, rng_impl=impl)
  key = jax.random.key(1)
  expected = regjax.join_drop_path(BRANCHES, 0.5, key=key, mode=mode, rng_impl=impl)
  y = module.apply({}, BRANCHES, deterministic=False, rng=key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  # The stream's key: make_rng, as every regjax linen noise module derives it.
  rngs = {"dropout": jax.random.key(2)}
  streamed = module.apply({}, BRANCHES, deterministic=False, rngs=rngs)

  class Probe(nn.Module):
    @nn.compact
    def __call__(self):
      return self.make_rng("dropout")

  derived = Probe().apply({}, rngs=rngs)
  np.testing.assert_array_equal(
    np.asarray(streamed),
    np.asarray(regjax.join_drop_path(BRANCHES, 0.5, key=derived, mode=mode, rng_impl=impl)),
  )


def test_eval_zero_rate_and_one_branch_need_no_stream():
  mean = regjax.join_drop_path(BRANCHES, 0.5, deterministic=True)
  np.testing.assert_array_equal(
    np.asarray(rnn.JoinDropPath(0.5).apply({}, BRANCHES, deterministic=True)), np.asarray(mean)
  )
  np.testing.assert_array_equal(
    np.asarray(rnn.JoinDropPath(0.0).apply({}, BRANCHES, deterministic=False)), np.asarray(mean)
  )
  np.testing.assert_array_equal(
    np.asarray(rnn.JoinDropPath(0.5).apply({}, BRANCHES[:1], deterministic=False)),
    np.asarray(BRANCHES[0]),
  )
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    rnn.JoinDropPath(0.0, mode="global").apply({}, BRANCHES, deterministic=False)


def test_in_a_fractal_block_under_jit():
  class Join(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      columns = [x, jnp.tanh(2 * x)]  # the columns of a fractal block (parameter-free here)
      return rnn.JoinDropPath(0.5)(jnp.stack(columns), deterministic=not train)

  x = jax.random.normal(jax.random.key(3), (8, 4))
  model = Join()
  rngs = {"dropout": jax.random.key(5)}
  eager = model.apply({}, x, train=True, rngs=rngs)
  jitted = jax.jit(lambda x: model.apply({}, x, train=True, rngs=rngs))(x)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(model.apply({}, x, train=True, rngs=rngs))))(x)
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 1)
  np.testing.assert_array_equal(
    np.asarray(model.apply({}, x, train=False)), np.asarray((x + jnp.tanh(2 * x)) / 2)
  )


def test_errors():
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    rnn.JoinDropPath(0.5).apply({}, BRANCHES, deterministic=False)
  with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
    rnn.JoinDropPath(1.5).apply({}, BRANCHES, deterministic=False, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="`mode` must be one of"):
    rnn.JoinDropPath(0.5, mode="row").apply({}, BRANCHES, deterministic=True)
  with pytest.raises(TypeError, match=TRACED_MSG):
    jax.jit(lambda d: rnn.JoinDropPath(0.5).apply({}, BRANCHES, deterministic=d))(False)

"""Tests of regjax.nnx.JoinDropPath: the module is regjax.join_drop_path with the stream's key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import IMPLS, TRACED_MSG
from flax import nnx

import regjax
import regjax.nnx as rx

BRANCHES = jax.random.normal(jax.random.key(0), (3, 16, 4))


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("impl", IMPLS)
def test_module_equals_function(mode, impl):
  key = jax.random.key(1)
  module = rx.JoinDropPath(0.5, mode=mode, rng_impl=impl)
  assert (module.rate, module.mode, module.rng_impl, module.rng_collection) == (
    0.5,
    mode,
    impl,
    "dropout",
  )
  expected = regjax.join_drop_path(BRANCHES, 0.5, key=key, mode=mode, rng_impl=impl)
  np.testing.assert_array_equal(np.asarray(module(BRANCHES, rngs=key)), np.asarray(expected))
  # The kept stream: a fork of rngs['dropout'], one key per call, as nnx.Dropout.
  streamed = rx.JoinDropPath(0.5, mode=mode, rng_impl=impl, rngs=nnx.Rngs(dropout=2))
  stream = nnx.Rngs(dropout=2)["dropout"].fork()
  for _ in range(2):
    np.testing.assert_array_equal(
      np.asarray(streamed(BRANCHES)),
      np.asarray(regjax.join_drop_path(BRANCHES, 0.5, key=stream(), mode=mode, rng_impl=impl)),
    )


def test_eval_zero_rate_and_one_branch_need_no_stream():
  mean = regjax.join_drop_path(BRANCHES, 0.5, deterministic=True)
  module = rx.JoinDropPath(0.5)
  np.testing.assert_array_equal(np.asarray(module(BRANCHES, deterministic=True)), mean)
  module.eval()
  np.testing.assert_array_equal(np.asarray(module(BRANCHES)), mean)
  np.testing.assert_array_equal(np.asarray(rx.JoinDropPath(0.0)(BRANCHES)), mean)
  np.testing.assert_array_equal(np.asarray(rx.JoinDropPath(0.5)(BRANCHES[:1])), BRANCHES[0])
  with pytest.raises(ValueError, match="no `rngs` argument was provided to JoinDropPath"):
    rx.JoinDropPath(0.0, mode="global")(BRANCHES)


def test_traced_rate_under_nnx_jit_and_gradient():
  module = rx.JoinDropPath(jnp.float32(0.5), rngs=nnx.Rngs(dropout=3))

  @nnx.jit
  def loss(module, branches):
    return jnp.sum(module(branches))

  value = loss(module, BRANCHES)
  assert np.isfinite(value)
  module.rate = jnp.float32(jnp.nan)  # a bad schedule value: the eval join
  np.testing.assert_allclose(loss(module, BRANCHES), jnp.sum(jnp.mean(BRANCHES, 0)), rtol=1e-5)
  grads = jax.grad(lambda b: jnp.sum(rx.JoinDropPath(0.5)(b, rngs=jax.random.key(4))))(BRANCHES)
  np.testing.assert_allclose(np.asarray(jnp.sum(grads, 0)), 1.0, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match=r"regjax.nnx.JoinDropPath: `rate` must be in \[0, 1\]"):
    rx.JoinDropPath(1.5)
  with pytest.raises(ValueError, match="`rng_impl` must be one of"):
    rx.JoinDropPath(0.5, rng_impl="philox")
  with pytest.raises(ValueError, match="`mode` must be one of"):
    rx.JoinDropPath(0.5, mode="row")(BRANCHES, deterministic=True)
  with pytest.raises(TypeError, match=TRACED_MSG):
    nnx.jit(lambda m, d: m(BRANCHES, deterministic=d))(rx.JoinDropPath(0.5), False)

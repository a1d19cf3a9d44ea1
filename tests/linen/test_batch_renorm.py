"""Tests of regjax.linen.BatchRenorm: the function's maths, BatchNorm's variables."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _problem, _randomize
from flax import serialization

import regjax.linen as rnn
from regjax.linen.normalization import BatchRenorm
from regjax.renorm import batch_renorm


def _far_variables(module, x, seed):
  """Variables whose running statistics are far from the batch's (r and d clip)."""
  variables = _randomize(module.init(jax.random.key(0), x, deterministic=True), seed)
  stats = variables["batch_stats"]
  stats = {"mean": stats["mean"] + 3.0, "var": stats["var"] * jnp.asarray([0.05, 20.0, 1.0])}
  return {**variables, "batch_stats": stats}


def test_module_is_the_function_train_and_eval():
  x, _, _, _ = _problem((16, 3), -1, seed=1)
  module = BatchRenorm(momentum=0.9, epsilon=1e-3, r_max=2.0, d_max=0.5)
  variables = _far_variables(module, x, seed=2)
  params, stats = variables["params"], variables["batch_stats"]
  y, updates = module.apply(variables, x, deterministic=False, mutable=["batch_stats"])
  want_y, want_stats = batch_renorm(
    x, stats, params["scale"], params["bias"], r_max=2.0, d_max=0.5, momentum=0.9, epsilon=1e-3
  )
  chex.assert_trees_all_equal((y, updates["batch_stats"]), (want_y, want_stats))
  # Call-time limits override the fields.
  y2 = module.apply(variables, x, deterministic=False, r_max=3.0, d_max=5.0, mutable=True)[0]
  want2 = batch_renorm(
    x, stats, params["scale"], params["bias"], r_max=3.0, d_max=5.0, momentum=0.9, epsilon=1e-3
  )[0]
  chex.assert_trees_all_equal(y2, want2)
  assert not np.allclose(y2, y)
  # Eval is BatchNorm's eval, bit for bit (same variables).
  chex.assert_trees_all_equal(
    module.apply(variables, x, use_running_average=True),
    rnn.BatchNorm(momentum=0.9, epsilon=1e-3).apply(variables, x, use_running_average=True),
  )


@pytest.mark.parametrize("jit", [False, True])
def test_r_max_1_d_max_0_is_batch_norm_bit_for_bit(jit):
  x, _, _, _ = _problem((16, 3), -1, seed=3)
  bn, renorm = rnn.BatchNorm(), BatchRenorm(r_max=1.0, d_max=0.0)
  variables = _far_variables(bn, x, seed=4)

  def train(module):
    f = lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])  # noqa: E731
    return (jax.jit(f) if jit else f)(variables, x)

  chex.assert_trees_all_equal(train(renorm), train(bn))


def test_variables_are_batch_norm_s_and_checkpoints_interchange():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 4, 3)), jnp.bfloat16)
  kw = dict(param_dtype=jnp.bfloat16, axis=(1, 2))
  bn_vars = rnn.BatchNorm(**kw).init(jax.random.key(1), x, deterministic=True)
  rn_vars = BatchRenorm(**kw).init(jax.random.key(1), x, deterministic=True)
  chex.assert_trees_all_equal_shapes_and_dtypes(bn_vars, rn_vars)
  assert jax.tree.structure(bn_vars) == jax.tree.structure(rn_vars)
  # flax's own BatchNorm too.
  flax_vars = nn.BatchNorm(**kw).init(jax.random.key(1), x, use_running_average=True)
  assert jax.tree.structure(flax_vars) == jax.tree.structure(rn_vars)

  # A trained BatchNorm checkpoint loads into BatchRenorm (eval identical) and back.
  trained = _randomize(bn_vars, 6)
  restored = serialization.from_bytes(rn_vars, serialization.to_bytes(trained))
  chex.assert_trees_all_equal(restored, trained)
  chex.assert_trees_all_equal(
    BatchRenorm(**kw).apply(restored, x, deterministic=True),
    rnn.BatchNorm(**kw).apply(trained, x, deterministic=True),
  )
  _, updates = BatchRenorm(**kw).apply(restored, x, deterministic=False, mutable=["batch_stats"])
  stepped = {**restored, **updates}
  back = serialization.from_bytes(bn_vars, serialization.to_bytes(stepped))
  chex.assert_trees_all_equal_shapes_and_dtypes(back, bn_vars)
  chex.assert_trees_all_equal(back, stepped)
  rnn.BatchNorm(**kw).apply(back, x, deterministic=True)  # loads and runs


def test_traced_ramp_compiles_once():
  x, _, _, _ = _problem((32, 3), -1, seed=7)
  module = BatchRenorm()
  variables = _far_variables(module, x, seed=8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(variables, x, r_max, d_max):
    return module.apply(
      variables, x, deterministic=False, r_max=r_max, d_max=d_max, mutable=["batch_stats"]
    )

  ys = []
  for r_max, d_max in [(1.0, 0.0), (1.5, 1.0), (3.0, 5.0)]:
    y, _ = step(variables, x, jnp.float32(r_max), jnp.float32(d_max))
    want = BatchRenorm(r_max=r_max, d_max=d_max).apply(
      variables, x, deterministic=False, mutable=["batch_stats"]
    )[0]
    chex.assert_trees_all_close(y, want, atol=1e-6)
    ys.append(y)
  assert not np.allclose(ys[0], ys[1]) and not np.allclose(ys[1], ys[2])


@pytest.mark.parametrize(
  "fields,call,match",
  [
    (dict(r_max=0.5), {}, "r_max"),
    (dict(d_max=-1.0), {}, "d_max"),
    ({}, dict(r_max=float("nan")), "r_max"),
    ({}, dict(d_max=-0.5), "d_max"),
  ],
)
def test_bad_limits_name_the_argument(fields, call, match):
  x, _, _, _ = _problem((8, 3), -1, seed=9)
  with pytest.raises(ValueError, match=match):
    BatchRenorm(**fields).init(jax.random.key(0), x, deterministic=False, **call)


def test_modes_and_half_precision():
  x = jnp.asarray(np.random.default_rng(10).normal(2, 3, (16, 3)), jnp.bfloat16)
  module = BatchRenorm(deterministic=None)
  variables = module.init(jax.random.key(0), x, use_running_average=True)
  y, updates = module.apply(variables, x, deterministic=False, mutable=["batch_stats"])
  # BatchNorm's (flax's) dtype rule: float32 params promote the output.
  y_bn, _ = rnn.BatchNorm().apply(variables, x, deterministic=False, mutable=["batch_stats"])
  assert y.dtype == y_bn.dtype == jnp.float32
  half = BatchRenorm(param_dtype=jnp.bfloat16)
  half_vars = half.init(jax.random.key(0), x, deterministic=True)
  assert half.apply(half_vars, x, deterministic=False, mutable=True)[0].dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(updates["batch_stats"], variables["batch_stats"])
  with pytest.raises(ValueError, match="disagree"):
    module.apply(variables, x, use_running_average=True, deterministic=False)

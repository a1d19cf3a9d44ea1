"""Tests of regjax.nnx.BatchRenorm: the function's maths, BatchNorm's variables."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _problem, _x
from flax import nnx

import regjax.nnx as rx
from regjax.linen.normalization import BatchRenorm as LinenBatchRenorm
from regjax.nnx.normalization import BatchRenorm
from regjax.renorm import batch_renorm


def _far(module, seed=0):
  """Non-trivial params and running statistics far from N(0, 1) batches (r, d clip)."""
  rng = np.random.default_rng(seed)
  c = module.mean.shape[-1]
  module.mean[...] = jnp.asarray(3.0 + rng.normal(size=c), jnp.float32)
  module.var[...] = jnp.asarray(np.resize([0.05, 20.0, 1.0], c), jnp.float32)
  if module.scale is not None:
    module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), module.scale.dtype)
  if module.bias is not None:
    module.bias[...] = jnp.asarray(rng.normal(size=c), module.bias.dtype)
  return module


def test_variables_are_batch_norm_s_and_state_interchanges():
  bn = rx.BatchNorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  rn = BatchRenorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  for other in (bn, nnx.BatchNorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))):
    assert jax.tree.structure(nnx.state(rn)) == jax.tree.structure(nnx.state(other))
    chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(rn), nnx.state(other))
  assert set(nnx.state(rn, nnx.BatchStat)) == {"mean", "var"}
  assert set(nnx.state(rn, nnx.Param)) == {"scale", "bias"}
  # A trained BatchNorm's state loads into BatchRenorm (eval identical) and back.
  x = _x((16, 6))
  _far(bn)
  bn(x)
  nnx.update(rn, nnx.state(bn))
  chex.assert_trees_all_equal(nnx.state(rn), nnx.state(bn))
  chex.assert_trees_all_equal(rn(x, deterministic=True), bn(x, deterministic=True))
  rn(x)  # a renorm train step
  nnx.update(bn, nnx.state(rn))
  chex.assert_trees_all_equal(nnx.state(bn), nnx.state(rn))
  no_affine = BatchRenorm(6, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  assert set(nnx.state(no_affine)) == {"mean", "var"}


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9, "axis": (1, 2), "use_bias": False}])
def test_module_is_the_function_and_matches_linen(kwargs):
  shape = (6, 3, 4)
  axis = kwargs.get("axis", -1)
  nf = tuple(shape[a] for a in axis) if isinstance(axis, tuple) else shape[axis]
  ours = BatchRenorm(nf, r_max=2.0, d_max=0.5, **kwargs, rngs=nnx.Rngs(0))
  linen = LinenBatchRenorm(r_max=2.0, d_max=0.5, **kwargs)
  variables = linen.init(jax.random.key(0), _x(shape), use_running_average=True)
  for step in range(3):
    x = _x(shape, seed=step) * 2.0 + 1.0
    stats = {"mean": ours.mean[...], "var": ours.var[...]}
    scale = ours.scale[...]
    bias = ours.bias[...] if ours.bias is not None else None
    want_y, want_stats = batch_renorm(
      x, stats, scale, bias, r_max=2.0, d_max=0.5, axis=axis, momentum=ours.momentum
    )
    y = ours(x)
    chex.assert_trees_all_equal((y, {"mean": ours.mean[...], "var": ours.var[...]}),
                                (want_y, want_stats))  # fmt: skip
    y_linen, updates = linen.apply(variables, x, use_running_average=False, mutable=True)
    variables = {**variables, **updates}
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_linen), atol=1e-6)
  # Call-time limits override the attributes; eval is BatchNorm's eval.
  x = _x(shape, seed=9)
  bn = rx.BatchNorm(nf, **kwargs, rngs=nnx.Rngs(0))
  nnx.update(bn, nnx.state(ours))
  chex.assert_trees_all_equal(ours(x, use_running_average=True), bn(x, use_running_average=True))
  nnx.update(bn, nnx.state(ours))
  chex.assert_trees_all_equal(ours(x, r_max=1.0, d_max=0.0), bn(x))  # also the same update
  chex.assert_trees_all_equal(nnx.state(ours), nnx.state(bn))


def test_traced_ramp_compiles_once():
  model = _far(BatchRenorm(3, rngs=nnx.Rngs(0)))
  x = _x((32, 3), seed=4)

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(model, x, r_max, d_max):
    return model(x, r_max=r_max, d_max=d_max)

  outputs = []
  for r_max, d_max in [(1.0, 0.0), (1.5, 1.0), (3.0, 5.0)]:
    stats = {"mean": model.mean[...], "var": model.var[...]}
    want = batch_renorm(x, stats, model.scale[...], model.bias[...], r_max=r_max, d_max=d_max)
    y = step(model, x, jnp.float32(r_max), jnp.float32(d_max))
    chex.assert_trees_all_close(y, want[0], atol=1e-6)
    chex.assert_trees_all_close(model.var[...], want[1]["var"], atol=1e-6)  # state updated
    outputs.append(y)
  assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_modes():
  x = _x((8, 4))
  rn = BatchRenorm(4, rngs=nnx.Rngs(0))
  assert rn.use_running_average is False and rn.deterministic is False
  rn.eval()
  before = np.asarray(rn.mean[...])
  rn(x)
  np.testing.assert_array_equal(np.asarray(rn.mean[...]), before)  # eval: no update
  rn.train()
  rn(x)
  assert not np.array_equal(np.asarray(rn.mean[...]), before)
  assert nnx.view(rn, deterministic=True).use_running_average is True
  assert nnx.view(rn, deterministic=True, use_running_average=False).use_running_average is False
  assert BatchRenorm(4, deterministic=True, rngs=nnx.Rngs(0)).use_running_average is True
  with pytest.raises(ValueError, match="disagree"):
    rn(x, True, deterministic=False)
  with pytest.raises(ValueError, match="no `use_running_average`/`deterministic` value"):
    BatchRenorm(4, use_running_average=None, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize(
  "kwargs, call, error, match",
  [
    ({"r_max": 0.5}, {}, ValueError, r"`r_max` must be in \[1, inf\]"),
    ({"d_max": -1.0}, {}, ValueError, r"`d_max` must be in \[0, inf\]"),
    ({"r_max": "3"}, {}, TypeError, "r_max"),
    ({}, {"r_max": 0.9}, ValueError, "r_max"),
    ({}, {"d_max": float("nan")}, ValueError, "d_max"),
    ({"num_features": 5}, {}, ValueError, r"have sizes \(3,\); expected \(5,\)"),
    ({"epsilon": 0.0}, {}, ValueError, "`epsilon` must be"),
  ],
)
def test_bad_arguments_raise(kwargs, call, error, match):
  kwargs = {"num_features": 3, **kwargs}
  with pytest.raises(error, match=match):
    BatchRenorm(**kwargs, rngs=nnx.Rngs(0))(jnp.ones((4, 3)), **call)


def test_traced_constructor_limit_is_a_type_error():
  @jax.jit
  def make(r):
    return BatchRenorm(3, r_max=r, rngs=nnx.Rngs(0)).mean[...]

  with pytest.raises(TypeError, match="r_max.*at call"):
    make(jnp.float32(2.0))


def test_half_precision_and_integer_input():
  rn = BatchRenorm(3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  bn = rx.BatchNorm(3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = _problem((16, 3), -1, seed=5, dtype=jnp.bfloat16)[0]
  y = rn(x)
  # BatchNorm's (flax's) promote_dtype rule: the float32 statistics promote the output.
  assert y.dtype == bn(x).dtype and rn.mean.dtype == rn.var.dtype == jnp.float32
  assert BatchRenorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="floating-point"):
    rn(jnp.ones((4, 3), jnp.int32))

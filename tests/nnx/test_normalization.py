"""Tests of regjax.nnx.BatchNorm beyond flax parity (tests/test_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _x
from flax import nnx

import regjax.linen as rnn
import regjax.nnx as rx


# ---------------------------------------------------------------- BatchNorm
def test_batch_norm_variables_names_types_and_dtypes():
  bn = rx.BatchNorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  state = nnx.state(bn)
  assert set(state) == {"mean", "var", "scale", "bias"}
  assert set(nnx.state(bn, nnx.BatchStat)) == {"mean", "var"}
  assert set(nnx.state(bn, nnx.Param)) == {"scale", "bias"}
  assert bn.mean.dtype == bn.var.dtype == jnp.float32
  assert bn.scale.dtype == bn.bias.dtype == jnp.bfloat16
  bn(_x((16, 6)).astype(jnp.bfloat16))  # train step on half-precision input
  assert bn.mean.dtype == bn.var.dtype == jnp.float32
  # The variables are those of nnx.BatchNorm (so state trees and checkpoints match).
  ref = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  mine = rx.BatchNorm(6, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(mine)) == jax.tree.structure(nnx.state(ref))
  no_affine = rx.BatchNorm(6, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  assert set(nnx.state(no_affine)) == {"mean", "var"}
  assert no_affine.scale is None and no_affine.bias is None


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"momentum": 0.9, "unbiased_running_var": True},
    {"axis": (1, 2), "use_bias": False},
  ],
)
def test_batch_norm_matches_regjax_linen(kwargs):
  shape = (6, 3, 4)
  axis = kwargs.get("axis", -1)
  num_features = tuple(shape[a] for a in axis) if isinstance(axis, tuple) else shape[axis]
  ours = rx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0))
  linen = rnn.BatchNorm(**kwargs)
  variables = linen.init(jax.random.key(0), _x(shape), use_running_average=True)
  mask = jnp.arange(shape[0])[:, None, None] < 4
  for step in range(3):
    x = _x(shape, seed=step)
    m = mask if step == 2 else None
    y_linen, updates = linen.apply(
      variables, x, use_running_average=False, mask=m, mutable=["batch_stats"]
    )
    variables = {**variables, **updates}
    np.testing.assert_allclose(np.asarray(ours(x, mask=m)), np.asarray(y_linen), atol=1e-6)
    for name in ("mean", "var"):
      np.testing.assert_allclose(
        np.asarray(getattr(ours, name)[...]), np.asarray(variables["batch_stats"][name]), rtol=1e-6
      )
  x = _x(shape, seed=7)
  np.testing.assert_allclose(
    np.asarray(ours(x, use_running_average=True)),
    np.asarray(linen.apply(variables, x, use_running_average=True)),
    atol=1e-6,
  )


def test_batch_norm_deterministic_is_an_alias_of_use_running_average():
  x = _x((8, 4))
  bn = rx.BatchNorm(4, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False and bn.deterministic is False
  bn.eval()
  assert bn.use_running_average is True and bn.deterministic is True
  before = np.asarray(bn.mean[...])
  bn(x)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), before)  # eval: no update
  bn.train()
  assert bn.use_running_average is False
  bn(x)
  assert not np.array_equal(np.asarray(bn.mean[...]), before)
  bn.deterministic = True
  assert bn.use_running_average is True
  # nnx.view with either name; the original keeps its mode.
  bn.train()
  assert nnx.view(bn, use_running_average=True).use_running_average is True
  assert nnx.view(bn, deterministic=True).use_running_average is True
  assert bn.use_running_average is False
  # nnx.view broadcasts its arguments to every module: the specific name wins, so
  # "noise off, BatchNorm on batch statistics" (re-estimating statistics) works.
  assert nnx.view(bn, deterministic=True, use_running_average=False).use_running_average is False
  model = nnx.Dict(bn=rx.BatchNorm(4, rngs=nnx.Rngs(0)), drop=rx.Dropout(0.5))
  view = nnx.view(model, deterministic=True, use_running_average=False)
  assert view["drop"].deterministic is True and view["bn"].use_running_average is False
  # Constructor and call arguments.
  assert rx.BatchNorm(4, deterministic=True, rngs=nnx.Rngs(0)).use_running_average is True
  assert rx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)).deterministic is True
  with pytest.raises(ValueError, match="disagree"):
    rx.BatchNorm(4, use_running_average=True, deterministic=False, rngs=nnx.Rngs(0))
  before = np.asarray(bn.mean[...])
  bn(x, deterministic=True)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), before)
  with pytest.raises(ValueError, match="disagree"):
    bn(x, True, deterministic=False)
  with pytest.raises(ValueError, match="no `use_running_average`/`deterministic` value"):
    rx.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize(
  "kwargs, shape, error, match",
  [
    ({"num_features": 0}, (4, 3), ValueError, "`num_features` must be a positive int"),
    ({"num_features": 3, "epsilon": 0.0}, (4, 3), ValueError, "`epsilon` must be"),
    ({"num_features": 3, "momentum": 1.5}, (4, 3), ValueError, r"`momentum` must be in \[0, 1\]"),
    ({"num_features": 3, "axis": (0, 1)}, (4, 3), ValueError, "names 2 axis"),
    ({"num_features": 5}, (4, 3), ValueError, r"have sizes \(3,\); expected \(5,\)"),
    ({"num_features": 3, "axis": 2}, (4, 3), ValueError, "`axis`=2 is out of range"),
  ],
)
def test_batch_norm_bad_inputs_raise(kwargs, shape, error, match):
  with pytest.raises(error, match=match):
    rx.BatchNorm(**kwargs, rngs=nnx.Rngs(0))(jnp.ones(shape))


def test_batch_norm_integer_input_raises():
  with pytest.raises(TypeError, match="floating-point"):
    rx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.ones((4, 3), jnp.int32))


# ----------------------------------------------------------------------------
# No running statistics; ghost batches
def test_batch_norm_no_running_stats_has_no_batch_stat_variables():
  import regjax

  x = _x((16, 6))
  bn = rx.BatchNorm(6, track_running_stats=False, rngs=nnx.Rngs(0))
  assert set(nnx.state(bn)) == {"scale", "bias"}
  assert not jax.tree.leaves(nnx.state(bn, nnx.BatchStat))
  assert bn.mean is None and bn.var is None
  want, _ = regjax.batch_norm(x, None, bn.scale[...], bn.bias[...])
  np.testing.assert_array_equal(bn(x), want)
  bn.eval()
  np.testing.assert_array_equal(bn(x), want)  # eval: still the batch statistics
  np.testing.assert_array_equal(bn(x, deterministic=False), want)
  np.testing.assert_allclose(nnx.jit(lambda m, a: m(a))(bn, x), want, rtol=1e-6, atol=1e-6)
  no_mode = rx.BatchNorm(6, use_running_average=None, track_running_stats=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(no_mode(x), want)
  with pytest.raises(ValueError, match=r"have sizes \(6,\); expected \(5,\)"):
    rx.BatchNorm(5, track_running_stats=False, rngs=nnx.Rngs(0))(x)
  seen = []

  def promote(args, dtype=None):
    seen.append(args[1:3])
    return args

  rx.BatchNorm(6, track_running_stats=False, promote_dtype=promote, rngs=nnx.Rngs(0))(x)
  assert seen == [(None, None)]


def test_batch_norm_virtual_batch_size_matches_linen_and_the_function():
  shape, kwargs = (12, 2, 3), dict(momentum=0.8, virtual_batch_size=4)
  ours = rx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))
  linen = rnn.BatchNorm(**kwargs)
  variables = linen.init(jax.random.key(0), _x(shape), use_running_average=True)
  mask = jnp.arange(shape[0])[:, None, None] % 4 < 3
  for step in range(2):
    x = _x(shape, seed=step)
    m = mask if step else None
    y_linen, updates = linen.apply(
      variables, x, use_running_average=False, mask=m, mutable=["batch_stats"]
    )
    variables = {**variables, **updates}
    np.testing.assert_array_equal(np.asarray(ours(x, mask=m)), np.asarray(y_linen))
    for name in ("mean", "var"):
      np.testing.assert_array_equal(
        np.asarray(getattr(ours, name)[...]), np.asarray(variables["batch_stats"][name])
      )
  with pytest.raises(ValueError, match="`virtual_batch_size` must be None or an int >= 1"):
    rx.BatchNorm(3, virtual_batch_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must divide the batch size"):
    ours(_x((6, 2, 3)))
  free = rx.BatchNorm(3, track_running_stats=False, virtual_batch_size=4, rngs=nnx.Rngs(0))
  free.eval()
  import regjax

  x = _x(shape)
  want, _ = regjax.batch_norm(x, None, free.scale[...], free.bias[...], virtual_batch_size=4)
  np.testing.assert_array_equal(free(x), want)

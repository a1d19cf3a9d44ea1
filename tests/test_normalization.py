"""Tests of regjax.normalization: `regjax.batch_norm` and `regjax.init_batch_stats`.

The functional op is checked against a float64 NumPy reference (tests/_helpers.py:
biased batch variance, Flax momentum convention, optional unbiased running
variance, eval with the running statistics), and on its edge cases: masks,
non-finite padding, empty batches, bad arguments, cross-device statistics.
Comparisons with flax.linen/flax.nnx BatchNorm live in test_parity.py.
"""

import functools
import json
import re
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import (
  _close,
  _complex_input,
  _feature_axes,
  _large_mean_data,
  _problem,
  reference_batch_norm,
)
from absl.testing import parameterized
from flax import nnx
from host_devices import run_on_host_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import regjax
import regjax.linen as rnn
import regjax.nnx as rnnx

# ----------------------------------------------------------------------------
# Core numerics, each with and without jit
_LAYOUTS = [
  ("nc", (64, 6), -1),
  ("nhwc", (4, 5, 6, 3), -1),
  ("nchw", (4, 3, 5, 6), 1),
  ("ntc_two_axes", (16, 4, 3), (-2, -1)),
  ("nchw_axes_1_3", (4, 3, 5, 2), (1, 3)),  # non-adjacent feature axes
]


class BatchNormReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    *[
      (f"{name}_{'affine' if affine else 'plain'}", shape, axis, affine)
      for name, shape, axis in _LAYOUTS
      for affine in (True, False)
    ]
  )
  def test_train_and_eval_match_reference(self, shape, axis, affine):
    x, stats, scale, bias = _problem(shape, axis, seed=len(shape))
    if not affine:
      scale = bias = None
    # Non-default momentum/epsilon so that each one is actually exercised.
    kw = dict(momentum=0.9, epsilon=1e-2, axis=axis)
    train = self.variant(functools.partial(regjax.batch_norm, deterministic=False, **kw))
    y, new = train(x, stats, scale, bias)
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias, **kw)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    chex.assert_trees_all_equal_shapes_and_dtypes(new, stats)
    _close(y, ry, err_msg="train y")
    _close(new["mean"], rmean, err_msg="running mean")
    _close(new["var"], rvar, err_msg="running var")

    evaluate = self.variant(functools.partial(regjax.batch_norm, deterministic=True, **kw))
    ey, same = evaluate(x, stats, scale, bias)
    ry, _, _ = reference_batch_norm(
      x, stats["mean"], stats["var"], scale, bias, deterministic=True, **kw
    )
    _close(ey, ry, err_msg="eval y")
    chex.assert_trees_all_equal(same, stats)

  @chex.variants(with_jit=True, without_jit=True)
  def test_defaults(self):
    # std 3e-3 makes var ~ 1e-5 ~ epsilon, so a wrong default epsilon shows in y.
    x, stats, scale, bias = _problem((128, 4), -1, seed=1, loc=0.0, std=3e-3)
    y, new = self.variant(regjax.batch_norm)(x, stats, scale, bias)
    ry, rmean, rvar = reference_batch_norm(
      x, stats["mean"], stats["var"], scale, bias, momentum=0.99, epsilon=1e-5
    )
    _close(y, ry)
    _close(new["mean"], rmean)
    _close(new["var"], rvar)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("nc", (32, 5), -1), ("ntc_two_axes", (6, 4, 3), (-2, -1)))
  def test_unbiased_running_var(self, shape, axis):
    x, stats, scale, bias = _problem(shape, axis, seed=7)
    kw = dict(momentum=0.8, epsilon=1e-3, axis=axis, unbiased_running_var=True)
    y, new = self.variant(functools.partial(regjax.batch_norm, **kw))(x, stats, scale, bias)
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias, **kw)
    _close(y, ry)  # normalization itself still uses the biased variance
    _close(new["mean"], rmean)
    _close(new["var"], rvar)

  @chex.variants(with_jit=True, without_jit=True)
  def test_large_mean_is_accurate(self):
    """mean 1e4, std 1 in float32: the one-pass E[x^2]-E[x]^2 collapses here."""
    x = _large_mean_data()
    stats = regjax.init_batch_stats(16)
    # momentum 0: the running var is the batch var itself, not 0.99 * 1 + a small part of it.
    y, new = self.variant(functools.partial(regjax.batch_norm, momentum=0.0))(x, stats)
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], momentum=0.0)
    # Best possible is ~5e-4: half an ulp of 1e4 in the float32 mean.
    assert np.max(np.abs(np.asarray(y, np.float64) - ry)) < 1e-2
    _close(new["mean"], rmean, rtol=1e-6, atol=0)
    _close(new["var"], rvar, rtol=1e-4, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("bfloat16", jnp.bfloat16, 2.0**-8), ("float16", jnp.float16, 2.0**-11)
  )
  def test_half_precision(self, dtype, unit_roundoff):
    x, stats, scale, bias = _problem((512, 8), -1, seed=3, loc=3.0, dtype=dtype)
    kw = dict(momentum=0.9, epsilon=1e-3)
    y, new = self.variant(functools.partial(regjax.batch_norm, **kw))(x, stats, scale, bias)
    assert y.dtype == dtype
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    # Reference from the *rounded* input: only the statistics' accumulation is tested.
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias, **kw)
    _close(new["mean"], rmean)  # float32 accumulation: full float32 accuracy
    _close(new["var"], rvar)
    # y is computed in float32 and rounded once: within one unit roundoff.
    _close(y, ry, rtol=unit_roundoff, atol=1e-4)
    # An explicit float32 `dtype` skips that last rounding.
    y32, _ = self.variant(functools.partial(regjax.batch_norm, dtype=jnp.float32, **kw))(
      x, stats, scale, bias
    )
    assert y32.dtype == jnp.float32
    _close(y32, ry)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_selects_rows(self):
    x, stats, scale, bias = _problem((24, 4), -1, seed=11)
    keep = np.random.default_rng(0).random((24, 1)) < 0.6
    keep[0] = False  # the first row is the one a shifted formula is tempted to use
    # Unselected rows hold padding that would wreck the statistics if it entered them.
    x = np.asarray(x).copy()
    x[~keep[:, 0]] = 1e8
    x[0, :2] = np.nan
    x = jnp.asarray(x)
    kw = dict(momentum=0.9, epsilon=1e-3)
    y, new = self.variant(functools.partial(regjax.batch_norm, **kw))(
      x, stats, scale, bias, mask=jnp.asarray(keep)
    )
    rows = keep[:, 0]
    ry, rmean, rvar = reference_batch_norm(
      np.asarray(x)[rows], stats["mean"], stats["var"], scale, bias, **kw
    )
    _close(new["mean"], rmean)
    _close(new["var"], rvar)
    _close(np.asarray(y)[rows], ry)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_per_position_and_empty_feature(self):
    x, stats, scale, bias = _problem((4, 6, 3), -1, seed=12)
    mask = np.random.default_rng(1).random((4, 6, 3)) < 0.5
    mask[..., 1] = False  # feature 1: nothing selected this step
    mask[0, 0, 0] = mask[0, 0, 2] = True
    kw = dict(momentum=0.9, epsilon=1e-3)
    y, new = self.variant(functools.partial(regjax.batch_norm, **kw))(
      x, stats, scale, bias, mask=jnp.asarray(mask)
    )
    ry, rmean, rvar = reference_batch_norm(
      x, stats["mean"], stats["var"], scale, bias, mask=mask, **kw
    )
    assert np.all(np.isfinite(new["mean"])) and np.all(np.isfinite(new["var"]))
    # The empty feature keeps its running statistics exactly.
    assert new["mean"][1] == stats["mean"][1] and new["var"][1] == stats["var"][1]
    _close(new["mean"], rmean)
    _close(new["var"], rvar)
    _close(np.asarray(y)[..., [0, 2]], ry[..., [0, 2]])


def test_eval_returns_batch_stats_unchanged():
  x, stats, scale, bias = _problem((16, 3), -1, seed=5)
  y, out = regjax.batch_norm(x, stats, scale, bias, deterministic=True)
  assert out is stats
  # Eval normalizes each sample on its own: one row gives the same output as in the batch.
  y_row, _ = regjax.batch_norm(x[3:4], stats, scale, bias, deterministic=True)
  _close(y_row, y[3:4], rtol=1e-6, atol=1e-6)
  y_train, _ = regjax.batch_norm(x[3:4], stats, scale, bias)
  assert not np.allclose(y_row, y_train)  # train mode would use the (one-row) batch


# ----------------------------------------------------------------------------
# Gradients
def test_gradients_match_finite_differences_float64():
  # float64 (jax.enable_x64 works as a context manager in this jax) so finite
  # differences are accurate enough for tight tolerances.
  with jax.enable_x64(True):
    x, stats, scale, bias = _problem((8, 3), -1, seed=2, dtype=np.float64)
    stats, scale, bias = jax.tree.map(lambda a: a.astype(jnp.float64), (stats, scale, bias))
    assert x.dtype == jnp.float64

    def f(x, scale, bias):  # through the running statistics too
      y, new = regjax.batch_norm(
        x, stats, scale, bias, momentum=0.9, epsilon=1e-3, unbiased_running_var=True
      )
      assert y.dtype == new["var"].dtype == jnp.float64
      return y, new["mean"], new["var"]

    # jit: a handful of compiles instead of thousands of eager ops.
    check_grads(
      jax.jit(f), (x, scale, bias), order=2, modes=("fwd", "rev"), eps=1e-5, atol=1e-6, rtol=1e-6
    )


def _autodiff_reference(x, scale, bias, *, stats, axis, mask, momentum=0.9, epsilon=1e-3):
  """The textbook two-pass batch norm in plain jnp, differentiated by jax itself."""
  axes = _feature_axes(axis, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  keep = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  m = (
    jnp.ones(x.shape, x.dtype) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  )
  n = jnp.maximum(jnp.sum(m, red, keepdims=True), 1)
  mean = jnp.sum(m * x, red, keepdims=True) / n
  var = jnp.sum(m * jnp.square(x - mean), red, keepdims=True) / n
  y = (x - mean) / jnp.sqrt(var + epsilon)
  if scale is not None:
    y = y * scale.reshape(keep)
  if bias is not None:
    y = y + bias.reshape(keep)
  fshape = tuple(x.shape[a] for a in axes)
  new_mean = momentum * stats["mean"] + (1 - momentum) * mean.reshape(fshape)
  new_var = momentum * stats["var"] + (1 - momentum) * var.reshape(fshape)
  return y, new_mean, new_var


@pytest.mark.parametrize(
  "shape,axis",
  [
    ((6, 5), -1),
    ((4, 6), -1),
    ((5, 6), 0),
    ((2, 3, 2, 4), -1),
    ((2, 2, 8), -1),
    ((2, 3, 4), (0, 2)),
  ],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_derivatives_match_autodiff_of_textbook_formula(shape, axis, masked, affine):
  """The explicit JVP (and its transpose, reverse mode) against autodiff of the plain
  formula, in float64: y, running mean and running var, w.r.t. x, scale and bias,
  first and second order. Feature-last layouts with no more batch positions than
  features ((4, 6), (2, 2, 8)) take the batch-sum-as-dot path, the others fused sums."""
  with jax.enable_x64(True):
    x, stats, scale, bias = _problem(shape, axis, seed=7, dtype=np.float64)
    stats, scale, bias = jax.tree.map(lambda a: a.astype(jnp.float64), (stats, scale, bias))
    if not affine:
      scale = bias = None
    mask = None
    if masked:  # some positions out (the first sample too), holding large padding
      mask = jnp.asarray(np.random.default_rng(8).uniform(size=x.shape) < 0.7)
      mask = mask.at[(0,) * x.ndim].set(False)
      x = jnp.where(mask, x, 1e3)

    def ours(x, scale, bias):
      y, new = regjax.batch_norm(
        x, stats, scale, bias, axis=axis, mask=mask, momentum=0.9, epsilon=1e-3
      )
      return y, new["mean"], new["var"]

    ref = functools.partial(_autodiff_reference, stats=stats, axis=axis, mask=mask)
    args = (x, scale, bias)
    rng = np.random.default_rng(9)
    tangents = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), args)
    for f_ours, f_ref in [(jax.jit(ours), jax.jit(ref))]:
      got, want = f_ours(*args), f_ref(*args)
      chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)
      # forward mode
      _, jvp_got = jax.jvp(f_ours, args, tangents)
      _, jvp_want = jax.jvp(f_ref, args, tangents)
      chex.assert_trees_all_close(jvp_got, jvp_want, rtol=1e-9, atol=1e-9)
      # reverse mode
      cts = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), got)
      vjp_got = jax.vjp(f_ours, *args)[1](cts)
      vjp_want = jax.vjp(f_ref, *args)[1](cts)
      chex.assert_trees_all_close(vjp_got, vjp_want, rtol=1e-9, atol=1e-9)

      # second order: reverse over reverse
      def loss(f):
        # loss is used within this iteration, so the late binding of cts is harmless.
        return lambda *a: sum(jnp.vdot(c, o) for c, o in zip(cts, f(*a), strict=False))  # noqa: B023

      h_got = jax.jvp(jax.grad(loss(f_ours), argnums=(0, 1, 2) if affine else 0), args, tangents)[1]
      h_want = jax.jvp(jax.grad(loss(f_ref), argnums=(0, 1, 2) if affine else 0), args, tangents)[1]
      chex.assert_trees_all_close(h_got, h_want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("rows,features", [(512, 8), (16, 256)])  # fused sums; dots
def test_gradient_large_mean_is_finite_and_accurate(rows, features):
  x = 1e4 + jnp.asarray(np.random.default_rng(5).standard_normal((rows, features)), jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
  stats = regjax.init_batch_stats(features)

  def loss(x):
    return jnp.sum(regjax.batch_norm(x, stats)[0] * cotangent)

  dx = jax.grad(loss)(x)
  assert np.all(np.isfinite(dx))
  with jax.enable_x64(True):
    x64, c64 = x.astype(jnp.float64), cotangent.astype(jnp.float64)
    dx64 = jax.grad(lambda x: jnp.sum(regjax.batch_norm(x, stats)[0] * c64))(x64)
    y64 = regjax.batch_norm(x64, stats)[0]
  # The forward too: the best possible is ~5e-4, half an ulp of 1e4 in the float32 mean.
  _close(regjax.batch_norm(x, stats)[0], y64, rtol=0, atol=1e-2)
  # |dx| <~ 4; (x - mean) carries up to ~5e-4 (half an ulp of 1e4 in the float32
  # mean), which the gradient inherits at most at that size (measured: ~6e-5).
  _close(dx, dx64, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------
# Tracing
def test_traced_momentum_traces_once():
  x, stats, _, _ = _problem((16, 3), -1, seed=6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, stats, momentum):
    return regjax.batch_norm(x, stats, momentum=momentum)

  for momentum in (0.9, 0.5, 0.99):
    _, new = step(x, stats, jnp.float32(momentum))
    _, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], momentum=momentum)
    _close(new["mean"], rmean)  # the traced value is really used
    _close(new["var"], rvar)
  # A traced momentum cannot be range-checked; it is clipped to [0, 1] (documented).
  _, new = step(x, stats, jnp.float32(1.5))
  chex.assert_trees_all_close(new, stats)


def test_traced_deterministic_is_a_type_error():
  x, stats, _, _ = _problem((8, 3), -1, seed=6)
  f = jax.jit(lambda x, d: regjax.batch_norm(x, stats, deterministic=d))
  with pytest.raises(TypeError, match="`deterministic`"):
    f(x, True)
  # Marked static it works.
  g = jax.jit(lambda x, d: regjax.batch_norm(x, stats, deterministic=d)[0], static_argnames="d")
  _close(g(x, d=True), reference_batch_norm(x, stats["mean"], stats["var"], deterministic=True)[0])


# ----------------------------------------------------------------------------
# Bad input
_Z3 = np.zeros(3, np.float32)


_BAD_INPUTS = [
  ("momentum_negative", dict(momentum=-0.1), ValueError, "`momentum`"),
  ("momentum_above_one", dict(momentum=1.5), ValueError, "`momentum`"),
  ("momentum_nan", dict(momentum=float("nan")), ValueError, "`momentum`"),
  ("epsilon_zero", dict(epsilon=0.0), ValueError, "`epsilon`"),
  ("epsilon_negative", dict(epsilon=-1.0), ValueError, "`epsilon`"),
  ("epsilon_nan", dict(epsilon=float("nan")), ValueError, "`epsilon`"),
  ("stats_missing_var", dict(batch_stats={"mean": _Z3}), ValueError, "`batch_stats`"),
  (
    "stats_wrong_shape",
    dict(batch_stats=regjax.init_batch_stats(4)),
    ValueError,
    re.escape("`batch_stats['mean']`"),
  ),
  ("stats_not_a_dict", dict(batch_stats=(_Z3, _Z3 + 1)), (ValueError, TypeError), "`batch_stats`"),
  ("scale_wrong_shape", dict(scale=jnp.ones(4)), ValueError, "`scale`"),
  ("bias_wrong_shape", dict(bias=jnp.ones((1, 3))), ValueError, "`bias`"),
  ("axis_out_of_range", dict(axis=2), ValueError, "`axis`"),
  ("axis_negative_out_of_range", dict(axis=-3), ValueError, "`axis`"),
  ("axis_repeated", dict(axis=(1, -1)), ValueError, "`axis`"),
  ("integer_x", dict(x=jnp.ones((8, 3), jnp.int32)), TypeError, "`x`"),
  ("mask_not_bool", dict(mask=jnp.ones((8, 1), jnp.float32)), TypeError, "`mask`"),
  ("mask_not_broadcastable", dict(mask=jnp.ones((5, 3), bool)), ValueError, "`mask`"),
  ("mask_higher_rank", dict(mask=jnp.ones((2, 8, 3), bool)), ValueError, "`mask`"),
  (
    "unbiased_single_value",
    dict(x=jnp.ones((1, 3)), unbiased_running_var=True),
    ValueError,
    "`unbiased_running_var",
  ),
]


@pytest.mark.parametrize(
  "overrides,error,match", [c[1:] for c in _BAD_INPUTS], ids=[c[0] for c in _BAD_INPUTS]
)
def test_bad_input_names_the_argument(overrides, error, match):
  args = dict(x=jnp.ones((8, 3)), batch_stats=regjax.init_batch_stats(3))
  args.update(overrides)
  x, batch_stats = args.pop("x"), args.pop("batch_stats")
  with pytest.raises(error, match=match):
    regjax.batch_norm(x, batch_stats, **args)


# ----------------------------------------------------------------------------
# Property test
@st.composite
def _property_problem(draw):
  ndim = draw(st.integers(2, 4))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  axis = draw(st.integers(-ndim, ndim - 1))
  if np.prod(shape) // shape[axis] < 2:  # need >= 2 values per feature
    shape = tuple(max(d, 2) if i != axis % ndim else d for i, d in enumerate(shape))
  scale = 10.0 ** draw(st.floats(-2, 2))
  offset = scale * draw(st.floats(-100, 100))
  seed = draw(st.integers(0, 2**31 - 1))
  x = offset + scale * np.random.default_rng(seed).standard_normal(shape)
  return np.asarray(x, np.float32), axis


@settings(max_examples=25, deadline=None)
@given(_property_problem())
def test_property_matches_reference(problem):
  x, axis = problem
  eps = 1e-5
  fshape = (x.shape[axis],)
  # jit compiles once per example (~0.15 s), cheaper here than eager op-by-op.
  y, _ = jax.jit(functools.partial(regjax.batch_norm, axis=axis))(
    jnp.asarray(x), regjax.init_batch_stats(fshape)
  )
  ry, _, _ = reference_batch_norm(x, np.zeros(fshape), np.ones(fshape), axis=axis)
  red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  var = np.var(x.astype(np.float64), red)
  # float32 error is half an ulp of the largest |x| (in the float32 mean) divided by
  # the normalizing std, plus the reduction's few ulps of the normalized scale.
  atol = 1e-6 * (1 + np.abs(x).max() / np.sqrt(var.min() + eps))
  _close(y, ry, rtol=1e-5, atol=atol)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(y.mean(red), 0.0, atol=4 * atol)
  np.testing.assert_allclose(y.var(red), var / (var + eps), rtol=1e-5, atol=20 * atol)


# ----------------------------------------------------------------------------
# Across devices (4 fake CPU devices in a subprocess)
_CROSS_DEVICE_SCRIPT = textwrap.dedent(r"""
  import functools, json, traceback
  import numpy as np, jax, jax.numpy as jnp, regjax
  from jax.sharding import NamedSharding, PartitionSpec as P

  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  n, c = 16, 3
  x = jnp.asarray((0.5 + 2.0 * rng.standard_normal((n, c))) * rng.uniform(0.5, 3, c), jnp.float32)
  stats = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  # Rows kept per device (4 rows each): 4, 1, 3 and 0 -- unequal, one device empty.
  kept = [4, 1, 3, 0]
  keep = np.zeros((n, 1), bool)
  for device, count in enumerate(kept):
    keep[4 * device:4 * device + count] = True
  mask = jnp.asarray(keep)
  kw = dict(momentum=0.9, epsilon=1e-3)
  full = functools.partial(regjax.batch_norm, scale=scale, bias=bias, **kw)
  mesh = jax.make_mesh((4,), ("batch",))  # explicit axes: the sharding is in the types
  rows, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  xs, ss, ms = jax.device_put(x, rows), jax.device_put(stats, rep), jax.device_put(mask, rows)
  all_rows = jax.device_put(jnp.ones((n, 1), bool), rows)
  x4, m4, ones4 = x.reshape(4, 4, c), mask.reshape(4, 4, 1), jnp.ones((4, 4, 1), bool)
  out = {}

  def diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

  def case(name):
    # Runs one case; (got, want) pairs of (y, new_stats) become max abs differences.
    # An exception is recorded rather than raised, so other cases still report.
    def run(compute):
      try:
        (y, new), (want_y, want_new) = compute()
        out[name] = {
            "y": diff(np.asarray(y).reshape(n, c), want_y),
            "mean": diff(new["mean"], np.broadcast_to(want_new["mean"], new["mean"].shape)),
            "var": diff(new["var"], np.broadcast_to(want_new["var"], new["var"].shape))}
      except Exception:
        out[name] = {"error": traceback.format_exc()[-3000:]}
    return run

  def shard_mapped(**extra):
    fn = lambda x, s, m: regjax.batch_norm(x, s, scale, bias, axis_name="batch", mask=m,
                                           **kw, **extra)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                                 out_specs=(P("batch"), P())))

  def pmapped(**extra):
    fn = lambda x, s, m: regjax.batch_norm(x, s, scale, bias, axis_name="batch", mask=m,
                                           **kw, **extra)
    return jax.pmap(fn, axis_name="batch", in_axes=(0, None, 0))

  case("shard_map")(lambda: (shard_mapped()(xs, ss, all_rows), full(x, stats)))
  case("shard_map_unbiased")(lambda: (
      shard_mapped(unbiased_running_var=True)(xs, ss, all_rows),
      full(x, stats, unbiased_running_var=True)))
  case("shard_map_mask")(lambda: (shard_mapped()(xs, ss, ms), full(x, stats, mask=mask)))
  case("pmap")(lambda: (pmapped()(x4, stats, ones4), full(x, stats)))
  case("pmap_mask")(lambda: (pmapped()(x4, stats, m4), full(x, stats, mask=mask)))

  first, second = full(x[:8], stats), full(x[8:], stats)
  case("pmap_groups")(lambda: (
      pmapped(axis_index_groups=[[0, 1], [2, 3]])(x4, stats, ones4),
      (jnp.concatenate([first[0], second[0]]),
       jax.tree.map(lambda a, b: jnp.stack([a, a, b, b]), first[1], second[1]))))
  # The groups really differ, so matching them is not matching the full batch.
  out["groups_differ"] = diff(first[1]["mean"], second[1]["mean"])

  # Plain jit with a batch-sharded input: XLA inserts the reduction, no axis_name.
  case("jit_sharded")(lambda: (jax.jit(full)(xs, ss), full(x, stats)))
  case("jit_sharded_mask")(lambda: (jax.jit(full)(xs, ss, mask=ms), full(x, stats, mask=mask)))
  auto = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  case("jit_sharded_auto")(lambda: (
      jax.jit(full)(jax.device_put(x, NamedSharding(auto, P("batch"))), stats), full(x, stats)))

  # A naive mean of the per-device means (of the devices with rows) is not the
  # count-weighted full-batch mean.
  xn = np.asarray(x, np.float64)
  per_device = [xn[4 * d:4 * d + k].mean(0) for d, k in enumerate(kept) if k]
  out["naive_vs_weighted_mean"] = diff(np.mean(per_device, 0), xn[keep[:, 0]].mean(0))
  print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def cross_device_results():
  stdout = run_on_host_devices(_CROSS_DEVICE_SCRIPT, 4)
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
  "case",
  [
    "shard_map",
    "shard_map_unbiased",
    "shard_map_mask",
    "pmap",
    "pmap_mask",
    "pmap_groups",
    "jit_sharded",
    "jit_sharded_mask",
    "jit_sharded_auto",
  ],
)
def test_cross_device_statistics_match_full_batch(cross_device_results, case):
  diffs = cross_device_results[case]
  assert "error" not in diffs, diffs["error"]
  # float32, 16 rows: ~1e-7 differences from the summation order alone.
  assert max(diffs.values()) < 1e-5, diffs


def test_cross_device_cases_are_discriminating(cross_device_results):
  # Masked: a mean of per-device means would be this far off; regjax matched the
  # count-weighted full-batch mean to < 1e-5 above.
  assert cross_device_results["naive_vs_weighted_mean"] > 0.1, cross_device_results
  # Grouped: the two groups' statistics differ, so per-group != global.
  assert cross_device_results["groups_differ"] > 0.1, cross_device_results


@pytest.mark.parametrize("num_features, shape", [(3, (3,)), (np.int64(3), (3,)), ((2, 5), (2, 5))])
def test_init_batch_stats(num_features, shape):
  stats = regjax.init_batch_stats(num_features)
  assert set(stats) == {"mean", "var"}
  for name, fill in (("mean", 0.0), ("var", 1.0)):
    chex.assert_shape(stats[name], shape)
    chex.assert_type(stats[name], jnp.float32)
    np.testing.assert_array_equal(np.asarray(stats[name]), fill)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, (3, 0), "3"])
def test_init_batch_stats_rejects_bad_sizes(bad):
  with pytest.raises((ValueError, TypeError), match="num_features"):
    regjax.init_batch_stats(bad)


# float32 input at mean 1e4, std 1: a half ulp of 1e4 is 4.9e-4, so a float32
# mean is off by up to a few of those, and y by that over the feature's std;
# the naive E[x^2]-E[x]^2 loses the variance entirely (its cancellation error
# is ~1e4**2 * 6e-8 = 6).
_BIG_MEAN = 1e4


_MEAN_ATOL = 4 * 4.9e-4


_VAR_RTOL = 1e-4


def _masked_reference(x, mask, axis=-1):
  """float64 mean and (biased) variance over the positions ``mask`` selects."""
  x = np.asarray(x, np.float64)
  m = np.broadcast_to(np.asarray(mask), x.shape)
  red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  n = m.sum(red)
  mean = np.where(m, x, 0).sum(red) / n
  keep = tuple(1 if a in red else x.shape[a] for a in range(x.ndim))
  var = (np.where(m, x - mean.reshape(keep), 0) ** 2).sum(red) / n
  return mean, var


def _big_mean(shape, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(_BIG_MEAN + rng.standard_normal(shape), jnp.float32)


def _check_against_reference(x, mask, pad_value=0.0):
  x = jnp.where(mask, x, pad_value)
  c = x.shape[-1]
  y, new = regjax.batch_norm(x, regjax.init_batch_stats(c), momentum=0.0, mask=mask)
  mean, var = _masked_reference(x, mask)
  np.testing.assert_allclose(new["var"], var, rtol=_VAR_RTOL)
  np.testing.assert_allclose(new["mean"], mean, rtol=0, atol=_MEAN_ATOL)
  keep = (1,) * (x.ndim - 1) + (c,)
  want_y = (np.asarray(x, np.float64) - mean.reshape(keep)) / np.sqrt(var.reshape(keep) + 1e-5)
  m = np.broadcast_to(np.asarray(mask), x.shape)
  err = np.abs(np.where(m, np.asarray(y, np.float64) - want_y, 0))
  assert np.all(err <= _MEAN_ATOL / np.sqrt(var.reshape(keep) + 1e-5)), err.max()


def test_mask_first_row_masked_tall():
  # (256, 6), row 0 masked: used to give running var 0.0 (float64: 0.91-1.02).
  mask = jnp.ones((256, 1), bool).at[0].set(False)
  _check_against_reference(_big_mean((256, 6)), mask)


def test_mask_first_row_masked_wide():
  # (4, 64): the dot-product path (short, wide input).
  mask = jnp.asarray([[False], [True], [True], [True]])
  _check_against_reference(_big_mean((4, 64), seed=1), mask)


def test_mask_left_padded_sequence():
  # Batch 8, length 16, 4 features; sequence b has b + 1 left pads (never position 0).
  pads = np.arange(8) + 1
  mask = jnp.asarray(np.arange(16)[None, :] >= pads[:, None])[..., None]
  _check_against_reference(_big_mean((8, 16, 4), seed=2), mask)


def test_mask_per_feature_first_selected_differs():
  # Each feature selects a different first position (mask of x's full shape).
  rng = np.random.default_rng(3)
  mask = jnp.asarray(rng.uniform(size=(64, 5)) < 0.5).at[0].set(False)
  _check_against_reference(_big_mean((64, 5), seed=3), mask, pad_value=-3e4)


_SHARD_MAP_SCRIPT = textwrap.dedent(r"""
  import json
  import numpy as np, jax, jax.numpy as jnp, regjax
  from jax.sharding import PartitionSpec as P
  assert jax.device_count() == 4
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.standard_normal((32, 6)), jnp.float32)
  keep = np.ones((32, 1), bool)
  keep[::8] = False  # each device's first local row
  x = jnp.where(keep, x, 0.0)
  mesh = jax.make_mesh((4,), ("batch",))
  fn = lambda x, s, m: regjax.batch_norm(x, s, momentum=0.0, axis_name="batch", mask=m)
  run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                              out_specs=(P("batch"), P())))
  from jax.sharding import NamedSharding
  rows = NamedSharding(mesh, P("batch"))
  y, new = run(jax.device_put(x, rows), regjax.init_batch_stats(6),
               jax.device_put(jnp.asarray(keep), rows))
  print(json.dumps({"x": np.asarray(x).tolist(), "keep": keep.tolist(),
                    "y": np.asarray(y).tolist(), "mean": np.asarray(new["mean"]).tolist(),
                    "var": np.asarray(new["var"]).tolist()}))
""")


def test_mask_first_local_row_masked_under_shard_map():
  out = json.loads(run_on_host_devices(_SHARD_MAP_SCRIPT, 4).strip().splitlines()[-1])
  keep = np.asarray(out["keep"])
  mean, var = _masked_reference(np.asarray(out["x"], np.float32), keep)
  np.testing.assert_allclose(out["var"], var, rtol=_VAR_RTOL)
  np.testing.assert_allclose(out["mean"], mean, rtol=0, atol=_MEAN_ATOL)
  want_y = (np.asarray(out["x"], np.float64) - mean) / np.sqrt(var + 1e-5)
  err = np.abs(np.where(keep, np.asarray(out["y"]) - want_y, 0))
  assert np.all(err <= _MEAN_ATOL / np.sqrt(var + 1e-5)), err.max()


# ----------------------------------------------------------------------------
# Non-finite values in masked-out positions
@pytest.mark.parametrize("shape", [(16, 4), (4, 64)], ids=["reduce", "dot"])
def test_nonfinite_padding_leaves_statistics_and_gradients_finite(shape):
  rng = np.random.default_rng(4)
  n, c = shape
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  mask = jnp.ones((n, 1), bool).at[0].set(False).at[n - 1].set(False)
  bad = x.at[0].set(jnp.nan).at[n - 1].set(jnp.inf)
  clean = x.at[0].set(0.0).at[n - 1].set(0.0)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def loss(x, scale, bias):
    y, new = regjax.batch_norm(x, regjax.init_batch_stats(c), scale, bias, mask=mask)
    return jnp.sum(jnp.where(mask, y * w, 0.0)), new

  (got, got_stats), got_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(bad, scale, bias)
  (want, want_stats), want_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
    clean, scale, bias
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(got_stats[k], want_stats[k])
  for g, h in zip(got_grads, want_grads, strict=False):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


def test_masked_finite_positions_keep_their_exact_derivative():
  # Finite padding still differentiates exactly (check_grads, both modes).
  rng = np.random.default_rng(5)
  x = jnp.asarray(
    rng.standard_normal((12, 3)), jnp.float64 if jax.config.x64_enabled else jnp.float32
  )
  mask = jnp.ones((12, 1), bool).at[0].set(False)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 3), x.dtype)

  def f(x, s):
    return regjax.batch_norm(x, regjax.init_batch_stats(3), s, mask=mask)[0]

  check_grads(f, (x, scale), order=1, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------
# Empty batches, traced momentum
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_empty_batch_keeps_statistics(use_mask, jit):
  stats = {"mean": jnp.arange(8.0), "var": jnp.arange(1.0, 9.0)}
  mask = jnp.ones((0, 8), bool) if use_mask else None

  def fn(x):
    return regjax.batch_norm(x, stats, mask=mask)

  y, new = (jax.jit(fn) if jit else fn)(jnp.ones((0, 8)))
  assert y.shape == (0, 8)
  np.testing.assert_array_equal(new["mean"], stats["mean"])
  np.testing.assert_array_equal(new["var"], stats["var"])
  g = jax.grad(lambda x: jnp.sum(fn(x)[0]))(jnp.ones((0, 8)))
  assert g.shape == (0, 8)


def test_empty_batch_in_modules():
  x0 = jnp.ones((0, 8))
  variables = rnn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((2, 8)))
  y, upd = rnn.BatchNorm(use_running_average=False).apply(variables, x0, mutable=["batch_stats"])
  assert y.shape == (0, 8)
  np.testing.assert_array_equal(upd["batch_stats"]["var"], variables["batch_stats"]["var"])
  bn = rnnx.BatchNorm(8, rngs=nnx.Rngs(0))
  assert bn(x0).shape == (0, 8)
  np.testing.assert_array_equal(bn.var[...], jnp.ones(8))


@pytest.mark.parametrize("momentum", [np.nan, np.inf, -np.inf, 1.5, -0.5])
def test_traced_momentum_nonfinite_keeps_statistics_out_of_range_clips(momentum):
  stats = {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 3.0)}
  x = jnp.asarray(np.random.default_rng(6).standard_normal((10, 3)), jnp.float32)
  _, new = jax.jit(lambda x, m: regjax.batch_norm(x, stats, momentum=m))(x, momentum)
  if momentum == -0.5:  # clipped to 0: the batch statistics replace the old ones
    np.testing.assert_allclose(new["var"], np.var(np.asarray(x, np.float64), 0), rtol=1e-5)
  else:  # NaN and +-inf keep the statistics; 1.5 clips to 1, which keeps them too
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    np.testing.assert_array_equal(new["var"], stats["var"])


def test_concrete_bad_momentum_is_rejected():
  with pytest.raises(ValueError, match="momentum"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), momentum=float("nan"))


# ----------------------------------------------------------------------------
# Bad arguments get errors that name them
@pytest.mark.parametrize("axis", [1.0, None, "0", (0, 1.5)])
def test_axis_must_be_int_or_tuple_of_ints(axis):
  with pytest.raises(TypeError, match="`axis` must be an int or a tuple of ints"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), axis=axis)
  with pytest.raises(TypeError, match="`axis`"):
    rnn.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), jnp.ones((4, 3)))


def test_none_statistics_are_rejected():
  with pytest.raises(ValueError, match=r"batch_stats\['mean'\]` is None"):
    regjax.batch_norm(jnp.ones((4, 3)), {"mean": None, "var": None})


def test_one_dimensional_input_train_mode_is_an_error_eval_is_not():
  stats = regjax.init_batch_stats(8)
  with pytest.raises(ValueError, match="needs a batch axis"):
    regjax.batch_norm(jnp.ones(8), stats)
  y, _ = regjax.batch_norm(jnp.full(8, 2.0), stats, deterministic=True)
  np.testing.assert_allclose(y, 2.0 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_integer_output_dtype_is_rejected():
  with pytest.raises(TypeError, match="`dtype` must be a floating-point"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), dtype=jnp.int32)


@pytest.mark.parametrize("eps", [np.float32(1e-3), np.float64(1e-3), 1e-3])
def test_numpy_epsilon_is_accepted_everywhere(eps):
  x = jnp.asarray(np.random.default_rng(7).standard_normal((6, 3)), jnp.float32)
  want, _ = regjax.batch_norm(x, regjax.init_batch_stats(3), epsilon=1e-3)
  got, _ = regjax.batch_norm(x, regjax.init_batch_stats(3), epsilon=eps)
  np.testing.assert_array_equal(got, want)
  variables = rnn.BatchNorm(use_running_average=False, epsilon=eps).init(jax.random.key(0), x)
  got, _ = rnn.BatchNorm(use_running_average=False, epsilon=eps).apply(
    variables, x, mutable=["batch_stats"]
  )
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(rnnx.BatchNorm(3, epsilon=eps, rngs=nnx.Rngs(0))(x), want)


@pytest.mark.parametrize("eps", [0.0, -1e-3, np.float32(np.nan), np.inf, True])
def test_bad_epsilon_is_rejected(eps):
  with pytest.raises(ValueError, match="epsilon"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), epsilon=eps)
  with pytest.raises(ValueError, match="epsilon"):
    rnnx.BatchNorm(3, epsilon=eps, rngs=nnx.Rngs(0))


def test_complex_statistics_against_float64():
  x = _complex_input((32, 3), seed=9)
  _, new = regjax.batch_norm(x, regjax.init_batch_stats(3), momentum=0.0)
  xn = np.asarray(x, np.complex128)
  np.testing.assert_allclose(new["mean"], xn.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new["var"], (np.abs(xn - xn.mean(0)) ** 2).mean(0), rtol=1e-5)
  assert not jnp.iscomplexobj(new["var"])

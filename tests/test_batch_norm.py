"""Tests for `regjax.batch_norm` and `regjax.linen.BatchNorm`.

The functional op is checked against a float64 NumPy reference written below
(biased batch variance, Flax momentum convention, optional
unbiased running variance, eval with the running statistics); the linen module
is checked against `flax.linen.BatchNorm` itself.
"""

import functools
import json
import re
import textwrap

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import regjax
import regjax.linen as rnn
from host_devices import run_on_host_devices

# float32 tolerance for outputs of order 1-10. One op rounds at 2**-24 ~ 6e-8
# relative; the op chain (a shifted two-pass reduction over <= ~1000 values,
# rsqrt, scale, bias) accumulates a few 1e-7 relative to the data scale. 1e-5
# leaves a >10x margin (every reference comparison passes at 1e-6) yet catches
# every plausible bug: biased vs unbiased variance (n/(n-1) - 1 >= 8e-3 here), a
# dropped or default epsilon (the tests use epsilon/var >= 1e-3, or data whose
# variance is ~epsilon), or the PyTorch momentum convention are all >= 5e-4 away.
# Comparisons with flax need the same: its one-pass variance is ~1e-6 off here.
RTOL = ATOL = 1e-5


# ----------------------------------------------------------------------------
# float64 reference


def _feature_axes(axis, ndim):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def reference_batch_norm(x, mean, var, scale=None, bias=None, *, axis=-1, momentum=0.99,
                         epsilon=1e-5, unbiased_running_var=False, mask=None,
                         deterministic=False):
  """float64 batch norm; returns (y, new_mean, new_var) with feature-shaped stats."""
  x = np.asarray(x, np.float64)
  axes = _feature_axes(axis, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  feature_shape = tuple(x.shape[a] for a in axes)
  keep = tuple(1 if a in red else x.shape[a] for a in range(x.ndim))
  mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
  if deterministic:
    mu, v = mean.reshape(keep), var.reshape(keep)
    new_mean, new_var = mean, var
  else:
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(red, keepdims=True)
    xs = np.where(w > 0, x, 0.0)  # unselected positions may hold NaN padding
    mu = xs.sum(red, keepdims=True) / np.maximum(n, 1)
    v = (w * (xs - mu) ** 2).sum(red, keepdims=True) / np.maximum(n, 1)
    sample_var = np.where(n > 1, v * n / np.maximum(n - 1, 1), v) if unbiased_running_var else v
    seen = (n > 0).reshape(feature_shape)
    new_mean = np.where(seen, momentum * mean + (1 - momentum) * mu.reshape(feature_shape), mean)
    new_var = np.where(seen, momentum * var + (1 - momentum) * sample_var.reshape(feature_shape),
                       var)
  with np.errstate(invalid="ignore"):  # NaN padding stays NaN in y
    y = (x - mu) / np.sqrt(v + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(keep)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(keep)
  return y, new_mean, new_var


def _problem(shape, axis, seed, *, loc=0.5, std=2.0, dtype=np.float32):
  """Input whose features differ in location and spread (so a reduction over the
  wrong axes shows), plus non-trivial prior stats, scale and bias."""
  rng = np.random.default_rng(seed)
  axes = _feature_axes(axis, len(shape))
  fshape = tuple(shape[a] for a in axes)
  keep = tuple(shape[a] if a in axes else 1 for a in range(len(shape)))
  offset = loc + std * rng.standard_normal(fshape)
  spread = std * rng.uniform(0.25, 1.5, fshape)
  x = offset.reshape(keep) + spread.reshape(keep) * rng.standard_normal(shape)
  stats = {"mean": jnp.asarray(rng.normal(size=fshape), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32)}
  scale = jnp.asarray(rng.uniform(0.5, 1.5, fshape) * rng.choice([-1.0, 1.0], fshape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=fshape), jnp.float32)
  return jnp.asarray(x, dtype), stats, scale, bias


def _close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=""):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64),
                             rtol=rtol, atol=atol, err_msg=err_msg)


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
      *[(f"{name}_{'affine' if affine else 'plain'}", shape, axis, affine)
        for name, shape, axis in _LAYOUTS for affine in (True, False)])
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
    ry, _, _ = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias,
                                    deterministic=True, **kw)
    _close(ey, ry, err_msg="eval y")
    chex.assert_trees_all_equal(same, stats)

  @chex.variants(with_jit=True, without_jit=True)
  def test_defaults(self):
    # std 3e-3 makes var ~ 1e-5 ~ epsilon, so a wrong default epsilon shows in y.
    x, stats, scale, bias = _problem((128, 4), -1, seed=1, loc=0.0, std=3e-3)
    y, new = self.variant(regjax.batch_norm)(x, stats, scale, bias)
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias,
                                           momentum=0.99, epsilon=1e-5)
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
  @parameterized.named_parameters(("bfloat16", jnp.bfloat16, 2.0**-8),
                                  ("float16", jnp.float16, 2.0**-11))
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
        x, stats, scale, bias)
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
        x, stats, scale, bias, mask=jnp.asarray(keep))
    rows = keep[:, 0]
    ry, rmean, rvar = reference_batch_norm(np.asarray(x)[rows], stats["mean"], stats["var"],
                                           scale, bias, **kw)
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
        x, stats, scale, bias, mask=jnp.asarray(mask))
    ry, rmean, rvar = reference_batch_norm(x, stats["mean"], stats["var"], scale, bias,
                                           mask=mask, **kw)
    assert np.all(np.isfinite(new["mean"])) and np.all(np.isfinite(new["var"]))
    # The empty feature keeps its running statistics exactly.
    assert new["mean"][1] == stats["mean"][1] and new["var"][1] == stats["var"][1]
    _close(new["mean"], rmean)
    _close(new["var"], rvar)
    _close(np.asarray(y)[..., [0, 2]], ry[..., [0, 2]])


def _large_mean_data():
  rng = np.random.default_rng(0)
  return jnp.asarray(1e4 + rng.standard_normal((4096, 16)), jnp.float32)


def test_flax_default_fails_on_large_mean_data():
  """Documents that the large-mean data is hard: flax's default one-pass
  variance (use_fast_variance=True) is off by > 1e3 where regjax is within 1e-2."""
  x = _large_mean_data()
  ry, _, _ = reference_batch_norm(x, np.zeros(16), np.ones(16))
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y_flax, _ = bn.apply(variables, x, mutable=["batch_stats"])
  y_ours = rnn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])[0]
  err_flax = np.max(np.abs(np.asarray(y_flax, np.float64) - ry))
  err_ours = np.max(np.abs(np.asarray(y_ours, np.float64) - ry))
  assert err_flax > 1e3, err_flax  # ~1.4e3 with jax 0.10.2 / flax 0.12.8
  assert err_ours < 1e-2, err_ours


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
      y, new = regjax.batch_norm(x, stats, scale, bias, momentum=0.9, epsilon=1e-3,
                                 unbiased_running_var=True)
      assert y.dtype == new["var"].dtype == jnp.float64
      return y, new["mean"], new["var"]

    # jit: a handful of compiles instead of thousands of eager ops.
    check_grads(jax.jit(f), (x, scale, bias), order=2, modes=("fwd", "rev"), eps=1e-5,
                atol=1e-6, rtol=1e-6)


def _autodiff_reference(x, scale, bias, *, stats, axis, mask, momentum=0.9, epsilon=1e-3):
  """The textbook two-pass batch norm in plain jnp, differentiated by jax itself."""
  axes = _feature_axes(axis, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  keep = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  m = jnp.ones(x.shape, x.dtype) if mask is None else jnp.broadcast_to(mask, x.shape).astype(
      x.dtype)
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


@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((4, 6), -1), ((5, 6), 0),
                                        ((2, 3, 2, 4), -1), ((2, 2, 8), -1), ((2, 3, 4), (0, 2))])
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
      y, new = regjax.batch_norm(x, stats, scale, bias, axis=axis, mask=mask, momentum=0.9,
                                 epsilon=1e-3)
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
      loss = lambda f: lambda *a: sum(jnp.vdot(c, o) for c, o in zip(cts, f(*a)))
      h_got = jax.jvp(jax.grad(loss(f_ours), argnums=(0, 1, 2) if affine else 0),
                      args, tangents)[1]
      h_want = jax.jvp(jax.grad(loss(f_ref), argnums=(0, 1, 2) if affine else 0),
                       args, tangents)[1]
      chex.assert_trees_all_close(h_got, h_want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("rows,features", [(512, 8), (16, 256)])  # fused sums; dots
def test_gradient_large_mean_is_finite_and_accurate(rows, features):
  x = 1e4 + jnp.asarray(np.random.default_rng(5).standard_normal((rows, features)), jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
  stats = regjax.init_batch_stats(features)
  loss = lambda x: jnp.sum(regjax.batch_norm(x, stats)[0] * cotangent)
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
  g = jax.jit(lambda x, d: regjax.batch_norm(x, stats, deterministic=d)[0],
              static_argnames="d")
  _close(g(x, d=True), reference_batch_norm(x, stats["mean"], stats["var"],
                                            deterministic=True)[0])


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
    ("stats_wrong_shape", dict(batch_stats=regjax.init_batch_stats(4)), ValueError,
     re.escape("`batch_stats['mean']`")),
    ("stats_not_a_dict", dict(batch_stats=(_Z3, _Z3 + 1)), (ValueError, TypeError),
     "`batch_stats`"),
    ("scale_wrong_shape", dict(scale=jnp.ones(4)), ValueError, "`scale`"),
    ("bias_wrong_shape", dict(bias=jnp.ones((1, 3))), ValueError, "`bias`"),
    ("axis_out_of_range", dict(axis=2), ValueError, "`axis`"),
    ("axis_negative_out_of_range", dict(axis=-3), ValueError, "`axis`"),
    ("axis_repeated", dict(axis=(1, -1)), ValueError, "`axis`"),
    ("integer_x", dict(x=jnp.ones((8, 3), jnp.int32)), TypeError, "`x`"),
    ("mask_not_bool", dict(mask=jnp.ones((8, 1), jnp.float32)), TypeError, "`mask`"),
    ("mask_not_broadcastable", dict(mask=jnp.ones((5, 3), bool)), ValueError, "`mask`"),
    ("mask_higher_rank", dict(mask=jnp.ones((2, 8, 3), bool)), ValueError, "`mask`"),
    ("unbiased_single_value", dict(x=jnp.ones((1, 3)), unbiased_running_var=True), ValueError,
     "`unbiased_running_var"),
]


@pytest.mark.parametrize("overrides,error,match", [c[1:] for c in _BAD_INPUTS],
                         ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_names_the_argument(overrides, error, match):
  args = dict(x=jnp.ones((8, 3)), batch_stats=regjax.init_batch_stats(3))
  args.update(overrides)
  x, batch_stats = args.pop("x"), args.pop("batch_stats")
  with pytest.raises(error, match=match):
    regjax.batch_norm(x, batch_stats, **args)


# ----------------------------------------------------------------------------
# Linen module against flax.linen.BatchNorm


def _shapes_dtypes(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def _randomize(variables, seed):
  """Non-trivial params and running stats, each leaf keeping its dtype."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif "scale" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


_LINEN_CASES = [
    ("default", dict(), (32, 4), jnp.float32),
    ("no_scale", dict(use_scale=False), (32, 4), jnp.float32),
    ("no_bias", dict(use_bias=False), (32, 4), jnp.float32),
    ("no_affine", dict(use_scale=False, use_bias=False), (32, 4), jnp.float32),
    ("axis_1", dict(axis=1), (8, 3, 4, 4), jnp.float32),
    ("momentum_epsilon", dict(momentum=0.9, epsilon=1e-2), (32, 4), jnp.float32),
    ("param_bf16", dict(param_dtype=jnp.bfloat16), (32, 4), jnp.float32),
    ("dtype_bf16", dict(dtype=jnp.bfloat16), (32, 4), jnp.float32),
    ("x_bf16", dict(), (32, 4), jnp.bfloat16),
    ("x_bf16_dtype_f32", dict(dtype=jnp.float32), (32, 4), jnp.bfloat16),
    ("all_bf16", dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), (32, 4), jnp.bfloat16),
]


@pytest.mark.parametrize("kwargs,shape,x_dtype", [c[1:] for c in _LINEN_CASES],
                         ids=[c[0] for c in _LINEN_CASES])
def test_linen_matches_flax(kwargs, shape, x_dtype):
  x, _, _, _ = _problem(shape, kwargs.get("axis", -1), seed=21, dtype=x_dtype)
  ours, theirs = rnn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  key = jax.random.key(0)
  ours_vars = ours.init(key, x, use_running_average=False)
  theirs_vars = theirs.init(key, x, use_running_average=False)
  assert _shapes_dtypes(ours_vars) == _shapes_dtypes(theirs_vars)
  chex.assert_trees_all_equal(ours_vars, theirs_vars)  # same initial values too

  variables = _randomize(theirs_vars, seed=22)
  y_ours, upd_ours = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, upd_theirs = theirs.apply(variables, x, use_running_average=False,
                                      mutable=["batch_stats"])
  e_ours = ours.apply(variables, x, use_running_average=True)
  e_theirs = theirs.apply(variables, x, use_running_average=True)
  assert y_ours.dtype == y_theirs.dtype and e_ours.dtype == e_theirs.dtype
  assert _shapes_dtypes(upd_ours) == _shapes_dtypes(upd_theirs)
  # Both compute in float32 and round once; a bf16 result may differ by one bf16 ulp.
  tol = 2.0**-7 if y_theirs.dtype == jnp.bfloat16 else RTOL
  _close(y_ours, y_theirs, rtol=tol, atol=ATOL)
  _close(e_ours, e_theirs, rtol=tol, atol=ATOL)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)
  # ... and both really updated the statistics.
  assert not np.allclose(upd_ours["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_linen_mask_matches_flax():
  x, _, _, _ = _problem((32, 4), -1, seed=23)
  mask = jnp.asarray(np.random.default_rng(0).random((32, 4)) < 0.7)
  variables = _randomize(nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True), 24)
  kw = dict(use_running_average=False, mask=mask, mutable=["batch_stats"])
  y_ours, upd_ours = rnn.BatchNorm().apply(variables, x, **kw)
  y_theirs, upd_theirs = nn.BatchNorm().apply(variables, x, **kw)
  _close(y_ours, y_theirs)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)


def test_flax_checkpoint_loads_into_regjax():
  x, _, _, _ = _problem((16, 2, 5), -1, seed=25)
  theirs = nn.BatchNorm(momentum=0.9)
  trained = _randomize(theirs.init(jax.random.key(1), x, use_running_average=True), 26)
  blob = flax.serialization.to_bytes(trained)

  ours = rnn.BatchNorm(momentum=0.9)
  template = ours.init(jax.random.key(2), x, use_running_average=True)
  restored = flax.serialization.from_bytes(template, blob)
  chex.assert_trees_all_equal(restored, trained)
  _close(ours.apply(restored, x, use_running_average=True),
         theirs.apply(trained, x, use_running_average=True))
  y_ours, upd_ours = ours.apply(restored, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, upd_theirs = theirs.apply(trained, x, use_running_average=False,
                                      mutable=["batch_stats"])
  _close(y_ours, y_theirs)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)


def test_linen_use_running_average_is_an_alias_of_deterministic():
  x, _, _, _ = _problem((16, 3), -1, seed=27)
  variables = _randomize(rnn.BatchNorm().init(jax.random.key(0), x, deterministic=True), 28)
  stats = variables["batch_stats"]
  eval_ref = reference_batch_norm(x, stats["mean"], stats["var"], variables["params"]["scale"],
                                  variables["params"]["bias"], deterministic=True)[0]
  train_ref = reference_batch_norm(x, stats["mean"], stats["var"], variables["params"]["scale"],
                                   variables["params"]["bias"])[0]
  evals = [
      rnn.BatchNorm(use_running_average=True).apply(variables, x),
      rnn.BatchNorm(deterministic=True).apply(variables, x),
      rnn.BatchNorm(deterministic=True, use_running_average=True).apply(variables, x),
      rnn.BatchNorm().apply(variables, x, True),
      rnn.BatchNorm().apply(variables, x, use_running_average=True),
      rnn.BatchNorm().apply(variables, x, deterministic=True),
  ]
  for y in evals:
    _close(y, eval_ref)
  for module, call in [(rnn.BatchNorm(use_running_average=False), {}),
                       (rnn.BatchNorm(deterministic=False), {}),
                       (rnn.BatchNorm(), dict(use_running_average=False)),
                       (rnn.BatchNorm(), dict(deterministic=False))]:
    y, upd = module.apply(variables, x, mutable=["batch_stats"], **call)
    _close(y, train_ref)
    assert not np.allclose(upd["batch_stats"]["var"], stats["var"])

  with pytest.raises(ValueError, match="disagree"):
    rnn.BatchNorm(deterministic=True, use_running_average=False).apply(variables, x)
  with pytest.raises(ValueError, match="disagree"):
    rnn.BatchNorm().apply(variables, x, use_running_average=True, deterministic=False)


@pytest.mark.parametrize("module_cls", [rnn.BatchNorm, nn.BatchNorm], ids=["regjax", "flax"])
def test_init_does_not_update_statistics(module_cls):
  x, _, _, _ = _problem((32, 3), -1, seed=29, loc=5.0, std=3.0)
  # axis_name is ignored at init: no named axis needs to exist there.
  variables = module_cls(use_running_average=False, axis_name="batch").init(jax.random.key(0), x)
  chex.assert_trees_all_equal(variables["batch_stats"],
                              {"mean": jnp.zeros(3), "var": jnp.ones(3)})


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
      jnp.asarray(x), regjax.init_batch_stats(fshape))
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


@pytest.mark.parametrize("case", ["shard_map", "shard_map_unbiased", "shard_map_mask", "pmap",
                                  "pmap_mask", "pmap_groups", "jit_sharded",
                                  "jit_sharded_mask", "jit_sharded_auto"])
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

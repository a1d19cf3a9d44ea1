"""Tests of regjax.renorm.batch_renorm (Ioffe 2017, arXiv:1702.03275).

Forward against a float64 NumPy reference of the paper's formula with ``r`` and
``d`` really clipped (running statistics far from the batch's), the exact
reduction to ``regjax.batch_norm`` at ``r_max=1, d_max=0`` and in eval mode,
accuracy at ``|mean| >> std``, derivatives against autodiff of the textbook
formula with ``r, d`` stop-gradient (float64), traced limits (one trace, clipped),
errors, and count-weighted statistics across 4 host devices.
"""

import functools
import json
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _close, _feature_axes, _problem, reference_batch_norm
from absl.testing import parameterized
from host_devices import run_on_host_devices

import regjax
from regjax.renorm import batch_renorm


def reference_batch_renorm(x, mean, var, scale=None, bias=None, *, r_max, d_max, axis=-1,
                           epsilon=1e-5, mask=None, **bn_kw):  # fmt: skip
  """float64 batch renorm; returns (y, new_mean, new_var, r, d), stats feature-shaped."""
  x64 = np.asarray(x, np.float64)
  axes = _feature_axes(axis, x64.ndim)
  red = tuple(a for a in range(x64.ndim) if a not in axes)
  keep = tuple(1 if a in red else x64.shape[a] for a in range(x64.ndim))
  w = np.ones(x64.shape) if mask is None else np.broadcast_to(mask, x64.shape).astype(np.float64)
  n = np.maximum(w.sum(red, keepdims=True), 1)
  xs = np.where(w > 0, x64, 0.0)
  mu_b = xs.sum(red, keepdims=True) / n
  var_b = (w * (xs - mu_b) ** 2).sum(red, keepdims=True) / n
  mu = np.asarray(mean, np.float64).reshape(keep)
  sigma = np.sqrt(np.asarray(var, np.float64).reshape(keep) + epsilon)
  sigma_b = np.sqrt(var_b + epsilon)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
  y = (x64 - mu_b) / sigma_b * r + d
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(keep)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(keep)
  _, new_mean, new_var = reference_batch_norm(
    x, mean, var, axis=axis, epsilon=epsilon, mask=mask, **bn_kw
  )
  return y, new_mean, new_var, r, d


def _far_stats(x, axis, seed):
  """Running statistics far from the batch's: per feature, in turn, sigma_B/sigma
  of about 4, 1/4 and 1.2 and (mu_B - mu)/sigma of about 0.3, 5 and -5, so with
  r_max=2, d_max=1 both bounds of r and of d are hit, and some values are not."""
  rng = np.random.default_rng(seed)
  axes = _feature_axes(axis, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  x64 = np.asarray(x, np.float64)
  mu_b, var_b = x64.mean(red), x64.var(red)
  pattern = np.arange(mu_b.size).reshape(mu_b.shape) % 3
  jitter = rng.uniform(0.9, 1.1, mu_b.shape)
  ratio = np.choose(pattern, [4.0, 0.25, 1.2]) * jitter  # sigma_B / sigma
  var = var_b / ratio**2
  mean = mu_b - np.choose(pattern, [0.3, 5.0, -5.0]) * jitter * np.sqrt(var)
  return {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}


_LAYOUTS = [
  ("nc", (64, 6), -1),
  ("nchw", (4, 3, 5, 6), 1),
  ("two_axes", (16, 4, 3), (-2, -1)),
  ("wide_dot", (4, 32), -1),  # no more rows than features: the dot reducer on CPU
]


class BatchRenormReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
    *[
      (f"{name}_{'affine' if affine else 'plain'}", shape, axis, affine)
      for name, shape, axis in _LAYOUTS
      for affine in (True, False)
    ]
  )
  def test_clipped_forward_matches_float64_reference(self, shape, axis, affine):
    x, _, scale, bias = _problem(shape, axis, seed=len(shape) + 3)
    stats = _far_stats(x, axis, seed=len(shape))
    if not affine:
      scale = bias = None
    kw = dict(momentum=0.9, epsilon=1e-3, axis=axis, r_max=2.0, d_max=1.0)
    y, new = self.variant(functools.partial(batch_renorm, **kw))(x, stats, scale, bias)
    ry, rmean, rvar, r, d = reference_batch_renorm(
      x, stats["mean"], stats["var"], scale, bias, **kw
    )
    # The case is discriminating: r and d hit both of their bounds somewhere.
    assert np.any(r == 2.0) and np.any(r == 0.5) and np.any((r > 0.5) & (r < 2.0))
    assert np.any(d == 1.0) and np.any(d == -1.0) and np.any(np.abs(d) < 1.0)
    assert y.dtype == x.dtype and y.shape == x.shape
    chex.assert_trees_all_equal_shapes_and_dtypes(new, stats)
    # |y| reaches ~r_max * max|xhat| + d_max ~ 10: 1e-5 relative and absolute.
    _close(y, ry, err_msg="train y")
    _close(new["mean"], rmean, err_msg="running mean")
    _close(new["var"], rvar, err_msg="running var")

  @chex.variants(with_jit=True, without_jit=True)
  def test_unclipped_is_normalization_with_running_statistics(self):
    # r_max = d_max = inf: y = scale * (x - mean) / sigma + bias, batch norm's eval formula.
    x, _, scale, bias = _problem((32, 5), -1, seed=11)
    stats = _far_stats(x, -1, seed=12)
    y, _ = self.variant(functools.partial(batch_renorm, r_max=np.inf, d_max=np.inf))(
      x, stats, scale, bias
    )
    ey, _ = regjax.batch_norm(x, stats, scale, bias, deterministic=True)
    _close(y, ey, rtol=1e-5, atol=1e-4)  # |y| up to ~50 here


def _exact_cases():
  x, stats, scale, bias = _problem((32, 6), -1, seed=21)
  mask = jnp.asarray(np.random.default_rng(3).uniform(size=(32, 1)) < 0.6).at[0].set(False)
  xh, statsh, _, _ = _problem((16, 3, 4), (1, 2), seed=22, dtype=jnp.bfloat16)
  return {
    "affine": (x, stats, scale, bias, {}),
    "no_affine": (x, stats, None, None, {}),
    "bias_only": (x, stats, None, bias, {}),
    "mask_unbiased": (x, stats, scale, bias, dict(mask=mask, unbiased_running_var=True)),
    "bf16_two_axes": (xh, statsh, None, None, dict(axis=(1, 2), momentum=0.8)),
    "wide_dot": (*_problem((4, 32), -1, seed=23), {}),
    "float32_reductions_off": (
      xh,
      statsh,
      None,
      None,
      dict(axis=(1, 2), force_float32_reductions=False),
    ),
  }


@pytest.mark.parametrize("case", list(_exact_cases()))
def test_r_max_1_d_max_0_is_batch_norm_bit_for_bit(case):
  x, stats, scale, bias, kw = _exact_cases()[case]
  # Python numbers 1 and 0: batch norm itself (output, statistics, gradients).
  want = regjax.batch_norm(x, stats, scale, bias, **kw)
  got = batch_renorm(x, stats, scale, bias, r_max=1, d_max=0.0, **kw)
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal_dtypes(got, want)
  # Traced limits run the general path: r and d computed, then clipped to exactly 1 and 0,
  # and batch norm called with scale * 1 and scale * 0 + bias: the same statistics, and
  # with a scale the same output bit for bit. Without one, batch norm gets a scale (r) it
  # would not have, and the gradient is a different program: XLA may fuse and order
  # them differently, so the last bit may differ there.
  cot = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), x.dtype)

  def with_grad(f):
    def run(x, *limits):
      def loss(x):
        y, new = f(x, *limits)
        return jnp.sum(y.astype(jnp.float32) * cot), (y, new)

      return jax.grad(loss, has_aux=True)(x)

    return jax.jit(run)

  traced = with_grad(lambda x, r, d: batch_renorm(x, stats, scale, bias, r_max=r, d_max=d, **kw))
  bn = with_grad(lambda x: regjax.batch_norm(x, stats, scale, bias, **kw))
  (dx, (y, new)), (want_dx, (want_y, want_new)) = traced(x, 1.0, 0.0), bn(x)
  chex.assert_trees_all_equal(new, want_new)
  if scale is not None:
    chex.assert_trees_all_equal(y, want_y)
  chex.assert_trees_all_close((y, dx), (want_y, want_dx), rtol=1e-6, atol=1e-6)


def test_eval_is_batch_norm_eval_bit_for_bit():
  x, _, scale, bias = _problem((16, 4, 5), -1, seed=31)
  stats = _far_stats(x, -1, seed=32)
  for kw in ({}, dict(dtype=jnp.bfloat16)):
    got = batch_renorm(x, stats, scale, bias, r_max=3.0, d_max=5.0, deterministic=True, **kw)
    want = regjax.batch_norm(x, stats, scale, bias, deterministic=True, **kw)
    chex.assert_trees_all_equal(got, want)
    assert got[1] is stats


def test_large_mean_is_accurate():
  """mean 1e4, std 1 in float32, r and d clipping: within 1e-2 of float64."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.standard_normal((4096, 16)), jnp.float32)
  stats = _far_stats(x, -1, seed=5)
  kw = dict(r_max=2.0, d_max=1.0, momentum=0.0)
  y, new = batch_renorm(x, stats, **kw)
  ry, rmean, rvar, r, d = reference_batch_renorm(x, stats["mean"], stats["var"], **kw)
  assert np.any(r == 2.0) and np.any(np.abs(d) == 1.0)
  # Best possible ~5e-4 * r_max: half an ulp of 1e4 in the float32 mean, times r.
  assert np.max(np.abs(np.asarray(y, np.float64) - ry)) < 1e-2
  _close(new["mean"], rmean, rtol=1e-6, atol=0)
  _close(new["var"], rvar, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------
# Derivatives
def _autodiff_reference(
  x, scale, bias, *, stats, axis, mask, r_max, d_max, momentum, epsilon, stop=jax.lax.stop_gradient
):
  """The paper's formula in plain jnp (float64), r and d through ``stop``, by autodiff."""
  axes = _feature_axes(axis, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  keep = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  fshape = tuple(x.shape[a] for a in axes)
  m = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  n = jnp.sum(m, red, keepdims=True)
  mu_b = jnp.sum(m * x, red, keepdims=True) / n
  var_b = jnp.sum(m * jnp.square(x - mu_b), red, keepdims=True) / n
  sigma_b = jnp.sqrt(var_b + epsilon)
  sigma = jnp.sqrt(stats["var"].reshape(keep) + epsilon)
  r = stop(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
  d = stop(jnp.clip((mu_b - stats["mean"].reshape(keep)) / sigma, -d_max, d_max))
  y = (x - mu_b) / sigma_b * r + d
  if scale is not None:
    y = y * scale.reshape(keep)
  if bias is not None:
    y = y + bias.reshape(keep)
  new_mean = momentum * stats["mean"] + (1 - momentum) * mu_b.reshape(fshape)
  new_var = momentum * stats["var"] + (1 - momentum) * var_b.reshape(fshape)
  return y, new_mean, new_var


@pytest.mark.parametrize(
  "shape,axis,masked,affine",
  [
    ((12, 5), -1, False, True),
    ((4, 8), -1, True, True),  # dot reducer
    ((3, 4, 5), 1, True, False),
  ],
)
def test_derivatives_match_autodiff_of_the_formula_float64(shape, axis, masked, affine):
  with jax.enable_x64(True):
    x, _, scale, bias = _problem(shape, axis, seed=41, dtype=np.float64)
    stats = jax.tree.map(lambda a: a.astype(jnp.float64), _far_stats(x, axis, seed=42))
    scale, bias = (scale.astype(jnp.float64), bias.astype(jnp.float64)) if affine else (None, None)
    mask = None
    if masked:
      mask = jnp.asarray(np.random.default_rng(8).uniform(size=x.shape) < 0.7)
      mask = mask.at[(0,) * x.ndim].set(False).at[(1,) * x.ndim].set(True)
      x = jnp.where(mask, x, 1e3)
    kw = dict(axis=axis, mask=mask, r_max=2.0, d_max=1.0, momentum=0.9, epsilon=1e-3)

    def ours(x, scale, bias):
      y, new = batch_renorm(x, stats, scale, bias, **kw)
      return y, new["mean"], new["var"]

    ref = functools.partial(_autodiff_reference, stats=stats, **kw)
    through = functools.partial(ref, stop=lambda v: v)  # r and d differentiated
    args = (x, scale, bias)
    rng = np.random.default_rng(9)
    tangents = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), args)
    fshape = stats["mean"].shape
    cts = tuple(jnp.asarray(rng.standard_normal(s)) for s in (x.shape, fshape, fshape))

    @jax.jit
    def derivatives(args, tangents, cts):  # one compilation per implementation
      return {
        name: (
          f(*args),
          jax.jvp(f, args, tangents)[1],
          jax.vjp(f, *args)[1](cts),
        )
        for name, f in (("ours", ours), ("ref", ref), ("through", through))
      }

    out = derivatives(args, tangents, cts)
    got, want = out["ours"], out["ref"]
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-10, atol=1e-10)  # values
    chex.assert_trees_all_close(got[1:], want[1:], rtol=1e-9, atol=1e-9)  # jvp, vjp
    # r and d carry no gradient: a gradient through them differs.
    assert not np.allclose(out["through"][2][0], got[2][0], atol=1e-3)


def test_masked_nonfinite_padding_keeps_statistics_and_gradients_finite():
  x, _, scale, bias = _problem((16, 4), -1, seed=51)
  stats = _far_stats(x, -1, seed=52)
  mask = jnp.arange(16)[:, None] < 10
  x = jnp.where(mask, x, jnp.nan)

  def loss(x, scale, bias):
    y, new = batch_renorm(x, stats, scale, bias, mask=mask, r_max=2.0, d_max=1.0)
    return jnp.sum(jnp.where(mask, y, 0.0)), new

  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (value, new), grads = value_and_grad(x, scale, bias)
  assert np.isfinite(value)
  for leaf in jax.tree.leaves((new, grads)):
    assert np.all(np.isfinite(np.asarray(leaf)))


# ----------------------------------------------------------------------------
# Traced limits (a ramp compiles once)
def test_traced_ramp_traces_once_and_uses_each_value():
  x, _, scale, bias = _problem((32, 5), -1, seed=61)
  stats = _far_stats(x, -1, seed=62)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, r_max, d_max):
    return batch_renorm(x, stats, scale, bias, r_max=r_max, d_max=d_max)

  for r_max, d_max in [(1.0, 0.0), (1.5, 0.5), (2.0, 2.0), (3.0, 5.0)]:
    y, _ = step(x, jnp.float32(r_max), jnp.float32(d_max))
    ry, *_ = reference_batch_renorm(x, stats["mean"], stats["var"], scale, bias, r_max=r_max,
                                    d_max=d_max)  # fmt: skip
    _close(y, ry)
  # A traced value out of range is clipped into it: r_max < 1 -> 1, d_max < 0 -> 0, NaN too.
  bn = regjax.batch_norm(x, stats, scale, bias)
  for r_max, d_max in [(0.5, -1.0), (np.nan, np.nan), (-np.inf, -np.inf)]:
    chex.assert_trees_all_close(step(x, jnp.float32(r_max), jnp.float32(d_max)), bn, atol=1e-6)
  # +inf is in range: no clipping at all.
  y_inf, _ = step(x, jnp.float32(np.inf), jnp.float32(np.inf))
  _close(y_inf, regjax.batch_norm(x, stats, scale, bias, deterministic=True)[0], atol=1e-4)


# ----------------------------------------------------------------------------
# Errors
@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(r_max=0.5, d_max=1.0), ValueError, r"`r_max` must be in \[1, inf\]"),
    (dict(r_max=np.nan, d_max=1.0), ValueError, "r_max"),
    (dict(r_max=np.float32(0.99), d_max=1.0), ValueError, "r_max"),
    (dict(r_max=2.0, d_max=-0.1), ValueError, r"`d_max` must be in \[0, inf\]"),
    (dict(r_max=2.0, d_max=float("nan")), ValueError, "d_max"),
    (dict(r_max=jnp.ones(2), d_max=1.0), ValueError, "r_max.*scalar"),
    (dict(r_max=True, d_max=1.0), TypeError, "r_max"),
    (dict(r_max=2.0, d_max="1"), TypeError, "d_max"),
    (dict(r_max=2.0, d_max=1.0, momentum=1.5), ValueError, "momentum"),
    (dict(r_max=2.0, d_max=1.0, epsilon=0.0), ValueError, "epsilon"),
    (dict(r_max=2.0, d_max=1.0, dtype=jnp.int32), TypeError, "dtype"),
    (dict(r_max=2.0, d_max=1.0, axis=2), ValueError, "axis"),
  ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
  x, stats, scale, bias = _problem((8, 3), -1, seed=71)
  with pytest.raises(error, match=match):
    batch_renorm(x, stats, scale, bias, **kwargs)


def test_bad_inputs_are_reported_as_batch_renorm():
  x, stats, scale, bias = _problem((8, 3), -1, seed=72)
  with pytest.raises(TypeError, match="batch_renorm.*`x`"):
    batch_renorm(x.astype(jnp.complex64), stats, r_max=2.0, d_max=1.0)
  with pytest.raises(TypeError, match="batch_renorm.*`x`"):
    batch_renorm(x.astype(jnp.int32), stats, r_max=2.0, d_max=1.0)
  with pytest.raises(ValueError, match="batch_renorm.*batch_stats"):
    batch_renorm(x, None, r_max=2.0, d_max=1.0)
  with pytest.raises(ValueError, match="batch_renorm.*scale"):
    batch_renorm(x, stats, scale[:2], r_max=2.0, d_max=1.0)
  with pytest.raises(ValueError, match="batch_renorm.*batch axis"):
    batch_renorm(x[0], stats, axis=0, r_max=2.0, d_max=1.0)
  with pytest.raises(TypeError, match="deterministic"):
    jax.jit(lambda x, det: batch_renorm(x, stats, r_max=2.0, d_max=1.0, deterministic=det))(x, True)
  with pytest.raises(TypeError, match="r_max"):
    jax.jit(lambda x, r: batch_renorm(x, stats, r_max=r, d_max=1.0))(x, jnp.complex64(2))


# ----------------------------------------------------------------------------
# Across 4 host devices: count-weighted statistics with unequal per-device counts
_CROSS_DEVICE_SCRIPT = textwrap.dedent(r"""
  import json
  import numpy as np, jax, jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from regjax.renorm import batch_renorm
  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  n, c = 16, 3
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((n, c)) * rng.uniform(0.5, 3, c), jnp.float32)
  stats = {"mean": jnp.asarray([0.0, 6.0, 3.0], jnp.float32),
           "var": jnp.asarray([0.1, 40.0, 4.0], jnp.float32)}
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  keep = np.zeros((n, 1), bool)
  for device, count in enumerate([4, 1, 3, 0]):  # rows kept per device: unequal, one empty
    keep[4 * device:4 * device + count] = True
  kw = dict(momentum=0.9, epsilon=1e-3, r_max=2.0, d_max=0.5)
  mesh = jax.make_mesh((4,), ("batch",))
  rows = NamedSharding(mesh, P("batch"))
  fn = lambda x, m: batch_renorm(x, stats, scale, bias, axis_name="batch", mask=m, **kw)
  run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P("batch")),
                              out_specs=(P("batch"), P())))
  out = {}
  for name, m in (("all", np.ones((n, 1), bool)), ("mask", keep)):
    y, new = run(jax.device_put(x, rows), jax.device_put(jnp.asarray(m), rows))
    want_y, want = batch_renorm(x, stats, scale, bias, mask=jnp.asarray(m), **kw)
    out[name] = {"y": float(np.max(np.abs(np.asarray(y) - np.asarray(want_y)))),
                 "stats": float(max(np.max(np.abs(np.asarray(new[k]) - np.asarray(want[k])))
                                    for k in ("mean", "var")))}
  out["x"], out["keep"] = np.asarray(x).tolist(), keep.tolist()
  out["scale"], out["bias"] = np.asarray(scale).tolist(), np.asarray(bias).tolist()
  y_mask, _ = run(jax.device_put(x, rows), jax.device_put(jnp.asarray(keep), rows))
  out["y_mask"] = np.asarray(y_mask).tolist()
  print(json.dumps(out))
""")


def test_cross_device_statistics_are_count_weighted():
  out = json.loads(run_on_host_devices(_CROSS_DEVICE_SCRIPT, 4).strip().splitlines()[-1])
  for name in ("all", "mask"):
    # float32, 16 rows: ~1e-7 from the summation order alone.
    assert max(out[name].values()) < 1e-5, out
  # Against float64: the full-batch (not mean-of-device-means) statistics, r and d clipping.
  x, keep = np.asarray(out["x"], np.float32), np.asarray(out["keep"])
  stats = {"mean": np.array([0.0, 6.0, 3.0]), "var": np.array([0.1, 40.0, 4.0])}
  scale, bias = np.asarray(out["scale"], np.float32), np.asarray(out["bias"], np.float32)
  ry, _, _, r, d = reference_batch_renorm(
    x, stats["mean"], stats["var"], scale, bias, mask=keep, r_max=2.0, d_max=0.5, epsilon=1e-3
  )
  assert np.any(r == 2.0) or np.any(r == 0.5)
  assert np.any(np.abs(d) == 0.5)
  _close(np.where(keep, out["y_mask"], 0), np.where(keep, ry, 0))

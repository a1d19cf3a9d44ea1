"""Helpers shared by several test files (data, reference formulas, op tables).

Only what more than one test file uses lives here; a file's own helpers stay in it.
Random ops are checked statistically: every tolerance is Z standard errors of the
estimated quantity for the sample size used (Z = 5, a false-alarm rate of about
6e-7 per check).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import regjax
import regjax.linen as rl
import regjax.linen as rnn
import regjax.nnx as rn

# ----------------------------------------------------------------------------
# BatchNorm: the float64 reference and test data (normalization, parity)


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


def reference_batch_norm(
  x,
  mean,
  var,
  scale=None,
  bias=None,
  *,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
  unbiased_running_var=False,
  mask=None,
  deterministic=False,
):
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
    new_var = np.where(
      seen, momentum * var + (1 - momentum) * sample_var.reshape(feature_shape), var
    )
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
  stats = {
    "mean": jnp.asarray(rng.normal(size=fshape), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
  }
  scale = jnp.asarray(rng.uniform(0.5, 1.5, fshape) * rng.choice([-1.0, 1.0], fshape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=fshape), jnp.float32)
  return jnp.asarray(x, dtype), stats, scale, bias


def _close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=""):
  np.testing.assert_allclose(
    np.asarray(actual, np.float64),
    np.asarray(desired, np.float64),
    rtol=rtol,
    atol=atol,
    err_msg=err_msg,
  )


def _large_mean_data():
  rng = np.random.default_rng(0)
  return jnp.asarray(1e4 + rng.standard_normal((4096, 16)), jnp.float32)


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


# ----------------------------------------------------------------------------
# Diagnostics: a linen model with an NNX twin


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = rnn.Dropout(0.4)(x, deterministic=not train)
    x = rnn.BatchNorm(momentum=0.9)(x, deterministic=not train)
    x = rnn.Uout(0.5)(nn.relu(x), deterministic=not train)
    x = nn.Dense(4)(x)
    return nn.BatchNorm(momentum=0.9, use_running_average=not train)(x)


# ----------------------------------------------------------------------------
# Multiplicative noise ops (stochastic, random)


Z = 5.0


N = 1 << 20  # samples per statistical check


# name -> (op, customary setting, multiplicative noise variance at that setting)
NOISE_OPS = {
  "dropout": (regjax.dropout, 0.3, 0.3 / 0.7),
  "gaussian_dropout": (regjax.gaussian_dropout, 0.3, 0.3 / 0.7),
  "uout": (regjax.uout, 0.4, 0.4**2 / 3),
}


IMPLS = ("hash", "jax")  # every contract and statistical test runs on both generators


def _noise(op, rate, key, n=N, dtype=jnp.float32, variant=lambda f: f):
  """Draws n multiplicative noise factors (the op applied to ones) as float64."""
  f = variant(lambda k: op(jnp.ones((n,), dtype), rate, key=k))
  return np.asarray(f(key), np.float64)


# ----------------------------------------------------------------------------
# Parity with flax 0.12: complex input, force_float32_reductions, promote_dtype
def _complex_input(shape=(16, 4), seed=8):
  rng = np.random.default_rng(seed)
  return jnp.asarray(
    rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + 3 - 2j, jnp.complex64
  )


# ----------------------------------------------------------------------------
# Every module and op, for the contract tests


X = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3) + 2.0  # NHWC, no zeros


# name -> (linen module, nnx module maker (rngs -> module))
MODULES = {
  "Dropout": (rl.Dropout(0.5), lambda r: rn.Dropout(0.5, rngs=r)),
  "GaussianDropout": (rl.GaussianDropout(0.3), lambda r: rn.GaussianDropout(0.3, rngs=r)),
  "Uout": (rl.Uout(0.2), lambda r: rn.Uout(0.2, rngs=r)),
  "AlphaDropout": (rl.AlphaDropout(0.3), lambda r: rn.AlphaDropout(0.3, rngs=r)),
  "GaussianNoise": (rl.GaussianNoise(0.1), lambda r: rn.GaussianNoise(0.1, rngs=r)),
  "ChannelDropout": (rl.ChannelDropout(0.5), lambda r: rn.ChannelDropout(0.5, rngs=r)),
  "DropPath": (rl.DropPath(0.5), lambda r: rn.DropPath(0.5, rngs=r)),
  # X as 2 branches of a batch of 4: the join has shape X.shape[1:].
  "JoinDropPath": (rl.JoinDropPath(0.5), lambda r: rn.JoinDropPath(0.5, rngs=r)),
  "DropBlock": (rl.DropBlock(0.3, block_size=2), lambda r: rn.DropBlock(0.3, block_size=2, rngs=r)),
  "Cutout": (rl.Cutout(2), lambda r: rn.Cutout(2, rngs=r)),
  "RandomErasing": (
    rl.RandomErasing(1.0, fill="random"),
    lambda r: rn.RandomErasing(1.0, fill="random", rngs=r),
  ),
  "DropConnect": (
    rl.DropConnect(3),
    lambda r: rn.DropConnect(
      3, 3, rngs=nnx.Rngs(params=0, **({"dropout": r["dropout"]} if r is not None else {}))
    ),
  ),
}


NAMES = tuple(MODULES)


TRACED_MSG = r"`deterministic` must be a Python bool \(concrete\), not a traced.*trace time"


# ----------------------------------------------------------------------------
# The rest of the family (affine_noise, structured, weights, contracts)


def _normal(seed, shape):
  # NumPy draws: a jax.random draw per new shape would cost an eager compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform(seed, shape, low, high):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


# A fixed kernel and bias for DropConnect, so every call has the same shapes.
_DC_KERNEL = _normal(100, (32, 24)) / math.sqrt(32)


_DC_BIAS = _normal(101, (24,))


def _dropconnect(x, rate, **kw):
  kernel, bias = _DC_KERNEL.astype(x.dtype), _DC_BIAS.astype(x.dtype)
  return regjax.dropconnect_dense(x, kernel, bias, rate, **kw)


IMPL_CASES = tuple((impl, impl) for impl in IMPLS)


# ----------------------------------------------------------------------------
# NNX module inputs


def _x(shape=(8, 30), seed=2):
  return jax.random.normal(jax.random.key(seed), shape)

"""Train-mode batch normalization: statistics, device merge and an explicit JVP.

The arrays arrive checked and cast (see :func:`regjax.batch_norm`); every
per-feature array has the reduced axes kept as size 1. The static choices
(reduced axes, named axis, epsilon, reducer) live in a frozen, hashable
:class:`Config`, passed as a non-differentiable argument of a module-level
``custom_jvp`` wrapped in a module-level ``jax.checkpoint``, so nothing is
built anew on each call of ``batch_norm``.

Real input: one pass, the two sums ``sum d`` and ``sum d*d`` of
``d = x - shift`` (a per-feature sample, so ``d`` is of the size of the
spread and ``var = sum(d*d)/n - (sum(d)/n)**2`` stays accurate when
``|mean| >> std``), added across devices count-weighted. With
``xhat = (x - mean) * inv``, ``inv = rsqrt(var + eps)`` and ``c = scale * inv``
the JVP is::

    dmean = S(dx) / n,  b = S(xhat * dx) / n   # S: sum over selected positions (and devices)
    dy    = c * dx + B(dbias - c * dmean) + xhat * B(dscale - c * b)   # B: broadcast
    dvar  = 2 * b / inv

It is linear in the tangents, so reverse mode is its transpose: two batch
sums of the cotangent, ``sum g`` and ``sum g * xhat`` (the per-feature factors
are applied after summing), and one elementwise pass -- the classic BatchNorm
backward -- instead of autodiff through every step of the statistics. The
rule is plain jnp code, so it is itself differentiable (higher orders, both
modes). ``shift``, ``mask`` and ``count`` carry no derivative.

Batch sums, two ways:

* ``use_dot`` (XLA:CPU only, for batch axes leading, not explicitly sharded,
  and no more batch positions than features: a short, wide input): sums and
  broadcasts are dots with a ones vector, which XLA:CPU runs several times
  faster than column reductions there, so the transposed sums are dots too;
  the only full-size temporaries are ``d`` and ``g * xhat``.
* otherwise plain ``jnp.sum``, into which XLA fuses the elementwise producers.
  Every full-size operand is written so that it has a single consumer
  (``x - shift`` and ``x + (-shift)`` for the two statistics; ``x - mean`` and
  ``x + (-mean)`` for the two uses of ``xhat`` in reverse mode): a value
  shared by two reductions would be materialised, one per reduction is fused
  into it, so forward+backward reads ``x`` and the cotangent eight times in
  all and writes only ``y`` and ``dx``.

Timings behind these choices: see benchmarks/README.md (the batchnorm row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# The only values reverse mode keeps: the per-feature statistics (the
# normalized input is recomputed from x instead of stored).
_STAT_NAME = "regjax_batch_norm_statistic"
_SAVE_STATS = jax.checkpoint_policies.save_only_these_names(_STAT_NAME)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static configuration of one train-mode normalization (hashable)."""

  reduction_axes: tuple[int, ...]
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  epsilon: float
  use_dot: bool = False


def make_config(reduction_axes, axis_name, axis_index_groups, epsilon: float) -> Config:
  """A :class:`Config` with the plain reducer; lists made tuples (as ``lax.psum`` does)."""
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  groups = axis_index_groups
  # Malformed groups are kept as given, for lax.psum to report as it always has.
  with contextlib.suppress(TypeError):
    groups = None if groups is None else tuple(map(tuple, groups))
  return Config(tuple(reduction_axes), axis_name, groups, float(epsilon))


def batch_axes_explicitly_sharded(x, reduction_axes) -> bool:
  """Whether any reduced axis of ``x`` is sharded in its type (explicit sharding).

  Slicing such an axis under ``jit`` is an error, so the shift is then picked by
  a one-hot sum instead of a slice. When in doubt, answer True (always correct).
  """
  try:
    spec = tuple(jax.typeof(x).sharding.spec)
  except Exception:  # pragma: no cover - no sharding information: be safe
    return True
  return any(a < len(spec) and spec[a] is not None for a in reduction_axes)


def shift(x, reduction_axes, mask):
  """One *selected* sample per feature (0 where a feature has none), no gradient.

  Sums of ``x - shift`` are of numbers of the size of the spread, not of the
  mean. Without a mask the shift is the first sample; with one, it is the
  first position the mask selects, per feature (masked-out positions may be
  padding of any size, or NaN, and are never used). Under ``axis_name`` each
  device picks its own; :func:`_merge` combines sums about different shifts
  exactly.
  """
  if mask is None and not batch_axes_explicitly_sharded(x, reduction_axes):
    first = tuple(slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.ndim))
    return lax.stop_gradient(x[first])
  # A one-hot sum picks the sample: it needs no slicing of a batch axis that is
  # sharded in its type (an error under jit), and with a mask it finds, per
  # feature, the selected position of smallest row-major index over the batch axes.
  index = jnp.zeros((1,) * x.ndim, jnp.int32)
  for a in reduction_axes:
    index = index * x.shape[a] + lax.broadcasted_iota(
      jnp.int32, tuple(x.shape[a] if d == a else 1 for d in range(x.ndim)), a
    )
  if mask is None:
    is_first = index == 0
  else:
    index = jnp.where(mask, index, jnp.iinfo(jnp.int32).max)
    is_first = mask & (index == jnp.min(index, reduction_axes, keepdims=True))
  return lax.stop_gradient(jnp.sum(jnp.where(is_first, x, 0), reduction_axes, keepdims=True))


def count(x, reduction_axes, mask, axis_name, axis_index_groups):
  """Number of selected values per feature (reduced axes kept), summed across devices."""
  keep_shape = tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))
  real_dtype = jnp.finfo(x.dtype).dtype  # float32 for complex64
  if mask is None:
    n = jnp.full(keep_shape, math.prod(x.shape[a] for a in reduction_axes), real_dtype)
  else:
    n = jnp.sum(mask, reduction_axes, keepdims=True, dtype=real_dtype)
  if axis_name is not None:
    n = lax.psum(n, axis_name, axis_index_groups=axis_index_groups)
  return n


def _dot_eligible(x, reduction_axes, feature_size: int) -> bool:
  """Shapes where the ones-vector dots pay on XLA:CPU (see the module docstring).

  Not for a batch axis sharded in its type, where contracting it needs an
  explicit output sharding, nor for an empty batch (nothing to sum by a dot).
  """
  batch_size = math.prod(x.shape[a] for a in reduction_axes)
  return (
    reduction_axes == tuple(range(len(reduction_axes)))
    and 0 < batch_size <= feature_size
    and not batch_axes_explicitly_sharded(x, reduction_axes)
  )


def normalize(cfg: Config, x, shift_, scale, bias, mask, n, feature_size: int):
  """``(y, mean, var)`` of real ``x``, with the reducer chosen per backend and shape.

  The dot reducer was measured only on XLA:CPU, so only CPU gets it; other
  backends get the plain reduction, which their compilers fuse. The backend
  is ``jax.default_backend()`` at trace time, where a jitted function runs
  unless placed on another backend explicitly (then it only gets the other,
  numerically equivalent, reducer). ``lax.platform_dependent`` would pick per
  lowering platform, but it puts the normalization inside a ``cond``, and
  differentiating that changed CPU results by an ulp (grad under
  ``shard_map``), so CPU would no longer run exactly the program it did.
  """
  args = (x, shift_, scale, bias, mask, n)
  use_dot = jax.default_backend() == "cpu" and _dot_eligible(x, cfg.reduction_axes, feature_size)
  return _normalize_remat(dataclasses.replace(cfg, use_dot=use_dot) if use_dot else cfg, *args)


def moments(cfg: Config, x, shift_, mask, n, feature_size: int):
  """Batch mean and biased variance (reduced axes kept) exactly as :func:`normalize`
  computes them: the same reducer, shift and count-weighted merge across devices."""
  if jax.default_backend() == "cpu" and _dot_eligible(x, cfg.reduction_axes, feature_size):
    cfg = dataclasses.replace(cfg, use_dot=True)
  s1, s2 = _local_sums(cfg, x, shift_, mask)
  return _merge(cfg, s1, s2, x, shift_, mask, n)


def _rsum(cfg: Config, v):
  """Sum over the reduced axes, kept as size 1."""
  if cfg.use_dot:
    k = len(cfg.reduction_axes)
    n = math.prod(v.shape[:k])
    out = lax.dot_general(
      jnp.ones((1, n), v.dtype),
      v.reshape(n, -1),
      (((1,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=v.dtype,
    )
    return out.reshape((1,) * k + v.shape[k:])
  return jnp.sum(v, cfg.reduction_axes, keepdims=True)


def _bcast(cfg: Config, v, shape):
  """Per-feature ``v`` broadcast over the reduced axes (a dot where :func:`_rsum` is one,
  so the transpose, a sum of the cotangent, is a dot too)."""
  if cfg.use_dot:
    n = math.prod(shape[: len(cfg.reduction_axes)])
    out = lax.dot_general(
      jnp.ones((n, 1), v.dtype),
      v.reshape(1, -1),
      (((1,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=v.dtype,
    )
    return out.reshape(shape)
  return jnp.broadcast_to(v, shape)


def _select(v, mask):
  return v if mask is None else jnp.where(mask, v, 0)


def _total(cfg: Config, v, mask):
  """Sum over the selected positions of the reduced axes and across devices."""
  v = _rsum(cfg, _select(v, mask))
  if cfg.axis_name is not None:
    v = lax.psum(v, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
  return v


def _local_sums(cfg: Config, x, shift_, mask):
  """``sum d`` and ``sum d*d`` on this device, ``d = x - shift`` at selected positions."""
  d = _select(x - shift_, mask)
  if cfg.use_dot:  # a batched dot of d with itself: d is the only full-size temporary
    k = len(cfg.reduction_axes)
    s2 = jnp.einsum(
      d,
      tuple(range(x.ndim)),
      d,
      tuple(range(x.ndim)),
      tuple(range(k, x.ndim)),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=x.dtype,
    )
    s2 = s2.reshape((1,) * k + x.shape[k:])
  else:  # one expression per reduction (see the module docstring)
    neg_d = _select(x + (-shift_), mask)
    s2 = _rsum(cfg, neg_d * neg_d)
  return _rsum(cfg, d), s2


def _merge(cfg: Config, s1, s2, x, shift_, mask, n):
  """Mean and biased variance from the local sums, combined across devices."""
  n = jnp.maximum(n, 1)
  if cfg.axis_name is None:
    dm = s1 / n
    return shift_ + dm, jnp.maximum(s2 / n - dm * dm, 0)
  # Sums of deviations from *different* per-device shifts: add shift-independent
  # quantities, sum x = s1 + c*shift and sum (x - m)**2 = s2 + 2*s1*(shift - m)
  # + c*(shift - m)**2 with c the local count and m the global mean.
  psum = functools.partial(
    lax.psum, axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups
  )
  local_count = count(x, cfg.reduction_axes, mask, None, None)
  mean = psum(s1 + local_count * shift_) / n
  delta = shift_ - mean
  var = psum(s2 + 2 * s1 * delta + local_count * delta * delta) / n
  return mean, jnp.maximum(var, 0)


def _forward(cfg: Config, x, shift_, scale, bias, mask, n):
  """``(y, mean, var, xhat, inv)``."""
  s1, s2 = _local_sums(cfg, x, shift_, mask)
  mean, var = _merge(cfg, s1, s2, x, shift_, mask, n)
  inv = lax.rsqrt(var + cfg.epsilon)
  mean, var, inv = (checkpoint_name(v, _STAT_NAME) for v in (mean, var, inv))
  xhat = (x - mean) * inv
  y = xhat if scale is None else xhat * scale
  if bias is not None:
    y = y + bias
  return y, mean, var, xhat, inv


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(cfg: Config, x, shift_, scale, bias, mask, n):
  return _forward(cfg, x, shift_, scale, bias, mask, n)[:3]


def _is_zero(t) -> bool:
  return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)


def _dx_terms(cfg: Config, x, xhat, mean, inv, c, dx, mask, n):
  """``(dmean, dvar, c*dx, offset, slope)``: the parts of the JVP that come from ``dx``."""
  n = jnp.maximum(n, 1)
  dmean = _total(cfg, dx, mask) / n
  if cfg.use_dot:
    b = _total(cfg, xhat * dx, mask) / n
  else:  # `x + (-mean)` here, `x - mean` in the slope term: one consumer each
    b = _total(cfg, (x + (-mean)) * dx, mask) * inv / n
  return dmean, 2 * b / inv, c * dx, -c * dmean, -c * b


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(cfg: Config, primals, tangents):
  x, _, scale, bias, mask, n = primals
  dx, _, dscale, dbias, _, _ = tangents
  y, mean, var, xhat, inv = _forward(cfg, *primals)
  if mask is not None:
    # Masked-out positions may hold NaN/inf (padding). They never enter the
    # statistics, and the tangent of a non-finite output is taken as 0 there,
    # so a zero cotangent from them cannot turn into 0 * inf = NaN in reverse mode.
    x = jnp.where(mask | jnp.isfinite(x), x, mean)
    xhat = (x - mean) * inv
  # dy = c*dx + bcast(dbias - c*dmean) + xhat * bcast(dscale - c*b), c = scale*inv:
  # per-feature terms are combined *before* broadcasting, so the transpose
  # (reverse mode) needs just two batch sums, sum(g) and sum(g * xhat).
  c = inv if scale is None else inv * scale
  dmean, dvar = jnp.zeros_like(mean), jnp.zeros_like(var)
  direct = offset = slope = None  # c * dx; per feature, broadcast; per feature, times xhat
  if not _is_zero(dx):
    dmean, dvar, direct, offset, slope = _dx_terms(cfg, x, xhat, mean, inv, c, dx, mask, n)
  if scale is not None and not _is_zero(dscale):
    dscale = jnp.reshape(dscale, mean.shape)
    slope = dscale if slope is None else slope + dscale
  if bias is not None and not _is_zero(dbias):
    dbias = jnp.reshape(dbias, mean.shape)
    offset = dbias if offset is None else offset + dbias
  dy = jnp.zeros_like(y) if direct is None else direct
  if offset is not None:
    dy = dy + _bcast(cfg, offset, y.shape)
  if slope is not None:
    # = xhat * slope; the plain reducer recomputes xhat (one consumer per use of x)
    dy = dy + (xhat * _bcast(cfg, slope, y.shape) if cfg.use_dot else (x - mean) * (slope * inv))
  return (y, mean, var), (dy, dmean, dvar)


# Reverse mode keeps only the per-feature statistics and recomputes the
# normalized input from x, instead of storing full-size intermediates.
_normalize_remat = jax.checkpoint(_normalize, policy=_SAVE_STATS, static_argnums=(0,))


def complex_normalize(cfg: Config, x, scale, bias, mask, n):
  """Complex input, as flax defines it: complex mean, real variance ``mean(|x - mu|**2)``.

  Two plain passes differentiated by JAX (the custom JVP is for real input).
  """

  def total(v):
    v = jnp.sum(_select(v, mask), cfg.reduction_axes, keepdims=True)
    if cfg.axis_name is None:
      return v
    return lax.psum(v, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)

  n = jnp.maximum(n, 1)
  mean = total(x) / n
  centered = x - mean
  var = total(lax.real(centered) ** 2 + lax.imag(centered) ** 2) / n
  y = centered * lax.rsqrt(var + cfg.epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, mean, var

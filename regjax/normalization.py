"""Batch normalization as a pure function with explicit running statistics.

``batch_stats`` is the dict ``{'mean': ..., 'var': ...}`` that
``flax.linen.BatchNorm`` keeps in its ``batch_stats`` collection, so the
function, :class:`regjax.linen.BatchNorm` and flax checkpoints share one
format.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from regjax import _checks

__all__ = ["batch_norm", "init_batch_stats", "BatchStats"]

BatchStats = dict[str, jax.Array]

_STAT_NAME = "regjax_batch_norm_statistic"


def init_batch_stats(num_features: int | tuple[int, ...], dtype=jnp.float32) -> BatchStats:
  """Running statistics before any update: mean 0 and variance 1 per feature."""
  is_int = lambda d: isinstance(d, (int, np.integer)) and not isinstance(d, bool)
  if is_int(num_features):
    shape = (num_features,)
  else:
    shape = tuple(num_features) if isinstance(num_features, (tuple, list)) else (None,)
  if not all(is_int(d) and d > 0 for d in shape):
    raise ValueError(
        f"init_batch_stats: `num_features` must be a positive int or a tuple of "
        f"positive ints; got {num_features!r}.")
  shape = tuple(int(d) for d in shape)
  return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}


def check_inexact(x, op: str, name: str = "x") -> None:
  """Floating point, or complex (as flax allows: mean complex, variance real)."""
  if not jnp.iscomplexobj(x):
    _checks.check_floating(x, op, name)


def _check_feature_array(value, name: str, shape: tuple[int, ...], op: str) -> None:
  if value is None:
    return
  check_inexact(value, op, name)
  if tuple(value.shape) != shape:
    raise ValueError(
        f"{op}: `{name}` must have the feature shape {shape} (the sizes of the "
        f"`axis` dimensions); got shape {tuple(value.shape)}.")


def _check_batch_stats(batch_stats, shape: tuple[int, ...], op: str) -> None:
  if not isinstance(batch_stats, Mapping) or not {"mean", "var"} <= set(batch_stats):
    raise ValueError(
        f"{op}: `batch_stats` must be a dict with entries 'mean' and 'var' "
        f"(see regjax.init_batch_stats); got {type(batch_stats).__name__}"
        + (f" with keys {sorted(batch_stats)}" if isinstance(batch_stats, Mapping) else "")
        + ".")
  for name in ("mean", "var"):
    if batch_stats[name] is None:
      raise ValueError(
          f"{op}: `batch_stats['{name}']` is None; it must be an array of the feature "
          f"shape {shape} (regjax.init_batch_stats({shape}) makes both).")
    _check_feature_array(batch_stats[name], f"batch_stats['{name}']", shape, op)


def _batch_axes_explicitly_sharded(x, reduction_axes) -> bool:
  """Whether any reduced axis of ``x`` is sharded in its type (explicit sharding).

  Slicing such an axis under ``jit`` is an error, so the shift is then picked by
  a one-hot sum instead of a slice. When in doubt, answer True (always correct).
  """
  try:
    spec = tuple(jax.typeof(x).sharding.spec)
  except Exception:  # pragma: no cover - no sharding information: be safe
    return True
  return any(a < len(spec) and spec[a] is not None for a in reduction_axes)


def _shift(x, reduction_axes, mask):
  """One *selected* sample per feature (0 where a feature has none), no gradient.

  Sums of ``x - shift`` are of numbers of the size of the spread, not of the
  mean, so the one-pass variance of the deviations stays accurate when
  ``|mean| >> std``. Without a mask the shift is the first sample; with one, it
  is the first position the mask selects, per feature (masked-out positions
  may be padding of any size, or NaN, and are never used). Under ``axis_name``
  each device picks its own; ``finish`` combines sums taken about different
  shifts exactly.
  """
  if mask is None and not _batch_axes_explicitly_sharded(x, reduction_axes):
    first = tuple(slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.ndim))
    return lax.stop_gradient(x[first])
  # A one-hot sum picks the sample: it needs no slicing of a batch axis that is
  # sharded in its type (an error under jit), and with a mask it finds, per
  # feature, the selected position of smallest row-major index over the batch axes.
  index = jnp.zeros((1,) * x.ndim, jnp.int32)
  for a in reduction_axes:
    index = index * x.shape[a] + lax.broadcasted_iota(
        jnp.int32, tuple(x.shape[a] if d == a else 1 for d in range(x.ndim)), a)
  if mask is None:
    is_first = index == 0
  else:
    index = jnp.where(mask, index, jnp.iinfo(jnp.int32).max)
    is_first = mask & (index == jnp.min(index, reduction_axes, keepdims=True))
  return lax.stop_gradient(jnp.sum(jnp.where(is_first, x, 0), reduction_axes, keepdims=True))


def _count(x, reduction_axes, mask, axis_name, axis_index_groups):
  """Number of selected values per feature (reduced axes kept), summed across devices."""
  keep_shape = tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))
  real_dtype = jnp.finfo(x.dtype).dtype  # float32 for complex64
  if mask is None:
    count = jnp.full(keep_shape, math.prod(x.shape[a] for a in reduction_axes), real_dtype)
  else:
    count = jnp.sum(mask, reduction_axes, keepdims=True, dtype=real_dtype)
  if axis_name is not None:
    count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
  return count


def _make_train_normalize(reduction_axes, axis_name, axis_index_groups, epsilon, use_dot):
  """``(x, shift, scale, bias, mask, count) -> (y, mean, var)`` with an explicit JVP.

  Statistics: one pass, the two sums ``sum d`` and ``sum d*d`` of
  ``d = x - shift`` (a per-feature sample, so ``d`` is of the size of the
  spread and ``var = sum(d*d)/n - (sum(d)/n)**2`` stays accurate when
  ``|mean| >> std``), added across devices count-weighted. With
  ``xhat = (x - mean) * inv``, ``inv = rsqrt(var + eps)`` and ``c = scale * inv``
  the JVP is::

      dmean = S(dx) / n,  b = S(xhat * dx) / n   # S: sum over selected positions (and devices)
      dy    = c * dx + B(dbias - c * dmean) + xhat * B(dscale - c * b)   # B: broadcast
      dvar  = 2 * b / inv

  It is linear in the tangents, so reverse mode is its transpose: two batch
  sums of the cotangent, ``sum g`` and ``sum g * xhat`` (the per-feature
  factors are applied after summing), and one elementwise pass -- the classic
  BatchNorm backward -- instead of autodiff through every step of the
  statistics. The rule is plain jnp code, so it is itself differentiable
  (higher orders, both modes). ``shift``, ``mask`` and ``count`` carry no
  derivative (the outputs do not depend on ``shift``; ``mask``/``count`` are
  not differentiable).

  Batch sums, two ways, chosen by shape (measured on a 2-core CPU, jax 0.10,
  against flax's fast-variance BatchNorm, forward+backward):

  * ``use_dot`` (batch axes leading, not explicitly sharded, and no more batch
    positions than features: a short, wide input): sums and broadcasts are
    dots with a ones vector, which XLA:CPU runs several times faster than
    column reductions there, so the transposed sums are dots too; the only
    full-size temporaries are ``d`` and ``g * xhat``. (256, 16384): 0.62x.
  * otherwise plain ``jnp.sum``, into which XLA fuses the elementwise
    producers. Every full-size operand is written so that it has a single
    consumer (``x - shift`` and ``x + (-shift)`` for the two statistics;
    ``x - mean`` and ``x + (-mean)`` for the two uses of ``xhat`` in reverse
    mode): a value shared by two reductions would be materialised, one per
    reduction is fused into it, so forward+backward reads ``x`` and the
    cotangent eight times in all and writes only ``y`` and ``dx``.
    (8, 56, 56, 256): 0.71x; the dots gave 1.25x there.
  """

  def rsum(v):
    if use_dot:
      n = math.prod(v.shape[:len(reduction_axes)])
      flat = v.reshape(n, -1)
      out = lax.dot_general(jnp.ones((1, n), v.dtype), flat, (((1,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST, preferred_element_type=v.dtype)
      return out.reshape((1,) * len(reduction_axes) + v.shape[len(reduction_axes):])
    return jnp.sum(v, reduction_axes, keepdims=True)

  def bcast(v, shape):
    """Broadcast per-feature ``v`` over the reduced axes (as a dot where ``rsum`` is one,
    so the transpose, a sum of the cotangent, is also a dot)."""
    if use_dot:
      n = math.prod(shape[:len(reduction_axes)])
      out = lax.dot_general(jnp.ones((n, 1), v.dtype), v.reshape(1, -1), (((1,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST, preferred_element_type=v.dtype)
      return out.reshape(shape)
    return jnp.broadcast_to(v, shape)

  def mean_shape(x):
    return tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))

  def total(v, mask):
    v = rsum(select(v, mask))
    if axis_name is not None:
      v = lax.psum(v, axis_name, axis_index_groups=axis_index_groups)
    return v

  def select(v, mask):
    return v if mask is None else jnp.where(mask, v, 0)

  def stats(x, shift, mask, count):
    d = select(x - shift, mask)
    if use_dot:  # a batched dot of d with itself: d is the only full-size temporary
      s2 = jnp.einsum(d, tuple(range(x.ndim)), d, tuple(range(x.ndim)),
                      tuple(range(len(reduction_axes), x.ndim)),
                      precision=lax.Precision.HIGHEST, preferred_element_type=x.dtype)
      s2 = s2.reshape(mean_shape(x))
    else:  # one expression per reduction (see the docstring)
      neg_d = select(x + (-shift), mask)
      s2 = rsum(neg_d * neg_d)
    return finish(rsum(d), s2, x, shift, mask, count)

  def finish(s1, s2, x, shift, mask, count):
    n = jnp.maximum(count, 1)
    if axis_name is not None:
      # Sums of deviations from *different* per-device shifts: add
      # shift-independent quantities, sum x = s1 + c*shift and
      # sum (x - m)**2 = s2 + 2*s1*(shift - m) + c*(shift - m)**2 with m the global mean.
      local_count = _count(x, reduction_axes, mask, None, None)
      sx = lax.psum(s1 + local_count * shift, axis_name, axis_index_groups=axis_index_groups)
      mean = sx / n
      delta = shift - mean
      sq = s2 + 2 * s1 * delta + local_count * delta * delta
      var = lax.psum(sq, axis_name, axis_index_groups=axis_index_groups) / n
    else:
      dm = s1 / n
      mean = shift + dm
      var = s2 / n - dm * dm
    return mean, jnp.maximum(var, 0)

  def forward(x, shift, scale, bias, mask, count):
    mean, var = stats(x, shift, mask, count)
    inv = lax.rsqrt(var + epsilon)
    # The only values reverse mode keeps (see the jax.checkpoint in batch_norm).
    mean, var, inv = (checkpoint_name(v, _STAT_NAME) for v in (mean, var, inv))
    xhat = (x - mean) * inv
    y = xhat if scale is None else xhat * scale
    if bias is not None:
      y = y + bias
    return y, mean, var, xhat, inv

  @jax.custom_jvp
  def normalize(x, shift, scale, bias, mask, count):
    return forward(x, shift, scale, bias, mask, count)[:3]

  def is_zero(t):
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)

  @functools.partial(normalize.defjvp, symbolic_zeros=True)
  def normalize_jvp(primals, tangents):
    x, shift, scale, bias, mask, count = primals
    dx, _, dscale, dbias, _, _ = tangents
    y, mean, var, xhat, inv = forward(*primals)
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
    dmean = jnp.zeros_like(mean)
    dvar = jnp.zeros_like(var)
    direct = None       # c * dx
    offset = None       # per feature, broadcast over the batch
    slope = None        # per feature, times xhat
    if not is_zero(dx):
      n = jnp.maximum(count, 1)
      dmean = total(dx, mask) / n
      if use_dot:
        b = total(xhat * dx, mask) / n
      else:  # `x + (-mean)` here, `x - mean` in the slope term: one consumer each
        b = total((x + (-mean)) * dx, mask) * inv / n
      dvar = 2 * b / inv
      direct = c * dx
      offset = -c * dmean
      slope = -c * b
    if scale is not None and not is_zero(dscale):
      dscale = jnp.reshape(dscale, mean.shape)
      slope = dscale if slope is None else slope + dscale
    if bias is not None and not is_zero(dbias):
      dbias = jnp.reshape(dbias, mean.shape)
      offset = dbias if offset is None else offset + dbias
    dy = jnp.zeros_like(y) if direct is None else direct
    if offset is not None:
      dy = dy + bcast(offset, y.shape)
    if slope is not None:
      if use_dot:
        dy = dy + xhat * bcast(slope, y.shape)
      else:
        dy = dy + (x - mean) * (slope * inv)  # = xhat * slope
    return (y, mean, var), (dy, dmean, dvar)

  return normalize


def batch_norm(
    x: jax.Array,
    batch_stats: Mapping[str, jax.Array],
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    deterministic: bool = False,
    momentum: float | jax.Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    axis_name: str | tuple[str, ...] | None = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
    mask: jax.Array | None = None,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> tuple[jax.Array, BatchStats]:
  """Batch normalization (Ioffe & Szegedy 2015) returning updated statistics.

  Train mode (``deterministic=False``), per feature, over every axis but
  ``axis``::

      mu, var = mean(x), mean((x - mu)**2)            # biased variance
      y = scale * (x - mu) / sqrt(var + epsilon) + bias
      new_mean = momentum * mean_old + (1 - momentum) * mu
      new_var  = momentum * var_old  + (1 - momentum) * var   # var * n/(n-1) if unbiased_running_var

  Eval mode normalizes with ``batch_stats`` and returns them unchanged.

  Statistics are accumulated in at least float32 (so bf16/fp16 inputs are
  safe) from one pass of sums of ``x - shift``, with ``shift`` one sample per
  feature, which stays accurate when ``|mean| >> std``, where flax's default
  one-pass ``E[x**2] - E[x]**2`` does not.

  Args:
    x: floating-point input.
    batch_stats: ``{'mean': ..., 'var': ...}``, each of the feature shape
      (``init_batch_stats`` makes them). Updated values keep their dtype.
    scale, bias: optional per-feature affine parameters of the feature shape.
    deterministic: eval mode if True.
    momentum: decay of the running averages, in ``[0, 1]`` (flax convention;
      PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here). May be traced: a
      traced value is clipped to ``[0, 1]``, and a NaN or infinite one keeps
      the running statistics unchanged.
    epsilon: added to the variance, a finite Python or NumPy number ``> 0``.
    axis: feature axis or axes (statistics are per feature).
    axis_name: named axis (``shard_map``/``pmap``) over which the statistics
      are combined, count-weighted. Not needed under plain ``jit`` with a
      sharded batch: XLA inserts the reduction itself.
    axis_index_groups: device groups within ``axis_name`` (see ``lax.psum``).
    unbiased_running_var: store the unbiased batch variance ``var * n/(n-1)``
      in the running variance, as PyTorch does. Normalization still uses the
      biased variance.
    mask: optional boolean array broadcastable to ``x``: only True positions
      enter the statistics, shifted by a selected sample (accuracy does not
      depend on which positions are masked). Masked-out positions may hold
      NaN or inf: they change neither the statistics nor the gradients of a
      loss that ignores them. A feature with no True position in a step (or
      an empty batch) keeps its running statistics unchanged.
    dtype: output dtype (floating or complex); default ``x.dtype``.
    force_float32_reductions: accumulate statistics in at least float32 (the
      default, as flax); False computes them in ``x.dtype``.

  Returns:
    ``(y, new_batch_stats)``.
  """
  op = "regjax.batch_norm"
  check_inexact(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  feature_axes = _checks.canonical_axes(axis, x.ndim, op)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _check_batch_stats(batch_stats, feature_shape, op)
  _check_feature_array(scale, "scale", feature_shape, op)
  _check_feature_array(bias, "bias", feature_shape, op)
  momentum = _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
  epsilon = check_epsilon(epsilon, op)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"{op}: `dtype` must be a floating-point (or complex) dtype or None; "
                    f"got {dtype!r}.")
  if mask is not None:
    _check_mask(mask, x.shape, op)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = (jnp.promote_types(x.dtype, jnp.float32) if force_float32_reductions
                 else x.dtype)

  # Shapes with the reduced axes kept as size 1, so per-feature arrays broadcast.
  keep_shape = tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))
  as_keep = lambda v: jnp.reshape(v.astype(stats_dtype), keep_shape)
  xf = x.astype(stats_dtype)

  if deterministic:
    mean, var = as_keep(batch_stats["mean"]), as_keep(batch_stats["var"])
    multiplier = lax.rsqrt(var + epsilon)  # per-feature factors once, then one pass over x
    if scale is not None:
      multiplier = multiplier * as_keep(scale)
    y = (xf - mean) * multiplier
    if bias is not None:
      y = y + as_keep(bias)
    return y.astype(out_dtype), batch_stats

  batch_size = math.prod(x.shape[a] for a in reduction_axes)
  if not reduction_axes and axis_name is None:
    raise ValueError(
        f"{op}: train mode needs a batch axis besides the feature axes {feature_axes}; "
        f"got `x` of shape {x.shape}, so every statistic would come from one value. "
        "Add a batch axis (x[None]), pass `axis` naming only the feature axes, or "
        "normalize across devices with `axis_name`.")
  if unbiased_running_var and mask is None and 0 < batch_size < 2 and axis_name is None:
    raise ValueError(
        f"{op}: `unbiased_running_var=True` needs more than one value per feature "
        f"in train mode; got an input of shape {x.shape} with feature axes {feature_axes}.")
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape)
  count = _count(xf, reduction_axes, mask, axis_name, axis_index_groups)
  scale_k = None if scale is None else as_keep(scale)
  bias_k = None if bias is None else as_keep(bias)
  if jnp.iscomplexobj(xf):
    y, mean, var = _complex_normalize(xf, scale_k, bias_k, mask, count, reduction_axes,
                                      axis_name, axis_index_groups, epsilon)
  else:
    # An empty batch has no sample to shift by (and nothing to sum by a dot).
    shift = (jnp.zeros(keep_shape, stats_dtype) if batch_size == 0
             else _shift(xf, reduction_axes, mask))
    # Batch sums as products with a ones vector for short, wide inputs (see
    # _make_train_normalize); not for a batch axis sharded in its type, where
    # contracting it needs an explicit output sharding.
    use_dot = (reduction_axes == tuple(range(len(reduction_axes)))
               and 0 < batch_size <= math.prod(feature_shape)
               and not _batch_axes_explicitly_sharded(xf, reduction_axes))
    normalize = _make_train_normalize(reduction_axes, axis_name, axis_index_groups, epsilon,
                                      use_dot)
    # Reverse mode keeps only the per-feature statistics and recomputes the
    # normalized input from x, instead of storing full-size intermediates.
    normalize = jax.checkpoint(
        normalize, policy=jax.checkpoint_policies.save_only_these_names(_STAT_NAME))
    y, mean, var = normalize(xf, shift, scale_k, bias_k, mask, count)
  return y.astype(out_dtype), _updated_stats(
      batch_stats, mean, var, count, momentum, feature_shape, unbiased_running_var)


def check_epsilon(epsilon, op: str) -> float:
  is_number = isinstance(epsilon, (int, float, np.integer, np.floating)) and not isinstance(
      epsilon, (bool, np.bool_))
  if _checks.is_traced(epsilon) or not is_number or not (
      epsilon > 0 and math.isfinite(epsilon)):
    raise ValueError(f"{op}: `epsilon` must be a finite Python or NumPy number > 0; "
                     f"got {epsilon!r}.")
  return float(epsilon)


def _check_mask(mask, x_shape, op: str) -> None:
  if getattr(mask, "dtype", None) != jnp.bool_:
    raise TypeError(f"{op}: `mask` must be a boolean array; got {getattr(mask, 'dtype', mask)!r}.")
  try:  # `mask` must broadcast *to* x's shape, not merely with it
    broadcastable = jnp.broadcast_shapes(mask.shape, x_shape) == x_shape
  except ValueError:
    broadcastable = False
  if not broadcastable:
    raise ValueError(
        f"{op}: `mask` of shape {mask.shape} does not broadcast to `x` of shape {x_shape}.")


def _complex_normalize(x, scale, bias, mask, count, reduction_axes, axis_name,
                       axis_index_groups, epsilon):
  """Complex input, as flax defines it: complex mean, real variance ``mean(|x - mu|**2)``.

  Two plain passes differentiated by JAX (the custom JVP is for real input).
  """
  def total(v):
    v = jnp.sum(v if mask is None else jnp.where(mask, v, 0), reduction_axes, keepdims=True)
    return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=axis_index_groups)

  n = jnp.maximum(count, 1)
  mean = total(x) / n
  centered = x - mean
  var = total(lax.real(centered) ** 2 + lax.imag(centered) ** 2) / n
  y = centered * lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, mean, var


def _updated_stats(batch_stats, mean, var, count, momentum, feature_shape,
                   unbiased_running_var) -> BatchStats:
  """``momentum * old + (1 - momentum) * batch`` per feature, in the old statistics' dtype.

  A feature with no value this step (masked out, or an empty batch), or a
  non-finite traced ``momentum``, keeps its statistics: nothing corrupts them.
  """
  real_dtype = var.dtype
  momentum = jnp.asarray(momentum, real_dtype)
  momentum = jnp.where(jnp.isfinite(momentum), jnp.clip(momentum, 0.0, 1.0), 1.0)
  if unbiased_running_var:
    var = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)
  has_values = jnp.reshape(count > 0, feature_shape)

  def update(old, batch_value):
    # A complex mean makes the running mean complex, as in flax.
    new_dtype = jnp.promote_types(old.dtype, batch_value.dtype) if jnp.iscomplexobj(
        batch_value) else old.dtype
    old_f = old.astype(jnp.promote_types(old.dtype, batch_value.dtype))
    new = momentum * old_f + (1.0 - momentum) * jnp.reshape(batch_value, feature_shape)
    return jnp.where(has_values, new, old_f).astype(new_dtype)

  new_stats = dict(batch_stats)
  new_stats["mean"] = update(batch_stats["mean"], mean)
  new_stats["var"] = update(batch_stats["var"], var)
  return new_stats

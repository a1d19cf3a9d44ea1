"""Batch normalization as a pure function with explicit running statistics.

``batch_stats`` is the dict ``{'mean': ..., 'var': ...}`` that
``flax.linen.BatchNorm`` keeps in its ``batch_stats`` collection, so the
function, :class:`regjax.linen.BatchNorm` and flax checkpoints share one
format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from regjax import _checks

__all__ = ["batch_norm", "init_batch_stats", "BatchStats"]

BatchStats = dict[str, jax.Array]


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


def _check_feature_array(value, name: str, shape: tuple[int, ...], op: str) -> None:
  if value is None:
    return
  _checks.check_floating(value, op, name)
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
    _check_feature_array(batch_stats[name], f"batch_stats['{name}']", shape, op)


def _moments(x, reduction_axes, mask, axis_name, axis_index_groups):
  """Per-feature (mean, biased var, count), keeping the reduced axes.

  Two passes over the data. The first sums ``x - shift`` with ``shift`` one
  sample per feature, so the sum is of numbers of the size of the spread, not
  of the mean; the second sums squared deviations from the mean. Unlike the
  one-pass ``E[x**2] - E[x]**2`` this stays accurate when ``|mean| >> std``.
  Across devices the sums and counts are added (``psum``), which weighs each
  device by its count: unequal or masked batches give the full-batch result,
  not a mean of per-device means.
  """
  # The first sample is picked by a one-hot sum, not a slice: under jit, slicing
  # a batch axis with explicit sharding (jax.make_mesh's default) is an error.
  is_first = True
  for a in reduction_axes:
    is_first = is_first & (lax.broadcasted_iota(
        jnp.int32, tuple(x.shape[a] if d == a else 1 for d in range(x.ndim)), a) == 0)
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape)
    # A masked-out first sample may be padding of any size (or NaN): never shift by it.
    is_first = is_first & mask
  shift = lax.stop_gradient(
      jnp.sum(jnp.where(is_first, x, 0), reduction_axes, keepdims=True))
  deviation = x - shift
  if mask is None:
    local_count = jnp.asarray(
        math.prod(x.shape[a] for a in reduction_axes), x.dtype)
    local_count = jnp.broadcast_to(local_count, shift.shape)
    local_sum = jnp.sum(deviation, reduction_axes, keepdims=True)
  else:
    local_count = jnp.sum(mask, reduction_axes, keepdims=True, dtype=x.dtype)
    local_sum = jnp.sum(jnp.where(mask, deviation, 0), reduction_axes, keepdims=True)

  if axis_name is None:
    count = local_count
    mean = shift + local_sum / jnp.maximum(count, 1)
  else:
    totals = lax.psum(jnp.stack([local_sum + local_count * shift, local_count]),
                      axis_name, axis_index_groups=axis_index_groups)
    count = totals[1]
    mean = totals[0] / jnp.maximum(count, 1)

  squares = jnp.square(x - mean)
  if mask is not None:
    squares = jnp.where(mask, squares, 0)
  sum_squares = jnp.sum(squares, reduction_axes, keepdims=True)
  if axis_name is not None:
    sum_squares = lax.psum(sum_squares, axis_name, axis_index_groups=axis_index_groups)
  var = sum_squares / jnp.maximum(count, 1)
  return mean, var, count


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
  safe) with a two-pass, shifted formula that is accurate when
  ``|mean| >> std``, where flax's default one-pass variance is not.

  Args:
    x: floating-point input.
    batch_stats: ``{'mean': ..., 'var': ...}``, each of the feature shape
      (``init_batch_stats`` makes them). Updated values keep their dtype.
    scale, bias: optional per-feature affine parameters of the feature shape.
    deterministic: eval mode if True.
    momentum: decay of the running averages, in ``[0, 1]`` (flax convention;
      PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here). May be traced.
    epsilon: added to the variance, ``> 0``.
    axis: feature axis or axes (statistics are per feature).
    axis_name: named axis (``shard_map``/``pmap``) over which the statistics
      are combined, count-weighted. Not needed under plain ``jit`` with a
      sharded batch: XLA inserts the reduction itself.
    axis_index_groups: device groups within ``axis_name`` (see ``lax.psum``).
    unbiased_running_var: store the unbiased batch variance ``var * n/(n-1)``
      in the running variance, as PyTorch does. Normalization still uses the
      biased variance.
    mask: optional boolean array broadcastable to ``x``: only True positions
      enter the statistics. A feature with no True position in a step keeps
      its running statistics unchanged.
    dtype: output dtype; default ``x.dtype``.

  Returns:
    ``(y, new_batch_stats)``.
  """
  op = "regjax.batch_norm"
  _checks.check_floating(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  feature_axes = _checks.canonical_axes(axis, x.ndim, op)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _check_batch_stats(batch_stats, feature_shape, op)
  _check_feature_array(scale, "scale", feature_shape, op)
  _check_feature_array(bias, "bias", feature_shape, op)
  momentum = _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
  if _checks.is_traced(epsilon) or not isinstance(epsilon, (int, float)) or isinstance(
      epsilon, bool) or not (epsilon > 0 and math.isfinite(epsilon)):
    raise ValueError(f"{op}: `epsilon` must be a finite Python number > 0; got {epsilon!r}.")
  if mask is not None:
    if getattr(mask, "dtype", None) != jnp.bool_:
      raise TypeError(f"{op}: `mask` must be a boolean array; got {getattr(mask, 'dtype', mask)!r}.")
    try:  # `mask` must broadcast *to* x's shape, not merely with it
      broadcastable = jnp.broadcast_shapes(mask.shape, x.shape) == x.shape
    except ValueError:
      broadcastable = False
    if not broadcastable:
      raise ValueError(
          f"{op}: `mask` of shape {mask.shape} does not broadcast to `x` of shape {x.shape}.")
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.promote_types(x.dtype, jnp.float32)

  # Shapes with the reduced axes kept as size 1, so per-feature arrays broadcast.
  keep_shape = tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))
  as_keep = lambda v: jnp.reshape(v.astype(stats_dtype), keep_shape)
  xf = x.astype(stats_dtype)

  if deterministic:
    mean, var = as_keep(batch_stats["mean"]), as_keep(batch_stats["var"])
    new_stats = batch_stats
  else:
    if unbiased_running_var and mask is None and math.prod(
        x.shape[a] for a in reduction_axes) < 2 and axis_name is None:
      raise ValueError(
          f"{op}: `unbiased_running_var=True` needs more than one value per feature "
          f"in train mode; got an input of shape {x.shape} with feature axes {feature_axes}.")
    mean, var, count = _moments(xf, reduction_axes, mask, axis_name, axis_index_groups)
    running_var_sample = var
    if unbiased_running_var:
      running_var_sample = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)
    momentum = jnp.clip(jnp.asarray(momentum, stats_dtype), 0.0, 1.0)

    def update(old, batch_value):
      old_f = old.astype(stats_dtype)
      batch_value = jnp.reshape(batch_value, feature_shape)
      new = momentum * old_f + (1.0 - momentum) * batch_value
      if mask is not None:  # a fully masked feature has no statistics this step
        new = jnp.where(jnp.reshape(count > 0, feature_shape), new, old_f)
      return new.astype(old.dtype)

    new_stats = dict(batch_stats)
    new_stats["mean"] = update(batch_stats["mean"], mean)
    new_stats["var"] = update(batch_stats["var"], running_var_sample)

  multiplier = lax.rsqrt(var + epsilon)
  if scale is not None:
    multiplier = multiplier * as_keep(scale)
  y = (xf - mean) * multiplier
  if bias is not None:
    y = y + as_keep(bias)
  return y.astype(out_dtype), new_stats

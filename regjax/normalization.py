"""Batch normalization as a pure function with explicit running statistics.

``batch_stats`` is the dict ``{'mean': ..., 'var': ...}`` that
``flax.linen.BatchNorm`` keeps in its ``batch_stats`` collection, so the
function, :class:`regjax.linen.BatchNorm` and flax checkpoints share one
format.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from regjax import _bn_kernel, _checks

__all__ = ["batch_norm", "init_batch_stats", "BatchStats"]


class BatchStats(TypedDict):
  """Running statistics, a plain dict at runtime (flax's ``batch_stats`` layout)."""

  mean: jax.Array
  var: jax.Array


def init_batch_stats(
  num_features: int | tuple[int, ...], dtype: DTypeLike = jnp.float32
) -> BatchStats:
  """Running statistics before any update: mean 0 and variance 1 per feature."""

  def is_int(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool)

  dims: tuple[Any, ...]
  if is_int(num_features):
    dims = (num_features,)
  else:
    dims = tuple(num_features) if isinstance(num_features, (tuple, list)) else (None,)
  if not all(is_int(d) and d > 0 for d in dims):
    raise ValueError(
      f"init_batch_stats: `num_features` must be a positive int or a tuple of "
      f"positive ints; got {num_features!r}."
    )
  shape = tuple(int(d) for d in dims)
  return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}


def running_stats_dtype(
  param_dtype: Any = jnp.float32, force_float32_reductions: bool = True
) -> Any:
  """The modules' running-statistics dtype (flax's rule): float32, or ``param_dtype``
  when float32 reductions are turned off."""
  return jnp.float32 if force_float32_reductions else param_dtype


def output_dtype(x, scale=None, bias=None, dtype: Any = None) -> Any:
  """The modules' output dtype (flax's ``canonicalize_dtype``): ``dtype`` if given, else
  the result type of ``x`` and the params (the float32 statistics do not promote it),
  at least float32 if that is not inexact."""
  if dtype is None:
    dtype = jnp.result_type(*(jnp.asarray(a) for a in (x, scale, bias) if a is not None))
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"Dtype must be inexact: {dtype}")
  return dtype


def check_inexact(x, op: str, name: str = "x") -> None:
  """Floating point, or complex (as flax allows: mean complex, variance real)."""
  if not jnp.iscomplexobj(x):
    _checks.check_floating(x, op, name)


def check_feature_array(value, name: str, shape: tuple[int, ...], op: str) -> None:
  if value is None:
    return
  check_inexact(value, op, name)
  if tuple(value.shape) != shape:
    raise ValueError(
      f"{op}: `{name}` must have the feature shape {shape} (the sizes of the "
      f"`axis` dimensions); got shape {tuple(value.shape)}."
    )


def check_batch_stats(batch_stats, shape: tuple[int, ...], op: str) -> None:
  if not isinstance(batch_stats, Mapping) or not {"mean", "var"} <= set(batch_stats):
    raise ValueError(
      f"{op}: `batch_stats` must be a dict with entries 'mean' and 'var' "
      f"(see regjax.init_batch_stats); got {type(batch_stats).__name__}"
      + (f" with keys {sorted(batch_stats)}" if isinstance(batch_stats, Mapping) else "")
      + "."
    )
  for name in ("mean", "var"):
    if batch_stats[name] is None:
      raise ValueError(
        f"{op}: `batch_stats['{name}']` is None; it must be an array of the feature "
        f"shape {shape} (regjax.init_batch_stats({shape}) makes both)."
      )
    check_feature_array(batch_stats[name], f"batch_stats['{name}']", shape, op)


@overload
def batch_norm(
  x: ArrayLike,
  batch_stats: BatchStats,
  scale: ArrayLike | None = ...,
  bias: ArrayLike | None = ...,
  *,
  deterministic: bool = ...,
  momentum: float | jax.Array = ...,
  epsilon: float = ...,
  axis: int | tuple[int, ...] = ...,
  axis_name: str | tuple[str, ...] | None = ...,
  axis_index_groups: Sequence[Sequence[int]] | None = ...,
  unbiased_running_var: bool = ...,
  mask: ArrayLike | None = ...,
  dtype: DTypeLike | None = ...,
  force_float32_reductions: bool = ...,
  virtual_batch_size: int | None = ...,
) -> tuple[jax.Array, BatchStats]: ...


@overload
def batch_norm(
  x: ArrayLike,
  batch_stats: None,
  scale: ArrayLike | None = ...,
  bias: ArrayLike | None = ...,
  *,
  deterministic: bool = ...,
  momentum: float | jax.Array = ...,
  epsilon: float = ...,
  axis: int | tuple[int, ...] = ...,
  axis_name: str | tuple[str, ...] | None = ...,
  axis_index_groups: Sequence[Sequence[int]] | None = ...,
  unbiased_running_var: bool = ...,
  mask: ArrayLike | None = ...,
  dtype: DTypeLike | None = ...,
  force_float32_reductions: bool = ...,
  virtual_batch_size: int | None = ...,
) -> tuple[jax.Array, None]: ...


@overload
def batch_norm(
  x: ArrayLike,
  batch_stats: BatchStats | None,
  scale: ArrayLike | None = ...,
  bias: ArrayLike | None = ...,
  *,
  deterministic: bool = ...,
  momentum: float | jax.Array = ...,
  epsilon: float = ...,
  axis: int | tuple[int, ...] = ...,
  axis_name: str | tuple[str, ...] | None = ...,
  axis_index_groups: Sequence[Sequence[int]] | None = ...,
  unbiased_running_var: bool = ...,
  mask: ArrayLike | None = ...,
  dtype: DTypeLike | None = ...,
  force_float32_reductions: bool = ...,
  virtual_batch_size: int | None = ...,
) -> tuple[jax.Array, BatchStats | None]: ...


def batch_norm(
  x: ArrayLike,
  batch_stats: BatchStats | None,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  deterministic: bool = False,
  momentum: float | jax.Array = 0.99,
  epsilon: float = 1e-5,
  axis: int | tuple[int, ...] = -1,
  axis_name: str | tuple[str, ...] | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  unbiased_running_var: bool = False,
  mask: ArrayLike | None = None,
  dtype: DTypeLike | None = None,
  force_float32_reductions: bool = True,
  virtual_batch_size: int | None = None,
) -> tuple[jax.Array, BatchStats | None]:
  """Batch normalization (Ioffe & Szegedy 2015) returning updated statistics.

  Train mode (``deterministic=False``), per feature, over every axis but
  ``axis``::

      mu, var = mean(x), mean((x - mu)**2)            # biased variance
      y = scale * (x - mu) / sqrt(var + epsilon) + bias
      new_mean = momentum * mean_old + (1 - momentum) * mu
      new_var  = momentum * var_old  + (1 - momentum) * var  # var*n/(n-1) if unbiased_running_var

  Eval mode normalizes with ``batch_stats`` and returns them unchanged.

  Without running statistics (``batch_stats=None``, PyTorch's
  ``track_running_stats=False``) both modes normalize with the batch
  statistics, so ``deterministic`` (still checked) does not change ``y``, and
  the function returns ``(y, None)``; ``momentum`` and
  ``unbiased_running_var`` are then checked but unused.

  Ghost batch normalization (``virtual_batch_size=k``; Hoffer, Hubara &
  Soudry 2017, arXiv:1705.08741) splits the leading axis (axis 0, which must
  be a batch axis, of a size divisible by ``k``) into ``G`` groups of ``k``
  consecutive samples, ``x[g*k:(g+1)*k]``, and normalizes each group with its
  own statistics (over its ``k`` samples and any other batch axes). The
  running statistics get one update per step from the groups' statistics,
  count-weighted (``n_g`` selected values in group ``g``, ``N = sum n_g``)::

      mu  = sum_g n_g * mu_g / N                      # = the batch mean
      var = sum_g n_g * var_g / N                     # mean of the biased group variances
      var = sum_g n_g * var_g / sum_g (n_g - 1)       # if unbiased_running_var

  Without a mask every ``n_g`` is the same, so these are the plain means of
  the groups' means and biased (or unbiased) variances: the within-group
  variance the network sees in training, not the full batch's. Eval uses the
  running statistics as usual. ``k`` equal to the batch size is plain batch
  norm. Under ``axis_name`` the groups are formed within each device's local
  batch (normalization never crosses devices) and the running-statistics
  update above sums over the groups of all devices. With a ``mask`` each
  group's statistics use its selected positions (a group with none gets
  weight 0). With ``batch_stats=None`` both modes normalize per group.

  Statistics are accumulated in at least float32 (so bf16/fp16 inputs are
  safe) from one pass of sums of ``x - shift``, with ``shift`` one sample per
  feature, which stays accurate when ``|mean| >> std``, where flax's default
  one-pass ``E[x**2] - E[x]**2`` does not.

  Args:
    x: floating-point input.
    batch_stats: ``{'mean': ..., 'var': ...}``, each of the feature shape
      (``init_batch_stats`` makes them). Updated values keep their dtype.
      None: no running statistics (see above).
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
    virtual_batch_size: None (plain batch norm) or an int ``k >= 1`` that
      divides ``x.shape[0]`` (checked in train mode, and in both modes when
      ``batch_stats`` is None): ghost batch norm over groups of ``k``.

  Returns:
    ``(y, new_batch_stats)``; ``(y, None)`` when ``batch_stats`` is None.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  op = "regjax.batch_norm"
  check_inexact(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  feature_axes = _checks.canonical_axes(axis, x.ndim, op)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  if batch_stats is not None:
    check_batch_stats(batch_stats, feature_shape, op)
  virtual_batch_size = check_virtual_batch_size(virtual_batch_size, op)
  check_feature_array(scale, "scale", feature_shape, op)
  check_feature_array(bias, "bias", feature_shape, op)
  momentum = _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
  epsilon = _checks.check_epsilon(epsilon, op)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"{op}: `dtype` must be a floating-point (or complex) dtype or None; got {dtype!r}."
    )
  if mask is not None:
    check_mask(mask, x.shape, op)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  stats_dtype = jnp.promote_types(x.dtype, jnp.float32) if force_float32_reductions else x.dtype
  # Per-feature arrays with the reduced axes kept as size 1, so they broadcast.
  keep_shape = tuple(1 if a not in feature_axes else x.shape[a] for a in range(x.ndim))

  def as_keep(v):
    return None if v is None else jnp.reshape(v.astype(stats_dtype), keep_shape)

  xf = x.astype(stats_dtype)
  if deterministic and batch_stats is not None:
    y = _eval_normalize(
      xf,
      as_keep(batch_stats["mean"]),
      as_keep(batch_stats["var"]),
      as_keep(scale),
      as_keep(bias),
      epsilon,
    )
    return y.astype(out_dtype), batch_stats
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape)
  tracked = batch_stats is not None
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  if virtual_batch_size is not None:
    _check_virtual_batches(virtual_batch_size, x.shape, feature_axes, op)
  if virtual_batch_size is not None and (x.shape[0] != virtual_batch_size or axis_name is not None):
    # Ghost batches (one group on one device is plain batch norm, below).
    y, mean, var, count = _ghost_normalize(
      xf,
      as_keep(scale),
      as_keep(bias),
      mask,
      virtual_batch_size,
      feature_axes,
      axis_name,
      axis_index_groups,
      epsilon,
      tracked and unbiased_running_var,
      op,
    )
    unbiased_running_var = False  # already in `var`
  else:
    cfg = _bn_kernel.make_config(reduction_axes, axis_name, axis_index_groups, epsilon)
    check_unbiased = tracked and unbiased_running_var and mask is None
    check_train_shape(cfg, x.shape, feature_axes, check_unbiased, op)
    y, mean, var, count = _train_normalize(
      cfg, xf, as_keep(scale), as_keep(bias), mask, math.prod(feature_shape)
    )
  if batch_stats is None:
    return y.astype(out_dtype), None
  return y.astype(out_dtype), _updated_stats(
    batch_stats, mean, var, count, momentum, feature_shape, unbiased_running_var
  )


def _eval_normalize(x, mean, var, scale, bias, epsilon: float):
  """``(x - mean) * rsqrt(var + eps) * scale + bias`` with the running statistics."""
  multiplier = lax.rsqrt(var + epsilon)  # per-feature factors once, then one pass over x
  if scale is not None:
    multiplier = multiplier * scale
  y = (x - mean) * multiplier
  return y if bias is None else y + bias


def check_train_shape(
  cfg: _bn_kernel.Config, shape, feature_axes, check_unbiased: bool, op: str
) -> None:
  """Train mode needs more than one value per feature (or a named axis to add devices)."""
  if not cfg.reduction_axes and cfg.axis_name is None:
    raise ValueError(
      f"{op}: train mode needs a batch axis besides the feature axes {feature_axes}; "
      f"got `x` of shape {shape}, so every statistic would come from one value. "
      "Add a batch axis (x[None]), pass `axis` naming only the feature axes, or "
      "normalize across devices with `axis_name`."
    )
  batch_size = math.prod(shape[a] for a in cfg.reduction_axes)
  if check_unbiased and 0 < batch_size < 2 and cfg.axis_name is None:
    raise ValueError(
      f"{op}: `unbiased_running_var=True` needs more than one value per feature "
      f"in train mode; got an input of shape {shape} with feature axes {feature_axes}."
    )


def _train_normalize(cfg: _bn_kernel.Config, x, scale, bias, mask, feature_size: int):
  """``(y, mean, var, count)`` from the batch statistics (see :mod:`regjax._bn_kernel`)."""
  count = _bn_kernel.count(x, cfg.reduction_axes, mask, cfg.axis_name, cfg.axis_index_groups)
  if jnp.iscomplexobj(x):
    return (*_bn_kernel.complex_normalize(cfg, x, scale, bias, mask, count), count)
  if math.prod(x.shape[a] for a in cfg.reduction_axes) == 0:
    # An empty batch has no sample to shift by.
    keep_shape = tuple(1 if a in cfg.reduction_axes else d for a, d in enumerate(x.shape))
    shift = jnp.zeros(keep_shape, x.dtype)
  else:
    shift = _bn_kernel.shift(x, cfg.reduction_axes, mask)
  y, mean, var = _bn_kernel.normalize(cfg, x, shift, scale, bias, mask, count, feature_size)
  return y, mean, var, count


def check_virtual_batch_size(virtual_batch_size, op: str) -> int | None:
  """None, or a Python/NumPy int ``>= 1`` (not a bool), returned as an int."""
  if virtual_batch_size is None:
    return None
  if isinstance(virtual_batch_size, (bool, np.bool_)) or not isinstance(
    virtual_batch_size, numbers.Integral
  ):
    raise TypeError(
      f"{op}: `virtual_batch_size` must be None or an int >= 1; got {virtual_batch_size!r}."
    )
  if virtual_batch_size < 1:
    raise ValueError(
      f"{op}: `virtual_batch_size` must be None or an int >= 1; got {virtual_batch_size!r}."
    )
  return int(virtual_batch_size)


def _check_virtual_batches(k: int, shape, feature_axes, op: str) -> None:
  """Ghost batches split axis 0, a batch axis, into groups of ``k``."""
  if not shape or 0 in feature_axes:
    raise ValueError(
      f"{op}: `virtual_batch_size` splits the leading batch axis (axis 0) into groups, "
      f"but axis 0 is a feature axis here (`x` of shape {shape}, feature axes {feature_axes})."
    )
  if shape[0] % k:
    raise ValueError(
      f"{op}: `virtual_batch_size`={k} must divide the batch size (x.shape[0]={shape[0]}); "
      f"got `x` of shape {shape}."
    )


def _ghost_normalize(
  x, scale, bias, mask, k: int, feature_axes, axis_name, axis_index_groups, epsilon, unbiased, op
):
  """Ghost batch norm: ``(y, mean, var, count)``, the running-statistics update's inputs.

  ``x`` is viewed as ``(G, k, ...)`` with the group axis a feature axis of the
  kernel, so every group gets its own statistics (and its own shift, so the
  accuracy for ``|mean| >> std`` is that of plain batch norm), never combined
  across devices. The groups' statistics are then combined count-weighted
  (see :func:`batch_norm`) over the groups and, under ``axis_name``, the
  devices; the means as deviations from a per-feature sample ``ref`` (each
  device's own, added back as in the kernel's device merge), so that their
  sum stays accurate when ``|mean| >> std``.
  """
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  grouped_shape = (x.shape[0] // k, k, *x.shape[1:])
  reduced = (1, *(a + 1 for a in reduction_axes[1:]))  # axis 0 is reduced (checked)
  group_keep = tuple(1 if a in reduced else d for a, d in enumerate(grouped_shape))
  if unbiased and mask is None and math.prod(grouped_shape[a] for a in reduced) < 2:
    raise ValueError(
      f"{op}: `unbiased_running_var=True` needs more than one value per feature in each "
      f"virtual batch; got `virtual_batch_size`={k} and `x` of shape {x.shape}."
    )

  def grouped(v):  # a per-feature array (x's reduced axes of size 1), one copy per group
    return None if v is None else jnp.broadcast_to(v[None], group_keep)

  cfg = _bn_kernel.make_config(reduced, None, None, epsilon)
  y, mean_g, var_g, count_g = _train_normalize(
    cfg,
    x.reshape(grouped_shape),
    grouped(scale),
    grouped(bias),
    None if mask is None else mask.reshape(grouped_shape),
    math.prod(group_keep),
  )

  def over_devices(v):
    return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=axis_index_groups)

  def total(v):  # over this device's groups (axis 0), then over the devices
    return over_devices(jnp.sum(v, 0))

  # Per-feature arrays of x's keep shape from here on (group_keep[1:]).
  if x.shape[0] == 0:
    ref = jnp.zeros(group_keep[1:], x.dtype)
  else:
    ref = _bn_kernel.shift(x, reduction_axes, mask)
  local_count = jnp.sum(count_g, 0)
  count = over_devices(local_count)
  n = jnp.maximum(count, 1)
  # The small deviations are summed first, then the large local_count * ref added once.
  mean = over_devices(jnp.sum(count_g * (mean_g - ref), 0) + local_count * ref) / n
  weighted_var = total(count_g * var_g)
  if unbiased:  # the pooled unbiased variance: n_g - 1 degrees of freedom per group
    dof = total(jnp.maximum(count_g - 1, 0))
    var = jnp.where(dof > 0, weighted_var / jnp.maximum(dof, 1), weighted_var / n)
  else:
    var = weighted_var / n
  return y.reshape(x.shape), mean, var, count


def check_mask(mask, x_shape, op: str) -> None:
  if getattr(mask, "dtype", None) != jnp.bool_:
    raise TypeError(f"{op}: `mask` must be a boolean array; got {getattr(mask, 'dtype', mask)!r}.")
  try:  # `mask` must broadcast *to* x's shape, not merely with it
    broadcastable = jnp.broadcast_shapes(mask.shape, x_shape) == x_shape
  except ValueError:
    broadcastable = False
  if not broadcastable:
    raise ValueError(
      f"{op}: `mask` of shape {mask.shape} does not broadcast to `x` of shape {x_shape}."
    )


def _updated_stats(
  batch_stats, mean, var, count, momentum, feature_shape, unbiased_running_var
) -> BatchStats:
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
    new_dtype = (
      jnp.promote_types(old.dtype, batch_value.dtype)
      if jnp.iscomplexobj(batch_value)
      else old.dtype
    )
    old_f = old.astype(jnp.promote_types(old.dtype, batch_value.dtype))
    new = momentum * old_f + (1.0 - momentum) * jnp.reshape(batch_value, feature_shape)
    return jnp.where(has_values, new, old_f).astype(new_dtype)

  new_stats = cast(BatchStats, dict(batch_stats))  # extra entries are kept
  new_stats["mean"] = update(batch_stats["mean"], mean)
  new_stats["var"] = update(batch_stats["var"], var)
  return new_stats

"""Batch renormalization (Ioffe 2017) as a pure function with explicit running statistics.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017, arXiv:1702.03275. Train mode corrects
the batch-normalized output towards the normalization with the running
statistics, by per-feature factors that carry no gradient::

    sigma_B = sqrt(var_B + eps)          sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)
    d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    y = scale * ((x - mu_B) / sigma_B * r + d) + bias

The normalization is :func:`regjax.batch_norm`'s, with ``scale * r`` as the
scale and ``scale * d + bias`` as the bias, so its accuracy, masks,
cross-device statistics, dtype rules, explicit JVP and running-statistics
update are the same; ``r_max=1, d_max=0`` is batch normalization exactly.
Eval mode is :func:`regjax.batch_norm`'s eval mode. The variables are
batch norm's (``{'mean', 'var'}``), so BatchNorm checkpoints load unchanged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from regjax import _bn_kernel, _checks, normalization
from regjax.normalization import BatchStats

__all__ = ["batch_renorm"]


def check_limit(value, op: str, name: str, low: float) -> float | jax.Array:
  """``r_max`` (low 1) or ``d_max`` (low 0): concrete values must be ``>= low`` (``inf``
  allowed: no clipping); traced ones are returned for :func:`_clip_limit`."""
  shape = getattr(value, "shape", ())
  if shape != ():
    raise ValueError(f"{op}: `{name}` must be a scalar; got shape {tuple(shape)}.")
  if _checks.is_traced(value):
    if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
      value.dtype, jnp.integer
    ):
      raise TypeError(f"{op}: `{name}` must be a real number; got dtype {value.dtype}.")
    return value
  if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
    raise TypeError(f"{op}: `{name}` must be a real number; got {value!r}.")
  if not isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
    raise TypeError(f"{op}: `{name}` must be a real number; got {value!r}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{op}: `{name}` must be a real number; got {value!r}.") from None
  if math.isnan(number) or number < low:
    raise ValueError(f"{op}: `{name}` must be in [{low:g}, inf]; got {value!r}.")
  return number


def _clip_limit(value, low: float, dtype) -> Any:
  """A traced limit clipped into ``[low, inf]``; NaN gives ``low`` (batch norm)."""
  value = jnp.asarray(value, dtype)
  return jnp.where(jnp.isnan(value), low, jnp.maximum(value, low))


def _batch_moments(cfg: _bn_kernel.Config, x, mask, feature_size: int):
  """Batch mean and biased variance (reduced axes kept), without gradient: the
  statistics :mod:`regjax._bn_kernel` normalizes with (same shift, reducer,
  count-weighted merge across devices)."""
  x = lax.stop_gradient(x)
  n = _bn_kernel.count(x, cfg.reduction_axes, mask, cfg.axis_name, cfg.axis_index_groups)
  if math.prod(x.shape[a] for a in cfg.reduction_axes) == 0:
    keep_shape = tuple(1 if a in cfg.reduction_axes else d for a, d in enumerate(x.shape))
    shift = jnp.zeros(keep_shape, x.dtype)
  else:
    shift = _bn_kernel.shift(x, cfg.reduction_axes, mask)
  mean, var = _bn_kernel.moments(cfg, x, shift, mask, n, feature_size)
  return lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_renorm(
  x: ArrayLike,
  batch_stats: BatchStats,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  r_max: float | jax.Array,
  d_max: float | jax.Array,
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
) -> tuple[jax.Array, BatchStats]:
  """Batch renormalization (Ioffe 2017, arXiv:1702.03275) returning updated statistics.

  Train mode (``deterministic=False``), per feature, over every axis but
  ``axis``, with the batch mean ``mu_B`` and biased variance ``var_B`` of
  :func:`regjax.batch_norm` and the running statistics *before* this step::

      sigma_B, sigma = sqrt(var_B + epsilon), sqrt(running_var + epsilon)
      r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
      d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))
      y = scale * ((x - mu_B) / sigma_B * r + d) + bias

  The running statistics are updated exactly as by :func:`regjax.batch_norm`
  (the paper's Algorithm 1 keeps a running ``sigma``; here it is
  ``sqrt(running_var + epsilon)``, so the variables are batch norm's). The
  normalization is batch norm's with the per-feature scale ``scale * r`` and
  bias ``scale * d + bias``. ``r_max=1, d_max=0`` as Python or NumPy numbers
  calls :func:`regjax.batch_norm` itself (output, statistics and gradients
  bit for bit); traced limits 1 and 0 give ``r = 1``, ``d = 0`` exactly, so
  ``scale * 1`` and ``scale * 0 + bias``: the same statistics, and with a
  ``scale`` the same output bit for bit (without one batch norm gets ``r`` as
  its scale, and the gradient is a different program: there XLA's fusion may
  change the last bit). Larger limits (the paper ramps
  them from there to ``r_max=3, d_max=5``) move the output towards the
  normalization with the running statistics, which eval mode uses: eval mode
  is :func:`regjax.batch_norm`'s eval mode, bit for bit.

  Args:
    x: real floating-point input (complex input is not supported).
    batch_stats: ``{'mean': ..., 'var': ...}`` of the feature shape (see
      :func:`regjax.init_batch_stats`); batch norm's variables.
    scale, bias: optional per-feature affine parameters of the feature shape.
    r_max: bound of ``r`` to ``[1/r_max, r_max]``, a number ``>= 1`` (``inf``:
      no bound). A Python or NumPy value below 1 or NaN raises a
      ``ValueError``. May be traced (a schedule under ``jit`` compiles once):
      a traced value below 1 is taken as 1 and a NaN one as 1 (batch norm).
    d_max: bound of ``d`` to ``[-d_max, d_max]``, a number ``>= 0`` (``inf``:
      no bound); checked and, when traced, clipped (below 0 or NaN: 0) like
      ``r_max``.
    deterministic, momentum, epsilon, axis, axis_name, axis_index_groups,
      unbiased_running_var, mask, dtype, force_float32_reductions: as
      :func:`regjax.batch_norm`. ``r`` and ``d`` use the same accurate,
      count-weighted (cross-device, masked) batch statistics.

  Returns:
    ``(y, new_batch_stats)``.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  scale, bias = cast("jax.Array | None", scale), cast("jax.Array | None", bias)  # likewise
  op = "regjax.batch_renorm"
  _checks.check_floating(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  r_max = check_limit(r_max, op, "r_max", 1.0)
  d_max = check_limit(d_max, op, "d_max", 0.0)
  feature_axes = _checks.canonical_axes(axis, x.ndim, op)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  normalization.check_batch_stats(batch_stats, feature_shape, op)
  normalization.check_feature_array(scale, "scale", feature_shape, op)
  normalization.check_feature_array(bias, "bias", feature_shape, op)
  _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
  epsilon = _checks.check_epsilon(epsilon, op)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"{op}: `dtype` must be a floating-point (or complex) dtype or None; got {dtype!r}."
    )
  if mask is not None:
    normalization.check_mask(mask, x.shape, op)
  common: dict[str, Any] = dict(
    deterministic=deterministic,
    momentum=momentum,
    epsilon=epsilon,
    axis=axis,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    unbiased_running_var=unbiased_running_var,
    mask=mask,
    dtype=dtype,
    force_float32_reductions=force_float32_reductions,
  )
  if deterministic or (_checks.is_concretely(r_max, 1.0) and _checks.is_concretely(d_max, 0.0)):
    return normalization.batch_norm(x, batch_stats, scale, bias, **common)

  cfg = _bn_kernel.make_config(
    tuple(a for a in range(x.ndim) if a not in feature_axes), axis_name, axis_index_groups, epsilon
  )
  normalization.check_train_shape(
    cfg, x.shape, feature_axes, unbiased_running_var and mask is None, op
  )
  stats_dtype = jnp.promote_types(x.dtype, jnp.float32) if force_float32_reductions else x.dtype
  keep_shape = tuple(1 if a not in feature_axes else x.shape[a] for a in range(x.ndim))
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape)
  mean, var = _batch_moments(cfg, x.astype(stats_dtype), mask, math.prod(feature_shape))

  def as_feature(v):
    return jnp.reshape(lax.stop_gradient(v).astype(stats_dtype), keep_shape)

  running_mean, running_var = as_feature(batch_stats["mean"]), as_feature(batch_stats["var"])
  sigma = jnp.sqrt(running_var + epsilon)
  if _checks.is_traced(r_max):
    r_max = _clip_limit(r_max, 1.0, stats_dtype)
  if _checks.is_traced(d_max):
    d_max = _clip_limit(d_max, 0.0, stats_dtype)
  r = jnp.clip(jnp.sqrt(var + epsilon) / sigma, 1.0 / r_max, r_max)
  d = jnp.clip((mean - running_mean) / sigma, -d_max, d_max)
  r, d = (lax.stop_gradient(jnp.reshape(v, feature_shape)) for v in (r, d))
  # scale' = scale * r, bias' = scale * d + bias: exact for r = 1, d = 0.
  if scale is None:
    new_scale, new_bias = r, d
  else:
    scale_f = scale.astype(stats_dtype)
    new_scale, new_bias = scale_f * r, scale_f * d
  if bias is not None:
    new_bias = new_bias + bias.astype(stats_dtype)
  return normalization.batch_norm(x, batch_stats, new_scale, new_bias, **common)

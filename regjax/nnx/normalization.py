"""NNX BatchNorm, drop-in for ``flax.nnx.BatchNorm``.

Same constructor arguments and attributes, and the same variables:
``nnx.BatchStat`` ``mean`` and ``var`` (float32) and ``nnx.Param`` ``scale``
and ``bias``, so ``nnx.state`` trees and checkpoints match flax's. The
statistics come from :func:`regjax.batch_norm`, which stays accurate when
``|mean| >> std``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, PromoteDtypeFn
from jax.nn import initializers
from jax.typing import ArrayLike

from regjax import _checks, renorm
from regjax import normalization as F

Initializer = Any


def _feature_shape(num_features, axis, op: str) -> tuple[Any, ...]:
  """``num_features`` as a shape with one positive size per axis of ``axis``."""
  feature_shape: tuple[Any, ...] | None
  if isinstance(num_features, (int, np.integer)) and not isinstance(num_features, bool):
    feature_shape = (int(num_features),)
  elif isinstance(num_features, (tuple, list)):
    feature_shape = tuple(num_features)
  else:
    feature_shape = None
  if (
    feature_shape is None
    or not feature_shape
    or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in feature_shape
    )
  ):
    raise ValueError(
      f"{op}: `num_features` must be a positive int (or a tuple of them, one per "
      f"feature axis); got {num_features!r}."
    )
  n_axes = 1 if isinstance(axis, (int, np.integer)) else len(tuple(axis))
  if n_axes != len(feature_shape):
    raise ValueError(
      f"{op}: `num_features`={num_features!r} gives {len(feature_shape)} feature "
      f"size(s) but `axis`={axis!r} names {n_axes} axis/axes."
    )
  return feature_shape


class _Normalization(nnx.Module):
  """What BatchNorm and BatchRenorm share: the affine parameters, the mode alias, nnx.view."""

  def _init_affine(self, feature_shape, scale_spec, bias_spec, param_dtype, rngs) -> None:
    """``self.scale`` / ``self.bias``: a Param from ``(init, metadata)``, or None when False."""
    self.scale: nnx.Param | None = nnx.data(None)
    self.bias: nnx.Param | None = nnx.data(None)
    for name, spec in (("scale", scale_spec), ("bias", bias_spec)):
      if spec:
        init, metadata = spec
        setattr(self, name, nnx.Param(init(rngs.params(), feature_shape, param_dtype), **metadata))

  # `deterministic` is an alias: one stored value, so train()/eval(),
  # set_attributes and nnx.view can never leave the two out of step.
  use_running_average: bool | None

  @property
  def deterministic(self) -> bool | None:
    """Eval mode if True; an alias of ``use_running_average``."""
    return self.use_running_average

  @deterministic.setter
  def deterministic(self, value: bool | None) -> None:
    self.use_running_average = value

  def set_view(self, use_running_average: bool | None = None, deterministic: bool | None = None):
    """Class method used by ``nnx.view``.

    ``nnx.view`` passes its keyword arguments to every module, so
    ``nnx.view(model, deterministic=True, use_running_average=False)`` (noise
    off, BatchNorm on batch statistics, as for re-estimating the statistics)
    is legitimate: the specific name ``use_running_average`` takes precedence
    over the alias ``deterministic`` here.

    Args:
      use_running_average: if True, the stored batch statistics are used
        instead of the statistics of the input (eval mode).
      deterministic: alias of ``use_running_average``, used when that is not
        given.
    """
    mode = use_running_average if use_running_average is not None else deterministic
    if mode is not None:
      self.use_running_average = mode


class BatchNorm(_Normalization):
  """Batch normalization with running statistics in ``nnx.BatchStat`` variables.

  Arguments and attributes match ``flax.nnx.BatchNorm``; in addition:

  Args:
    deterministic: eval mode if True; an alias of ``use_running_average``
      (the attribute ``deterministic`` reads and writes
      ``use_running_average``, so ``model.train()`` / ``model.eval()`` and
      ``nnx.view(model, deterministic=...)`` switch it too; where ``nnx.view``
      gets both names, ``use_running_average`` wins). If given to the
      constructor, it sets the mode in place of ``use_running_average``'s
      default ``False``; ``use_running_average=True, deterministic=False`` is
      an error, as are disagreeing values at call.
    unbiased_running_var: store the unbiased batch variance in the running
      variance (PyTorch's convention; its ``momentum=0.1`` is ``0.9`` here).
    promote_dtype: as flax's: applied to ``(x, mean, var, scale, bias)``
      with ``dtype`` before normalizing (default ``flax.nnx.nn.dtypes.promote_dtype``).
    track_running_stats: False (PyTorch's ``track_running_stats=False``)
      creates no ``nnx.BatchStat`` variables (``mean`` and ``var`` are None)
      and normalizes with the batch statistics in both modes;
      ``use_running_average``/``deterministic`` are then accepted, not needed,
      and do not change the output (``mean``/``var`` reach ``promote_dtype``
      as None).
    virtual_batch_size: ghost batch norm over groups of this many consecutive
      samples (see :func:`regjax.batch_norm`); None (default) is plain batch
      norm.

  ``num_features`` may be a tuple when ``axis`` is a tuple (one size per
  feature axis). ``use_fast_variance`` is accepted so flax code ports
  unchanged, but regjax always uses its accurate two-pass statistics. The
  output dtype, if ``dtype`` is None, is inferred from the input and the
  params (flax's documented rule; the float32 statistics do not promote it).
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    use_running_average: bool | None = False,
    axis: int | tuple[int, ...] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    use_fast_variance: bool = True,
    deterministic: bool | None = None,
    unbiased_running_var: bool = False,
    track_running_stats: bool = True,
    virtual_batch_size: int | None = None,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    op = "regjax.nnx.BatchNorm"
    feature_shape = _feature_shape(num_features, axis, op)
    _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
    _checks.check_epsilon(epsilon, op)
    F.check_virtual_batch_size(virtual_batch_size, op)
    if deterministic is not None:
      use_running_average = _checks.resolve_deterministic_alias(
        deterministic, True if use_running_average else None, "constructor arguments"
      )

    self.mean: nnx.BatchStat | None
    self.var: nnx.BatchStat | None
    if track_running_stats:
      stats = F.init_batch_stats(feature_shape, F.running_stats_dtype())
      self.mean = nnx.BatchStat(stats["mean"])
      self.var = nnx.BatchStat(stats["var"])
    else:
      self.mean = nnx.data(None)
      self.var = nnx.data(None)
    self._init_affine(
      feature_shape,
      use_scale and (scale_init, scale_metadata),
      use_bias and (bias_init, bias_metadata),
      param_dtype,
      rngs,
    )

    # Static attributes must be hashable (they are part of nnx's graph definition).
    self.num_features = tuple(num_features) if isinstance(num_features, list) else num_features
    self.use_running_average = use_running_average
    self.axis = tuple(axis) if isinstance(axis, list) else axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.unbiased_running_var = unbiased_running_var
    self.track_running_stats = track_running_stats
    self.virtual_batch_size = virtual_batch_size
    self.promote_dtype = promote_dtype

  def __call__(
    self,
    x: ArrayLike,
    use_running_average: bool | None = None,
    *,
    deterministic: bool | None = None,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in train mode also updates ``mean`` and ``var``.

    Args:
      x: the input.
      use_running_average: eval mode if True; takes precedence over the
        attribute.
      deterministic: alias of ``use_running_average``.
      mask: optional boolean array broadcastable to ``x``; only True positions
        enter the statistics.
    """
    x = cast(jax.Array, x)  # typing only (a no-op); checked below
    mode = _checks.resolve_deterministic_alias(deterministic, use_running_average, "call arguments")
    if mode is None:
      mode = self.use_running_average
    if mode is None and not self.track_running_stats:
      mode = False  # batch statistics either way: no mode needed
    if mode is None:
      raise ValueError(
        "BatchNorm: no `use_running_average`/`deterministic` value: pass it to the "
        "constructor, at call, or switch the model with model.train() / model.eval() "
        "or nnx.view(model, use_running_average=...)."
      )
    feature_axes = _checks.canonical_axes(self.axis, x.ndim, "BatchNorm")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    expected = (
      tuple(self.mean.shape)
      if self.mean is not None
      else _feature_shape(self.num_features, self.axis, "BatchNorm")
    )
    if feature_shape != expected:
      raise ValueError(
        f"BatchNorm(num_features={self.num_features!r}): the input's feature "
        f"axes {feature_axes} have sizes {feature_shape}; expected "
        f"{expected}."
      )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    F.check_inexact(x, "BatchNorm")  # before promotion, which would turn integers into floats
    # As flax: input, statistics and params pass through `promote_dtype` first.
    tracked = self.mean is not None and self.var is not None
    x, mean, var, scale, bias = self.promote_dtype(
      (
        x,
        self.mean[...] if self.mean is not None else None,
        self.var[...] if self.var is not None else None,
        scale,
        bias,
      ),
      dtype=self.dtype,
    )
    y, new_stats = F.batch_norm(
      x,
      cast(F.BatchStats, {"mean": mean, "var": var}) if tracked else None,
      scale,
      bias,
      deterministic=mode,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis=self.axis,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      dtype=F.output_dtype(x, scale, bias, self.dtype),
      virtual_batch_size=self.virtual_batch_size,
    )
    if new_stats is not None and self.mean is not None and self.var is not None and not mode:
      # Statistics are state, never differentiated (as in nnx.BatchNorm).
      # The variables keep their dtype whatever `promote_dtype` did.
      self.mean[...] = jax.lax.stop_gradient(new_stats["mean"]).astype(self.mean.dtype)
      self.var[...] = jax.lax.stop_gradient(new_stats["var"]).astype(self.var.dtype)
    return y


class BatchRenorm(_Normalization):
  """Batch renormalization (Ioffe 2017, arXiv:1702.03275), see :func:`regjax.renorm.batch_renorm`.

  Train mode normalizes with the batch statistics, corrected towards the
  running ones by the gradient-free factors ``r = clip(sigma_B / sigma,
  1/r_max, r_max)`` and ``d = clip((mu_B - mean) / sigma, -d_max, d_max)``:
  ``y = scale * ((x - mu_B) / sigma_B * r + d) + bias``. Eval mode is
  :class:`BatchNorm`'s. Constructor arguments, attributes, modes
  (``deterministic`` alias, ``train()``/``eval()``, ``nnx.view``) and
  variables are :class:`BatchNorm`'s (``nnx.BatchStat`` ``mean``/``var``,
  ``nnx.Param`` ``scale``/``bias``, same shapes and dtypes), so a BatchNorm's
  ``nnx.state`` loads into a BatchRenorm and back; in addition:

  Args:
    r_max: bound of ``r``, ``>= 1`` (default 3.0, the paper's final value).
    d_max: bound of ``d``, ``>= 0`` (default 5.0, the paper's final value).

  ``r_max`` and ``d_max`` are static attributes (changing one retraces
  ``nnx.jit``); for a ramp pass them at call, where they may be traced, e.g.
  ``model(x, r_max=schedule(step))`` inside ``nnx.jit`` with ``step`` an
  argument: one compilation serves every value, and a traced value out of
  range is clipped (below 1, resp. 0, or NaN: batch norm). There is no
  ``track_running_stats`` (the running statistics are what ``r`` and ``d``
  correct towards) and no ``virtual_batch_size``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    use_running_average: bool | None = False,
    axis: int | tuple[int, ...] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    use_fast_variance: bool = True,
    deterministic: bool | None = None,
    unbiased_running_var: bool = False,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    r_max: float = 3.0,
    d_max: float = 5.0,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    op = "regjax.nnx.BatchRenorm"
    feature_shape = _feature_shape(num_features, axis, op)
    _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
    _checks.check_epsilon(epsilon, op)
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
      if _checks.is_traced(value):
        raise TypeError(
          f"{op}: `{name}` must be a Python or NumPy number here (it is a static "
          "attribute); pass a traced value at call instead: model(x, "
          f"{name}=...)."
        )
      renorm.check_limit(value, op, name, low)
    if deterministic is not None:
      use_running_average = _checks.resolve_deterministic_alias(
        deterministic, True if use_running_average else None, "constructor arguments"
      )

    stats = F.init_batch_stats(feature_shape, F.running_stats_dtype())
    self.mean = nnx.BatchStat(stats["mean"])
    self.var = nnx.BatchStat(stats["var"])
    self._init_affine(
      feature_shape,
      use_scale and (scale_init, scale_metadata),
      use_bias and (bias_init, bias_metadata),
      param_dtype,
      rngs,
    )

    # Static attributes must be hashable (they are part of nnx's graph definition).
    self.num_features = tuple(num_features) if isinstance(num_features, list) else num_features
    self.use_running_average = use_running_average
    self.axis = tuple(axis) if isinstance(axis, list) else axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.unbiased_running_var = unbiased_running_var
    self.promote_dtype = promote_dtype
    self.r_max = r_max
    self.d_max = d_max

  def __call__(
    self,
    x: ArrayLike,
    use_running_average: bool | None = None,
    *,
    deterministic: bool | None = None,
    mask: ArrayLike | None = None,
    r_max: float | jax.Array | None = None,
    d_max: float | jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in train mode also updates ``mean`` and ``var``.

    Args:
      x: the input.
      use_running_average: eval mode if True; takes precedence over the
        attribute.
      deterministic: alias of ``use_running_average``.
      mask: optional boolean array broadcastable to ``x``; only True positions
        enter the statistics.
      r_max, d_max: override the attributes for this call; may be traced.
    """
    x = cast(jax.Array, x)  # typing only (a no-op); checked below
    mode = _checks.resolve_deterministic_alias(deterministic, use_running_average, "call arguments")
    if mode is None:
      mode = self.use_running_average
    if mode is None:
      raise ValueError(
        "BatchRenorm: no `use_running_average`/`deterministic` value: pass it to the "
        "constructor, at call, or switch the model with model.train() / model.eval() "
        "or nnx.view(model, use_running_average=...)."
      )
    feature_axes = _checks.canonical_axes(self.axis, x.ndim, "BatchRenorm")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    if feature_shape != tuple(self.mean.shape):
      raise ValueError(
        f"BatchRenorm(num_features={self.num_features!r}): the input's feature "
        f"axes {feature_axes} have sizes {feature_shape}; expected "
        f"{tuple(self.mean.shape)}."
      )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    F.check_inexact(x, "BatchRenorm")  # before promotion, which would turn integers into floats
    x, mean, var, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    y, new_stats = renorm.batch_renorm(
      x,
      {"mean": mean, "var": var},
      scale,
      bias,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
      deterministic=mode,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis=self.axis,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      dtype=F.output_dtype(x, scale, bias, self.dtype),
    )
    if not mode:
      # Statistics are state, never differentiated; the variables keep their dtype.
      self.mean[...] = jax.lax.stop_gradient(new_stats["mean"]).astype(self.mean.dtype)
      self.var[...] = jax.lax.stop_gradient(new_stats["var"]).astype(self.var.dtype)
    return y

"""Linen BatchNorm, drop-in for ``flax.linen.BatchNorm``.

Same fields, call signature and variables (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``), so flax checkpoints load as they
are. The statistics come from :func:`regjax.batch_norm`, which stays accurate
when ``|mean| >> std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax.nn import initializers
from jax.typing import ArrayLike

from regjax import normalization as F
from regjax._checks import canonical_axes, resolve_deterministic_alias
from regjax.renorm import batch_renorm

Initializer = Any


class BatchNorm(nn.Module):
  """Batch normalization with running statistics in the ``batch_stats`` collection.

  Attributes match ``flax.linen.BatchNorm``; in addition:
    deterministic: eval mode if True; an alias of ``use_running_average``
      (either may be set, on the module or at call).
    unbiased_running_var: store the unbiased batch variance in the running
      variance (PyTorch's convention; its ``momentum=0.1`` is ``0.9`` here).
    track_running_stats: False (PyTorch's ``track_running_stats=False``)
      creates no ``batch_stats`` collection and normalizes with the batch
      statistics in both modes; ``use_running_average``/``deterministic`` are
      then accepted, not needed, and do not change the output.
    virtual_batch_size: ghost batch norm over groups of this many consecutive
      samples (see :func:`regjax.batch_norm`); None (default) is plain batch
      norm. Not applied during ``init`` (the init batch need not be a
      multiple of it).

  ``force_float32_reductions`` (default True) keeps the statistics and the
  running averages in at least float32; False uses ``x.dtype`` for the
  statistics and ``param_dtype`` for the running averages, as in flax.

  ``use_fast_variance`` is accepted so flax code ports unchanged, but regjax
  always uses its accurate two-pass statistics. Running statistics are not
  updated during ``init``, and ``axis_name`` is ignored there (the named axis
  need not exist at init), as in flax.
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Sequence[Sequence[int]] | None = None
  use_fast_variance: bool = True
  deterministic: bool | None = None
  unbiased_running_var: bool = False
  force_float32_reductions: bool = True
  track_running_stats: bool = True
  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(
    self,
    x: ArrayLike,
    use_running_average: bool | None = None,
    *,
    deterministic: bool | None = None,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    x = cast(jax.Array, x)  # typing only (a no-op); checked below
    module_mode = resolve_deterministic_alias(
      self.deterministic, self.use_running_average, "module attributes"
    )
    call_mode = resolve_deterministic_alias(deterministic, use_running_average, "call arguments")
    if not self.track_running_stats and module_mode is None and call_mode is None:
      call_mode = False  # batch statistics either way: no mode needed
    deterministic = nn.merge_param("deterministic", module_mode, call_mode)
    F.check_virtual_batch_size(self.virtual_batch_size, "regjax.linen.BatchNorm")  # at init too
    feature_axes = canonical_axes(self.axis, x.ndim, "BatchNorm")
    feature_shape = tuple(x.shape[a] for a in feature_axes)

    running, scale, bias = _variables(self, feature_shape, self.track_running_stats)
    initializing = self.is_initializing()
    y, new_stats = F.batch_norm(
      x,
      None if running is None else {"mean": running[0].value, "var": running[1].value},
      scale,
      bias,
      deterministic=deterministic,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis=self.axis,
      axis_name=None if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      force_float32_reductions=self.force_float32_reductions,
      dtype=F.output_dtype(x, scale, bias, self.dtype),
      virtual_batch_size=None if initializing else self.virtual_batch_size,
    )
    if running is not None and new_stats is not None and not deterministic and not initializing:
      _store(running, new_stats)
    return y


class BatchRenorm(nn.Module):
  """Batch renormalization (Ioffe 2017, arXiv:1702.03275), see :func:`regjax.renorm.batch_renorm`.

  Train mode normalizes with the batch statistics, corrected towards the
  running ones by the gradient-free factors ``r = clip(sigma_B / sigma,
  1/r_max, r_max)`` and ``d = clip((mu_B - mean) / sigma, -d_max, d_max)``:
  ``y = scale * ((x - mu_B) / sigma_B * r + d) + bias``. Eval mode is
  :class:`BatchNorm`'s. Fields, call signature and variables are
  :class:`BatchNorm`'s (``params/scale``, ``params/bias``,
  ``batch_stats/mean``, ``batch_stats/var``, same shapes and dtypes), so a
  BatchNorm checkpoint loads into BatchRenorm and back; in addition:

    r_max: bound of ``r``, ``>= 1`` (default 3.0, the paper's final value).
    d_max: bound of ``d``, ``>= 0`` (default 5.0, the paper's final value).

  ``r_max`` and ``d_max`` given at call override the fields and may be traced
  (a jitted argument), so a ramp (the paper's: ``r_max=1, d_max=0`` for the
  first steps, then up to 3 and 5) compiles once, e.g. ``model.apply(v, x,
  r_max=optax.linear_schedule(1.0, 3.0, n)(step), ...)``; a traced value out
  of range is clipped (below 1, resp. 0, or NaN: batch norm). ``r_max=1,
  d_max=0`` is :class:`BatchNorm`. There is no ``track_running_stats`` (the
  running statistics are what ``r`` and ``d`` correct towards) and no
  ``virtual_batch_size``.
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Sequence[Sequence[int]] | None = None
  use_fast_variance: bool = True
  deterministic: bool | None = None
  unbiased_running_var: bool = False
  force_float32_reductions: bool = True
  r_max: float = 3.0
  d_max: float = 5.0

  @nn.compact
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
    """Normalizes ``x``; in train mode also updates ``batch_stats``.

    Args:
      x: the input.
      use_running_average: eval mode if True (as :class:`BatchNorm`).
      deterministic: alias of ``use_running_average``.
      mask: optional boolean array broadcastable to ``x``; only True positions
        enter the statistics.
      r_max, d_max: override the fields for this call; may be traced.
    """
    x = cast(jax.Array, x)  # typing only (a no-op); checked below
    deterministic = nn.merge_param(
      "deterministic",
      resolve_deterministic_alias(
        self.deterministic, self.use_running_average, "module attributes"
      ),
      resolve_deterministic_alias(deterministic, use_running_average, "call arguments"),
    )
    feature_axes = canonical_axes(self.axis, x.ndim, "BatchRenorm")
    feature_shape = tuple(x.shape[a] for a in feature_axes)

    running, scale, bias = _variables(self, feature_shape, True)
    initializing = self.is_initializing()
    y, new_stats = batch_renorm(
      x,
      {"mean": running[0].value, "var": running[1].value},
      scale,
      bias,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
      deterministic=deterministic,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis=self.axis,
      axis_name=None if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      force_float32_reductions=self.force_float32_reductions,
      dtype=F.output_dtype(x, scale, bias, self.dtype),
    )
    if not deterministic and not initializing:
      _store(running, new_stats)
    return y


def _variables(module: nn.Module, feature_shape: tuple[int, ...], track_running_stats: bool):
  """BatchNorm's variables in ``module`` (BatchNorm or BatchRenorm, inside its compact call):
  ``(running, scale, bias)``, ``running`` the ``batch_stats`` pair ``(mean, var)`` or None."""
  stats_dtype = F.running_stats_dtype(module.param_dtype, module.force_float32_reductions)
  running = None
  if track_running_stats:
    running = (
      module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape),
      module.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape),
    )
  scale = (
    module.param("scale", module.scale_init, feature_shape, module.param_dtype)
    if module.use_scale
    else None
  )
  bias = (
    module.param("bias", module.bias_init, feature_shape, module.param_dtype)
    if module.use_bias
    else None
  )
  return running, scale, bias


def _store(running, new_stats) -> None:
  """Writes the updated statistics into the ``batch_stats`` pair."""
  running[0].value = new_stats["mean"]
  running[1].value = new_stats["var"]

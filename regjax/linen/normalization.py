"""Linen BatchNorm, drop-in for ``flax.linen.BatchNorm``.

Same fields, call signature and variables (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``), so flax checkpoints load as they
are. The statistics come from :func:`regjax.batch_norm`, which stays accurate
when ``|mean| >> std``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from regjax import normalization as F
from regjax._checks import canonical_axes, resolve_deterministic_alias

Initializer = Any


class BatchNorm(nn.Module):
  """Batch normalization with running statistics in the ``batch_stats`` collection.

  Attributes match ``flax.linen.BatchNorm``; in addition:
    deterministic: eval mode if True; an alias of ``use_running_average``
      (either may be set, on the module or at call).
    unbiased_running_var: store the unbiased batch variance in the running
      variance (PyTorch's convention; its ``momentum=0.1`` is ``0.9`` here).

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
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  deterministic: bool | None = None
  unbiased_running_var: bool = False
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    deterministic: bool | None = None,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    deterministic = nn.merge_param(
      "deterministic",
      resolve_deterministic_alias(
        self.deterministic, self.use_running_average, "module attributes"
      ),
      resolve_deterministic_alias(deterministic, use_running_average, "call arguments"),
    )
    feature_axes = canonical_axes(self.axis, x.ndim, "BatchNorm")
    feature_shape = tuple(x.shape[a] for a in feature_axes)

    stats_dtype = F.running_stats_dtype(self.param_dtype, self.force_float32_reductions)
    ra_mean = self.variable(
      "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    )
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape)
    scale = (
      self.param("scale", self.scale_init, feature_shape, self.param_dtype)
      if self.use_scale
      else None
    )
    bias = (
      self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None
    )

    initializing = self.is_initializing()
    y, new_stats = F.batch_norm(
      x,
      {"mean": ra_mean.value, "var": ra_var.value},
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
    )
    if not deterministic and not initializing:
      ra_mean.value = new_stats["mean"]
      ra_var.value = new_stats["var"]
    return y

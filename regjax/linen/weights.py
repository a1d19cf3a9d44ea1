"""Linen wrapper of :func:`regjax.dropconnect_dense`: a drop-in ``flax.linen.Dense``.

``DropConnect`` has ``Dense``'s fields, parameters (``kernel`` of shape
``(in, features)``, ``bias``) and eval-mode arithmetic, so a ``Dense``
checkpoint loads into it unchanged; it adds ``rate``, ``deterministic``,
``rng_collection`` and ``rng_impl``. A train-mode call with no
``rng_collection`` stream raises instead of drawing from ``'params'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PrecisionLike
from jax.typing import ArrayLike

from regjax import _specs
from regjax import weights as F
from regjax._types import RngImpl
from regjax.linen._common import noise_key


class DropConnect(nn.Module):
  """``flax.linen.Dense`` with DropConnect on its kernel (Wan et al. 2013).

  Train mode: ``y = x @ (W * M) / (1 - rate) + b`` with one Bernoulli mask
  ``M`` per call; eval mode: exactly ``nn.Dense``'s ``x @ W + b``. See
  :func:`regjax.dropconnect_dense`.

  Attributes:
    features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
      promote_dtype, dot_general, dot_general_cls: as in ``flax.linen.Dense``.
    rate: probability of dropping a weight (default 0.5, Wan et al.'s
      setting; a default is needed because it follows Dense's fields).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  promote_dtype: Callable[..., Any] = promote_dtype
  dot_general: Callable[..., jax.Array] | None = None
  dot_general_cls: Any = None
  rate: float = 0.5
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    kernel = self.param(
      "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
    )
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    # dot_general None: jax.lax.dot_general
    dot_general = self.dot_general_cls() if self.dot_general_cls is not None else self.dot_general
    key = noise_key(self, deterministic, rng, _specs.DROPCONNECT.needs_no_draw(self.rate))
    return F.dropconnect_dense(
      inputs,
      kernel,
      bias,
      self.rate,
      key=key,
      deterministic=deterministic,
      precision=self.precision,
      dot_general=dot_general,
      rng_impl=self.rng_impl,
    )

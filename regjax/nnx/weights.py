"""NNX wrapper of :func:`regjax.dropconnect_dense`: a drop-in ``flax.nnx.Linear``.

``DropConnect`` takes ``nnx.Linear``'s arguments and makes the same
parameters from the same ``rngs.params()`` draws (``kernel`` of shape
``(in_features, out_features)``, ``bias``), so an ``nnx.Linear`` state loads
into it unchanged and eval mode computes exactly ``nnx.Linear``'s output. It
adds ``rate``, ``deterministic``, ``rng_collection`` and ``rng_impl``, with the
``flax.nnx.Dropout`` conventions of :mod:`regjax.nnx.stochastic`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike, PromoteDtypeFn
from jax.typing import ArrayLike

from regjax import _specs
from regjax import weights as F
from regjax._types import RngImpl
from regjax.nnx._common import NoiseModule, RngsArg


class DropConnect(NoiseModule):
  """``flax.nnx.Linear`` with DropConnect on its kernel (Wan et al. 2013).

  Train mode: ``y = x @ (W * M) / (1 - rate) + b`` with one Bernoulli mask
  ``M`` per call; eval mode: exactly ``nnx.Linear``'s ``x @ W + b``. See
  :func:`regjax.dropconnect_dense`.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision,
      kernel_init, bias_init, dot_general, promote_dtype,
      preferred_element_type, rngs, kernel_metadata, bias_metadata: as in
      ``flax.nnx.Linear``. ``rngs`` also gives the mask stream: a fork of
      ``rngs[rng_collection]`` is kept if it has that stream.
    rate: probability of dropping a weight, in ``[0, 1]`` (default 0.5, Wan
      et al.'s setting, as in :class:`regjax.linen.DropConnect`).
    deterministic: eval mode if True; switched by ``model.train()`` /
      ``model.eval()`` / ``nnx.view``; a value given at call takes precedence.
    rng_collection: the ``nnx.Rngs`` stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: Callable[..., jax.Array] = jax.lax.dot_general,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    rate: float | jax.Array = 0.5,
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
  ):
    self._strength(_specs.DROPCONNECT, rate)  # checked before any param is drawn
    # The same draws, in the same order, as nnx.Linear.
    self.kernel = nnx.Param(
      kernel_init(rngs.params(), (in_features, out_features), param_dtype), **kernel_metadata
    )
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.dot_general = dot_general
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.rate = rate
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self,
    inputs: ArrayLike,
    out_sharding=None,
    *,
    deterministic: bool | None = None,
    rngs: RngsArg = None,
  ) -> jax.Array:
    """``inputs @ kernel + bias``, with a dropped-out kernel in train mode.

    Args:
      inputs: ``(..., in_features)``.
      out_sharding: as in ``nnx.Linear``.
      deterministic: eval mode if True; takes precedence over the attribute.
      rngs: a key, ``RngStream`` or ``Rngs``; overrides the kept stream.
    """
    deterministic = self._deterministic(deterministic)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    dot_general_kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      dot_general_kwargs["preferred_element_type"] = self.preferred_element_type
    key = self._key(deterministic, rngs, _specs.DROPCONNECT.needs_no_draw(self.rate))
    return F.dropconnect_dense(
      inputs,
      kernel,
      bias,
      self.rate,
      key=key,
      deterministic=deterministic,
      precision=self.precision,
      rng_impl=self.rng_impl,
      dot_general=functools.partial(self.dot_general, **dot_general_kwargs),
    )

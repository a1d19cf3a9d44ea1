"""Linen wrappers of the noise ops, drop-in for ``flax.linen.Dropout``.

Unlike flax, a module in train mode with no ``rng_collection`` stream raises
instead of silently drawing its mask from the ``'params'`` stream (see
:mod:`regjax.linen._common`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.typing import ArrayLike

from regjax import _specs
from regjax import stochastic as F
from regjax._types import RngImpl
from regjax.linen._common import apply_noise
from regjax.linen._common import noise_key as noise_key  # importable from its former home


class Dropout(nn.Module):
  """Inverted dropout; see :func:`regjax.dropout`. Same fields as ``flax.linen.Dropout``.

  Attributes:
    rate: probability of dropping a unit (not the keep rate).
    broadcast_dims: axes that share one mask (flax's name: the shared axes, not
      a channel axis as :class:`ChannelDropout`'s ``channel_axis``).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``, the same mask as ``flax.linen.Dropout``); see
      :func:`regjax.dropout`.
    inverted: True (default): inverted dropout; False: classic dropout, train
      ``x * m`` and eval ``x * (1 - rate)`` (see :func:`regjax.dropout`).
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"
  inverted: bool = True

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.dropout,
      _specs.DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rng,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
      inverted=self.inverted,
    )


class GaussianDropout(nn.Module):
  """Multiplicative N(1, rate/(1-rate)) noise; see :func:`regjax.gaussian_dropout`."""

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.gaussian_dropout,
      _specs.GAUSSIAN_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rng,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class Uout(nn.Module):
  """Uniform multiplicative noise ``x * (1 + U(-beta, beta))``; see :func:`regjax.uout`."""

  beta: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.uout,
      _specs.UOUT,
      self.beta,
      inputs,
      deterministic,
      rng,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

"""Linen wrappers of :mod:`regjax.affine_noise`: alpha dropout and additive Gaussian noise.

Like every regjax noise module, a module in train mode with no
``rng_collection`` stream raises instead of drawing from ``'params'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.typing import ArrayLike

from regjax import _specs
from regjax import affine_noise as F
from regjax._types import RngImpl
from regjax.linen._common import apply_noise


class AlphaDropout(nn.Module):
  """Alpha dropout for SELU networks; see :func:`regjax.alpha_dropout`.

  Attributes:
    rate: probability of dropping a unit.
    broadcast_dims: axes that share one mask.
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.alpha_dropout`.
  """

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
      F.alpha_dropout,
      _specs.ALPHA_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rng,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class GaussianNoise(nn.Module):
  """Additive ``N(0, stddev**2)`` noise, Keras ``GaussianNoise``; see :func:`regjax.gaussian_noise`.

  Attributes:
    stddev: standard deviation of the noise.
    broadcast_dims: axes that share one noise draw.
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the noise is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.gaussian_noise`.
  """

  stddev: float
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
      F.gaussian_noise,
      _specs.GAUSSIAN_NOISE,
      self.stddev,
      inputs,
      deterministic,
      rng,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

"""Flax linen modules wrapping the regjax functions (drop-in for flax.linen)."""

from regjax.linen.affine_noise import AlphaDropout, GaussianNoise
from regjax.linen.normalization import BatchNorm, BatchRenorm
from regjax.linen.stochastic import Dropout, GaussianDropout, Uout
from regjax.linen.structured import (
  ChannelDropout,
  Cutout,
  DropBlock,
  DropPath,
  JoinDropPath,
  RandomErasing,
)
from regjax.linen.weights import DropConnect

__all__ = [
  "AlphaDropout",
  "BatchNorm",
  "BatchRenorm",
  "ChannelDropout",
  "Cutout",
  "DropBlock",
  "DropConnect",
  "DropPath",
  "Dropout",
  "GaussianDropout",
  "GaussianNoise",
  "JoinDropPath",
  "RandomErasing",
  "Uout",
]

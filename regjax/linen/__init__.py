"""Flax linen modules wrapping the regjax functions (drop-in for flax.linen)."""

from regjax.linen.normalization import BatchNorm
from regjax.linen.stochastic import Dropout, GaussianDropout, Uout

__all__ = ["BatchNorm", "Dropout", "GaussianDropout", "Uout"]

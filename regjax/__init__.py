"""regjax: regularization layers for JAX, with train/eval behaviour done right.

The functions here are pure and know nothing of Flax; ``regjax.linen`` wraps
them as Flax linen modules (imported on first use, so ``import regjax`` does
not import Flax).
"""

import importlib

from regjax.stochastic import (
    dropout,
    dropout_noise_variance,
    gaussian_dropout,
    matched_uout_beta,
    uout,
    uout_noise_variance,
)
from regjax.normalization import BatchStats, batch_norm, init_batch_stats

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "batch_norm",
    "dropout",
    "dropout_noise_variance",
    "gaussian_dropout",
    "init_batch_stats",
    "matched_uout_beta",
    "uout",
    "uout_noise_variance",
]

_SUBMODULES = ("linen",)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"regjax.{name}")
  raise AttributeError(f"module 'regjax' has no attribute {name!r}")

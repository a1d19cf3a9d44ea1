"""regjax: regularization layers for JAX, with train/eval behaviour done right.

The functions here are pure and know nothing of Flax; ``regjax.linen`` wraps
them as Flax linen modules, ``regjax.nnx`` as Flax NNX modules and
``regjax.equinox`` as Equinox modules (each imported on first use, so
``import regjax`` imports neither Flax nor Equinox).
"""

import importlib

from regjax import random
from regjax.affine_noise import alpha_dropout, gaussian_noise
from regjax.constraints import default_max_norm_filter, max_norm, max_norm_projection
from regjax.normalization import BatchStats, batch_norm, init_batch_stats
from regjax.penalties import l1_penalty, l2_penalty
from regjax.renorm import batch_renorm
from regjax.stochastic import (
  dropout,
  dropout_noise_variance,
  gaussian_dropout,
  matched_uout_beta,
  uout,
  uout_noise_variance,
)
from regjax.structured import (
  channel_dropout,
  cutout,
  drop_path,
  drop_path_rates,
  dropblock,
  dropblock_rate_schedule,
  join_drop_path,
  random_erasing,
)
from regjax.weights import dropconnect_dense

__version__ = "0.1.0"

__all__ = [
  "BatchStats",
  "alpha_dropout",
  "batch_norm",
  "batch_renorm",
  "channel_dropout",
  "cutout",
  "default_max_norm_filter",
  "drop_path",
  "drop_path_rates",
  "dropblock",
  "dropblock_rate_schedule",
  "dropconnect_dense",
  "dropout",
  "dropout_noise_variance",
  "gaussian_dropout",
  "gaussian_noise",
  "init_batch_stats",
  "join_drop_path",
  "l1_penalty",
  "l2_penalty",
  "matched_uout_beta",
  "max_norm",
  "max_norm_projection",
  "random",
  "random_erasing",
  "uout",
  "uout_noise_variance",
]

_SUBMODULES = ("linen", "nnx", "equinox", "diagnostics")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"regjax.{name}")
  raise AttributeError(f"module 'regjax' has no attribute {name!r}")

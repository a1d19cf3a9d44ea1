"""Flax NNX modules wrapping the regjax functions (drop-in for flax.nnx).

Each module delegates to the pure function of the same name in ``regjax`` and
imports the functional core, never ``regjax.linen``. The noise modules follow
``flax.nnx.Dropout``'s conventions (``rngs=nnx.Rngs(dropout=...)`` at
construction, ``rngs=`` and ``deterministic=`` at call, switched by
``model.train()`` / ``model.eval()`` / ``nnx.view``), except that they never
draw from a stream other than their ``rng_collection``.
"""

from regjax.nnx.affine_noise import AlphaDropout, GaussianNoise
from regjax.nnx.normalization import BatchNorm, BatchRenorm
from regjax.nnx.stochastic import Dropout, GaussianDropout, Uout
from regjax.nnx.structured import (
  ChannelDropout,
  Cutout,
  DropBlock,
  DropPath,
  JoinDropPath,
  RandomErasing,
)
from regjax.nnx.weights import DropConnect

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

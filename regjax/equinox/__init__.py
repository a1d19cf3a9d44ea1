"""Equinox modules wrapping the regjax functions (drop-in for ``equinox.nn``).

Needs equinox (``pip install regjax[equinox]``); ``import regjax`` does not
import it. :class:`Dropout` and :class:`BatchNorm` are drop-ins for
``eqx.nn.Dropout`` and ``eqx.nn.BatchNorm`` (``mode='batch'``), and
:class:`DropConnect` for ``eqx.nn.Linear``; every module follows their
conventions: an ``inference`` field switched by ``eqx.nn.inference_mode``,
``__call__(x, *, key=None, inference=None)``, noise drawn from the one key
given at the call (the caller splits keys), running statistics in an
``eqx.nn.State``.
"""

from regjax.equinox.affine_noise import AlphaDropout, GaussianNoise
from regjax.equinox.normalization import BatchNorm, BatchRenorm
from regjax.equinox.stochastic import Dropout, GaussianDropout, Uout
from regjax.equinox.structured import (
  ChannelDropout,
  Cutout,
  DropBlock,
  DropPath,
  JoinDropPath,
  RandomErasing,
)
from regjax.equinox.weights import DropConnect

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

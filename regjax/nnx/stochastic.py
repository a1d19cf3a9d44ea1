"""NNX wrappers of the noise ops, drop-in for ``flax.nnx.Dropout``.

Same constructor and call signature as ``nnx.Dropout``: the module is built
with ``rngs=nnx.Rngs(dropout=...)`` and keeps a fork of the ``'dropout'``
stream; a key, ``RngStream`` or ``Rngs`` given at call takes precedence;
``model.train()`` / ``model.eval()`` / ``nnx.view(model, deterministic=...)``
switch the ``deterministic`` attribute.

Unlike flax, a module never draws its noise from a stream other than its
``rng_collection``: an ``nnx.Rngs`` without a ``'dropout'`` stream is not
silently replaced by its ``'default'`` stream, and a train-mode call with no
key raises a ``ValueError`` that names the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from regjax import _specs
from regjax import stochastic as F
from regjax._types import RngImpl
from regjax.nnx._common import NoiseModule, RngsArg, hashable


class Dropout(NoiseModule):
  """Inverted dropout; see :func:`regjax.dropout`. Same arguments as ``flax.nnx.Dropout``.

  Args:
    rate: probability of dropping a unit (not the keep rate), in ``[0, 1]``.
    broadcast_dims: axes that share one mask (flax's name: the shared axes, not
      a channel axis as :class:`regjax.nnx.ChannelDropout`'s ``channel_axis``).
    deterministic: eval mode if True; switched by ``model.train()`` /
      ``model.eval()`` / ``nnx.view``; a value given at call takes precedence.
    rng_collection: the ``nnx.Rngs`` stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
    rngs: an ``nnx.Rngs`` with a ``rng_collection`` stream (a fork of it is
      kept), an ``nnx.RngStream``, or None (then a key must be given at call
      in train mode).
    inverted: True (default): inverted dropout; False: classic dropout, train
      ``x * m`` and eval ``x * (1 - rate)`` (see :func:`regjax.dropout`).
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
    inverted: bool = True,
  ):
    self.rate = self._strength(_specs.DROPOUT, rate)
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = self._rng_impl(rng_impl)
    if not isinstance(inverted, (bool, np.bool_)):
      raise TypeError(f"{self._op_name()}: `inverted` must be a bool; got {inverted!r}.")
    self.inverted = bool(inverted)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies dropout; ``rngs`` (a key, stream or Rngs) overrides the kept stream."""
    return self._call_noise(
      F.dropout,
      _specs.DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rngs,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
      inverted=self.inverted,
    )


class GaussianDropout(NoiseModule):
  """Multiplicative N(1, rate/(1-rate)) noise; see :func:`regjax.gaussian_dropout`.

  Arguments as :class:`Dropout`; ``rate`` is in ``[0, 1)``.
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.rate = self._strength(_specs.GAUSSIAN_DROPOUT, rate)
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies Gaussian dropout; ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.gaussian_dropout,
      _specs.GAUSSIAN_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rngs,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class Uout(NoiseModule):
  """Uniform multiplicative noise ``x * (1 + U(-beta, beta))``; see :func:`regjax.uout`.

  Arguments as :class:`Dropout`, with ``beta >= 0`` (the noise half-width) in
  place of ``rate``.
  """

  def __init__(
    self,
    beta: float | jax.Array,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.beta = self._strength(_specs.UOUT, beta)
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies Uout noise; ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.uout,
      _specs.UOUT,
      self.beta,
      inputs,
      deterministic,
      rngs,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

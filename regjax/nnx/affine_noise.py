"""NNX wrappers of :mod:`regjax.affine_noise`: alpha dropout and additive Gaussian noise.

Constructor and call follow ``flax.nnx.Dropout`` (see :mod:`regjax.nnx.stochastic`);
a train-mode module never draws from a stream other than its ``rng_collection``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.typing import ArrayLike

from regjax import _specs
from regjax import affine_noise as F
from regjax._types import RngImpl
from regjax.nnx._common import NoiseModule, RngsArg, hashable


class AlphaDropout(NoiseModule):
  """Alpha dropout for SELU networks; see :func:`regjax.alpha_dropout`.

  Args:
    rate: probability of dropping a unit, in ``[0, 1]``.
    broadcast_dims: axes that share one mask.
    deterministic: eval mode if True; switched by ``model.train()`` /
      ``model.eval()`` / ``nnx.view``; a value given at call takes precedence.
    rng_collection: the ``nnx.Rngs`` stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.alpha_dropout`.
    rngs: an ``nnx.Rngs`` with a ``rng_collection`` stream, an
      ``nnx.RngStream``, or None (then a key must be given at call).
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
    self.rate = self._strength(_specs.ALPHA_DROPOUT, rate)
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies alpha dropout; ``rngs`` (a key, stream or Rngs) overrides the kept stream."""
    return self._call_noise(
      F.alpha_dropout,
      _specs.ALPHA_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rngs,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class GaussianNoise(NoiseModule):
  """Additive ``N(0, stddev**2)`` noise; see :func:`regjax.gaussian_noise`.

  Keras ``GaussianNoise``.

  Arguments as :class:`AlphaDropout`, with ``stddev >= 0`` in place of ``rate``.
  """

  def __init__(
    self,
    stddev: float | jax.Array,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.stddev = self._strength(_specs.GAUSSIAN_NOISE, stddev)
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Adds the noise; ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.gaussian_noise,
      _specs.GAUSSIAN_NOISE,
      self.stddev,
      inputs,
      deterministic,
      rngs,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

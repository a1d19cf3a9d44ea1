"""Equinox modules of :mod:`regjax.affine_noise`: alpha dropout and additive Gaussian noise.

Conventions of ``equinox.nn.Dropout`` (see :mod:`regjax.equinox._common`).
"""

from __future__ import annotations

import equinox as eqx
import jax

from regjax import _specs
from regjax import affine_noise as F
from regjax._types import RngImpl
from regjax.equinox._common import apply_noise, check_init, hashable


class AlphaDropout(eqx.Module):
  """Alpha dropout for SELU networks; see :func:`regjax.alpha_dropout`.

  Attributes:
    rate: probability of dropping a unit, in ``[0, 1]``.
    inference: inference mode (``y = x``) if True; overridden at call.
    broadcast_dims: axes that share one mask (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  broadcast_dims: tuple[int, ...] = eqx.field(static=True, default=(), converter=hashable)
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.ALPHA_DROPOUT, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Alpha dropout of ``x``; ``key`` is required in training mode unless ``rate`` is 0 or 1."""
    return apply_noise(
      self,
      F.alpha_dropout,
      _specs.ALPHA_DROPOUT,
      self.rate,
      x,
      inference,
      key,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class GaussianNoise(eqx.Module):
  """Additive ``N(0, stddev**2)`` noise, Keras ``GaussianNoise``; see :func:`regjax.gaussian_noise`.

  Attributes:
    stddev: standard deviation of the noise, ``>= 0``.
    inference: inference mode (``y = x``) if True; overridden at call.
    broadcast_dims: axes that share one draw (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  stddev: float | jax.Array
  inference: bool = False
  broadcast_dims: tuple[int, ...] = eqx.field(static=True, default=(), converter=hashable)
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.GAUSSIAN_NOISE, self.stddev)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """``x`` plus noise; ``key`` is required in training mode unless ``stddev`` is 0."""
    return apply_noise(
      self,
      F.gaussian_noise,
      _specs.GAUSSIAN_NOISE,
      self.stddev,
      x,
      inference,
      key,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

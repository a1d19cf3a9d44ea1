"""Equinox modules of the multiplicative noise ops, drop-in for ``equinox.nn.Dropout``.

:class:`Dropout` has ``eqx.nn.Dropout``'s fields (``p``, ``inference``),
constructor (``Dropout(p=0.5, inference=False)``) and call
(``dropout(x, *, key=None, inference=None)``); the mask comes from
:func:`regjax.dropout`. See :mod:`regjax.equinox._common` for the conventions
(one key per call, split by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax

from regjax import _specs
from regjax import stochastic as F
from regjax._types import RngImpl
from regjax.equinox._common import apply_noise, check_init, hashable


class Dropout(eqx.Module):
  """Inverted dropout; see :func:`regjax.dropout`. Drop-in for ``eqx.nn.Dropout``.

  Training: ``y = x * m / (1 - p)``, ``m ~ Bernoulli(1 - p)`` per element (per
  group of ``broadcast_dims``), drawn from the call's ``key``; inference:
  ``y = x``. ``p == 0`` needs no key in either mode, as in equinox.

  Attributes:
    p: probability of dropping a unit (equinox's name; regjax's functions and
      Flax modules call it ``rate``, which the constructor also accepts and
      which is a read-only alias of ``p``).
    inference: inference mode (no dropout) if True; overridden by the call's
      ``inference``; switched by ``eqx.nn.inference_mode``.
    broadcast_dims: axes that share one mask (static).
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout` (static).
    inverted: True (default): inverted dropout; False: classic dropout, train
      ``x * m`` and inference ``x * (1 - p)`` (static).
  """

  p: float | jax.Array
  inference: bool
  broadcast_dims: tuple[int, ...] = eqx.field(static=True)
  rng_impl: RngImpl = eqx.field(static=True)
  inverted: bool = eqx.field(static=True)

  def __init__(
    self,
    p: float | jax.Array | None = None,
    inference: bool = False,
    *,
    rate: float | jax.Array | None = None,
    broadcast_dims: Sequence[int] = (),
    rng_impl: RngImpl = "hash",
    inverted: bool = True,
  ):
    if p is not None and rate is not None:
      raise TypeError(
        "regjax.equinox.Dropout: pass the drop probability as `p` or `rate`, not both."
      )
    self.p = 0.5 if p is None and rate is None else (p if p is not None else rate)  # type: ignore[assignment]
    self.inference = inference
    self.broadcast_dims = hashable(broadcast_dims)
    self.rng_impl = rng_impl
    self.inverted = inverted

  def __check_init__(self):
    check_init(self, _specs.DROPOUT, self.p)
    if not isinstance(self.inverted, bool):
      raise TypeError(f"regjax.equinox.Dropout: `inverted` must be a bool; got {self.inverted!r}.")

  @property
  def rate(self) -> float | jax.Array:
    """``p``, under the name regjax's functions and Flax modules use."""
    return self.p

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Dropout of ``x`` (any shape: one example under ``jax.vmap``, or a batch).

    Args:
      x: floating-point array.
      key: PRNG key, required in training mode (unless ``p`` is 0 or 1).
      inference: overrides the field if given.
    """
    return apply_noise(
      self,
      F.dropout,
      _specs.DROPOUT,
      self.p,
      x,
      inference,
      key,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
      inverted=self.inverted,
    )


class GaussianDropout(eqx.Module):
  """Multiplicative ``N(1, rate / (1 - rate))`` noise; see :func:`regjax.gaussian_dropout`.

  Attributes:
    rate: the dropout rate whose noise variance it matches, in ``[0, 1)``.
    inference: inference mode (``y = x``) if True; overridden at call.
    broadcast_dims: axes that share one draw (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  broadcast_dims: tuple[int, ...] = eqx.field(static=True, default=(), converter=hashable)
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.GAUSSIAN_DROPOUT, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Noisy ``x``; ``key`` is required in training mode unless ``rate`` is 0."""
    return apply_noise(
      self,
      F.gaussian_dropout,
      _specs.GAUSSIAN_DROPOUT,
      self.rate,
      x,
      inference,
      key,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )


class Uout(eqx.Module):
  """Uniform multiplicative noise ``x * (1 + U(-beta, beta))``; see :func:`regjax.uout`.

  Attributes:
    beta: half-width of the noise, ``>= 0``.
    inference: inference mode (``y = x``) if True; overridden at call.
    broadcast_dims: axes that share one draw (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  beta: float | jax.Array
  inference: bool = False
  broadcast_dims: tuple[int, ...] = eqx.field(static=True, default=(), converter=hashable)
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.UOUT, self.beta)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Noisy ``x``; ``key`` is required in training mode unless ``beta`` is 0."""
    return apply_noise(
      self,
      F.uout,
      _specs.UOUT,
      self.beta,
      x,
      inference,
      key,
      broadcast_dims=self.broadcast_dims,
      rng_impl=self.rng_impl,
    )

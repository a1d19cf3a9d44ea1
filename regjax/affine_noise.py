"""Noise that is not mean-1 multiplicative: alpha dropout and additive Gaussian noise.

::

    alpha_dropout(rate)    a * (x * m + alpha_p * (1 - m)) + b,  m ~ Bernoulli(1 - rate)
    gaussian_noise(std)    x + std * e,  e ~ N(0, 1)

Alpha dropout keeps the mean 0 and variance 1 of a standard-normal input (the
fixed point of a SELU network); additive noise leaves the mean and adds
``std**2`` to the variance. Both follow the common contract of
:mod:`regjax.stochastic`: explicit key, ``deterministic=True`` or a concretely
zero rate returns ``x`` itself without a key, output in ``x``'s shape and
dtype (half precision computed in float32 and rounded once), the same key gives
the same draw with and without ``jit``, and a traced rate is clipped into the
valid range instead of being checked (a traced NaN or +-inf returns ``x``).

They take the same ``rng_impl`` as the multiplicative ops. ``'hash'``
(default) is the generator of :mod:`regjax.random`, fused into the
elementwise op: alpha dropout's mask ``m`` is
:func:`regjax.random.bernoulli_from_bits` of the key's words (16-bit
threshold: the realised keep probability is ``round((1 - rate) * 2**16) /
2**16``), exactly the mask :func:`regjax.dropout` draws from the same key;
Gaussian noise's ``e`` is :func:`regjax.random.normal_from_bits`
(``sqrt(2) * erf_inv`` of a 24-bit uniform, tails cut at ~5.4 sigma). No
random array is written to memory: alpha dropout then costs about a copy of
the array, Gaussian noise (dominated by ``erf_inv``) about as much as
``gaussian_dropout``; the backward recomputes the noise from the seed words
(``jax.checkpoint``), storing nothing per element. ``'jax'`` draws with
``jax.random``: ``m = jax.random.bernoulli(key, 1 - rate, shape)``
(``regjax.dropout``'s mask with ``rng_impl='jax'``) and ``e =
jax.random.normal(key, shape)``; threefry makes it several times slower on a
CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from regjax import _noise, _random, _specs, random
from regjax._types import RngImpl

__all__ = ["alpha_dropout", "gaussian_noise", "SELU_ALPHA", "SELU_LAMBDA"]

# SELU constants (Klambauer et al. 2017, eq. 14), as in Keras and PyTorch.
SELU_ALPHA = 1.6732632423543772
SELU_LAMBDA = 1.0507009873554805
# The value a dropped unit takes: SELU's negative saturation, -lambda * alpha.
_ALPHA_P = -SELU_LAMBDA * SELU_ALPHA


@dataclasses.dataclass(frozen=True)
class _AlphaDropout(_noise.NoiseRule):
  """``where(m, a * x + b, a * alpha_p + b)``, ``m ~ Bernoulli(1 - rate)``."""

  def param(self, rate):
    rate = jnp.clip(rate, 0.0, 1.0)
    keep = 1.0 - rate
    # No product feeds an addition here, and b is a quotient: XLA may fuse a multiply
    # and an add into one multiply-add in one program and not in another, and the only
    # such pair left is a * x + b (see regjax._noise). spread = 1 + rate * alpha_p**2.
    spread = (rate + 1.0 / _ALPHA_P**2) * _ALPHA_P**2
    # a is infinite at keep == 0 although no unit is kept; a finite stand-in keeps
    # the gradient through the (unselected) kept branch 0 instead of 0 * inf.
    root = jnp.sqrt(jnp.where(keep > 0, keep, 1.0) * spread)
    a = 1.0 / root
    b = (-_ALPHA_P * rate) / root  # = -a * alpha_p * rate
    dropped_value = _ALPHA_P * jnp.sqrt(keep / spread)  # = a * alpha_p + b, finite at keep 0
    return keep, a, b, dropped_value

  def from_words(self, x, words, param):
    keep, a, b, dropped_value = param
    return jnp.where(random.bernoulli_from_bits(words, keep), a * x + b, dropped_value)

  def from_key(self, x, key, noise_shape, param):
    keep, a, b, dropped_value = param
    return jnp.where(_random.bernoulli(key, keep, noise_shape), a * x + b, dropped_value)


@dataclasses.dataclass(frozen=True)
class _GaussianNoise(_noise.NoiseRule):
  """``x + stddev * e``, ``e ~ N(0, 1)``."""

  def param(self, stddev):
    return jnp.maximum(stddev, 0.0)

  def from_words(self, x, words, stddev):
    return x + stddev * random.normal_from_bits(words, x.dtype)

  def from_key(self, x, key, noise_shape, stddev):
    return x + stddev * _random.normal(key, noise_shape, x.dtype)


def alpha_dropout(
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: RngImpl = "hash",
) -> jax.Array:
  """Alpha dropout for self-normalizing (SELU) networks (Klambauer et al. 2017).

  Train mode, with ``m ~ Bernoulli(1 - rate)``, ``alpha_p = -lambda * alpha``::

      y = a * (x * m + alpha_p * (1 - m)) + b
      a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5,   b = -a * alpha_p * rate

  A dropped unit is set to SELU's saturation value ``alpha_p`` instead of 0,
  and the affine map ``a, b`` restores mean 0 and variance 1 for an input with
  mean 0 and variance 1 (Keras ``AlphaDropout``, torch ``nn.AlphaDropout``).
  Eval mode returns ``x``.

  ``rate == 1`` returns zeros: every unit then takes the value
  ``a * alpha_p + b = alpha_p * sqrt((1 - rate) / (1 + rate * alpha_p**2))``,
  whose limit at ``rate -> 1`` is 0 (also torch's choice; Keras returns ``x``
  unchanged). Gradients are 0 there, never NaN.

  Args:
    x: floating-point array.
    rate: probability of dropping a unit, in ``[0, 1]``. A traced rate is
      clipped to ``[0, 1]``; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one mask draw (Keras' ``noise_shape``).
    rng_impl: ``'hash'`` (default): the fused counter-hash generator, whose
      realised keep probability is ``round((1 - rate) * 2**16) / 2**16``
      (resolution ``2**-16``; a rate of ``1 - 2**-17`` or more drops everything)
      and whose backward recomputes the mask from the key; ``'jax'``:
      ``jax.random.bernoulli(key, 1 - rate, shape)``.

  Returns:
    An array with ``x``'s shape and dtype. The mask is the one
    :func:`regjax.dropout` draws from the same key with the same ``rng_impl``:
    with ``'hash'``, ``regjax.random.bernoulli(key, 1 - rate, shape)``; with
    ``'jax'``, ``jax.random.bernoulli(key, 1 - rate, shape)``. ``a``,
    ``b`` and ``alpha_p`` are the exact constants for ``rate`` (with ``'hash'``
    the output moments are therefore off by the ``2**-17`` keep resolution).
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  return _noise.elementwise_op(
    "regjax.alpha_dropout",
    _specs.ALPHA_DROPOUT,
    _AlphaDropout,
    x,
    rate,
    key,
    deterministic,
    broadcast_dims,
    rng_impl,
  )


def gaussian_noise(
  x: ArrayLike,
  stddev: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: RngImpl = "hash",
) -> jax.Array:
  """Additive Gaussian noise (Keras ``GaussianNoise``).

  Train mode: ``y = x + stddev * e``, ``e ~ N(0, 1)``, so ``E[y] = x`` and
  ``Var[y] = Var[x] + stddev**2``. Unlike the multiplicative ops the noise does
  not scale with ``x``. Eval mode returns ``x``.

  Args:
    x: floating-point array.
    stddev: standard deviation of the noise, in ``[0, inf)``. A traced value
      is clipped below at 0; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``stddev`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator, ``e =
      regjax.random.normal(key, shape)`` (``sqrt(2) * erf_inv`` of a uniform on
      the midpoints of a 24-bit grid of ``(-1, 1)``, tails cut at ~5.4 sigma),
      recomputed from the key in the backward; ``'jax'``:
      ``e = jax.random.normal(key, shape)``.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  return _noise.elementwise_op(
    "regjax.gaussian_noise",
    _specs.GAUSSIAN_NOISE,
    _GaussianNoise,
    x,
    stddev,
    key,
    deterministic,
    broadcast_dims,
    rng_impl,
  )

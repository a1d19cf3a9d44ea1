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
valid range instead of being checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regjax import _checks, _random
from regjax.stochastic import _compute_dtype, _is_identity, _prepare, _trivial_dropout

__all__ = ["alpha_dropout", "gaussian_noise", "SELU_ALPHA", "SELU_LAMBDA"]

# SELU constants (Klambauer et al. 2017, eq. 14), as in Keras and PyTorch.
SELU_ALPHA = 1.6732632423543772
SELU_LAMBDA = 1.0507009873554805
# The value a dropped unit takes: SELU's negative saturation, -lambda * alpha.
_ALPHA_P = -SELU_LAMBDA * SELU_ALPHA


def alpha_dropout(
    x: jax.Array,
    rate: float | jax.Array,
    *,
    key: jax.Array | None = None,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
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
      clipped to ``[0, 1]``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one mask draw (Keras' ``noise_shape``).

  Returns:
    An array with ``x``'s shape and dtype. The mask is
    ``jax.random.bernoulli(key, 1 - rate, shape)``, the mask
    :func:`regjax.dropout` draws from the same key with ``rng_impl='jax'``.
  """
  op = "regjax.alpha_dropout"
  deterministic, noise_shape = _prepare(x, key, deterministic, broadcast_dims, op)
  rate = _checks.check_rate(rate, op, "rate", low=0.0, high=1.0, high_inclusive=True)
  trivial = _trivial_dropout(x, rate, deterministic)
  if trivial is not None:
    return trivial
  _checks.check_key(key, op)
  compute_dtype = _compute_dtype(x.dtype)
  rate = jnp.clip(jnp.asarray(rate, compute_dtype), 0.0, 1.0)
  keep = 1.0 - rate
  spread = 1.0 + rate * _ALPHA_P**2
  # a is infinite at keep == 0 although no unit is kept; a finite stand-in keeps
  # the gradient through the (unselected) kept branch 0 instead of 0 * inf.
  a = jax.lax.rsqrt(jnp.where(keep > 0, keep, 1.0) * spread)
  b = -a * _ALPHA_P * rate
  dropped_value = _ALPHA_P * jnp.sqrt(keep / spread)  # = a * alpha_p + b, finite at keep == 0
  mask = _random.bernoulli(key, keep, noise_shape)
  y = jnp.where(mask, a * x.astype(compute_dtype) + b, dropped_value)
  return y.astype(x.dtype)


def gaussian_noise(
    x: jax.Array,
    stddev: float | jax.Array,
    *,
    key: jax.Array | None = None,
    deterministic: bool = False,
    broadcast_dims: Sequence[int] = (),
) -> jax.Array:
  """Additive Gaussian noise (Keras ``GaussianNoise``).

  Train mode: ``y = x + stddev * e``, ``e ~ N(0, 1)``, so ``E[y] = x`` and
  ``Var[y] = Var[x] + stddev**2``. Unlike the multiplicative ops the noise does
  not scale with ``x``. Eval mode returns ``x``.

  Args:
    x: floating-point array.
    stddev: standard deviation of the noise, in ``[0, inf)``. A traced value
      is clipped below at 0.
    key: PRNG key; required in train mode unless ``stddev`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
  """
  op = "regjax.gaussian_noise"
  deterministic, noise_shape = _prepare(x, key, deterministic, broadcast_dims, op)
  stddev = _checks.check_rate(stddev, op, "stddev", low=0.0, high=math.inf,
                              high_inclusive=False)
  if _is_identity(stddev, deterministic):
    return x
  _checks.check_key(key, op)
  compute_dtype = _compute_dtype(x.dtype)
  stddev = jnp.maximum(jnp.asarray(stddev, compute_dtype), 0.0)
  noise = _random.normal(key, noise_shape, compute_dtype)
  return (x.astype(compute_dtype) + stddev * noise).astype(x.dtype)

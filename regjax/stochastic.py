"""Multiplicative-noise regularizers: inverted dropout, Gaussian dropout, Uout.

All three multiply each unit by noise of mean 1. What separates them, for a
BatchNorm that follows, is the noise variance ``s2``: a unit of mean ``c`` and
variance ``v`` has variance ``v + s2 * (c**2 + v)`` in training and ``v`` in
eval, so the BatchNorm's running variance overestimates the eval variance by
that factor (the *variance shift*, Li et al. 2019)::

    dropout(rate)           x * m / (1 - rate), m ~ Bernoulli(1 - rate)   s2 = rate / (1 - rate)
    gaussian_dropout(rate)  x * (1 + sqrt(s2) * e), e ~ N(0, 1)           s2 = rate / (1 - rate)
    uout(beta)              x * (1 + r), r ~ U(-beta, beta)               s2 = beta**2 / 3

Common contract: the key is explicit; ``deterministic=True`` or a zero rate
returns ``x`` itself and needs no key; the output has ``x``'s shape and dtype
(half-precision inputs are computed in float32 and rounded once); the same key
gives the same draw with and without ``jit``. ``rate``/``beta`` may be traced
scalars, so a schedule does not recompile; a traced value cannot be checked at
trace time and is clipped into the op's valid range instead, except that a
traced NaN or +-inf makes the op return ``x`` unchanged (a concrete bad value
raises ``ValueError``).

Random generator (``rng_impl``): ``'hash'`` (default) is the counter-based
generator of :mod:`regjax.random`, fused into the elementwise op: one tiny
threefry call turns the key into four seed words, and each element's noise is
a hash of its flat (row-major) index, so dropout and Uout cost about a copy of
the array (Gaussian dropout several copies: ``erf_inv`` dominates). Dropout's
mask is :func:`regjax.random.bernoulli_from_bits` of those words (16 bits per
element, so the realised keep probability is exactly
``round(keep * 2**16) / 2**16``), Uout's noise
:func:`regjax.random.symmetric_uniform_from_bits` (a 24-bit grid) and Gaussian
dropout's :func:`regjax.random.normal_from_bits`. The backward pass
recomputes the noise from the seed words (``jax.checkpoint``), so nothing per
element is stored for it. ``'jax'`` draws with ``jax.random`` (``dropout``'s
mask then equals ``flax.linen.Dropout``'s); it is 20-40x slower than a copy
on a CPU.

Each op runs as one compiled computation, so ``op(...)`` and
``jax.jit(op)(...)`` give bit-identical results. (Inside a larger jitted
function XLA may fuse neighbouring arithmetic into the op's last multiply or
add, as it may for any JAX code, which can change the last bit.) A key must
not be reused for two draws meant to be independent (see
:mod:`regjax.random`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regjax import _noise, _specs, random

__all__ = [
  "dropout",
  "gaussian_dropout",
  "uout",
  "dropout_noise_variance",
  "uout_noise_variance",
  "matched_uout_beta",
]

# Largest traced Gaussian-dropout rate: keeps the noise stddev finite (~4096).
_MAX_TRACED_GAUSSIAN_RATE = 1.0 - 2.0**-24


@dataclasses.dataclass(frozen=True)
class _Dropout(_noise.NoiseRule):
  """``x * m / keep``, ``m ~ Bernoulli(keep)``; the strength is the rate."""

  def param(self, rate):
    return 1.0 - jnp.clip(rate, 0.0, 1.0)

  def from_words(self, x, words, keep):
    return x * _noise.dropout_factor(random.bernoulli_from_bits(words, keep), keep)

  def from_key(self, x, key, noise_shape, keep):
    return x * _noise.dropout_factor(jax.random.bernoulli(key, keep, noise_shape), keep)


@dataclasses.dataclass(frozen=True)
class _GaussianDropout(_noise.NoiseRule):
  """``x * (1 + stddev * e)``, ``e ~ N(0, 1)``, ``stddev = sqrt(rate / (1 - rate))``."""

  def param(self, rate):
    rate = jnp.clip(rate, 0.0, _MAX_TRACED_GAUSSIAN_RATE)
    return jnp.sqrt(rate / (1.0 - rate))

  def from_words(self, x, words, stddev):
    return x * (1.0 + stddev * random.normal_from_bits(words, x.dtype))

  def from_key(self, x, key, noise_shape, stddev):
    return x * (1.0 + stddev * jax.random.normal(key, noise_shape, x.dtype))


@dataclasses.dataclass(frozen=True)
class _Uout(_noise.NoiseRule):
  """``x * (1 + beta * r)``, ``r ~ U(-1, 1)``."""

  def param(self, beta):
    return jnp.maximum(beta, 0.0)

  def from_words(self, x, words, beta):
    return x * (1.0 + beta * random.symmetric_uniform_from_bits(words, x.dtype))

  def from_key(self, x, key, noise_shape, beta):
    return x * (1.0 + beta * jax.random.uniform(key, noise_shape, x.dtype, -1.0, 1.0))


def dropout(
  x: jax.Array,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: str = "hash",
) -> jax.Array:
  """Inverted dropout (Srivastava et al. 2014, JMLR 15).

  Train mode: ``y = x * m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)``, so
  ``E[y] = x`` and the multiplicative noise variance is ``rate / (1 - rate)``.
  Eval mode (``deterministic=True``) returns ``x``.

  Args:
    x: floating-point array.
    rate: probability of dropping a unit, in ``[0, 1]``. ``rate == 1`` returns
      zeros (with zero, never NaN, gradients). A traced rate is clipped to
      ``[0, 1]``; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one mask draw (e.g. the spatial axes for
      channel dropout), as in ``flax.linen.Dropout``: the axes a draw is shared
      over, not a channel axis (the channel is ``channel_axis`` in
      :func:`regjax.channel_dropout`, which broadcasts the other axes, the
      layout ``data_format`` in :func:`regjax.dropblock` and
      :func:`regjax.cutout`, and the feature ``axis`` in :func:`regjax.batch_norm`).
    rng_impl: ``'hash'`` (default): the fused counter-hash generator, whose
      realised keep probability is ``round((1 - rate) * 2**16) / 2**16``
      (resolution ``2**-16``; a rate of ``1 - 2**-17`` or more drops everything)
      and whose backward recomputes the mask from the
      key; ``'jax'``: ``jax.random.bernoulli(key, 1 - rate, shape)``, the same
      draw as ``flax.linen.Dropout`` makes from the same key.

  Returns:
    An array with ``x``'s shape and dtype. Kept units are scaled by exactly
    ``1 / (1 - rate)`` (with ``'hash'`` the mean is therefore off by at most
    ``2**-17 / (1 - rate)`` relative). A traced ``rate`` gets a gradient only
    through that scale (the mask is piecewise constant in ``rate``).
  """
  return _noise.elementwise_op(
    "regjax.dropout",
    _specs.DROPOUT,
    _Dropout,
    x,
    rate,
    key,
    deterministic,
    broadcast_dims,
    rng_impl,
  )


def gaussian_dropout(
  x: jax.Array,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: str = "hash",
) -> jax.Array:
  """Gaussian (multiplicative) dropout (Srivastava et al. 2014, §10).

  Train mode: ``y = x * (1 + sqrt(rate / (1 - rate)) * e)``, ``e ~ N(0, 1)``:
  the same mean and noise variance as ``dropout(x, rate)`` (the stddev of
  Keras' ``GaussianDropout``). Eval mode returns ``x``.

  Args:
    x: floating-point array.
    rate: in ``[0, 1)``. A traced rate is clipped to ``[0, 1 - 2**-24]``;
      a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator (normals
      are ``sqrt(2) * erf_inv`` of 24-bit uniforms, tails cut at ~5.4 sigma);
      ``'jax'``: ``jax.random.normal(key, shape)``.
  """
  return _noise.elementwise_op(
    "regjax.gaussian_dropout",
    _specs.GAUSSIAN_DROPOUT,
    _GaussianDropout,
    x,
    rate,
    key,
    deterministic,
    broadcast_dims,
    rng_impl,
  )


def uout(
  x: jax.Array,
  beta: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: str = "hash",
) -> jax.Array:
  """Uout: uniform multiplicative noise (Li, Chen, Hu, Yang 2019, arXiv:1801.05134).

  Train mode: ``y = x * (1 + r)``, ``r ~ U(-beta, beta)``; noise variance
  ``beta**2 / 3``, so ``uout(beta)`` matches ``dropout(rate)`` in variance
  when ``beta = sqrt(3 * rate / (1 - rate))`` (:func:`matched_uout_beta`).
  The paper's customary ``beta = 0.1`` is the variance of dropout at
  ``rate ~ 0.0033``. Eval mode returns ``x``.

  Args:
    x: floating-point array.
    beta: noise half-width, ``>= 0``. ``beta > 1`` is allowed (matched-variance
      comparisons need it) and flips a unit's sign with probability
      ``(beta - 1) / (2 * beta)``. A traced beta is clipped below at 0;
      a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``beta`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator (``r`` is
      ``beta`` times a uniform on the midpoints of a 24-bit grid of
      ``(-1, 1)``); ``'jax'``: ``jax.random.uniform(key, shape, minval=-1, maxval=1)``.
  """
  return _noise.elementwise_op(
    "regjax.uout", _specs.UOUT, _Uout, x, beta, key, deterministic, broadcast_dims, rng_impl
  )


def dropout_noise_variance(rate):
  """Multiplicative noise variance of (Gaussian) dropout: ``rate / (1 - rate)``."""
  return rate / (1.0 - rate)


def uout_noise_variance(beta):
  """Multiplicative noise variance of Uout: ``beta**2 / 3``."""
  return beta**2 / 3.0


def matched_uout_beta(rate):
  """The Uout ``beta`` whose noise variance equals dropout's at ``rate``.

  ``beta = sqrt(3 * rate / (1 - rate))``; e.g. rate 0.5 -> beta ~ 1.732.
  """
  return (3.0 * dropout_noise_variance(rate)) ** 0.5

"""Multiplicative-noise regularizers: inverted dropout, Gaussian dropout, Uout.

All three multiply each unit by noise of mean 1. What separates them, for a
BatchNorm that follows, is the noise variance ``s2`` (see ``BRIEF.md`` §2)::

    dropout(rate)           x * m / (1 - rate),  m ~ Bernoulli(1 - rate)   s2 = rate / (1 - rate)
    gaussian_dropout(rate)  x * (1 + sqrt(rate / (1 - rate)) * e), e ~ N(0, 1)   s2 = rate / (1 - rate)
    uout(beta)              x * (1 + r),  r ~ U(-beta, beta)               s2 = beta**2 / 3

Common contract: the key is explicit; ``deterministic=True`` or a zero rate
returns ``x`` itself and needs no key; the output has ``x``'s shape and dtype
(half-precision inputs are computed in float32 and rounded once); the same key
gives the same draw with and without ``jit``. ``rate``/``beta`` may be traced
scalars, so a schedule does not recompile; a traced value cannot be checked at
trace time and is clipped into the op's valid range instead.

Random generator (``rng_impl``): ``'hash'`` (default) is a counter-based hash
fused into the elementwise op (see :mod:`regjax._hash`): one tiny threefry call
draws two seed words from the key, and each element's noise is a hash of its
flat (row-major) index, so dropout and Uout cost about a copy of the array
(Gaussian dropout several copies: ``erf_inv`` dominates). Its Bernoulli masks
compare 16 hashed bits with a threshold, so their rate resolution is
``2**-16`` (the realised keep probability is exactly
``round(keep * 2**16) / 2**16``); its uniforms lie on a 24-bit grid and its
normals are ``sqrt(2) * erf_inv`` of those. The backward pass recomputes the
noise from the seed words (``jax.checkpoint``), so nothing per element is
stored for it. ``'jax'`` draws with ``jax.random`` exactly as before
(``dropout``'s mask then equals ``flax.linen.Dropout``'s); it is 20-40x slower
than a copy on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regjax import _checks, _hash

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


RNG_IMPLS = ("hash", "jax")


def _check_rng_impl(rng_impl, op: str) -> str:
  if not isinstance(rng_impl, str) or rng_impl not in RNG_IMPLS:
    raise ValueError(f"{op}: `rng_impl` must be one of {RNG_IMPLS}, got {rng_impl!r}.")
  return rng_impl


def _fused_apply(apply_fn, x, param, key, noise_shape, compute_dtype, op):
  """``apply_fn(x, bits, param)`` with hashed bits, recomputed (not stored) for the backward.

  ``apply_fn(x_c, bits, param) -> y_c`` gets ``x`` in ``compute_dtype`` and the
  uint32 hashed bits of ``noise_shape`` (broadcastable to ``x``), and returns the
  result in ``compute_dtype``; it is rounded to ``x.dtype`` once. ``param`` is a
  scalar or a pytree of scalars (rate, scale, ...). ``jax.checkpoint`` makes the
  residuals of a differentiated call the seed words and ``param`` only; unlike a
  ``custom_vjp`` it keeps forward-mode autodiff. ``op`` names the caller in the
  error for a noise shape beyond the counter's ``2**32`` elements.
  """
  seed = _hash.seed_words(key)

  @jax.checkpoint
  def apply(x, param, seed):
    bits = _hash.bits(seed, noise_shape, op)
    return apply_fn(x.astype(compute_dtype), bits, param).astype(x.dtype)

  return apply(x, param, seed)


def _fused(noise_fn, x, param, key, noise_shape, compute_dtype, op):
  """``x * noise_fn(bits, param)`` with hashed bits: :func:`_fused_apply` of a product."""

  def apply_fn(x_c, b, param):
    return x_c * noise_fn(b, param).astype(compute_dtype)

  return _fused_apply(apply_fn, x, param, key, noise_shape, compute_dtype, op)


def _scale(x, factor, compute_dtype):
  """``x * factor`` computed in ``compute_dtype`` and rounded to ``x.dtype`` once."""
  return (x.astype(compute_dtype) * factor.astype(compute_dtype)).astype(x.dtype)


def _dropout_factor(mask, keep):
  """``1 / keep`` where ``mask`` keeps a unit, else 0.

  Multiplying by this factor (rather than dividing x and selecting) keeps the
  gradient exactly 0 where ``keep == 0``, instead of ``0 * inf = NaN``.
  """
  safe_keep = jnp.where(keep > 0, keep, 1.0)
  return jnp.where(mask, 1.0 / safe_keep, 0.0)


def _noise_shape(shape: tuple[int, ...], broadcast_dims: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(1 if i in broadcast_dims else d for i, d in enumerate(shape))


def _compute_dtype(dtype) -> jnp.dtype:
  # float16/bfloat16 are computed in float32 so the result is rounded only once.
  return jnp.promote_types(dtype, jnp.float32)


def _is_identity(strength, deterministic) -> bool:
  """Whether a noise op returns ``x`` without a draw: eval mode, or a strength
  (rate, beta, stddev) that is concretely 0."""
  return deterministic or (not _checks.is_traced(strength) and strength == 0.0)


def _trivial_dropout(x, rate, deterministic):
  """The result of a dropout-type op when no draw is needed (eval, rate 0 or 1), else None."""
  if _is_identity(rate, deterministic):
    return x
  if not _checks.is_traced(rate) and rate == 1.0:
    return jnp.zeros_like(x)
  return None


def _prepare(x, key, deterministic, broadcast_dims, op):
  _checks.check_floating(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  if key is not None:
    _checks.check_key(key, op)
  dims = _checks.check_broadcast_dims(broadcast_dims, x.ndim, op)
  return deterministic, _noise_shape(x.shape, dims)


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
      ``[0, 1]``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one mask draw (e.g. the spatial axes for
      channel dropout), as in ``flax.linen.Dropout``.
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
  op = "regjax.dropout"
  rng_impl = _check_rng_impl(rng_impl, op)
  deterministic, noise_shape = _prepare(x, key, deterministic, broadcast_dims, op)
  rate = _checks.check_rate(rate, op, "rate", low=0.0, high=1.0, high_inclusive=True)
  trivial = _trivial_dropout(x, rate, deterministic)
  if trivial is not None:
    return trivial
  _checks.check_key(key, op)
  compute_dtype = _compute_dtype(x.dtype)
  keep = 1.0 - jnp.clip(jnp.asarray(rate, compute_dtype), 0.0, 1.0)
  if rng_impl == "hash":
    def factor_fn(b, keep):
      return _dropout_factor(_hash.bernoulli(b, keep), keep)
    return _fused(factor_fn, x, keep, key, noise_shape, compute_dtype, op)
  mask = jax.random.bernoulli(key, keep, noise_shape)
  return _scale(x, _dropout_factor(mask, keep), compute_dtype)


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
    rate: in ``[0, 1)``. A traced rate is clipped to ``[0, 1 - 2**-24]``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator (normals
      are ``sqrt(2) * erf_inv`` of 24-bit uniforms, tails cut at ~5.4 sigma);
      ``'jax'``: ``jax.random.normal(key, shape)``.
  """
  op = "regjax.gaussian_dropout"
  rng_impl = _check_rng_impl(rng_impl, op)
  deterministic, noise_shape = _prepare(x, key, deterministic, broadcast_dims, op)
  rate = _checks.check_rate(rate, op, "rate", low=0.0, high=1.0, high_inclusive=False)
  if _is_identity(rate, deterministic):
    return x
  _checks.check_key(key, op)
  compute_dtype = _compute_dtype(x.dtype)
  rate = jnp.clip(jnp.asarray(rate, compute_dtype), 0.0, _MAX_TRACED_GAUSSIAN_RATE)
  stddev = jnp.sqrt(rate / (1.0 - rate))
  if rng_impl == "hash":
    def factor_fn(b, stddev):
      return 1.0 + stddev * _hash.normal(b, compute_dtype)
    return _fused(factor_fn, x, stddev, key, noise_shape, compute_dtype, op)
  noise = jax.random.normal(key, noise_shape, compute_dtype)
  return _scale(x, 1.0 + stddev * noise, compute_dtype)


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
      ``(beta - 1) / (2 * beta)``. A traced beta is clipped below at 0.
    key: PRNG key; required in train mode unless ``beta`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    broadcast_dims: axes that share one noise draw.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator (``r`` is
      ``beta`` times a uniform on the midpoints of a 24-bit grid of
      ``(-1, 1)``); ``'jax'``: ``jax.random.uniform(key, shape, minval=-1, maxval=1)``.
  """
  op = "regjax.uout"
  rng_impl = _check_rng_impl(rng_impl, op)
  deterministic, noise_shape = _prepare(x, key, deterministic, broadcast_dims, op)
  beta = _checks.check_rate(beta, op, "beta", low=0.0, high=float("inf"), high_inclusive=False)
  if _is_identity(beta, deterministic):
    return x
  _checks.check_key(key, op)
  compute_dtype = _compute_dtype(x.dtype)
  beta = jnp.maximum(jnp.asarray(beta, compute_dtype), 0.0)
  if rng_impl == "hash":
    def factor_fn(b, beta):
      return 1.0 + beta * _hash.symmetric_uniform(b, compute_dtype)
    return _fused(factor_fn, x, beta, key, noise_shape, compute_dtype, op)
  noise = jax.random.uniform(key, noise_shape, compute_dtype, minval=-1.0, maxval=1.0)
  return _scale(x, 1.0 + beta * noise, compute_dtype)


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

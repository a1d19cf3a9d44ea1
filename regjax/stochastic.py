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
from typing import cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from regjax import _checks, _noise, _specs, random
from regjax._types import RngImpl

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
class _ClassicDropout(_Dropout):
  """``x * m``, ``m ~ Bernoulli(keep)``: :class:`_Dropout`'s mask, not rescaled."""

  def from_words(self, x, words, keep):
    return x * _classic_factor(random.bernoulli_from_bits(words, keep))

  def from_key(self, x, key, noise_shape, keep):
    return x * _classic_factor(jax.random.bernoulli(key, keep, noise_shape))


def _classic_factor(mask):
  """1 where ``mask`` keeps a unit, else 0 (the classic counterpart of ``dropout_factor``)."""
  return jnp.where(mask, 1.0, 0.0)


def _scale_by_keep(x, rate):
  """Classic dropout's eval output ``x * (1 - rate)``, computed in the compute dtype."""
  dtype = _noise.compute_dtype(x.dtype)
  keep = _Dropout().param(jnp.asarray(rate, dtype))
  return (x.astype(dtype) * keep).astype(x.dtype)


def _scale_by_keep_guarded(x, rate):
  """:func:`_scale_by_keep` for a traced rate: ``x`` itself where it is NaN or +-inf."""
  finite = jnp.isfinite(rate)
  safe = jnp.where(finite, rate, jnp.zeros_like(rate))
  return jax.lax.cond(finite, _scale_by_keep, lambda x, r: x, x, safe)


# One compiled computation each, as the train path (see regjax._noise): eager == jit.
_scale_by_keep_traced = jax.jit(_scale_by_keep_guarded)
_scale_by_keep_constant = jax.jit(_scale_by_keep, static_argnums=1)


def _classic_dropout(x, rate, key, deterministic, broadcast_dims, rng_impl):
  """``dropout(..., inverted=False)``: train ``x * m``, eval ``x * (1 - rate)``."""
  op = "regjax.dropout"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic, _ = _noise.prepare(x, key, deterministic, broadcast_dims, op)
  rate = _specs.DROPOUT.check(rate, op)
  if not deterministic:
    return _noise.elementwise_op(
      op, _specs.DROPOUT, _ClassicDropout, x, rate, key, deterministic, broadcast_dims, rng_impl
    )
  # Eval: the expected train output, without a draw.
  if _checks.is_concretely(rate, *_specs.DROPOUT.identity_at):
    return x
  if _checks.is_concretely(rate, *_specs.DROPOUT.zeros_at):
    return jnp.zeros_like(x)
  if _checks.is_traced(rate):
    return _scale_by_keep_traced(x, rate)
  return _scale_by_keep_constant(x, float(rate))


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
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: RngImpl = "hash",
  inverted: bool = True,
) -> jax.Array:
  """Inverted dropout (Srivastava et al. 2014, JMLR 15), or classic dropout.

  Train mode: ``y = x * m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)``, so
  ``E[y] = x`` and the multiplicative noise variance is ``rate / (1 - rate)``.
  Eval mode (``deterministic=True``) returns ``x``.

  Classic dropout (``inverted=False``, the paper's original form): train
  ``y = x * m`` (no rescaling), eval ``y = x * (1 - rate)``, the expected train
  output; so eval is not the identity (unless ``rate`` is concretely 0), and
  ``deterministic=True`` then returns a new array. Same mask as inverted dropout
  for the same key and ``rng_impl``: the output is ``(1 - rate)`` times the
  inverted one in both modes, up to rounding. ``rate == 1`` gives zeros in both
  modes (zero, never NaN, gradients). In eval, a traced rate is clipped to
  ``[0, 1]`` as in train, and a traced NaN or +-inf returns ``x``, as the train
  path does.

  Variance shift of classic dropout (Li et al. 2019, see
  :mod:`regjax.diagnostics`): a unit of mean ``c`` and variance ``v`` has, with
  ``keep = 1 - rate``, ``Var_train[x * m] = keep * v + keep * rate * c**2`` and
  ``Var_eval[x * keep] = keep**2 * v``, so a BatchNorm right after it sees::

      delta = Var_eval / Var_train = keep * v / (v + rate * c**2)

  which is inverted dropout's ``v / (v + s2 * (c**2 + v))`` with ``s2 = rate /
  keep``: both modes' outputs are ``keep`` times the inverted ones, so the
  ratio is the same. Classic dropout does not avoid the variance shift.

  Args:
    x: floating-point array.
    rate: probability of dropping a unit, in ``[0, 1]``. ``rate == 1`` returns
      zeros (with zero, never NaN, gradients). A traced rate is clipped to
      ``[0, 1]``; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged (``x * (1 - rate)`` with
      ``inverted=False``).
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
    inverted: True (default): inverted dropout; False: classic dropout (see above).

  Returns:
    An array with ``x``'s shape and dtype. Kept units are scaled by exactly
    ``1 / (1 - rate)`` (with ``'hash'`` the mean is therefore off by at most
    ``2**-17 / (1 - rate)`` relative); with ``inverted=False`` they are kept as
    they are. A traced ``rate`` gets a gradient only through that scale (the
    mask is piecewise constant in ``rate``): none in classic train mode, and
    ``-x`` in classic eval mode.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  if not isinstance(inverted, (bool, np.bool_)):
    raise TypeError(f"regjax.dropout: `inverted` must be a bool; got {inverted!r}.")
  if not inverted:
    return _classic_dropout(x, rate, key, deterministic, broadcast_dims, rng_impl)
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
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: RngImpl = "hash",
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
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
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
  x: ArrayLike,
  beta: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  broadcast_dims: Sequence[int] = (),
  rng_impl: RngImpl = "hash",
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
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  return _noise.elementwise_op(
    "regjax.uout", _specs.UOUT, _Uout, x, beta, key, deterministic, broadcast_dims, rng_impl
  )


@overload
def dropout_noise_variance(rate: float) -> float: ...
@overload
def dropout_noise_variance(rate: jax.Array) -> jax.Array: ...
def dropout_noise_variance(rate: float | jax.Array) -> float | jax.Array:
  """Multiplicative noise variance of (Gaussian) dropout: ``rate / (1 - rate)``."""
  return rate / (1.0 - rate)


@overload
def uout_noise_variance(beta: float) -> float: ...
@overload
def uout_noise_variance(beta: jax.Array) -> jax.Array: ...
def uout_noise_variance(beta: float | jax.Array) -> float | jax.Array:
  """Multiplicative noise variance of Uout: ``beta**2 / 3``."""
  return beta**2 / 3.0


@overload
def matched_uout_beta(rate: float) -> float: ...
@overload
def matched_uout_beta(rate: jax.Array) -> jax.Array: ...
def matched_uout_beta(rate: float | jax.Array) -> float | jax.Array:
  """The Uout ``beta`` whose noise variance equals dropout's at ``rate``.

  ``beta = sqrt(3 * rate / (1 - rate))``; e.g. rate 0.5 -> beta ~ 1.732.
  """
  return (3.0 * dropout_noise_variance(rate)) ** 0.5

"""The counter-based generator fused into regjax's noise ops (``rng_impl='hash'``).

``jax.random`` (threefry-2x32, 20 rounds per 64 bits) costs 20-40x a copy of
the array on a CPU. A noise op needs only a few well-mixed bits per element,
and those bits can be computed inside the op's own elementwise loop, so that
no random array is ever written to memory. This module is that generator:

* :func:`bits` -- one uint32 word per element, exactly the words the ops use;
* :func:`bernoulli`, :func:`uniform`, :func:`normal` -- draws made from them,
  drop-in for the ``jax.random`` functions of the same names;
* the two halves of :func:`bits` (:func:`seed_words`, :func:`counter_bits`)
  and the maps from words to draws (``*_from_bits``), for fused noise of your
  own.

**Definition.** A key gives four seed words by one tiny threefry call,
``(s0, s1, s2, s3) = jax.random.bits(key, (4,), uint32)``, and they give the
offsets and odd steps of two Weyl sequences (:func:`weyl_parameters`:
``x0 = w0``, ``g0 = weyl_step(w1)``, ``y0 = w2``, ``g1 = weyl_step(w3)`` with
``w_k = lowbias32(s_k + k * 0x9e3779b9)``). Element ``i`` (the flat row-major
index of the noise array) gets the word::

    x = x0 + i * g0,   y = y0 + i * g1              two keyed Weyl sequences (uint32, wrapping)
    h = x ^ (x >> 16);  h *= 0x7feb352d
    h ^= y
    h ^= h >> 15;       h *= 0x846ca68b;  h ^= h >> 16
    bits(i) = h

Without the line ``h ^= y`` this is Chris Wellons' ``lowbias32`` hash of one
Weyl sequence (a SplitMix-style generator; Steele, Lea & Flood 2014), which is
a bijection of the index: over ``n`` elements no 32-bit value repeats, so the
top 16 bits are spread *more* evenly than by chance, and PractRand (a
standard battery of statistical tests) detects that after ``2**26`` to
``2**27`` elements. XORing the second sequence in between the two multiplies
makes the word a non-invertible function of the index, whose collisions occur
at the rate of a random function's. It must be an XOR: a multiply distributes
over an addition, which would turn the word into a bijection plus a Weyl
sequence, and that fails as early. It goes before the middle xorshift, which
carries the high bits of ``y`` down into the last multiply (after it, a ``y``
that differs only in bit 31 would change only bits 31 and 15 of the word).

Measured with PractRand 0.94 (``benchmarks/rng_quality.py``, which also runs
``jax.random.bits`` as a control): no failure for one key's whole counter
range, ``2**32`` words (16 GB), its top 16 bits (8 GB) and its top 24 bits
(8 GB); nor for one flat index across ``2**30`` keys from ``fold_in`` (which
are ``split``'s keys) and from a two-level ``split`` (4 GB each); nor for the
words of blocks 0 and 1 of an array of more than ``2**32`` elements,
interleaved (4 GB). The cost is a multiply, an addition and an XOR per element
more than ``lowbias32`` alone: dropout stays at about a copy of the array.

The index ``i`` is the 64-bit flat index: for noise arrays of more than
``2**32`` elements (or a symbolic shape whose size is not bounded by that),
its high word ``hi`` offsets both sequences, ``x += hi * 0x9e3779b9``,
``y += hi * 0x85ebca6b``, so every block of ``2**32`` elements is a stream of
its own. Everything is elementwise, so XLA fuses the generator into the op
that consumes it. The words depend only on the key and the index, never on
sharding, layout, backend or ``jit``.

**Which bits each op uses.**

=====================================  =================================================
op                                     words used
=====================================  =================================================
``dropout``, ``alpha_dropout``,        top 16 bits: keep where ``bits >> 16 <
``channel_dropout``, ``drop_path``,    round(keep * 2**16)`` (:func:`bernoulli_from_bits`)
``dropconnect_dense``, ``dropblock``
(its block seeds)
``uout``                               top 24 bits: :func:`symmetric_uniform_from_bits`
``gaussian_dropout``,                  top 24 bits: :func:`normal_from_bits`
``gaussian_noise``
=====================================  =================================================

**Keys.** Like ``jax.random``, a key must not be reused for two draws that
should be independent: two ops given the same key read the same words (the
same key in ``dropout(0.5)`` and ``uout(1.0)`` gives noise with correlation
-0.87). Split it (``jax.random.split``), fold in a layer or step number
(``jax.random.fold_in``), or let the linen/NNX modules derive one key per
module from their stream. Different keys give unrelated streams: their seed
words are threefry's, and each is hashed before use, so that even seed words
that differ by one or in one bit give unrelated sequences. Two keys whose
first sequences coincide after a shift (an equal step ``g0``: a chance of
``2**-31`` per pair of keys) are still told apart by the second sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from regjax import _checks

__all__ = [
  "bits",
  "bernoulli",
  "uniform",
  "normal",
  "seed_words",
  "counter_bits",
  "hash_counter",
  "weyl_step",
  "weyl_parameters",
  "bernoulli_from_bits",
  "uniform_from_bits",
  "symmetric_uniform_from_bits",
  "normal_from_bits",
  "keep_threshold",
  "SEED_WORDS",
  "BERNOULLI_BITS",
  "UNIFORM_BITS",
]

SEED_WORDS = 4
BERNOULLI_BITS = 16
UNIFORM_BITS = 24
_WORD = 1 << 32
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spaces the seed words; multiplies hi into x
_HI_Y = 0x85EBCA6B  # murmur3's fmix constant: multiplies hi into y
_MIN_STEP_TRANSITIONS = 12
_TWO16 = float(1 << BERNOULLI_BITS)
_TWO24 = float(1 << UNIFORM_BITS)


def seed_words(key: jax.Array) -> jax.Array:
  """The ``SEED_WORDS`` uint32 seed words ``(s0, s1, s2, s3)`` that ``key`` gives the generator.

  ``jax.random.bits(key, (4,), jnp.uint32)``: one threefry call per key, whatever
  the size of the draw. Accepts typed keys (``jax.random.key``) and raw ones
  (``jax.random.PRNGKey``).
  """
  _checks.check_key(key, "regjax.random.seed_words")
  return jax.random.bits(key, (SEED_WORDS,), jnp.uint32)


def weyl_step(s: jax.Array) -> jax.Array:
  """The Weyl step from a seed word: ``s | 1``, with at least 12 of its 31 bit transitions.

  Odd, so ``i -> s + i * step`` visits every uint32 once per ``2**32`` indices.
  A step with few bit transitions (e.g. 1, or ``0x80000001``) would make
  consecutive inputs differ in few bits; as in SplitMix, such a step is
  replaced by its XOR with ``0xAAAAAAAA`` (bit 0 untouched, so it stays odd).
  """
  g = s | jnp.uint32(1)
  transitions = lax.population_count(g ^ (g >> 1))
  return jnp.where(transitions < _MIN_STEP_TRANSITIONS, g ^ jnp.uint32(0xAAAAAAAA), g)


def _lowbias32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def weyl_parameters(seed: jax.Array) -> tuple[jax.Array, ...]:
  """``(x0, g0, y0, g1)``: the offsets and odd steps of the two Weyl sequences.

  Each seed word is first hashed, ``w_k = lowbias32(s_k + k * 0x9e3779b9)`` (a
  bijection, so threefry's uniform words stay uniform), so that seed words
  that differ a little -- by one, or in one bit -- still give unrelated
  sequences: ``x0 = w_0``, ``g0 = weyl_step(w_1)``, ``y0 = w_2``,
  ``g1 = weyl_step(w_3)``. Scalars: computed once per draw.
  """
  w = [_lowbias32(seed[k] + jnp.uint32((k * _GOLDEN) & 0xFFFFFFFF)) for k in range(SEED_WORDS)]
  return w[0], weyl_step(w[1]), w[2], weyl_step(w[3])


def hash_counter(seed: jax.Array, lo: jax.Array, hi: jax.Array | None = None) -> jax.Array:
  """The word of every counter ``hi * 2**32 + lo`` (uint32 arrays), from the seed words.

  This is the generator itself (see the module docstring). ``hi=None`` means 0.
  """
  x0, g0, y0, g1 = weyl_parameters(seed)
  x = x0 + lo * g0
  y = y0 + lo * g1
  if hi is not None:
    x = x + hi * jnp.uint32(_GOLDEN)
    y = y + hi * jnp.uint32(_HI_Y)
  h = x ^ (x >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ y  # the second sequence: what makes the word a non-invertible function of i
  h = h ^ (h >> 15)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def _size_fits_one_word(shape) -> bool:
  """Whether ``prod(shape) <= 2**32``; False when a symbolic size has no such bound."""
  try:
    return bool(math.prod(shape) <= _WORD)
  except jax.errors.InconclusiveDimensionOperation:  # a symbolic size without a bound
    return False


def _is_one(dim) -> bool:
  return isinstance(dim, (int, np.integer)) and dim == 1


def _as_word(dim) -> jax.Array:
  """A dimension (an int below ``2**32``, or symbolic) as a uint32 scalar."""
  if isinstance(dim, (int, np.integer)):
    if dim >= _WORD:
      raise ValueError(
        f"regjax.random: a noise array may have 2**32 or more elements, but no single "
        f"dimension of 2**32 or more; got a dimension of {dim}. Reshape it into two."
      )
    return jnp.uint32(dim)
  return jnp.asarray(dim).astype(jnp.uint32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 64-bit product of uint32 ``a`` and ``b`` as ``(hi, lo)`` words, from 16-bit halves."""
  a1, a0 = a >> 16, a & 0xFFFF
  b1, b0 = b >> 16, b & 0xFFFF
  low = a0 * b0
  mid = a1 * b0 + (low >> 16)  # < 2**32: (2**16 - 1)**2 + 2**16
  mid2 = a0 * b1 + (mid & 0xFFFF)
  return a1 * b1 + (mid >> 16) + (mid2 >> 16), a * b


def _flat_index_words(shape) -> tuple[jax.Array, jax.Array]:
  """The 64-bit row-major flat index of every element of ``shape`` as ``(hi, lo)`` words."""
  _as_word(shape[0])  # checks that a uint32 iota can count along it
  iotas = [lax.broadcasted_iota(jnp.uint32, shape, axis) for axis in range(len(shape))]
  return _flat_index_of(iotas, shape)


def _flat_index_of(indices, shape) -> tuple[jax.Array, jax.Array]:
  """The 64-bit row-major flat index of per-axis uint32 ``indices`` as ``(hi, lo)`` words.

  Horner's rule, ``index = index * dim + indices[axis]``, in two uint32 words,
  so it is exact for any size and for symbolic dimensions.
  """
  lo = indices[0]
  hi = jnp.zeros_like(lo)
  for axis in range(1, len(shape)):
    dim = _as_word(shape[axis])
    carry, lo = _mul_wide(lo, dim)
    lo = lo + indices[axis]
    hi = hi * dim + carry + (lo < indices[axis]).astype(jnp.uint32)  # the addition wrapped
  return hi, lo


def _flat_index(shape) -> jax.Array:
  """The uint32 row-major flat index of every element of ``shape`` (at most ``2**32``)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    if not _is_one(shape[axis]):
      term = lax.broadcasted_iota(jnp.uint32, shape, axis)
      idx = idx + (term if _is_one(stride) else term * _as_word(stride))
    stride *= shape[axis]
  return idx


def counter_bits(seed: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The generator's uint32 word for every element of ``shape``, from the seed words.

  ``bits(key, shape) == counter_bits(seed_words(key), shape)``. The ops call it
  inside their own (fused, rematerialised) computation, so that the backward
  pass keeps only the seed words. Any size works: beyond ``2**32`` elements
  the counter's high word enters (see :func:`hash_counter`).
  """
  shape = tuple(shape)
  if not shape:
    return hash_counter(seed, jnp.zeros((), jnp.uint32))
  if _size_fits_one_word(shape):
    return hash_counter(seed, _flat_index(shape))
  hi, lo = _flat_index_words(shape)
  return hash_counter(seed, lo, hi)


def _shape(shape, name: str = "shape") -> tuple:
  if isinstance(shape, (int, np.integer)):
    shape = (shape,)
  try:
    shape = tuple(shape)
  except TypeError:
    raise TypeError(f"regjax.random: `{name}` must be a tuple of ints; got {shape!r}.") from None
  return shape


def bits(key: jax.Array, shape: int | Sequence[int] = ()) -> jax.Array:
  """One uint32 word per element of ``shape``: the words every ``rng_impl='hash'`` op uses.

  ``counter_bits(seed_words(key), shape)``; element ``i`` of the row-major
  flattening gets word ``i`` of the key's stream, so
  ``bits(key, (a, b)).ravel() == bits(key, (a * b,))``. See the module
  docstring for the definition and which bits each op reads.
  """
  return counter_bits(seed_words(key), _shape(shape))


def keep_threshold(p: ArrayLike) -> jax.Array:
  """``round(p * 2**16)`` as uint32, the 16-bit threshold of probability ``p``.

  ``p`` is clipped to ``[0, 1]``; a NaN ``p`` gives 0 (never True), as
  ``jax.random.bernoulli`` does. Exact in float32 (half to even).
  """
  p = jnp.asarray(p)
  if p.dtype not in (jnp.float32, jnp.float64):
    p = p.astype(jnp.float32)
  p = jnp.where(jnp.isnan(p), 0.0, jnp.clip(p, 0.0, 1.0))
  return jnp.round(p * _TWO16).astype(jnp.uint32)


def bernoulli_from_bits(words: jax.Array, p: ArrayLike) -> jax.Array:
  """True with probability exactly ``round(p * 2**16) / 2**16``: ``words >> 16 < threshold``.

  The resolution is ``2**-16``: the realised probability differs from ``p`` by
  at most ``2**-17``, a ``p`` below ``2**-17`` gives False everywhere and one of
  ``1 - 2**-17`` or more True everywhere. Sixteen bits per element are what
  fused dropout kernels on accelerators use (8 or 16 bits in apex and
  TransformerEngine).
  """
  return (words >> (32 - BERNOULLI_BITS)) < keep_threshold(p)


def uniform_from_bits(words: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Uniform on ``[0, 1)``: ``(words >> 8) / 2**24``, an even 24-bit grid, exact in float32."""
  compute = jnp.promote_types(dtype, jnp.float32)
  return ((words >> 8).astype(compute) * jnp.asarray(1.0 / _TWO24, compute)).astype(dtype)


def symmetric_uniform_from_bits(words: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Uniform on ``(-1, 1)``: ``(2 * (words >> 8) + 1 - 2**24) / 2**24``.

  The ``2**24`` midpoints of an even grid: symmetric about 0 (mean exactly 0),
  never +-1, and exact in float32 (the numerator is an odd integer below
  ``2**24`` in magnitude). Uout's noise is ``beta`` times this.
  """
  compute = jnp.promote_types(dtype, jnp.float32)
  odd = ((words >> 8) << 1 | 1).astype(jnp.int32) - (1 << 24)
  return (odd.astype(compute) * jnp.asarray(1.0 / _TWO24, compute)).astype(dtype)


def normal_from_bits(words: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Standard normal: ``sqrt(2) * erf_inv`` of :func:`symmetric_uniform_from_bits`.

  The inverse-CDF transform of a 24-bit uniform: the tails are cut at
  ``|e| ~ 5.4`` (a probability of about ``7e-8`` under a true normal).
  """
  compute = jnp.promote_types(dtype, jnp.float32)
  v = symmetric_uniform_from_bits(words, compute)
  return (jnp.asarray(math.sqrt(2.0), compute) * lax.erf_inv(v)).astype(dtype)


def _check_float_dtype(dtype, op: str):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{op}: `dtype` must be a floating-point dtype; got {dtype}.")
  return dtype


def bernoulli(
  key: jax.Array, p: ArrayLike = 0.5, shape: int | Sequence[int] | None = None
) -> jax.Array:
  """Bernoulli draws, as ``jax.random.bernoulli``: True with probability ``p``.

  The realised probability is exactly ``round(p * 2**16) / 2**16`` (see
  :func:`bernoulli_from_bits`). ``p`` may be traced and broadcast against
  ``shape`` (default: ``p``'s shape).
  """
  p = jnp.asarray(p)
  shape = p.shape if shape is None else _shape(shape)
  try:
    fits = jnp.broadcast_shapes(p.shape, shape) == tuple(shape)
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
      f"regjax.random.bernoulli: `p` of shape {p.shape} does not broadcast to `shape` {shape}."
    )
  return bernoulli_from_bits(bits(key, shape), p)


def uniform(
  key: jax.Array,
  shape: int | Sequence[int] = (),
  dtype: DTypeLike = jnp.float32,
  minval: ArrayLike = 0.0,
  maxval: ArrayLike = 1.0,
) -> jax.Array:
  """Uniform draws on ``[minval, maxval)``, as ``jax.random.uniform`` (same argument order).

  ``minval + (maxval - minval) * u`` with ``u`` from :func:`uniform_from_bits`
  (a 24-bit grid, also for float64), computed in float32 or wider and clipped
  below ``maxval`` (rounding could otherwise reach it).
  """
  dtype = _check_float_dtype(dtype, "regjax.random.uniform")
  compute = jnp.promote_types(dtype, jnp.float32)
  lo, hi = jnp.asarray(minval, compute), jnp.asarray(maxval, compute)
  u = uniform_from_bits(bits(key, shape), compute)
  value = (lo + (hi - lo) * u).astype(dtype)
  # Rounding (to float32, then to dtype) could reach maxval: clip to the value below it.
  below_max = jnp.nextafter(hi.astype(dtype), jnp.asarray(-jnp.inf, dtype))
  return jnp.maximum(lo.astype(dtype), jnp.minimum(value, below_max))


def normal(
  key: jax.Array, shape: int | Sequence[int] = (), dtype: DTypeLike = jnp.float32
) -> jax.Array:
  """Standard normal draws, as ``jax.random.normal`` (see :func:`normal_from_bits`)."""
  dtype = _check_float_dtype(dtype, "regjax.random.normal")
  return normal_from_bits(bits(key, shape), dtype)

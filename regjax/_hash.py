"""A counter-based hash generator fused into the noise ops (``rng_impl='hash'``).

``jax.random`` (threefry-2x32, 20 rounds per 64 bits) costs 40-60x a copy of
the array on a CPU; the noise ops only need a few well-mixed bits per element.
This generator draws two seed words from the key with one tiny threefry call,
``(s0, s1) = jax.random.bits(key, (2,), uint32)``, and hashes a keyed Weyl
sequence of the flat (row-major) element index ``i``, as SplitMix does (Steele,
Lea & Flood 2014, "Fast splittable pseudorandom number generators")::

    bits(i) = lowbias32(s0 + i * gamma)                  (uint32 arithmetic wraps)
    gamma   = s1 | 1, xor 0xAAAAAAAA if it has fewer than 12 bit transitions
    lowbias32(h): h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b; h ^= h >> 16

(``lowbias32`` is Chris Wellons' 32-bit integer hash, a bijection of uint32 with
near-ideal avalanche.) ``gamma`` is odd, so ``i -> s0 + i * gamma`` is a
bijection and one key never repeats a hash input within ``2**32`` elements. Two
keys have different steps and offsets, so their input sequences meet only at
scattered points, never in a shifted run as two plain offsets ``s0 + i`` would.
(Seed words that agree in their low ``t`` bits share a fraction ``2**(t-32)``
of inputs -- the price of one hash round instead of two, which made the
generator 1.5-2x faster; for seed words drawn by threefry a share of 1 % has a
probability of about ``2**-51`` per pair of keys.) The gamma fix-up is
SplitMix's guard against steps with few bit transitions. Everything is
elementwise, so XLA fuses it into the op that uses the noise: no random array
is written to memory. The draw depends only on the key and the flat index,
never on sharding, layout, backend or ``jit``.

* Bernoulli(keep) uses the top 16 bits, ``u16 = bits >> 16``:
  ``u16 < round(keep * 2**16)``. The realised keep probability is exactly
  ``round(keep * 2**16) / 2**16`` (resolution ``2**-16``, so it differs from
  ``keep`` by at most ``2**-17``; a keep below ``2**-17`` keeps nothing).
  Sixteen bits are what fused dropout kernels use (8 or 16 bits in apex and
  TransformerEngine); they also let XLA drop lowbias32's last step, which only
  mixes the high half into the low half.
* Symmetric uniform on ``(-1, 1)`` uses the top 24 bits, ``u24 = bits >> 8``:
  ``v = (2 * u24 + 1 - 2**24) / 2**24``, the ``2**24`` midpoints of an even
  grid, exact in float32 and never +-1.
* Standard normal: ``sqrt(2) * erf_inv(v)`` (inverse-CDF transform; the tails
  are cut at ``|e| ~ 5.4``, a probability of about ``7e-8``).

The counter is one uint32 word, so an array (noise shape) may have at most
``2**32`` elements; larger shapes raise a ``ValueError`` at trace time instead
of silently repeating the stream.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

MAX_ELEMENTS = 1 << 32
BERNOULLI_BITS = 16
UNIFORM_BITS = 24
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MIN_GAMMA_TRANSITIONS = 12
_TWO16 = float(1 << BERNOULLI_BITS)
_TWO24 = float(1 << UNIFORM_BITS)


def _lowbias32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def seed_words(key: jax.Array) -> jax.Array:
  """The two uint32 seed words ``(s0, s1)`` of the hash generator, drawn from ``key``."""
  return jax.random.bits(key, (2,), jnp.uint32)


def gamma(s1: jax.Array) -> jax.Array:
  """The Weyl step from seed word ``s1``: odd, with at least 12 of its 31 bit transitions."""
  g = s1 | jnp.uint32(1)
  transitions = lax.population_count(g ^ (g >> 1))
  # 0xAAAAAAAA flips every other bit (bit 0 excluded, so g stays odd).
  return jnp.where(transitions < _MIN_GAMMA_TRANSITIONS, g ^ jnp.uint32(0xAAAAAAAA), g)


def flat_index(shape: tuple[int, ...], op: str = "regjax") -> jax.Array:
  """uint32 row-major flat index of every element of ``shape``."""
  n = math.prod(shape)
  if n > MAX_ELEMENTS:
    raise ValueError(
        f"{op} with rng_impl='hash' draws at most 2**32 noise elements (its counter is "
        f"one uint32 word); got shape {shape} with {n} elements. Use rng_impl='jax' or "
        "split the array.")
  if not shape:
    return jnp.zeros((), jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    if shape[axis] != 1:
      term = lax.broadcasted_iota(jnp.uint32, shape, axis)
      idx = idx + (term * jnp.uint32(stride) if stride != 1 else term)
    stride *= shape[axis]
  return idx


def bits(seed: jax.Array, shape: tuple[int, ...], op: str = "regjax") -> jax.Array:
  """32 hashed bits per element of ``shape`` (uint32), from the seed words."""
  return _lowbias32(seed[0] + flat_index(shape, op) * gamma(seed[1]))


def keep_threshold(keep: jax.Array) -> jax.Array:
  """``round(keep * 2**16)`` as uint32 (``keep`` clipped to [0, 1]; exact in float32)."""
  keep = jnp.clip(jnp.asarray(keep), 0.0, 1.0)
  if keep.dtype not in (jnp.float32, jnp.float64):
    keep = keep.astype(jnp.float32)
  return jnp.round(keep * _TWO16).astype(jnp.uint32)


def bernoulli(b: jax.Array, keep: jax.Array) -> jax.Array:
  """True with probability exactly ``round(keep * 2**16) / 2**16``."""
  return (b >> (32 - BERNOULLI_BITS)) < keep_threshold(keep)


def symmetric_uniform(b: jax.Array, dtype) -> jax.Array:
  """Uniform on ``(-1, 1)`` (24-bit grid midpoints, never +-1), in ``dtype``."""
  odd = ((b >> 8) << 1 | 1).astype(jnp.int32) - (1 << 24)  # odd, |odd| < 2**24
  return odd.astype(dtype) * jnp.asarray(1.0 / _TWO24, dtype)


def normal(b: jax.Array, dtype) -> jax.Array:
  """Standard normal by the inverse CDF of :func:`symmetric_uniform`, in ``dtype``."""
  return jnp.asarray(math.sqrt(2.0), dtype) * lax.erf_inv(symmetric_uniform(b, dtype))

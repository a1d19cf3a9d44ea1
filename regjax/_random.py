"""Random draws made on a flat shape and reshaped.

JAX generates the same bits for ``shape`` as for ``(prod(shape),)`` reshaped
(threefry counts over the flattened index, in both the partitionable and the
legacy mode; tests pin this), but XLA compiles the rank-1 draw several times
faster: about 0.25 s against 2-3 s for a rank-4 shape on a CPU. So these
helpers give exactly ``jax.random``'s draws, only cheaper to compile.

They are the draws of ``rng_impl='jax'``; the functions of the same names in
:mod:`regjax.random` are the counter-hash generator of ``rng_impl='hash'``.
"""

from __future__ import annotations

import math

import jax


def bernoulli(key, p, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)``, drawn flat."""
  return jax.random.bernoulli(key, p, (math.prod(shape),)).reshape(shape)


def normal(key, shape: tuple[int, ...], dtype) -> jax.Array:
  """``jax.random.normal(key, shape, dtype)``, drawn flat."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)

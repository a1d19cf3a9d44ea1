"""Noise-op cases: each regjax op, its reference and the copy floor, fwd and fwd+bwd.

"fwd" is the op itself, "fwd+bwd" ``jax.vjp`` with a fixed random cotangent,
returning the output and the input gradient. channel_dropout, dropblock and
cutout run on a 4-D (N, H, W, C) view of the same elements, so "vs copy" still
compares with the copy floor. Every random op but cutout is also timed with
``rng_impl='jax'``, against the same reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import regjax
from benchmarks.timing import Case

COPY = "copy x*2"
# The PRNG implementations flax's Dropout is also timed with: its mask comes from
# jax.random.bernoulli of a key of that implementation.
FLAX_KEY_IMPLS = ("rbg", "unsafe_rbg")
DEFAULT_KEY_IMPL = "threefry2x32"  # every other row's keys

FLAX_DROPOUT = "flax Dropout(0.5)"
GAUSSIAN_REF = "straightforward gaussian_dropout(0.5)"
UOUT_REF = "straightforward uout(0.1)"


@dataclasses.dataclass(frozen=True)
class Op:
  """A noise row: ``fn(x, key)``, its reference's name, its input and its keys."""

  name: str
  fn: Callable[[jax.Array, jax.Array], jax.Array]
  ref: str | None = None
  on_4d: bool = False
  key_impl: str = DEFAULT_KEY_IMPL


def straightforward_gaussian_dropout(x, rate, key):
  """Keras-style: ``x * (1 + s * N(0, 1))`` with ``s = sqrt(rate / (1 - rate))``."""
  s = math.sqrt(rate / (1 - rate))
  return x * (1 + s * jax.random.normal(key, x.shape, x.dtype))


def straightforward_uout(x, beta, key):
  """``x * (1 + U(-beta, beta))``."""
  return x * (1 + jax.random.uniform(key, x.shape, x.dtype, minval=-beta, maxval=beta))


def straightforward_alpha_dropout(x, rate, key):
  """Keras' AlphaDropout: dropped units set to SELU's saturation, then an affine fix-up."""
  alpha_p = -1.7580993408473766  # -scale * alpha of SELU
  keep = 1.0 - rate
  a = (keep + alpha_p**2 * keep * rate) ** -0.5
  b = -a * alpha_p * rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return (a * jnp.where(mask, x, jnp.asarray(alpha_p, x.dtype)) + b).astype(x.dtype)


def straightforward_gaussian_noise(x, stddev, key):
  """``x + stddev * N(0, 1)``."""
  return x + stddev * jax.random.normal(key, x.shape, x.dtype)


def flax_dropout(rate: float, broadcast_dims=()) -> Callable:
  """flax.linen.Dropout in train mode as ``f(x, key)``."""
  module = nn.Dropout(rate, broadcast_dims=broadcast_dims)
  return lambda x, key: module.apply({}, x, deterministic=False, rngs={"dropout": key})


def regjax_op(op: Callable, value, **kwargs) -> Callable:
  """``op(x, value, key=key, **kwargs)`` as ``f(x, key)``."""
  return lambda x, key: op(x, value, key=key, **kwargs)


def reference(fn: Callable, value) -> Callable:
  """A straightforward reference ``fn(x, value, key)`` as ``f(x, key)``."""
  return lambda x, key: fn(x, value, key)


def jax_twin(name: str, op: Callable, value, ref: str | None, on_4d: bool = False, **kwargs) -> Op:
  """The ``rng_impl='jax'`` row of a regjax op: the option goes in its name's parentheses."""
  head, _, tail = name.rpartition(")")
  return Op(
    f"{head}, rng_impl='jax'){tail}", regjax_op(op, value, rng_impl="jax", **kwargs), ref, on_4d
  )


def op_rows(
  name: str,
  op: Callable,
  value,
  ref: str | None = None,
  ref_fn: Callable | None = None,
  *,
  on_4d: bool = False,
  twin: bool = True,
  **kwargs,
) -> list[Op]:
  """A regjax op's row, its reference's row (given ``ref_fn``) and its ``rng_impl='jax'``
  twin (when ``twin``), in that order; ``kwargs`` go to the op."""
  rows = [Op(name, regjax_op(op, value, **kwargs), ref, on_4d)]
  if ref is not None and ref_fn is not None:
    rows.append(Op(ref, ref_fn, None, on_4d))
  if twin:
    rows.append(jax_twin(name, op, value, ref, on_4d, **kwargs))
  return rows


def noise_ops(x4: jax.Array) -> list[Op]:
  """Every noise row, in table order; ``x4`` is the 4-D view (it sizes dropblock, cutout)."""
  h = x4.shape[1]
  block = max(1, min(5, h))
  cut = max(1, h // 2)
  main = (
    ("regjax.dropout(0.5)", regjax.dropout, 0.5, FLAX_DROPOUT),
    ("regjax.gaussian_dropout(0.5)", regjax.gaussian_dropout, 0.5, GAUSSIAN_REF),
    ("regjax.uout(0.1)", regjax.uout, 0.1, UOUT_REF),
  )
  return [
    *op_rows(*main[0], flax_dropout(0.5), twin=False),
    *[
      Op(f"{FLAX_DROPOUT} [{impl} key]", flax_dropout(0.5), FLAX_DROPOUT, key_impl=impl)
      for impl in FLAX_KEY_IMPLS
    ],
    *op_rows(*main[1], reference(straightforward_gaussian_dropout, 0.5), twin=False),
    *op_rows(*main[2], reference(straightforward_uout, 0.1), twin=False),
    # The three main ops' rng_impl='jax' rows follow all three pairs.
    *[jax_twin(*m) for m in main],
    *op_rows(
      "regjax.alpha_dropout(0.1)",
      regjax.alpha_dropout,
      0.1,
      "keras-style alpha_dropout(0.1)",
      reference(straightforward_alpha_dropout, 0.1),
    ),
    *op_rows(
      "regjax.gaussian_noise(0.1)",
      regjax.gaussian_noise,
      0.1,
      "straightforward gaussian_noise(0.1)",
      reference(straightforward_gaussian_noise, 0.1),
    ),
    *op_rows(
      "regjax.channel_dropout(0.5) 4-D",
      regjax.channel_dropout,
      0.5,
      "flax Dropout(0.5, bcast H,W) 4-D",
      flax_dropout(0.5, broadcast_dims=(1, 2)),
      on_4d=True,
    ),
    *op_rows(
      "regjax.drop_path(0.2)",
      regjax.drop_path,
      0.2,
      "flax Dropout(0.2, bcast cols)",
      flax_dropout(0.2, broadcast_dims=(1,)),
    ),
    *op_rows(
      f"regjax.dropblock(0.1, block={block}) 4-D",
      regjax.dropblock,
      0.1,
      on_4d=True,
      block_size=block,
    ),
    *op_rows(f"regjax.cutout(size={cut}) 4-D", regjax.cutout, cut, on_4d=True, twin=False),
  ]


def as_4d(x: jax.Array) -> jax.Array:
  """``(N, D)`` viewed as ``(N, H, W, C)`` with ``H == W`` (same elements)."""
  n, d = x.shape
  for c in (16, 4, 1, 64, 8, 2, 32, 3):
    if d % c == 0 and math.isqrt(d // c) ** 2 == d // c:
      h = math.isqrt(d // c)
      return x.reshape(n, h, h, c)
  return x.reshape(n, 1, d, 1)


def vjp_fn(f: Callable) -> Callable:
  """``(x, key, ct) -> (f(x, key), vjp(ct))``: forward+backward with a fixed cotangent."""

  def g(x, key, ct):
    y, pullback = jax.vjp(lambda x: f(x, key), x)
    return y, pullback(ct.astype(y.dtype))[0]

  return g


def select(names_refs: list[tuple[str, str | None]], patterns: list[str] | None) -> set[str]:
  """Names matching any of ``patterns`` (substrings; all when None), plus their references."""
  keep = {n for n, _ in names_refs if patterns is None or any(p in n for p in patterns)}
  return keep | {r for n, r in names_refs if n in keep and r is not None}


def copy_cases(x: jax.Array, ct: jax.Array) -> list[Case]:
  """The floor: the cheapest elementwise op that reads and writes ``x`` once."""

  def copy(x, key):
    return x * 2

  return [
    Case("floor", COPY, "fwd", lambda x: x * 2, lambda i: (x,)),
    Case("floor", COPY, "fwd+bwd", lambda x, ct: vjp_fn(copy)(x, None, ct), lambda i: (x, ct)),
  ]


def noise_cases(
  x: jax.Array, ct: jax.Array, keys: dict[str, list[jax.Array]], patterns: list[str] | None = None
) -> list[Case]:
  """Forward and forward+backward of each noise op matching ``patterns`` (and of its
  reference); call ``i`` gets key ``i`` of the row's key implementation."""
  x4, ct4 = as_4d(x), as_4d(ct)
  ops = noise_ops(x4)
  keep = select([(o.name, o.ref) for o in ops], patterns)
  cases = []
  for o in ops:
    if o.name not in keep:
      continue
    xi, cti = (x4, ct4) if o.on_4d else (x, ct)
    ks = keys[o.key_impl]
    cases.append(Case("noise", o.name, "fwd", o.fn, call_args(ks, xi), o.ref))
    cases.append(Case("noise", o.name, "fwd+bwd", vjp_fn(o.fn), call_args(ks, xi, cti), o.ref))
  return cases


def call_args(keys: list[jax.Array], x: jax.Array, *rest: jax.Array) -> Callable[[int], tuple]:
  """Call ``i``'s arguments ``(x, keys[i], *rest)``."""
  return lambda i: (x, keys[i], *rest)

"""What the backward of a noise op keeps: vjp residual bytes and XLA's memory analysis.

For each op: the bytes of the array leaves of the vjp function returned from a
jitted ``jax.vjp`` (its residuals), divided by ``x.size``; plus XLA's
``memory_analysis()`` of the compiled forward+backward.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.cases import noise

FLOOR = "copy x*2 (floor)"
# The noise rows measured, in table order (names of ``noise.noise_ops``).
OPS = (
  "regjax.dropout(0.5)",
  "regjax.dropout(0.5, rng_impl='jax')",
  noise.FLAX_DROPOUT,
  "regjax.gaussian_dropout(0.5)",
  noise.GAUSSIAN_REF,
  "regjax.uout(0.1)",
  noise.UOUT_REF,
  "regjax.gaussian_dropout(0.5, rng_impl='jax')",
  "regjax.uout(0.1, rng_impl='jax')",
)


def array_nbytes(leaf) -> int:
  """Bytes of an array leaf (a key array counts its key data); 0 for anything else."""
  if not hasattr(leaf, "dtype"):
    return 0
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return int(jax.random.key_data(leaf).nbytes)
  return int(leaf.size) * leaf.dtype.itemsize


def measure(row: dict[str, Any], f, x: jax.Array, ct: jax.Array, key: jax.Array) -> None:
  """Adds to ``row`` the residuals of ``f(x, key)``'s vjp and XLA's memory figures of its
  forward+backward (in that order: a failure keeps what was measured before it)."""
  residuals = jax.jit(lambda x, key: jax.vjp(lambda x: f(x, key), x)[1])(x, key)
  leaves = [leaf for leaf in jax.tree.leaves(residuals) if hasattr(leaf, "dtype")]
  kept = sum(array_nbytes(leaf) for leaf in leaves)
  row["residuals"] = [f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves]
  row["residual_bytes"] = kept
  row["bytes_per_element"] = kept / x.size
  stats = jax.jit(noise.vjp_fn(f)).lower(x, key, ct).compile().memory_analysis()
  if stats is not None:
    for field in (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "temp_size_in_bytes",
    ):
      row[field] = getattr(stats, field, None)
    if row.get("temp_size_in_bytes") is not None:
      row["temp_bytes_per_element"] = row["temp_size_in_bytes"] / x.size


def memory_rows(
  x: jax.Array, ct: jax.Array, key: jax.Array, patterns: list[str] | None = None
) -> list[dict[str, Any]]:
  """One row per op matching ``patterns`` (plus its reference and the floor); an op
  that fails gets an ``error`` instead of figures."""
  by_name = {o.name: o for o in noise.noise_ops(noise.as_4d(x))}
  ops = [noise.Op(FLOOR, lambda x, key: x * 2)] + [by_name[name] for name in OPS]
  keep = noise.select([(o.name, o.ref) for o in ops], patterns) | {FLOOR}
  rows = []
  for o in ops:
    if o.name not in keep:
      continue
    row: dict[str, Any] = {"op": o.name}
    try:
      measure(row, o.fn, x, ct, key)
    except Exception as e:  # report it, keep the other rows
      row["error"] = f"{type(e).__name__}: {e}"
      print(f"    FAILED memory {o.name}: {row['error']}", file=sys.stderr, flush=True)
    rows.append(row)
  return rows

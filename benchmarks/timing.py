"""Interleaved timing in one process: per-round medians, ratios and their 95 % intervals.

Every case first gets ``warmup`` untimed calls (compilation included). Then come
``rounds`` interleaved rounds: in each, every case runs one block of one untimed
call and ``calls`` calls timed one by one (``perf_counter`` around the call and
``jax.block_until_ready``). A ratio of two rows is the median over rounds of the
ratio of their per-round medians, so both sides are timed seconds apart and the
machine's slow drifts cancel; its interval is distribution-free (order
statistics of the per-round ratios).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

# glibc settings under which freed buffers stay in the heap: without them arrays above
# glibc's mmap threshold (32 MiB at most) are mmapped and page-faulted afresh on every
# call, and heap trimming re-faults smaller ones at random. A 32 MiB copy then measured
# 13 ms instead of 2.5 ms, and ratios swung with whichever side allocated more.
STEADY_MALLOC = {
  "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
  "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
  "MALLOC_TOP_PAD_": str(1 << 29),
}


def steady_malloc_environ() -> dict[str, str] | None:
  """The environment to re-run the benchmark in, or None when it already has the settings."""
  if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
    return None
  return {**os.environ, **STEADY_MALLOC}


class Case:
  """One timed row: a jitted function, the arguments of its ``i``-th call, a reference."""

  def __init__(
    self,
    group: str,
    op: str,
    mode: str,
    fn: Callable,
    args: Callable[[int], tuple],
    ref: str | None = None,
  ):
    self.meta: dict[str, Any] = {"group": group, "op": op, "mode": mode, "ref": ref}
    self.fn, self.args = jax.jit(fn), args


def calls_needed(opts: argparse.Namespace) -> int:
  """Calls one case makes: warm-up, then per round one untimed and ``opts.calls`` timed."""
  return opts.warmup + opts.rounds * (opts.calls + 1)


def time_block(fn: Callable, args: Callable[[int], tuple], first: int, calls: int) -> list[float]:
  """One untimed call (it re-warms the allocator after other cases ran), then ``calls``
  calls timed one by one; call ``i`` gets ``args(first + i)``."""
  jax.block_until_ready(fn(*args(first)))
  times = []
  for i in range(1, calls + 1):
    a = args(first + i)
    start = time.perf_counter()
    jax.block_until_ready(fn(*a))
    times.append(time.perf_counter() - start)
  return times


def run_cases(cases: list[Case], opts: argparse.Namespace) -> list[dict[str, Any]]:
  """Times the cases in interleaved rounds; one row per case (its meta, times, medians).

  After ``opts.warmup`` calls per case, each of ``opts.rounds`` rounds runs every case
  once as a block: one untimed call, then ``opts.calls`` timed calls back to back (so a
  case's outputs reuse its own freed buffers: the kernel's steady-state cost, not page
  faults). A case that raises gets an ``error`` and no times; the others go on.
  """
  rows = [dict(case.meta, times_s=[], round_medians_s=[]) for case in cases]
  alive = [True] * len(cases)

  def attempt(i: int, body: Callable[[], object]) -> None:
    try:
      body()
    except Exception as e:  # one broken op must not sink the run
      meta = cases[i].meta
      print(
        f"    FAILED {meta['op']} {meta['mode']}: {type(e).__name__}: {e}",
        file=sys.stderr,
        flush=True,
      )
      rows[i].update(times_s=[], round_medians_s=[], error=f"{type(e).__name__}: {e}")
      alive[i] = False

  for i, case in enumerate(cases):

    def warm(case=case):
      for k in range(opts.warmup):
        jax.block_until_ready(case.fn(*case.args(k)))

    attempt(i, warm)
  for r in range(opts.rounds):
    first = opts.warmup + r * (opts.calls + 1)
    for i, case in enumerate(cases):
      if not alive[i]:
        continue

      def block(i=i, case=case, first=first):
        times = time_block(case.fn, case.args, first, opts.calls)
        rows[i]["times_s"].extend(times)
        rows[i]["round_medians_s"].append(statistics.median(times))

      attempt(i, block)
  return rows


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
  """Distribution-free confidence interval of the median: order statistics
  ``(x_(k), x_(n+1-k))`` with the largest ``k`` whose binomial(n, 1/2) coverage is at
  least ``level``; None when ``n`` is too small for that level."""
  xs, n = sorted(values), len(values)
  best = None
  for k in range(1, n // 2 + 1):
    miss = 2 * sum(math.comb(n, j) for j in range(k)) / 2**n  # P(median outside)
    if 1 - miss >= level:
      best = k
  return None if best is None else (xs[best - 1], xs[n - best])


def round_ratio(
  row: dict[str, Any], other: dict[str, Any] | None
) -> tuple[float | None, tuple[float, float] | None]:
  """``row`` / ``other``: the median over rounds of the per-round median ratios, with its
  95 % interval; ``(None, None)`` when either side has no rounds."""
  if other is None or not row["round_medians_s"] or not other.get("round_medians_s"):
    return None, None
  per_round = [
    a / b for a, b in zip(row["round_medians_s"], other["round_medians_s"], strict=False)
  ]
  return statistics.median(per_round), median_ci(per_round)


def summarize(row: dict[str, Any]) -> None:
  """Adds ``n``, ``median_ms`` and ``min_ms`` (None without times) to a row."""
  times = row["times_s"]
  row["n"] = len(times)
  row["median_ms"] = 1e3 * statistics.median(times) if times else None
  row["min_ms"] = 1e3 * min(times) if times else None


def program_text(fn: Callable, args: tuple) -> str:
  """The optimized XLA program of ``jax.jit(fn)(*args)``, without source locations."""
  text = re.sub(r", metadata=\{[^}]*\}", "", jax.jit(fn).lower(*args).compile().as_text() or "")
  lines, skipping = [], False
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      skipping = True  # the source-location tables differ between callers, not the program
    elif skipping and (line.startswith(("%", "ENTRY")) or not line.strip()):
      skipping = False
    if not skipping:
      lines.append(line)
  return "\n".join(lines)


def mark_identical_programs(cases: list[Case]) -> None:
  """Sets ``same_program_as_ref`` on every case whose compiled XLA program equals its
  reference's: their time ratio is then 1 by construction, whatever the clock says."""
  by_name = {(c.meta["op"], c.meta["mode"]): c for c in cases}
  for c in cases:
    ref = by_name.get((c.meta["ref"], c.meta["mode"])) if c.meta["ref"] else None
    if ref is not None:
      c.meta["same_program_as_ref"] = program_text(c.fn, c.args(0)) == program_text(
        ref.fn, ref.args(0)
      )

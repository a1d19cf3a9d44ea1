"""Micro-benchmark of regjax's core ops against flax and a copy floor.

One process, every function ``jax.jit``-compiled, each call timed on its own
(``time.perf_counter`` around the call and ``jax.block_until_ready``) after
warm-up calls that include compilation; the reported figure is the median of
``--repeats`` calls made back to back (the steady state, with output
buffers recycled; see ``run_cases``). PRNG keys are split before timing starts
and passed to the jitted functions as arguments (a fresh key per call), so key
generation is not timed.

Rows, for each size and dtype:

  the copy floor ``x * 2``, forward and forward+backward (gradient of the
  float32 sum), the cheapest op that reads and writes the array once;
  noise ops, forward and forward+backward (``jax.value_and_grad`` of
  ``sum(op(x))`` with respect to ``x``):
    regjax.dropout(0.5), regjax.gaussian_dropout(0.5), regjax.uout(0.1),
    flax.linen.Dropout(0.5) (via ``.apply({}, x, rngs={'dropout': key})``).
  BatchNorm on ``(N, C)`` (features on the last axis):
    train forward+backward (``jax.vjp`` with a fixed random cotangent, gradients
    with respect to ``x``, ``scale`` and ``bias``, plus the updated running
    statistics), train forward, and eval forward, for regjax.linen.BatchNorm,
    flax.linen.BatchNorm(use_fast_variance=True) (flax's default) and
    flax.linen.BatchNorm(use_fast_variance=False).

Ratios: ``vs copy`` divides by the copy floor of the same kind (forward, or
forward+backward) and shape; ``vs flax`` divides by flax.linen.Dropout for the
noise ops and by flax.linen.BatchNorm(use_fast_variance=True) for BatchNorm.

Usage (from the repository root):

  python benchmarks/run.py
  python benchmarks/run.py --sizes small --dtypes float32 --repeats 10

Results (all medians, plus the per-call times, versions, device and date) go
to ``--out`` (default ``runs/benchmarks/results.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jaxlib
import jax.numpy as jnp

import regjax
import regjax.linen as rnn

SIZES = {"small": (64, 1024), "large": (256, 16384)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
WARMUP = 3


# ------------------------------------------------------------------------------- timing


class Case:
  """One timed row: a jitted function and the arguments of its ``i``-th call."""

  def __init__(self, group: str, op: str, mode: str, fn: Callable,
               args: Callable[[int], tuple]):
    self.meta = {"group": group, "op": op, "mode": mode}
    self.fn, self.args = jax.jit(fn), args


def run_cases(cases: list[Case], warmup: int, repeats: int) -> list[dict[str, Any]]:
  """Times every case: ``warmup`` untimed calls (compilation included), then
  ``repeats`` calls each timed on its own (``perf_counter`` around the call and
  ``jax.block_until_ready``).

  A case's calls run back to back, so its output buffers are recycled by the
  allocator: this is the kernel's steady-state cost. (Interleaving the cases
  instead makes large outputs land on fresh pages at random, and on XLA:CPU
  the page faults can cost more than the kernel: 16 MiB of float32 ``x * 2``
  takes ~2 ms recycled and ~9 ms on fresh pages on a 2-core machine.)
  """
  rows = []
  for case in cases:
    for i in range(warmup):
      jax.block_until_ready(case.fn(*case.args(i)))
    times = []
    for i in range(warmup, warmup + repeats):
      args = case.args(i)
      start = time.perf_counter()
      jax.block_until_ready(case.fn(*args))
      times.append(time.perf_counter() - start)
    rows.append(dict(case.meta, times_s=times))
  return rows


# ---------------------------------------------------------------------------------- ops


def sum_grad(f: Callable) -> Callable:
  """``(x, *rest) -> (sum(f(x, *rest)), d sum / dx)``; the sum is taken in float32."""
  return jax.value_and_grad(lambda x, *rest: jnp.sum(f(x, *rest), dtype=jnp.float32))


def copy_cases(x: jax.Array) -> list[Case]:
  """The floor: the cheapest elementwise op that reads and writes ``x`` once."""
  copy = lambda x: x * 2
  return [Case("floor", "copy x*2", "fwd", copy, lambda i: (x,)),
          Case("floor", "copy x*2", "fwd+bwd", sum_grad(copy), lambda i: (x,))]


def noise_cases(x: jax.Array, keys: list[jax.Array]) -> list[Case]:
  """Train-mode forward and forward+backward of each noise op; key ``i`` for call ``i``."""
  flax_dropout = nn.Dropout(0.5)
  ops = {
      "regjax.dropout(0.5)": lambda x, key: regjax.dropout(x, 0.5, key=key),
      "regjax.gaussian_dropout(0.5)": lambda x, key: regjax.gaussian_dropout(x, 0.5, key=key),
      "regjax.uout(0.1)": lambda x, key: regjax.uout(x, 0.1, key=key),
      "flax Dropout(0.5)": lambda x, key: flax_dropout.apply(
          {}, x, deterministic=False, rngs={"dropout": key}),
  }
  cases = []
  for name, f in ops.items():
    args = lambda i: (x, keys[i])
    cases.append(Case("noise", name, "fwd", f, args))
    cases.append(Case("noise", name, "fwd+bwd", sum_grad(f), args))
  return cases


def batch_norm_cases(x: jax.Array, cotangent: jax.Array) -> list[Case]:
  """BatchNorm on ``(N, C)``: train forward+backward, train forward, eval forward."""
  makers = {
      "regjax BatchNorm": lambda eval_mode: rnn.BatchNorm(use_running_average=eval_mode),
      "flax BatchNorm(fast_var=True)": lambda eval_mode: nn.BatchNorm(
          use_running_average=eval_mode, use_fast_variance=True),
      "flax BatchNorm(fast_var=False)": lambda eval_mode: nn.BatchNorm(
          use_running_average=eval_mode, use_fast_variance=False),
  }
  cases = []
  for name, make in makers.items():
    train_module, eval_module = make(False), make(True)
    variables = train_module.init(jax.random.key(0), x)
    # Running statistics as after some training, so eval does not divide by 1.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}

    def train_fwd_bwd(variables, x, ct, m=train_module):
      def f(params, x):
        return m.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                       mutable=["batch_stats"])

      y, vjp, updates = jax.vjp(f, variables["params"], x, has_aux=True)
      grad_params, grad_x = vjp(ct.astype(y.dtype))
      return y, grad_params, grad_x, updates

    train_fwd = lambda variables, x, m=train_module: m.apply(variables, x,
                                                             mutable=["batch_stats"])
    eval_fwd = lambda variables, x, m=eval_module: m.apply(variables, x)
    cases.append(Case("batchnorm", name, "train fwd+bwd", train_fwd_bwd,
                      lambda i, v=variables: (v, x, cotangent)))
    cases.append(Case("batchnorm", name, "train fwd", train_fwd, lambda i, v=variables: (v, x)))
    cases.append(Case("batchnorm", name, "eval fwd", eval_fwd, lambda i, v=variables: (v, x)))
  return cases


# -------------------------------------------------------------------------------- report


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds ``median_ms`` and the ratios to the copy floor and to flax."""
  for r in rows:
    r["median_ms"] = 1e3 * statistics.median(r["times_s"])
    r["min_ms"] = 1e3 * min(r["times_s"])
  index = {(r["size"], r["dtype"], r["op"], r["mode"]): r for r in rows}
  flax_ref = {"noise": "flax Dropout(0.5)", "batchnorm": "flax BatchNorm(fast_var=True)"}
  for r in rows:
    base = (r["size"], r["dtype"])
    # The copy floor of the same kind: forward, or forward+backward.
    copy_mode = "fwd+bwd" if r["mode"].endswith("fwd+bwd") else "fwd"
    copy = index.get(base + ("copy x*2", copy_mode))
    ref = index.get(base + (flax_ref.get(r["group"]), r["mode"]))
    r["vs_copy"] = r["median_ms"] / copy["median_ms"] if copy else None
    r["vs_flax"] = r["median_ms"] / ref["median_ms"] if ref else None


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (f"{'size':<6} {'shape':<12} {'dtype':<9} {'op':<31} {'mode':<14} "
            f"{'median ms':>10} {'vs copy':>8} {'vs flax':>8}")
  lines = [header, "-" * len(header)]
  previous = None
  for r in rows:
    group = (r["size"], r["dtype"], r["group"])
    if previous is not None and group != previous:
      lines.append("")
    previous = group
    fmt = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"
    shape = "x".join(map(str, r["shape"]))
    lines.append(f"{r['size']:<6} {shape:<12} {r['dtype']:<9} {r['op']:<31} {r['mode']:<14} "
                 f"{r['median_ms']:10.3f} {fmt(r['vs_copy'])} {fmt(r['vs_flax'])}")
  return "\n".join(lines)


def git_state() -> dict[str, Any]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "regjax"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip())
    return {"commit": commit, "regjax_dirty": dirty}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": None, "regjax_dirty": None}


def loadavg() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def parse_list(value: str, allowed) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {value!r}")
  return items


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Time regjax's noise ops and BatchNorm against flax and a copy floor.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--sizes", type=lambda v: parse_list(v, SIZES), default="small,large",
                 help="comma-separated, from " + ", ".join(
                     f"{k}={'x'.join(map(str, v))}" for k, v in SIZES.items()))
  p.add_argument("--dtypes", type=lambda v: parse_list(v, DTYPES), default="float32,bfloat16",
                 help=f"comma-separated, from {', '.join(DTYPES)}")
  p.add_argument("--repeats", type=int, default=30, help="timed calls per row (median taken)")
  p.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls per row first")
  p.add_argument("--out", default=os.path.join("runs", "benchmarks", "results.json"),
                 help="JSON results path")
  args = p.parse_args(argv)
  if args.repeats < 1 or args.warmup < 1:
    p.error("--repeats and --warmup must be >= 1")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, flax {flax.__version__}, regjax {regjax.__version__}; "
        f"device {device} ({device.device_kind}); {args.repeats} timed calls per row "
        f"after {args.warmup} warm-up", flush=True)
  load_start = loadavg()
  start = time.perf_counter()
  n_calls = args.warmup + args.repeats
  keys = list(jax.random.split(jax.random.key(0), n_calls))
  rows = []
  for size in args.sizes:
    shape = SIZES[size]
    for dtype_name in args.dtypes:
      dtype = DTYPES[dtype_name]
      x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
      # BN output is float32 (flax's dtype rule: params are float32).
      cotangent = jax.random.normal(jax.random.key(2), shape, jnp.float32)
      cases = copy_cases(x) + noise_cases(x, keys) + batch_norm_cases(x, cotangent)
      t0 = time.perf_counter()
      new = run_cases(cases, args.warmup, args.repeats)
      for r in new:
        r.update(size=size, shape=list(shape), dtype=dtype_name)
      rows.extend(new)
      print(f"  {size} {shape} {dtype_name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
            flush=True)
  add_ratios(rows)
  print(format_table(rows))

  results = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "regjax": regjax.__version__,
      "git": git_state(),
      "device": str(device), "device_kind": device.device_kind, "platform": device.platform,
      "cpu_count": os.cpu_count(), "python": platform.python_version(),
      # 1/5/15-minute load averages at the start and end: timings on a loaded
      # shared machine are noisy.
      "loadavg_start": load_start, "loadavg_end": loadavg(),
      "machine": platform.machine(),
      "repeats": args.repeats, "warmup": args.warmup,
      "sizes": {s: list(SIZES[s]) for s in args.sizes}, "dtypes": args.dtypes,
      "total_seconds": time.perf_counter() - start,
      "rows": [{k: (v if k != "times_s" else [round(t, 9) for t in v]) for k, v in r.items()}
               for r in rows],
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(f"total {results['total_seconds']:.0f} s; load average {load_start} at start, "
        f"{results['loadavg_end']} at end; results written to {args.out}")
  return results


if __name__ == "__main__":
  main()

"""Times regjax's noise ops, BatchNorm and a CNN train step; checks the targets.

One command, one process, every timed function ``jax.jit``-compiled. From the
repository root:

  python -m benchmarks.run                   # default: small+large, float32+bfloat16
  python -m benchmarks.run --sizes small --dtypes float32 --rounds 5
  python -m benchmarks.run --sizes 8x256 --sections noise,memory --rounds 1 --calls 1

Sections (``--sections``, default all): ``noise`` (benchmarks/cases/noise.py),
``batchnorm`` (cases/batch_norm.py), ``trainstep`` (cases/model_step.py) and
``memory`` (cases/memory.py). Timing and ratios: benchmarks/timing.py. Output: a
table, a MEMORY table, the TARGETS verdicts (benchmarks/targets.toml) and the JSON
``--out`` (default ``runs/benchmarks/results.json``): every row's per-call times
and median, the memory figures, the train-step times, target verdicts and the
environment (versions, device, CPU count, load average, git commit).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from benchmarks import environment, report
from benchmarks.cases import batch_norm, memory, model_step, noise
from benchmarks.timing import calls_needed, run_cases, steady_malloc_environ

SIZES = {"small": (64, 1024), "large": (256, 16384)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SECTIONS = ("noise", "batchnorm", "trainstep", "memory")


def parse_size(value: str) -> str:
  if value in SIZES:
    return value
  parts = value.lower().split("x")
  if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
    return value.lower()
  raise argparse.ArgumentTypeError(
    f"a size is one of {', '.join(SIZES)} or ROWSxCOLS; got {value!r}"
  )


def size_shape(size: str) -> tuple[int, int]:
  if size in SIZES:
    return SIZES[size]
  rows, cols = size.split("x")
  return int(rows), int(cols)


def parse_list(value: str, check: Callable[[str], str]) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if not items:
    raise argparse.ArgumentTypeError("empty list")
  return [check(v) for v in items]


def choice(allowed) -> Callable[[str], str]:
  def check(v: str) -> str:
    if v not in allowed:
      raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {v!r}")
    return v

  return check


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description="Time regjax's noise ops, BatchNorm and a CNN train step against flax and "
    "a copy floor; check the performance targets.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--sizes",
    type=lambda v: parse_list(v, parse_size),
    default="small,large",
    help="comma-separated: "
    + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in SIZES.items())
    + ", or ROWSxCOLS",
  )
  p.add_argument(
    "--dtypes",
    type=lambda v: parse_list(v, choice(DTYPES)),
    default="float32,bfloat16",
    help=f"comma-separated, from {', '.join(DTYPES)}",
  )
  p.add_argument(
    "--sections",
    type=lambda v: parse_list(v, choice(SECTIONS)),
    default=",".join(SECTIONS),
    help=f"comma-separated, from {', '.join(SECTIONS)}",
  )
  p.add_argument(
    "--ops",
    type=lambda v: parse_list(v, str),
    default=None,
    metavar="OPS",
    help="comma-separated substrings: time only the noise ops (and memory rows) "
    "whose name contains one, plus their references and the copy floor "
    "(unset: all ops)",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=9,
    help="interleaved rounds; every case runs one timed block per round",
  )
  p.add_argument("--calls", type=int, default=3, help="timed calls per case per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
  p.add_argument(
    "--no-steady-malloc",
    action="store_true",
    help="keep glibc's default allocator settings (by default the benchmark "
    "re-runs itself with STEADY_MALLOC so that buffers are not "
    "page-faulted afresh)",
  )
  p.add_argument(
    "--out", default=os.path.join("runs", "benchmarks", "results.json"), help="JSON results path"
  )
  args = p.parse_args(argv)
  if args.rounds < 1 or args.calls < 1 or args.warmup < 1:
    p.error("--rounds, --calls and --warmup must be >= 1")
  return args


def array_sections(
  args: argparse.Namespace, keys: dict[str, list[jax.Array]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The noise, batchnorm and memory sections at every size and dtype: rows, memory."""
  rows: list[dict[str, Any]] = []
  memory_rows: list[dict[str, Any]] = []
  for size in args.sizes:
    shape = size_shape(size)
    for dtype_name in args.dtypes:
      t0 = time.perf_counter()
      x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(DTYPES[dtype_name])
      ct = jax.random.normal(jax.random.key(2), shape, jnp.float32).astype(DTYPES[dtype_name])
      cases = []
      if "noise" in args.sections or "batchnorm" in args.sections:
        cases += noise.copy_cases(x, ct)
      if "noise" in args.sections:
        cases += noise.noise_cases(x, ct, keys, args.ops)
      if "batchnorm" in args.sections:
        # BN's output is float32 (flax's dtype rule: float32 params); the vjp casts.
        cases += batch_norm.batch_norm_cases(x, ct.astype(jnp.float32))
      new = run_cases(cases, args)
      where = {"size": size, "shape": list(shape), "dtype": dtype_name}
      if "memory" in args.sections:
        memory_rows += [
          dict(m, **where)
          for m in memory.memory_rows(x, ct, keys[noise.DEFAULT_KEY_IMPL][0], args.ops)
        ]
      rows += [dict(r, **where) for r in new]
      print(
        f"  {size} {shape} {dtype_name}: {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
        flush=True,
      )
  return rows, memory_rows


def train_step_section(args: argparse.Namespace) -> dict[str, Any]:
  """The trainstep section; a failure is reported and kept, the other sections stand."""
  t0 = time.perf_counter()
  try:
    result = model_step.train_step_rows(args)
  except Exception as e:  # report it, keep the other sections' results
    print(f"    FAILED train step: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    result = {"error": f"{type(e).__name__}: {e}", "rows": []}
  print(f"  train step: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  return result


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  device = jax.devices()[0]
  env = environment.environment(device)
  print(
    f"jax {jax.__version__}, flax {flax.__version__}, regjax {env['regjax']}; device "
    f"{device} ({device.device_kind}), {os.cpu_count()} CPUs; {args.rounds} rounds of "
    f"{args.calls} timed calls per case after {args.warmup} warm-up; rng_impl: "
    f"{env['rng_impl']}",
    flush=True,
  )
  env["loadavg_start"] = environment.loadavg()
  start = time.perf_counter()
  keys = {
    impl: list(jax.random.split(jax.random.key(0, impl=impl), calls_needed(args)))
    for impl in (noise.DEFAULT_KEY_IMPL, *noise.FLAX_KEY_IMPLS)
  }
  rows, memory_rows = array_sections(args, keys)
  train_step = train_step_section(args) if "trainstep" in args.sections else None
  rows += train_step["rows"] if train_step else []
  report.add_ratios(rows)
  targets = report.evaluate_targets(rows, memory_rows, args.dtypes)
  print(report.format_table(rows))
  if memory_rows:
    print("\nMEMORY: what the backward keeps (vjp residual bytes / x.size) and XLA temp bytes")
    print(report.format_memory(memory_rows))
  print()
  print(report.format_targets(targets))

  env["loadavg_end"] = environment.loadavg()
  total = time.perf_counter() - start
  results = {
    **env,
    "options": {
      "sizes": {s: list(size_shape(s)) for s in args.sizes},
      "dtypes": args.dtypes,
      "sections": args.sections,
      "ops": args.ops,
      "rounds": args.rounds,
      "calls": args.calls,
      "warmup": args.warmup,
    },
    "total_seconds": total,
    "rows": report.rounded_rows(rows),
    "memory": memory_rows,
    "train_step": None
    if train_step is None
    else {k: v for k, v in train_step.items() if k != "rows"},
    "targets": targets,
  }
  report.write_json(results, args.out)
  print(
    f"\ntotal {total:.0f} s; load average {env['loadavg_start']} at start, "
    f"{env['loadavg_end']} at end; results written to {args.out}"
  )
  return results


if __name__ == "__main__":
  env = None if "--no-steady-malloc" in sys.argv else steady_malloc_environ()
  if env is not None:  # glibc reads these at startup: start again with them
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:]], env)
  main()

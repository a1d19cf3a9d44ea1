"""Benchmark suite for regjax: noise ops, BatchNorm, a training step, memory.

One command, one process, every timed function ``jax.jit``-compiled:

  python benchmarks/run.py                      # default: small+large, float32+bfloat16
  python benchmarks/run.py --sizes small --dtypes float32 --rounds 5
  python benchmarks/run.py --sizes 8x256 --sections noise,memory --rounds 1 --calls 1

Sections (``--sections``, default all):

  noise      forward ("fwd") and forward+backward ("fwd+bwd": ``jax.vjp`` with a
             fixed random cotangent, returning the output and the input
             gradient) of every regjax noise op, of its flax.linen /
             Keras-style reference, and of the copy floor ``x * 2``;
             channel_dropout, dropblock and cutout run on a 4-D (N, H, W, C)
             view of the same elements. When ``rng_impl`` is a parameter of
             an op, ``rng_impl='jax'`` is timed as an extra row.
  batchnorm  BatchNorm on (N, C): train fwd+bwd (vjp w.r.t. x, scale, bias,
             plus the running-statistics update), train fwd, eval fwd, for
             regjax.linen.BatchNorm and flax.linen.BatchNorm with
             use_fast_variance=True (flax's default: the reference) and False.
  trainstep  one jitted training step (forward, loss, grad, optax adamw,
             batch_stats update: examples/training.py's ``train_step``) of the
             example CNN (examples/models.py ``default_cnn('mnist1d')``,
             conv-bn-act-drop-pool x3, dropout 0.5 in the blocks, batch
             (128, 40, 1)) with regjax.linen layers, against a flax.linen twin
             (flax Dropout / BatchNorm, identical parameter shapes).
  memory     what the backward of a noise op keeps: the bytes of the array
             leaves of the vjp function returned from a jitted ``jax.vjp``
             (its residuals), divided by ``x.size``; plus XLA's
             ``memory_analysis()`` of the compiled forward+backward.

Timing: every case first gets ``--warmup`` untimed calls (compilation
included). Then ``--rounds`` interleaved rounds: in each, every case runs one
block of one untimed call and ``--calls`` calls timed one by one
(``perf_counter`` around the call and ``jax.block_until_ready``). A row's
``median ms`` is the median of all its timed calls. PRNG keys are made before
timing and passed in as arguments (a fresh key per call).

Ratios: "vs copy" compares with the copy floor of the same mode ("fwd" or
"fwd+bwd") and size/dtype, "vs ref" with the row's reference; each is the
median over rounds of the ratio of the two rows' per-round medians, so both
sides are timed seconds apart and the machine's slow drifts cancel. The "ref
95% CI" column is its distribution-free 95 % interval (order statistics of
the per-round ratios); the references are listed in benchmarks/README.md
and under ``ref`` in the JSON. The TARGETS section checks the
targets and prints PASS/FAIL with the measured value and its interval,
marked "~" when the interval straddles the limit (a tie within noise).

Results go to ``--out`` (default ``runs/benchmarks/results.json``): every row's
per-call times and median, the memory figures, the train-step times, target
verdicts and the environment (versions, device, CPU count, load average, git
commit).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import optax

import regjax
import regjax.linen as rnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"small": (64, 1024), "large": (256, 16384)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SECTIONS = ("noise", "batchnorm", "trainstep", "memory")
COPY = "copy x*2"
FLAX_BN = "flax BatchNorm(fast_var=True)"


# ------------------------------------------------------------------------------- timing


# glibc settings under which freed buffers stay in the heap: without them arrays above
# glibc's mmap threshold (32 MiB at most) are mmapped and page-faulted afresh on every
# call, and heap trimming re-faults smaller ones at random. A 32 MiB copy then measured
# 13 ms instead of 2.5 ms, and ratios swung with whichever side allocated more.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
                 "MALLOC_TOP_PAD_": str(1 << 29)}


def steady_malloc_environ() -> dict[str, str] | None:
  """The environment to re-run this script in, or None when it already has the settings."""
  if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
    return None
  return {**os.environ, **STEADY_MALLOC}



class Case:
  """One timed row: a jitted function, the arguments of its ``i``-th call, a reference."""

  def __init__(self, group: str, op: str, mode: str, fn: Callable,
               args: Callable[[int], tuple], ref: str | None = None):
    self.meta = {"group": group, "op": op, "mode": mode, "ref": ref}
    self.fn, self.args = jax.jit(fn), args


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


def calls_needed(opts: argparse.Namespace) -> int:
  """Calls one case makes: warm-up, then per round one untimed and ``--calls`` timed."""
  return opts.warmup + opts.rounds * (opts.calls + 1)


def run_cases(cases: list[Case], opts: argparse.Namespace) -> list[dict[str, Any]]:
  """Times the cases in interleaved rounds.

  After ``--warmup`` calls per case (compilation included), each of ``--rounds``
  rounds runs every case once as a block: one untimed call, then ``--calls``
  timed calls back to back (so a case's outputs reuse its own freed buffers:
  the kernel's steady-state cost, not page faults). A row's ratio to another
  row is the median over rounds of the two rows' per-round medians, so both
  sides of a ratio are measured within seconds of each other and slow drifts
  of this shared machine cancel out.
  """
  rows = [dict(case.meta, times_s=[], round_medians_s=[]) for case in cases]
  alive = [True] * len(cases)

  def attempt(i, body):
    try:
      body()
    except Exception as e:  # noqa: BLE001 - one broken op must not sink the run
      meta = cases[i].meta
      print(f"    FAILED {meta['op']} {meta['mode']}: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
      rows[i].update(times_s=[], round_medians_s=[], error=f"{type(e).__name__}: {e}")
      alive[i] = False

  for i, case in enumerate(cases):
    attempt(i, lambda c=case: [jax.block_until_ready(c.fn(*c.args(k)))
                               for k in range(opts.warmup)])
  for r in range(opts.rounds):
    first = opts.warmup + r * (opts.calls + 1)
    for i, case in enumerate(cases):
      if not alive[i]:
        continue

      def block(i=i, case=case):
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


# ---------------------------------------------------------------------------- noise ops


def vjp_fn(f: Callable) -> Callable:
  """``(x, key, ct) -> (f(x, key), vjp(ct))``: forward+backward with a fixed cotangent."""

  def g(x, key, ct):
    y, pullback = jax.vjp(lambda x: f(x, key), x)
    return y, pullback(ct.astype(y.dtype))[0]

  return g


def as_4d(x: jax.Array) -> jax.Array:
  """``(N, D)`` viewed as ``(N, H, W, C)`` with ``H == W`` (same elements)."""
  n, d = x.shape
  for c in (16, 4, 1, 64, 8, 2, 32, 3):
    if d % c == 0 and math.isqrt(d // c) ** 2 == d // c:
      h = math.isqrt(d // c)
      return x.reshape(n, h, h, c)
  return x.reshape(n, 1, d, 1)


def has_rng_impl(fn: Callable) -> bool:
  try:
    return "rng_impl" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


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
  a = (keep + alpha_p ** 2 * keep * rate) ** -0.5
  b = -a * alpha_p * rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return (a * jnp.where(mask, x, jnp.asarray(alpha_p, x.dtype)) + b).astype(x.dtype)


def straightforward_gaussian_noise(x, stddev, key):
  return x + stddev * jax.random.normal(key, x.shape, x.dtype)


def flax_dropout(rate: float, broadcast_dims=()) -> Callable:
  module = nn.Dropout(rate, broadcast_dims=broadcast_dims)
  return lambda x, key: module.apply({}, x, deterministic=False, rngs={"dropout": key})


# The PRNG implementations flax's Dropout is timed with: its mask comes from
# jax.random.bernoulli of a key of that implementation.
FLAX_KEY_IMPLS = ("rbg", "unsafe_rbg")
DEFAULT_KEY_IMPL = "threefry2x32"  # every other row's keys


def noise_ops(x4: jax.Array) -> list[tuple[str, Callable, bool, str | None]]:
  """``(name, f(x, key), on_4d, reference name)``; references have reference None.

  A name ending in ``[rbg key]`` or ``[unsafe_rbg key]`` gets keys of that PRNG
  implementation (see ``noise_cases``); every other row gets threefry keys.
  """
  h = x4.shape[1]
  block = max(1, min(5, h))
  cut = max(1, h // 2)
  ops: list[tuple[str, Callable, bool, str | None]] = []

  ref = "flax Dropout(0.5)"
  ops.append(("regjax.dropout(0.5)", lambda x, key: regjax.dropout(x, 0.5, key=key), False,
              ref))
  ops.append((ref, flax_dropout(0.5), False, None))
  for impl in FLAX_KEY_IMPLS:
    ops.append((f"{ref} [{impl} key]", flax_dropout(0.5), False, ref))

  ref = "straightforward gaussian_dropout(0.5)"
  ops.append(("regjax.gaussian_dropout(0.5)",
              lambda x, key: regjax.gaussian_dropout(x, 0.5, key=key), False, ref))
  ops.append((ref, lambda x, key: straightforward_gaussian_dropout(x, 0.5, key), False, None))

  ref = "straightforward uout(0.1)"
  ops.append(("regjax.uout(0.1)", lambda x, key: regjax.uout(x, 0.1, key=key), False, ref))
  ops.append((ref, lambda x, key: straightforward_uout(x, 0.1, key), False, None))
  ops += [(label, f, False, r) for label, f, r in rng_impl_rows()]

  optional = [
      ("alpha_dropout", "regjax.alpha_dropout(0.1)", lambda f: lambda x, key: f(x, 0.1, key=key),
       False, "keras-style alpha_dropout(0.1)",
       lambda x, key: straightforward_alpha_dropout(x, 0.1, key)),
      ("gaussian_noise", "regjax.gaussian_noise(0.1)",
       lambda f: lambda x, key: f(x, 0.1, key=key), False,
       "straightforward gaussian_noise(0.1)",
       lambda x, key: straightforward_gaussian_noise(x, 0.1, key)),
      ("channel_dropout", "regjax.channel_dropout(0.5) 4-D",
       lambda f: lambda x, key: f(x, 0.5, key=key), True,
       "flax Dropout(0.5, bcast H,W) 4-D", flax_dropout(0.5, broadcast_dims=(1, 2))),
      ("drop_path", "regjax.drop_path(0.2)", lambda f: lambda x, key: f(x, 0.2, key=key), False,
       "flax Dropout(0.2, bcast cols)", flax_dropout(0.2, broadcast_dims=(1,))),
      ("dropblock", f"regjax.dropblock(0.1, block={block}) 4-D",
       lambda f: lambda x, key: f(x, 0.1, key=key, block_size=block), True, None, None),
      ("cutout", f"regjax.cutout(size={cut}) 4-D",
       lambda f: lambda x, key: f(x, cut, key=key), True, None, None),
  ]
  for attr, label, make, on_4d, ref_name, ref_fn in optional:
    fn = getattr(regjax, attr, None)
    if fn is None:
      continue
    ops.append((label, make(fn), on_4d, ref_name))
    if ref_name is not None:
      ops.append((ref_name, ref_fn, on_4d, None))
    if has_rng_impl(fn):
      # The extra rng_impl='jax' row, against the same reference.
      jax_fn = (lambda fn: lambda *a, **kw: fn(*a, rng_impl="jax", **kw))(fn)
      head, _, tail = label.rpartition(")")
      ops.append((f"{head}, rng_impl='jax'){tail}", make(jax_fn), on_4d, ref_name))
  return ops


def rng_impl_rows() -> list[tuple[str, Callable, str]]:
  """Extra ``rng_impl='jax'`` rows for the mandatory ops whose signature has it."""
  rows = []
  for attr, label, value, ref in (
      ("dropout", "regjax.dropout(0.5, rng_impl='jax')", 0.5, "flax Dropout(0.5)"),
      ("gaussian_dropout", "regjax.gaussian_dropout(0.5, rng_impl='jax')", 0.5,
       "straightforward gaussian_dropout(0.5)"),
      ("uout", "regjax.uout(0.1, rng_impl='jax')", 0.1, "straightforward uout(0.1)")):
    fn = getattr(regjax, attr)
    if has_rng_impl(fn):
      rows.append((label, (lambda fn, v: lambda x, key: fn(x, v, key=key, rng_impl="jax"))(
          fn, value), ref))
  return rows


def copy_cases(x: jax.Array, ct: jax.Array) -> list[Case]:
  """The floor: the cheapest elementwise op that reads and writes ``x`` once."""
  copy = lambda x, key: x * 2
  return [Case("floor", COPY, "fwd", lambda x: x * 2, lambda i: (x,)),
          Case("floor", COPY, "fwd+bwd", lambda x, ct: vjp_fn(copy)(x, None, ct),
               lambda i: (x, ct))]


def select(names_refs: list[tuple[str, str | None]], patterns: list[str] | None) -> set[str]:
  """Names matching any of ``patterns`` (substrings; all when None), plus their references."""
  keep = {n for n, _ in names_refs if patterns is None or any(p in n for p in patterns)}
  return keep | {r for n, r in names_refs if n in keep and r is not None}


def key_impl(name: str) -> str:
  """The PRNG implementation a row's keys have (see ``noise_ops``)."""
  return next((impl for impl in FLAX_KEY_IMPLS if name.endswith(f"[{impl} key]")),
              DEFAULT_KEY_IMPL)


def noise_cases(x: jax.Array, ct: jax.Array, keys: dict[str, list[jax.Array]],
                patterns: list[str] | None = None) -> list[Case]:
  """Forward and forward+backward of each noise op; key ``i`` for call ``i``."""
  x4, ct4 = as_4d(x), as_4d(ct)
  ops = noise_ops(x4)
  keep = select([(o[0], o[3]) for o in ops], patterns)
  cases = []
  for name, f, on_4d, ref in ops:
    if name not in keep:
      continue
    xi, cti = (x4, ct4) if on_4d else (x, ct)
    ks = keys[key_impl(name)]
    cases.append(Case("noise", name, "fwd", f, lambda i, xi=xi, ks=ks: (xi, ks[i]), ref))
    cases.append(Case("noise", name, "fwd+bwd", vjp_fn(f),
                      lambda i, xi=xi, cti=cti, ks=ks: (xi, ks[i], cti), ref))
  return cases


# ---------------------------------------------------------------------------- batchnorm


def program_text(fn: Callable, args: tuple) -> str:
  """The optimized XLA program of ``jax.jit(fn)(*args)``, without source locations."""
  text = re.sub(r", metadata=\{[^}]*\}", "", jax.jit(fn).lower(*args).compile().as_text())
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
      c.meta["same_program_as_ref"] = (program_text(c.fn, c.args(0))
                                       == program_text(ref.fn, ref.args(0)))


def batch_norm_cases(x: jax.Array, cotangent: jax.Array) -> list[Case]:
  """BatchNorm on ``(N, C)``: train forward+backward, train forward, eval forward."""
  makers = {
      "regjax BatchNorm": lambda eval_mode: rnn.BatchNorm(use_running_average=eval_mode),
      FLAX_BN: lambda eval_mode: nn.BatchNorm(use_running_average=eval_mode,
                                              use_fast_variance=True),
      "flax BatchNorm(fast_var=False)": lambda eval_mode: nn.BatchNorm(
          use_running_average=eval_mode, use_fast_variance=False),
  }
  cases = []
  for name, make in makers.items():
    ref = None if name == FLAX_BN else FLAX_BN
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
                      lambda i, v=variables: (v, x, cotangent), ref))
    cases.append(Case("batchnorm", name, "train fwd", train_fwd, lambda i, v=variables: (v, x),
                      ref))
    cases.append(Case("batchnorm", name, "eval fwd", eval_fwd, lambda i, v=variables: (v, x),
                      ref))
  mark_identical_programs([c for c in cases if c.meta["mode"] == "eval fwd"])
  return cases


# ---------------------------------------------------------------------------- trainstep


class FlaxCNN(nn.Module):
  """The example CNN (conv-bn-act-drop-pool blocks, then dense-BN-act-classifier) built
  from flax.linen.Dropout / BatchNorm; same submodule names and parameter shapes."""

  features: tuple[int, ...]
  hidden: int = 64
  num_classes: int = 10
  kernel_size: int = 3
  bn_momentum: float = 0.9
  rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spatial = x.ndim - 2
    window = (2,) * spatial
    for i, features in enumerate(self.features):
      x = nn.Conv(features, (self.kernel_size,) * spatial, padding="SAME", use_bias=False,
                  name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       name=f"bn{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.rate, deterministic=not train, name=f"noise{i}")(x)
      x = nn.max_pool(x, window, strides=window, padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.hidden, use_bias=False, name="dense")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     name="head_bn")(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name="classifier")(x)


def train_step_rows(opts: argparse.Namespace) -> dict[str, Any]:
  """Times one jitted training step of the example CNN, regjax layers vs flax layers."""
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  import models  # noqa: PLC0415 - examples/ is not a package
  import training  # noqa: PLC0415

  batch, length, num_classes = 128, 40, 10
  regjax_model = models.default_cnn("mnist1d", num_classes, block_noise="dropout",
                                    block_noise_value=0.5)
  flax_model = FlaxCNN(features=regjax_model.features, hidden=regjax_model.hidden,
                       num_classes=num_classes, kernel_size=regjax_model.kernel_size,
                       bn_momentum=regjax_model.bn_momentum, rate=0.5)
  tx = training.make_optimizer(3e-3, 1, 1000)
  x = jax.random.normal(jax.random.key(3), (batch, length, 1), jnp.float32)
  y = jax.random.randint(jax.random.key(4), (batch,), 0, num_classes)
  keys = list(jax.random.split(jax.random.key(5), calls_needed(opts)))
  out: dict[str, Any] = {"batch_shape": [batch, length, 1], "model": "default_cnn('mnist1d'), "
                         "conv-bn-act-drop-pool x3, dropout 0.5 in the blocks", "rows": []}
  shapes, cases = {}, []
  for name, model in (("regjax layers", regjax_model), ("flax layers", flax_model)):
    state = training.init_state(model, tx, jax.random.key(0), x)
    shapes[name] = jax.tree.map(lambda a: tuple(a.shape), state.params)
    fn = lambda state, x, y, key, model=model: training.train_step(model, tx, state, x, y, key)
    cases.append(Case("trainstep", f"CNN train step, {name}", "train step", fn,
                      lambda i, s=state: (s, x, y, keys[i]),
                      None if name == "flax layers" else "CNN train step, flax layers"))
  out["rows"] = run_cases(cases, opts)
  out["same_param_shapes"] = shapes["regjax layers"] == shapes["flax layers"]
  if not out["same_param_shapes"]:
    print("  WARNING: the flax twin's parameter shapes differ from the example CNN's",
          file=sys.stderr)
  return out


# ------------------------------------------------------------------------------- memory


def array_nbytes(leaf) -> int:
  if not hasattr(leaf, "dtype"):
    return 0
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return int(jax.random.key_data(leaf).nbytes)
  return int(leaf.size) * leaf.dtype.itemsize


def memory_rows(x: jax.Array, ct: jax.Array, key: jax.Array,
                patterns: list[str] | None = None) -> list[dict[str, Any]]:
  """Bytes per element the backward of each noise op keeps (vjp residuals), plus XLA's
  ``memory_analysis`` of the compiled forward+backward."""
  ops = [("copy x*2 (floor)", lambda x, key: x * 2)]
  ops.append(("regjax.dropout(0.5)", lambda x, key: regjax.dropout(x, 0.5, key=key)))
  for label, f, _ in rng_impl_rows():
    if "dropout(0.5" in label and "gaussian" not in label:
      ops.append((label, f))
  ops.append(("flax Dropout(0.5)", flax_dropout(0.5)))
  ops.append(("regjax.gaussian_dropout(0.5)",
              lambda x, key: regjax.gaussian_dropout(x, 0.5, key=key)))
  ops.append(("straightforward gaussian_dropout(0.5)",
              lambda x, key: straightforward_gaussian_dropout(x, 0.5, key)))
  ops.append(("regjax.uout(0.1)", lambda x, key: regjax.uout(x, 0.1, key=key)))
  ops.append(("straightforward uout(0.1)", lambda x, key: straightforward_uout(x, 0.1, key)))
  for label, f, _ in rng_impl_rows():
    if "dropout(0.5" not in label or "gaussian" in label:
      ops.append((label, f))
  refs = {"regjax.gaussian_dropout": "straightforward gaussian_dropout(0.5)",
          "regjax.uout": "straightforward uout(0.1)", "regjax.dropout": "flax Dropout(0.5)"}
  keep = select([(n, next((r for p, r in refs.items() if n.startswith(p + "(")), None))
                 for n, _ in ops], patterns) | {"copy x*2 (floor)"}
  rows = []
  for name, f in ops:
    if name not in keep:
      continue
    row: dict[str, Any] = {"op": name}
    try:
      residuals = jax.jit(lambda x, key, f=f: jax.vjp(lambda x: f(x, key), x)[1])(x, key)
      leaves = [l for l in jax.tree.leaves(residuals) if hasattr(l, "dtype")]
      kept = sum(array_nbytes(l) for l in leaves)
      row["residuals"] = [f"{l.dtype}{list(l.shape)}" for l in leaves]
      row["residual_bytes"] = kept
      row["bytes_per_element"] = kept / x.size
      compiled = jax.jit(vjp_fn(f)).lower(x, key, ct).compile()
      stats = compiled.memory_analysis()
      if stats is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                      "temp_size_in_bytes"):
          row[field] = getattr(stats, field, None)
        if row.get("temp_size_in_bytes") is not None:
          row["temp_bytes_per_element"] = row["temp_size_in_bytes"] / x.size
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {e}"
      print(f"    FAILED memory {name}: {row['error']}", file=sys.stderr, flush=True)
    rows.append(row)
  return rows


# -------------------------------------------------------------------------------- report


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds ``median_ms``, ``min_ms``, ``n`` and the ratios to the copy floor and reference.

  A ratio is the median over rounds of the per-round median ratios (see
  ``run_cases``), with its distribution-free 95 % interval (``*_ci``).
  """
  for r in rows:
    r["n"] = len(r["times_s"])
    r["median_ms"] = 1e3 * statistics.median(r["times_s"]) if r["times_s"] else None
    r["min_ms"] = 1e3 * min(r["times_s"]) if r["times_s"] else None
  index = {(r.get("size"), r.get("dtype"), r["op"], r["mode"]): r for r in rows}

  def ratio(r, other):
    if other is None or not r["round_medians_s"] or not other.get("round_medians_s"):
      return None, None
    per_round = [a / b for a, b in zip(r["round_medians_s"], other["round_medians_s"])]
    return statistics.median(per_round), median_ci(per_round)

  for r in rows:
    base = (r.get("size"), r.get("dtype"))
    copy = None
    if r["group"] in ("floor", "noise", "batchnorm"):
      copy_mode = "fwd+bwd" if r["mode"].endswith("fwd+bwd") else "fwd"
      copy = index.get(base + (COPY, copy_mode))
    ref = index.get(base + (r["ref"], r["mode"])) if r.get("ref") else None
    r["vs_copy"], r["vs_copy_ci"] = ratio(r, copy)
    r["vs_ref"], r["vs_ref_ci"] = ratio(r, ref)


def fmt(v, width=8, digits=2) -> str:
  return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def fmt_ci(ci) -> str:
  return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (f"{'op':<46} {'size':<6} {'dtype':<9} {'mode':<14} {'median ms':>10} "
            f"{'vs copy':>8} {'vs ref':>8} {'ref 95% CI':>11} {'n':>4}")
  lines = [header, "-" * len(header)]
  previous = None
  for r in rows:
    group = (r.get("size"), r.get("dtype"), r["group"])
    if previous is not None and group != previous:
      lines.append("")
    previous = group
    median = f"{r['median_ms']:10.3f}" if r["median_ms"] is not None else f"{'FAILED':>10}"
    lines.append(f"{r['op']:<46} {str(r.get('size', '-')):<6} {str(r.get('dtype', '-')):<9} "
                 f"{r['mode']:<14} {median} {fmt(r['vs_copy'])} {fmt(r['vs_ref'])} "
                 f"{fmt_ci(r.get('vs_ref_ci')) if r.get('vs_ref') else '-':>11} {r['n']:>4}")
  return "\n".join(lines)


def format_memory(memory: list[dict[str, Any]]) -> str:
  header = (f"{'op':<46} {'size':<6} {'dtype':<9} {'kept B/elem':>11} {'temp B/elem':>11}  "
            "residuals")
  lines = [header, "-" * len(header)]
  for m in memory:
    res = ", ".join(m.get("residuals", [])) or m.get("error", "")
    lines.append(f"{m['op']:<46} {m['size']:<6} {m['dtype']:<9} "
                 f"{fmt(m.get('bytes_per_element'), 11)} {fmt(m.get('temp_bytes_per_element'), 11)}"
                 f"  {res[:60]}")
  return "\n".join(lines)


# Cost of the fused generator against the copy floor of the same dtype (for bfloat16
# that is a copy of half the bytes): regjax.dropout, then regjax.uout.
DROPOUT_VS_COPY = {"float32": 1.5, "bfloat16": 2.5, "float16": 2.5}
UOUT_VS_COPY = {"float32": 1.6}


def evaluate_targets(rows: list[dict[str, Any]], memory: list[dict[str, Any]],
                     sizes: list[str], dtypes: list[str]) -> list[dict[str, Any]]:
  """The targets: ``{'target', 'measured', 'limit', 'verdict'}``; SKIP when not run."""
  index = {(r.get("size"), r.get("dtype"), r["op"], r["mode"]): r for r in rows}
  targets = []

  def check(name, value, limit, unit="x", same_program=False):
    value, ci = value if isinstance(value, tuple) else (value, None)
    verdict = "SKIP" if value is None else ("PASS" if value <= limit else "FAIL")
    # Decisive when the whole 95 % interval is on the verdict's side of the limit.
    decisive = None if ci is None or value is None else (ci[1] <= limit or ci[0] > limit)
    if same_program and value is not None and limit >= 1.0:
      verdict, decisive = "PASS", True  # the same XLA program: a ratio of 1 by construction
    targets.append({"target": name, "measured": value, "ci95": ci, "limit": limit,
                    "unit": unit, "verdict": verdict, "decisive": decisive,
                    "same_program": same_program})

  def get(size, dtype, op, mode, key):
    r = index.get((size, dtype, op, mode))
    return (None, None) if r is None else (r.get(key), r.get(key + "_ci"))

  for dtype in dtypes:
    for size in ("small", "large"):
      for mode in ("fwd", "fwd+bwd"):
        limit = DROPOUT_VS_COPY[dtype]
        check(f"regjax.dropout(0.5) {mode} <= {limit:g}x copy floor [{size} {dtype}]",
              get(size, dtype, "regjax.dropout(0.5)", mode, "vs_copy"), limit)
        if dtype in UOUT_VS_COPY:
          limit = UOUT_VS_COPY[dtype]
          check(f"regjax.uout(0.1) {mode} <= {limit:g}x copy floor [{size} {dtype}]",
                get(size, dtype, "regjax.uout(0.1)", mode, "vs_copy"), limit)
    for op in ("regjax.gaussian_dropout(0.5)", "regjax.uout(0.1)"):
      for mode in ("fwd", "fwd+bwd"):
        check(f"{op} {mode} <= 0.5x straightforward [large {dtype}]",
              get("large", dtype, op, mode, "vs_ref"), 0.5)
    check(f"regjax BatchNorm train fwd+bwd <= 0.5x flax default [large {dtype}]",
          get("large", dtype, "regjax BatchNorm", "train fwd+bwd", "vs_ref"), 0.5)
    check(f"regjax BatchNorm train fwd+bwd <= 1x flax default [small {dtype}]",
          get("small", dtype, "regjax BatchNorm", "train fwd+bwd", "vs_ref"), 1.0)
    for size in ("small", "large"):
      row = index.get((size, dtype, "regjax BatchNorm", "eval fwd")) or {}
      check(f"regjax BatchNorm eval fwd <= 1x flax [{size} {dtype}]",
            get(size, dtype, "regjax BatchNorm", "eval fwd", "vs_ref"), 1.0,
            same_program=bool(row.get("same_program_as_ref")))
  check("CNN train step, regjax layers <= 1x flax layers",
        get(None, None, "CNN train step, regjax layers", "train step", "vs_ref"), 1.0)
  for m in memory:
    if m["op"] == "regjax.dropout(0.5)":
      # Nothing per element: the residuals are the seed words and the rate, whatever the size.
      check(f"regjax.dropout backward keeps <= 64 bytes in all [{m['size']} {m['dtype']}]",
            m.get("residual_bytes"), 64, " B")
  return targets


def format_targets(targets: list[dict[str, Any]]) -> str:
  lines = ["TARGETS ([95 % interval over rounds]; '~' = the interval straddles the "
           "limit: within this machine's noise)"]
  for t in targets:
    value = "not measured" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}"
    if t.get("ci95"):
      value += f" [{fmt_ci(t['ci95'])}]"
    mark = "~" if t.get("decisive") is False else " "
    if t.get("same_program"):
      value += " measured; the compiled XLA programs are identical"
    lines.append(f"  {t['verdict']:<4}{mark} {t['target']:<72} {value}")
  counts = {v: sum(t["verdict"] == v for t in targets) for v in ("PASS", "FAIL", "SKIP")}
  noisy = sum(t.get("decisive") is False for t in targets)
  lines.append(f"  {counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped; "
               f"{noisy} within noise (~)")
  return "\n".join(lines)


# --------------------------------------------------------------------------- environment


def git_state() -> dict[str, Any]:
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "regjax"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip())
    return {"commit": commit, "regjax_dirty": dirty}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": None, "regjax_dirty": None}


def loadavg() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def rng_impl_info() -> dict[str, Any]:
  """For each mandatory op: whether ``rng_impl`` exists and its default."""
  info = {}
  for attr in ("dropout", "gaussian_dropout", "uout"):
    fn = getattr(regjax, attr)
    if has_rng_impl(fn):
      default = inspect.signature(fn).parameters["rng_impl"].default
      info[attr] = None if default is inspect.Parameter.empty else repr(default)
    else:
      info[attr] = "absent"
  return info


def environment(device) -> dict[str, Any]:
  return {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "regjax": getattr(regjax, "__version__", None),
      "git": git_state(), "device": str(device), "device_kind": device.device_kind,
      "platform": device.platform, "cpu_count": os.cpu_count(),
      "python": platform.python_version(), "machine": platform.machine(),
      "rng_impl": rng_impl_info(),
      "malloc_env": {k: os.environ.get(k) for k in STEADY_MALLOC},
  }


# ---------------------------------------------------------------------------------- main


def parse_size(value: str) -> str:
  if value in SIZES:
    return value
  parts = value.lower().split("x")
  if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
    return value.lower()
  raise argparse.ArgumentTypeError(f"a size is one of {', '.join(SIZES)} or ROWSxCOLS; "
                                   f"got {value!r}")


def size_shape(size: str) -> tuple[int, int]:
  return SIZES[size] if size in SIZES else tuple(int(p) for p in size.split("x"))


def parse_list(value: str, check: Callable[[str], str]) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if not items:
    raise argparse.ArgumentTypeError("empty list")
  return [check(v) for v in items]


def choice(allowed):
  def check(v):
    if v not in allowed:
      raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {v!r}")
    return v
  return check


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Time regjax's noise ops, BatchNorm and a CNN train step against flax and "
                  "a copy floor; check the performance targets.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--sizes", type=lambda v: parse_list(v, parse_size), default="small,large",
                 help="comma-separated: " + ", ".join(
                     f"{k}={'x'.join(map(str, v))}" for k, v in SIZES.items())
                 + ", or ROWSxCOLS")
  p.add_argument("--dtypes", type=lambda v: parse_list(v, choice(DTYPES)),
                 default="float32,bfloat16", help=f"comma-separated, from {', '.join(DTYPES)}")
  p.add_argument("--sections", type=lambda v: parse_list(v, choice(SECTIONS)),
                 default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--ops", type=lambda v: parse_list(v, str), default=None, metavar="OPS",
                 help="comma-separated substrings: time only the noise ops (and memory rows) "
                      "whose name contains one, plus their references and the copy floor "
                      "(unset: all ops)")
  p.add_argument("--rounds", type=int, default=9,
                 help="interleaved rounds; every case runs one timed block per round")
  p.add_argument("--calls", type=int, default=3, help="timed calls per case per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
  p.add_argument("--no-steady-malloc", action="store_true",
                 help="keep glibc's default allocator settings (by default the script re-runs "
                      "itself with STEADY_MALLOC so that buffers are not page-faulted afresh)")
  p.add_argument("--out", default=os.path.join("runs", "benchmarks", "results.json"),
                 help="JSON results path")
  args = p.parse_args(argv)
  if args.rounds < 1 or args.calls < 1 or args.warmup < 1:
    p.error("--rounds, --calls and --warmup must be >= 1")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  device = jax.devices()[0]
  env = environment(device)
  print(f"jax {jax.__version__}, flax {flax.__version__}, regjax {env['regjax']}; device "
        f"{device} ({device.device_kind}), {os.cpu_count()} CPUs; {args.rounds} rounds of "
        f"{args.calls} timed calls per case after {args.warmup} warm-up; rng_impl: "
        f"{env['rng_impl']}", flush=True)
  env["loadavg_start"] = loadavg()
  start = time.perf_counter()
  keys = {impl: list(jax.random.split(jax.random.key(0, impl=impl), calls_needed(args)))
          for impl in (DEFAULT_KEY_IMPL,) + FLAX_KEY_IMPLS}
  rows: list[dict[str, Any]] = []
  memory: list[dict[str, Any]] = []
  train_step = None
  for size in args.sizes:
    shape = size_shape(size)
    for dtype_name in args.dtypes:
      t0 = time.perf_counter()
      x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(DTYPES[dtype_name])
      ct = jax.random.normal(jax.random.key(2), shape, jnp.float32).astype(DTYPES[dtype_name])
      cases: list[Case] = []
      if "noise" in args.sections:
        cases += copy_cases(x, ct) + noise_cases(x, ct, keys, args.ops)
      if "batchnorm" in args.sections:
        if "noise" not in args.sections:
          cases += copy_cases(x, ct)
        # BN's output is float32 (flax's dtype rule: float32 params); the vjp casts.
        cases += batch_norm_cases(x, ct.astype(jnp.float32))
      new = run_cases(cases, args)
      if "memory" in args.sections:
        for m in memory_rows(x, ct, keys[DEFAULT_KEY_IMPL][0], args.ops):
          memory.append(dict(m, size=size, shape=list(shape), dtype=dtype_name))
      for r in new:
        r.update(size=size, shape=list(shape), dtype=dtype_name)
      rows.extend(new)
      print(f"  {size} {shape} {dtype_name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
            flush=True)
  if "trainstep" in args.sections:
    t0 = time.perf_counter()
    try:
      train_step = train_step_rows(args)
      rows.extend(train_step["rows"])
    except Exception as e:  # noqa: BLE001 - report it, keep the other sections' results
      print(f"    FAILED train step: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      train_step = {"error": f"{type(e).__name__}: {e}", "rows": []}
    print(f"  train step: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  add_ratios(rows)
  targets = evaluate_targets(rows, memory, args.sizes, args.dtypes)
  print(format_table(rows))
  if memory:
    print("\nMEMORY: what the backward keeps (vjp residual bytes / x.size) and XLA temp bytes")
    print(format_memory(memory))
  print()
  print(format_targets(targets))

  env["loadavg_end"] = loadavg()
  total = time.perf_counter() - start
  results = {
      **env,
      "options": {"sizes": {s: list(size_shape(s)) for s in args.sizes}, "dtypes": args.dtypes,
                  "sections": args.sections, "ops": args.ops, "rounds": args.rounds,
                  "calls": args.calls, "warmup": args.warmup},
      "total_seconds": total,
      "rows": [{k: ([round(t, 9) for t in v] if k in ("times_s", "round_medians_s") else v)
                for k, v in r.items()} for r in rows],
      "memory": memory,
      "train_step": None if train_step is None else {
          k: v for k, v in train_step.items() if k != "rows"},
      "targets": targets,
  }
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(f"\ntotal {total:.0f} s; load average {env['loadavg_start']} at start, "
        f"{env['loadavg_end']} at end; results written to {args.out}")
  return results


if __name__ == "__main__":
  env = None if "--no-steady-malloc" in sys.argv else steady_malloc_environ()
  if env is not None:  # glibc reads these at startup: start again with them
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
  main()

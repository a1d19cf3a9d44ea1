"""PractRand streams of regjax's fused generator (``regjax.random``), with controls.

Writes the raw words a noise op consumes to stdout, or pipes them into
PractRand's ``RNG_test`` (``--practrand PATH``) and prints a table of stream x
length reached x verdict. Not part of the test run: the default lengths take
about an hour on 2 cores.

  python -m benchmarks.rng_quality --list
  python -m benchmarks.rng_quality --stream words | RNG_test stdin32 -tlmax 16GB
  python -m benchmarks.rng_quality --practrand /path/to/RNG_test               # every stream
  python -m benchmarks.rng_quality --practrand RNG_test --streams bernoulli16,threefry
  python -m benchmarks.rng_quality --practrand RNG_test --max-length 1GB       # a quick pass

Streams (``--list`` prints them); "one key" is ``jax.random.key(--seed)``:

  words          bits(key) of consecutive flat indices 0, 1, 2, ...: all 32 bits
                 (what Gaussian noise, Uout and the seeds of DropBlock read the top 24
                 or 16 of). Default length 16 GB: the whole 2**32 counter range.
  bernoulli16    the top 16 bits of the same words (what every Bernoulli mask compares),
                 two indices per uint32 (index 2k in the low half). 8 GB: every index.
  uniform24      the top 24 bits (uniform, Uout, normal), as 3 little-endian bytes per
                 index. 8 GB: indices 0 to 2.9e9.
  fold_in/0      the word of flat index 0 for the keys fold_in(key, step), step = 0, 1, ...
                 (with JAX's default partitionable threefry, split(key, n)[step] is the
                 same key: the harness checks that identity, so this is also the
                 stream of a split). 4 GB: 2**30 keys.
  fold_in/12345  the same for the interior flat index 12345.
  split2/0       flat index 0 for the two-level split split(split(key, 2**15)[a], 2**15)[b],
                 keys in (a, b) order. 4 GB.
  split2/12345   the same for flat index 12345.
  blocks         arrays of more than 2**32 elements: the words of flat indices i and
                 2**32 + i interleaved (block 0 and block 1 of one key at the same offset),
                 i = 0, 1, ...: a test of the high counter word. 4 GB.
  threefry       control: jax.random.bits(key) of consecutive indices (the same words
                 jax.random.bits(key, (n,)) gives, made in chunks). 16 GB.
  lowbias32      the generator regjax used before: lowbias32(s0 + i * gamma) of one Weyl
                 sequence, with (s0, s1) = jax.random.bits(key, (2,)) and gamma = s1 | 1
                 (fixed up like regjax.random.weyl_step); top 16 bits, as bernoulli16.
                 8 GB (it fails long before).
  alt/...        design alternatives to the formula regjax uses, top 16 bits as
                 bernoulli16 (run only when named in --streams; --list shows them).

Results: the table on stdout and, under ``--out`` (default ``runs/rng_quality``),
``results.json`` plus each stream's PractRand log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

import regjax
from benchmarks.environment import git_state
from regjax import random as rrandom

CHUNK = 1 << 24  # counters per generated block (64 MiB of words)
KEY_CHUNK = 1 << 20  # keys per generated block
INTERIOR = 12345
GB = 1 << 30
SEVERITY = ("unusual", "mildly suspicious", "suspicious", "very suspicious", "FAIL")


@dataclasses.dataclass(frozen=True)
class Stream:
  name: str
  word_bytes: int  # 4 for stdin32 streams, 1 for byte streams
  default_bytes: int
  blocks: Callable[[jax.Array], Iterator[np.ndarray]]
  about: str


# ---------------------------------------------------------------------------- streams


@jax.jit
def _words(seed, start):
  return rrandom.hash_counter(seed, start + jnp.arange(CHUNK, dtype=jnp.uint32))


@jax.jit
def _top16_pairs(seed, start):
  w = _words(seed, start) >> 16
  return w[0::2] | (w[1::2] << 16)


@jax.jit
def _top24_bytes(seed, start):
  w = _words(seed, start) >> 8
  return jnp.stack([w & 0xFF, (w >> 8) & 0xFF, w >> 16], axis=-1).astype(jnp.uint8).ravel()


@jax.jit
def _blocks_pair(seed, start):
  lo = start + jnp.arange(CHUNK // 2, dtype=jnp.uint32)
  first = rrandom.hash_counter(seed, lo)
  second = rrandom.hash_counter(seed, lo, jnp.ones_like(lo))
  return jnp.stack([first, second], axis=-1).ravel()


@jax.jit
def _threefry_words(key_data, start):
  lo = start + jnp.arange(CHUNK, dtype=jnp.uint32)
  a, b = threefry2x32_p.bind(key_data[0], key_data[1], jnp.zeros_like(lo), lo)
  return a ^ b  # jax.random.bits(key, (n,))[lo] with the partitionable threefry


def _mix(x, y=None, *, at="before", op="xor"):
  """lowbias32 of ``x`` with ``y`` combined in by ``op`` before or after the middle xorshift."""
  h = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  join = (lambda h: h ^ y) if op == "xor" else (lambda h: h + y)
  if y is not None and at == "before":
    h = join(h)
  h = h ^ (h >> 15)
  if y is not None and at == "after":
    h = join(h)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


@jax.jit
def _old_top16_pairs(seed2, start):
  lo = start + jnp.arange(CHUNK, dtype=jnp.uint32)
  w = _mix(seed2[0] + lo * rrandom.weyl_step(seed2[1])) >> 16  # lowbias32
  return w[0::2] | (w[1::2] << 16)


def _alternative(combine):
  """A design alternative: the top 16 bits of ``combine(x, y, i)``, two per word."""

  @jax.jit
  def top16_pairs(seed, start):
    i = start + jnp.arange(CHUNK, dtype=jnp.uint32)
    x0, g0, y0, g1 = rrandom.weyl_parameters(seed)
    w = combine(x0 + i * g0, y0 + i * g1, i, y0) >> 16
    return w[0::2] | (w[1::2] << 16)

  return top16_pairs


# Design alternatives (not run by default): the same harness on the formulas that were
# weighed against the one regjax uses ("regjax": XOR before the middle xorshift).
ALTERNATIVES = {
  "alt/plus-weyl": (
    "lowbias32(x) + y: a bijection plus a Weyl sequence",
    lambda x, y, i, y0: _mix(x) + y,
  ),
  "alt/add-middle": (
    "y added, not XORed, before the middle xorshift",
    lambda x, y, i, y0: _mix(x, y, op="add"),
  ),
  "alt/xor-counter": (
    "the raw counter i + y0 XORed in, no second sequence",
    lambda x, y, i, y0: _mix(x, i + y0),
  ),
  "alt/xor-after": (
    "y XORed in after the middle xorshift",
    lambda x, y, i, y0: _mix(x, y, at="after"),
  ),
}


def _word_of_keys(index):
  @jax.jit
  def word(keys):
    seeds = jax.vmap(rrandom.seed_words)(keys)
    return jax.vmap(lambda s: rrandom.hash_counter(s, jnp.uint32(index)))(seeds)

  return word


_FOLD_IN = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def _counter_blocks(fn, seed, total_counters, per_block):
  for start in range(0, total_counters, per_block):
    yield np.asarray(fn(seed, jnp.uint32(start)))


def _fold_in_keys(base):
  for start in range(0, 1 << 32, KEY_CHUNK):
    yield _FOLD_IN(base, jnp.arange(start, start + KEY_CHUNK, dtype=jnp.uint32))


def _split2_keys(base):
  side = 1 << 15
  for a in jax.random.split(base, side):
    yield jax.random.split(a, side)


def _key_stream(keys_fn, index):
  word = _word_of_keys(index)

  def blocks(key):
    for keys in keys_fn(key):
      yield np.asarray(word(keys))

  return blocks


def _streams() -> dict[str, Stream]:
  seed = rrandom.seed_words
  streams = [
    Stream(
      "words",
      4,
      16 * GB,
      lambda k: _counter_blocks(_words, seed(k), 1 << 32, CHUNK),
      "one key, flat indices 0, 1, ...: all 32 bits",
    ),
    Stream(
      "bernoulli16",
      4,
      8 * GB,
      lambda k: _counter_blocks(_top16_pairs, seed(k), 1 << 32, CHUNK),
      "one key: top 16 bits (Bernoulli masks), 2 per word",
    ),
    Stream(
      "uniform24",
      1,
      8 * GB,
      lambda k: _counter_blocks(_top24_bytes, seed(k), 1 << 32, CHUNK),
      "one key: top 24 bits (uniform, normal), 3 bytes each",
    ),
    Stream(
      "fold_in/0",
      4,
      4 * GB,
      _key_stream(_fold_in_keys, 0),
      "index 0 across fold_in(key, step) (= split(key, n)[step])",
    ),
    Stream(
      f"fold_in/{INTERIOR}",
      4,
      4 * GB,
      _key_stream(_fold_in_keys, INTERIOR),
      f"index {INTERIOR} across fold_in(key, step)",
    ),
    Stream(
      "split2/0",
      4,
      4 * GB,
      _key_stream(_split2_keys, 0),
      "index 0 across split(split(key, 2**15)[a], 2**15)[b]",
    ),
    Stream(
      f"split2/{INTERIOR}",
      4,
      4 * GB,
      _key_stream(_split2_keys, INTERIOR),
      f"index {INTERIOR} across the two-level split",
    ),
    Stream(
      "blocks",
      4,
      4 * GB,
      lambda k: _counter_blocks(_blocks_pair, seed(k), 1 << 32, CHUNK // 2),
      "indices i and 2**32 + i interleaved (the high counter word)",
    ),
    Stream(
      "threefry",
      4,
      16 * GB,
      lambda k: _counter_blocks(_threefry_words, jax.random.key_data(k), 1 << 32, CHUNK),
      "control: jax.random.bits(key), flat indices 0, 1, ...",
    ),
    Stream(
      "lowbias32",
      4,
      8 * GB,
      lambda k: _counter_blocks(
        _old_top16_pairs, jax.random.bits(k, (2,), jnp.uint32), 1 << 32, CHUNK
      ),
      "before: regjax's previous generator, top 16 bits",
    ),
  ]
  streams += [
    _alternative_stream(name, about, combine) for name, (about, combine) in ALTERNATIVES.items()
  ]
  return {s.name: s for s in streams}


def _alternative_stream(name: str, about: str, combine) -> Stream:
  fn = _alternative(combine)
  return Stream(
    name,
    4,
    8 * GB,
    lambda k: _counter_blocks(fn, rrandom.seed_words(k), 1 << 32, CHUNK),
    f"alternative design: {about}; top 16 bits",
  )


def self_check(key) -> None:
  """The streams are what they claim: checked on their first words before a run."""
  seed = rrandom.seed_words(key)
  n = 1 << 10
  ops_words = np.asarray(regjax.random.bits(key, (n,)))
  assert np.array_equal(np.asarray(_words(seed, jnp.uint32(0)))[:n], ops_words)
  assert np.array_equal(
    np.asarray(_threefry_words(jax.random.key_data(key), jnp.uint32(0)))[:n],
    np.asarray(jax.random.bits(key, (n,), jnp.uint32)),
  )
  split = jax.random.key_data(jax.random.split(key, 64))
  folded = jax.random.key_data(_FOLD_IN(key, jnp.arange(64, dtype=jnp.uint32)))
  assert np.array_equal(split, folded), "split(key, n)[i] != fold_in(key, i) in this JAX"
  top = ops_words >> 16
  assert np.array_equal(
    np.asarray(_top16_pairs(seed, jnp.uint32(0)))[: n // 2], top[0::2] | (top[1::2] << 16)
  )
  # The alternatives' building block, with y XORed in before the xorshift, is regjax's formula.
  i = jnp.arange(n, dtype=jnp.uint32)
  x0, g0, y0, g1 = rrandom.weyl_parameters(seed)
  assert np.array_equal(np.asarray(_mix(x0 + i * g0, y0 + i * g1)), ops_words)


# ------------------------------------------------------------------------------- running


def parse_size(text: str) -> int:
  match = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", text.strip().upper())
  if not match:
    raise argparse.ArgumentTypeError(f"not a size like 512MB or 4GB: {text!r}")
  return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2)]


def practrand_size(nbytes: int) -> str:
  for unit, shift in (("TB", 40), ("GB", 30), ("MB", 20), ("KB", 10)):
    if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
      return f"{nbytes >> shift}{unit}"
  return f"{nbytes}"


def write_stream(stream: Stream, key, out, limit: int, progress=None) -> int:
  """Writes up to ``limit`` bytes of ``stream`` to the binary file ``out``."""
  written = 0
  for block in stream.blocks(key):
    data = block.tobytes()[: limit - written]
    try:
      out.write(data)
    except (BrokenPipeError, ValueError):  # the reader stopped (PractRand ends at a FAIL)
      break
    written += len(data)
    if progress is not None:
      progress(len(data))
    if written >= limit:
      break
  return written


def _human(power: str) -> str:
  """``'2^33'`` as ``'8 GB'``."""
  nbytes = 1 << int(power.split("^")[1])
  for unit, shift in (("TB", 40), ("GB", 30), ("MB", 20), ("KB", 10)):
    if nbytes >= 1 << shift:
      return f"{nbytes >> shift} {unit}"
  return f"{nbytes} B"


def verdict(log: str) -> dict:
  """The last length PractRand reported and the worst result it flagged."""
  reports = re.split(r"(?=length= )", log)
  reached, worst, first_fail, flagged = "-", None, None, []
  for report in reports:
    m = re.match(r"length= [^,]+? \((2\^\d+) bytes\)", report)
    if not m:
      continue
    reached = m.group(1)
    for line in report.splitlines():
      level = next(
        (lv for lv in reversed(SEVERITY) if re.search(rf"\b{re.escape(lv)}\b", line)), None
      )
      if level is None or "p =" not in line:
        continue
      flagged.append(f"{_human(reached)}: {' '.join(line.split())}")
      if worst is None or SEVERITY.index(level) > SEVERITY.index(worst):
        worst = level
      if level == "FAIL" and first_fail is None:
        p = re.search(r"p\s*=\s*(\S+)", line)
        first_fail = (reached, f"{line.split()[0]}, p = {p.group(1) if p else '?'}")
  if first_fail:
    text = f"FAIL at {_human(first_fail[0])} ({first_fail[1]})"
  elif worst:
    text = f"no failure; worst: {worst}"
  else:
    text = "no anomalies"
  return {
    "reached": reached,
    "reached_human": _human(reached) if reached != "-" else "-",
    "verdict": text,
    "worst": worst,
    "flagged": flagged,
  }


def run_practrand(stream: Stream, key, practrand: str, limit: int, log_path: str) -> dict:
  mode = "stdin32" if stream.word_bytes == 4 else "stdin8"
  cmd = [practrand, mode, "-tlmax", practrand_size(limit), "-multithreaded"]
  start = time.time()
  with open(log_path, "w") as log_file:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT)
    assert proc.stdin is not None  # stdin=PIPE
    bar = _progress(limit, stream.name)
    try:
      written = write_stream(
        stream, key, proc.stdin, limit + (1 << 20), bar.update if bar is not None else None
      )
    finally:
      with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
      proc.wait()
      if bar is not None:
        bar.close()
  with open(log_path) as f:
    log = f.read()
  result = verdict(log)
  result.update(
    stream=stream.name,
    about=stream.about,
    limit=practrand_size(limit),
    bytes_written=written,
    seconds=round(time.time() - start, 1),
    command=" ".join(cmd),
  )
  return result


def _progress(total: int, name: str):
  try:
    from tqdm import tqdm  # type: ignore[import-untyped]  # an optional extra, no stubs
  except ImportError:
    return None
  return tqdm(
    total=total,
    unit="B",
    unit_scale=True,
    unit_divisor=1024,
    desc=name,
    file=sys.stderr,
    mininterval=2.0,
  )


def environment(opts) -> dict:
  git = git_state()
  return {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "regjax": regjax.__version__,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "processor": _cpu_name(),
    "cpus": os.cpu_count(),
    "git_commit": git["commit"],
    "regjax_dirty": git["regjax_dirty"],
    "seed": opts.seed,
    "first_words": [int(w) for w in regjax.random.bits(jax.random.key(opts.seed), (4,))],
  }


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv=None) -> int:
  streams = _streams()
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  parser.add_argument("--list", action="store_true", help="list the streams and exit")
  parser.add_argument(
    "--stream",
    choices=sorted(streams),
    help="write this stream's raw bytes to stdout (no PractRand)",
  )
  parser.add_argument(
    "--practrand", metavar="PATH", help="PractRand's RNG_test binary: run the streams through it"
  )
  parser.add_argument(
    "--streams",
    default=",".join(n for n in streams if n not in ALTERNATIVES),
    help="comma-separated streams to run with --practrand (default: all but "
    "the design alternatives alt/*)",
  )
  parser.add_argument(
    "--max-length",
    type=parse_size,
    metavar="SIZE",
    help="cap every stream's length (e.g. 1GB); default: each stream's own",
  )
  parser.add_argument("--seed", type=int, default=0, help="the key is jax.random.key(SEED)")
  parser.add_argument("--out", default="runs/rng_quality", help="folder for logs and JSON")
  opts = parser.parse_args(argv)
  key = jax.random.key(opts.seed)

  if opts.list:
    for s in streams.values():
      print(f"{s.name:14s} {practrand_size(s.default_bytes):>5s}  {s.about}")
    return 0
  self_check(key)
  if opts.stream:
    stream = streams[opts.stream]
    limit = opts.max_length or stream.default_bytes
    write_stream(stream, key, sys.stdout.buffer, limit)
    return 0
  if not opts.practrand:
    parser.error("give --practrand PATH (or --stream NAME to write raw bytes, --list)")
  if not os.access(opts.practrand, os.X_OK):
    parser.error(f"--practrand {opts.practrand!r} is not an executable file")
  names = [n.strip() for n in opts.streams.split(",") if n.strip()]
  unknown = [n for n in names if n not in streams]
  if unknown:
    parser.error(f"unknown stream(s) {unknown}; choose from {sorted(streams)}")
  os.makedirs(opts.out, exist_ok=True)
  results = []
  for name in names:
    stream = streams[name]
    limit = min(stream.default_bytes, opts.max_length or stream.default_bytes)
    log_path = os.path.join(opts.out, name.replace("/", "_") + ".log")
    result = run_practrand(stream, key, opts.practrand, limit, log_path)
    results.append(result)
    print(
      f"{name:14s} reached {result['reached_human']:>6s} of {result['limit']:>5s}: "
      f"{result['verdict']}  ({result['seconds']} s)",
      flush=True,
    )
    with open(os.path.join(opts.out, "results.json"), "w") as f:
      json.dump({"environment": environment(opts), "results": results}, f, indent=1)
  print()
  print(f"| {'stream':14s} | {'length reached':16s} | verdict |")
  print(f"| {'-' * 14} | {'-' * 16} | --- |")
  for r in results:
    reached = f"{r['reached_human']} ({r['reached']})"
    print(f"| {r['stream']:14s} | {reached:16s} | {r['verdict']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

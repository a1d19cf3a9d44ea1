"""Smoke tests of the benchmarks package (run as ``python -m benchmarks.run`` from the
repository root): the harness runs in-process on a tiny size and the JSON it writes has the
documented structure; the timing statistics, targets and PractRand driver are checked on
known inputs. Timings themselves are not checked.

The ``trainstep`` section is left out of the run (compiling the two CNN train steps takes
~15 s on 2 cores); its two models are checked against the example CNN's parameter shapes
instead, without compiling."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax
from benchmarks import report, rng_quality, run, timing
from benchmarks.cases import batch_norm, model_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAX_BN = batch_norm.FLAX_BN


def test_harness_writes_results(tmp_path, capsys):
  out = tmp_path / "results.json"
  results = run.main(
    [
      "--sizes",
      "8x256",
      "--dtypes",
      "float32",
      "--rounds",
      "2",
      "--calls",
      "1",
      "--warmup",
      "1",
      "--ops",
      "regjax.dropout(0.5)",
      "--sections",
      "noise,batchnorm,memory",
      "--out",
      str(out),
    ]
  )
  printed = capsys.readouterr().out
  assert "TARGETS" in printed and "MEMORY" in printed
  with open(out, encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["rows"] and len(saved["rows"]) == len(results["rows"])
  for key in (
    "jax",
    "flax",
    "device",
    "cpu_count",
    "loadavg_start",
    "loadavg_end",
    "git",
    "options",
    "total_seconds",
    "rows",
    "memory",
    "train_step",
    "targets",
    "rng_impl",
  ):
    assert key in saved, key

  rows = {(r["op"], r["mode"]): r for r in saved["rows"]}
  for op in ("copy x*2", "regjax.dropout(0.5)", "flax Dropout(0.5)"):
    for mode in ("fwd", "fwd+bwd"):
      r = rows[(op, mode)]
      assert r["size"] == "8x256" and r["dtype"] == "float32" and r["shape"] == [8, 256]
      assert len(r["times_s"]) == 2 and r["n"] == 2 and len(r["round_medians_s"]) == 2
      assert r["median_ms"] > 0 and r["vs_copy"] > 0
  assert rows[("regjax.dropout(0.5)", "fwd")]["ref"] == "flax Dropout(0.5)"
  assert rows[("regjax.dropout(0.5)", "fwd+bwd")]["vs_ref"] > 0
  assert not any(op.startswith("regjax.uout") for op, _ in rows)  # --ops filters
  for name in (
    "regjax BatchNorm",
    "flax BatchNorm(fast_var=True)",
    "flax BatchNorm(fast_var=False)",
  ):
    for mode in ("train fwd+bwd", "train fwd", "eval fwd"):
      assert rows[(name, mode)]["median_ms"] > 0
  assert rows[("regjax BatchNorm", "train fwd+bwd")]["vs_ref"] > 0
  # regjax's eval BatchNorm compiles to flax's very program: the harness detects it.
  assert rows[("regjax BatchNorm", "eval fwd")]["same_program_as_ref"] is True
  assert rows[("flax BatchNorm(fast_var=False)", "eval fwd")]["same_program_as_ref"] in (
    True,
    False,
  )

  assert saved["train_step"] is None  # section not run

  memory = {m["op"]: m for m in saved["memory"]}
  for op in ("copy x*2 (floor)", "regjax.dropout(0.5)", "flax Dropout(0.5)"):
    assert memory[op]["bytes_per_element"] >= 0 and "error" not in memory[op]
  assert memory["flax Dropout(0.5)"]["bytes_per_element"] >= 1  # keeps at least a bool mask

  verdicts = {t["target"]: t for t in saved["targets"]}
  assert all(t["verdict"] in ("PASS", "FAIL", "SKIP") for t in saved["targets"])
  assert verdicts["CNN train step, regjax layers <= 1x flax layers"]["verdict"] == "SKIP"
  assert verdicts["regjax.dropout(0.5) fwd <= 1.5x copy floor [small float32]"]["verdict"] == "SKIP"
  assert (
    verdicts["regjax.dropout backward keeps <= 64 bytes in all [8x256 float32]"]["verdict"]
    == "PASS"
  )


def shapes(model, x):
  return jax.tree.map(
    lambda a: a.shape, jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  )


def test_model_step_cnn_has_the_example_cnns_parameter_tree():
  """The trainstep section's CNN, with regjax layers and with flax layers, has the
  parameter tree of the example study's default_cnn('mnist1d')."""
  import examples.models  # a namespace package: its models.py imports only regjax and flax

  ours = examples.models.default_cnn("mnist1d", 10, block_noise="dropout", block_noise_value=0.5)
  x = jnp.zeros((4, model_step.LENGTH, 1))
  assert shapes(model_step.BenchCNN("regjax"), x) == shapes(ours, x)
  assert shapes(model_step.BenchCNN("flax"), x) == shapes(ours, x)


def test_targets_file_holds_the_readme_bounds():
  """targets.toml gives, per dtype run, the bounds benchmarks/README.md states."""
  targets = report.evaluate_targets([], [], ["float32", "bfloat16"])
  limits = {t["target"]: t["limit"] for t in targets}
  assert len(targets) == 29 and all(t["verdict"] == "SKIP" for t in targets)
  for size in ("small", "large"):
    for mode in ("fwd", "fwd+bwd"):
      assert limits[f"regjax.dropout(0.5) {mode} <= 1.5x copy floor [{size} float32]"] == 1.5
      assert limits[f"regjax.dropout(0.5) {mode} <= 2.5x copy floor [{size} bfloat16]"] == 2.5
      assert limits[f"regjax.uout(0.1) {mode} <= 1.6x copy floor [{size} float32]"] == 1.6
      assert f"regjax.uout(0.1) {mode} <= 1.6x copy floor [{size} bfloat16]" not in limits
      assert limits[f"regjax BatchNorm eval fwd <= 1x flax [{size} bfloat16]"] == 1.0
    for op in ("regjax.gaussian_dropout(0.5)", "regjax.uout(0.1)"):
      assert limits[f"{op} {mode} <= 0.5x straightforward [large float32]"] == 0.5
  assert limits["regjax BatchNorm train fwd+bwd <= 0.5x flax default [large float32]"] == 0.5
  assert limits["regjax BatchNorm train fwd+bwd <= 1x flax default [small float32]"] == 1.0
  assert targets[-1]["target"] == "CNN train step, regjax layers <= 1x flax layers"
  memory = [
    {"op": "regjax.dropout(0.5)", "size": "small", "dtype": "float16", "residual_bytes": 65}
  ]
  t = report.evaluate_targets([], memory, [])[-1]
  assert t["target"] == "regjax.dropout backward keeps <= 64 bytes in all [small float16]"
  assert t["verdict"] == "FAIL" and t["unit"] == " B"


@pytest.mark.parametrize(
  "module, args, expect",
  [
    ("benchmarks.run", ["--help"], "--sections"),
    ("benchmarks.rng_quality", ["--list"], "bernoulli16"),
  ],
)
def test_runs_as_a_module_from_the_root(module, args, expect):
  """``python -m`` from the repository root; benchmarks.run first re-runs itself with the
  allocator settings (the same command line)."""
  env = {k: v for k, v in os.environ.items() if k not in timing.STEADY_MALLOC}
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert expect in proc.stdout


def test_median_ci_is_the_binomial_order_statistic_interval():
  # n = 9: P(median outside (x_(2), x_(8))) = 2 * P(Bin(9, 1/2) <= 1) = 20/512 < 5 %,
  # while (x_(3), x_(7)) misses with 2 * 46/512 = 18 %.
  assert timing.median_ci([float(v) for v in range(9, 0, -1)]) == (2.0, 8.0)
  assert timing.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2/32 = 6.25 % > 5 %
  assert timing.median_ci([float(v) for v in range(1, 7)]) == (1.0, 6.0)  # 2/64 = 3.1 %


def test_target_verdicts_carry_the_interval():
  rows = [
    {
      "group": "batchnorm",
      "op": op,
      "mode": "eval fwd",
      "ref": ref,
      "size": "large",
      "dtype": "float32",
      "times_s": [m] * 9,
      "round_medians_s": [m * f for f in fs],
    }
    for op, ref, m, fs in (
      ("regjax BatchNorm", FLAX_BN, 1.0, [1.0, 0.9, 1.1, 0.95, 1.05, 1, 1, 1, 1]),
      (FLAX_BN, None, 1.0, [1.0] * 9),
    )
  ]
  report.add_ratios(rows)
  targets = {t["target"]: t for t in report.evaluate_targets(rows, [], ["float32"])}
  t = targets["regjax BatchNorm eval fwd <= 1x flax [large float32]"]
  assert t["verdict"] == "PASS" and t["measured"] == 1.0
  assert t["ci95"] == (0.95, 1.05) and t["decisive"] is False  # straddles the limit
  assert "~" in report.format_targets(list(targets.values()))


def test_steady_malloc_environ(monkeypatch):
  for k in timing.STEADY_MALLOC:
    monkeypatch.delenv(k, raising=False)
  env = timing.steady_malloc_environ()
  assert env is not None and all(env[k] == v for k, v in timing.STEADY_MALLOC.items())
  for k, v in timing.STEADY_MALLOC.items():
    monkeypatch.setenv(k, v)
  assert timing.steady_malloc_environ() is None  # already set: no re-run


def test_identical_program_passes_a_no_slower_target():
  rows = [
    {
      "group": "batchnorm",
      "op": op,
      "mode": "eval fwd",
      "ref": ref,
      "size": "small",
      "dtype": "float32",
      "times_s": [1.0] * 5,
      "round_medians_s": [m] * 5,
      "same_program_as_ref": ref is not None,
    }
    for op, ref, m in (("regjax BatchNorm", FLAX_BN, 1.2), (FLAX_BN, None, 1.0))
  ]
  report.add_ratios(rows)
  targets = {t["target"]: t for t in report.evaluate_targets(rows, [], ["float32"])}
  t = targets["regjax BatchNorm eval fwd <= 1x flax [small float32]"]
  assert t["measured"] == pytest.approx(1.2) and t["same_program"] and t["verdict"] == "PASS"


def test_program_text_ignores_source_locations():
  # Lambdas, so that the XLA module names agree (a def's name is part of them).
  same = [lambda x: x * 2 + 1, lambda x: (x * 2) + 1]  # another source line, same program
  x = jnp.ones((4, 8))
  assert timing.program_text(same[0], (x,)) == timing.program_text(same[1], (x,))
  assert timing.program_text(same[0], (x,)) != timing.program_text(lambda x: x * 3 + 1, (x,))


def test_rng_quality_streams_are_the_ops_words():
  """The PractRand harness feeds exactly regjax.random's words (and threefry's, for the
  control); checked on the first bytes of each stream, without PractRand."""
  key = jax.random.key(0)
  rng_quality.self_check(key)
  streams = rng_quality._streams()
  n = 4096
  words = np.asarray(regjax.random.bits(key, (n,)))

  def first(name, nbytes):
    out = io.BytesIO()
    rng_quality.write_stream(streams[name], key, out, nbytes)
    return np.frombuffer(out.getvalue(), np.uint8)

  np.testing.assert_array_equal(first("words", 4 * n).view(np.uint32), words)
  top = words >> 16
  np.testing.assert_array_equal(
    first("bernoulli16", 2 * n).view(np.uint32), top[0::2] | (top[1::2] << 16)
  )
  u24 = (words >> 8)[: n // 2]
  b = first("uniform24", 3 * (n // 2)).reshape(-1, 3).astype(np.uint32)
  np.testing.assert_array_equal(b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16, u24)
  np.testing.assert_array_equal(
    first("threefry", 4 * n).view(np.uint32),
    np.asarray(jax.random.bits(key, (n,), jax.numpy.uint32)),
  )
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jax.numpy.arange(8))
  np.testing.assert_array_equal(
    first("fold_in/12345", 32).view(np.uint32),
    [int(regjax.random.bits(k, (12346,))[12345]) for k in keys],
  )


def test_rng_quality_reads_practrand_verdicts():
  log = """rng=RNG_stdin32, seed=unknown
length= 128 megabytes (2^27 bytes), time= 1.2 seconds
  no anomalies in 151 test result(s)

length= 256 megabytes (2^28 bytes), time= 2.4 seconds
  Test Name                         Raw       Processed     Evaluation
  Gap-16:A                          R= +74.1  p =  9.1e-59    FAIL !!!!
  FPF-14+6/16:all                   R=  -5.3  p =1-1.0e-4   unusual
  ...and 162 test result(s) without anomalies
"""
  result = rng_quality.verdict(log)
  assert result["reached"] == "2^28" and result["worst"] == "FAIL"
  assert result["verdict"] == "FAIL at 256 MB (Gap-16:A, p = 9.1e-59)"
  clean = rng_quality.verdict(log.split("length= 256")[0])
  assert clean["verdict"] == "no anomalies" and clean["reached_human"] == "128 MB"
  unusual = rng_quality.verdict(log.replace("FAIL !!!!", "unusual"))
  assert unusual["verdict"] == "no failure; worst: unusual"

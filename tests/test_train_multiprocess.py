"""Tests of data-parallel training across processes: examples/train.py under
``jax.distributed`` (started by examples/launch.py) and its orbax checkpoints.

Every run is a subprocess on the loopback interface, in its own session, with
a timeout that kills its whole process group: a run that hangs fails the test
instead of hanging it. The three training runs (1 process x 1 device,
1 process x 4 devices, 2 processes x 2 devices) start together, then the two
checkpoint restores.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("mnist1d")  # the `examples` extra
ocp = pytest.importorskip("orbax.checkpoint")

import jax

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import launch

RUN_TIMEOUT = 240  # seconds per run; they take ~10-25 s on a shared 2-core CPU
# A small run with dropout on (the masks must follow the global sample index)
# and BatchNorm in every block: 2 epochs of 4 steps of 64 examples.
TRAIN_ARGS = [
  *("--epochs", "2", "--batch-size", "64", "--limit-train", "256", "--limit-test", "128"),
  *("--seed", "3", "--noise", "dropout", "--noise-value", "0.3", "--no-progress"),
]
# Step losses: the runs sum the same float32 terms in different orders (one
# device; per device then across devices in one process; per device, per
# process, then across processes by gloo), so they agree to rounding, ~1e-7
# here, not bitwise. The state after 8 AdamW steps agrees to ~2e-5.
LOSS_RTOL = 1e-5
STATE_RTOL, STATE_ATOL = 1e-4, 1e-5


def _env(devices: int) -> dict[str, str]:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )


def _start(args, devices: int = 1) -> subprocess.Popen:
  """Starts ``python *args`` in its own session (so its process group can be killed)."""
  return subprocess.Popen(
    [sys.executable, *map(str, args)],
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )


def _finish_all(procs: dict[str, subprocess.Popen], timeout: float = RUN_TIMEOUT):
  """Waits for all of ``procs``; returns ``{name: (stdout, stderr)}``.

  Fails, after killing every process group, as soon as one exits non-zero or
  when ``timeout`` seconds have passed.
  """
  outputs = {}
  deadline = time.monotonic() + timeout
  try:
    while len(outputs) < len(procs):
      for name, proc in procs.items():
        if name in outputs or proc.poll() is None:
          continue
        out, err = proc.communicate()
        assert proc.returncode == 0, (
          f"{name}: {proc.args} exited with {proc.returncode}:\n{err[-3000:]}"
        )
        outputs[name] = out, err
      if time.monotonic() > deadline:
        pytest.fail(f"{sorted(set(procs) - set(outputs))} timed out after {timeout} s")
      time.sleep(0.1)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
  return outputs


def _train(out_dir: pathlib.Path, *extra) -> list[str]:
  return [EXAMPLES / "train.py", *TRAIN_ARGS, "--out", out_dir / "m.json", *extra]


def _launch_2x2(out_dir: pathlib.Path, *extra) -> list[str]:
  return [
    EXAMPLES / "launch.py",
    *("--processes", "2", "--devices-per-process", "2", "--timeout", str(RUN_TIMEOUT - 10)),
    "--",
    *_train(out_dir, *extra)[1:],
  ]


def _load_state(path: pathlib.Path) -> dict:
  """A checkpoint's state as NumPy arrays (whatever devices wrote it)."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path / "state", restore_args=restore_args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The three training runs, each saving a checkpoint, then the two cross restores.

  The 2 x 2 training run goes through the launcher; the 2 x 2 restore starts
  its two processes by hand, as on two hosts, each with its own ``--out``.
  """
  root = tmp_path_factory.mktemp("multiprocess")
  names = ("1x1", "1x4", "2x2", "1x1_from_2x2", "2x2_from_1x1", "1x1_continued")
  dirs = {name: root / name for name in names}
  for d in dirs.values():
    d.mkdir()
  start = time.perf_counter()
  outputs = _finish_all(
    {
      "1x1": _start(_train(dirs["1x1"], "--save-checkpoint", dirs["1x1"] / "ck")),
      "1x4": _start(
        _train(dirs["1x4"], "--devices", "4", "--save-checkpoint", dirs["1x4"] / "ck"), devices=4
      ),
      "2x2": _start(_launch_2x2(dirs["2x2"], "--save-checkpoint", dirs["2x2"] / "ck")),
    }
  )
  train_seconds = time.perf_counter() - start
  # These only evaluate: the checkpoints are at the end of their 2 epochs.
  port = launch.free_port()
  by_hand = {
    f"2x2_from_1x1/{i}": _start(
      [
        EXAMPLES / "train.py",
        *TRAIN_ARGS,
        *("--restore-checkpoint", dirs["1x1"] / "ck"),
        *("--out", dirs["2x2_from_1x1"] / f"m{i}.json"),
        *("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", i),
      ],
      devices=2,
    )
    for i in range(2)
  }
  outputs |= _finish_all(
    {
      "1x1_from_2x2": _start(
        _train(dirs["1x1_from_2x2"], "--restore-checkpoint", dirs["2x2"] / "ck")
      ),
      **by_hand,
      # Trains the third epoch on top of the 2 x 2 run's two.
      "1x1_continued": _start(
        _train(
          dirs["1x1_continued"],
          *("--epochs", "3", "--restore-checkpoint", dirs["2x2"] / "ck"),
          *("--save-checkpoint", dirs["1x1_continued"] / "ck"),
        )
      ),
    }
  )
  (dirs["2x2_from_1x1"] / "m0.json").rename(dirs["2x2_from_1x1"] / "m.json")
  metrics = {name: json.loads((d / "m.json").read_text()) for name, d in dirs.items()}
  return {"dirs": dirs, "outputs": outputs, "metrics": metrics, "train_seconds": train_seconds}


def test_two_processes_match_one_process_step_by_step(runs):
  m = runs["metrics"]
  one, four, two_by_two = m["1x1"], m["1x4"], m["2x2"]
  assert len(one["step_loss"]) == 2 * (256 // 64)
  assert two_by_two["config"]["num_processes"] == 2 and two_by_two["config"]["devices"] == 4
  assert len(two_by_two["environment"]["devices"]) == 4 and len(four["environment"]["devices"]) == 4
  for other in (four, two_by_two):
    np.testing.assert_allclose(other["step_loss"], one["step_loss"], rtol=LOSS_RTOL)
    for key in ("train_loss", "test_loss"):
      np.testing.assert_allclose(other["final"][key], one["final"][key], rtol=LOSS_RTOL)
  np.testing.assert_allclose(two_by_two["step_loss"], four["step_loss"], rtol=LOSS_RTOL)
  # With dropout on: equal losses need equal masks, a function of the key and
  # of the global sample index, not of the device or process holding it.
  assert two_by_two["config"]["noise"] == "dropout" and two_by_two["config"]["noise_value"] == 0.3


def test_batch_norm_statistics_are_those_of_the_global_batch(runs):
  # The 1-device run's statistics are those of the whole batch by construction;
  # per-device statistics (16 rows) would differ from them by ~10 %, the
  # spread of a 16-row variance.
  states = {name: _load_state(runs["dirs"][name] / "ck") for name in ("1x1", "1x4", "2x2")}
  stats = {name: jax.tree.leaves_with_path(s["batch_stats"]) for name, s in states.items()}
  assert len(stats["1x1"]) == 8  # mean and var of bn0, bn1, bn2 and head_bn
  for name in ("1x4", "2x2"):
    assert int(states[name]["step"]) == 8
    for (path, a), (path_ref, b) in zip(stats[name], stats["1x1"], strict=True):
      assert path == path_ref
      np.testing.assert_allclose(a, b, rtol=STATE_RTOL, atol=STATE_ATOL, err_msg=str(path))
    for a, b in zip(
      jax.tree.leaves(states[name]["params"]), jax.tree.leaves(states["1x1"]["params"]), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=STATE_RTOL, atol=STATE_ATOL)
  # The running statistics moved away from their initial (0, 1).
  assert all(np.abs(v).max() > 1e-3 for _, v in stats["1x1"][::2])


def test_only_process_zero_writes_and_prints(runs):
  out, _ = runs["outputs"]["2x2"]  # the launcher shows process 0's output
  assert out.count("metrics written to") == 1 and out.count("of 2 processes") == 1, out
  assert sorted(p.name for p in runs["dirs"]["2x2"].iterdir()) == ["ck", "m.json"]
  # Started by hand with an --out each: process 1 wrote and printed nothing.
  assert sorted(p.name for p in runs["dirs"]["2x2_from_1x1"].iterdir()) == ["m.json"]
  assert "metrics written to" in runs["outputs"]["2x2_from_1x1/0"][0]
  quiet = runs["outputs"]["2x2_from_1x1/1"][0].splitlines()
  assert all(line.startswith("[Gloo]") for line in quiet), quiet  # gloo's own C++ notes


def test_checkpoints_restore_across_process_counts(runs):
  m = runs["metrics"]
  # Restored runs only evaluate, on one device per process, so they reproduce
  # the saving run's final metrics exactly.
  for restored, saved in (("1x1_from_2x2", "2x2"), ("2x2_from_1x1", "1x1")):
    assert m[restored]["final"] == m[saved]["final"], restored
    assert m[restored]["history"] == [] and m[restored]["step_loss"] == []
    assert m[restored]["config"]["restore_checkpoint"] == str(runs["dirs"][saved] / "ck")


def test_a_restored_run_trains_the_epochs_left(runs):
  m = runs["metrics"]["1x1_continued"]
  assert [h["epoch"] for h in m["history"]] == [3] and len(m["step_loss"]) == 256 // 64
  assert np.isfinite(m["step_loss"]).all() and m["final"] != runs["metrics"]["2x2"]["final"]
  state = _load_state(runs["dirs"]["1x1_continued"] / "ck")
  assert int(state["step"]) == 12 and int(state["opt_state"][0]["count"]) == 12


def test_restoring_another_model_is_a_one_line_error(runs, capsys):
  import train

  out = runs["dirs"]["1x1"] / "mlp.json"
  with pytest.raises(SystemExit) as info:
    train.main(
      [*TRAIN_ARGS, "--model", "mlp", "--restore-checkpoint", str(runs["dirs"]["1x1"] / "ck")]
      + ["--out", str(out)]
    )
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and not out.exists()
  assert err.startswith(f"train.py: error: --restore-checkpoint {runs['dirs']['1x1'] / 'ck'} ")
  assert "holds model CNN for mnist1d" in err and "this run builds model MLP for mnist1d" in err


# ----------------------------------------------------------------------- launcher

_FAKE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    args = sys.argv[1:]
    i = int(args[args.index("--process-id") + 1])
    with open(os.path.join(args[0], f"pid{i}"), "w") as f:
      f.write(str(os.getpid()))
    print("process", i, args[args.index("--num-processes") + 1],
          args[args.index("--coordinator") + 1], os.environ["XLA_FLAGS"], flush=True)
    if args[1] == "fail" and i == 1:
      print("process 1 fails", file=sys.stderr)
      sys.exit(3)
    if args[1] != "ok":
      time.sleep(600)
""")


def _launch_fake(tmp_path, mode, *launcher_args):
  script = tmp_path / "fake.py"
  script.write_text(_FAKE_SCRIPT)
  proc = subprocess.run(
    [sys.executable, EXAMPLES / "launch.py", "--script", script, *launcher_args, "--"]
    + [str(tmp_path), mode],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  return proc


def _assert_stopped(pid_file: pathlib.Path) -> None:
  pid = int(pid_file.read_text())
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.05)
  pytest.fail(f"process {pid} still runs")


def test_launcher_passes_the_distributed_options_and_streams_process_zero(tmp_path):
  proc = _launch_fake(tmp_path, "ok", "--processes", "3", "--devices-per-process", "2")
  assert proc.returncode == 0, proc.stderr
  (line,) = proc.stdout.splitlines()  # only process 0's output
  _, i, n, coordinator, flags = line.split(" ", 4)
  assert (i, n) == ("0", "3") and coordinator.startswith("127.0.0.1:")
  assert "--xla_force_host_platform_device_count=2" in flags
  assert sorted(p.name for p in tmp_path.glob("pid*")) == ["pid0", "pid1", "pid2"]


def test_launcher_stops_everyone_when_one_process_fails(tmp_path):
  start = time.perf_counter()
  proc = _launch_fake(tmp_path, "fail", "--processes", "2")
  assert proc.returncode == 3
  assert time.perf_counter() - start < 30  # process 0 would sleep 600 s
  assert "process 1 fails" in proc.stderr  # the tail of its log
  assert proc.stderr.strip().splitlines()[-1] == "launch.py: error: process 1 exited with status 3"
  _assert_stopped(tmp_path / "pid0")


def test_launcher_timeout_stops_everyone(tmp_path):
  proc = _launch_fake(tmp_path, "hang", "--processes", "2", "--timeout", "1")
  assert proc.returncode == launch.TIMEOUT_STATUS
  assert "timed out after 1 s" in proc.stderr
  for i in range(2):
    _assert_stopped(tmp_path / f"pid{i}")


def test_launcher_help(capsys):
  with pytest.raises(SystemExit) as info:
    launch.parse_args(["--help"])
  assert info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--processes", "--devices-per-process", "--timeout", "--port", "--script"):
    assert flag in out


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--processes", "0"], "--processes must be >= 1"),
    (["--devices-per-process", "0"], "--devices-per-process must be >= 1"),
    (["--timeout", "-1"], "--timeout must be >= 0"),
    (["--port", "70000"], "--port must be in [1, 65535]"),
    (["--", "--quick", "--process-id", "1"], "--process-id is set by the launcher"),
    (["--", "--coordinator=h:1"], "--coordinator is set by the launcher"),
  ],
)
def test_launcher_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    launch.parse_args(argv)
  assert info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"launch.py: error: {message}")

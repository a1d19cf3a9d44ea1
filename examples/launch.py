"""Start a distributed train.py run as several local processes, to try it on one machine.

Each process stands for one host: it gets ``--devices-per-process`` CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count``) and joins the
run through ``jax.distributed`` with a coordinator on a free loopback port.
Process 0's output is shown as it comes; the others' go to log files whose
tail is printed when a process fails. When one process fails, or the run
exceeds ``--timeout``, all of them are stopped and the launcher exits with
the failing process's status (124 on timeout).

Usage (from the repository root; the arguments after ``--`` go to train.py):

  python examples/launch.py --processes 2 --devices-per-process 2 -- --quick
  python examples/launch.py --processes 4 -- --noise dropout --out /tmp/m.json

On several real hosts, run train.py once per host instead:

  python examples/train.py --coordinator host0:1234 --num-processes N --process-id I ...
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Options the launcher sets for every process itself.
RESERVED = ("--coordinator", "--num-processes", "--process-id")
TIMEOUT_STATUS = 124
LOG_TAIL_LINES = 20


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="launch.py",
    description=__doc__.split("\n\n", 1)[0],
    usage="%(prog)s [options] [-- TRAIN_ARGS ...]",
    epilog="Arguments after '--' are passed to every process of the script; the launcher "
    f"adds {', '.join(RESERVED)} itself.",
  )
  p.add_argument(
    "--processes",
    type=int,
    metavar="N",
    default=2,
    help="processes to start (default: %(default)s)",
  )
  p.add_argument(
    "--devices-per-process",
    type=int,
    metavar="K",
    default=1,
    help="CPU devices of each process, through XLA_FLAGS (JAX_PLATFORMS defaults to cpu) "
    "(default: %(default)s)",
  )
  p.add_argument(
    "--timeout",
    type=float,
    metavar="SECONDS",
    default=3600.0,
    help="seconds before all processes are stopped; 0: no limit (default: %(default)s)",
  )
  p.add_argument(
    "--port",
    type=int,
    metavar="PORT",
    default=None,
    help="coordinator port on 127.0.0.1 (default: a free one)",
  )
  p.add_argument(
    "--script",
    metavar="PATH",
    default=TRAIN,
    help="the script every process runs (default: examples/train.py)",
  )
  return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
  """``(launcher options, the script's arguments)``; bad options exit with a usage error."""
  argv = list(sys.argv[1:] if argv is None else argv)
  script_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, script_args = argv[:cut], argv[cut + 1 :]
  p = build_parser()
  args = p.parse_args(argv)
  if args.processes < 1:
    p.error(f"--processes must be >= 1; got {args.processes}")
  if args.devices_per_process < 1:
    p.error(f"--devices-per-process must be >= 1; got {args.devices_per_process}")
  if args.timeout < 0:
    p.error(f"--timeout must be >= 0; got {args.timeout}")
  if args.port is not None and not 0 < args.port < 65536:
    p.error(f"--port must be in [1, 65535]; got {args.port}")
  for arg in script_args:
    if arg.split("=", 1)[0] in RESERVED:
      p.error(f"{arg.split('=', 1)[0]} is set by the launcher; leave it out of the script's args")
  return args, script_args


def free_port() -> int:
  """A TCP port free on the loopback interface right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
  """This environment with ``devices`` forced CPU devices (other XLA flags kept)."""
  flags = [
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
  ]
  return {
    **os.environ,
    "XLA_FLAGS": " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"]),
    "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
  }


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
  """Terminates the process groups of the children still running, then kills them."""
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGTERM)
  deadline = time.monotonic() + grace
  for proc in procs:
    try:
      proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def launch(args: argparse.Namespace, script_args: list[str]) -> int:
  """Runs the processes; returns 0, the first failing process's exit status, or 124."""
  port = args.port or free_port()
  env = child_env(args.devices_per_process)
  procs: list[subprocess.Popen] = []
  logs: list[str | None] = []
  with tempfile.TemporaryDirectory(prefix="launch-") as log_dir:
    try:
      for i in range(args.processes):
        cmd = [sys.executable, args.script, *script_args]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.processes)]
        cmd += ["--process-id", str(i)]
        log = None if i == 0 else os.path.join(log_dir, f"process{i}.log")
        out = None if log is None else open(log, "w", encoding="utf-8")  # noqa: SIM115
        try:
          # Each process in its own session, so that stopping it stops its children too.
          procs.append(
            subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
          )
        finally:
          if out is not None:
            out.close()
        logs.append(log)
      deadline = time.monotonic() + args.timeout if args.timeout else None
      while True:
        codes = [proc.poll() for proc in procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
          i = failed[0]
          _stop(procs)
          log = logs[i]
          if log is not None:
            sys.stderr.write(f"launch.py: process {i}'s last output:\n{_tail(log)}")
          code = codes[i]
          assert code is not None  # it has exited
          status = code if code > 0 else 128 - code  # negative: killed by that signal
          print(f"launch.py: error: process {i} exited with status {status}", file=sys.stderr)
          return status
        if all(code == 0 for code in codes):
          return 0
        if deadline is not None and time.monotonic() > deadline:
          _stop(procs)
          print(
            f"launch.py: error: timed out after {args.timeout:g} s; stopped all processes",
            file=sys.stderr,
          )
          return TIMEOUT_STATUS
        time.sleep(0.05)
    finally:
      _stop(procs)


def main(argv=None) -> int:
  """Runs the CLI; returns the exit status (also the process's, when run as a script)."""
  args, script_args = parse_args(argv)
  try:
    return launch(args, script_args)
  except KeyboardInterrupt:
    print("launch.py: interrupted; stopped all processes", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

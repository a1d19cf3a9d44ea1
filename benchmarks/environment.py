"""What the results JSON records about the run's machine and software."""

from __future__ import annotations

import datetime
import inspect
import os
import platform
import subprocess
from typing import Any

import flax
import jax
import jaxlib
import optax

import regjax
from benchmarks.timing import STEADY_MALLOC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> dict[str, Any]:
  """The checkout's commit and whether ``regjax/`` has uncommitted changes (None: no git)."""
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = bool(
      subprocess.run(
        ["git", "status", "--porcelain", "--", "regjax"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
      ).stdout.strip()
    )
    return {"commit": commit, "regjax_dirty": dirty}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": None, "regjax_dirty": None}


def loadavg() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def rng_impl_defaults() -> dict[str, str]:
  """The default ``rng_impl`` of the three main noise ops (the generator their rows use)."""
  return {
    op.__name__: repr(inspect.signature(op).parameters["rng_impl"].default)
    for op in (regjax.dropout, regjax.gaussian_dropout, regjax.uout)
  }


def environment(device: jax.Device) -> dict[str, Any]:
  """Date, versions, git state, device, CPU count, Python, default generators, allocator."""
  return {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "regjax": regjax.__version__,
    "git": git_state(),
    "device": str(device),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "rng_impl": rng_impl_defaults(),
    "malloc_env": {k: os.environ.get(k) for k in STEADY_MALLOC},
  }

"""Runs a script in a fresh Python process on ``n`` forced host (CPU) devices.

XLA fixes the device count when jax starts, so multi-device tests run their
code in a subprocess.
"""

import os
import subprocess
import sys


def run_on_host_devices(script: str, n: int, timeout: float = 300) -> str:
  """Runs ``script`` with ``n`` CPU devices; returns its stdout, or fails with its stderr."""
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
    "JAX_PLATFORMS": "cpu",
  }
  proc = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout

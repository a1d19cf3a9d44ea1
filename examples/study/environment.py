"""What a result depends on besides the code: package versions, CPU, XLA flags."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = (
  "regjax",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "numpy",
  "scipy",
  "mnist1d",
  "scikit-learn",
  "matplotlib",
)


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


# Vector extensions XLA's CPU code generator may use: two CPUs with the same name but
# different extensions can round differently.
SIMD_FLAGS = (
  "sse4_1",
  "sse4_2",
  "avx",
  "avx2",
  "fma",
  "avx512f",
  "avx512bw",
  "avx512vl",
  "avx512_bf16",
  "amx_bf16",
  "neon",
  "asimd",
  "sve",
)


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
  fields: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
  return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_details() -> dict:
  """Family, model and stepping, and which of ``SIMD_FLAGS`` the CPU has."""
  info = _cpuinfo()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  return {
    "family": info.get("cpu family"),
    "model": info.get("model"),
    "stepping": info.get("stepping"),
    "simd": [f for f in SIMD_FLAGS if f in flags],
  }


def describe() -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  versions = {name: _version(name) for name in PACKAGES}
  return {
    **{k.replace("-", "_"): v for k, v in versions.items()},
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu": cpu_model(),
    "cpu_details": cpu_details(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_flags": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("JAX_")},
    "default_prng_impl": str(jax.config.jax_default_prng_impl),
    "enable_x64": bool(jax.config.jax_enable_x64),
  }

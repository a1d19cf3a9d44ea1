"""The train-mode BatchNorm kernel (regjax._bn_kernel) and the core's shared rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import dtypes as linen_dtypes

import regjax
from regjax import _bn_kernel, _checks
from regjax import normalization as F


def _has_dot(fn, *args) -> bool:
  return "dot_general" in str(jax.make_jaxpr(fn)(*args))


def test_config_is_hashable_and_canonical():
  cfg = _bn_kernel.make_config([0], ["a", "b"], [[0, 1], [2, 3]], 1e-5)
  assert cfg == _bn_kernel.make_config((0,), ("a", "b"), ((0, 1), (2, 3)), 1e-5)
  assert hash(cfg) == hash(_bn_kernel.make_config((0,), ("a", "b"), ((0, 1), (2, 3)), 1e-5))
  assert cfg.axis_name == ("a", "b") and cfg.axis_index_groups == ((0, 1), (2, 3))
  assert not cfg.use_dot


def test_kernel_functions_are_built_once():
  # Module-level custom_jvp and checkpoint: the same objects serve every call.
  assert isinstance(_bn_kernel._normalize, jax.custom_jvp)
  before = (_bn_kernel._normalize, _bn_kernel._normalize_remat)
  x = jnp.ones((4, 8))
  regjax.batch_norm(x, regjax.init_batch_stats(8))
  assert (_bn_kernel._normalize, _bn_kernel._normalize_remat) == before


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the dot reducer is CPU-only")
def test_reducer_is_chosen_by_backend_and_shape(monkeypatch):
  stats = regjax.init_batch_stats(16)
  f = lambda a: regjax.batch_norm(a, stats)[0]  # noqa: E731
  wide = jax.random.normal(jax.random.key(0), (4, 16))
  tall = jax.random.normal(jax.random.key(1), (64, 16))
  assert _has_dot(f, wide) and not _has_dot(f, tall)
  y_cpu = jax.jit(f)(wide)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  g = lambda a: regjax.batch_norm(a, stats)[0]  # noqa: E731  (a new function: no cached trace)
  assert not _has_dot(g, wide)
  # Another reducer, the same values up to rounding.
  np.testing.assert_allclose(jax.jit(g)(wide), y_cpu, rtol=1e-5, atol=1e-5)


def test_batch_stats_is_a_plain_dict():
  stats = regjax.init_batch_stats((2, 3))
  assert type(stats) is dict and set(stats) == {"mean", "var"}
  assert set(regjax.BatchStats.__annotations__) == {"mean", "var"}
  _, new = regjax.batch_norm(jnp.ones((4, 2, 3)), {**stats, "extra": jnp.zeros(())}, axis=(1, 2))
  assert type(new) is dict and set(new) == {"mean", "var", "extra"}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1e-5", None])
def test_check_epsilon_rejects(bad):
  with pytest.raises(ValueError, match=r"op: `epsilon` must be a finite Python or NumPy"):
    _checks.check_epsilon(bad, "op")


def test_check_epsilon_accepts_numbers():
  assert _checks.check_epsilon(np.float32(1e-3), "op") == pytest.approx(1e-3)
  assert type(_checks.check_epsilon(1, "op")) is float


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "x_dtype,p_dtype",
  [
    (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.int32, jnp.float16),
    (jnp.complex64, jnp.float32),
  ],
)
def test_output_dtype_is_flax_rule(dtype, x_dtype, p_dtype):
  x, p = jnp.zeros((2, 3), x_dtype), jnp.zeros((3,), p_dtype)
  for scale, bias in ((p, p), (None, p), (None, None)):
    assert F.output_dtype(x, scale, bias, dtype) == linen_dtypes.canonicalize_dtype(
      *(a for a in (x, scale, bias) if a is not None), dtype=dtype
    )


def test_running_stats_dtype():
  assert F.running_stats_dtype() == jnp.float32
  assert F.running_stats_dtype(jnp.bfloat16) == jnp.float32
  assert F.running_stats_dtype(jnp.bfloat16, False) == jnp.bfloat16


def test_nnx_batch_norm_variables_are_init_batch_stats():
  from flax import nnx

  import regjax.nnx as N

  bn = N.BatchNorm((2, 3), axis=(1, 2), rngs=nnx.Rngs(0))
  ref = regjax.init_batch_stats((2, 3))
  for name in ("mean", "var"):
    var = getattr(bn, name)
    assert isinstance(var, nnx.BatchStat) and var.dtype == jnp.float32
    np.testing.assert_array_equal(var[...], ref[name])

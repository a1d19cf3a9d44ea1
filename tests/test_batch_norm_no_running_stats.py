"""`regjax.batch_norm(x, None, ...)`: batch norm without running statistics.

PyTorch's `track_running_stats=False`: both modes normalize with the batch
statistics and the function returns `(y, None)`. The cross-device cases (with
masks and ghost batches) run in tests/test_ghost_batch_norm.py's 4-device script.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _close, _large_mean_data, _problem, reference_batch_norm
from absl.testing import parameterized
from jax.test_util import check_grads

import regjax


class NoRunningStatsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("nc", (32, 5), -1, False),
    ("nhwc_masked", (4, 3, 2, 6), -1, True),
    ("nchw_two_axes", (6, 3, 4), (1, 2), False),
  )
  def test_both_modes_use_the_batch_statistics(self, shape, axis, masked):
    x, stats, scale, bias = _problem(shape, axis, seed=len(shape))
    mask = jnp.asarray(np.random.default_rng(1).random(shape) < 0.7) if masked else None
    ry, _, _ = reference_batch_norm(
      x, stats["mean"], stats["var"], scale, bias, axis=axis, mask=mask
    )
    for deterministic in (False, True):
      fn = functools.partial(
        regjax.batch_norm, axis=axis, mask=mask, deterministic=deterministic, epsilon=1e-5
      )
      y, none = self.variant(fn)(x, None, scale, bias)
      assert none is None and y.shape == x.shape and y.dtype == x.dtype
      sel = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
      _close(np.where(sel, y, 0), np.where(sel, ry, 0))


def test_y_is_bit_identical_to_train_mode_with_statistics():
  x, stats, scale, bias = _problem((16, 3, 4), -1, seed=2)
  for jit in (False, True):
    fn = jax.jit(regjax.batch_norm, static_argnames="deterministic") if jit else regjax.batch_norm
    want, _ = fn(x, stats, scale, bias)
    for deterministic in (False, True):
      y, _ = fn(x, None, scale, bias, deterministic=deterministic)
      np.testing.assert_array_equal(y, want)


def test_momentum_and_unbiased_running_var_are_checked_but_unused():
  x, _, scale, bias = _problem((8, 3), -1, seed=3)
  want, _ = regjax.batch_norm(x, None, scale, bias)
  for kw in (dict(momentum=0.0), dict(momentum=1.0, unbiased_running_var=True)):
    y, none = regjax.batch_norm(x, None, scale, bias, **kw)
    assert none is None
    np.testing.assert_array_equal(y, want)
  with pytest.raises(ValueError, match="`momentum`"):
    regjax.batch_norm(x, None, momentum=1.5)
  # One value per feature is no error for an unused unbiased variance.
  y, _ = regjax.batch_norm(jnp.ones((1, 3)), None, unbiased_running_var=True)
  np.testing.assert_array_equal(y, 0.0)


def test_contract_errors_are_kept():
  x = jnp.ones((8, 3))
  with pytest.raises(TypeError, match="`deterministic`"):
    jax.jit(lambda a, d: regjax.batch_norm(a, None, deterministic=d))(x, True)
  with pytest.raises(ValueError, match="needs a batch axis"):
    regjax.batch_norm(jnp.ones(3), None, deterministic=True)
  with pytest.raises(ValueError, match="`scale`"):
    regjax.batch_norm(x, None, jnp.ones(4))
  with pytest.raises(TypeError, match="`x`"):
    regjax.batch_norm(jnp.ones((8, 3), jnp.int32), None)


def test_large_mean_is_accurate():
  x = _large_mean_data()
  y, _ = regjax.batch_norm(x, None, deterministic=True)
  ry, _, _ = reference_batch_norm(x, np.zeros(16), np.ones(16))
  assert np.max(np.abs(np.asarray(y, np.float64) - ry)) < 1e-2  # best possible ~5e-4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_dtype(dtype):
  x, stats, scale, bias = _problem((64, 4), -1, seed=4, loc=3.0, dtype=dtype)
  y, none = regjax.batch_norm(x, None, scale, bias, deterministic=True)
  assert none is None and y.dtype == dtype
  np.testing.assert_array_equal(y, regjax.batch_norm(x, stats, scale, bias)[0])


def test_gradients():
  with jax.enable_x64(True):
    x, _, scale, bias = _problem((8, 3), -1, seed=5, dtype=np.float64)
    scale, bias = scale.astype(jnp.float64), bias.astype(jnp.float64)

    def f(x, scale, bias):
      return regjax.batch_norm(x, None, scale, bias, deterministic=True, epsilon=1e-3)[0]

    check_grads(jax.jit(f), (x, scale, bias), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)

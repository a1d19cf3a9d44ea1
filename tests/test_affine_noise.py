"""Tests of regjax.affine_noise: alpha dropout and Gaussian noise.

Random ops are checked statistically: every tolerance is Z standard errors of
the estimated quantity for the sample size used (Z = 5).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import IMPL_CASES, IMPLS, Z, _normal, _uniform
from absl.testing import parameterized

import regjax
from regjax import random as rrandom
from regjax.affine_noise import SELU_ALPHA, SELU_LAMBDA

N = 1 << 20  # samples per elementwise statistical check


ALPHA_P = -SELU_LAMBDA * SELU_ALPHA


# ----------------------------------------------------------------------------
# Alpha dropout and Gaussian noise
def _alpha_constants(rate):
  keep = 1 - rate
  a = (keep * (1 + rate * ALPHA_P**2)) ** -0.5
  b = -a * ALPHA_P * rate
  return a, b, a * ALPHA_P + b


class AlphaDropoutTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    *[(f"rate_{rate}_{impl}", rate, impl) for rate in (0.05, 0.3, 0.8) for impl in IMPLS]
  )
  def test_keeps_mean_zero_and_variance_one_of_standard_normal_input(self, rate, impl):
    x = _normal(10, (N,))
    y = np.asarray(
      self.variant(lambda x, k: regjax.alpha_dropout(x, rate, key=k, rng_impl=impl))(
        x, jax.random.key(11)
      ),
      np.float64,
    )
    a, b, d = _alpha_constants(rate)
    # E y**4 over the kept (a x + b, x ~ N(0, 1)) and dropped (d) units. (The hash's
    # 2**-17 keep resolution moves the mean by at most 2**-17 * |a * alpha_p| ~ 2e-5,
    # far inside the tolerance of ~5e-3.)
    m4 = (1 - rate) * (3 * a**4 + 6 * a**2 * b**2 + b**4) + rate * d**4
    assert abs(y.mean()) < Z / math.sqrt(N)
    assert abs((y**2).mean() - 1) < Z * math.sqrt((m4 - 1) / N)
    dropped = np.isclose(y, d, rtol=1e-6, atol=0)
    assert abs(dropped.mean() - rate) < Z * math.sqrt(rate * (1 - rate) / N)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_matches_float64_formula_with_dropouts_mask(self, impl):
    rate = 0.4
    x = _normal(12, (4096,))
    key = jax.random.key(13)
    y = np.asarray(regjax.alpha_dropout(x, rate, key=key, rng_impl=impl), np.float64)
    # The mask is the one dropout draws from the same key with the same generator.
    kept = np.asarray(regjax.dropout(jnp.ones_like(x), rate, key=key, rng_impl=impl)) != 0
    a, b, d = _alpha_constants(rate)
    xr = np.asarray(x, np.float64)
    reference = a * (xr * kept + ALPHA_P * (~kept)) + b
    np.testing.assert_allclose(y, reference, rtol=2e-6, atol=2e-6)
    assert np.allclose(y[~kept], d)

  def test_jax_generator_mask_is_jax_random_bernoulli(self):
    rate = 0.3
    key = jax.random.key(17)
    y = np.asarray(regjax.alpha_dropout(jnp.zeros((32, 24)), rate, key=key, rng_impl="jax"))
    mask = np.asarray(jax.random.bernoulli(key, 1 - rate, (32, 24)))
    np.testing.assert_array_equal(y != np.float32(_alpha_constants(rate)[2]), mask)

  def test_default_hash_mask_is_dropouts_default_mask(self):
    # With the default generator, alpha dropout keeps exactly the units that
    # regjax.dropout keeps for the same key (both draw rrandom.bernoulli_from_bits(bits, keep)).
    for rate, shape, dims, seed in ((0.1, (128, 96), (), 18), (0.6, (64, 10, 12), (1,), 19)):
      key = jax.random.key(seed)
      x = _uniform(seed, shape, 0.5, 1.5)  # a kept unit is a * x + b > 0 > the dropped value
      y = np.asarray(regjax.alpha_dropout(x, rate, key=key, broadcast_dims=dims))
      kept = np.asarray(regjax.dropout(jnp.ones(shape), rate, key=key, broadcast_dims=dims)) != 0
      np.testing.assert_array_equal(y > 0, kept)
    # ... which is rrandom.bernoulli_from_bits(bits, 1 - rate) of the key's hashed bits.
    bits = rrandom.bits(jax.random.key(18), (128, 96))
    np.testing.assert_array_equal(
      np.asarray(regjax.alpha_dropout(jnp.ones((128, 96)), 0.1, key=jax.random.key(18))) > 0,
      np.asarray(rrandom.bernoulli_from_bits(bits, jnp.float32(0.9))),
    )

  @parameterized.named_parameters(*IMPL_CASES)
  def test_broadcast_dims_share_one_draw(self, impl):
    y = np.asarray(
      regjax.alpha_dropout(
        jnp.zeros((64, 16)), 0.5, key=jax.random.key(14), broadcast_dims=(1,), rng_impl=impl
      )
    )
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1], y.shape))
    assert len(np.unique(y[:, 0])) == 2

  @parameterized.named_parameters(*IMPL_CASES)
  def test_rate_one_gives_zeros_and_zero_gradients(self, impl):
    x = _normal(15, (16, 8))
    key = jax.random.key(16)
    np.testing.assert_array_equal(np.asarray(regjax.alpha_dropout(x, 1.0, rng_impl=impl)), 0)

    def loss(x, r):
      return jnp.sum(regjax.alpha_dropout(x, r, key=key, rng_impl=impl) * 3.0)

    value, grad = jax.jit(jax.value_and_grad(loss))(x, 1.0)  # traced rate 1
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)
    value, grad = jax.jit(jax.value_and_grad(loss))(x, 0.999999)
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))


class GaussianNoiseTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    *[(f"std_{std}_{impl}", std, impl) for std in (0.1, 1.0, 3.0) for impl in IMPLS]
  )
  def test_additive_normal_noise(self, stddev, impl):
    x = _normal(20, (N,)) * 2.0 + 1.0
    y = self.variant(lambda x, k: regjax.gaussian_noise(x, stddev, key=k, rng_impl=impl))(
      x, jax.random.key(21)
    )
    e = (np.asarray(y, np.float64) - np.asarray(x, np.float64)) / stddev  # should be N(0, 1)
    assert abs(e.mean()) < Z / math.sqrt(N)
    assert abs(e.var() - 1) < Z * math.sqrt(2 / N)
    assert abs((e**4).mean() - 3) < Z * math.sqrt(96 / N)
    # The noise does not depend on x (additive, not multiplicative).
    assert abs(np.corrcoef(np.abs(e), np.abs(np.asarray(x)))[0, 1]) < Z / math.sqrt(N)

  def test_hash_noise_is_stddev_times_hash_normal(self):
    stddev, shape = 0.7, (256, 48)
    key = jax.random.key(22)

    def noise(key, stddev):
      return stddev * rrandom.normal_from_bits(rrandom.bits(key, shape), jnp.float32)

    expected = jax.jit(noise)(key, stddev)
    # x = 0: y is exactly the noise, eagerly and under jit (the op always runs compiled,
    # so both equal the compiled product).
    y = regjax.gaussian_noise(jnp.zeros(shape), stddev, key=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    y_jit = jax.jit(lambda x, s, k: regjax.gaussian_noise(x, s, key=k))(
      jnp.zeros(shape), stddev, key
    )
    np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(y))
    # Mean 0 and variance stddev**2 (5 standard errors; a normal's 4th moment is 3).
    e = np.asarray(regjax.gaussian_noise(jnp.zeros((N,)), stddev, key=key), np.float64)
    assert abs(e.mean()) < Z * stddev / math.sqrt(N)
    assert abs(e.var() - stddev**2) < Z * stddev**2 * math.sqrt(2 / N)
    # With x != 0 the noise is added in float32: x + e up to its rounding.
    x = _normal(23, shape)
    np.testing.assert_allclose(
      np.asarray(regjax.gaussian_noise(x, stddev, key=key)),
      np.asarray(x + expected),
      rtol=0,
      atol=1e-6,
    )

  def test_jax_generator_noise_is_jax_random_normal(self):
    key = jax.random.key(24)
    y = regjax.gaussian_noise(jnp.zeros((32, 24)), 1.0, key=key, rng_impl="jax")
    np.testing.assert_array_equal(
      np.asarray(y), np.asarray(jax.random.normal(key, (32, 24), jnp.float32))
    )


class AffineNoiseHashTest(parameterized.TestCase):
  """rng_impl='hash' (the default) for alpha_dropout and gaussian_noise."""

  @parameterized.named_parameters(
    ("alpha_dropout", regjax.alpha_dropout, 0.3), ("gaussian_noise", regjax.gaussian_noise, 0.5)
  )
  def test_backward_stores_nothing_per_element(self, op, value):
    # The vjp closes over its residuals: only the two seed words and a few scalars.
    x = _normal(25, (256, 512))
    key = jax.random.key(26)
    _, vjp = jax.vjp(lambda x: op(x, value, key=key), x)
    stored = sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
    assert stored <= 8, stored
    grad = np.asarray(vjp(jnp.ones_like(x))[0])
    if op is regjax.gaussian_noise:
      np.testing.assert_array_equal(grad, 1)  # additive: dy/dx = 1
    else:  # a where kept, 0 where dropped
      kept = np.asarray(regjax.dropout(jnp.ones_like(x), value, key=key)) != 0
      a = _alpha_constants(value)[0]
      np.testing.assert_allclose(grad, np.where(kept, a, 0.0), rtol=1e-6, atol=0)

  @parameterized.named_parameters(
    ("alpha_dropout", regjax.alpha_dropout, 0.3), ("gaussian_noise", regjax.gaussian_noise, 0.5)
  )
  def test_same_draw_with_and_without_jit(self, op, value):
    x = _normal(27, (33, 65))
    key = jax.random.key(28)
    eager = np.asarray(op(x, value, key=key))
    jitted = np.asarray(jax.jit(lambda x, k: op(x, value, key=k))(x, key))
    # The same draw; jit may fuse the multiply-add or erf_inv differently (a few ulp).
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    if op is regjax.alpha_dropout:
      d = np.float32(_alpha_constants(value)[2])
      np.testing.assert_array_equal(jitted == d, eager == d)
    np.testing.assert_array_equal(eager, np.asarray(op(x, value, key=jax.random.PRNGKey(28))))

  @parameterized.named_parameters(
    ("alpha_dropout", regjax.alpha_dropout, 0.3), ("gaussian_noise", regjax.gaussian_noise, 0.5)
  )
  def test_bad_rng_impl(self, op, value):
    for bad in ("threefry", None, "HASH"):
      with pytest.raises(ValueError, match=r"`rng_impl` must be one of"):
        op(jnp.ones(3), value, key=jax.random.key(0), rng_impl=bad)
    with pytest.raises(ValueError, match="rng_impl"):  # even where nothing is drawn
      op(jnp.ones(3), value, deterministic=True, rng_impl="philox")

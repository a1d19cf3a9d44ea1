"""Tests of the rest of the dropout family (pure functions): alpha dropout,
Gaussian noise, channel dropout, drop path, DropBlock, cutout, DropConnect and
the max-norm constraint.

Random ops are checked statistically: every tolerance is Z standard errors of
the estimated quantity for the sample size used (Z = 5, a false-alarm rate of
about 6e-7 per check). Where a standard error is not known in closed form the
test says which bound it uses.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads
from numpy.lib.stride_tricks import sliding_window_view

import regjax
from regjax import random as rrandom
from regjax.affine_noise import SELU_ALPHA, SELU_LAMBDA

Z = 5.0
N = 1 << 20  # samples per elementwise statistical check
ALPHA_P = -SELU_LAMBDA * SELU_ALPHA

def _normal(seed, shape):
  # NumPy draws: a jax.random draw per new shape would cost an eager compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform(seed, shape, low, high):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


# A fixed kernel and bias for DropConnect, so every call has the same shapes.
_DC_KERNEL = _normal(100, (32, 24)) / math.sqrt(32)
_DC_BIAS = _normal(101, (24,))


def _dropconnect(x, rate, **kw):
  kernel, bias = _DC_KERNEL.astype(x.dtype), _DC_BIAS.astype(x.dtype)
  return regjax.dropconnect_dense(x, kernel, bias, rate, **kw)


IMPLS = ("hash", "jax")  # the generators of the ops with `rng_impl`; each runs every test
IMPL_CASES = tuple((impl, impl) for impl in IMPLS)

# name -> (op(x, setting, key=, deterministic=), input shape, customary setting,
#          the setting's argument name, regex of its range in the error message,
#          one out-of-range setting, does setting 1 zero the output)
OPS = {
    **{f"alpha_dropout_{impl}": (functools.partial(regjax.alpha_dropout, rng_impl=impl),
                                 (64, 32), 0.3, "rate", r"\[0, 1\]", 1.5) for impl in IMPLS},
    **{f"gaussian_noise_{impl}": (functools.partial(regjax.gaussian_noise, rng_impl=impl),
                                  (64, 32), 0.5, "stddev", r"\[0, inf\)", -0.1)
       for impl in IMPLS},
    "channel_dropout": (regjax.channel_dropout, (8, 6, 6, 16), 0.3, "rate", r"\[0, 1\]", -0.1),
    "drop_path": (regjax.drop_path, (64, 4, 4), 0.3, "rate", r"\[0, 1\]", 1.01),
    **{f"dropblock_{impl}": (functools.partial(regjax.dropblock, block_size=3, rng_impl=impl),
                             (4, 12, 12, 8), 0.3, "rate", r"\[0, 1\]", 2.0) for impl in IMPLS},
    "cutout": (regjax.cutout, (4, 12, 12, 3), 5, "size", r"\[0, 12\]", 13),
    "dropconnect_dense": (_dropconnect, (16, 32), 0.3, "rate", r"\[0, 1\]", -1.0),
}
OP_CASES = tuple((name, name) for name in OPS)
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _input(name, dtype=jnp.float32, seed=0):
  shape = OPS[name][1]
  # Positive inputs, so a zero in the output can only come from the op.
  return _uniform(seed, shape, 0.5, 1.5).astype(dtype)


# ----------------------------------------------------------------------------
# Contracts shared by every op


class ContractTest(chex.TestCase):

  # Eager: jit and eager agree (test_same_key_same_draw_with_and_without_jit),
  # and eager primitives are compiled once per shape, not once per test.
  @parameterized.named_parameters(
      *[(f"{name}_{jnp.dtype(d).name}", name, d) for name in OPS for d in FLOAT_DTYPES])
  def test_shape_dtype_and_finiteness(self, name, dtype):
    op, _, setting, *_ = OPS[name]
    x = _input(name, dtype)
    apply = lambda x, k: op(x, setting, key=k)
    y = apply(x, jax.random.key(1))
    expected_shape = x.shape[:-1] + (24,) if name == "dropconnect_dense" else x.shape
    chex.assert_shape(y, expected_shape)
    chex.assert_type(y, dtype)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    if dtype != jnp.float32 and name != "dropconnect_dense":
      # Half precision is computed in float32 and rounded once.
      y32 = apply(x.astype(jnp.float32), jax.random.key(1))
      np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(dtype)))

  @parameterized.named_parameters(*OP_CASES)
  def test_eval_and_zero_setting_return_x_without_key(self, name):
    op, *_ = OPS[name]
    x = _input(name)
    if name == "dropconnect_dense":
      eval_y = op(x, 0.3, deterministic=True)
      np.testing.assert_array_equal(np.asarray(eval_y), np.asarray(x @ _DC_KERNEL + _DC_BIAS))
      np.testing.assert_array_equal(np.asarray(op(x, 0.0)), np.asarray(eval_y))
      return
    assert op(x, OPS[name][2], deterministic=True) is x
    assert op(x, 0) is x

  @parameterized.named_parameters(*OP_CASES)
  def test_same_key_same_draw_with_and_without_jit(self, name):
    op, _, setting, *_ = OPS[name]
    x = _input(name)
    key = jax.random.key(2)
    eager = np.asarray(op(x, setting, key=key))
    np.testing.assert_array_equal(eager, np.asarray(op(x, setting, key=key)))
    jitted = np.asarray(jax.jit(lambda x, k: op(x, setting, key=k))(x, key))
    # jit may fuse a multiply-add differently: a few ulp, not a new draw.
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    other = np.asarray(op(x, setting, key=jax.random.key(3)))
    assert not np.allclose(other, eager)
    raw = np.asarray(op(x, setting, key=jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(raw, eager)

  @parameterized.named_parameters(*OP_CASES)
  def test_changing_traced_setting_traces_once_and_is_clipped(self, name):
    op, _, setting, _, _, bad = OPS[name]
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(x, setting, key):
      return op(x, setting, key=key)

    x = _input(name)
    dtype = jnp.int32 if name == "cutout" else jnp.float32
    outs = [np.asarray(apply(x, jnp.asarray(s, dtype), jax.random.key(4)))
            for s in (0, setting, setting)]
    reference = np.asarray(op(x, setting, key=jax.random.key(4)))
    np.testing.assert_allclose(outs[1], reference, rtol=1e-6, atol=1e-6)
    zero = np.asarray(x @ _DC_KERNEL + _DC_BIAS) if name == "dropconnect_dense" else np.asarray(x)
    np.testing.assert_allclose(outs[0], zero, rtol=1e-6, atol=1e-6)  # traced 0: identity
    # An out-of-range traced value cannot raise; it is clipped, never NaN.
    y = apply(x, jnp.asarray(bad, dtype), jax.random.key(5))
    assert np.all(np.isfinite(np.asarray(y)))

  @parameterized.named_parameters(*OP_CASES)
  def test_check_grads(self, name):
    op, _, setting, *_ = OPS[name]
    x = _normal(6, OPS[name][1])
    key = jax.random.key(7)
    # Every op is linear in x for a fixed key, so first order is the whole story.
    check_grads(lambda x: op(x, setting, key=key), (x,), order=1,
                modes=("fwd", "rev"), atol=1e-2, rtol=1e-2, eps=1e-2)

  @parameterized.named_parameters(*OP_CASES)
  def test_missing_key_in_train_mode(self, name):
    op, _, setting, *_ = OPS[name]
    x = _input(name)
    with pytest.raises(ValueError, match=r"needs a PRNG key.*key="):
      op(x, setting)
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
      jax.jit(lambda x: op(x, setting))(x)

  @parameterized.named_parameters(*OP_CASES)
  def test_setting_out_of_range_names_the_argument(self, name):
    op, _, _, arg, range_re, bad = OPS[name]
    with pytest.raises(ValueError, match=rf"`{arg}` must be in {range_re}"):
      op(_input(name), bad, key=jax.random.key(0))

  @parameterized.named_parameters(*OP_CASES)
  def test_bad_keys_and_inputs(self, name):
    op, shape, setting, *_ = OPS[name]
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(_input(name), setting, key=42)
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
      op(jnp.ones(shape, jnp.int32), setting, key=jax.random.key(0))
    with pytest.raises(TypeError, match="`deterministic` must be a Python bool"):
      jax.jit(lambda x, d: op(x, setting, key=jax.random.key(0), deterministic=d))(
          _input(name), True)


def test_flat_draws_are_jax_randoms_draws():
  # regjax._random draws on (prod(shape),) and reshapes (it compiles faster);
  # the bits must be exactly jax.random's, for typed and raw keys.
  from regjax import _random
  shape = (2, 1, 3, 4)
  for key in (jax.random.key(90), jax.random.PRNGKey(90)):
    np.testing.assert_array_equal(np.asarray(_random.bernoulli(key, 0.3, shape)),
                                  np.asarray(jax.random.bernoulli(key, 0.3, shape)))
    np.testing.assert_array_equal(np.asarray(_random.normal(key, shape, jnp.float32)),
                                  np.asarray(jax.random.normal(key, shape, jnp.float32)))


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
      *[(f"rate_{rate}_{impl}", rate, impl) for rate in (0.05, 0.3, 0.8) for impl in IMPLS])
  def test_keeps_mean_zero_and_variance_one_of_standard_normal_input(self, rate, impl):
    x = _normal(10, (N,))
    y = np.asarray(self.variant(lambda x, k: regjax.alpha_dropout(x, rate, key=k, rng_impl=impl))(
        x, jax.random.key(11)), np.float64)
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
        np.asarray(rrandom.bernoulli_from_bits(bits, jnp.float32(0.9))))

  @parameterized.named_parameters(*IMPL_CASES)
  def test_broadcast_dims_share_one_draw(self, impl):
    y = np.asarray(regjax.alpha_dropout(jnp.zeros((64, 16)), 0.5, key=jax.random.key(14),
                                        broadcast_dims=(1,), rng_impl=impl))
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1], y.shape))
    assert len(np.unique(y[:, 0])) == 2

  @parameterized.named_parameters(*IMPL_CASES)
  def test_rate_one_gives_zeros_and_zero_gradients(self, impl):
    x = _normal(15, (16, 8))
    key = jax.random.key(16)
    np.testing.assert_array_equal(np.asarray(regjax.alpha_dropout(x, 1.0, rng_impl=impl)), 0)
    loss = lambda x, r: jnp.sum(regjax.alpha_dropout(x, r, key=key, rng_impl=impl) * 3.0)
    value, grad = jax.jit(jax.value_and_grad(loss))(x, 1.0)  # traced rate 1
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)
    value, grad = jax.jit(jax.value_and_grad(loss))(x, 0.999999)
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))


class GaussianNoiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      *[(f"std_{std}_{impl}", std, impl) for std in (0.1, 1.0, 3.0) for impl in IMPLS])
  def test_additive_normal_noise(self, stddev, impl):
    x = _normal(20, (N,)) * 2.0 + 1.0
    y = self.variant(lambda x, k: regjax.gaussian_noise(x, stddev, key=k, rng_impl=impl))(
        x, jax.random.key(21))
    e = (np.asarray(y, np.float64) - np.asarray(x, np.float64)) / stddev  # should be N(0, 1)
    assert abs(e.mean()) < Z / math.sqrt(N)
    assert abs(e.var() - 1) < Z * math.sqrt(2 / N)
    assert abs((e**4).mean() - 3) < Z * math.sqrt(96 / N)
    # The noise does not depend on x (additive, not multiplicative).
    assert abs(np.corrcoef(np.abs(e), np.abs(np.asarray(x)))[0, 1]) < Z / math.sqrt(N)

  def test_hash_noise_is_stddev_times_hash_normal(self):
    stddev, shape = 0.7, (256, 48)
    key = jax.random.key(22)
    noise = lambda key, stddev: stddev * rrandom.normal_from_bits(
        rrandom.bits(key, shape), jnp.float32)
    expected = jax.jit(noise)(key, stddev)
    # x = 0: y is exactly the noise, eagerly and under jit (the op always runs compiled,
    # so both equal the compiled product).
    y = regjax.gaussian_noise(jnp.zeros(shape), stddev, key=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    y_jit = jax.jit(lambda x, s, k: regjax.gaussian_noise(x, s, key=k))(
        jnp.zeros(shape), stddev, key)
    np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(y))
    # Mean 0 and variance stddev**2 (5 standard errors; a normal's 4th moment is 3).
    e = np.asarray(regjax.gaussian_noise(jnp.zeros((N,)), stddev, key=key), np.float64)
    assert abs(e.mean()) < Z * stddev / math.sqrt(N)
    assert abs(e.var() - stddev**2) < Z * stddev**2 * math.sqrt(2 / N)
    # With x != 0 the noise is added in float32: x + e up to its rounding.
    x = _normal(23, shape)
    np.testing.assert_allclose(np.asarray(regjax.gaussian_noise(x, stddev, key=key)),
                               np.asarray(x + expected), rtol=0, atol=1e-6)

  def test_jax_generator_noise_is_jax_random_normal(self):
    key = jax.random.key(24)
    y = regjax.gaussian_noise(jnp.zeros((32, 24)), 1.0, key=key, rng_impl="jax")
    np.testing.assert_array_equal(np.asarray(y),
                                  np.asarray(jax.random.normal(key, (32, 24), jnp.float32)))


class AffineNoiseHashTest(parameterized.TestCase):
  """rng_impl='hash' (the default) for alpha_dropout and gaussian_noise."""

  @parameterized.named_parameters(("alpha_dropout", regjax.alpha_dropout, 0.3),
                                  ("gaussian_noise", regjax.gaussian_noise, 0.5))
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

  @parameterized.named_parameters(("alpha_dropout", regjax.alpha_dropout, 0.3),
                                  ("gaussian_noise", regjax.gaussian_noise, 0.5))
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

  @parameterized.named_parameters(("alpha_dropout", regjax.alpha_dropout, 0.3),
                                  ("gaussian_noise", regjax.gaussian_noise, 0.5))
  def test_bad_rng_impl(self, op, value):
    for bad in ("threefry", None, "HASH"):
      with pytest.raises(ValueError, match=r"`rng_impl` must be one of"):
        op(jnp.ones(3), value, key=jax.random.key(0), rng_impl=bad)
    with pytest.raises(ValueError, match="rng_impl"):  # even where nothing is drawn
      op(jnp.ones(3), value, deterministic=True, rng_impl="philox")


# ----------------------------------------------------------------------------
# Channel dropout and drop path


class ChannelDropoutTest(chex.TestCase):

  @parameterized.named_parameters(
      ("1d_last", (256, 10, 32), -1), ("1d_first", (256, 32, 10), 1),
      ("2d_last", (128, 6, 6, 32), -1), ("2d_first", (128, 32, 6, 6), 1),
      ("3d_last", (64, 3, 4, 4, 32), -1), ("3d_first", (64, 32, 3, 4, 4), 1))
  def test_whole_feature_maps_are_kept_or_zeroed(self, shape, channel_axis):
    rate = 0.3
    x = jnp.ones(shape)
    y = regjax.channel_dropout(x, rate, key=jax.random.key(30), channel_axis=channel_axis)
    y = np.moveaxis(np.asarray(y, np.float64), channel_axis, -1)
    y = y.reshape(shape[0], -1, y.shape[-1])  # (sample, spatial, channel)
    np.testing.assert_array_equal(y.min(axis=1), y.max(axis=1))  # one value per slice
    slices = y[:, 0, :]
    assert np.all(np.isclose(slices, 0) | np.isclose(slices, 1 / (1 - rate), rtol=1e-6))
    kept = (slices != 0).mean()
    assert abs(kept - (1 - rate)) < Z * math.sqrt(rate * (1 - rate) / slices.size)

  def test_is_dropout_broadcast_over_spatial_axes(self):
    x = _normal(31, (8, 5, 5, 16))
    key = jax.random.key(32)
    np.testing.assert_array_equal(
        np.asarray(regjax.channel_dropout(x, 0.4, key=key)),
        np.asarray(regjax.dropout(x, 0.4, key=key, broadcast_dims=(1, 2))))
    np.testing.assert_array_equal(np.asarray(regjax.channel_dropout(x, 1.0)), 0)

  def test_bad_channel_axis_and_rank(self):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`channel_axis` must not be 0"):
      regjax.channel_dropout(jnp.ones((2, 3, 4)), 0.5, key=key, channel_axis=0)
    with pytest.raises(ValueError, match=r"`channel_axis`=3 is out of range"):
      regjax.channel_dropout(jnp.ones((2, 3, 4)), 0.5, key=key, channel_axis=3)
    with pytest.raises(TypeError, match="`channel_axis` must be an int"):
      regjax.channel_dropout(jnp.ones((2, 3, 4)), 0.5, key=key, channel_axis=(1, 2))
    with pytest.raises(ValueError, match="`x` must have rank >= 3"):
      regjax.channel_dropout(jnp.ones((2, 3)), 0.5, key=key)


class DropPathTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("rate_0.1", 0.1), ("rate_0.5", 0.5))
  def test_row_mode_drops_whole_samples_and_preserves_the_mean(self, rate):
    n = 1 << 16
    y = self.variant(lambda x, k: regjax.drop_path(x, rate, key=k))(
        jnp.ones((n, 3, 2)), jax.random.key(40))
    y = np.asarray(y, np.float64).reshape(n, -1)
    np.testing.assert_array_equal(y.min(axis=1), y.max(axis=1))
    assert np.all(np.isclose(y[:, 0], 0) | np.isclose(y[:, 0], 1 / (1 - rate), rtol=1e-6))
    dropped = (y[:, 0] == 0).mean()
    assert abs(dropped - rate) < Z * math.sqrt(rate * (1 - rate) / n)
    assert abs(y[:, 0].mean() - 1) < Z * math.sqrt(rate / (1 - rate) / n)

  def test_batch_mode_drops_the_whole_batch_with_probability_rate(self):
    rate, draws = 0.3, 20000
    keys = jax.random.split(jax.random.key(41), draws)
    y = jax.jit(jax.vmap(lambda k: regjax.drop_path(jnp.ones((4, 3)), rate, key=k,
                                                    mode="batch")))(keys)
    y = np.asarray(y, np.float64).reshape(draws, -1)
    np.testing.assert_array_equal(y.min(axis=1), y.max(axis=1))
    dropped = (y[:, 0] == 0).mean()
    assert abs(dropped - rate) < Z * math.sqrt(rate * (1 - rate) / draws)
    assert abs(y.mean() - 1) < Z * math.sqrt(rate / (1 - rate) / draws)

  def test_residual_use_and_rate_one(self):
    x = _normal(42, (32, 8))
    branch = jnp.tanh(x)
    out = x + regjax.drop_path(branch, 0.5, key=jax.random.key(43))
    rows = np.asarray(out - x)
    dropped = np.all(rows == 0, axis=1)
    assert 0 < dropped.sum() < 32  # some branches dropped, the shortcut always kept
    np.testing.assert_allclose(rows[~dropped], 2 * np.asarray(branch)[~dropped], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(regjax.drop_path(x, 1.0)), 0)

  def test_bad_mode(self):
    with pytest.raises(ValueError, match="`mode` must be one of"):
      regjax.drop_path(jnp.ones((2, 3)), 0.5, key=jax.random.key(0), mode="sample")

  def test_drop_path_rates_conventions(self):
    np.testing.assert_allclose(regjax.drop_path_rates(4, 0.2), [0.05, 0.1, 0.15, 0.2])
    np.testing.assert_allclose(regjax.drop_path_rates(5, 0.2, convention="linspace"),
                               np.linspace(0, 0.2, 5))  # timm's dpr
    assert regjax.drop_path_rates(4, 0.2)[-1] == 0.2
    assert regjax.drop_path_rates(3, 0.3, convention="linspace")[-1] == 0.3
    assert regjax.drop_path_rates(1, 0.3) == (0.3,)
    assert regjax.drop_path_rates(1, 0.3, convention="linspace") == (0.0,)
    with pytest.raises(ValueError, match=r"`num_blocks` must be in \[1, inf\)"):
      regjax.drop_path_rates(0, 0.2)
    with pytest.raises(ValueError, match=r"`max_rate` must be in \[0, 1\]"):
      regjax.drop_path_rates(4, 1.2)
    with pytest.raises(ValueError, match="`convention` must be one of"):
      regjax.drop_path_rates(4, 0.2, convention="timm")


# ----------------------------------------------------------------------------
# DropBlock


def _coverage_counts(size, block_size):
  """How many fitting block positions cover each index of an axis of length size."""
  return np.array([min(i, size - block_size) - max(0, i - block_size + 1) + 1
                   for i in range(size)])


def _seed_probability(height, width, block_size, rate, impl="jax"):
  """The seed probability gamma; with the hash generator the one its 16-bit threshold
  realises, round(gamma * 2**16) / 2**16 of the float32 gamma dropblock computes."""
  factor = height * width / (block_size**2 * (height - block_size + 1) * (width - block_size + 1))
  if impl == "jax":
    return rate * factor
  gamma32 = np.float32(rate) * np.float32(factor)
  return float(np.round(gamma32 * np.float32(1 << 16))) / (1 << 16)


def _exact_drop_probability(height, width, block_size, rate, impl="jax"):
  """P(position dropped) = 1 - (1 - gamma)**c, c = number of fitting blocks covering it."""
  gamma = _seed_probability(height, width, block_size, rate, impl)
  c = np.outer(_coverage_counts(height, block_size), _coverage_counts(width, block_size))
  return 1 - (1 - gamma) ** c, gamma


def _union_of_all_zero_blocks(zero, block_size, axes=(1, 2)):
  """The union of every fitting block_size x block_size block that is all zero."""
  blocks = sliding_window_view(zero, (block_size, block_size), axis=axes).all(axis=(-2, -1))
  pad = [(0, 0)] * zero.ndim
  for a in axes:
    pad[a] = (block_size - 1, block_size - 1)
  padded = np.pad(blocks, pad)
  return sliding_window_view(padded, (block_size, block_size), axis=axes).any(axis=(-2, -1))


class DropBlockTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*IMPL_CASES)
  def test_per_position_drop_probability_and_fraction(self, impl):
    # 8192 independent 10 x 10 maps: each position's dropped indicator is an
    # independent Bernoulli(p_hw) across maps, so a binomial tolerance is exact.
    # (With 'hash', gamma is the realised 16-bit one: 3413 / 2**16 here, not 0.0520833;
    # the difference is far inside the tolerance, but the formula uses the exact value.)
    rate, block_size, (n, h, w, c) = 0.3, 3, (2048, 10, 10, 4)
    y = self.variant(lambda x, k: regjax.dropblock(x, rate, key=k, block_size=block_size,
                                                   rng_impl=impl))(
        jnp.ones((n, h, w, c)), jax.random.key(50))
    dropped = np.asarray(y) == 0
    maps = n * c
    p, _ = _exact_drop_probability(h, w, block_size, rate, impl)
    freq = dropped.mean(axis=(0, 3))
    np.testing.assert_array_less(np.abs(freq - p), Z * np.sqrt(p * (1 - p) / maps))
    # The mean dropped fraction: per-map fractions are iid in [0, 1] with mean
    # mu, so Var <= mu (1 - mu) (Bhatia-Davis), a bound free of the unknown
    # correlation between positions. Blocks overlap, so mu < rate: the gap
    # (0.3 vs 0.257 here) exceeds the tolerance, so the nominal rate would fail.
    mu = p.mean()
    fraction = dropped.mean()
    assert abs(fraction - mu) < Z * math.sqrt(mu * (1 - mu) / maps)
    assert rate - mu > 1.5 * Z * math.sqrt(mu * (1 - mu) / maps)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_kept_units_are_rescaled_by_numel_over_sum(self, impl):
    x = jnp.ones((8, 16, 16, 4))
    y = np.asarray(regjax.dropblock(x, 0.2, key=jax.random.key(51), block_size=5, rng_impl=impl))
    kept = y != 0
    np.testing.assert_allclose(y[kept], y.size / kept.sum(), rtol=1e-6)
    assert abs(y.sum() / y.size - 1) < 1e-5  # the whole tensor's mean is preserved

  @parameterized.named_parameters(
      *[(f"block_{b}_{impl}", b, impl) for b in (1, 2, 3, 4, 9) for impl in IMPLS])
  def test_dropped_regions_are_unions_of_whole_blocks(self, block_size, impl):
    x = jnp.ones((6, 11, 9, 3))  # non-square, odd and even block sizes
    y = np.asarray(regjax.dropblock(x, 0.4, key=jax.random.key(52), block_size=block_size,
                                    rng_impl=impl))
    zero = y == 0
    assert zero.any() and not zero.all()
    # Every zero lies in some all-zero block that fits, and nothing else is zero.
    np.testing.assert_array_equal(_union_of_all_zero_blocks(zero, block_size), zero)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_nchw_layout(self, impl):
    x = jnp.ones((6, 3, 11, 9))
    y = np.asarray(regjax.dropblock(x, 0.4, key=jax.random.key(53), block_size=3,
                                    data_format="NCHW", rng_impl=impl))
    zero = y == 0
    assert zero.any()
    np.testing.assert_array_equal(_union_of_all_zero_blocks(zero, 3, axes=(2, 3)), zero)
    shared = np.asarray(regjax.dropblock(x, 0.4, key=jax.random.key(53), block_size=3,
                                         data_format="NCHW", share_channels=True,
                                         rng_impl=impl))
    np.testing.assert_array_equal(shared, np.broadcast_to(shared[:, :1], shared.shape))

  @parameterized.named_parameters(*IMPL_CASES)
  def test_share_channels(self, impl):
    x = jnp.ones((8, 12, 12, 5))
    shared = np.asarray(regjax.dropblock(x, 0.3, key=jax.random.key(54), block_size=3,
                                         share_channels=True, rng_impl=impl))
    np.testing.assert_array_equal(shared, np.broadcast_to(shared[..., :1], shared.shape))
    assert (shared == 0).any()
    independent = np.asarray(regjax.dropblock(x, 0.3, key=jax.random.key(54), block_size=3,
                                              rng_impl=impl))
    assert not np.array_equal(independent, np.broadcast_to(independent[..., :1], x.shape))
    # Samples still differ from one another.
    assert not np.array_equal(shared[0], shared[1])

  @parameterized.named_parameters(*IMPL_CASES)
  def test_everything_dropped_gives_zeros_not_nan(self, impl):
    # block_size == H == W: gamma == rate, so rate 1 drops every map.
    x = _normal(55, (2, 4, 4, 3))
    loss = lambda x, r: jnp.sum(regjax.dropblock(x, r, key=jax.random.key(56), block_size=4,
                                                 rng_impl=impl))
    y = regjax.dropblock(x, 1.0, key=jax.random.key(56), block_size=4, rng_impl=impl)
    np.testing.assert_array_equal(np.asarray(y), 0)
    value, grad = jax.jit(jax.value_and_grad(loss))(x, 1.0)
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_linear_ramp_with_traced_step_compiles_once(self, impl):
    chex.clear_trace_counter()
    total = 100

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(x, step, key):
      rate = regjax.dropblock_rate_schedule(step, total, 0.3)
      return regjax.dropblock(x, rate, key=key, block_size=3, rng_impl=impl), rate

    x = jnp.ones((16, 12, 12, 8))
    fractions, rates = [], []
    for step in (0, 25, 50, 100, 150):
      y, rate = train_step(x, step, jax.random.fold_in(jax.random.key(57), step))
      fractions.append(float((np.asarray(y) == 0).mean()))
      rates.append(float(rate))
    np.testing.assert_allclose(rates, [0.0, 0.075, 0.15, 0.3, 0.3], rtol=1e-6)
    assert fractions[0] == 0.0
    assert fractions[1] < fractions[2] < fractions[3]

  def test_rate_schedule(self):
    s = regjax.dropblock_rate_schedule
    assert float(s(0, 10, 0.1)) == 0.0
    assert float(s(-3, 10, 0.1)) == 0.0
    assert float(s(5, 10, 0.1)) == pytest.approx(0.05)
    assert float(s(10, 10, 0.1)) == pytest.approx(0.1)
    assert float(s(11, 10, 0.1)) == pytest.approx(0.1)
    optax_ramp = optax.linear_schedule(0.0, 0.1, 10)
    for step in range(12):
      assert float(s(step, 10, 0.1)) == pytest.approx(float(optax_ramp(step)))
    with pytest.raises(ValueError, match=r"`total_steps` must be in \[1, inf\)"):
      s(0, 0, 0.1)
    with pytest.raises(ValueError, match=r"`final_rate` must be in \[0, 1\]"):
      s(0, 10, 1.5)

  def test_bad_arguments(self):
    key = jax.random.key(0)
    x = jnp.ones((2, 8, 6, 3))
    with pytest.raises(ValueError, match=r"`block_size` must be in \[1, 6\] \(the feature map"):
      regjax.dropblock(x, 0.1, key=key, block_size=7)
    with pytest.raises(ValueError, match="`block_size` must be in"):
      regjax.dropblock(x, 0.1, key=key, block_size=0)
    with pytest.raises(TypeError, match="`block_size` must be an int"):
      regjax.dropblock(x, 0.1, key=key, block_size=2.5)
    with pytest.raises(ValueError, match="`data_format` must be one of"):
      regjax.dropblock(x, 0.1, key=key, data_format="NWHC")
    with pytest.raises(ValueError, match="`x` must be a batch of 2-D feature maps of rank 4"):
      regjax.dropblock(jnp.ones((8, 6, 3)), 0.1, key=key, block_size=3)
    with pytest.raises(TypeError, match="`share_channels` must be a bool"):
      regjax.dropblock(x, 0.1, key=key, block_size=3, share_channels=1)
    for bad in ("threefry", None, "HASH"):
      with pytest.raises(ValueError, match=r"regjax.dropblock: `rng_impl` must be one of"):
        regjax.dropblock(x, 0.1, key=key, block_size=3, rng_impl=bad)
    with pytest.raises(ValueError, match="rng_impl"):  # even where nothing is drawn
      regjax.dropblock(x, 0.1, deterministic=True, block_size=3, rng_impl="philox")
    with pytest.raises(ValueError, match="rng_impl"):
      regjax.dropblock(x, 0.0, block_size=3, rng_impl="philox")

  @staticmethod
  def _documented_seeds(impl, key, seed_shape, gamma):
    """The seed draw the docstring gives for each generator."""
    if impl == "hash":
      bits = rrandom.bits(key, seed_shape)
      return np.asarray(rrandom.bernoulli_from_bits(bits, jnp.float32(gamma)))
    return np.asarray(jax.random.bernoulli(key, jnp.float32(gamma), seed_shape))

  @staticmethod
  def _expected(x, seeds, block_size, axes):
    """x * M * numel(M) / sum(M) in float64, M zero on the block of every seed."""
    dropped = seeds
    for axis in axes:  # a seed at h covers h .. h + block_size - 1
      pad = [(0, 0)] * dropped.ndim
      pad[axis] = (block_size - 1, block_size - 1)
      dropped = sliding_window_view(np.pad(dropped, pad), block_size, axis=axis).any(axis=-1)
    keep = ~dropped
    return np.asarray(x, np.float64) * np.where(keep, keep.size / keep.sum(), 0.0), keep

  @parameterized.named_parameters(
      *[(f"{name}_{impl}", shape, fmt, share, b, rate, impl)
        for name, shape, fmt, share, b, rate in (
            ("nhwc", (4, 13, 11, 6), "NHWC", False, 4, 0.3),
            ("nchw_shared", (5, 3, 9, 12), "NCHW", True, 3, 0.5),
            ("block_1", (3, 6, 7, 2), "NHWC", False, 1, 0.2))
        for impl in IMPLS])
  def test_seed_mask_is_the_documented_draw(self, shape, data_format, share, block_size, rate,
                                            impl):
    # 'hash': regjax.random.bernoulli_from_bits of the key's hashed bits over the seed array's flat
    # index; 'jax': jax.random.bernoulli(key, gamma, seed_shape), as before rng_impl.
    x = _normal(58, shape)
    key = jax.random.key(59)
    axes = (1, 2) if data_format == "NHWC" else (2, 3)
    c_axis = 3 if data_format == "NHWC" else 1
    h, w = shape[axes[0]], shape[axes[1]]
    seed_shape = list(shape)
    seed_shape[axes[0]], seed_shape[axes[1]] = h - block_size + 1, w - block_size + 1
    if share:
      seed_shape[c_axis] = 1
    gamma = np.float32(rate) * np.float32(
        h * w / (block_size**2 * (h - block_size + 1) * (w - block_size + 1)))
    seeds = self._documented_seeds(impl, key, tuple(seed_shape), gamma)
    assert seeds.any() and not seeds.all()
    expected, keep = self._expected(x, seeds, block_size, axes)
    run = lambda x, k: regjax.dropblock(x, rate, key=k, block_size=block_size,
                                        share_channels=share, data_format=data_format,
                                        rng_impl=impl)
    for y in (run(x, key), jax.jit(run)(x, key), run(x, jax.random.PRNGKey(59))):
      y = np.asarray(y)
      np.testing.assert_array_equal(y != 0, np.broadcast_to(keep, shape))  # the exact mask
      np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
    if impl == "hash":  # the default
      np.testing.assert_array_equal(
          np.asarray(regjax.dropblock(x, rate, key=key, block_size=block_size,
                                      share_channels=share, data_format=data_format)),
          np.asarray(run(x, key)))

  def test_hash_same_draw_with_and_without_jit(self):
    x = _normal(60, (3, 17, 15, 5))
    key = jax.random.key(61)
    run = lambda x, r, k: regjax.dropblock(x, r, key=k, block_size=4)
    eager = np.asarray(run(x, 0.35, key))
    for jitted in (jax.jit(run)(x, 0.35, key), jax.jit(run, static_argnums=1)(x, 0.35, key)):
      np.testing.assert_array_equal(np.asarray(jitted) == 0, eager == 0)
      np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-6, atol=0)
    assert not np.array_equal(np.asarray(run(x, 0.35, jax.random.key(62))) == 0, eager == 0)

  def test_hash_seed_probability_below_2_pow_minus_17_draws_no_seeds(self):
    # 32 x 32 maps, block 7: gamma = rate * 0.0309, below 2**-17 for rate < ~2.47e-4.
    x = _normal(63, (64, 32, 32, 16))
    factor = 32 * 32 / (49 * 26 * 26)
    rate = 2.0**-17 / factor * 0.9
    key = jax.random.key(64)
    np.testing.assert_array_equal(np.asarray(regjax.dropblock(x, rate, key=key)), np.asarray(x))
    # Just above the cut the realised gamma is 2**-16 (the formula's gamma is 2**-17 * 1.1).
    assert _seed_probability(32, 32, 7, 2.0**-17 / factor * 1.1, "hash") == 2.0**-16
    assert (np.asarray(regjax.dropblock(x, 2.0**-17 / factor * 1.1, key=key)) == 0).any()
    # 'jax' has no such cut.
    assert (np.asarray(regjax.dropblock(x, rate, key=key, rng_impl="jax")) == 0).any()

  def test_hash_backward_stores_nothing_per_element(self):
    x = _normal(65, (8, 16, 16, 8))
    key = jax.random.key(66)
    _, vjp = jax.vjp(lambda x: regjax.dropblock(x, 0.3, key=key, block_size=3), x)
    stored = sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
    assert stored <= 8, stored
    y = np.asarray(regjax.dropblock(x, 0.3, key=key, block_size=3))
    grad = np.asarray(vjp(jnp.ones_like(x))[0])
    kept = y != 0
    np.testing.assert_allclose(grad, np.where(kept, kept.size / kept.sum(), 0.0), rtol=1e-6)
    # 'jax' keeps the bool mask, 1 byte per element (not a float32 factor).
    _, vjp = jax.vjp(lambda x: regjax.dropblock(x, 0.3, key=key, block_size=3, rng_impl="jax"),
                     x)
    leaves = jax.tree_util.tree_leaves(vjp)
    assert sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) <= x.size + 64

  def test_count_in_uint8_partial_sums_is_exact(self):
    from regjax.structured import _count
    for h in (255, 256, 300):  # 255 * 1 fits a uint8; 256 and above take the int32 path
      mask = jnp.ones((2, h, 3, 4), bool)
      assert int(_count(mask, 1)) == mask.size
      sparse = np.random.default_rng(h).random((2, h, 3, 4)) < 0.7
      assert int(_count(jnp.asarray(sparse), 1)) == sparse.sum()


# ----------------------------------------------------------------------------
# Cutout


def _square_rows_probability(size, length):
  """P(index i of an axis is inside the square) for a uniform centre on the axis."""
  hits = np.zeros(length)
  for centre in range(length):
    start = centre - size // 2
    hits[max(start, 0):max(min(start + size, length), 0)] += 1
  return hits / length


class CutoutTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("even", 4), ("odd", 3))
  def test_one_clipped_square_per_sample_and_nothing_else(self, size):
    n, h, w, c = 4096, 8, 10, 2
    x = _uniform(60, (n, h, w, c), 1.0, 2.0)
    y = np.asarray(self.variant(lambda x, k: regjax.cutout(x, size, key=k))(
        x, jax.random.key(61)))
    zero = y == 0
    np.testing.assert_array_equal(zero, np.broadcast_to(zero[..., :1], zero.shape))
    np.testing.assert_array_equal(y[~zero], np.asarray(x)[~zero])  # untouched elsewhere
    hole = zero[..., 0]
    rows, cols = hole.any(axis=2), hole.any(axis=1)
    # The hole is exactly the rectangle rows x cols, both contiguous and non-empty.
    np.testing.assert_array_equal(hole, rows[:, :, None] & cols[:, None, :])
    for mask, length in ((rows, h), (cols, w)):
      count = mask.sum(axis=1)
      first, last = mask.argmax(axis=1), length - 1 - mask[:, ::-1].argmax(axis=1)
      np.testing.assert_array_equal(last - first + 1, count)
      # Full size unless clipped by a border.
      at_border = (first == 0) | (last == length - 1)
      assert np.all((count == size) | (at_border & (count < size) & (count >= 1)))
    # Each pixel is covered with the probability of a uniform centre.
    p = np.outer(_square_rows_probability(size, h), _square_rows_probability(size, w))
    np.testing.assert_array_less(np.abs(hole.mean(axis=0) - p), Z * np.sqrt(p * (1 - p) / n))

  def test_nchw_and_traced_size(self):
    x = jnp.ones((64, 3, 9, 9))
    y = np.asarray(regjax.cutout(x, 4, key=jax.random.key(62), data_format="NCHW"))
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1], y.shape))
    assert np.all((y == 0).sum(axis=(2, 3))[:, 0] <= 16) and (y == 0).any()
    traced = jax.jit(lambda x, s: regjax.cutout(x, s, key=jax.random.key(62),
                                                 data_format="NCHW"))
    np.testing.assert_array_equal(np.asarray(traced(x, 4)), y)
    np.testing.assert_array_equal(np.asarray(traced(x, 0)), np.asarray(x))

  def test_bad_size(self):
    key = jax.random.key(0)
    x = jnp.ones((2, 8, 6, 3))
    with pytest.raises(ValueError, match=r"`size` must be in \[0, 6\] \(the image is 8 x 6\)"):
      regjax.cutout(x, 7, key=key)
    with pytest.raises(ValueError, match="`size` must be in"):
      regjax.cutout(x, -1, key=key)
    with pytest.raises(TypeError, match="`size` must be an int"):
      regjax.cutout(x, 2.0, key=key)
    with pytest.raises(TypeError, match="`size` must be an integer scalar"):
      jax.jit(lambda s: regjax.cutout(x, s, key=key))(2.0)


# ----------------------------------------------------------------------------
# DropConnect


class DropConnectTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_train_output_is_the_masked_kernel_product(self):
    rate = 0.4
    x = _normal(70, (16, 32))
    key = jax.random.key(71)
    y = self.variant(lambda x, k: _dropconnect(x, rate, key=k))(x, key)
    # DropConnect's mask is the one regjax.dropout draws for the kernel's shape.
    mask = np.asarray(regjax.dropout(jnp.ones(_DC_KERNEL.shape), rate, key=key)) != 0
    reference = (np.asarray(x, np.float64) @ (np.asarray(_DC_KERNEL, np.float64) * mask)
                 / (1 - rate) + np.asarray(_DC_BIAS, np.float64))
    np.testing.assert_allclose(np.asarray(y, np.float64), reference, rtol=1e-5, atol=1e-5)
    assert 0.5 < mask.mean() < 0.7

  def test_mean_over_draws_is_the_eval_output(self):
    rate, draws = 0.5, 4000
    x = _normal(72, (4, 32))
    keys = jax.random.split(jax.random.key(73), draws)
    ys = np.asarray(jax.jit(jax.vmap(lambda k: _dropconnect(x, rate, key=k)))(keys), np.float64)
    eval_y = np.asarray(_dropconnect(x, rate, deterministic=True), np.float64)
    # Var of one draw: sum_i x_i**2 W_ij**2 * rate / (1 - rate), independent weights.
    var = (np.asarray(x, np.float64) ** 2) @ (np.asarray(_DC_KERNEL, np.float64) ** 2) * (
        rate / (1 - rate))
    np.testing.assert_array_less(np.abs(ys.mean(axis=0) - eval_y), Z * np.sqrt(var / draws))
    np.testing.assert_allclose(ys.var(axis=0), var, rtol=Z * math.sqrt(2 / draws) * 2)

  def test_rate_one_gives_the_bias(self):
    x = _normal(74, (4, 32))
    np.testing.assert_array_equal(np.asarray(_dropconnect(x, 1.0)),
                                  np.broadcast_to(np.asarray(_DC_BIAS), (4, 24)))
    grad = jax.jit(jax.grad(lambda x, r: jnp.sum(_dropconnect(x, r, key=jax.random.key(0)))))(
        x, 1.0)
    np.testing.assert_array_equal(np.asarray(grad), 0)

  def test_gradient_wrt_kernel_is_masked(self):
    x = _normal(75, (8, 32))
    key = jax.random.key(76)
    grad = jax.grad(lambda w: jnp.sum(regjax.dropconnect_dense(x, w, None, 0.5, key=key)))(
        _DC_KERNEL)
    mask = np.asarray(regjax.dropout(jnp.ones(_DC_KERNEL.shape), 0.5, key=key)) != 0
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0)
    np.testing.assert_allclose(
        np.asarray(grad)[mask],
        np.broadcast_to(2 * np.asarray(x).sum(axis=0)[:, None], mask.shape)[mask], rtol=1e-5)

  def test_bad_shapes(self):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`kernel` must have shape \(in, out\)"):
      regjax.dropconnect_dense(jnp.ones((2, 31)), _DC_KERNEL, None, 0.5, key=key)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(24,\)"):
      regjax.dropconnect_dense(jnp.ones((2, 32)), _DC_KERNEL, jnp.ones(3), 0.5, key=key)
    with pytest.raises(TypeError, match="`kernel` must be a floating-point array"):
      regjax.dropconnect_dense(jnp.ones((2, 32)), jnp.ones((32, 4), jnp.int32), None, 0.5,
                               key=key)


# ----------------------------------------------------------------------------
# Max-norm


def _params():
  return {
      "Dense_0": {"kernel": 2.0 * _normal(80, (16, 8)), "bias": 10 * jnp.ones(8)},
      "Conv_0": {"kernel": _normal(81, (3, 3, 4, 6))},
      "Embed_0": {"embedding": 10 * _normal(82, (10, 4))},
      "BatchNorm_0": {"scale": 10 * jnp.ones(6)},
  }


def _unit_norms(kernel, axes=None):
  kernel = np.asarray(kernel, np.float64)
  axes = tuple(range(kernel.ndim - 1)) if axes is None else axes
  return np.sqrt((kernel**2).sum(axis=axes))


class MaxNormTest(parameterized.TestCase):

  def test_projects_units_outside_the_ball_and_leaves_the_rest(self):
    c = 6.0
    params = _params()
    out = regjax.max_norm(params, c)
    for layer in ("Dense_0", "Conv_0"):
      before, after = params[layer]["kernel"], out[layer]["kernel"]
      norms_before, norms_after = _unit_norms(before), _unit_norms(after)
      inside = norms_before <= c
      assert inside.any() and (~inside).any(), layer  # the test covers both cases
      np.testing.assert_array_less(norms_after, c * (1 + 1e-6))
      np.testing.assert_allclose(norms_after[~inside], c, rtol=1e-6)
      b, a = np.asarray(before), np.asarray(after)
      np.testing.assert_array_equal(a[..., inside], b[..., inside])  # bit for bit
      # Projected units keep their direction.
      np.testing.assert_allclose(a[..., ~inside] * (norms_before[~inside] / c),
                                 b[..., ~inside], rtol=1e-5)
    # Biases, embeddings and BN scales are not kernels: the same objects come back.
    for layer, name in (("Dense_0", "bias"), ("Embed_0", "embedding"), ("BatchNorm_0", "scale")):
      assert out[layer][name] is params[layer][name]

  def test_filter_and_axis(self):
    params = _params()
    only_dense = lambda path, leaf: path[0].startswith("Dense") and path[-1] == "kernel"
    out = regjax.max_norm(params, 1.0, filter=only_dense)
    assert out["Conv_0"]["kernel"] is params["Conv_0"]["kernel"]
    np.testing.assert_array_less(_unit_norms(out["Dense_0"]["kernel"]), 1 + 1e-6)
    # Keras' axis=0 on a conv kernel: one norm per (kh, kw) position and channel pair instead.
    conv = regjax.max_norm(params, 1.0, axis=0)["Conv_0"]["kernel"]
    np.testing.assert_array_less(_unit_norms(conv, axes=(0,)), 1 + 1e-6)
    assert _unit_norms(conv).max() > 1.5
    everything = lambda path, leaf: leaf.ndim >= 1
    out = regjax.max_norm(params, 1.0, filter=everything, axis=0)
    assert np.all(np.abs(np.asarray(out["Dense_0"]["bias"])) <= 1 + 1e-6)

  def test_half_precision_leaf(self):
    kernel = (3.0 * _normal(81, (64, 16))).astype(jnp.bfloat16)
    out = regjax.max_norm({"kernel": kernel}, 2.0)["kernel"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_less(_unit_norms(out), 2.0 * (1 + 2**-7))

  def test_after_apply_updates_in_a_jitted_step_and_as_an_optax_transformation(self):
    c = 0.5
    x = _normal(82, (64, 16))
    target = _normal(83, (64, 8))
    params = {"Dense_0": {"kernel": 0.1 * _normal(84, (16, 8)),
                          "bias": jnp.zeros(8)}}
    loss = lambda p: jnp.mean((x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] - target) ** 2)
    sgd = optax.sgd(0.5)
    chained = optax.chain(optax.sgd(0.5), regjax.max_norm_projection(c))

    @jax.jit
    def step(params, chained_params, state, chained_state):
      updates, state = sgd.update(jax.grad(loss)(params), state, params)
      params = regjax.max_norm(optax.apply_updates(params, updates), c)
      updates, chained_state = chained.update(jax.grad(loss)(chained_params), chained_state,
                                              chained_params)
      return params, optax.apply_updates(chained_params, updates), state, chained_state

    state, chained_state, chained_params = sgd.init(params), chained.init(params), params
    for _ in range(20):
      params, chained_params, state, chained_state = step(params, chained_params, state,
                                                          chained_state)
      for p in (params, chained_params):
        np.testing.assert_array_less(_unit_norms(p["Dense_0"]["kernel"]), c * (1 + 1e-6))
    assert _unit_norms(params["Dense_0"]["kernel"]).max() > c * (1 - 1e-6)  # it was binding
    np.testing.assert_allclose(np.asarray(chained_params["Dense_0"]["kernel"]),
                               np.asarray(params["Dense_0"]["kernel"]), rtol=1e-4, atol=1e-6)
    # The bias is unconstrained and its update passes through unchanged.
    np.testing.assert_allclose(np.asarray(chained_params["Dense_0"]["bias"]),
                               np.asarray(params["Dense_0"]["bias"]), rtol=1e-4, atol=1e-6)

  def test_bad_arguments(self):
    params = _params()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
      with pytest.raises(ValueError, match=r"`max_value` must be in \(0, inf\)"):
        regjax.max_norm(params, bad)
    with pytest.raises(TypeError, match="`filter` must be a callable"):
      regjax.max_norm(params, 1.0, filter="kernel")
    with pytest.raises(TypeError, match="`params leaf step` must be a floating-point array"):
      regjax.max_norm({"step": jnp.ones((2, 2), jnp.int32)}, 1.0, filter=lambda p, l: True)
    with pytest.raises(ValueError, match="no axis to take norms over"):
      regjax.max_norm({"b": jnp.ones(3)}, 1.0, filter=lambda p, l: True)
    tx = regjax.max_norm_projection(1.0)
    with pytest.raises(ValueError, match="needs the current params"):
      tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match=r"`max_value` must be in \(0, inf\)"):
      regjax.max_norm_projection(-2.0)
    with pytest.raises(TypeError, match="`filter` must be a callable"):
      regjax.max_norm_projection(1.0, filter=["kernel"])

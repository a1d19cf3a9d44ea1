"""Tests of regjax.stochastic: dropout, gaussian_dropout, uout and the noise-variance helpers.

Random ops are checked statistically: every tolerance is Z standard errors of
the estimated quantity for the sample size used (Z = 5, a false-alarm rate
of about 6e-7 per check).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import IMPLS, N, Z, _noise
from _helpers import NOISE_OPS as OPS
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import regjax

OP_IMPL_CASES = tuple((f"{name}_{impl}", name, impl) for name in OPS for impl in IMPLS)


IMPL_CASES = tuple((impl, impl) for impl in IMPLS)


def _op(name, impl):
  return functools.partial(OPS[name][0], rng_impl=impl)


class MomentsTest(chex.TestCase):
  """Each op's noise has mean 1 and its documented variance, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("rate_0.1_hash", 0.1, "hash"),
    ("rate_0.1_jax", 0.1, "jax"),
    ("rate_0.5_hash", 0.5, "hash"),
    ("rate_0.5_jax", 0.5, "jax"),
    ("rate_0.9_hash", 0.9, "hash"),
    ("rate_0.9_jax", 0.9, "jax"),
  )
  def test_dropout_keep_rate_and_moments(self, rate, impl):
    y = _noise(
      functools.partial(regjax.dropout, rng_impl=impl),
      rate,
      jax.random.key(1),
      variant=self.variant,
    )
    keep = 1 - rate
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / keep, rtol=1e-6)
    se_keep = math.sqrt(keep * (1 - keep) / N)
    assert abs(kept.mean() - keep) < Z * se_keep
    s2 = rate / keep
    assert abs(y.mean() - 1) < Z * math.sqrt(s2 / N)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("rate_0.1_hash", 0.1, "hash"),
    ("rate_0.1_jax", 0.1, "jax"),
    ("rate_0.5_hash", 0.5, "hash"),
    ("rate_0.5_jax", 0.5, "jax"),
    ("rate_0.8_hash", 0.8, "hash"),
    ("rate_0.8_jax", 0.8, "jax"),
  )
  def test_gaussian_dropout_moments(self, rate, impl):
    y = _noise(
      functools.partial(regjax.gaussian_dropout, rng_impl=impl),
      rate,
      jax.random.key(2),
      variant=self.variant,
    )
    s2 = rate / (1 - rate)
    e = (y - 1) / math.sqrt(s2)  # should be N(0, 1)
    assert abs(e.mean()) < Z / math.sqrt(N)
    assert abs(e.var() - 1) < Z * math.sqrt(2 / N)
    within_one = 0.6826894921370859  # P(|e| < 1)
    assert abs((np.abs(e) < 1).mean() - within_one) < Z * math.sqrt(
      within_one * (1 - within_one) / N
    )
    # Excess kurtosis 0 (Var of e**4 is 96 for a normal).
    assert abs((e**4).mean() - 3) < Z * math.sqrt(96 / N)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("beta_0.1_hash", 0.1, "hash"),
    ("beta_0.1_jax", 0.1, "jax"),
    ("beta_0.5_hash", 0.5, "hash"),
    ("beta_0.5_jax", 0.5, "jax"),
    ("beta_1.7_hash", 1.7, "hash"),
    ("beta_1.7_jax", 1.7, "jax"),
  )
  def test_uout_moments_and_uniformity(self, beta, impl):
    r = (
      _noise(
        functools.partial(regjax.uout, rng_impl=impl), beta, jax.random.key(3), variant=self.variant
      )
      - 1
    )
    assert r.min() >= -beta * (1 + 1e-6) and r.max() <= beta * (1 + 1e-6)
    assert abs(r.mean()) < Z * math.sqrt(beta**2 / 3 / N)
    # Var(r**2) = E r^4 - (E r^2)^2 = beta^4/5 - beta^4/9 for U(-beta, beta).
    assert abs((r**2).mean() - beta**2 / 3) < Z * math.sqrt(4 * beta**4 / 45 / N)
    counts, _ = np.histogram(r, bins=20, range=(-beta, beta))
    expected = N / 20
    assert np.all(np.abs(counts - expected) < Z * math.sqrt(expected * (1 - 1 / 20)))


class IndependenceTest(parameterized.TestCase):
  """Neighbouring elements, split keys and fold_in keys give uncorrelated noise."""

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_neighbours_uncorrelated(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    y = _noise(op, rate, jax.random.key(4))
    corr = np.corrcoef(y[:-1], y[1:])[0, 1]
    assert abs(corr) < Z / math.sqrt(N)

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_split_and_fold_in_keys_uncorrelated(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    base = jax.random.key(5)
    k1, k2 = jax.random.split(base)
    # With JAX's partitionable threefry, split(base)[i] IS fold_in(base, i), so
    # fold_in keys are drawn with other indices here.
    keys = (k1, k2, jax.random.fold_in(base, 7), jax.random.fold_in(base, 8))
    draws = [_noise(op, rate, k) for k in keys]
    for i in range(len(draws)):
      for j in range(i + 1, len(draws)):
        assert abs(np.corrcoef(draws[i], draws[j])[0, 1]) < Z / math.sqrt(N)

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_same_key_same_draw_with_and_without_jit(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    x = jax.random.normal(jax.random.key(6), (32, 17))
    key = jax.random.key(7)
    eager = op(x, rate, key=key)
    jitted = jax.jit(lambda x, k: op(x, rate, key=k))(x, key)
    again = op(x, rate, key=key)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(again))
    # jit may fuse the multiply-add differently: allow a few ulp, not a new draw.
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-7)
    other = op(x, rate, key=jax.random.key(8))
    assert not np.allclose(np.asarray(other), np.asarray(eager))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_raw_uint32_key_gives_same_draw_as_typed_key(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    x = jnp.ones((64,))
    typed = op(x, rate, key=jax.random.key(9))
    raw = op(x, rate, key=jax.random.PRNGKey(9))
    np.testing.assert_array_equal(np.asarray(typed), np.asarray(raw))


class ContractTest(chex.TestCase):
  """Eval mode, zero rates, rate 1, shapes and dtypes."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    *[
      (f"{name}_{jnp.dtype(d).name}_{impl}", name, d, impl)
      for name in OPS
      for d in (jnp.float32, jnp.bfloat16, jnp.float16)
      for impl in IMPLS
    ]
  )
  def test_shape_and_dtype_kept(self, name, dtype, impl):
    _, rate, s2 = OPS[name]
    op = _op(name, impl)
    x = jnp.ones((4096, 64), dtype)
    y = self.variant(lambda x, k: op(x, rate, key=k))(x, jax.random.key(10))
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, dtype)
    y = np.asarray(y, np.float64)
    assert np.all(np.isfinite(y))
    n = y.size
    # Half-precision rounding of 1/keep etc. is a bias of at most ~2**-8.
    assert abs(y.mean() - 1) < Z * math.sqrt(s2 / n) + 2**-8

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_deterministic_returns_input_without_key(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    x = jnp.arange(6.0).reshape(2, 3)
    assert op(x, rate, deterministic=True) is x
    assert op(x, 0.0) is x  # zero rate: identity, no key needed

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_traced_zero_rate_is_identity(self, name, impl):
    op = _op(name, impl)
    x = jax.random.normal(jax.random.key(11), (128,))
    y = jax.jit(lambda x, r, k: op(x, r, key=k))(x, 0.0, jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*IMPL_CASES)
  def test_dropout_rate_one_gives_zeros_and_zero_gradients(self, impl):
    x = jax.random.normal(jax.random.key(13), (16, 8))
    drop = functools.partial(regjax.dropout, rng_impl=impl)

    def loss(x):
      return jnp.sum(drop(x, 1.0) ** 2 + drop(x, 1.0))

    value, grad = self.variant(jax.value_and_grad(loss))(x)
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_traced_dropout_rate_one_gives_zeros_and_finite_gradients(self, impl):
    x = jax.random.normal(jax.random.key(14), (16, 8))
    key = jax.random.key(15)

    def loss(x, r):
      return jnp.sum(regjax.dropout(x, r, key=key, rng_impl=impl) * 3.0)

    value, grad = jax.jit(jax.value_and_grad(loss))(x, 1.0)
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_traced_out_of_range_rates_are_clipped_not_nan(self, impl):
    x = jax.random.normal(jax.random.key(16), (1000,))
    key = jax.random.key(17)
    f = jax.jit(lambda op, r: op(x, r, key=key, rng_impl=impl), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(f(regjax.dropout, 1.5)), 0)
    np.testing.assert_array_equal(np.asarray(f(regjax.dropout, -0.5)), np.asarray(x))
    assert np.all(np.isfinite(np.asarray(f(regjax.gaussian_dropout, 1.0))))
    np.testing.assert_array_equal(np.asarray(f(regjax.uout, -0.5)), np.asarray(x))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_broadcast_dims_share_one_draw(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    x = jnp.ones((8, 16, 32))
    y = np.asarray(op(x, rate, key=jax.random.key(18), broadcast_dims=(1, -1)))
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :1], y.shape))
    assert len(np.unique(y[:, 0, 0])) > 1  # but the batch axis still varies

  def test_dropout_draws_the_same_mask_as_flax_linen(self):
    import flax.linen as nn  # the comparison target, not a dependency of the op

    x = jax.random.normal(jax.random.key(19), (64, 33))
    key = jax.random.key(20)
    # rng_impl='jax' draws with jax.random.bernoulli, exactly as flax does.
    ours = regjax.dropout(x, 0.25, key=key, broadcast_dims=(0,), rng_impl="jax")
    theirs = nn.Dropout(0.25, broadcast_dims=(0,), deterministic=False).apply({}, x, rng=key)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6)


class TracedRateTest(parameterized.TestCase):
  """A rate that changes every step is a traced argument: one compilation."""

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_changing_traced_rate_traces_once(self, name, impl):
    op = _op(name, impl)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(x, rate, key):
      return op(x, rate, key=key)

    x = jnp.ones((N // 4,))
    for i, rate in enumerate((0.1, 0.2, 0.45)):
      y = np.asarray(apply(x, jnp.float32(rate), jax.random.key(21 + i)), np.float64)
      s2 = (rate**2 / 3) if name == "uout" else rate / (1 - rate)
      assert abs(y.var() - s2) < Z * s2 * math.sqrt(10 / y.size)  # kurtosis <= 10 here


class GradientTest(parameterized.TestCase):
  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_check_grads(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    key = jax.random.key(22)
    x = jax.random.normal(jax.random.key(23), (6, 5))
    check_grads(
      lambda x: op(x, rate, key=key),
      (x,),
      order=2,
      modes=("fwd", "rev"),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-2,
    )

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_gradient_is_the_noise(self, name, impl):
    # The op is linear in x, so d sum(y) / dx is exactly the noise factor.
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    key = jax.random.key(24)
    x = jax.random.normal(jax.random.key(25), (100,))
    grad = jax.grad(lambda x: jnp.sum(op(x, rate, key=key)))(x)
    np.testing.assert_allclose(
      np.asarray(grad), np.asarray(op(jnp.ones_like(x), rate, key=key)), rtol=1e-6
    )


class BadInputTest(parameterized.TestCase):
  """Bad input raises at trace time with a message naming the argument."""

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_missing_key_in_train_mode(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    with pytest.raises(ValueError, match=r"needs a PRNG key.*key="):
      op(jnp.ones(3), rate)
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
      jax.jit(lambda x: op(x, rate))(jnp.ones(3))

  @parameterized.parameters(-0.1, 1.0001, float("nan"), float("inf"), -float("inf"))
  def test_dropout_rate_out_of_range(self, rate):
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      regjax.dropout(jnp.ones(3), rate, key=jax.random.key(0))

  @parameterized.parameters(-0.1, 1.0, 2.0, float("nan"))
  def test_gaussian_rate_out_of_range(self, rate):
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\)"):
      regjax.gaussian_dropout(jnp.ones(3), rate, key=jax.random.key(0))

  @parameterized.parameters(-0.1, float("inf"), float("nan"))
  def test_uout_beta_out_of_range(self, beta):
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, inf\)"):
      regjax.uout(jnp.ones(3), beta, key=jax.random.key(0))

  def test_concrete_jax_and_numpy_rates_are_checked(self):
    with pytest.raises(ValueError, match="`rate`"):
      regjax.dropout(jnp.ones(3), jnp.float32(1.5), key=jax.random.key(0))
    with pytest.raises(ValueError, match="`rate`"):
      regjax.dropout(jnp.ones(3), np.float64(-1), key=jax.random.key(0))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_rate_must_be_a_real_scalar(self, name, impl):
    op = _op(name, impl)
    with pytest.raises(ValueError, match="must be a scalar"):
      op(jnp.ones(3), jnp.array([0.1, 0.2]), key=jax.random.key(0))
    with pytest.raises(TypeError, match="must be a real number"):
      op(jnp.ones(3), "0.5", key=jax.random.key(0))
    with pytest.raises(TypeError, match="must be a real number"):
      op(jnp.ones(3), True, key=jax.random.key(0))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_non_float_input(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    with pytest.raises(TypeError, match="`x` must be a floating-point array.*int32"):
      op(jnp.ones(3, jnp.int32), rate, key=jax.random.key(0))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_bad_keys(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(jnp.ones(3), rate, key=42)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(jnp.ones(3), rate, key=jnp.zeros(2))
    with pytest.raises(ValueError, match="single PRNG key"):
      op(jnp.ones(3), rate, key=jax.random.split(jax.random.key(0), 3))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_bad_broadcast_dims(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    with pytest.raises(ValueError, match=r"`broadcast_dims` entry 2 .*\[-2, 1\]"):
      op(jnp.ones((3, 4)), rate, key=jax.random.key(0), broadcast_dims=(2,))
    with pytest.raises(TypeError, match="`broadcast_dims` must hold ints"):
      op(jnp.ones((3, 4)), rate, key=jax.random.key(0), broadcast_dims=(0.5,))

  @parameterized.named_parameters(*OP_IMPL_CASES)
  def test_traced_deterministic(self, name, impl):
    _, rate, _ = OPS[name]
    op = _op(name, impl)
    with pytest.raises(TypeError, match="`deterministic` must be a Python bool"):
      jax.jit(lambda x, d: op(x, rate, key=jax.random.key(0), deterministic=d))(jnp.ones(3), True)


# Shapes come from a fixed set: each new shape would cost an eager compilation.
SHAPES = st.sampled_from([(1,), (7,), (3, 5), (1, 1), (2, 3, 4), (4, 1, 6), (2, 2, 2, 3)])


class PropertyTest(parameterized.TestCase):
  """Per-element properties that hold for every shape, rate and key."""

  @settings(max_examples=30, deadline=None)
  @given(
    shape=SHAPES,
    rate=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31 - 1),
    impl=st.sampled_from(IMPLS),
  )
  def test_dropout_outputs_zero_or_scaled_input(self, shape, rate, seed, impl):
    x = jax.random.normal(jax.random.key(seed), shape)
    y = np.asarray(regjax.dropout(x, rate, key=jax.random.key(seed + 1), rng_impl=impl), np.float64)
    # The op computes keep = 1 - rate in float32, so compare with that keep (a float64
    # keep differs by up to ~6e-8 / keep relative: 6e-6 at rate 0.99).
    keep = np.float64(np.float32(1) - np.float32(rate))
    xs = np.asarray(x, np.float64) / keep
    ok = (y == 0) | np.isclose(y, xs, rtol=1e-6, atol=0)
    assert ok.all()

  @settings(max_examples=30, deadline=None)
  @given(
    shape=SHAPES,
    beta=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
    impl=st.sampled_from(IMPLS),
  )
  def test_uout_stays_within_its_band(self, shape, beta, seed, impl):
    x = jax.random.normal(jax.random.key(seed), shape)
    y = np.asarray(regjax.uout(x, beta, key=jax.random.key(seed + 1), rng_impl=impl), np.float64)
    xa = np.asarray(x, np.float64)
    assert np.all(np.abs(y - xa) <= beta * np.abs(xa) * (1 + 1e-6) + 1e-7)


def test_noise_variance_helpers():
  assert regjax.dropout_noise_variance(0.5) == 1.0
  assert regjax.uout_noise_variance(0.3) == pytest.approx(0.03)
  beta = regjax.matched_uout_beta(0.5)
  assert beta == pytest.approx(math.sqrt(3))
  assert regjax.uout_noise_variance(beta) == pytest.approx(regjax.dropout_noise_variance(0.5))
  # Uout's customary beta = 0.1 matches dropout at a rate of only ~0.0033.
  rate = 0.1**2 / 3 / (1 + 0.1**2 / 3)
  assert regjax.matched_uout_beta(rate) == pytest.approx(0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_and_uout_commute_with_relu(impl):
  # Their factors are >= 0 (uout for beta <= 1) and relu(c * x) = c * relu(x) for c >= 0,
  # so `act-drop` and `drop-act` block orders train identically with ReLU.
  x = jax.random.normal(jax.random.key(30), (64, 32))
  key = jax.random.key(31)
  for op, value in ((regjax.dropout, 0.4), (regjax.uout, 0.9)):
    op = functools.partial(op, rng_impl=impl)
    np.testing.assert_array_equal(
      np.asarray(jax.nn.relu(op(x, value, key=key))), np.asarray(op(jax.nn.relu(x), value, key=key))
    )
  # Gaussian dropout's factor can be negative, so it does not commute.
  g = functools.partial(regjax.gaussian_dropout, rng_impl=impl)
  assert not np.array_equal(
    np.asarray(jax.nn.relu(g(x, 0.5, key=key))), np.asarray(g(jax.nn.relu(x), 0.5, key=key))
  )


class ClassicDropoutTest(chex.TestCase):
  """``dropout(..., inverted=False)``: train ``x * m``, eval ``x * (1 - rate)``."""

  @parameterized.named_parameters(
    *[(f"{impl}_bd{bd}", impl, bd) for impl in IMPLS for bd in ((), (1,))]
  )
  def test_same_mask_as_inverted_and_keep_times_its_output(self, impl, bd):
    x = jax.random.normal(jax.random.key(40), (64, 33))
    key = jax.random.key(41)
    rate = 0.3
    inv = np.asarray(regjax.dropout(x, rate, key=key, broadcast_dims=bd, rng_impl=impl))
    cla = np.asarray(
      regjax.dropout(x, rate, key=key, broadcast_dims=bd, rng_impl=impl, inverted=False)
    )
    np.testing.assert_array_equal(cla == 0, inv == 0)
    kept = cla != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_array_equal(cla[kept], np.asarray(x)[kept])  # kept units untouched
    keep = np.float64(np.float32(1) - np.float32(rate))
    np.testing.assert_allclose(cla, keep * inv.astype(np.float64), rtol=2**-22, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*IMPL_CASES)
  def test_keep_rate_and_mean(self, impl):
    rate = 0.4
    y = _noise(
      functools.partial(regjax.dropout, rng_impl=impl, inverted=False),
      rate,
      jax.random.key(42),
      variant=self.variant,
    )
    keep = 1 - rate
    assert set(np.unique(y)) == {0.0, 1.0}
    assert abs(y.mean() - keep) < Z * math.sqrt(keep * rate / N)

  @parameterized.named_parameters(
    *[(f"{jnp.dtype(d).name}", d) for d in (jnp.float32, jnp.bfloat16, jnp.float16)]
  )
  def test_eval_is_the_expected_train_output(self, dtype):
    x = jax.random.normal(jax.random.key(43), (16, 8)).astype(dtype)
    rate = 0.3
    y = regjax.dropout(x, rate, deterministic=True, inverted=False)  # no key needed
    chex.assert_type(y, dtype)
    keep = np.float32(1) - np.float32(rate)
    expected = (np.asarray(x, np.float32) * keep).astype(jnp.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(y), expected)
    traced = jax.jit(lambda x, r: regjax.dropout(x, r, deterministic=True, inverted=False))
    np.testing.assert_array_equal(np.asarray(traced(x, rate)), expected)
    grad = jax.grad(lambda x: jnp.sum(regjax.dropout(x, rate, deterministic=True, inverted=False)))(
      x.astype(jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(grad), keep)

  def test_zero_and_one_rates(self):
    x = jax.random.normal(jax.random.key(44), (16, 8))
    assert regjax.dropout(x, 0.0, inverted=False) is x
    assert regjax.dropout(x, 0.0, deterministic=True, inverted=False) is x
    for deterministic in (False, True):

      def loss(x, d=deterministic):
        return jnp.sum(regjax.dropout(x, 1.0, deterministic=d, inverted=False) * 3.0)

      value, grad = jax.value_and_grad(loss)(x)
      assert value == 0
      np.testing.assert_array_equal(np.asarray(grad), 0)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_traced_rates_clipped_and_non_finite_is_identity(self, impl):
    x = jax.random.normal(jax.random.key(45), (1000,))
    key = jax.random.key(46)

    @functools.partial(jax.jit, static_argnums=2)
    def f(x, r, deterministic):
      return regjax.dropout(
        x, r, key=key, deterministic=deterministic, rng_impl=impl, inverted=False
      )

    for deterministic in (False, True):
      np.testing.assert_array_equal(np.asarray(f(x, 1.5, deterministic)), 0)
      np.testing.assert_array_equal(np.asarray(f(x, -0.5, deterministic)), np.asarray(x))
      for bad in (float("nan"), float("inf"), -float("inf")):
        np.testing.assert_array_equal(np.asarray(f(x, bad, deterministic)), np.asarray(x))
        grad = jax.grad(lambda x, b=bad, d=deterministic: jnp.sum(f(x, b, d)))(x)
        np.testing.assert_array_equal(np.asarray(grad), 1.0)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(f(x, 1.0, False) * 2))(x)
    assert value == 0
    np.testing.assert_array_equal(np.asarray(grad), 0)
    # A traced rate in range: the constant-rate draw.
    np.testing.assert_array_equal(
      np.asarray(f(x, 0.3, False)),
      np.asarray(regjax.dropout(x, 0.3, key=key, rng_impl=impl, inverted=False)),
    )

  @parameterized.named_parameters(*IMPL_CASES)
  def test_jit_equals_eager_and_half_precision_rounds_once(self, impl):
    key = jax.random.key(47)
    op = functools.partial(regjax.dropout, rng_impl=impl, inverted=False)
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jax.random.normal(jax.random.key(48), (32, 17)).astype(dtype)
      eager = np.asarray(op(x, 0.3, key=key))
      np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda x, k: op(x, 0.3, key=k))(x, key)), eager
      )
      chex.assert_type(op(x, 0.3, key=key), dtype)
      y32 = op(x.astype(jnp.float32), 0.3, key=key)
      np.testing.assert_array_equal(eager, np.asarray(y32.astype(dtype)))

  @parameterized.named_parameters(*IMPL_CASES)
  def test_gradient_is_the_mask(self, impl):
    key = jax.random.key(49)
    x = jax.random.normal(jax.random.key(50), (100,))
    op = functools.partial(regjax.dropout, rng_impl=impl, inverted=False)
    grad = jax.grad(lambda x: jnp.sum(op(x, 0.3, key=key)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(op(jnp.ones_like(x), 0.3, key=key)))

  def test_bad_arguments(self):
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="`inverted` must be a bool"):
      regjax.dropout(x, 0.3, key=jax.random.key(0), inverted="no")
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
      regjax.dropout(x, 0.3, inverted=False)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      regjax.dropout(x, 1.5, deterministic=True, inverted=False)
    with pytest.raises(TypeError, match="`deterministic` must be a Python bool"):
      jax.jit(lambda x, d: regjax.dropout(x, 0.3, deterministic=d, inverted=False))(x, True)
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
      regjax.dropout(jnp.ones(3, jnp.int32), 0.3, deterministic=True, inverted=False)

  def test_default_is_inverted(self):
    x = jax.random.normal(jax.random.key(51), (8, 8))
    key = jax.random.key(52)
    np.testing.assert_array_equal(
      np.asarray(regjax.dropout(x, 0.3, key=key)),
      np.asarray(regjax.dropout(x, 0.3, key=key, inverted=True)),
    )
    assert regjax.dropout(x, 0.3, deterministic=True) is x

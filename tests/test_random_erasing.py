"""Tests of regjax.random_erasing (Zhong et al. 2017) against a float64 NumPy reference.

Random draws are checked statistically: every tolerance is Z standard errors of the
estimated quantity for the sample size used (Z = 5), and every distribution test
(scipy.stats) rejects at a p-value below P_MIN, about the two-sided 5-sigma rate.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import Z, _uniform
from absl.testing import parameterized
from scipy import stats

import regjax

P_MIN = 5.7e-7  # two-sided tail of 5 sigma
ATTEMPTS = 10


# ----------------------------------------------------------------------------
# float64 NumPy reference of the sampling rule
def fit_probability(height, width, area, aspect, n=200_001):
  """P(one attempt fits), by integrating over the area fraction (midpoint rule).

  With S = a * H * W and t = log r, the attempt fits iff 1 <= round(sqrt(S e^t)) <= H
  and 1 <= round(sqrt(S e^-t)) <= W, i.e. iff t lies in an interval, linear in
  log S, of the uniform range of t. (The rounding boundaries have measure 0.)
  """
  a = area[0] + (area[1] - area[0]) * (np.arange(n) + 0.5) / n
  log_s = np.log(a * height * width)
  t_lo, t_hi = math.log(aspect[0]), math.log(aspect[1])
  lo = np.maximum.reduce(
    [np.full(n, t_lo), math.log(0.25) - log_s, log_s - 2 * math.log(width + 0.5)]
  )
  hi = np.minimum.reduce(
    [np.full(n, t_hi), 2 * math.log(height + 0.5) - log_s, log_s - math.log(0.25)]
  )
  return float(np.mean(np.maximum(hi - lo, 0.0)) / (t_hi - t_lo))


def simulate_sides(height, width, area, aspect, n, seed):
  """(h, w) of n single attempts in float64, and whether each fits."""
  rng = np.random.default_rng(seed)
  target = rng.uniform(area[0], area[1], n) * height * width
  ratio = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), n))
  h, w = np.round(np.sqrt(target * ratio)), np.round(np.sqrt(target / ratio))
  fits = (h >= 1) & (h <= height) & (w >= 1) & (w <= width)
  return h.astype(int), w.astype(int), fits


def rectangles(y, x, fill=0.0):
  """(erased, top, left, h, w) per image of an NHWC batch erased with a number.

  Checks that every image has at most one hole, a full rectangle in every
  channel, holding `fill`, and that everything else is untouched.
  """
  y, x = np.asarray(y), np.asarray(x)
  hole = y != x
  np.testing.assert_array_equal(hole, np.broadcast_to(hole[..., :1], hole.shape))
  np.testing.assert_array_equal(y[hole], np.float32(fill))
  hole = hole[..., 0]
  rows, cols = hole.any(axis=2), hole.any(axis=1)
  np.testing.assert_array_equal(hole, rows[:, :, None] & cols[:, None, :])
  h, w = rows.sum(axis=1), cols.sum(axis=1)
  top, left = rows.argmax(axis=1), cols.argmax(axis=1)
  for mask, start, length in ((rows, top, h), (cols, left, w)):  # contiguous
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    np.testing.assert_array_equal(np.where(length > 0, last - start + 1, 0), length)
  return h > 0, top, left, h, w


def _chi2_same_distribution(a, b):
  """p-value of a two-sample chi-square test on the joint values (cells merged below 5)."""
  values = np.unique(np.concatenate([a, b]))
  counts = np.array([[np.sum(a == v), np.sum(b == v)] for v in values], np.float64)
  expected = counts.sum(axis=1) * min(len(a), len(b)) / (len(a) + len(b))
  big = expected >= 5
  table = np.vstack([counts[big], counts[~big].sum(axis=0, keepdims=True)])
  table = table[table.sum(axis=1) > 0]
  return stats.chi2_contingency(table)[1]


# A setting where one attempt fits with q = 0.176 only, so that ten attempts all
# fail for 14.5% of the images: "retry until it fits" would erase 0.7 of them, 5x
# the tolerance away from the expected 0.599.
SHAPE, AREA, ASPECT, PROBABILITY = (20000, 10, 20, 1), (0.4, 1.0), (0.5, 8.0), 0.7


class RandomErasingStatisticsTest(chex.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = _uniform(1, SHAPE, 1.0, 2.0)
    cls.y = jax.jit(
      lambda x, k: regjax.random_erasing(x, PROBABILITY, key=k, area=AREA, aspect=ASPECT)
    )(cls.x, jax.random.key(2))
    cls.erased, cls.top, cls.left, cls.h, cls.w = rectangles(cls.y, cls.x)

  def test_erase_frequency_is_probability_times_some_attempt_fits(self):
    n, height, width = SHAPE[:3]
    q = fit_probability(height, width, AREA, ASPECT)
    _, _, fits = simulate_sides(height, width, AREA, ASPECT, 10**6, seed=3)
    assert abs(fits.mean() - q) < Z * math.sqrt(q * (1 - q) / fits.size)  # the reference
    expected = PROBABILITY * (1 - (1 - q) ** ATTEMPTS)
    tolerance = Z * math.sqrt(expected * (1 - expected) / n)
    assert abs(self.erased.mean() - expected) < tolerance
    assert PROBABILITY - expected > tolerance  # "retry until it fits" is excluded

  def test_erased_sides_are_one_fitting_attempt(self):
    # The first attempt that fits is distributed as one attempt given that it fits.
    n, height, width = SHAPE[:3]
    h_ref, w_ref, fits = simulate_sides(height, width, AREA, ASPECT, 400_000, seed=4)
    h_ref, w_ref = h_ref[fits], w_ref[fits]
    h, w = self.h[self.erased], self.w[self.erased]
    assert np.all((h >= 1) & (h <= height) & (w >= 1) & (w <= width))
    # The joint distribution of (h, w), and the area fraction's mean and distribution.
    assert _chi2_same_distribution(h * 100 + w, h_ref * 100 + w_ref) > P_MIN
    frac, frac_ref = h * w / (height * width), h_ref * w_ref / (height * width)
    se = math.sqrt(frac.var() / frac.size + frac_ref.var() / frac_ref.size)
    assert abs(frac.mean() - frac_ref.mean()) < Z * se
    assert stats.ks_2samp(frac, frac_ref).pvalue > P_MIN

  def test_corner_is_uniform_where_the_rectangle_fits(self):
    # Randomized PIT: given h, top is uniform on {0..H-h}, so (top + U) / (H - h + 1)
    # is exactly U(0, 1).
    rng = np.random.default_rng(5)
    height, width = SHAPE[1:3]
    for start, side, length in ((self.top, self.h, height), (self.left, self.w, width)):
      start, side = start[self.erased], side[self.erased]
      assert np.all(start + side <= length)
      u = (start + rng.uniform(size=start.size)) / (length - side + 1)
      assert stats.kstest(u, "uniform").pvalue > P_MIN

  def test_aspect_ratio_is_log_uniform_not_uniform(self):
    # On a square image the log-uniform rule is symmetric in h and w (the paper's
    # uniform r would make 77% of the rectangles taller than wide).
    x = jnp.ones((10000, 16, 16, 1))
    y = regjax.random_erasing(x, 1.0, key=jax.random.key(6), aspect=(1 / 3, 3.0))
    erased, _, _, h, w = rectangles(y, x)
    # One attempt fits with probability 0.9998 here: ten all fail with ~1e-37.
    assert fit_probability(16, 16, (0.02, 0.33), (1 / 3, 3.0)) > 0.999
    assert erased.all()
    taller, wider = np.sum(h[erased] > w[erased]), np.sum(h[erased] < w[erased])
    assert abs(taller - wider) < Z * math.sqrt(taller + wider)
    h_ref, w_ref, fits = simulate_sides(16, 16, (0.02, 0.33), (1 / 3, 3.0), 200_000, seed=7)
    ratio = np.log(h[erased] / w[erased])
    ratio_ref = np.log(h_ref[fits] / w_ref[fits])
    assert stats.ks_2samp(ratio, ratio_ref).pvalue > P_MIN


class RandomErasingFillTest(chex.TestCase):
  @parameterized.named_parameters(("nhwc", "NHWC"), ("nchw", "NCHW"))
  def test_random_fill_is_iid_standard_normal(self, data_format):
    x = _uniform(8, (4000, 3, 12, 12), 5.0, 6.0)  # NCHW
    x = x if data_format == "NCHW" else jnp.transpose(x, (0, 2, 3, 1))
    y = regjax.random_erasing(
      x, 1.0, key=jax.random.key(9), area=(0.2, 0.4), fill="random", data_format=data_format
    )
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if data_format == "NHWC":
      y, x = np.transpose(y, (0, 3, 1, 2)), np.transpose(x, (0, 3, 1, 2))
    hole = y != x  # x is in [5, 6]: a N(0, 1) value there has probability ~3e-7
    np.testing.assert_array_equal(hole, np.broadcast_to(hole[:, :1], hole.shape))
    values = y[hole]
    n = values.size
    assert n > 4000 * 3 * 144 * 0.15
    assert abs(values.mean()) < Z / math.sqrt(n)
    assert abs(values.var() - 1) < Z * math.sqrt(2 / n)
    assert stats.kstest(values, "norm").pvalue > P_MIN
    # Independent across channels (one draw per element, not per pixel).
    per_channel = y.transpose(0, 2, 3, 1)[hole[:, 0]]  # (pixels, 3)
    r = np.corrcoef(per_channel[:, 0], per_channel[:, 1])[0, 1]
    assert abs(r) < Z / math.sqrt(per_channel.shape[0])

  @parameterized.named_parameters(
    ("float32", jnp.float32, 0.5), ("bfloat16", jnp.bfloat16, -1.25), ("float16", jnp.float16, 3)
  )
  def test_fill_value_in_the_input_dtype(self, dtype, fill):
    x = _uniform(10, (64, 8, 8, 3), 1.0, 2.0).astype(dtype)
    y = regjax.random_erasing(x, 1.0, key=jax.random.key(11), fill=fill)
    chex.assert_type(y, dtype)
    hole = np.asarray(y != x)
    assert hole.any()
    np.testing.assert_array_equal(np.asarray(y, np.float32)[hole], np.float32(fill))
    np.testing.assert_array_equal(np.asarray(y)[~hole], np.asarray(x)[~hole])

  # Half precision with fill='random' (the float32 draw rounded once), raw keys and jit:
  # the "random_erasing" entry of tests/test_contracts.py.

  def test_nchw_erases_the_nhwc_rectangles(self):
    x = _uniform(14, (32, 9, 11, 2), 1.0, 2.0)
    key = jax.random.key(15)
    nhwc = regjax.random_erasing(x, 0.8, key=key, fill=-2.0)
    nchw = regjax.random_erasing(
      jnp.transpose(x, (0, 3, 1, 2)), 0.8, key=key, fill=-2.0, data_format="NCHW"
    )
    np.testing.assert_array_equal(np.asarray(nchw), np.asarray(jnp.transpose(nhwc, (0, 3, 1, 2))))

  def test_nan_and_inf_pixels_are_overwritten_exactly(self):
    x = jnp.full((8, 6, 6, 1), jnp.nan).at[:4].set(jnp.inf)
    y = np.asarray(regjax.random_erasing(x, 1.0, key=jax.random.key(16), fill=0.0))
    assert (y == 0).any() and np.all((y == 0) | ~np.isfinite(y))

  def test_gradient_is_one_outside_the_rectangle_and_zero_inside(self):
    x = _uniform(17, (8, 10, 10, 2), 1.0, 2.0)
    key = jax.random.key(18)
    y = regjax.random_erasing(x, 1.0, key=key, fill="random")
    grad = jax.grad(lambda x: jnp.sum(regjax.random_erasing(x, 1.0, key=key, fill="random")))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(y == x, np.float32))


class RandomErasingContractTest(chex.TestCase):
  def test_eval_and_zero_probability_return_x_without_key(self):
    x = jnp.ones((2, 8, 8, 3))
    assert regjax.random_erasing(x, deterministic=True) is x
    assert regjax.random_erasing(x, 0.0) is x
    assert regjax.random_erasing(x, probability=0) is x
    with pytest.raises(ValueError, match="needs a PRNG key"):
      regjax.random_erasing(x)

  def test_jit_and_eager_are_bit_identical_and_keys_matter(self):
    x = _uniform(19, (16, 12, 10, 3), 1.0, 2.0)
    key = jax.random.key(20)
    # (fill='random' is in the contract tables of tests/test_contracts.py.)

    def run(x, k):
      return regjax.random_erasing(x, 0.6, key=k, fill=-1.0)

    eager = np.asarray(run(x, key))
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(x, key)), eager)
    assert not np.array_equal(np.asarray(run(x, jax.random.key(21))), eager)

  def test_traced_probability_compiles_once_is_clipped_and_nan_is_identity(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(x, p, key):
      return regjax.random_erasing(x, p, key=key, fill="random")

    x = _uniform(22, (64, 8, 8, 1), 1.0, 2.0)
    key = jax.random.key(23)
    for p in (0.0, 0.3, 1.0):
      np.testing.assert_array_equal(
        np.asarray(apply(x, jnp.float32(p), key)),
        np.asarray(regjax.random_erasing(x, p, key=key, fill="random")),
      )
    one = np.asarray(regjax.random_erasing(x, 1.0, key=key, fill="random"))
    np.testing.assert_array_equal(np.asarray(apply(x, jnp.float32(1.5), key)), one)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      np.testing.assert_array_equal(np.asarray(apply(x, jnp.float32(bad), key)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(apply(x, jnp.float32(-0.5), key)), np.asarray(x))

  def test_probability_decides_per_image(self):
    # Higher probability erases a superset of the images (same uniform per image).
    x = _uniform(24, (4096, 8, 8, 1), 1.0, 2.0)
    key = jax.random.key(25)
    erased = {}
    for p in (0.25, 0.5):
      y = np.asarray(regjax.random_erasing(x, p, key=key))
      erased[p] = (y != np.asarray(x)).any(axis=(1, 2, 3))
      q = 1 - (1 - fit_probability(8, 8, (0.02, 0.33), (0.3, 3.3))) ** ATTEMPTS
      assert abs(erased[p].mean() - p * q) < Z * math.sqrt(p * q * (1 - p * q) / x.shape[0])
    assert np.all(erased[0.5] >= erased[0.25])

  def test_bad_arguments(self):
    key = jax.random.key(0)
    x = jnp.ones((2, 8, 6, 3))
    op = regjax.random_erasing
    with pytest.raises(ValueError, match=r"`probability` must be in \[0, 1\]"):
      op(x, 1.5, key=key)
    with pytest.raises(ValueError, match=r"`probability` must be in \[0, 1\]"):
      op(x, float("nan"), key=key)
    for bad in ((0.0, 0.3), (0.5, 0.2), (0.1, 1.5), (float("nan"), 0.5)):
      with pytest.raises(ValueError, match=r"`area` must be a pair \(low, high\) with 0 < low"):
        op(x, key=key, area=bad)
    for bad in ((0.0, 2.0), (3.0, 2.0), (0.5, float("inf")), (-1.0, 1.0)):
      with pytest.raises(ValueError, match=r"`aspect` must be a pair .* high < inf"):
        op(x, key=key, aspect=bad)
    for bad in (0.3, (0.1,), (0.1, 0.2, 0.3), ("a", 0.2), (True, 0.5)):
      with pytest.raises(TypeError, match="`area` must be a pair"):
        op(x, key=key, area=bad)
    for bad in ("noise", "Random"):
      with pytest.raises(ValueError, match="`fill` must be a finite number or 'random'"):
        op(x, key=key, fill=bad)
    for bad in (float("nan"), float("inf")):
      with pytest.raises(ValueError, match="`fill` must be a finite number"):
        op(x, key=key, fill=bad)
    with pytest.raises(ValueError, match=r"finite in float16"):
      op(x.astype(jnp.float16), key=key, fill=1e5)
    for bad in (True, None, [0.0], np.zeros(3), 1j):
      with pytest.raises(TypeError, match="`fill` must be a finite real number"):
        op(x, key=key, fill=bad)
    with pytest.raises(TypeError, match="`fill` must be a concrete number"):
      jax.jit(lambda f: op(x, key=key, fill=f))(0.5)
    with pytest.raises(ValueError, match=r"`x` must be a batch of images of rank 4.*x\[None\]"):
      op(jnp.ones((8, 6, 3)), key=key)
    with pytest.raises(ValueError, match="`data_format` must be one of"):
      op(x, key=key, data_format="NWHC")
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
      op(jnp.ones((2, 8, 6, 3), jnp.int32), key=key)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(x, key=3)
    # Checked in eval mode too.
    with pytest.raises(ValueError, match="`area`"):
      op(x, deterministic=True, area=(0.5, 0.1))

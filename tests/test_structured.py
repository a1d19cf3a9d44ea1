"""Tests of regjax.structured: channel dropout, drop path, DropBlock and cutout.

Random ops are checked statistically: every tolerance is Z standard errors of
the estimated quantity for the sample size used (Z = 5). Where a standard error
is not known in closed form the test says which bound it uses.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import IMPL_CASES, IMPLS, Z, _normal, _uniform
from absl.testing import parameterized
from numpy.lib.stride_tricks import sliding_window_view

import regjax
from regjax import random as rrandom


# ----------------------------------------------------------------------------
# Channel dropout and drop path
class ChannelDropoutTest(chex.TestCase):
  @parameterized.named_parameters(
    ("1d_last", (256, 10, 32), -1),
    ("1d_first", (256, 32, 10), 1),
    ("2d_last", (128, 6, 6, 32), -1),
    ("2d_first", (128, 32, 6, 6), 1),
    ("3d_last", (64, 3, 4, 4, 32), -1),
    ("3d_first", (64, 32, 3, 4, 4), 1),
  )
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
      np.asarray(regjax.dropout(x, 0.4, key=key, broadcast_dims=(1, 2))),
    )
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
      jnp.ones((n, 3, 2)), jax.random.key(40)
    )
    y = np.asarray(y, np.float64).reshape(n, -1)
    np.testing.assert_array_equal(y.min(axis=1), y.max(axis=1))
    assert np.all(np.isclose(y[:, 0], 0) | np.isclose(y[:, 0], 1 / (1 - rate), rtol=1e-6))
    dropped = (y[:, 0] == 0).mean()
    assert abs(dropped - rate) < Z * math.sqrt(rate * (1 - rate) / n)
    assert abs(y[:, 0].mean() - 1) < Z * math.sqrt(rate / (1 - rate) / n)

  def test_batch_mode_drops_the_whole_batch_with_probability_rate(self):
    rate, draws = 0.3, 20000
    keys = jax.random.split(jax.random.key(41), draws)
    y = jax.jit(jax.vmap(lambda k: regjax.drop_path(jnp.ones((4, 3)), rate, key=k, mode="batch")))(
      keys
    )
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
    np.testing.assert_allclose(
      regjax.drop_path_rates(5, 0.2, convention="linspace"), np.linspace(0, 0.2, 5)
    )  # timm's dpr
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
  return np.array([min(i, size - block_size) - max(0, i - block_size + 1) + 1 for i in range(size)])


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
    y = self.variant(
      lambda x, k: regjax.dropblock(x, rate, key=k, block_size=block_size, rng_impl=impl)
    )(jnp.ones((n, h, w, c)), jax.random.key(50))
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
    *[(f"block_{b}_{impl}", b, impl) for b in (1, 2, 3, 4, 9) for impl in IMPLS]
  )
  def test_dropped_regions_are_unions_of_whole_blocks(self, block_size, impl):
    x = jnp.ones((6, 11, 9, 3))  # non-square, odd and even block sizes
    y = np.asarray(
      regjax.dropblock(x, 0.4, key=jax.random.key(52), block_size=block_size, rng_impl=impl)
    )
    zero = y == 0
    assert zero.any() and not zero.all()
    # Every zero lies in some all-zero block that fits, and nothing else is zero.
    np.testing.assert_array_equal(_union_of_all_zero_blocks(zero, block_size), zero)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_nchw_layout(self, impl):
    x = jnp.ones((6, 3, 11, 9))
    y = np.asarray(
      regjax.dropblock(
        x, 0.4, key=jax.random.key(53), block_size=3, data_format="NCHW", rng_impl=impl
      )
    )
    zero = y == 0
    assert zero.any()
    np.testing.assert_array_equal(_union_of_all_zero_blocks(zero, 3, axes=(2, 3)), zero)
    shared = np.asarray(
      regjax.dropblock(
        x,
        0.4,
        key=jax.random.key(53),
        block_size=3,
        data_format="NCHW",
        share_channels=True,
        rng_impl=impl,
      )
    )
    np.testing.assert_array_equal(shared, np.broadcast_to(shared[:, :1], shared.shape))

  @parameterized.named_parameters(*IMPL_CASES)
  def test_share_channels(self, impl):
    x = jnp.ones((8, 12, 12, 5))
    shared = np.asarray(
      regjax.dropblock(
        x, 0.3, key=jax.random.key(54), block_size=3, share_channels=True, rng_impl=impl
      )
    )
    np.testing.assert_array_equal(shared, np.broadcast_to(shared[..., :1], shared.shape))
    assert (shared == 0).any()
    independent = np.asarray(
      regjax.dropblock(x, 0.3, key=jax.random.key(54), block_size=3, rng_impl=impl)
    )
    assert not np.array_equal(independent, np.broadcast_to(independent[..., :1], x.shape))
    # Samples still differ from one another.
    assert not np.array_equal(shared[0], shared[1])

  @parameterized.named_parameters(*IMPL_CASES)
  def test_everything_dropped_gives_zeros_not_nan(self, impl):
    # block_size == H == W: gamma == rate, so rate 1 drops every map.
    x = _normal(55, (2, 4, 4, 3))

    def loss(x, r):
      return jnp.sum(regjax.dropblock(x, r, key=jax.random.key(56), block_size=4, rng_impl=impl))

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
      rate = optax.linear_schedule(0.0, 0.3, total)(step)  # the paper's linear ramp
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

  @pytest.mark.filterwarnings("ignore:regjax.dropblock_rate_schedule is deprecated")
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
    with pytest.raises(ValueError, match="`x` must be a batch of 2-D or 3-D feature maps"):
      regjax.dropblock(jnp.ones((8, 6, 3)), 0.1, key=key, block_size=3)
    with pytest.raises(ValueError, match=r"`data_format='NDHWC'` is for rank-5 input"):
      regjax.dropblock(x, 0.1, key=key, block_size=3, data_format="NDHWC")
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
    *[
      (f"{name}_{impl}", shape, fmt, share, b, rate, impl)
      for name, shape, fmt, share, b, rate in (
        ("nhwc", (4, 13, 11, 6), "NHWC", False, 4, 0.3),
        ("nchw_shared", (5, 3, 9, 12), "NCHW", True, 3, 0.5),
        ("block_1", (3, 6, 7, 2), "NHWC", False, 1, 0.2),
      )
      for impl in IMPLS
    ]
  )
  def test_seed_mask_is_the_documented_draw(
    self, shape, data_format, share, block_size, rate, impl
  ):
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
      h * w / (block_size**2 * (h - block_size + 1) * (w - block_size + 1))
    )
    seeds = self._documented_seeds(impl, key, tuple(seed_shape), gamma)
    assert seeds.any() and not seeds.all()
    expected, keep = self._expected(x, seeds, block_size, axes)

    def run(x, k):
      return regjax.dropblock(
        x,
        rate,
        key=k,
        block_size=block_size,
        share_channels=share,
        data_format=data_format,
        rng_impl=impl,
      )

    for y in (run(x, key), jax.jit(run)(x, key), run(x, jax.random.PRNGKey(59))):
      y = np.asarray(y)
      np.testing.assert_array_equal(y != 0, np.broadcast_to(keep, shape))  # the exact mask
      np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
    if impl == "hash":  # the default
      np.testing.assert_array_equal(
        np.asarray(
          regjax.dropblock(
            x, rate, key=key, block_size=block_size, share_channels=share, data_format=data_format
          )
        ),
        np.asarray(run(x, key)),
      )

  def test_hash_same_draw_with_and_without_jit(self):
    x = _normal(60, (3, 17, 15, 5))
    key = jax.random.key(61)

    def run(x, r, k):
      return regjax.dropblock(x, r, key=k, block_size=4)

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
    _, vjp = jax.vjp(lambda x: regjax.dropblock(x, 0.3, key=key, block_size=3, rng_impl="jax"), x)
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
    hits[max(start, 0) : max(min(start + size, length), 0)] += 1
  return hits / length


class CutoutTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("even", 4), ("odd", 3))
  def test_one_clipped_square_per_sample_and_nothing_else(self, size):
    n, h, w, c = 4096, 8, 10, 2
    x = _uniform(60, (n, h, w, c), 1.0, 2.0)
    y = np.asarray(self.variant(lambda x, k: regjax.cutout(x, size, key=k))(x, jax.random.key(61)))
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
    traced = jax.jit(lambda x, s: regjax.cutout(x, s, key=jax.random.key(62), data_format="NCHW"))
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

  def test_probability_cuts_out_that_fraction_of_the_samples_with_the_same_squares(self):
    n, p = 4096, 0.3
    x = _uniform(63, (n, 8, 8, 1), 1.0, 2.0)
    key = jax.random.key(64)
    always = np.asarray(regjax.cutout(x, 3, key=key)) == 0
    y = np.asarray(regjax.cutout(x, 3, key=key, probability=p))
    cut = (y == 0).any(axis=(1, 2, 3))
    assert abs(cut.mean() - p) < Z * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(y == 0, always & cut[:, None, None, None])
    np.testing.assert_array_equal(y[~cut], np.asarray(x)[~cut])
    # The defaults are the original op.
    np.testing.assert_array_equal(
      np.asarray(regjax.cutout(x, 3, key=key, probability=1.0, fill=0.0)),
      np.asarray(regjax.cutout(x, 3, key=key)),
    )
    assert regjax.cutout(x, 3, probability=0.0) is x
    assert regjax.cutout(x, 3, deterministic=True, probability=0.5, fill="random") is x

  def test_fill_value_and_random_fill(self):
    x = _uniform(65, (2048, 8, 8, 3), 5.0, 6.0)
    key = jax.random.key(66)
    hole = np.asarray(regjax.cutout(x, 4, key=key)) == 0
    y = np.asarray(regjax.cutout(x, 4, key=key, fill=-1.5))
    np.testing.assert_array_equal(y[hole], np.float32(-1.5))
    np.testing.assert_array_equal(y[~hole], np.asarray(x)[~hole])
    y = np.asarray(regjax.cutout(x, 4, key=key, fill="random"), np.float64)
    np.testing.assert_array_equal(y[~hole], np.asarray(x)[~hole])
    values = y[hole]  # i.i.d. N(0, 1), one per element
    n = values.size
    assert abs(values.mean()) < Z / math.sqrt(n)
    assert abs(values.var() - 1) < Z * math.sqrt(2 / n)
    pixels = y[hole[..., 0]]  # (pixels, 3)
    r = np.corrcoef(pixels[:, 0], pixels[:, 2])[0, 1]
    assert abs(r) < Z / math.sqrt(pixels.shape[0])

  def test_traced_probability_compiles_once_is_clipped_and_nan_is_identity(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(x, p, key):
      return regjax.cutout(x, 3, key=key, probability=p, fill=-1.0)

    x = _uniform(67, (64, 8, 8, 2), 1.0, 2.0)
    key = jax.random.key(68)
    for p in (0.0, 0.4, 1.0):
      np.testing.assert_array_equal(
        np.asarray(apply(x, jnp.float32(p), key)),
        np.asarray(regjax.cutout(x, 3, key=key, probability=p, fill=-1.0)),
      )
    np.testing.assert_array_equal(
      np.asarray(apply(x, jnp.float32(2.0), key)),
      np.asarray(regjax.cutout(x, 3, key=key, fill=-1.0)),
    )
    for bad in (jnp.nan, jnp.inf, -1.0):
      np.testing.assert_array_equal(np.asarray(apply(x, jnp.float32(bad), key)), np.asarray(x))

  def test_bad_probability_and_fill(self):
    key = jax.random.key(0)
    x = jnp.ones((2, 8, 6, 3))
    with pytest.raises(ValueError, match=r"`probability` must be in \[0, 1\]"):
      regjax.cutout(x, 2, key=key, probability=1.5)
    with pytest.raises(ValueError, match="`fill` must be a finite number or 'random'"):
      regjax.cutout(x, 2, key=key, fill="gaussian")
    with pytest.raises(ValueError, match="`fill` must be a finite number"):
      regjax.cutout(x, 2, key=key, fill=float("nan"))
    with pytest.raises(TypeError, match="`fill` must be a finite real number"):
      regjax.cutout(x, 2, key=key, fill=(0.0, 1.0))

"""Tests of regjax.random, the counter-based generator of rng_impl='hash'.

Also the hash generator's statistics as the noise ops see them, and
regjax._random (the rng_impl='jax' draws).

Statistical checks allow Z = 5 standard errors of the estimated quantity (a
false-alarm rate of about 6e-7 per check) or a p-value above 1e-6. The
PractRand runs that test the stream at length live in benchmarks/rng_quality.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from _helpers import NOISE_OPS, _noise
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

import regjax
from regjax import random as rrandom

Z = 5.0


N = 1 << 20


# The first words of two keys' streams. A change here changes every draw of every
# rng_impl='hash' op: it must be deliberate (and the study rerun).
PINNED = {
  "key(0)": [
    3364256016,
    1571403676,
    2399786363,
    1394078221,
    168138991,
    3403861498,
    3110797534,
    2854828000,
  ],
  "PRNGKey(1234)": [
    1612046569,
    3717232789,
    3034579837,
    335127837,
    1504577741,
    4201403039,
    2273757330,
    1127904217,
  ],
}


def _keys():
  return {"key(0)": jax.random.key(0), "PRNGKey(1234)": jax.random.PRNGKey(1234)}


class StreamDefinitionTest(parameterized.TestCase):
  @parameterized.parameters("key(0)", "PRNGKey(1234)")
  def test_first_words_are_pinned(self, name):
    words = np.asarray(rrandom.bits(_keys()[name], (8,)))
    assert words.dtype == np.uint32
    np.testing.assert_array_equal(words, np.array(PINNED[name], np.uint32))

  def test_bits_is_counter_bits_of_the_seed_words(self):
    key = jax.random.key(1)
    seed = rrandom.seed_words(key)
    assert seed.shape == (rrandom.SEED_WORDS,) and seed.dtype == jnp.uint32
    np.testing.assert_array_equal(
      np.asarray(seed), np.asarray(jax.random.bits(key, (4,), jnp.uint32))
    )
    np.testing.assert_array_equal(
      np.asarray(rrandom.bits(key, (5, 7))), np.asarray(rrandom.counter_bits(seed, (5, 7)))
    )

  def test_reference_definition_in_numpy(self):
    # The module docstring's definition, written out in NumPy uint32 arithmetic.
    key = jax.random.key(2)
    s = np.asarray(rrandom.seed_words(key), np.uint32)
    i = np.arange(4096, dtype=np.uint32)

    def lowbias32(h):
      h = (h ^ (h >> 16)) * np.uint32(0x7FEB352D)
      h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
      return h ^ (h >> 16)

    def step(word):
      g = word | np.uint32(1)
      transitions = bin(int(g ^ (g >> np.uint32(1)))).count("1")
      return g ^ np.uint32(0xAAAAAAAA) if transitions < 12 else g

    with np.errstate(over="ignore"):
      w = [lowbias32(s[k] + np.uint32((k * 0x9E3779B9) % 2**32)) for k in range(4)]
      x = w[0] + i * step(w[1])
      y = w[2] + i * step(w[3])
      h = (x ^ (x >> 16)) * np.uint32(0x7FEB352D)
      h = h ^ y
      h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
      h = h ^ (h >> 16)
    np.testing.assert_array_equal(np.asarray(rrandom.bits(key, (4096,))), h)

  def test_words_follow_the_flat_row_major_index(self):
    key = jax.random.key(3)
    flat = np.asarray(rrandom.bits(key, (2 * 3 * 5 * 7,)))
    for shape in ((2, 3, 5, 7), (6, 35), (210, 1), (1, 210)):
      np.testing.assert_array_equal(np.asarray(rrandom.bits(key, shape)).ravel(), flat)
    assert rrandom.bits(key, ()).shape == ()
    assert int(rrandom.bits(key, ())) == flat[0]
    assert rrandom.bits(key, (0, 3)).shape == (0, 3)

  def test_typed_and_raw_keys_with_the_same_data_give_the_same_words(self):
    typed = jax.random.key(7)
    raw = jax.random.key_data(typed)
    np.testing.assert_array_equal(
      np.asarray(rrandom.bits(typed, (64,))), np.asarray(rrandom.bits(raw, (64,)))
    )

  def test_same_words_with_and_without_jit_and_under_vmap(self):
    key = jax.random.key(8)
    eager = np.asarray(rrandom.bits(key, (33, 65)))
    jitted = jax.jit(rrandom.bits, static_argnums=1)(key, (33, 65))
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    keys = jax.random.split(key, 3)
    batched = jax.vmap(lambda k: rrandom.bits(k, (33, 65)))(keys)
    for k, words in zip(keys, batched, strict=False):
      np.testing.assert_array_equal(np.asarray(words), np.asarray(rrandom.bits(k, (33, 65))))

  def test_bad_key_and_shape_are_refused(self):
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      rrandom.bits(jnp.zeros(2, jnp.float32), (3,))
    with pytest.raises(ValueError, match="needs a PRNG key"):
      rrandom.bits(None, (3,))
    with pytest.raises(TypeError, match="`shape` must be a tuple of ints"):
      rrandom.bits(jax.random.key(0), 3.5)
    with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype"):
      rrandom.normal(jax.random.key(0), (3,), jnp.int32)
    with pytest.raises(ValueError, match="does not broadcast"):
      rrandom.bernoulli(jax.random.key(0), jnp.full((2,), 0.5), (3,))
    with pytest.raises(ValueError, match="does not broadcast"):
      rrandom.bernoulli(jax.random.key(0), jnp.full((3, 1), 0.5), (4,))


class WideCounterTest(parameterized.TestCase):
  """Noise arrays of more than 2**32 elements: the counter's high word."""

  @settings(max_examples=60, deadline=None)
  @given(dims=st.lists(st.integers(1, 2**16), min_size=1, max_size=2), data=st.data())
  def test_flat_index_words_are_the_exact_64_bit_index(self, dims, data):
    shape = tuple(dims) + (2**31 + 11,)  # always beyond 2**32 elements, below 2**64
    index = tuple(data.draw(st.integers(0, d - 1)) for d in shape)
    flat = 0
    for i, d in zip(index, shape, strict=False):
      flat = flat * d + i
    indices = [jnp.uint32(i)[None] for i in index]
    hi, lo = rrandom._flat_index_of(indices, shape)
    assert (int(hi[0]), int(lo[0])) == (flat >> 32, flat & 0xFFFFFFFF)

  def test_wide_path_agrees_with_the_narrow_one_below_2_pow_32(self):
    shape = (6, 7, 11)
    hi, lo = rrandom._flat_index_words(shape)
    np.testing.assert_array_equal(np.asarray(hi), 0)
    np.testing.assert_array_equal(np.asarray(lo), np.asarray(rrandom._flat_index(shape)))
    seed = rrandom.seed_words(jax.random.key(9))
    np.testing.assert_array_equal(
      np.asarray(rrandom.hash_counter(seed, lo, hi)), np.asarray(rrandom.counter_bits(seed, shape))
    )

  def test_high_word_gives_a_different_uncorrelated_block(self):
    seed = rrandom.seed_words(jax.random.key(10))
    lo = jnp.arange(N, dtype=jnp.uint32)
    first = np.asarray(rrandom.hash_counter(seed, lo) >> 8, np.float64)
    second = np.asarray(rrandom.hash_counter(seed, lo, jnp.ones_like(lo)) >> 8, np.float64)
    assert abs(np.corrcoef(first, second)[0, 1]) < Z / math.sqrt(N)
    assert np.mean(first == second) < 1e-3

  def test_arrays_beyond_2_pow_32_elements_trace(self):
    x = jax.ShapeDtypeStruct((1 << 16, (1 << 16) + 1), jnp.float32)
    for op, value in (
      (regjax.dropout, 0.5),
      (regjax.gaussian_dropout, 0.5),
      (regjax.uout, 0.1),
      (regjax.alpha_dropout, 0.1),
      (regjax.gaussian_noise, 0.1),
    ):
      out = jax.eval_shape(lambda x: op(x, value, key=jax.random.key(0)), x)  # noqa: B023
      assert out.shape == x.shape
    assert jax.eval_shape(lambda: rrandom.bits(jax.random.key(0), x.shape)).shape == x.shape
    with pytest.raises(ValueError, match="no single dimension of 2\\*\\*32 or more"):
      jax.eval_shape(lambda: rrandom.bits(jax.random.key(0), (2, 1 << 32)))
    with pytest.raises(ValueError, match="no single dimension"):
      jax.eval_shape(lambda: rrandom.bits(jax.random.key(0), ((1 << 32) + 1,)))


OPS = {
  "dropout": (regjax.dropout, 0.3),
  "gaussian_dropout": (regjax.gaussian_dropout, 0.3),
  "uout": (regjax.uout, 0.4),
  "alpha_dropout": (regjax.alpha_dropout, 0.2),
  "gaussian_noise": (regjax.gaussian_noise, 0.5),
  "channel_dropout": (regjax.channel_dropout, 0.3),
  "drop_path": (regjax.drop_path, 0.3),
  "dropblock": (functools.partial(regjax.dropblock, block_size=3), 0.2),
}


class SymbolicShapeTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in OPS])
  def test_export_with_a_symbolic_batch(self, name):
    op, value = OPS[name]
    shape = "b, 3, 2" if name not in ("channel_dropout", "dropblock") else "b, 6, 5, 2"
    concrete = (3, 2) if name not in ("channel_dropout", "dropblock") else (6, 5, 2)

    def f(x, key):
      return op(x, value, key=key)

    key = jax.random.key(11)
    args = (
      jax.ShapeDtypeStruct(export.symbolic_shape(shape), jnp.float32),
      jax.ShapeDtypeStruct(key.shape, key.dtype),
    )
    exported = export.export(jax.jit(f))(*args)
    for batch in (1, 7):
      x = jax.random.normal(jax.random.key(12), (batch,) + concrete)
      np.testing.assert_array_equal(np.asarray(exported.call(x, key)), np.asarray(f(x, key)))

  def test_bits_with_a_symbolic_shape(self):
    key = jax.random.key(13)

    def f(x, key):
      return rrandom.bits(key, x.shape)

    args = (
      jax.ShapeDtypeStruct(export.symbolic_shape("b, 5"), jnp.float32),
      jax.ShapeDtypeStruct(key.shape, key.dtype),
    )
    exported = export.export(jax.jit(f))(*args)
    for batch in (2, 9):
      np.testing.assert_array_equal(
        np.asarray(exported.call(jnp.zeros((batch, 5)), key)),
        np.asarray(rrandom.bits(key, (batch, 5))),
      )


class DrawsTest(parameterized.TestCase):
  @parameterized.parameters(0.001, 0.1, 0.5, 0.77, 0.999)
  def test_bernoulli_probability(self, p):
    draws = np.asarray(rrandom.bernoulli(jax.random.key(20), p, (N,)))
    assert draws.dtype == np.bool_
    realised = round(p * 2**16) / 2**16
    assert abs(draws.mean() - realised) < Z * math.sqrt(realised * (1 - realised) / N)

  def test_bernoulli_p_array_traced_and_nan(self):
    key = jax.random.key(21)
    p = jnp.array([0.0, 1.0, jnp.nan, 0.5])
    draws = np.asarray(jax.jit(lambda p: rrandom.bernoulli(key, p, (N // 4, 4)))(p))
    assert not draws[:, 0].any() and draws[:, 1].all() and not draws[:, 2].any()
    assert abs(draws[:, 3].mean() - 0.5) < Z * math.sqrt(0.25 / (N // 4))
    assert rrandom.bernoulli(key, p).shape == (4,)

  def test_bernoulli_is_the_dropout_mask(self):
    key = jax.random.key(22)
    y = regjax.dropout(jnp.ones((64, 96)), 0.3, key=key)
    np.testing.assert_array_equal(
      np.asarray(y != 0), np.asarray(rrandom.bernoulli(key, 0.7, (64, 96)))
    )

  @parameterized.parameters(
    (jnp.float32, 0.0, 1.0),
    (jnp.float32, -2.0, 3.0),
    (jnp.bfloat16, 0.0, 1.0),
    (jnp.float16, -1.0, 1.0),
  )
  def test_uniform_range_and_moments(self, dtype, lo, hi):
    u = rrandom.uniform(jax.random.key(23), (N,), dtype, lo, hi)
    assert u.dtype == dtype
    u = np.asarray(u, np.float64)
    assert u.min() >= lo and u.max() < hi
    mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
    assert abs(u.mean() - mean) < Z * math.sqrt(var / N) + (hi - lo) * 2.0**-9
    if dtype == jnp.float32:
      assert scipy.stats.kstest(u, scipy.stats.uniform(lo, hi - lo).cdf).pvalue > 1e-6

  def test_uniform_is_the_24_bit_grid(self):
    key = jax.random.key(24)
    u = np.asarray(rrandom.uniform(key, (4096,)), np.float64)
    np.testing.assert_array_equal(u * 2**24, np.asarray(rrandom.bits(key, (4096,)) >> 8))

  def test_normal_moments_and_distribution(self):
    e = np.asarray(rrandom.normal(jax.random.key(25), (N,)), np.float64)
    assert abs(e.mean()) < Z / math.sqrt(N)
    assert abs(e.var() - 1) < Z * math.sqrt(2 / N)
    assert abs(scipy.stats.kurtosis(e)) < Z * math.sqrt(24 / N)
    assert scipy.stats.kstest(e, "norm").pvalue > 1e-6
    assert np.abs(e).max() < 5.5  # the documented tail cut (~5.4 sigma)

  def test_normal_is_the_gaussian_dropout_noise(self):
    key = jax.random.key(26)
    rate = 0.3
    y = regjax.gaussian_dropout(jnp.ones((128, 64)), rate, key=key)
    stddev = np.float32(math.sqrt(rate / (1 - rate)))
    expected = 1 + stddev * rrandom.normal(key, (128, 64))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=2e-7, atol=2e-7)

  def test_symmetric_uniform_is_exact_and_centred(self):
    words = jnp.arange(0, 1 << 24, dtype=jnp.uint32) << 8  # every 24-bit value once
    v = np.asarray(rrandom.symmetric_uniform_from_bits(words), np.float64)
    assert v.sum() == 0.0 and v.min() > -1 and v.max() < 1
    np.testing.assert_array_equal(v * 2**24, 2 * np.arange(1 << 24) + 1 - 2**24)


_KERNEL = np.linspace(-1, 1, 30, dtype=np.float32).reshape(6, 5)


JIT_OPS = dict(
  OPS,
  dropconnect=(
    lambda x, rate, key, rng_impl="hash": regjax.dropconnect_dense(
      x, jnp.asarray(_KERNEL, x.dtype), None, rate, key=key, rng_impl=rng_impl
    ),
    0.3,
  ),
)


class SameResultWithAndWithoutJitTest(parameterized.TestCase):
  """Bit for bit: eager, jit with the strength as a constant, jit with a traced strength."""

  @parameterized.named_parameters(
    *[
      (f"{name}_{impl}_{dtype.__name__}", name, impl, dtype)
      for name in JIT_OPS
      for impl in ("hash", "jax")
      for dtype in (jnp.float32, jnp.bfloat16)
    ]
  )
  def test_bit_identical(self, name, impl, dtype):
    op, value = JIT_OPS[name]
    op = functools.partial(op, rng_impl=impl)
    shape = (6, 6) if name == "dropconnect" else (5, 9, 7, 3)
    x = jax.random.normal(jax.random.key(40), shape).astype(dtype)
    key = jax.random.key(41)
    eager = np.asarray(op(x, value, key=key))
    constant = np.asarray(jax.jit(lambda x, k: op(x, value, key=k))(x, key))
    traced = np.asarray(jax.jit(lambda x, v, k: op(x, v, key=k))(x, value, key))
    np.testing.assert_array_equal(constant, eager)
    np.testing.assert_array_equal(traced, eager)

  @parameterized.parameters(0.05, 0.3, 0.5, 0.9)
  def test_bit_identical_over_rates(self, value):
    # The strength's constants (keep, stddev, alpha dropout's a and b) are computed at
    # run time under jit too, never folded at compile time: identical for every value.
    x = jax.random.normal(jax.random.key(42), (64, 32))
    key = jax.random.key(43)
    for op in (regjax.gaussian_dropout, regjax.uout, regjax.alpha_dropout, regjax.gaussian_noise):
      eager = np.asarray(op(x, value, key=key))
      np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda x, k, op=op: op(x, value, key=k))(x, key)), eager
      )


class OpsUseTheWordsTest(parameterized.TestCase):
  """A test of ``bits`` is a test of the ops: each op's noise is a map of the key's words."""

  def test_each_hash_op_reads_the_documented_bits(self):
    key = jax.random.key(30)
    shape = (32, 6, 6, 4)
    x = jnp.ones(shape)
    words = rrandom.bits(key, shape)

    def keep(rate):
      return np.asarray(rrandom.bernoulli_from_bits(words, 1 - rate))

    np.testing.assert_array_equal(np.asarray(regjax.dropout(x, 0.3, key=key) != 0), keep(0.3))
    alpha = np.asarray(regjax.alpha_dropout(x, 0.3, key=key))
    np.testing.assert_array_equal(alpha != alpha.min(), keep(0.3))
    u = rrandom.symmetric_uniform_from_bits(words)
    np.testing.assert_allclose(
      np.asarray(regjax.uout(x, 0.5, key=key)), np.asarray(1 + 0.5 * u), rtol=1e-6
    )
    e = rrandom.normal_from_bits(words)
    np.testing.assert_allclose(
      np.asarray(regjax.gaussian_noise(x, 0.5, key=key)),
      np.asarray(1 + 0.5 * e),
      rtol=1e-6,
      atol=1e-6,
    )
    # Broadcast masks read the words of the noise shape.
    channel = np.asarray(regjax.channel_dropout(x, 0.3, key=key) != 0)
    channel_words = rrandom.bits(key, (32, 1, 1, 4))
    np.testing.assert_array_equal(
      channel, np.broadcast_to(np.asarray(rrandom.bernoulli_from_bits(channel_words, 0.7)), shape)
    )
    path = np.asarray(regjax.drop_path(x, 0.3, key=key) != 0)
    np.testing.assert_array_equal(
      path[:, 0, 0, 0], np.asarray(rrandom.bernoulli(key, 0.7, (32, 1, 1, 1))).ravel()
    )
    kernel = jnp.ones((6, 5))
    dropped = regjax.dropconnect_dense(jnp.eye(6), kernel, None, 0.3, key=key)
    np.testing.assert_array_equal(
      np.asarray(dropped != 0), np.asarray(rrandom.bernoulli(key, 0.7, (6, 5)))
    )

  def test_reusing_a_key_across_ops_correlates_their_noise(self):
    # Why the docs say: never give two layers the same key.
    key = jax.random.key(31)
    ones = jnp.ones((N,))
    drop = np.asarray(regjax.dropout(ones, 0.5, key=key), np.float64)
    uniform = np.asarray(regjax.uout(ones, 1.0, key=key), np.float64)
    assert np.corrcoef(drop, uniform)[0, 1] < -0.8
    other = np.asarray(regjax.uout(ones, 1.0, key=jax.random.fold_in(key, 1)), np.float64)
    assert abs(np.corrcoef(drop, other)[0, 1]) < Z / math.sqrt(N)


OP_CASES = tuple((name, name) for name in NOISE_OPS)


def _u24(key, shape):
  """The hash generator's 24-bit uniforms (as float64 in [0, 2**24)) for ``shape``."""
  return np.asarray(rrandom.bits(key, shape) >> 8, np.float64)


def _corr(a, b):
  return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


class HashGeneratorTest(parameterized.TestCase):
  """Statistical and contract tests of the fused counter-hash generator (rng_impl='hash')."""

  @parameterized.parameters(0.001, 0.01, 0.3, 0.5, 0.9, 0.99, 0.999, 1 - 2.0**-14, 1 - 2.0**-20)
  def test_keep_rate(self, rate):
    y = _noise(regjax.dropout, rate, jax.random.key(40))
    keep = np.float32(1) - np.float32(rate)
    realised = round(float(keep) * 2**16) / 2**16
    se = math.sqrt(realised * (1 - realised) / N)
    assert abs((y != 0).mean() - realised) < Z * se + 1e-12
    np.testing.assert_allclose(y[y != 0], 1 / keep, rtol=1e-6)

  @parameterized.parameters(
    0.3, 0.999, 5.5 * 2.0**-16, 6.5 * 2.0**-16, 2.0**-18, 1 - 2.0**-17, 1 - 3 * 2.0**-16, 0.0, 1.0
  )
  def test_keep_threshold_resolution_is_2_pow_minus_16(self, keep):
    # Every 16-bit value once: the kept count IS 2**16 times the realised keep
    # probability, which must be round(keep * 2**16) / 2**16 exactly (half to even).
    b = jnp.arange(1 << 16, dtype=jnp.uint32) << 16
    kept = int(jnp.sum(rrandom.bernoulli_from_bits(b | 0xFFFF, jnp.float32(keep))))
    assert kept == int(np.round(np.float32(keep) * np.float32(2**16)))
    kept_low = int(jnp.sum(rrandom.bernoulli_from_bits(b, jnp.float32(keep))))
    assert kept_low == kept  # the low 16 bits never matter

  def test_bernoulli_bits_uniform_over_all_65536_values(self):
    # The mask compares the top 16 bits with the threshold, so every one of the
    # 2**16 values must be equally likely: chi-square with 65535 dof.
    n = 1 << 22
    top = np.asarray(rrandom.bits(jax.random.key(56), (n,)) >> 16)
    counts = np.bincount(top.astype(np.int64), minlength=1 << 16)
    expected = n / 2**16
    chi2 = np.sum((counts - expected) ** 2 / expected)
    dof = 2**16 - 1
    assert abs(chi2 - dof) < Z * math.sqrt(2 * dof), chi2

  def test_dropout_mask_is_the_documented_threshold(self):
    key = jax.random.key(41)
    y = regjax.dropout(jnp.ones((64, 48)), 0.3, key=key)
    bits = rrandom.bits(key, (64, 48))
    np.testing.assert_array_equal(
      np.asarray(y != 0), np.asarray(rrandom.bernoulli_from_bits(bits, jnp.float32(0.7)))
    )

  def test_uniforms_pass_chi_square(self):
    u = _u24(jax.random.key(42), (N,))
    for name, values in (
      ("high byte", np.floor(u / 2**16)),
      ("low byte", u % 256),
      ("middle byte", np.floor(u / 2**8) % 256),
    ):
      counts = np.bincount(values.astype(np.int64), minlength=256)
      expected = N / 256
      sd = math.sqrt(expected * (1 - 1 / 256))
      assert np.all(np.abs(counts - expected) < Z * sd), name
      chi2 = np.sum((counts - expected) ** 2 / expected)  # 255 dof: mean 255, sd ~22.6
      assert abs(chi2 - 255) < Z * math.sqrt(2 * 255), (name, chi2)

  @parameterized.parameters(1, 2, 3, 7, 64, 1024, 4096)
  def test_lag_k_uncorrelated(self, lag):
    u = _u24(jax.random.key(43), (N,))
    assert abs(_corr(u[:-lag], u[lag:])) < Z / math.sqrt(N - lag)
    y = _noise(regjax.dropout, 0.5, jax.random.key(44))
    assert abs(_corr(y[:-lag], y[lag:])) < Z / math.sqrt(N - lag)

  @parameterized.named_parameters(*OP_CASES)
  def test_2d_neighbours_uncorrelated_along_rows_and_columns(self, name):
    op, rate, _ = NOISE_OPS[name]
    y = np.asarray(op(jnp.ones((1024, 1024)), rate, key=jax.random.key(45)), np.float64)
    n = 1023 * 1024
    assert abs(_corr(y[:, :-1], y[:, 1:])) < Z / math.sqrt(n)  # along the last axis
    assert abs(_corr(y[:-1], y[1:])) < Z / math.sqrt(n)  # between rows

  def test_consecutive_fold_in_keys_uncorrelated(self):
    # A training loop typically folds the step number into one base key.
    base = jax.random.key(46)
    n = N // 4
    draws = [_u24(jax.random.fold_in(base, i), (n,)) for i in range(6)]
    for i in range(len(draws) - 1):
      assert abs(_corr(draws[i], draws[i + 1])) < Z / math.sqrt(n)
    # Also same-position agreement of dropout masks: P(equal) = keep**2 + rate**2.
    masks = [
      np.asarray(regjax.dropout(jnp.ones(n), 0.5, key=jax.random.fold_in(base, i)) != 0)
      for i in range(4)
    ]
    for i in range(3):
      assert abs((masks[i] == masks[i + 1]).mean() - 0.5) < Z * math.sqrt(0.25 / n)

  @parameterized.parameters(0, 1, 2, 0x80000000, 0xFFFFFFFF, 0x00010000, 0x55555554)
  def test_gamma_is_odd_with_enough_bit_transitions(self, s1):
    g = int(rrandom.weyl_step(jnp.uint32(s1)))
    assert g % 2 == 1
    assert bin(g ^ (g >> 1)).count("1") >= 12
    if bin((s1 | 1) ^ ((s1 | 1) >> 1)).count("1") >= 12:
      assert g == s1 | 1  # a good step is used as it is

  @settings(max_examples=200, deadline=None)
  @given(s1=st.integers(0, 2**32 - 1))
  def test_gamma_property(self, s1):
    g = int(rrandom.weyl_step(jnp.uint32(s1)))
    assert g % 2 == 1 and bin(g ^ (g >> 1)).count("1") >= 12

  @parameterized.parameters(0, 1, 0x80000000, 0xFFFFFFFF, 0x00010000)
  def test_weak_seed_words_still_pass(self, s1):
    # Steps that would be 1 or have few bit transitions without the fix-up, and
    # offsets of 0, in both sequences.
    seed = jnp.array([0, s1, 0, s1], jnp.uint32)
    u = np.asarray(rrandom.counter_bits(seed, (N,)) >> 8, np.float64)
    for values in (np.floor(u / 2**16), np.floor(u / 2**8) % 256):
      counts = np.bincount(values.astype(np.int64), minlength=256)
      chi2 = np.sum((counts - N / 256) ** 2 / (N / 256))
      assert abs(chi2 - 255) < Z * math.sqrt(2 * 255), (s1, chi2)
    for lag in (1, 2, 256, 65536):
      assert abs(_corr(u[:-lag], u[lag:])) < Z / math.sqrt(N - lag), (s1, lag)

  @parameterized.parameters(
    *[(word, delta) for word in range(4) for delta in (1, 2, 6, 12345, 1 << 31)]
  )
  def test_nearby_seed_words_give_unrelated_streams(self, word, delta):
    # Seeds differing by a small offset or in one bit of any one word must not give
    # related streams: same-position correlation and mask agreement as for independent
    # draws. (Threefry makes such seeds from distinct keys with probability ~2**-96;
    # this checks that the hash, not only threefry, separates them.)
    n = N // 4
    base = (0x9E3779B9, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35)
    other = list(base)
    other[word] = (other[word] + delta) % 2**32 if word % 2 == 0 else other[word] ^ delta
    a, b = (rrandom.counter_bits(jnp.asarray(s, jnp.uint32), (n,)) for s in (base, other))
    assert abs(
      _corr(np.asarray(a >> 8, np.float64), np.asarray(b >> 8, np.float64))
    ) < Z / math.sqrt(n)
    agree = np.mean(
      np.asarray(rrandom.bernoulli_from_bits(a, jnp.float32(0.5)))
      == np.asarray(rrandom.bernoulli_from_bits(b, jnp.float32(0.5)))
    )
    assert abs(agree - 0.5) < Z * math.sqrt(0.25 / n)

  def test_split_keys_uncorrelated_raw_bits(self):
    keys = jax.random.split(jax.random.key(47), 4)
    draws = [_u24(k, (N // 4,)) for k in keys]
    for i in range(4):
      for j in range(i + 1, 4):
        assert abs(_corr(draws[i], draws[j])) < Z / math.sqrt(N // 4)

  @parameterized.named_parameters(*OP_CASES)
  def test_draw_uses_the_flat_row_major_index(self, name):
    # The same elements in any shape get the same noise: no dependence on layout.
    op, rate, _ = NOISE_OPS[name]
    key = jax.random.key(48)
    flat = np.asarray(op(jnp.ones((4 * 6 * 10,)), rate, key=key))
    shaped = np.asarray(op(jnp.ones((4, 6, 10)), rate, key=key))
    np.testing.assert_array_equal(shaped.reshape(-1), flat)

  @parameterized.named_parameters(*OP_CASES)
  def test_bit_identical_with_and_without_jit(self, name):
    op, rate, _ = NOISE_OPS[name]
    key = jax.random.key(49)
    ones = jnp.ones((33, 65))
    eager = np.asarray(op(ones, rate, key=key))
    jitted = np.asarray(jax.jit(lambda x, k: op(x, rate, key=k))(ones, key))
    np.testing.assert_array_equal(jitted, eager)

  @parameterized.named_parameters(*OP_CASES)
  def test_backward_stores_nothing_per_element(self, name):
    # The vjp closes over its residuals: only the two seed words and a scalar.
    op, rate, _ = NOISE_OPS[name]
    x = jax.random.normal(jax.random.key(50), (256, 512))
    _, vjp = jax.vjp(lambda x: op(x, rate, key=jax.random.key(51)), x)
    stored = sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
    assert stored <= 8, stored
    # ... and the gradient is still exactly the noise factor.
    np.testing.assert_array_equal(
      np.asarray(vjp(jnp.ones_like(x))[0]),
      np.asarray(op(jnp.ones_like(x), rate, key=jax.random.key(51))),
    )

  def test_gradient_with_traced_rate_is_the_mask(self):
    x = jax.random.normal(jax.random.key(52), (64, 64))
    key = jax.random.key(53)
    grad = jax.jit(jax.grad(lambda x, r: jnp.sum(regjax.dropout(x, r, key=key))))(x, 0.4)
    np.testing.assert_array_equal(
      np.asarray(grad), np.asarray(regjax.dropout(jnp.ones_like(x), 0.4, key=key))
    )

  @parameterized.named_parameters(*OP_CASES)
  def test_bad_rng_impl(self, name):
    op, rate, _ = NOISE_OPS[name]
    with pytest.raises(ValueError, match=r"`rng_impl` must be one of .*'threefry'"):
      op(jnp.ones(3), rate, key=jax.random.key(0), rng_impl="threefry")

  def test_bfloat16_uses_the_float32_draw_rounded_once(self):
    key = jax.random.key(54)
    x = jax.random.normal(jax.random.key(55), (128, 32))
    for op, value in ((regjax.dropout, 0.3), (regjax.gaussian_dropout, 0.3), (regjax.uout, 0.2)):
      y16 = op(x.astype(jnp.bfloat16), value, key=key)
      y32 = op(x.astype(jnp.bfloat16).astype(jnp.float32), value, key=key)
      np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))


def test_flat_draws_are_jax_randoms_draws():
  # regjax._random draws on (prod(shape),) and reshapes (it compiles faster);
  # the bits must be exactly jax.random's, for typed and raw keys.
  from regjax import _random

  shape = (2, 1, 3, 4)
  for key in (jax.random.key(90), jax.random.PRNGKey(90)):
    np.testing.assert_array_equal(
      np.asarray(_random.bernoulli(key, 0.3, shape)),
      np.asarray(jax.random.bernoulli(key, 0.3, shape)),
    )
    np.testing.assert_array_equal(
      np.asarray(_random.normal(key, shape, jnp.float32)),
      np.asarray(jax.random.normal(key, shape, jnp.float32)),
    )

"""Tests of regjax.random, the counter-based generator every rng_impl='hash' op uses.

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
    "key(0)": [3364256016, 1571403676, 2399786363, 1394078221,
               168138991, 3403861498, 3110797534, 2854828000],
    "PRNGKey(1234)": [1612046569, 3717232789, 3034579837, 335127837,
                      1504577741, 4201403039, 2273757330, 1127904217],
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
    np.testing.assert_array_equal(np.asarray(seed),
                                  np.asarray(jax.random.bits(key, (4,), jnp.uint32)))
    np.testing.assert_array_equal(np.asarray(rrandom.bits(key, (5, 7))),
                                  np.asarray(rrandom.counter_bits(seed, (5, 7))))

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
    np.testing.assert_array_equal(np.asarray(rrandom.bits(typed, (64,))),
                                  np.asarray(rrandom.bits(raw, (64,))))

  def test_same_words_with_and_without_jit_and_under_vmap(self):
    key = jax.random.key(8)
    eager = np.asarray(rrandom.bits(key, (33, 65)))
    jitted = jax.jit(rrandom.bits, static_argnums=1)(key, (33, 65))
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    keys = jax.random.split(key, 3)
    batched = jax.vmap(lambda k: rrandom.bits(k, (33, 65)))(keys)
    for k, words in zip(keys, batched):
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
  @given(dims=st.lists(st.integers(1, 2**16), min_size=1, max_size=2),
         data=st.data())
  def test_flat_index_words_are_the_exact_64_bit_index(self, dims, data):
    shape = tuple(dims) + (2**31 + 11,)  # always beyond 2**32 elements, below 2**64
    index = tuple(data.draw(st.integers(0, d - 1)) for d in shape)
    flat = 0
    for i, d in zip(index, shape):
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
    np.testing.assert_array_equal(np.asarray(rrandom.hash_counter(seed, lo, hi)),
                                  np.asarray(rrandom.counter_bits(seed, shape)))

  def test_high_word_gives_a_different_uncorrelated_block(self):
    seed = rrandom.seed_words(jax.random.key(10))
    lo = jnp.arange(N, dtype=jnp.uint32)
    first = np.asarray(rrandom.hash_counter(seed, lo) >> 8, np.float64)
    second = np.asarray(rrandom.hash_counter(seed, lo, jnp.ones_like(lo)) >> 8, np.float64)
    assert abs(np.corrcoef(first, second)[0, 1]) < Z / math.sqrt(N)
    assert np.mean(first == second) < 1e-3

  def test_arrays_beyond_2_pow_32_elements_trace(self):
    x = jax.ShapeDtypeStruct((1 << 16, (1 << 16) + 1), jnp.float32)
    for op, value in ((regjax.dropout, 0.5), (regjax.gaussian_dropout, 0.5), (regjax.uout, 0.1),
                      (regjax.alpha_dropout, 0.1), (regjax.gaussian_noise, 0.1)):
      out = jax.eval_shape(lambda x: op(x, value, key=jax.random.key(0)), x)
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
    shape = ("b, 3, 2" if name not in ("channel_dropout", "dropblock") else "b, 6, 5, 2")
    concrete = (3, 2) if name not in ("channel_dropout", "dropblock") else (6, 5, 2)

    def f(x, key):
      return op(x, value, key=key)

    key = jax.random.key(11)
    args = (jax.ShapeDtypeStruct(export.symbolic_shape(shape), jnp.float32),
            jax.ShapeDtypeStruct(key.shape, key.dtype))
    exported = export.export(jax.jit(f))(*args)
    for batch in (1, 7):
      x = jax.random.normal(jax.random.key(12), (batch,) + concrete)
      np.testing.assert_array_equal(np.asarray(exported.call(x, key)), np.asarray(f(x, key)))

  def test_bits_with_a_symbolic_shape(self):
    key = jax.random.key(13)

    def f(x, key):
      return rrandom.bits(key, x.shape)

    args = (jax.ShapeDtypeStruct(export.symbolic_shape("b, 5"), jnp.float32),
            jax.ShapeDtypeStruct(key.shape, key.dtype))
    exported = export.export(jax.jit(f))(*args)
    for batch in (2, 9):
      np.testing.assert_array_equal(np.asarray(exported.call(jnp.zeros((batch, 5)), key)),
                                    np.asarray(rrandom.bits(key, (batch, 5))))


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
    np.testing.assert_array_equal(np.asarray(y != 0),
                                  np.asarray(rrandom.bernoulli(key, 0.7, (64, 96))))

  @parameterized.parameters((jnp.float32, 0.0, 1.0), (jnp.float32, -2.0, 3.0),
                            (jnp.bfloat16, 0.0, 1.0), (jnp.float16, -1.0, 1.0))
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
JIT_OPS = dict(OPS, dropconnect=(
    lambda x, rate, key, rng_impl="hash": regjax.dropconnect_dense(
        x, jnp.asarray(_KERNEL, x.dtype), None, rate, key=key, rng_impl=rng_impl),
    0.3))


class SameResultWithAndWithoutJitTest(parameterized.TestCase):
  """Bit for bit: eager, jit with the strength as a constant, jit with a traced strength."""

  @parameterized.named_parameters(*[(f"{name}_{impl}_{dtype.__name__}", name, impl, dtype)
                                    for name in JIT_OPS for impl in ("hash", "jax")
                                    for dtype in (jnp.float32, jnp.bfloat16)])
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
    for op in (regjax.gaussian_dropout, regjax.uout, regjax.alpha_dropout,
               regjax.gaussian_noise):
      eager = np.asarray(op(x, value, key=key))
      np.testing.assert_array_equal(
          np.asarray(jax.jit(lambda x, k: op(x, value, key=k))(x, key)), eager)


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
    np.testing.assert_allclose(np.asarray(regjax.uout(x, 0.5, key=key)),
                               np.asarray(1 + 0.5 * u), rtol=1e-6)
    e = rrandom.normal_from_bits(words)
    np.testing.assert_allclose(np.asarray(regjax.gaussian_noise(x, 0.5, key=key)),
                               np.asarray(1 + 0.5 * e), rtol=1e-6, atol=1e-6)
    # Broadcast masks read the words of the noise shape.
    channel = np.asarray(regjax.channel_dropout(x, 0.3, key=key) != 0)
    channel_words = rrandom.bits(key, (32, 1, 1, 4))
    np.testing.assert_array_equal(
        channel, np.broadcast_to(np.asarray(rrandom.bernoulli_from_bits(channel_words, 0.7)),
                                 shape))
    path = np.asarray(regjax.drop_path(x, 0.3, key=key) != 0)
    np.testing.assert_array_equal(
        path[:, 0, 0, 0], np.asarray(rrandom.bernoulli(key, 0.7, (32, 1, 1, 1))).ravel())
    kernel = jnp.ones((6, 5))
    dropped = regjax.dropconnect_dense(jnp.eye(6), kernel, None, 0.3, key=key)
    np.testing.assert_array_equal(np.asarray(dropped != 0),
                                  np.asarray(rrandom.bernoulli(key, 0.7, (6, 5))))

  def test_reusing_a_key_across_ops_correlates_their_noise(self):
    # Why the docs say: never give two layers the same key.
    key = jax.random.key(31)
    ones = jnp.ones((N,))
    drop = np.asarray(regjax.dropout(ones, 0.5, key=key), np.float64)
    uniform = np.asarray(regjax.uout(ones, 1.0, key=key), np.float64)
    assert np.corrcoef(drop, uniform)[0, 1] < -0.8
    other = np.asarray(regjax.uout(ones, 1.0, key=jax.random.fold_in(key, 1)), np.float64)
    assert abs(np.corrcoef(drop, other)[0, 1]) < Z / math.sqrt(N)

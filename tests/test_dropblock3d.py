"""Tests of regjax.dropblock on 3-D feature maps (rank 5; torchvision's DropBlock3d).

Random ops are checked statistically: every tolerance is Z standard errors of
the estimated quantity for the sample size used (Z = 5), against a float64 NumPy
reference of the seed rule.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import IMPL_CASES, IMPLS, Z, _normal
from absl.testing import parameterized
from numpy.lib.stride_tricks import sliding_window_view

import regjax
from regjax import random as rrandom


def _coverage_counts(size, block_size):
  """How many fitting block positions cover each index of an axis of length size."""
  return np.array([min(i, size - block_size) - max(0, i - block_size + 1) + 1 for i in range(size)])


def _gamma(sizes, block_size, rate, impl):
  """The seed probability: rate * DHW / (bs**3 prod(size - bs + 1)); with the hash generator
  the value its 16-bit threshold realises from the float32 gamma dropblock computes."""
  factor = math.prod(sizes) / (
    block_size ** len(sizes) * math.prod(s - block_size + 1 for s in sizes)
  )
  if impl == "jax":
    return rate * factor
  gamma32 = np.float32(rate) * np.float32(factor)
  return float(np.round(gamma32 * np.float32(1 << 16))) / (1 << 16)


def _drop_probability(sizes, block_size, rate, impl):
  """P(voxel dropped) = 1 - (1 - gamma)**c, c the number of fitting cubes covering it."""
  c = np.einsum("i,j,k->ijk", *[_coverage_counts(s, block_size).astype(np.float64) for s in sizes])
  return 1 - (1 - _gamma(sizes, block_size, rate, impl)) ** c


def _union_of_all_zero_cubes(zero, block_size, axes):
  """The union of every fitting block_size**3 cube that is all zero."""
  window = (block_size,) * len(axes)
  cubes = sliding_window_view(zero, window, axis=axes).all(axis=(-3, -2, -1))
  pad = [(0, 0)] * zero.ndim
  for a in axes:
    pad[a] = (block_size - 1, block_size - 1)
  return sliding_window_view(np.pad(cubes, pad), window, axis=axes).any(axis=(-3, -2, -1))


def _expected(x, seeds, block_size, axes):
  """x * M * numel(M) / sum(M) in float64, M zero on the cube of every seed."""
  dropped = seeds
  for axis in axes:  # a seed at d covers d .. d + block_size - 1
    pad = [(0, 0)] * dropped.ndim
    pad[axis] = (block_size - 1, block_size - 1)
    dropped = sliding_window_view(np.pad(dropped, pad), block_size, axis=axis).any(axis=-1)
  keep = np.broadcast_to(~dropped, x.shape)
  return np.asarray(x, np.float64) * np.where(keep, keep.size / keep.sum(), 0.0), keep


class DropBlock3dTest(chex.TestCase):
  @parameterized.named_parameters(*IMPL_CASES)
  def test_per_voxel_drop_probability_and_fraction(self, impl):
    # 8192 independent 7 x 6 x 5 maps: each voxel's dropped indicator is Bernoulli(p)
    # across maps, so the binomial tolerance is exact.
    rate, block_size, (n, d, h, w, c) = 0.3, 2, (4096, 7, 6, 5, 2)
    x = jnp.ones((n, d, h, w, c))
    y = regjax.dropblock(x, rate, key=jax.random.key(1), block_size=block_size, rng_impl=impl)
    dropped = np.asarray(y) == 0
    maps = n * c
    p = _drop_probability((d, h, w), block_size, rate, impl)
    np.testing.assert_array_less(
      np.abs(dropped.mean(axis=(0, 4)) - p), Z * np.sqrt(p * (1 - p) / maps)
    )
    # The mean dropped fraction; per-map fractions lie in [0, 1] with mean mu, so
    # Var <= mu (1 - mu) (Bhatia-Davis). Overlaps make mu < rate, beyond the tolerance.
    mu = p.mean()
    assert abs(dropped.mean() - mu) < Z * math.sqrt(mu * (1 - mu) / maps)
    assert rate - mu > 1.5 * Z * math.sqrt(mu * (1 - mu) / maps)

  @parameterized.named_parameters(*IMPL_CASES)
  def test_dropped_fraction_is_rate_where_blocks_cannot_overlap(self, impl):
    # block_size 1 (gamma = rate) and block_size = D = H = W (one cube, gamma = rate):
    # the expected dropped fraction is the rate itself (the realised 16-bit rate for 'hash').
    rate = 0.2
    for shape, block_size in (((256, 4, 4, 4, 4), 1), ((8192, 3, 3, 3, 1), 3)):
      y = regjax.dropblock(
        jnp.ones(shape), rate, key=jax.random.key(2), block_size=block_size, rng_impl=impl
      )
      dropped = np.asarray(y) == 0
      expected = _gamma(shape[1:4], block_size, rate, impl)
      assert abs(expected - rate) < 2**-16
      units = shape[0] * shape[4] * (64 if block_size == 1 else 1)  # independent draws
      assert abs(dropped.mean() - expected) < Z * math.sqrt(expected * (1 - expected) / units)

  @parameterized.named_parameters(
    *[
      (f"{fmt}_block_{b}_{impl}", fmt, b, impl)
      for fmt in ("NDHWC", "NCDHW")
      for b in (2, 3)
      for impl in IMPLS
    ]
  )
  def test_dropped_regions_are_unions_of_whole_cubes(self, data_format, block_size, impl):
    shape = (4, 7, 9, 6, 3) if data_format == "NDHWC" else (4, 3, 7, 9, 6)
    axes = (1, 2, 3) if data_format == "NDHWC" else (2, 3, 4)
    y = regjax.dropblock(
      jnp.ones(shape),
      0.4,
      key=jax.random.key(3),
      block_size=block_size,
      data_format=data_format,
      rng_impl=impl,
    )
    y = np.asarray(y)
    zero = y == 0
    assert zero.any() and not zero.all()
    # Every zero lies in an all-zero cube that fits, and nothing else is zero.
    np.testing.assert_array_equal(_union_of_all_zero_cubes(zero, block_size, axes), zero)
    # Kept voxels are rescaled by numel / sum(mask): the mean of ones is preserved.
    np.testing.assert_allclose(y[~zero], zero.size / (~zero).sum(), rtol=1e-6)

  @parameterized.named_parameters(
    *[
      (f"{name}_{impl}", shape, fmt, share, b, rate, impl)
      for name, shape, fmt, share, b, rate in (
        ("ndhwc", (3, 6, 7, 5, 4), "NDHWC", False, 3, 0.3),
        ("ncdhw_shared", (3, 4, 5, 6, 7), "NCDHW", True, 2, 0.5),
      )
      for impl in IMPLS
    ]
  )
  def test_seed_mask_is_the_documented_draw(
    self, shape, data_format, share, block_size, rate, impl
  ):
    x = _normal(4, shape)
    key = jax.random.key(5)
    last = data_format in ("NDHWC", "NHWC")
    axes, c_axis = ((1, 2, 3), 4) if last else ((2, 3, 4), 1)
    sizes = tuple(shape[a] for a in axes)
    seed_shape = list(shape)
    for a in axes:
      seed_shape[a] = shape[a] - block_size + 1
    if share:
      seed_shape[c_axis] = 1
    gamma = np.float32(rate) * np.float32(
      math.prod(sizes) / (block_size**3 * math.prod(s - block_size + 1 for s in sizes))
    )
    if impl == "hash":
      bits = rrandom.bits(key, tuple(seed_shape))
      seeds = np.asarray(rrandom.bernoulli_from_bits(bits, jnp.float32(gamma)))
    else:
      # Drawn flat and reshaped: the same bits as the shaped draw, compiled faster.
      flat = jax.random.bernoulli(key, jnp.float32(gamma), (math.prod(seed_shape),))
      seeds = np.asarray(flat).reshape(seed_shape)
    assert seeds.any() and not seeds.all()
    expected, keep = _expected(x, seeds, block_size, axes)

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

    eager = np.asarray(run(x, key))
    np.testing.assert_array_equal(eager != 0, keep)  # the exact mask
    np.testing.assert_allclose(eager, expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(x, key)), eager)
    if share:
      np.testing.assert_array_equal(
        eager != 0, np.broadcast_to((eager != 0).take([0], c_axis), shape)
      )

  def test_rank_4_layout_names_serve_rank_5(self):
    x = _normal(9, (2, 5, 5, 5, 3))
    key = jax.random.key(10)
    for short, long in (("NHWC", "NDHWC"), ("NCHW", "NCDHW")):
      np.testing.assert_array_equal(
        np.asarray(regjax.dropblock(x, 0.4, key=key, block_size=2, data_format=short)),
        np.asarray(regjax.dropblock(x, 0.4, key=key, block_size=2, data_format=long)),
      )
    np.testing.assert_array_equal(
      np.asarray(regjax.dropblock(x, 0.4, key=key, block_size=2)),
      np.asarray(regjax.dropblock(x, 0.4, key=key, block_size=2, data_format="NDHWC")),
    )

  def test_traced_ramp_compiles_once(self, impl="hash"):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, t, key):
      rate = optax.linear_schedule(0.0, 0.3, 10)(t)
      return regjax.dropblock(x, rate, key=key, block_size=2, rng_impl=impl)

    x = jnp.ones((8, 6, 6, 6, 2))
    dropped = [float((np.asarray(step(x, t, jax.random.key(t))) == 0).mean()) for t in (0, 5, 10)]
    assert dropped[0] == 0.0 < dropped[1] < dropped[2]
    # A traced rate gives the constant rate's draw.
    np.testing.assert_array_equal(
      np.asarray(step(x, 10, jax.random.key(6))),
      np.asarray(regjax.dropblock(x, 0.3, key=jax.random.key(6), block_size=2, rng_impl=impl)),
    )

  # dtypes (half precision computed in float32 and rounded once), jit == eager, raw keys,
  # traced rates and gradients: the "dropblock_3d" entry of tests/test_contracts.py.

  def test_bad_arguments(self):
    key = jax.random.key(0)
    x = jnp.ones((2, 4, 8, 6, 3))
    with pytest.raises(
      ValueError, match=r"`block_size` must be in \[1, 4\] \(the feature map is 4 x 8 x 6\)"
    ):
      regjax.dropblock(x, 0.1, key=key, block_size=5)
    with pytest.raises(ValueError, match=r"`block_size` must be in \[1, 3\]"):
      regjax.dropblock(x, 0.1, key=key, block_size=4, data_format="NCDHW")  # C D H W = 4 8 6 3
    with pytest.raises(ValueError, match="`data_format` must be one of"):
      regjax.dropblock(x, 0.1, key=key, data_format="NDHCW")
    with pytest.raises(ValueError, match="`x` must be a batch of 2-D or 3-D feature maps"):
      regjax.dropblock(jnp.ones((2, 3, 4, 4, 4, 2)), 0.1, key=key, block_size=2)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      regjax.dropblock(x, 1.5, key=key, block_size=2)
    assert regjax.dropblock(x, 0.0, block_size=2) is x
    assert regjax.dropblock(x, 0.3, deterministic=True, block_size=2) is x

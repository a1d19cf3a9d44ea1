"""Tests of regjax.join_drop_path: FractalNet's drop-path over a join.

The distribution of the join is checked against the exact float64 distribution
enumerated over the 2**n keep patterns in NumPy: per outcome, the count of N
samples must be within Z = 5 binomial standard errors of N * p.
"""

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import IMPLS, TRACED_MSG, Z
from absl.testing import parameterized

import regjax

N = 1 << 16  # samples (the batch axis) per statistical check
SHAPE = (3, 32, 4)  # (n_branches, batch, features) of the contract tests: one compilation each


def _pattern_probabilities(n, rate):
  """{frozenset of kept branches: probability}, float64, local mode, by enumeration."""
  keep = 1.0 - rate
  probs = {}
  for flags in itertools.product((False, True), repeat=n):
    kept = frozenset(i for i in range(n) if flags[i])
    p = keep ** len(kept) * rate ** (n - len(kept))
    if not kept:  # all dropped: one branch, uniformly
      for i in range(n):
        probs[frozenset({i})] = probs.get(frozenset({i}), 0.0) + p / n
    else:
      probs[kept] = probs.get(kept, 0.0) + p
  return probs


def _output_distribution(values, n, rate):
  """{join value: probability} for branch i constant values[i] (float64)."""
  dist = {}
  for kept, p in _pattern_probabilities(n, rate).items():
    value = float(np.mean([values[i] for i in sorted(kept)]))
    dist[value] = dist.get(value, 0.0) + p
  return dist


def _constant_branches(values, batch=N, dtype=jnp.float32):
  return jnp.asarray(np.repeat(np.asarray(values, np.float64)[:, None], batch, 1), dtype)


def _assert_counts(samples, dist, what=""):
  """Every outcome's count within Z binomial standard errors; nothing else seen."""
  samples = np.asarray(samples, np.float64).ravel()
  outcomes = np.array(sorted(dist))
  # Nearest outcome; float32 means of small powers of two are within 1e-6 of the float64 ones.
  idx = np.abs(samples[:, None] - outcomes[None, :]).argmin(1)
  np.testing.assert_allclose(samples, outcomes[idx], rtol=1e-6, atol=0, err_msg=what)
  counts = np.bincount(idx, minlength=len(outcomes))
  n = samples.size
  for value, count in zip(outcomes, counts, strict=True):
    p = dist[value]
    assert abs(count - n * p) < Z * math.sqrt(n * p * (1 - p)), (what, value, count, n * p)


# 16-bit exact keep rates, so the hash generator's realised rate is the nominal one.
LOCAL_CASES = [
  (f"n{n}_rate{rate}_{impl}", n, rate, impl)
  for n, rate in ((2, 0.75), (3, 0.5), (4, 0.25))
  for impl in IMPLS
]


class DistributionTest(parameterized.TestCase):
  @parameterized.named_parameters(*LOCAL_CASES)
  def test_local_join_matches_the_enumerated_distribution(self, n, rate, impl):
    values = [2.0**i for i in range(n)]  # every subset has a distinct mean
    dist = _output_distribution(values, n, rate)
    assert len(dist) == 2**n - 1
    y = regjax.join_drop_path(
      _constant_branches(values), rate, key=jax.random.key(n), rng_impl=impl
    )
    chex.assert_shape(y, (N,))
    _assert_counts(y, dist, f"n={n} rate={rate}")

  @parameterized.named_parameters(*LOCAL_CASES)
  def test_marginal_keep_probability(self, n, rate, impl):
    # One-hot branches: y[b, j] > 0 exactly where branch j is kept.
    branches = jnp.broadcast_to(jnp.eye(n)[:, None, :], (n, N, n))
    y = np.asarray(regjax.join_drop_path(branches, rate, key=jax.random.key(10 + n), rng_impl=impl))
    kept = y > 0
    assert np.all(kept.sum(1) >= 1)
    np.testing.assert_allclose(y[kept], (1.0 / kept.sum(1, keepdims=True) * kept)[kept], rtol=1e-6)
    p = (1 - rate) + rate**n / n
    assert np.all(np.abs(kept.mean(0) - p) < Z * math.sqrt(p * (1 - p) / N))
    # The enumerated marginal is the same number.
    marginal = sum(q for s, q in _pattern_probabilities(n, rate).items() if 0 in s)
    assert marginal == pytest.approx(p, rel=1e-12)

  @parameterized.named_parameters(*[(f"n{n}_{impl}", n, impl) for n in (2, 3, 5) for impl in IMPLS])
  def test_global_mode_keeps_one_uniform_branch(self, n, impl):
    values = [float(i) for i in range(n)]
    key = jax.random.key(20 + n)
    y = regjax.join_drop_path(
      _constant_branches(values), 0.3, key=key, mode="global", rng_impl=impl
    )
    _assert_counts(y, {v: 1.0 / n for v in values}, f"global n={n}")
    # The rate is unused.
    other = regjax.join_drop_path(
      _constant_branches(values), 0.9, key=key, mode="global", rng_impl=impl
    )
    np.testing.assert_array_equal(np.asarray(other), np.asarray(y))

  @parameterized.named_parameters(*[(impl, impl) for impl in IMPLS])
  def test_local_rate_one_is_global(self, impl):
    branches = _constant_branches([0.0, 1.0, 2.0], batch=256)
    key = jax.random.key(30)
    local = regjax.join_drop_path(branches, 1.0, key=key, rng_impl=impl)
    glob = regjax.join_drop_path(branches, 1.0, key=key, mode="global", rng_impl=impl)
    np.testing.assert_array_equal(np.asarray(local), np.asarray(glob))

  @parameterized.named_parameters(*[(impl, impl) for impl in IMPLS])
  def test_samples_draw_their_own_pattern_shared_by_their_other_axes(self, impl):
    rng = np.random.default_rng(0)
    branches = jnp.asarray(rng.uniform(1, 2, (3, 64, 1, 1)) * np.ones((3, 64, 4, 5)), jnp.float32)
    y = np.asarray(regjax.join_drop_path(branches, 0.5, key=jax.random.key(31), rng_impl=impl))
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :1], y.shape))
    ref = np.asarray(branches[:, :, 0, 0], np.float64)
    means = {
      s: ref[list(s)].mean(0) for r in (1, 2, 3) for s in itertools.combinations(range(3), r)
    }
    matches = {s: np.isclose(y[:, 0, 0], m, rtol=1e-6) for s, m in means.items()}
    assert np.all(np.any(list(matches.values()), axis=0))  # each sample: some subset's mean
    assert sum(m.any() for m in matches.values()) >= 4  # and the patterns vary over samples


class ContractTest(chex.TestCase):
  def test_eval_and_zero_rate_are_the_mean_without_a_key(self):
    rng = np.random.default_rng(1)
    b = rng.standard_normal((3, 16, 5))
    branches = jnp.asarray(b, jnp.float32)
    expected = np.asarray(branches, np.float64).mean(0)
    for mode in ("local", "global"):
      y = regjax.join_drop_path(branches, 0.5, mode=mode, deterministic=True)
      np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
      np.asarray(regjax.join_drop_path(branches, 0.0)),
      np.asarray(regjax.join_drop_path(branches, 0.3, deterministic=True)),
    )
    # Train mode keeping every branch (a traced rate 0) gives the eval mean bit for bit.
    traced = jax.jit(lambda b, r, k: regjax.join_drop_path(b, r, key=k))
    np.testing.assert_array_equal(
      np.asarray(traced(branches, 0.0, jax.random.key(0))),
      np.asarray(regjax.join_drop_path(branches, 0.0)),
    )
    with pytest.raises(ValueError, match="needs a PRNG key"):
      regjax.join_drop_path(branches, 0.0, mode="global")

  def test_one_branch_is_returned_as_is(self):
    branches = jnp.arange(6.0).reshape(1, 2, 3)
    for kwargs in ({}, {"deterministic": True}, {"mode": "global"}):
      y = regjax.join_drop_path(branches, 0.5, **kwargs)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(branches[0]))

  @parameterized.named_parameters(*[(impl, impl) for impl in IMPLS])
  def test_gradient_reaches_kept_branches_with_weight_one_over_kept(self, impl):
    n, batch = SHAPE[:2]
    key = jax.random.key(40)
    op = functools.partial(regjax.join_drop_path, key=key, rng_impl=impl)
    onehot = jnp.broadcast_to(jnp.eye(n, SHAPE[2])[:, None, :], SHAPE)
    y = np.asarray(op(onehot, 0.5))
    kept = (y[:, :n] > 0).T  # (n, batch): the pattern this key draws
    weights = kept / kept.sum(0, keepdims=True)
    branches = jax.random.normal(jax.random.key(41), SHAPE)
    w = jax.random.normal(jax.random.key(42), SHAPE[1:])
    grad = jax.grad(lambda b: jnp.sum(op(b, 0.5) * w))(branches)
    np.testing.assert_allclose(
      np.asarray(grad), weights[:, :, None] * np.asarray(w)[None], rtol=1e-6, atol=1e-7
    )
    # A NaN in a dropped branch reaches neither the output nor the gradient.
    poisoned = jnp.where(jnp.asarray(~kept)[:, :, None], jnp.nan, branches)
    out, grad = jax.value_and_grad(lambda b: jnp.sum(op(b, 0.5) * w))(poisoned)
    assert np.isfinite(out) and np.all(np.isfinite(np.asarray(grad)))

  @parameterized.named_parameters(
    *[
      (f"{jnp.dtype(d).name}_{impl}", d, impl)
      for d, impl in ((jnp.float32, "hash"), (jnp.bfloat16, "hash"), (jnp.float16, "jax"))
    ]
  )
  def test_dtype_kept_and_half_precision_rounds_once(self, dtype, impl):
    branches = jax.random.normal(jax.random.key(43), SHAPE).astype(dtype)
    key = jax.random.key(44)
    y = regjax.join_drop_path(branches, 0.5, key=key, rng_impl=impl)
    chex.assert_type(y, dtype)
    chex.assert_shape(y, (32, 4))
    y32 = regjax.join_drop_path(branches.astype(jnp.float32), 0.5, key=key, rng_impl=impl)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(dtype)))
    e = regjax.join_drop_path(branches, 0.5, deterministic=True)
    chex.assert_type(e, dtype)
    expected = jnp.mean(branches.astype(jnp.float32), 0).astype(dtype)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(expected))

  @parameterized.named_parameters(
    ("local_hash", "local", "hash"),
    ("local_jax", "local", "jax"),
    ("global_hash", "global", "hash"),
  )
  def test_jit_equals_eager_and_the_traced_rate_traces_once(self, mode, impl):
    branches = jax.random.normal(jax.random.key(45), SHAPE)
    key = jax.random.key(46)
    op = functools.partial(regjax.join_drop_path, mode=mode, rng_impl=impl)
    eager = np.asarray(op(branches, 0.5, key=key))
    np.testing.assert_array_equal(np.asarray(op(branches, 0.5, key=key)), eager)
    jitted = jax.jit(lambda b, k: op(b, 0.5, key=k))(branches, key)
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    assert not np.array_equal(np.asarray(op(branches, 0.5, key=jax.random.key(47))), eager)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced(b, r, k):
      return op(b, r, key=k)

    np.testing.assert_array_equal(np.asarray(traced(branches, 0.5, key)), eager)
    traced(branches, 0.25, key)

  @parameterized.named_parameters(*[(impl, impl) for impl in IMPLS])
  def test_traced_rates_clipped_and_non_finite_is_eval(self, impl):
    branches = jax.random.normal(jax.random.key(48), SHAPE)
    key = jax.random.key(49)
    f = jax.jit(lambda b, r: regjax.join_drop_path(b, r, key=key, rng_impl=impl))
    mean = np.asarray(regjax.join_drop_path(branches, 0.5, deterministic=True))
    np.testing.assert_array_equal(np.asarray(f(branches, -0.5)), mean)
    np.testing.assert_array_equal(
      np.asarray(f(branches, 1.5)),
      np.asarray(regjax.join_drop_path(branches, 1.0, key=key, rng_impl=impl)),
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
      np.testing.assert_array_equal(np.asarray(f(branches, bad)), mean)
    grad = jax.grad(lambda b: jnp.sum(f(b, float("nan"))))(branches)
    np.testing.assert_allclose(np.asarray(grad), 1 / 3, rtol=1e-6)


class BadInputTest(parameterized.TestCase):
  def test_errors_name_the_argument(self):
    key = jax.random.key(0)
    b = jnp.ones((3, 4, 2))
    op = regjax.join_drop_path
    with pytest.raises(ValueError, match=r"`branches` must have shape \(n_branches, batch"):
      op(jnp.ones((3,)), 0.5, key=key)
    with pytest.raises(ValueError, match=r"n_branches in \[1, 65536\]"):
      op(jnp.ones((0, 4)), 0.5, key=key)
    with pytest.raises(TypeError, match="`branches` must be a floating-point array"):
      op(jnp.ones((3, 4), jnp.int32), 0.5, key=key)
    with pytest.raises(TypeError, match="`branches` must be a floating-point array"):
      op([jnp.ones(4), jnp.ones(4)], 0.5, key=key)
    with pytest.raises(ValueError, match=r"`mode` must be one of \('local', 'global'\)"):
      op(b, 0.5, key=key, mode="row")
    for bad in (-0.1, 1.5, float("nan")):
      with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        op(b, bad, key=key)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      op(b, 2.0, key=key, mode="global")  # checked though unused
    with pytest.raises(ValueError, match=r"needs a PRNG key.*key="):
      op(b, 0.5)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(b, 0.5, key=42)
    with pytest.raises(TypeError, match=TRACED_MSG):
      jax.jit(lambda b, d: op(b, 0.5, key=key, deterministic=d))(b, False)
    with pytest.raises(ValueError, match="`rng_impl` must be one of"):
      op(b, 0.5, key=key, rng_impl="philox")

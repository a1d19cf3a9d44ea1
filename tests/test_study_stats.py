"""Tests of examples/study/stats.py, the statistics of a seeds-based study.

Each function is checked against scipy or a hand computation written here (the paired
t interval from scipy.stats.t.ppf, Holm on a textbook example and against the step-down
definition, the balanced two-way ANOVA sums of squares), plus properties: Holm keeps the
order of the p-values, the TOST interval rule agrees with its p-value rule, seeds_needed
is the first n meeting its bound, the interaction test holds its level under additivity,
and the seed bootstrap resamples seeds jointly across labels.
"""

import contextlib
import json
import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from study import stats


def _assert_plain(result):
  """Only Python scalars: json.dumps would fail on nothing, and no NumPy types leak."""
  json.dumps(result)
  for value in result.values() if isinstance(result, dict) else result:
    assert type(value) in (float, int, bool, dict), (value, type(value))


@contextlib.contextmanager
def _no_warnings():
  """Turns any warning (scipy's precision-loss or constant-input ones) into a failure."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


# mean_sd


def test_mean_sd_matches_numpy_and_marks_one_value():
  values = [0.91, 0.93, 0.90, 0.95]
  mean, sd = stats.mean_sd(values)
  assert mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
  assert type(mean) is float and type(sd) is float
  one_mean, one_sd = stats.mean_sd([0.9])
  assert one_mean == 0.9 and math.isnan(one_sd)
  assert stats.mean_sd([0.1, 0.1, 0.1]) == (pytest.approx(0.1), 0.0)
  with pytest.raises(ValueError, match="at least one"):
    stats.mean_sd([])
  with pytest.raises(ValueError, match="finite"):
    stats.mean_sd([0.9, math.nan])


# paired_difference


def test_paired_difference_matches_a_hand_t_interval_and_scipy():
  a = np.array([0.912, 0.905, 0.921, 0.899, 0.915, 0.908])
  b = np.array([0.903, 0.904, 0.911, 0.897, 0.902, 0.906])
  d = a - b
  n = d.size
  half = scipy.stats.t.ppf(0.975, n - 1) * np.std(d, ddof=1) / math.sqrt(n)
  result = stats.paired_difference(a, b)
  _assert_plain(result)
  assert result["n"] == n
  assert result["mean"] == pytest.approx(d.mean(), rel=1e-12)
  assert result["sd"] == pytest.approx(np.std(d, ddof=1), rel=1e-12)
  assert result["half_width"] == pytest.approx(half, rel=1e-12)
  assert result["low"] == pytest.approx(d.mean() - half, rel=1e-12)
  assert result["high"] == pytest.approx(d.mean() + half, rel=1e-12)
  assert result["p_value"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-10)
  assert result["excludes_zero"] is True
  wide = stats.paired_difference(a, b, confidence=0.999)
  assert wide["half_width"] > result["half_width"] and wide["excludes_zero"] is False


def test_paired_difference_sign_follows_a_minus_b():
  a, b = [1.0, 2.0, 3.5], [1.5, 2.1, 3.0]
  forward, backward = stats.paired_difference(a, b), stats.paired_difference(b, a)
  assert forward["mean"] == pytest.approx(-backward["mean"])
  assert forward["low"] == pytest.approx(-backward["high"])
  assert forward["p_value"] == pytest.approx(backward["p_value"])


@settings(max_examples=60, deadline=None)
@given(
  st.lists(st.floats(-1, 1, allow_subnormal=False), min_size=2, max_size=12),
  st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_interval_excludes_zero_iff_the_test_rejects(d, confidence):
  result = stats.paired_difference(d, np.zeros(len(d)), confidence)
  margin = 1e-9  # decisions right on the boundary may round either way
  if abs(result["p_value"] - (1 - confidence)) > margin:
    assert result["excludes_zero"] == (result["p_value"] < 1 - confidence)


def test_paired_difference_identical_differences_need_no_test():
  with _no_warnings():
    shifted = stats.paired_difference([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])
    same = stats.paired_difference([0.3, 0.5, 0.7], [0.3, 0.5, 0.7])
  assert shifted["sd"] == 0.0 and shifted["half_width"] == 0.0
  assert shifted["p_value"] == 0.0 and shifted["excludes_zero"] is True
  assert shifted["low"] == shifted["high"] == shifted["mean"]
  assert same["p_value"] == 1.0 and same["excludes_zero"] is False and same["mean"] == 0.0


def test_paired_difference_one_seed_and_bad_inputs():
  result = stats.paired_difference([0.9], [0.8])
  _assert_plain(result)
  assert result["mean"] == pytest.approx(0.1) and result["n"] == 1
  for key in ("sd", "half_width", "low", "high", "p_value"):
    assert math.isnan(result[key]), key
  assert result["excludes_zero"] is False
  with pytest.raises(ValueError, match="pair seed by seed"):
    stats.paired_difference([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="confidence"):
    stats.paired_difference([1.0, 2.0], [1.0, 3.0], confidence=95)


# holm


def test_holm_textbook_example():
  result = stats.holm([0.01, 0.04, 0.03, 0.005])
  _assert_plain(result)
  assert [r["p_adjusted"] for r in result] == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert [r["reject"] for r in result] == [True, False, False, True]


def test_holm_caps_at_one_and_passes_nan_through():
  result = stats.holm([math.nan, 0.02, 0.5, 0.6])
  assert math.isnan(result[0]["p_adjusted"]) and result[0]["reject"] is False
  # m = 3: the NaN is not a test.
  assert [r["p_adjusted"] for r in result[1:]] == pytest.approx([0.06, 1.0, 1.0])
  assert stats.holm([]) == []
  assert stats.holm([math.nan]) == [
    {"p_adjusted": pytest.approx(math.nan, nan_ok=True), "reject": False}
  ]
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    stats.holm([0.5, 1.5])


def _step_down_rejections(p, alpha):
  """Holm's procedure as he states it: walk up the sorted p-values, reject while
  p_(j) <= alpha / (m - j + 1) (j from 1), stop at the first failure."""
  reject = [False] * len(p)
  for j, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
    if p[i] > alpha / (len(p) - j):
      break
    reject[i] = True
  return reject


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=15), st.sampled_from([0.01, 0.05, 0.2]))
def test_holm_is_monotone_and_matches_the_step_down_rule(p, alpha):
  result = stats.holm(p, alpha)
  adjusted = [r["p_adjusted"] for r in result]
  assert all(p_i <= q <= 1.0 for p_i, q in zip(p, adjusted, strict=True))
  for i in range(len(p)):
    for j in range(len(p)):
      if p[i] <= p[j]:
        assert adjusted[i] <= adjusted[j]
  # The rule on raw p-values and the adjusted-p rule agree away from ties at alpha.
  if all(abs(q - alpha) > 1e-12 for q in adjusted):
    assert [r["reject"] for r in result] == _step_down_rejections(p, alpha)


# tost_paired


def test_tost_equivalent_and_shifted_data():
  rng = np.random.default_rng(1)
  b = rng.normal(0.9, 0.01, size=10)
  close = stats.tost_paired(b + rng.normal(0.0, 0.002, size=10), b, margin=0.01)
  shifted = stats.tost_paired(b + 0.02 + rng.normal(0.0, 0.002, size=10), b, margin=0.01)
  _assert_plain(close)
  assert close["equivalent"] is True and close["p_value"] < 1e-6
  assert -0.01 < close["low"] < close["high"] < 0.01
  assert shifted["equivalent"] is False and shifted["p_value"] > 0.5
  assert shifted["low"] > 0.01


def test_tost_p_values_match_hand_one_sided_t_tests():
  d = np.array([0.004, -0.002, 0.006, 0.001, 0.003, -0.001, 0.002])
  margin = 0.005
  n, mean, se = d.size, d.mean(), np.std(d, ddof=1) / math.sqrt(d.size)
  result = stats.tost_paired(d, np.zeros(n), margin, alpha=0.05)
  assert result["p_lower"] == pytest.approx(scipy.stats.t.sf((mean + margin) / se, n - 1))
  assert result["p_upper"] == pytest.approx(scipy.stats.t.cdf((mean - margin) / se, n - 1))
  assert result["p_value"] == max(result["p_lower"], result["p_upper"])
  half = scipy.stats.t.ppf(0.95, n - 1) * se
  assert (result["low"], result["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))


def test_tost_interval_rule_matches_p_value_rule():
  rng = np.random.default_rng(2)
  decisions = []
  for _ in range(300):
    n = int(rng.integers(2, 12))
    d = rng.normal(rng.uniform(-0.02, 0.02), rng.uniform(0.001, 0.02), size=n)
    alpha = float(rng.choice([0.025, 0.05, 0.1]))
    result = stats.tost_paired(d, np.zeros(n), margin=0.01, alpha=alpha)
    inside = result["low"] > -0.01 and result["high"] < 0.01
    assert inside == result["equivalent"], result
    decisions.append(inside)
  assert 10 < sum(decisions) < 290  # both outcomes were exercised


def test_tost_identical_differences_and_one_seed():
  with _no_warnings():
    inside = stats.tost_paired([0.5, 0.6], [0.497, 0.597], margin=0.01)
    outside = stats.tost_paired([0.5, 0.6], [0.48, 0.58], margin=0.01)
  assert inside["sd"] == 0.0 and inside["p_value"] == 0.0 and inside["equivalent"] is True
  assert outside["p_value"] == 1.0 and outside["equivalent"] is False
  assert outside["low"] == outside["high"] == pytest.approx(0.02)
  one = stats.tost_paired([0.5], [0.5], margin=0.01)
  assert math.isnan(one["p_value"]) and math.isnan(one["low"]) and one["equivalent"] is False
  with pytest.raises(ValueError, match="margin"):
    stats.tost_paired([0.5, 0.6], [0.5, 0.6], margin=0.0)


# seeds_needed


def _hand_half_width(sd, n, confidence=0.95):
  return scipy.stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)


@pytest.mark.parametrize("sd,confidence", [(1.0, 0.95), (0.01, 0.9), (0.3, 0.99)])
def test_seeds_needed_is_the_first_n_meeting_the_bound(sd, confidence):
  # A dense grid of targets lands between the half-widths of neighbouring n, where an
  # off-by-one in n or in the degrees of freedom would pick the wrong n.
  for target in sd * np.geomspace(0.1, 3.0, 150):
    n = stats.seeds_needed(sd, target, confidence, max_seeds=2000)
    assert 2 <= n < 2000
    assert _hand_half_width(sd, n, confidence) <= target
    assert n == 2 or _hand_half_width(sd, n - 1, confidence) > target


def test_seeds_needed_hand_value_and_edges():
  # t_{17} * 1 / sqrt(18) = 0.497 <= 0.5 < t_{16} / sqrt(17) = 0.514.
  assert stats.seeds_needed(1.0, 0.5) == 18
  assert stats.seeds_needed(1.0, 0.5, confidence=0.99) > 18
  assert stats.seeds_needed(0.0, 1e-6) == 2
  assert stats.seeds_needed(1.0, 1e-6, max_seeds=50) == 50  # unreachable
  assert type(stats.seeds_needed(1.0, 0.5)) is int
  with pytest.raises(ValueError, match="target"):
    stats.seeds_needed(1.0, 0.0)


def test_seeds_needed_grows_with_sd_and_shrinks_with_target():
  by_sd = [stats.seeds_needed(sd, 0.01) for sd in np.linspace(0.001, 0.05, 30)]
  assert by_sd == sorted(by_sd) and by_sd[0] < by_sd[-1]
  by_target = [stats.seeds_needed(0.02, t) for t in np.linspace(0.002, 0.05, 30)]
  assert by_target == sorted(by_target, reverse=True) and by_target[0] > by_target[-1]


# interaction_test


def _layout(levels_a, levels_b, seeds):
  a, b, s = np.meshgrid(np.arange(levels_a), np.arange(levels_b), np.arange(seeds), indexing="ij")
  return a.ravel(), b.ravel(), s.ravel()


def test_interaction_matches_balanced_two_way_anova_with_replicates():
  rng = np.random.default_rng(3)
  a, b, _ = _layout(3, 4, 5)
  y = rng.normal(size=a.size) + 0.3 * (a == 1) * (b == 2)
  cube = y.reshape(3, 4, 5)
  cell, grand = cube.mean(axis=2), cube.mean()
  effect = cell - cell.mean(axis=1, keepdims=True) - cell.mean(axis=0, keepdims=True) + grand
  ss_ab, ss_error = 5 * (effect**2).sum(), ((cube - cell[..., None]) ** 2).sum()
  f_hand = (ss_ab / 6) / (ss_error / 48)
  result = stats.interaction_test(y, [f"op{i}" for i in a], b)
  _assert_plain(result)
  assert (result["df_num"], result["df_den"]) == (6, 48)
  assert result["F"] == pytest.approx(f_hand, rel=1e-9)
  assert result["p_value"] == pytest.approx(scipy.stats.f.sf(f_hand, 6, 48), rel=1e-9)


def test_interaction_blocked_by_seed_matches_the_hand_decomposition():
  rng = np.random.default_rng(4)
  a, b, s = _layout(2, 3, 6)
  y = rng.normal(size=a.size) + 5.0 * rng.normal(size=6)[s]  # a large shared seed effect
  cube = y.reshape(2, 3, 6)
  cell, grand = cube.mean(axis=2), cube.mean()
  effect = cell - cell.mean(axis=1, keepdims=True) - cell.mean(axis=0, keepdims=True) + grand
  ss_ab = 6 * (effect**2).sum()
  ss_seed = 6 * ((cube.mean(axis=(0, 1)) - grand) ** 2).sum()
  ss_error = ((cube - cell[..., None]) ** 2).sum() - ss_seed
  df_den = (6 - 1) * (6 - 1)
  blocked = stats.interaction_test(y, a, b, block=s)
  assert (blocked["df_num"], blocked["df_den"]) == (2, df_den)
  assert blocked["F"] == pytest.approx((ss_ab / 2) / (ss_error / df_den), rel=1e-9)
  # Without the block the seed effect lands in the error.
  assert stats.interaction_test(y, a, b)["df_den"] == 30


def test_interaction_detects_a_planted_interaction():
  rng = np.random.default_rng(5)
  a, b, s = _layout(3, 3, 5)
  additive = 0.5 * a - 0.2 * b + rng.normal(size=5)[s]
  y = additive + 2.0 * ((a == 2) & (b == 0)) + 0.3 * rng.normal(size=a.size)
  assert stats.interaction_test(y, a, b, block=s)["p_value"] < 1e-6


def test_interaction_holds_its_level_on_additive_unbalanced_data():
  rng = np.random.default_rng(6)
  a, b, s = _layout(4, 3, 4)
  keep = np.ones(a.size, bool)
  keep[[0, 7, 13, 26, 40]] = False  # failed runs: an unbalanced layout
  a, b, s = a[keep], b[keep], s[keep]
  p_values = []
  for _ in range(400):
    y = 0.3 * a + 0.1 * b**2 + rng.normal(size=4)[s] + rng.normal(size=a.size)
    p_values.append(stats.interaction_test(y, a, b, block=s)["p_value"])
  rate = np.mean(np.array(p_values) < 0.05)
  assert abs(rate - 0.05) <= 5 * math.sqrt(0.05 * 0.95 / 400), rate
  # Wrong degrees of freedom would bend the null p-values away from uniform.
  assert scipy.stats.kstest(p_values, "uniform").pvalue > 1e-3


def test_interaction_degrees_of_freedom_follow_rank_with_an_empty_cell():
  a = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
  b = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 0])  # cell (2, 1) has no runs
  y = np.array([1.0, 1.2, 2.0, 2.3, 1.5, 1.4, 3.9, 4.1, 2.0, 2.2])
  result = stats.interaction_test(y, a, b)
  assert (result["df_num"], result["df_den"]) == (1, 5)
  assert result["p_value"] < 0.01


def test_interaction_refuses_layouts_without_error_or_interaction_df():
  a, b, _ = _layout(2, 3, 1)
  with pytest.raises(ValueError, match="residual degrees of freedom"):
    stats.interaction_test(np.arange(6.0), a, b)
  with pytest.raises(ValueError, match="interaction has no degrees"):
    stats.interaction_test(np.arange(6.0), np.zeros(6), b)
  with pytest.raises(ValueError, match="labels"):
    stats.interaction_test(np.arange(6.0), a[:5], b)


def test_interaction_exact_fit():
  a, b, s = _layout(2, 2, 3)
  additive = stats.interaction_test(1.0 * a + b + s, a, b, block=s)
  assert math.isnan(additive["F"]) and math.isnan(additive["p_value"])
  planted = stats.interaction_test(1.0 * a + b + s + (a * b), a, b, block=s)
  assert planted["F"] == math.inf and planted["p_value"] == 0.0


# spearman_bootstrap


def _per_seed(means, sd, seeds, rng):
  return {f"c{i}": list(m + sd * rng.normal(size=seeds)) for i, m in enumerate(means)}


def test_spearman_perfect_and_reversed_agreement():
  rng = np.random.default_rng(7)
  per_seed = _per_seed([0.1, 0.2, 0.3, 0.4, 0.5], 0.001, 5, rng)
  reference = {f"c{i}": float(i) for i in range(5)}
  same = stats.spearman_bootstrap(per_seed, reference, n_boot=300)
  _assert_plain(same)
  assert same["rho"] == pytest.approx(1.0) and same["low"] == pytest.approx(1.0) == same["high"]
  assert (same["n_labels"], same["n_seeds"]) == (5, 5)
  assert same["p_value"] == pytest.approx(scipy.stats.spearmanr([0, 1, 2, 3, 4], range(5)).pvalue)
  reversed_ = stats.spearman_bootstrap(per_seed, {k: -v for k, v in reference.items()}, n_boot=300)
  assert reversed_["rho"] == pytest.approx(-1.0) and reversed_["high"] == pytest.approx(-1.0)


def test_spearman_ties_use_average_ranks():
  per_seed = {"a": [1.0, 1.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": [4.0, 4.0]}
  reference = {"a": 10.0, "b": 20.0, "c": 20.0, "d": 30.0}
  result = stats.spearman_bootstrap(per_seed, reference, n_boot=50)
  # Average ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4.
  hand = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
  assert result["rho"] == pytest.approx(hand) and hand < 1
  assert result["rho"] == pytest.approx(
    scipy.stats.spearmanr([1, 2, 3, 4], [10, 20, 20, 30]).statistic
  )


def test_rank_rows_matches_scipy_spearmanr_column_by_column():
  rng = np.random.default_rng(8)
  x = rng.integers(0, 4, size=(6, 40)).astype(float)  # many ties
  reference = np.array([3.0, 1.0, 1.0, 2.0, 5.0, 0.0])
  rhos = stats._rank_rows(x, reference)
  for column, rho in zip(x.T, rhos, strict=True):
    if np.all(column == column[0]):
      assert math.isnan(rho)
    else:
      assert rho == pytest.approx(scipy.stats.spearmanr(column, reference).statistic)


def test_spearman_interval_contains_rho_and_is_reproducible():
  rng = np.random.default_rng(9)
  per_seed = _per_seed([0.1, 0.2, 0.25, 0.3, 0.35, 0.5], 0.2, 8, rng)
  reference = {f"c{i}": float(i) for i in range(6)}
  result = stats.spearman_bootstrap(per_seed, reference, n_boot=500, seed=3)
  assert -1 <= result["low"] < result["rho"] < result["high"] <= 1
  assert stats.spearman_bootstrap(per_seed, reference, n_boot=500, seed=3) == result
  narrow = stats.spearman_bootstrap(per_seed, reference, n_boot=500, seed=3, confidence=0.5)
  assert result["low"] <= narrow["low"] <= narrow["high"] <= result["high"]


def test_spearman_bootstrap_resamples_seeds_jointly():
  # Each seed moves every label by the same large amount: the label order never changes
  # within a seed, so resampling whole seeds keeps rho = 1 in every replicate, whereas
  # resampling each label's seeds independently would scramble the order.
  rng = np.random.default_rng(10)
  seed_luck = rng.normal(0.0, 1.0, size=6)
  per_seed = {f"c{i}": list(0.01 * i + seed_luck) for i in range(5)}
  reference = {f"c{i}": float(i) for i in range(5)}
  result = stats.spearman_bootstrap(per_seed, reference, n_boot=400)
  assert result["low"] == pytest.approx(1.0) == result["high"]
  values = np.array(list(per_seed.values()))
  unpaired = values[np.arange(5)[:, None, None], rng.integers(0, 6, size=(5, 400, 6))]
  unpaired_rho = stats._rank_rows(unpaired.mean(axis=2), np.arange(5.0))
  assert np.nanquantile(unpaired_rho, 0.025) < 0.5  # the contrast the test relies on


def test_spearman_degenerate_inputs():
  reference = {"a": 1.0, "b": 2.0, "c": 3.0, "z": 4.0}
  two = stats.spearman_bootstrap({"a": [1.0], "b": [2.0], "y": [0.0]}, reference)
  assert two["n_labels"] == 2 and all(math.isnan(two[k]) for k in ("rho", "low", "high", "p_value"))
  _assert_plain(two)
  one_seed = stats.spearman_bootstrap({"a": [1.0], "b": [2.0], "c": [3.0]}, reference)
  assert one_seed["rho"] == pytest.approx(1.0) and one_seed["n_seeds"] == 1
  assert math.isnan(one_seed["low"]) and math.isnan(one_seed["high"])
  with _no_warnings():
    flat = stats.spearman_bootstrap({"a": [1.0], "b": [1.0], "c": [1.0]}, reference)
  assert math.isnan(flat["rho"])
  with pytest.raises(ValueError, match="same, nonzero number of seeds"):
    stats.spearman_bootstrap({"a": [1.0, 2.0], "b": [2.0], "c": [3.0]}, reference)


# verdict


@pytest.mark.parametrize(
  "low,high,sign,expected",
  [
    (0.01, 0.03, 1, "reproduced"),
    (-0.03, -0.01, 1, "contradicted"),
    (-0.01, 0.02, 1, "inconclusive"),
    (0.0, 0.02, 1, "inconclusive"),
    (-0.03, -0.01, -1, "reproduced"),
    (0.01, 0.03, -1, "contradicted"),
    (-0.01, 0.02, -1, "inconclusive"),
    (math.nan, math.nan, 1, "inconclusive"),
    (math.nan, math.nan, -1, "inconclusive"),
  ],
)
def test_verdict_for_a_direction(low, high, sign, expected):
  assert stats.verdict(low, high, expected_sign=sign) == expected


@pytest.mark.parametrize(
  "low,high,equivalent,expected",
  [
    (-0.001, 0.001, True, "reproduced"),
    (0.001, 0.002, True, "reproduced"),  # significant but inside the margin
    (0.01, 0.03, False, "contradicted"),
    (-0.03, -0.01, False, "contradicted"),
    (-0.02, 0.03, False, "inconclusive"),
    (math.nan, math.nan, False, "inconclusive"),
  ],
)
def test_verdict_for_no_difference(low, high, equivalent, expected):
  assert stats.verdict(low, high, equivalence=equivalent) == expected


def test_verdict_from_the_study_functions_and_bad_arguments():
  rng = np.random.default_rng(11)
  b = rng.normal(0.9, 0.01, size=8)
  a = b + 0.01 + rng.normal(0.0, 0.001, size=8)
  diff = stats.paired_difference(a, b)
  assert stats.verdict(diff["low"], diff["high"], expected_sign=1) == "reproduced"
  assert stats.verdict(diff["low"], diff["high"], expected_sign=-1) == "contradicted"
  tost = stats.tost_paired(a, b, margin=0.002)
  assert stats.verdict(diff["low"], diff["high"], equivalence=tost["equivalent"]) == "contradicted"
  with pytest.raises(ValueError, match="exactly one"):
    stats.verdict(0.0, 1.0)
  with pytest.raises(ValueError, match="exactly one"):
    stats.verdict(0.0, 1.0, expected_sign=1, equivalence=True)
  with pytest.raises(ValueError, match=r"\+1 or -1"):
    stats.verdict(0.0, 1.0, expected_sign=2)
  with pytest.raises(ValueError, match="low <= high"):
    stats.verdict(1.0, 0.0, expected_sign=1)

"""Statistics of a seeds-based study: runs that share seeds across configurations.

Every configuration is trained with the same seeds, so two configurations' accuracies
are paired by seed and compared through their per-seed differences d_s = a_s - b_s.
Pure NumPy/SciPy; every function returns plain Python floats, ints, bools, lists and
dicts (JSON-serialisable). Values are NaN only where a docstring says so.

* `mean_sd`, `paired_difference`: mean and paired t interval and test;
* `holm`: Holm-Bonferroni adjusted p-values for a family of tests;
* `tost_paired`: equivalence test (two one-sided tests) within a margin;
* `seeds_needed`: how many seeds a target interval half-width needs;
* `interaction_test`: F test of an A x B interaction, optionally blocked by seed;
* `spearman_bootstrap`: rank agreement with reference values, bootstrapped over seeds;
* `verdict`: reproduced / contradicted / inconclusive for a stated claim.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import scipy.stats

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"


def _vector(values, name: str) -> np.ndarray:
  """`values` as a finite 1-D float64 array; a failed run (NaN) must be dropped upstream."""
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite, got {x.tolist()}")
  return x


def _differences(a, b) -> np.ndarray:
  """Per-seed differences a - b; both must list the same seeds in the same order."""
  a, b = _vector(a, "a"), _vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must pair seed by seed, got lengths {a.size} and {b.size}")
  if a.size == 0:
    raise ValueError("a and b are empty")
  return a - b


def _check_probability(value: float, name: str) -> None:
  if not 0.0 < value < 1.0:
    raise ValueError(f"{name} must lie in (0, 1), got {value}")


def _is_constant(x: np.ndarray) -> bool:
  # Tested exactly: np.std of identical values can be ~1e-17 rather than 0, which would
  # turn a degenerate case into a huge t statistic.
  return bool(np.all(x == x[0]))


def mean_sd(values) -> tuple[float, float]:
  """Sample mean and standard deviation of finite values.

  mean = sum(x) / n,  sd = sqrt(sum((x - mean)**2) / (n - 1))  (Bessel's correction).
  sd is NaN for n < 2 (one value says nothing about spread); sd is exactly 0 for
  identical values. Raises ValueError for no values.
  """
  x = _vector(values, "values")
  if x.size == 0:
    raise ValueError("mean_sd needs at least one value")
  if x.size < 2:
    return float(x[0]), math.nan
  sd = 0.0 if _is_constant(x) else float(np.std(x, ddof=1))
  return float(np.mean(x)), sd


def t_half_width(sd: float, n: int, confidence: float = 0.95) -> float:
  """Half-width of the two-sided t interval of a mean: t_{n-1}(1 - (1 - c)/2) * sd / sqrt(n).

  Student (1908); e.g. Casella & Berger, Statistical Inference, Sec. 9.2.
  """
  _check_probability(confidence, "confidence")
  if n < 2:
    raise ValueError(f"a t interval needs n >= 2, got {n}")
  quantile = scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)
  return float(quantile * sd / math.sqrt(n))


def paired_difference(a, b, confidence: float = 0.95) -> dict:
  """Paired t interval and test of the mean per-seed difference d = a - b.

  mean = mean(d), sd = sd(d), half_width = t_{n-1}(1 - (1 - c)/2) * sd / sqrt(n),
  (low, high) = mean -/+ half_width; p_value is the two-sided paired t test of
  mean(d) = 0 (t = mean / (sd / sqrt(n)), scipy.stats.ttest_1samp on d), and
  excludes_zero says low > 0 or high < 0 (equivalently p_value < 1 - c).
  Identical differences (sd = 0) give half_width 0 and p_value 0 if mean != 0, else 1,
  without a warning. n < 2: sd, half_width, low, high and p_value are NaN and
  excludes_zero is False.

  Returns dict(mean, sd, n, half_width, low, high, p_value, excludes_zero).
  """
  _check_probability(confidence, "confidence")
  d = _differences(a, b)
  mean, sd = mean_sd(d)
  n = int(d.size)
  if n < 2:
    return {
      "mean": mean,
      "sd": sd,
      "n": n,
      "half_width": math.nan,
      "low": math.nan,
      "high": math.nan,
      "p_value": math.nan,
      "excludes_zero": False,
    }
  half_width = t_half_width(sd, n, confidence)
  if sd == 0.0:
    p_value = 0.0 if mean != 0.0 else 1.0
  else:
    p_value = float(scipy.stats.ttest_1samp(d, 0.0).pvalue)
  low, high = mean - half_width, mean + half_width
  return {
    "mean": mean,
    "sd": sd,
    "n": n,
    "half_width": half_width,
    "low": low,
    "high": high,
    "p_value": p_value,
    "excludes_zero": bool(low > 0.0 or high < 0.0),
  }


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[dict]:
  """Holm-Bonferroni step-down adjusted p-values (Holm 1979, Scand. J. Statist. 6:65-70).

  With the m finite p-values sorted, p_(1) <= ... <= p_(m),
  p_adj_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j)), and H_(i) is rejected iff
  p_adj_(i) <= alpha (the step-down rule at family-wise error rate alpha). Adjusted
  values keep the order of the raw ones and are >= them. A NaN p-value (a test that
  could not be run) is passed through as p_adjusted NaN, not rejected, and not counted
  in m. Returns one dict(p_adjusted, reject) per input, in input order.
  """
  _check_probability(alpha, "alpha")
  p = np.asarray(p_values, dtype=np.float64).reshape(-1)
  finite = ~np.isnan(p)
  if np.any((p[finite] < 0.0) | (p[finite] > 1.0)):
    raise ValueError(f"p-values must lie in [0, 1] or be NaN, got {p.tolist()}")
  adjusted = np.full(p.shape, np.nan)
  index = np.flatnonzero(finite)
  order = index[np.argsort(p[index], kind="stable")]
  m = order.size
  scaled = (m - np.arange(m)) * p[order]
  adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
  return [{"p_adjusted": float(q), "reject": bool(q <= alpha)} for q in adjusted]


def tost_paired(a, b, margin: float, alpha: float = 0.05) -> dict:
  """Paired two one-sided tests (TOST) of equivalence |mean(a - b)| < margin.

  Schuirmann (1987), J. Pharmacokinet. Biopharm. 15:657-680. With se = sd(d) / sqrt(n):
  p_lower tests H0 mean <= -margin by t = (mean + margin) / se (upper tail, n - 1 df),
  p_upper tests H0 mean >= +margin by t = (mean - margin) / se (lower tail), and
  p_value = max(p_lower, p_upper); equivalent = p_value < alpha. The same decision is
  the (1 - 2 alpha) interval mean -/+ t_{n-1}(1 - alpha) * se lying inside
  (-margin, margin); it is returned as (low, high). Identical differences (sd = 0):
  p-values 0 or 1 by which side of each bound the mean lies (1 on a bound), no warning.
  n < 2: sd, the p-values, low and high are NaN and equivalent is False.

  Returns dict(mean, sd, n, margin, p_lower, p_upper, p_value, low, high, equivalent).
  """
  if not margin > 0.0:
    raise ValueError(f"margin must be positive, got {margin}")
  if not 0.0 < alpha < 0.5:
    raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
  d = _differences(a, b)
  mean, sd = mean_sd(d)
  n = int(d.size)
  result = {"mean": mean, "sd": sd, "n": n, "margin": float(margin)}
  if n < 2:
    return result | {
      "p_lower": math.nan,
      "p_upper": math.nan,
      "p_value": math.nan,
      "low": math.nan,
      "high": math.nan,
      "equivalent": False,
    }
  if sd == 0.0:
    p_lower = 0.0 if mean > -margin else 1.0
    p_upper = 0.0 if mean < margin else 1.0
  else:
    p_lower = float(scipy.stats.ttest_1samp(d, -margin, alternative="greater").pvalue)
    p_upper = float(scipy.stats.ttest_1samp(d, margin, alternative="less").pvalue)
  half_width = t_half_width(sd, n, 1.0 - 2.0 * alpha)
  p_value = max(p_lower, p_upper)
  return result | {
    "p_lower": p_lower,
    "p_upper": p_upper,
    "p_value": p_value,
    "low": mean - half_width,
    "high": mean + half_width,
    "equivalent": bool(p_value < alpha),
  }


def seeds_needed(
  sd: float, target_half_width: float, confidence: float = 0.95, max_seeds: int = 10_000
) -> int:
  """Smallest n >= 2 with t_{n-1}(1 - (1 - c)/2) * sd / sqrt(n) <= target_half_width.

  sd is the (planned or pilot) sd of the paired per-seed differences; the half-width
  is `t_half_width`, strictly decreasing in n, so the first n that meets the target is
  the answer. sd = 0 gives 2 (a t interval needs two seeds). If no n <= max_seeds
  meets the target, max_seeds is returned: the caller can tell that case apart by
  checking t_half_width(sd, result, confidence) <= target_half_width. (Treating the
  pilot sd as the true sd is optimistic; see Lenth 2001, Am. Stat. 55:187-193.)
  """
  _check_probability(confidence, "confidence")
  if not (sd >= 0.0 and math.isfinite(sd)):
    raise ValueError(f"sd must be finite and >= 0, got {sd}")
  if not target_half_width > 0.0:
    raise ValueError(f"target_half_width must be positive, got {target_half_width}")
  if max_seeds < 2:
    raise ValueError(f"max_seeds must be >= 2, got {max_seeds}")
  if sd == 0.0:
    return 2
  n = np.arange(2, max_seeds + 1)
  half_widths = scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
  met = np.flatnonzero(half_widths <= target_half_width)
  return int(n[met[0]]) if met.size else int(max_seeds)


def _one_hot(labels: Sequence[Hashable]) -> np.ndarray:
  """Indicator columns, one per distinct label (the intercept makes one redundant;
  the rank below accounts for that, so no reference level has to be dropped)."""
  codes: dict = {}
  index = [codes.setdefault(label, len(codes)) for label in labels]
  return np.eye(len(codes))[index]


def _residual_ss(design: np.ndarray, y: np.ndarray) -> tuple[float, int]:
  """Residual sum of squares of the least-squares fit of y on `design`, and its rank."""
  beta = np.linalg.lstsq(design, y, rcond=None)[0]
  residual = y - design @ beta
  return float(residual @ residual), int(np.linalg.matrix_rank(design))


def interaction_test(values, factor_a, factor_b, block=None) -> dict:
  """Nested-model F test of the A x B interaction in a two-way layout.

  The additive model y ~ 1 + A + B [+ block] is compared with the model that adds the
  A x B cell indicators (Scheffe, The Analysis of Variance, 1959, Ch. 4; Searle,
  Linear Models for Unbalanced Data, 1987):
  F = ((RSS_add - RSS_full) / df_num) / (RSS_full / df_den), df_num = rank_full -
  rank_add, df_den = N - rank_full, p_value = P(F_{df_num, df_den} > F). Ranks of the
  design matrices give the degrees of freedom, so unbalanced layouts and empty cells
  are handled. `block` (e.g. the seed) adds block indicators to both models, so a
  seed effect shared by all configurations is removed from the error.
  If the full model fits exactly (RSS_full ~ 0 to rounding), F is inf and p 0 when
  the interaction explains something, and both are NaN when nothing varies.
  Raises ValueError if df_den <= 0 (no replication left for the error) or df_num = 0.

  Returns dict(F, df_num, df_den, p_value).
  """
  y = _vector(values, "values")
  factors = [("factor_a", factor_a), ("factor_b", factor_b)]
  factors += [("block", block)] if block is not None else []
  for name, labels in factors:
    if len(labels) != y.size:
      raise ValueError(f"{name} has {len(labels)} labels for {y.size} values")
  cells = list(zip(factor_a, factor_b, strict=True))
  additive = np.hstack([np.ones((y.size, 1))] + [_one_hot(labels) for _, labels in factors])
  full = np.hstack([additive, _one_hot(cells)])
  rss_add, rank_add = _residual_ss(additive, y)
  rss_full, rank_full = _residual_ss(full, y)
  df_num, df_den = rank_full - rank_add, y.size - rank_full
  if df_den <= 0:
    raise ValueError(
      f"no residual degrees of freedom (N = {y.size}, rank of the full model "
      f"= {rank_full}): the interaction needs replicates within cells or blocks"
    )
  if df_num <= 0:
    raise ValueError(
      "the interaction has no degrees of freedom: each factor needs two "
      "levels crossed in at least one 2 x 2 set of cells"
    )
  # Rounding leaves RSS ~ (eps * |y|)^2 * cond; below this floor it counts as zero.
  floor = (1e3 * np.finfo(np.float64).eps) ** 2 * float(y @ y) * y.size
  numerator = max(rss_add - rss_full, 0.0)
  if rss_full <= floor:
    exact = numerator <= floor
    return {
      "F": math.nan if exact else math.inf,
      "df_num": df_num,
      "df_den": df_den,
      "p_value": math.nan if exact else 0.0,
    }
  f_stat = (numerator / df_num) / (rss_full / df_den)
  return {
    "F": float(f_stat),
    "df_num": df_num,
    "df_den": df_den,
    "p_value": float(scipy.stats.f.sf(f_stat, df_num, df_den)),
  }


def _rank_rows(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Spearman rho of each column of x (labels x replicates) with `reference`: the Pearson
  correlation of average ranks (ties share the mean rank). NaN for a constant column."""
  rx = scipy.stats.rankdata(x, axis=0)
  rr = scipy.stats.rankdata(reference)
  rx = rx - rx.mean(axis=0)
  rr = rr - rr.mean()
  denominator = np.sqrt((rx**2).sum(axis=0) * (rr @ rr))
  with np.errstate(invalid="ignore", divide="ignore"):
    rho = np.where(denominator > 0, (rr @ rx) / denominator, np.nan)
  return np.clip(rho, -1.0, 1.0)  # rounding can step just past +-1


def spearman_bootstrap(
  per_seed: Mapping[Hashable, Sequence[float]],
  reference: Mapping[Hashable, float],
  n_boot: int = 2000,
  confidence: float = 0.95,
  seed: int = 0,
) -> dict:
  """Spearman rank correlation of per-label means over seeds with reference values.

  rho = scipy.stats.spearmanr(mean over seeds of per_seed[label], reference[label])
  over the labels present in both (Spearman 1904; ties get average ranks), with its
  p_value from spearmanr. The interval is a percentile bootstrap over seeds (Efron &
  Tibshirani 1993, Ch. 13): each replicate draws n_seeds seed indices with
  replacement, the same indices for every label, because runs are paired by seed and a
  seed's shared luck must move all labels together. Replicates whose resampled means
  are all tied (rho undefined) are left out. The percentile interval need not contain
  rho when the bootstrap distribution is skewed.
  NaN: rho, low, high and p_value for fewer than 3 shared labels or a constant side
  (rank correlation undefined); low and high for one seed (nothing to resample).
  Every shared label must have the same number of finite per-seed values.

  Returns dict(rho, low, high, n_labels, n_seeds, p_value).
  """
  _check_probability(confidence, "confidence")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  labels = [label for label in per_seed if label in reference]
  rows = [_vector(per_seed[label], f"per_seed[{label!r}]") for label in labels]
  lengths = {row.size for row in rows}
  if len(lengths) > 1 or 0 in lengths:
    raise ValueError(f"every label needs the same, nonzero number of seeds, got {lengths}")
  n_seeds = lengths.pop() if lengths else 0
  result = {
    "rho": math.nan,
    "low": math.nan,
    "high": math.nan,
    "n_labels": len(labels),
    "n_seeds": int(n_seeds),
    "p_value": math.nan,
  }
  if len(labels) < 3:
    return result
  values = np.stack(rows)
  ref = _vector([reference[label] for label in labels], "reference")
  if _is_constant(values.mean(axis=1)) or _is_constant(ref):
    return result
  rho, p_value = scipy.stats.spearmanr(values.mean(axis=1), ref)
  result |= {"rho": float(rho), "p_value": float(p_value)}
  if n_seeds < 2:
    return result
  index = np.random.default_rng(seed).integers(0, n_seeds, size=(n_boot, n_seeds))
  replicates = _rank_rows(values[:, index].mean(axis=2), ref)
  replicates = replicates[np.isfinite(replicates)]
  if replicates.size:
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    result |= {"low": float(low), "high": float(high)}
  return result


def verdict(
  low: float, high: float, *, expected_sign: int | None = None, equivalence: bool | None = None
) -> str:
  """Decide "reproduced", "contradicted" or "inconclusive" for one claim.

  (low, high) is a confidence interval of the paired difference a - b (e.g. from
  `paired_difference`); pass exactly one of:

  * expected_sign = +1 for the claim "a > b" (-1 for "a < b"): the interval entirely
    on the claimed side of 0 (sign * low > 0 and sign * high > 0) -> reproduced,
    entirely on the other side -> contradicted, touching or containing 0 -> inconclusive;
  * equivalence = the `tost_paired` decision, for the claim "no difference": True ->
    reproduced (even if the interval excludes 0: a difference inside the margin is
    no difference that matters); False and the interval excludes 0 (low > 0 or
    high < 0) -> contradicted; otherwise (the data cannot tell) -> inconclusive.

  A NaN bound (too few seeds) gives inconclusive unless equivalence is True.
  Raises ValueError for low > high or for both or neither of the keywords.
  """
  if (expected_sign is None) == (equivalence is None):
    raise ValueError("pass exactly one of expected_sign (+1 or -1) and equivalence")
  if expected_sign is not None and expected_sign not in (1, -1):
    raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign}")
  if low > high:
    raise ValueError(f"the interval must have low <= high, got ({low}, {high})")
  if equivalence:
    return REPRODUCED
  if math.isnan(low) or math.isnan(high):
    return INCONCLUSIVE
  if equivalence is not None:
    return CONTRADICTED if (low > 0.0 or high < 0.0) else INCONCLUSIVE
  # Flip the interval for a claim "a < b", so that "> 0" means "on the claimed side".
  if expected_sign == -1:
    low, high = -high, -low
  if low > 0.0:
    return REPRODUCED
  if high < 0.0:
    return CONTRADICTED
  return INCONCLUSIVE

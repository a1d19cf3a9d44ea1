"""Tests of examples/study/theory.py: the variance-shift closed forms (Li et al. 2019, Eqs. 8,
12, 15) by hand, and their Monte Carlo checks against the library's ops."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import models
from study import theory

# Large enough for 5-SE separations below, small enough that the module fixture takes seconds.
_N = 2**18


@pytest.fixture(scope="module")
def rows():
  return theory.run_theory_checks(seed=0, n=_N)


def _within(row, value, sigmas=5.0):
  return abs(value - row["measured"]) <= sigmas * row["se"]


def _find(rows, **fields):
  found = [r for r in rows if all(r.get(k, r["params"].get(k)) == v for k, v in fields.items())]
  assert found, fields
  return found


# --- closed forms by hand --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.9])
def test_toy_delta_equals_keep(keep):
  s2 = (1.0 - keep) / keep
  assert theory.shift_direct(s2, 0.0, 1.0) == pytest.approx(keep)
  assert theory.shift_dropout_eq8(keep, 0.0, 1.0) == pytest.approx(keep)


def test_eq8_is_the_generic_form_for_dropout():
  for keep in (0.3, 0.5, 0.8):
    for c, v in ((0.0, 1.0), (1.0, 0.5), (-2.0, 3.0)):
      rate = 1.0 - keep
      generic = theory.shift_direct(theory.noise_variance("dropout", rate), c, v)
      assert theory.shift_dropout_eq8(keep, c, v) == pytest.approx(generic)
  # Hand value: keep 0.5, c = 1, v = 0.5 gives 0.25 / 1.0.
  assert theory.shift_dropout_eq8(0.5, 1.0, 0.5) == pytest.approx(0.25)


def test_eq15_is_the_generic_form_for_uout():
  for beta in (0.1, 0.5, 1.0, math.sqrt(3)):
    for c, v in ((0.0, 1.0), (1.0, 0.5)):
      generic = theory.shift_direct(theory.noise_variance("uout", beta), c, v)
      assert theory.shift_uout_eq15(beta, c, v) == pytest.approx(generic)
  assert theory.shift_uout_eq15(1.0, 0.0, 1.0) == pytest.approx(0.75)


def test_eq12_reduces_to_case_a():
  s2, c, v = 1.0, 0.5, 1.0
  direct = theory.shift_direct(s2, c, v)
  for rho in (0.0, 0.3, 0.9):
    assert theory.shift_weighted(s2, c, v, rho, 1.0) == pytest.approx(direct)  # d = 1
  for dc2 in (0.0, 1.0, 200.0):
    assert theory.shift_weighted(s2, c, v, 0.0, dc2) == pytest.approx(direct)
  # Correlation with aligned weights pulls Delta towards 1; with d cos^2 < 1 below case (a).
  assert theory.shift_weighted(s2, c, v, 0.3, 200.0) > direct
  assert theory.shift_weighted(s2, c, v, 0.3, 0.0) < direct


def test_linear_exact_equals_weighted_for_homogeneous_units():
  rng = np.random.default_rng(1)
  for d, rho in ((1, 0.0), (16, 0.3), (64, 0.7)):
    c, v, s2 = 0.5, 2.0, 0.7
    cov = v * ((1.0 - rho) * np.eye(d) + rho * np.ones((d, d)))
    w = rng.normal(size=d)
    exact = theory.shift_linear_exact(s2, np.full(d, c), cov, w)
    rho_hat = theory.mean_correlation(cov)
    assert rho_hat == pytest.approx(rho if d > 1 else 0.0)
    assert exact == pytest.approx(theory.shift_weighted(s2, c, v, rho_hat, theory.d_cos2(w)))


def test_linear_exact_heterogeneous_by_hand():
  # Var_eval = 1 + 4 = 5; noise adds s2 * (1 * (1 + 1) + 1 * (4 + 4)) = 0.5 * 10.
  value = theory.shift_linear_exact(0.5, [1.0, 2.0], np.diag([1.0, 4.0]), [1.0, 1.0])
  assert value == pytest.approx(5.0 / 10.0)


def test_d_cos2_and_mean_correlation():
  for d in (1, 16, 256):
    assert theory.d_cos2(np.ones(d)) == pytest.approx(d)
  assert theory.d_cos2([1.0, -1.0, 2.0, -2.0]) == pytest.approx(0.0)
  assert theory.mean_correlation(np.eye(5)) == 0.0
  assert theory.mean_correlation([[4.0]]) == 0.0


def test_noise_variance_and_sign_flips():
  for op in theory.OPS:
    for s2 in (1 / 300, 1 / 3, 1.0):
      strength = models.value_for_variance(op, s2)
      assert models.noise_variance(op, strength) == pytest.approx(s2)
  with pytest.raises(ValueError, match="s2"):
    models.value_for_variance("dropout", -0.1)
  root3 = math.sqrt(3)
  assert theory.sign_flip_fraction(root3) == pytest.approx((root3 - 1) / (2 * root3))
  assert theory.sign_flip_fraction(math.sqrt(3)) == pytest.approx(0.2113, abs=1e-4)
  assert theory.sign_flip_fraction(1.0) == 0.0


def test_relu_moments():
  z = np.random.default_rng(0).normal(size=2**20)
  c, v = theory.relu_moments()
  assert c == pytest.approx(np.maximum(z, 0).mean(), abs=3e-3)
  assert v == pytest.approx(np.maximum(z, 0).var(), abs=3e-3)


def test_small_n_is_refused():
  with pytest.raises(ValueError):
    theory.run_theory_checks(n=100)


# --- Monte Carlo rows ------------------------------------------------------------------------


def test_every_closed_form_row_agrees(rows):
  checked = [r for r in rows if r["predicted"] is not None]
  assert len(checked) >= 30
  for row in checked:
    assert row["se"] >= 0.0 and row["ci_low"] <= row["measured"] <= row["ci_high"]
    assert row["agrees"] is True, row
    assert _within(row, row["predicted"])


def test_wrong_formulas_would_not_agree(rows):
  eq8 = _find(rows, check="Eq. 8 case (a)", rate=0.5, c=2.0)[0]
  # Dropping the mean's c**2 term (noise acting on the variance only) misses Eq. 8,
  assert not _within(eq8, theory.shift_direct(1.0, 0.0, 1.0))
  # so does c in place of c**2,
  assert not _within(eq8, 0.5 * 1.0 / (1.0 + 0.5 * 2.0))
  # and the toy answer Delta = keep once c != 0.
  assert not _within(eq8, 0.5)
  # Ignoring correlation (case (a) in place of Eq. 12) fails for correlated, aligned weights.
  for row in _find(rows, check="Eq. 12 case (b)", rho=0.3, weights="positive", d=256):
    assert not _within(row, theory.shift_direct(row["s2"], row["params"]["c"], 1.0))
  # Uout's variance is beta**2 / 3, not beta**2.
  uout = _find(rows, check="Eq. 15 Uout", beta=1.0, quantity="Delta")[0]
  assert not _within(uout, theory.shift_direct(1.0, 2.0, 1.0))


def test_case_b_grid(rows):
  case_b = _find(rows, check="Eq. 12 case (b)")
  params = [r["params"] for r in case_b]
  assert {p["d"] for p in params} == {1, 16, 256}
  assert {p["rho"] for p in params} == {0.0, 0.3}
  assert all(p["c"] != 0 for p in params)
  big = [p for p in params if p["d"] > 1]
  assert any(p["d_cos2"] < 1.0 for p in big)
  assert any(p["d_cos2"] > 0.5 * p["d"] for p in big)


def test_pooled_mean_inflation_dropout_differs_from_gaussian(rows):
  def inflation(op):
    return _find(rows, check="pooled path", op=op, s2=1.0, quantity="mean inflation")[0]

  drop, gauss = inflation("dropout"), inflation("gaussian")
  assert drop["predicted"] is None and drop["agrees"] is None and drop["linear"] == 1.0
  gap = abs(drop["measured"] - gauss["measured"])
  assert gap > 5.0 * math.hypot(drop["se"], gauss["se"])
  for op in theory.OPS:
    assert inflation(op)["measured"] > 1.0  # max-pool keeps the noise's upward excursions


def test_pooled_delta_below_linear_prediction(rows):
  for row in _find(rows, check="pooled path", quantity="Delta"):
    assert row["measured"] < row["linear"]


def test_uout_sign_flips_binomial(rows):
  beta = math.sqrt(3)
  row = _find(rows, check="Eq. 15 Uout", quantity="sign flips", beta=beta)[0]
  p = (beta - 1) / (2 * beta)
  binomial_se = math.sqrt(p * (1 - p) / row["samples"])
  assert abs(row["measured"] - p) <= 5.0 * binomial_se
  assert row["extension"] is True
  assert _find(rows, check="Eq. 15 Uout", quantity="sign flips", beta=1.0)[0]["measured"] == 0.0


def test_extension_marks_exactly_uout_beyond_one(rows):
  for row in rows:
    beta = row["params"].get("beta")
    assert row["extension"] == (row["op"] == "uout" and beta > 1.0)
  assert any(row["extension"] for row in rows)


def test_rows_are_json_and_finite(rows):
  keys = {
    "check",
    "op",
    "s2",
    "params",
    "quantity",
    "predicted",
    "measured",
    "ci_low",
    "ci_high",
    "agrees",
    "extension",
  }
  for row in rows:
    assert keys <= set(row)
    for name in ("s2", "measured", "ci_low", "ci_high"):
      assert type(row[name]) is float and math.isfinite(row[name])
  assert json.loads(json.dumps(rows)) == rows


def test_format_theory(rows):
  text = theory.format_theory(rows)
  lines = text.splitlines()
  assert len(lines) == len(rows) + 2
  assert "predicted" in lines[0] and "95 % interval" in lines[0]
  for name in ("Eq. 8 case (a)", "Eq. 12 case (b)", "Eq. 15 Uout", "pooled path"):
    assert name in text
  assert "beyond the published beta <= 1" in text
  assert "nan" not in text.lower()

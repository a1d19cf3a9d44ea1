"""Theory checks: the variance-shift closed forms against Monte Carlo of the library's ops.

Li, Chen, Hu, Yang, "Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift" (arXiv:1801.05134, CVPR 2019). Multiplicative
noise of mean 1 and variance ``s2`` (dropout and Gaussian dropout at rate ``q``:
``s2 = q / (1 - q)``; Uout ``x * (1 + r)``, ``r ~ U(-beta, beta)``: ``s2 = beta**2 / 3``)
makes a BatchNorm see a train-time variance that eval never reproduces. The
shift ratio is the paper's ``Delta = Var_eval / Var_train`` of the BN input
(``< 1`` when the noise inflates the train-time variance):

* case (a), noise straight into BN, unit of mean ``c``, variance ``v``:
  ``Delta = v / (v + s2 * (c**2 + v))`` (the paper's Eq. 8 for dropout, Eq. 15 for Uout);
* case (b), noise on ``d`` units (common ``c``, ``v``, pairwise correlation ``rho``),
  then a weight vector ``w``, then BN (the paper's Eq. 12), with
  ``d cos^2(theta) = (sum w)**2 / ||w||**2``:
  ``Delta = v (1 + rho (d cos^2 - 1)) / (v + s2 (c**2 + v) + rho v (d cos^2 - 1))``;
* the pooled path of the study's CNN (ReLU -> noise -> max-pool(2)), which has no
  closed form: measured only, next to the linear prediction of case (a).

Every measured quantity comes from ``_BATCHES`` independent batches of one
jitted Monte Carlo (float32, the ops in train mode with explicit keys): the
estimate pools all batches, its standard error is the delete-one-batch
jackknife, and the 95 % interval is ``estimate +- t_{0.975, B-1} * SE``.
Verdict rule: ``agrees`` is True when ``|predicted - measured| <= 5 * SE``
(the measured interval widened to 5 standard errors); it is None where there
is no closed form.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from models import noise_variance, value_for_variance

import regjax
from study.configs import METHODS

__all__ = [
  "OPS",
  "d_cos2",
  "format_theory",
  "mean_correlation",
  "relu_moments",
  "run_theory_checks",
  "shift_direct",
  "shift_dropout_eq8",
  "shift_linear_exact",
  "shift_uout_eq15",
  "shift_weighted",
  "sign_flip_fraction",
]

OPS = METHODS  # the ops the study compares, in its order
_BATCHES = 32
_TOLERANCE_SE = 5.0
# Case (b) draws rows * d noise values; capping that at this many times n keeps d = 256
# affordable, and the pooled ratio's O(1 / rows) bias (16384 rows at n = 2**20) far below its SE.
_WEIGHTED_ELEMENTS = 4


# --- closed forms (pure NumPy, reused by the width experiment) -------------------------------


def shift_direct(s2, c, v):
  """Case (a) shift ratio ``Delta = v / (v + s2 (c**2 + v))`` (Li et al. 2019, Eqs. 8, 15)."""
  return v / (v + s2 * (c**2 + v))


def shift_dropout_eq8(keep, c, v):
  """Dropout with keep probability ``p``: ``p v / (v + (1 - p) c**2)`` (Li et al. 2019, Eq. 8)."""
  return keep * v / (v + (1.0 - keep) * c**2)


def shift_uout_eq15(beta, c, v):
  """Uout of half-width ``beta``: ``3 v / (3 v + beta**2 (c**2 + v))`` (Li et al. 2019, Eq. 15)."""
  return 3.0 * v / (3.0 * v + beta**2 * (c**2 + v))


def d_cos2(w) -> float:
  """``d cos^2(theta) = (sum w)**2 / ||w||**2``, theta the angle between ``w`` and all-ones."""
  w = np.asarray(w, dtype=np.float64)
  return float(np.sum(w) ** 2 / np.sum(w**2))


def shift_weighted(s2, c, v, rho, d_cos2):
  """Case (b) shift ratio (Li et al. 2019, Eq. 12), noise on ``d`` units then ``w`` then BN.

  ``Delta = v (1 + rho (d cos^2 - 1)) / (v + s2 (c**2 + v) + rho v (d cos^2 - 1))``, from
  ``sum_{i != j} w_i w_j = ||w||**2 (d cos^2 - 1)`` for units of common mean ``c``,
  variance ``v``, pairwise correlation ``rho`` and independent noise per unit.
  """
  cross = rho * v * (d_cos2 - 1.0)
  return (v + cross) / (v + s2 * (c**2 + v) + cross)


def shift_linear_exact(s2, means, cov, w):
  """Exact linear shift ratio for any unit means ``c_i``, covariance ``Sigma`` and ``w``.

  ``Var_eval = w^T Sigma w`` and ``Var_train = w^T Sigma w + s2 sum_i w_i**2 (c_i**2 +
  Sigma_ii)`` (independent mean-1 noise per unit; the heterogeneous form of Eq. 12).
  """
  means, cov, w = (np.asarray(a, dtype=np.float64) for a in (means, cov, w))
  var_eval = w @ cov @ w
  return float(var_eval / (var_eval + s2 * np.sum(w**2 * (means**2 + np.diag(cov)))))


def mean_correlation(cov) -> float:
  """Mean off-diagonal correlation ``rho`` of a covariance matrix (0 for a single unit)."""
  cov = np.asarray(cov, dtype=np.float64)
  d = cov.shape[0]
  if d < 2:
    return 0.0
  scale = np.sqrt(np.diag(cov))
  corr = cov / np.outer(scale, scale)
  return float((np.sum(corr) - np.trace(corr)) / (d * (d - 1)))


def sign_flip_fraction(beta) -> float:
  """Fraction of units Uout negates: ``P(1 + r < 0) = max(beta - 1, 0) / (2 beta)``."""
  return float(max(beta - 1.0, 0.0) / (2.0 * beta))


def relu_moments() -> tuple[float, float]:
  """Mean and variance of ``relu(z)``, ``z ~ N(0, 1)``: ``1 / sqrt(2 pi)``, ``1/2 - 1/(2 pi)``."""
  return 1.0 / math.sqrt(2.0 * math.pi), 0.5 - 1.0 / (2.0 * math.pi)


def _gaussian_flip_fraction(s2) -> float:
  """Fraction Gaussian dropout negates: ``P(1 + sqrt(s2) e < 0) = Phi(-1 / sqrt(s2))``."""
  return float(scipy.stats.norm.cdf(-1.0 / math.sqrt(s2)))


# --- Monte Carlo (jitted, one lax.map over the batches) ------------------------------------------


def _noisy(op, x, strength, key):
  """The library op ``op`` in train mode with an explicit key."""
  if op == "dropout":
    return regjax.dropout(x, strength, key=key, deterministic=False)
  if op == "gaussian":
    return regjax.gaussian_dropout(x, strength, key=key, deterministic=False)
  return regjax.uout(x, strength, key=key, deterministic=False)


def _noisy_any(op_index, x, strength, key):
  """``_noisy`` with the op as a traced index: one compile serves all three ops."""
  branches = [functools.partial(_noisy, op) for op in OPS]
  return jax.lax.switch(op_index, branches, x, strength, key)


def _moments(a):
  """Batch mean and (two-pass, so float32 keeps its digits) biased variance."""
  mean = jnp.mean(a)
  return mean, jnp.mean(jnp.square(a - mean))


def _over_batches(summary, key):
  return jax.lax.map(summary, jax.random.split(key, _BATCHES))


@functools.partial(jax.jit, static_argnames=("rows",))
def _weighted_batches(key, op_index, strength, c, v, rho, w, *, rows):
  """Per batch: moments of ``w . x`` and ``w . op(x)``, and how often their signs differ.

  Units are equicorrelated at ``rho``; case (a) is the ``d = 1``, ``w = (1,)`` instance.
  """

  def summary(k):
    kc, kx, kn = jax.random.split(k, 3)
    common = jax.random.normal(kc, (rows, 1), jnp.float32)
    own = jax.random.normal(kx, (rows, w.shape[0]), jnp.float32)
    x = c + jnp.sqrt(v) * (jnp.sqrt(rho) * common + jnp.sqrt(1.0 - rho) * own)
    clean, noisy = x @ w, _noisy_any(op_index, x, strength, kn) @ w
    flips = jnp.mean((clean * noisy < 0).astype(jnp.float32))
    return jnp.stack([*_moments(clean), *_moments(noisy), flips])

  return _over_batches(summary, key)


@functools.partial(jax.jit, static_argnames=("rows",))
def _pooled_batches(key, op_index, strength, *, rows):
  """Per batch: moments of ``relu(z)`` and its noisy version, before and after max-pool(2)."""

  def summary(k):
    kz, kn = jax.random.split(k)
    u = jax.nn.relu(jax.random.normal(kz, (rows, 2), jnp.float32))
    noisy = _noisy_any(op_index, u, strength, kn)
    stats = [_moments(u), _moments(noisy), _moments(u.max(1)), _moments(noisy.max(1))]
    return jnp.stack([s for pair in stats for s in pair])

  return _over_batches(summary, key)


# --- batch statistics (float64) ------------------------------------------------------------------


def _pooled(mean_var):
  """Mean and variance of equal-sized batches from their ``(mean, var)`` columns."""
  means, variances = mean_var[:, 0], mean_var[:, 1]
  return means.mean(), variances.mean() + np.mean((means - means.mean()) ** 2)


def _ratio_of_variances(batches, eval_col, train_col):
  """Pooled ``Var_eval / Var_train`` from the ``(mean, var)`` column pairs at the two offsets."""
  var_eval = _pooled(batches[:, eval_col : eval_col + 2])[1]
  return var_eval / _pooled(batches[:, train_col : train_col + 2])[1]


def _ratio_of_means(batches, num_col, den_col):
  return batches[:, num_col].mean() / batches[:, den_col].mean()


def _jackknife(statistic, batches):
  """Full-sample estimate and delete-one-batch jackknife standard error."""
  b = batches.shape[0]
  estimate = float(statistic(batches))
  leave_out = np.array([statistic(np.delete(batches, i, axis=0)) for i in range(b)])
  se = math.sqrt((b - 1) / b * np.sum((leave_out - leave_out.mean()) ** 2))
  return estimate, se


def _row(
  check, op, s2, params, quantity, predicted, estimate_se, samples, extension=False, **extra
):
  """One result row: the 95 % t interval and the 5-SE verdict of the module docstring.

  ``samples`` counts the values the statistic was measured on (all batches together).
  """
  estimate, se = estimate_se
  half = float(scipy.stats.t.ppf(0.975, _BATCHES - 1)) * se
  agrees = None if predicted is None else bool(abs(predicted - estimate) <= _TOLERANCE_SE * se)
  return {
    "check": check,
    "op": op,
    "s2": float(s2),
    "params": params,
    "quantity": quantity,
    "predicted": None if predicted is None else float(predicted),
    "measured": estimate,
    "se": float(se),
    "ci_low": estimate - half,
    "ci_high": estimate + half,
    "agrees": agrees,
    "samples": int(samples),
    "extension": bool(extension),
    **extra,
  }


# --- the checks ----------------------------------------------------------------------------------


def _direct_prediction(op, strength, c, v):
  """Each op's own closed form: Eq. 8 (dropout), Eq. 15 (Uout), the generic case (a) otherwise."""
  if op == "dropout":
    return shift_dropout_eq8(1.0 - strength, c, v)
  if op == "uout":
    return shift_uout_eq15(strength, c, v)
  return shift_direct(noise_variance(op, strength), c, v)


def _direct_rows(key, n, check, op, strength, c, v):
  """Case (a) at one setting: Delta, plus the sign-flip fraction for the sign-changing ops."""
  s2 = noise_variance(op, strength)
  rows_per_batch = n // _BATCHES
  batches = np.asarray(
    _weighted_batches(key, OPS.index(op), strength, c, v, 0.0, jnp.ones(1), rows=rows_per_batch),
    np.float64,
  )
  samples = rows_per_batch * _BATCHES
  params = {"c": c, "v": v, ("beta" if op == "uout" else "rate"): strength}
  extension = op == "uout" and strength > 1.0
  delta = _jackknife(lambda b: _ratio_of_variances(b, 0, 2), batches)
  predicted = _direct_prediction(op, strength, c, v)
  rows = [_row(check, op, s2, params, "Delta", predicted, delta, samples, extension)]
  if op != "dropout":
    flips = sign_flip_fraction(strength) if op == "uout" else _gaussian_flip_fraction(s2)
    measured = _jackknife(lambda b: b[:, 4].mean(), batches)
    rows.append(_row(check, op, s2, params, "sign flips", flips, measured, samples, extension))
  return rows


def _case_a_rows(key, n):
  settings = [
    ("Eq. 8 case (a)", "dropout", q, c, v) for q in (0.25, 0.5) for c, v in ((0.0, 1.0), (2.0, 1.0))
  ]
  settings += [("case (a) Gaussian", "gaussian", q, 2.0, 1.0) for q in (0.25, 0.5)]
  settings += [("Eq. 15 Uout", "uout", beta, 2.0, 1.0) for beta in (0.1, 0.5, 1.0, math.sqrt(3))]
  keys = jax.random.split(key, len(settings))
  return [row for k, s in zip(keys, settings, strict=True) for row in _direct_rows(k, n, *s)]


def _weights(rng, d, kind):
  """Magnitudes U(0.5, 1.5); balanced random signs make ``d cos^2`` small, all-positive large."""
  w = rng.uniform(0.5, 1.5, d)
  if kind == "random signs" and d > 1:
    w *= rng.permutation(np.resize([1.0, -1.0], d))
  return w


def _case_b_rows(key, n, rng):
  c, v = 0.5, 1.0
  settings = [
    (op, strength, d, rho, kind)
    for op, strength in (("dropout", 0.5), ("uout", 1.0))
    for d in (1, 16, 256)
    for rho in (0.0, 0.3)
    for kind in (("positive",) if d == 1 else ("random signs", "positive"))
  ]
  keys = jax.random.split(key, len(settings))
  return [
    _weighted_row(k, n, rng, c, v, *setting) for k, setting in zip(keys, settings, strict=True)
  ]


def _weighted_row(key, n, rng, c, v, op, strength, d, rho, kind):
  """Case (b) at one setting: Delta of ``w . x`` measured against Eq. 12."""
  w = _weights(rng, d, kind)
  s2, dc2 = noise_variance(op, strength), d_cos2(w)
  per_batch = min(n, _WEIGHTED_ELEMENTS * n // d) // _BATCHES
  w32 = jnp.asarray(w, jnp.float32)
  batches = np.asarray(
    _weighted_batches(key, OPS.index(op), strength, c, v, rho, w32, rows=per_batch), np.float64
  )
  params = {
    "c": c,
    "v": v,
    "rho": rho,
    "d": d,
    "d_cos2": dc2,
    "weights": kind,
    ("beta" if op == "uout" else "rate"): strength,
  }
  delta = _jackknife(lambda b: _ratio_of_variances(b, 0, 2), batches)
  return _row(
    "Eq. 12 case (b)",
    op,
    s2,
    params,
    "Delta",
    shift_weighted(s2, c, v, rho, dc2),
    delta,
    per_batch * _BATCHES,
  )


def _pooled_rows(key, n):
  """ReLU -> noise -> max-pool(2) for every op at ``s2`` in {1/3, 1}."""
  settings = [(op, s2) for s2 in (1.0 / 3.0, 1.0) for op in OPS]
  keys = jax.random.split(key, len(settings))
  return [
    row
    for k, (op, s2) in zip(keys, settings, strict=True)
    for row in _pooled_setting_rows(k, n, op, s2)
  ]


def _pooled_setting_rows(key, n, op, s2):
  """Pooled mean inflation and Delta (no closed form; ``linear`` is case (a)), no-pool Delta."""
  c, v = relu_moments()
  strength = value_for_variance(op, s2)
  extension = op == "uout" and strength > 1.0
  per_batch = n // (2 * _BATCHES)
  batches = np.asarray(_pooled_batches(key, OPS.index(op), strength, rows=per_batch), np.float64)
  pooled = per_batch * _BATCHES
  params = {"c": c, "v": v, ("beta" if op == "uout" else "rate"): strength, "pool": 2}
  linear = shift_direct(s2, c, v)
  return [
    _row(
      "relu case (a)",
      op,
      s2,
      params,
      "Delta",
      linear,
      _jackknife(lambda b: _ratio_of_variances(b, 0, 2), batches),
      2 * pooled,
      extension,
    ),
    _row(
      "pooled path",
      op,
      s2,
      params,
      "mean inflation",
      None,
      _jackknife(lambda b: _ratio_of_means(b, 6, 4), batches),
      pooled,
      extension,
      linear=1.0,
    ),
    _row(
      "pooled path",
      op,
      s2,
      params,
      "Delta",
      None,
      _jackknife(lambda b: _ratio_of_variances(b, 4, 6), batches),
      pooled,
      extension,
      linear=linear,
    ),
  ]


def run_theory_checks(seed: int = 0, n: int = 2**20) -> list[dict]:
  """All checks: case (a) (Eqs. 8, 15), case (b) (Eq. 12), and the pooled path.

  ``n`` is the number of samples per check (case (b): ``min(n, 4 n / d)`` rows of ``d``
  units; the pooled path: ``n / 2`` windows of 2 units), split into 32 batches.

  Each row is a JSON-serialisable dict: ``check``, ``op``, ``s2``, ``params``, ``quantity``
  ("Delta", "sign flips", "mean inflation"), ``predicted`` (None without a closed form),
  ``measured``, ``se``, ``ci_low``, ``ci_high`` (95 %), ``agrees`` (``|predicted - measured|
  <= 5 se``; None without a closed form), ``samples``, ``extension`` (Uout with ``beta > 1``,
  beyond the published ``beta <= 1``) and, on pooled-path rows, ``linear`` (the no-pool value).
  """
  if n < 64 * _BATCHES:
    raise ValueError(f"n must be at least {64 * _BATCHES}; got {n}.")
  key_a, key_b, key_p = jax.random.split(jax.random.key(seed), 3)
  rng = np.random.default_rng(seed)
  return _case_a_rows(key_a, n) + _case_b_rows(key_b, n, rng) + _pooled_rows(key_p, n)


# --- report --------------------------------------------------------------------------------------

_HEADER = (
  "check",
  "op",
  "s2",
  "params",
  "quantity",
  "predicted",
  "measured [95 % interval]",
  "agrees",
  "note",
)
_WIDTHS = (18, 8, 8, 58, 14, 9, 30, 6, 0)
_PARAM_ORDER = ("rate", "beta", "c", "v", "d", "rho", "d_cos2", "weights", "pool")


def _format_params(params):
  shown = {
    "c": "c",
    "v": "v",
    "d": "d",
    "rho": "rho",
    "d_cos2": "dcos2",
    "rate": "q",
    "beta": "beta",
    "weights": "w",
    "pool": "pool",
  }
  parts = []
  for name in _PARAM_ORDER:
    if name in params:
      value = params[name]
      parts.append(f"{shown[name]}={value if isinstance(value, str) else f'{value:.4g}'}")
  return " ".join(parts)


def _format_row(row):
  predicted = "-" if row["predicted"] is None else f"{row['predicted']:.5f}"
  interval = f"{row['measured']:.5f} [{row['ci_low']:.5f}, {row['ci_high']:.5f}]"
  agrees = {None: "-", True: "yes", False: "NO"}[row["agrees"]]
  notes = []
  if "linear" in row:
    notes.append(f"linear {row['linear']:.5f}")
  if row["extension"]:
    notes.append("extension: beyond the published beta <= 1")
  cells = (
    row["check"],
    row["op"],
    f"{row['s2']:.4g}",
    _format_params(row["params"]),
    row["quantity"],
    predicted,
    interval,
    agrees,
    "; ".join(notes),
  )
  return _join(cells)


def _join(cells):
  return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, _WIDTHS, strict=False)).rstrip()


def format_theory(rows) -> str:
  """Fixed-width table, predicted vs measured [95 % interval], with a header and a legend."""
  legend = (
    f"Delta = Var_eval / Var_train of the BN input; interval: 95 % t over {_BATCHES} "
    f"batches (jackknife SE); agrees: |predicted - measured| <= {_TOLERANCE_SE:g} SE; "
    "linear: case (a) prediction without the pool."
  )
  return "\n".join([_join(_HEADER), *(_format_row(row) for row in rows), legend])


if __name__ == "__main__":
  start = time.perf_counter()
  results = run_theory_checks()
  print(format_theory(results))
  print(f"{len(results)} rows in {time.perf_counter() - start:.1f} s")

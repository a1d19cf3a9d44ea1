"""The study's experiments: which runs each trains and what it computes from them.

Each ``run_<name>(ctx)`` returns ``{'rows': [...], 'contrasts': [...], 'claims': [...],
'text': str, ...}``; rows are per-run measurements (runner.measure), contrasts
paired differences over seeds (stats.paired_difference), claims the lines of
claims.md (claims.Claim).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import models
import numpy as np

import regjax
from regjax import diagnostics
from study import measure_more, stats, theory
from study.claims import Claim, from_difference
from study.configs import (
  CUSTOMARY,
  MATCHED_S2,
  METHODS,
  PLACEMENT_NAMES,
  Config,
  at_variance,
  baseline,
  customary,
)
from study.runner import Settings, Trained, build_model, eval_fns, eval_model, measure, train_group

POINTS = 100.0  # accuracies are fractions; contrasts are reported in points


@dataclasses.dataclass
class Context:
  """What every experiment needs: data, seeds, settings, progress and options."""

  data: dict
  seeds: Sequence[int]
  settings: Settings
  progress: Any  # tqdm-like: .update(n), .set_postfix_str(s), .total
  margin: float = 0.01  # equivalence margin (accuracy fraction) for TOST
  target_half_width: float = 0.02
  shift_batches: list = dataclasses.field(default_factory=list)
  # (config label, seed) -> (Trained, run index, data, settings), for later experiments
  trained: dict = dataclasses.field(default_factory=dict)

  def train(self, configs: Sequence[Config], data=None, settings=None, seeds=None):
    """Trains and measures every config (grouped by Config.group_key) and returns rows."""
    data, settings = data or self.data, settings or self.settings
    seeds = list(self.seeds if seeds is None else seeds)
    groups: dict[tuple, list[Config]] = {}
    for c in configs:
      groups.setdefault(c.group_key(), []).append(c)
    rows = []
    for group in groups.values():
      self.progress.set_postfix_str(group[0].label)
      trained = train_group(group, seeds, data, settings, self.progress.update)
      batches = self.shift_batches if data is self.data else _shift_batches(data)
      rows += measure(trained, data, settings, batches)
      for r, (config, seed) in enumerate(trained.runs):
        self.trained[(config.label, seed)] = (trained, r, data, settings)
    return rows


def _shift_batches(data, size: int = 1000) -> list:
  n = len(data["x_train"])
  return [data["x_train"][i : i + size] for i in range(0, n, size)]


# ----------------------------------------------------------------------------- helpers


def by_seed(rows, label: str, metric: str = "test_acc") -> dict[int, float]:
  return {r["seed"]: r[metric] for r in rows if r["config"] == label}


def contrast(
  rows, a: str, b: str, name: str, metric: str = "test_acc", family: str = "", rows_b=None
) -> dict:
  """Paired difference a - b over the seeds both have, in ``metric``."""
  va, vb = by_seed(rows, a, metric), by_seed(rows if rows_b is None else rows_b, b, metric)
  seeds = sorted(set(va) & set(vb))
  out = stats.paired_difference([va[s] for s in seeds], [vb[s] for s in seeds])
  return {
    "name": name,
    "a": a,
    "b": b,
    "metric": metric,
    "family": family,
    **out,
    "seeds_for_target": None,
  }


def adjust(contrasts: list[dict], target: float) -> list[dict]:
  """Holm-adjusts a family of contrasts and adds the seeds each needs for +-target."""
  adjusted = stats.holm([c["p_value"] for c in contrasts])
  for c, a in zip(contrasts, adjusted, strict=True):
    c["p_holm"], c["reject_holm"] = a["p_adjusted"], a["reject"]
    if c["n"] >= 2 and not math.isnan(c["sd"]):
      c["seeds_for_target"] = stats.seeds_needed(c["sd"], target)
  return contrasts


def summarize(rows) -> list[dict]:
  """Mean and sd over seeds per config, with the layer summaries averaged."""
  out: dict[str, dict] = {}
  for r in rows:
    out.setdefault(r["config"], {"rows": []})["rows"].append(r)
  summary = []
  for entry in out.values():
    rs = entry["rows"]
    item = {
      k: rs[0][k]
      for k in ("config", "method", "placement", "value", "s2", "order", "tag", "extension")
    }
    item["seeds"] = [r["seed"] for r in rs]
    for key in ("test_acc", "test_loss", "train_acc", "recal_test_acc"):
      item[key], item[key + "_sd"] = stats.mean_sd([r[key] for r in rs])
    layers = list(rs[0]["layers"])
    item["layers"] = {
      p: {k: float(np.mean([r["layers"][p][k] for r in rs])) for k in rs[0]["layers"][p]}
      for p in layers
    }
    for k in ("shift", "paper_shift", "mean_offset"):
      item[k] = float(np.mean([item["layers"][p][k] for p in layers]))
    summary.append(item)
  return summary


def _pct(m, s=float("nan")) -> str:
  return f"{POINTS * m:5.1f}" + (f" ± {POINTS * s:3.1f}" if not math.isnan(s) else "")


def format_summary(summary) -> str:
  width = max(30, *(len(e["config"]) for e in summary))
  head = (
    f"{'configuration':{width}s} {'s2':>6s} {'test acc %':>12s} {'train acc %':>11s} "
    f"{'recal. %':>12s} {'shift':>6s} {'paper':>6s} {'mean off.':>9s}"
  )
  lines = [head, "-" * len(head)]
  for e in summary:
    lines.append(
      f"{e['config']:{width}s} {e['s2']:6.3f} {_pct(e['test_acc'], e['test_acc_sd']):>12s} "
      f"{_pct(e['train_acc']):>11s} {_pct(e['recal_test_acc'], e['recal_test_acc_sd']):>12s} "
      f"{e['shift']:6.3f} {e['paper_shift']:6.3f} {e['mean_offset']:9.3f}"
      + ("  (beta > 1: extension)" if e["extension"] else "")
    )
  lines.append(
    "mean ± sd over seeds. shift: mean over BN layers of the per-channel "
    "max(real/moving, moving/real); paper: the same of the ratio of channel-mean "
    "variances; mean off.: mean |moving - real mean| / real sd."
  )
  return "\n".join(lines)


def precision_note(contrasts, target: float) -> str:
  """How many contrasts miss the target half-width, and the seeds the widest would need."""
  wide = [c for c in contrasts if not math.isnan(c["half_width"]) and c["half_width"] > target]
  if not wide:
    return f"Every interval is within ±{POINTS * target:.1f} points."
  worst = max(wide, key=lambda c: c["half_width"])
  return (
    f"{len(wide)} of {len(contrasts)} intervals are wider than ±{POINTS * target:.1f} "
    f"points; the widest (±{POINTS * worst['half_width']:.1f}, {worst['name']}) would "
    f"need about {worst['seeds_for_target']} seeds."
  )


def format_contrasts(contrasts, title: str) -> str:
  lines = [title]
  width = max(len(c["name"]) for c in contrasts)
  for c in contrasts:
    ci = (
      f"[{POINTS * c['low']:+6.1f}, {POINTS * c['high']:+6.1f}]"
      if not math.isnan(c["low"])
      else "[n/a]"
    )
    need = c.get("seeds_for_target")
    lines.append(
      f"  {c['name']:{width}s} {POINTS * c['mean']:+6.1f} {ci:>17s}  "
      f"p_holm={c.get('p_holm', float('nan')):.3g}"
      + ("" if need is None else f"  seeds for ±target: {need}")
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------- headline


def headline_configs() -> list[Config]:
  """No noise; each op at its customary setting and at matched s2 = 1/3, before
  the BNs (the default block, noise -> pool -> conv -> BN) and after the last BN."""
  configs = [baseline()]
  for placement in ("pooled", "head"):
    for method in METHODS:
      configs.append(customary(method, placement))
      if not math.isclose(models.noise_variance(method, CUSTOMARY[method]), MATCHED_S2):
        configs.append(at_variance(method, MATCHED_S2, placement))
  return configs


def _label(method, placement, setting) -> str:
  c = (
    customary(method, placement)
    if setting == "customary"
    else at_variance(method, MATCHED_S2, placement)
  )
  return c.label


def run_headline(ctx: Context) -> dict:
  configs = headline_configs()
  rows = ctx.train(configs)
  none = configs[0].label
  contrasts = []
  # Rows whose 'recal_test_acc' is the trained accuracy: the other side of contrasts that
  # compare a recalibrated run with a run as trained.
  trained_as_recal = [{**r, "recal_test_acc": r["test_acc"]} for r in rows]
  for placement in ("pooled", "head"):
    where = PLACEMENT_NAMES[placement]
    for setting in ("customary", "matched"):
      for method in METHODS:
        lab = _label(method, placement, setting)
        contrasts.append(contrast(rows, lab, none, f"{lab} - no noise", family="vs none"))
    for method in ("gaussian", "uout"):
      contrasts.append(
        contrast(
          rows,
          _label(method, placement, "matched"),
          _label("dropout", placement, "matched"),
          f"{method} - dropout at s2=1/3, {where}",
          family="shape",
        )
      )
    contrasts.append(
      contrast(
        rows,
        _label("uout", placement, "customary"),
        _label("dropout", placement, "customary"),
        f"uout 0.1 - dropout 0.5, {where}",
        family="customary",
      )
    )
  for setting in ("customary", "matched"):
    for method in METHODS:
      contrasts.append(
        contrast(
          rows,
          _label(method, "head", setting),
          _label(method, "pooled", setting),
          f"{method} {setting}: after last BN - before BN",
          family="placement",
        )
      )
  for setting in ("customary", "matched"):
    for method in METHODS:
      lab = _label(method, "pooled", setting)
      contrasts.append(
        contrast(
          rows,
          lab,
          lab,
          f"recalibration gain, {lab}",
          metric="recal_test_acc",
          family="recalibration",
          rows_b=trained_as_recal,
        )
      )
  for method in METHODS:  # fix (c) against no noise and against fix (a)
    lab = _label(method, "pooled", "matched")
    contrasts.append(
      contrast(
        rows,
        lab,
        none,
        f"{lab} recalibrated - no noise",
        metric="recal_test_acc",
        family="fix (c)",
        rows_b=trained_as_recal,
      )
    )
    contrasts.append(
      contrast(
        rows,
        lab,
        _label(method, "head", "matched"),
        f"{lab} recalibrated - same noise after the last BN",
        metric="recal_test_acc",
        family="fix (c)",
        rows_b=trained_as_recal,
      )
    )
  adjust(contrasts, ctx.target_half_width)
  summary = summarize(rows)
  tost = {}
  for placement in ("pooled", "head"):
    for method in ("gaussian", "uout"):
      a = by_seed(rows, _label(method, placement, "matched"))
      b = by_seed(rows, _label("dropout", placement, "matched"))
      seeds = sorted(set(a) & set(b))
      tost[(method, placement)] = stats.tost_paired(
        [a[s] for s in seeds], [b[s] for s in seeds], ctx.margin
      )
  for method in METHODS:
    a = by_seed(rows, _label(method, "pooled", "matched"), "recal_test_acc")
    b = by_seed(rows, _label(method, "head", "matched"))
    seeds = sorted(set(a) & set(b))
    tost[(method, "fix (c) vs fix (a)")] = stats.tost_paired(
      [a[s] for s in seeds], [b[s] for s in seeds], ctx.margin
    )
  claims = _headline_claims(contrasts, tost, ctx.margin)
  text = (
    format_summary(summary)
    + "\n\n"
    + format_contrasts(
      contrasts,
      "Paired differences over seeds, test accuracy points "
      "(95 % t-interval; Holm-adjusted p over these "
      f"{len(contrasts)} tests):",
    )
    + "\n"
    + precision_note(contrasts, ctx.target_half_width)
  )
  return {
    "rows": rows,
    "summary": summary,
    "contrasts": contrasts,
    "tost": [{"method": m, "comparison": p, **v} for (m, p), v in tost.items()],
    "claims": claims,
    "text": text,
    "configs": [c.label for c in configs],
  }


def _find(contrasts, name):
  return next(c for c in contrasts if c["name"] == name)


def _headline_claims(contrasts, tost, margin: float) -> list[Claim]:
  d_before = _label("dropout", "pooled", "customary")
  d_head = _label("dropout", "head", "customary")
  claims = [
    from_difference(
      "Li et al. 2019, Sec. 1 and Fig. 1",
      "Dropout 0.5 before BN lowers test accuracy",
      "headline",
      _find(contrasts, f"{d_before} - no noise"),
      expected_sign=-1,
    ),
    from_difference(
      "Li et al. 2019, Sec. 5 (dropout after all BN layers)",
      "Dropout 0.5 after the last BN improves test accuracy over no dropout",
      "headline",
      _find(contrasts, f"{d_head} - no noise"),
      expected_sign=+1,
    ),
    from_difference(
      "Li et al. 2019, Sec. 5 (Uout)",
      "Uout (beta 0.1) before BN beats dropout 0.5 before BN",
      "headline",
      _find(contrasts, f"uout 0.1 - dropout 0.5, {PLACEMENT_NAMES['pooled']}"),
      expected_sign=+1,
    ),
  ]
  for method in ("gaussian", "uout"):
    for placement in ("pooled", "head"):
      c = _find(contrasts, f"{method} - dropout at s2=1/3, {PLACEMENT_NAMES[placement]}")
      t = tost[(method, placement)]
      claims.append(
        from_difference(
          "matched-variance argument (Li et al. Sec. 3: the shift depends on s2 only)",
          f"At s2 = 1/3, {method} and dropout give the same test accuracy "
          f"({PLACEMENT_NAMES[placement]}), within ±{POINTS * margin:.1f} points",
          "headline",
          c,
          equivalence=t["equivalent"],
          note=f"TOST p = {t['p_value']:.3g}",
        )
      )
  gain = next(c for c in contrasts if c["family"] == "recalibration" and c["a"] == d_before)
  claims.append(
    from_difference(
      "Li et al. 2019, Sec. 5; Hendrycks & Gimpel 2016",
      "Re-estimating BN statistics with the noise off raises test accuracy (dropout 0.5 before BN)",
      "headline",
      gain,
      expected_sign=+1,
    )
  )
  d_matched = _label("dropout", "pooled", "matched")
  claims.append(
    from_difference(
      "this study (regularization through fix (c))",
      "Dropout 0.25 before BN, recalibrated, beats no noise",
      "headline",
      _find(contrasts, f"{d_matched} recalibrated - no noise"),
      expected_sign=+1,
    )
  )
  t = tost[("dropout", "fix (c) vs fix (a)")]
  claims.append(
    from_difference(
      "Li et al. 2019, Sec. 5 (fixes (a) and (c))",
      "Dropout 0.25 before BN, recalibrated, matches dropout 0.25 after the last BN "
      f"(within ±{POINTS * margin:.1f} points)",
      "headline",
      _find(contrasts, f"{d_matched} recalibrated - same noise after the last BN"),
      equivalence=t["equivalent"],
      note=f"TOST p = {t['p_value']:.3g}",
    )
  )
  return claims


# ------------------------------------------------------------------- recalibration


def run_recalibration(
  ctx: Context,
  headline: dict,
  sample_counts=(64, 256, 1000),
  ema_passes: int = 1,
  noisy_passes: int = 8,
) -> dict:
  """Recalibration variants on the headline's before-BN runs (no new training)."""
  none = baseline().label
  labels = [_label(m, "pooled", s) for s in ("customary", "matched") for m in METHODS]
  rows = []
  measured = {(r["config"], r["seed"]): r for r in headline["rows"]}
  for label in labels:
    for seed in ctx.seeds:
      trained, r, data, settings = ctx.trained[(label, seed)]
      row = measured[(label, seed)]
      rows.append(
        {
          "trained": row["test_acc"],
          "mean+var": row["recal_test_acc"],
          **_recal_variants(trained, r, data, settings, sample_counts, ema_passes, noisy_passes),
        }
      )
      rows[-1].update(config=label, seed=seed)
  base = by_seed(headline["rows"], none)
  for row in rows:
    gap = base[row["seed"]] - row["trained"]
    row["gap"] = gap
    row["fraction_recovered"] = (
      (row["mean+var"] - row["trained"]) / gap if gap > 0.02 else float("nan")
    )
  variants = (
    ["trained", "mean+var", "var only", "ema"]
    + [f"mean+var, {k} samples" for k in sample_counts]
    + ["train mode", f"train mode, {noisy_passes}-pass average"]
  )
  table, contrasts = [], []
  for label in labels:
    rs = [r for r in rows if r["config"] == label]
    entry = {"config": label}
    for v in variants:
      entry[v], entry[v + " sd"] = stats.mean_sd([r[v] for r in rs])
    fr = [r["fraction_recovered"] for r in rs if not math.isnan(r["fraction_recovered"])]
    entry["fraction_recovered"], entry["fraction_recovered_sd"] = (
      stats.mean_sd(fr) if fr else (float("nan"), float("nan"))
    )
    entry["fraction_ci"] = stats.paired_difference(fr, [0.0] * len(fr)) if fr else None
    table.append(entry)
    contrasts.append(_variant_contrast(rs, "var only", "mean+var", label))
    contrasts.append(_variant_contrast(rs, "ema", "mean+var", label))
  adjust(contrasts, ctx.target_half_width)
  tost = [
    stats.tost_paired(
      [r["var only"] for r in rows if r["config"] == lab],
      [r["mean+var"] for r in rows if r["config"] == lab],
      ctx.margin,
    )
    for lab in labels
  ]
  return {
    "rows": rows,
    "table": table,
    "contrasts": contrasts,
    "variants": variants,
    "tost_var_only": [{"config": lab, **t} for lab, t in zip(labels, tost, strict=True)],
    "claims": _recal_claims(table, contrasts, tost, labels, ctx),
    "text": _format_recal(table, variants, contrasts),
  }


def _variant_contrast(rs, a, b, label):
  out = stats.paired_difference([r[a] for r in rs], [r[b] for r in rs])
  return {
    "name": f"{a} - {b}, {label}",
    "a": a,
    "b": b,
    "metric": "test_acc",
    "family": "recalibration variants",
    **out,
    "seeds_for_target": None,
  }


def _recal_variants(
  trained: Trained, r, data, settings, sample_counts, ema_passes, noisy_passes
) -> dict:
  """The variants beyond exact mean+var (which `measure` already took) for run ``r``."""
  config = trained.runs[r][0]
  model = eval_model(data, config, settings.activation)
  state = trained.state(r)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply_fn = eval_fns(model)[0]
  out = {
    "var only": measure_more.accuracy(
      model, state, measure_more.variance_only(state.batch_stats, trained.shifts[r]), data
    )
  }
  ema = measure_more.ema(
    model, state.params, state.batch_stats, data["x_train"], settings.batch_size, ema_passes
  )
  out["ema"] = measure_more.accuracy(model, state, ema, data)
  for k in sample_counts:
    stats_k = diagnostics.recalibrate_batch_stats(apply_fn, variables, [data["x_train"][:k]])
    out[f"mean+var, {k} samples"] = measure_more.accuracy(model, state, stats_k, data)
  noisy = build_model(data, config, *config.strengths, settings.activation)
  key = jax.random.fold_in(jax.random.key(trained.runs[r][1]), 7)
  single, averaged = measure_more.train_mode_accuracy(
    noisy, variables, data["x_test"], data["y_test"], key, noisy_passes
  )
  out["train mode"], out[f"train mode, {noisy_passes}-pass average"] = single, averaged
  return out


def _format_recal(table, variants, contrasts) -> str:
  width = max(len(e["config"]) for e in table)
  short = [
    v.replace("mean+var, ", "")
    .replace(" samples", " smp")
    .replace("train mode, ", "")
    .replace("-pass average", "-avg")
    for v in variants
  ]
  head = f"{'config':{width}s} " + " ".join(f"{s:>9s}" for s in short) + "  recovered"
  lines = [
    "Test accuracy % after each recalibration variant (mean over seeds):",
    head,
    "-" * len(head),
  ]
  for e in table:
    frac = e["fraction_recovered"]
    lines.append(
      f"{e['config']:{width}s} "
      + " ".join(f"{POINTS * e[v]:9.1f}" for v in variants)
      + (f"  {POINTS * frac:6.0f} %" if not math.isnan(frac) else "     n/a")
    )
  lines.append(
    "recovered: (mean+var - trained) / (no noise - trained), per seed, mean; n/a "
    "where the gap is under 2 points."
  )
  return (
    "\n".join(lines)
    + "\n\n"
    + format_contrasts(contrasts, "Variants against exact mean+var (points, 95 % interval, Holm):")
  )


def _recal_claims(table, contrasts, tost, labels, ctx) -> list[Claim]:
  claims = []
  entry = next(e for e in table if e["config"] == labels[0])
  ci = entry["fraction_ci"]
  if ci is not None:
    claims.append(
      Claim(
        "Li et al. 2019, Table 3 (re-estimated statistics recover part of the loss)",
        "Recalibration recovers most (> 50 %) of the accuracy lost to dropout 0.5 before BN",
        "recalibration",
        _interval_text(ci, percent=True),
        stats.verdict(ci["low"] - 0.5, ci["high"] - 0.5, expected_sign=+1),
        "fraction of the gap to no noise",
      )
    )
  for lab, t in zip(labels[:1], tost[:1], strict=True):
    c = next(c for c in contrasts if c["name"] == f"var only - mean+var, {lab}")
    claims.append(
      from_difference(
        "Hendrycks & Gimpel 2016 (re-estimate the variance)",
        "Re-estimating only the variance does as well as mean and variance "
        f"(within ±{POINTS * ctx.margin:.1f} points)",
        "recalibration",
        c,
        equivalence=t["equivalent"],
        note=f"TOST p = {t['p_value']:.3g}",
      )
    )
  return claims


def _interval_text(d: dict, percent=False) -> str:
  scale = 100.0
  unit = " %" if percent else " points"
  if math.isnan(d["low"]):
    return f"{scale * d['mean']:+.1f}{unit} (n = {d['n']})"
  return (
    f"{scale * d['mean']:+.1f}{unit} [{scale * d['low']:+.1f}, {scale * d['high']:+.1f}]"
    f" (n = {d['n']})"
  )


# --------------------------------------------------------------------- dose-response

DOSE_LEVELS = (0.03, 0.1, MATCHED_S2, 1.0)


def dose_configs(levels=DOSE_LEVELS) -> list[Config]:
  configs = []
  for placement in ("direct", "weight", "pooled"):
    configs.append(
      baseline(order=at_variance("dropout", 0.1, placement).order, tag=f"({placement})")
    )
    for method in METHODS:
      for s2 in levels:
        configs.append(at_variance(method, s2, placement))
  return configs


def run_dose(ctx: Context, seeds=None, levels=DOSE_LEVELS) -> dict:
  configs = dose_configs(levels)
  rows = ctx.train(configs, seeds=seeds)
  summary = summarize(rows)
  tests, claims = [], []
  for placement in ("direct", "weight", "pooled"):
    sub = [r for r in rows if r["placement"] == placement and not r["extension"]]
    test = stats.interaction_test(
      [r["test_acc"] for r in sub],
      [r["method"] for r in sub],
      [round(r["s2"], 6) for r in sub],
      [r["seed"] for r in sub],
    )
    tests.append({"placement": placement, "metric": "test_acc", **test})
    claims.append(
      Claim(
        "matched-variance argument (Li et al. Sec. 3)",
        f"The accuracy cost of noise depends on s2, not on the op ({PLACEMENT_NAMES[placement]})",
        "dose-response",
        f"op x s2 interaction F = {test['F']:.2f}, p = {test['p_value']:.3g}",
        "contradicted" if test["p_value"] < 0.05 else "inconclusive",
        ""
        if test["p_value"] < 0.05
        else "a non-significant interaction is not proof of no interaction",
      )
    )
  text = (
    format_summary(summary) + "\n\nop x s2 interaction on test accuracy (two-way, seeds as "
    "blocks, beta <= 1 only):\n"
    + "\n".join(
      f"  {t['placement']:8s} F({t['df_num']:.0f}, {t['df_den']:.0f}) = {t['F']:6.2f}  "
      f"p = {t['p_value']:.3g}"
      for t in tests
    )
  )
  return {
    "rows": rows,
    "summary": summary,
    "interaction": tests,
    "claims": claims,
    "text": text,
    "levels": list(levels),
  }


# ----------------------------------------------------------------------------- width

WIDTHS = (8, 16, 32, 64, 128, 256)


def width_configs(widths=WIDTHS, rate=0.5) -> list[Config]:
  configs = []
  for d in widths:
    arch = (("model", "mlp"), ("features", (d, 64)), ("noise_blocks", (0,)))
    configs += [
      baseline(arch=arch, tag=f"d={d}"),
      Config("dropout", rate, "weight", arch=arch, tag=f"d={d}"),
    ]
  return configs


def run_width(ctx: Context, seeds=None, widths=WIDTHS) -> dict:
  """Dropout 0.5 on the d units of an MLP's first block, then dense -> BN (case b)."""
  configs = width_configs(widths)
  rows = ctx.train(configs, seeds=seeds)
  checks = []
  for config in configs[1::2]:
    for seed in ctx.seeds if seeds is None else seeds:
      trained, r, data, settings = ctx.trained[(config.label, seed)]
      checks.append(
        {
          "d": dict(config.arch)["features"][0],
          "seed": seed,
          **_width_check(trained, r, data, settings, config),
        }
      )
  table = []
  for d in widths:
    cs = [c for c in checks if c["d"] == d]
    table.append(
      {"d": d, **{k: float(np.mean([c[k] for c in cs])) for k in cs[0] if k not in ("d", "seed")}}
    )
  rho = stats.spearman_bootstrap(
    {str(t["d"]): [c["measured_bn"] for c in checks if c["d"] == t["d"]] for t in table},
    {str(t["d"]): float(t["d"]) for t in table},
  )
  claims = [
    Claim(
      "Li et al. 2019, Sec. 3.2, Eq. 12 (wider layers shrink the shift)",
      "The variance shift at the BN after a weight layer shrinks as the width d grows",
      "width",
      f"Spearman(d, Delta) = {rho['rho']:+.2f} [{rho['low']:+.2f}, {rho['high']:+.2f}]",
      stats.verdict(rho["low"], rho["high"], expected_sign=+1),
      "Delta = Var_eval / Var_train rises toward 1 as the shift shrinks",
    )
  ]
  claims += [
    _prediction_claim(
      checks,
      widths,
      "eq12",
      "Eq. 12 (units' mean c, v, rho; each channel's d cos^2)",
      "Li et al. 2019, Sec. 3.2, Eq. 12",
    ),
    _prediction_claim(
      checks,
      widths,
      "exact_linear",
      "The exact linear form (units' own means and covariance)",
      "this study",
    ),
  ]
  text = _format_width(table)
  return {
    "rows": rows,
    "checks": checks,
    "table": table,
    "rank_correlation": rho,
    "claims": claims,
    "text": text,
  }


WIDTH_MARGIN = 0.05  # Delta units: how close a prediction must be to count as matching


def _prediction_claim(checks, widths, key: str, name: str, source: str) -> Claim:
  """Does ``key`` predict the BN's Delta at every width? Per width, the paired difference
  over seeds; reproduced if every width passes TOST within ``WIDTH_MARGIN``,
  contradicted if some width's 95 % interval lies beyond it."""
  equivalent, beyond, worst = [], [], (0.0, None)
  for d in widths:
    cs = [c for c in checks if c["d"] == d]
    measured, predicted = [c["measured_bn"] for c in cs], [c[key] for c in cs]
    diff = stats.paired_difference(measured, predicted)
    equivalent.append(stats.tost_paired(measured, predicted, WIDTH_MARGIN)["equivalent"])
    beyond.append(diff["low"] > WIDTH_MARGIN or diff["high"] < -WIDTH_MARGIN)
    if abs(diff["mean"]) >= abs(worst[0]):
      worst = (diff["mean"], d)
  verdict = "contradicted" if any(beyond) else "reproduced" if all(equivalent) else "inconclusive"
  return Claim(
    source,
    f"{name} predicts the BN's Delta within ±{WIDTH_MARGIN} at every width d in {list(widths)}",
    "width",
    f"largest gap (measured - predicted) {worst[0]:+.3f} at d = {worst[1]}; "
    f"{sum(beyond)} widths beyond the margin, {sum(equivalent)} equivalent (TOST)",
    verdict,
    "",
  )


def _width_check(trained, r, data, settings, config) -> dict:
  """Eq. 12 (homogeneous), the exact linear form, a Monte Carlo of the library's op on
  the network's own noise-free activations, and the BN's recorded ratio, at ``bn1``."""
  from regjax import diagnostics

  model = eval_model(data, config, settings.activation)
  state = trained.state(r)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = data["x_train"][:1000]
  act = models.ACTIVATIONS[settings.activation]
  units = measure_more.captured_input(model, variables, x, "bn0", act)  # (n, d)
  w = np.asarray(state.params["dense1"]["kernel"], np.float64)  # (d, 64)
  s2 = config.s2
  mean, cov = (
    units.mean(0),
    np.cov(units, rowvar=False, bias=True).reshape(units.shape[1], units.shape[1]),
  )
  c, v, rho = float(mean.mean()), float(np.diag(cov).mean()), theory.mean_correlation(cov)
  dc2 = np.array([theory.d_cos2(w[:, j]) for j in range(w.shape[1])])
  eq12 = np.array([theory.shift_weighted(s2, c, v, rho, k) for k in dc2])
  exact = np.array([theory.shift_linear_exact(s2, mean, cov, w[:, j]) for j in range(w.shape[1])])
  noisy = np.asarray(
    regjax.dropout(
      units.astype(np.float32),
      config.value,
      key=jax.random.key(trained.runs[r][1]),
      deterministic=False,
    ),
    np.float64,
  )
  mc = (units @ w).var(0) / (noisy @ w).var(0)
  bn1 = diagnostics.variance_shift(eval_fns(model)[0], variables, [x])["bn1"]
  return {
    "rho": rho,
    "d_cos2": float(np.mean(dc2)),
    "c": c,
    "v": v,
    "eq12": float(np.mean(eq12)),
    "exact_linear": float(np.mean(exact)),
    "monte_carlo": float(np.mean(mc)),
    "measured_bn": float(np.mean(bn1.delta)),
  }


def _format_width(table) -> str:
  head = f"{'d':>4s} {'rho':>6s} {'d cos2':>7s} {'Eq.12':>6s} {'exact':>6s} {'MC':>6s} {'BN':>6s}"
  title = (
    "Width: dropout 0.5 on d units -> dense(64) -> BN. Delta = Var_eval/Var_train at "
    "that BN (mean over its 64 channels and seeds):"
  )
  lines = [title, head, "-" * len(head)]
  for t in table:
    lines.append(
      f"{t['d']:4d} {t['rho']:6.3f} {t['d_cos2']:7.2f} {t['eq12']:6.3f} "
      f"{t['exact_linear']:6.3f} {t['monte_carlo']:6.3f} {t['measured_bn']:6.3f}"
    )
  lines.append(
    "Eq.12: homogeneous units (mean c, variance v, correlation rho); exact: the "
    "linear form with the units' own means and covariance; MC: the library's "
    "dropout on the units, then the weights; BN: real_var / moving_var after "
    "training."
  )
  return "\n".join(lines)


# ----------------------------------------------------------------------------- depth

DEPTHS = (2, 4, 6, 8)


def depth_configs(depths=DEPTHS, rate=0.5) -> list[Config]:
  configs = []
  for k in depths:
    every = (("features", (32,) * k),)
    configs += [
      baseline(arch=every, tag=f"{k} blocks"),
      Config("dropout", rate, "pooled", arch=every, tag=f"{k} blocks, all"),
      Config(
        "dropout", rate, "pooled", arch=every + (("noise_blocks", (0,)),), tag=f"{k} blocks, first"
      ),
    ]
  return configs


def run_depth(ctx: Context, seeds=None, depths=DEPTHS) -> dict:
  """Dropout 0.5 in every block vs in the first block only, 2 to 8 blocks."""
  configs = depth_configs(depths)
  rows = ctx.train(configs, seeds=seeds)
  summary = summarize(rows)
  table = []
  for e in summary:
    layers = [p for p in e["layers"] if p.startswith("bn")]
    table.append(
      {
        "config": e["config"],
        "test_acc": e["test_acc"],
        "per_layer_shift": [e["layers"][p]["paper_shift"] for p in layers],
        "last_shift": e["layers"][layers[-1]]["paper_shift"],
        "head_shift": e["layers"]["head_bn"]["paper_shift"],
      }
    )
  contrasts = []
  for k in depths:
    all_lab = depth_configs((k,))[1].label
    first_lab = depth_configs((k,))[2].label
    contrasts.append(contrast(rows, all_lab, first_lab, f"{k} blocks: all - first only"))
  adjust(contrasts, ctx.target_half_width)
  claims = [
    _depth_claim(
      rows,
      depths,
      "all",
      "Li et al. 2019, Fig. 1 (the shift grows along the network)",
      "With noise in every block the shift at the last block's BN grows with depth (accumulation)",
    ),
    _depth_claim(
      rows,
      depths,
      "first",
      'this study\'s first edition ("the shift compounds with depth")',
      "With noise in the first block only the shift at the last block's "
      "BN grows with depth (propagation)",
    ),
  ]
  text = "\n".join(
    f"{t['config']:38s} acc {POINTS * t['test_acc']:5.1f}  paper shift per BN: "
    + " ".join(f"{s:.2f}" for s in t["per_layer_shift"])
    + f" | head {t['head_shift']:.2f}"
    for t in table
  )
  text += "\n\n" + format_contrasts(contrasts, "Test accuracy, all blocks minus first only:")
  return {
    "rows": rows,
    "summary": summary,
    "table": table,
    "contrasts": contrasts,
    "claims": claims,
    "text": text,
  }


def _depth_claim(rows, depths, which: str, source: str, statement: str) -> Claim:
  """Spearman correlation of depth with the last block BN's paper-form shift, bootstrap
  over seeds."""
  per_depth = {}
  for k in depths:
    label = depth_configs((k,))[1 if which == "all" else 2].label
    rs = sorted((r for r in rows if r["config"] == label), key=lambda r: r["seed"])
    per_depth[str(k)] = [r["layers"][f"bn{k - 1}"]["paper_shift"] for r in rs]
  rho = stats.spearman_bootstrap(per_depth, {str(k): float(k) for k in depths})
  means = ", ".join(f"{k}: {np.mean(v):.2f}" for k, v in per_depth.items())
  return Claim(
    source,
    statement,
    "depth",
    f"Spearman(depth, shift) {rho['rho']:+.2f} [{rho['low']:+.2f}, "
    f"{rho['high']:+.2f}]; last-BN shift by depth {means}",
    stats.verdict(rho["low"], rho["high"], expected_sign=+1),
    "paper-form shift at the last conv block's BN",
  )


# ---------------------------------------------------------------------------- orders

# Chen et al. 2019: the IC layer (BN then dropout) right before each weight layer, so the
# chain is conv -> act -> pool -> [BN -> dropout] -> conv.
IC_ORDER = "bn-drop-conv-act-pool"


def order_configs(orders: Sequence[str], method: str, value: float) -> list[Config]:
  return [Config(method, value, "order", order) for order in orders]


def run_orders(
  ctx: Context,
  orders: Sequence[str],
  method: str,
  value: float,
  data=None,
  settings=None,
  seeds=None,
) -> dict:
  configs = order_configs(orders, method, value)
  rows = ctx.train(configs, data=data, settings=settings, seeds=seeds)
  summary = summarize(rows)
  per_seed = {
    c.order: [
      r["test_loss"] for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == c.label
    ]
    for c in configs
  }
  claimed = {
    o: models.PUBLISHED_ORDER_LOSSES[o] for o in per_seed if o in models.PUBLISHED_ORDER_LOSSES
  }
  rho = stats.spearman_bootstrap({o: per_seed[o] for o in claimed}, claimed)
  claims = []
  if rho["n_labels"] >= 3:
    claims.append(
      Claim(
        "quoted MNIST block-order table (one run each)",
        "Our ranking of block orders by test loss agrees with the quoted table",
        "orders",
        f"Spearman {rho['rho']:+.2f} [{rho['low']:+.2f}, {rho['high']:+.2f}] over "
        f"{rho['n_labels']} orders",
        stats.verdict(rho["low"], rho["high"], expected_sign=+1),
        "bootstrap over seeds",
      )
    )
  contrasts = []
  labels = {c.order: c.label for c in configs}
  if IC_ORDER in labels and models.DEFAULT_ORDER in labels:
    c = contrast(
      rows,
      labels[IC_ORDER],
      labels[models.DEFAULT_ORDER],
      f"IC ({IC_ORDER}) - {models.DEFAULT_ORDER}",
    )
    contrasts.append(c)
    adjust(contrasts, ctx.target_half_width)
    claims.append(
      from_difference(
        "Chen et al. 2019 (IC layer)",
        "The IC order (BN-dropout before each conv) beats conv-BN-act-dropout in test accuracy",
        "orders",
        c,
        expected_sign=+1,
        note="here the first IC layer also drops 25 % of the input signal",
      )
    )
  text = (
    format_summary(summary)
    + "\n\n"
    + "\n".join(
      f"  {o:24s} our loss {np.mean(v):.4f}  quoted "
      + (f"{claimed[o]:.4f}" if o in claimed else "- (not in the quoted table)")
      for o, v in per_seed.items()
    )
  )
  if contrasts:
    text += "\n\n" + format_contrasts(contrasts, "IC layer vs the default order:")
  return {
    "rows": rows,
    "summary": summary,
    "rank_correlation": rho,
    "contrasts": contrasts,
    "claims": claims,
    "text": text,
  }


def order_list(spec: str | None) -> list[str]:
  """'all' -> the quoted table's ten orders plus the IC order; else a comma list."""
  if spec in (None, "all"):
    return list(models.PUBLISHED_ORDER_LOSSES) + [IC_ORDER]
  return ["-".join(models.parse_order(o)) for o in spec.split(",")]


# ---------------------------------------------------------------------------- theory


def theory_claims(rows) -> list[Claim]:
  """One claim per closed form (all its settings inside 5 SE), and the matched-variance
  argument on the pooled path (ops at equal s2 compared with each other)."""
  out = []
  for check in dict.fromkeys(r["check"] for r in rows if r["predicted"] is not None):
    rs = [r for r in rows if r["check"] == check and r["predicted"] is not None]
    agree = sum(bool(r["agrees"]) for r in rs)
    out.append(
      Claim(
        "Li et al. 2019, Sec. 3" if "Eq." in check else "closed form (this study)",
        f"{check}: the closed form matches the library's ops",
        "theory (Monte Carlo)",
        f"{agree} of {len(rs)} settings within 5 standard errors",
        "reproduced" if agree == len(rs) else "contradicted",
        "incl. Uout beta > 1 (extension)" if any(r["extension"] for r in rs) else "",
      )
    )
  for r in rows:
    if r["check"] == "pooled path" and r["quantity"] == "mean inflation" and r["s2"] >= 0.99:
      out.append(
        Claim(
          "variance-only analysis (Li et al. Sec. 3 assume the mean is kept)",
          f"{r['op']} at s2 = 1 leaves the mean of ReLU -> noise -> max-pool unchanged",
          "theory (Monte Carlo)",
          f"E_train / E_eval = {r['measured']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
          stats.verdict(r["ci_low"] - 1, r["ci_high"] - 1, equivalence=False),
          "extension (beta > 1)" if r["extension"] else "",
        )
      )
  pooled = [r for r in rows if r["check"] == "pooled path" and r["quantity"] == "Delta"]
  for s2 in sorted({r["s2"] for r in pooled}):
    at = {r["op"]: r for r in pooled if r["s2"] == s2}
    if "dropout" not in at or "gaussian" not in at:
      continue
    d, g = at["dropout"], at["gaussian"]
    diff = g["measured"] - d["measured"]
    se = math.hypot(g["se"], d["se"])
    out.append(
      Claim(
        "matched-variance argument (exact on a linear path to BN)",
        f"At s2 = {s2:.3g}, ReLU -> noise -> max-pool gives the same Delta for dropout and "
        "Gaussian dropout",
        "theory (Monte Carlo)",
        f"Delta dropout {d['measured']:.3f}, gaussian {g['measured']:.3f}, uout "
        f"{at['uout']['measured']:.3f}; difference {diff:+.3f} ± {5 * se:.3f} (5 SE)"
        if "uout" in at
        else f"difference {diff:+.3f} ± {5 * se:.3f} (5 SE)",
        "contradicted" if abs(diff) > 5 * se else "inconclusive",
        "linear prediction " + f"{d.get('linear', float('nan')):.3f}",
      )
    )
  return out


EXPERIMENTS: dict[str, Callable] = {
  "headline": run_headline,
  "recalibration": run_recalibration,
  "dose": run_dose,
  "width": run_width,
  "depth": run_depth,
  "orders": run_orders,
}

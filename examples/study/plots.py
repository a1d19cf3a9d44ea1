"""Figures of a ``compare_dropout.py`` run: one PNG per experiment present in the record.

``plot_all(record, run_dir)`` is called by the study once ``results.json`` is written;
``python -m study.plots RESULTS_JSON OUT_DIR`` redraws the figures from a saved run
(for example to refresh the documentation's figures). Accuracies are drawn in percent,
error bars are one standard deviation over seeds unless a caption says otherwise, and
every figure carries a footer naming the software and settings it came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable

import numpy as np

DPI = 110
FOOTER_SIZE = 7
METHOD_COLORS = {"dropout": "C0", "gaussian": "C1", "uout": "C2", "none": "0.3"}
# Named after the path from the noise to the next BatchNorm (see study.configs); kept here
# so the figures do not need the model code (and jax) to be importable.
PLACEMENT_NAMES = {
  "none": "no noise",
  "direct": "direct: noise -> BN (case a)",
  "weight": "weight: noise -> conv -> BN (case b)",
  "pooled": "before BN: noise -> pool -> conv -> BN",
  "head": "after the last BN",
}
BLOCK_PATTERN = re.compile(r"(\d+) blocks(?:, (\w+))?")


# ----------------------------------------------------------------------------- helpers


def _num(value) -> float:
  """A float from a record value; None and non-numbers become NaN."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _pct(value) -> float:
  """A fraction as percent (NaN-safe)."""
  return 100.0 * _num(value)


def _sd(value, scale: float = 1.0) -> float:
  """An error-bar half-length: NaN (one seed) draws as no bar rather than failing."""
  v = _num(value) * scale
  return 0.0 if math.isnan(v) else v


def _fmt(value, digits: int = 3) -> str:
  """A number for a title or label; NaN prints as n/a."""
  v = _num(value)
  return "n/a" if math.isnan(v) else f"{v:.{digits}g}"


def _pyplot():
  """matplotlib.pyplot on the Agg backend, chosen here so importing this module is cheap."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  plt.rcParams.update(
    {
      "font.size": 9,
      "axes.titlesize": 9,
      "axes.labelsize": 9,
      "legend.fontsize": 8,
      "xtick.labelsize": 8,
      "ytick.labelsize": 8,
      "figure.titlesize": 11,
    }
  )
  return plt


def _seed_count(exp: dict) -> int | None:
  """How many seeds an experiment's numbers rest on, read from its own data."""
  counts = [
    len(s["seeds"])
    for s in exp.get("summary") or []
    if isinstance(s, dict) and isinstance(s.get("seeds"), list)
  ]
  if counts:
    return max(counts)
  seeds = {
    r.get("seed")
    for r in (exp.get("rows") or exp.get("checks") or [])
    if isinstance(r, dict) and "seed" in r
  }
  return len(seeds) or None


def _settings_text(record: dict, experiment: str | None) -> str:
  """Data set, epochs and seeds behind one experiment (theory: Monte Carlo samples)."""
  args = record.get("args") or {}
  data = record.get("dataset") or {}
  name = data.get("name") or args.get("dataset")
  train = data.get("train_size", args.get("train_size"))
  if experiment == "theory":
    samples = args.get("theory_samples")
    return f"Monte Carlo, {samples} samples per check" if samples else "Monte Carlo"
  exp = (record.get("experiments") or {}).get(experiment) or {}
  # The order sweep trains with its own epoch and seed budget.
  epochs = args.get("order_epochs" if experiment == "orders" else "epochs")
  seeds = _seed_count(exp) or args.get("order_seeds" if experiment == "orders" else "seeds")
  parts = [f"{name} {train} train" if train else name] if name else []
  parts += [f"{epochs} epochs"] if epochs else []
  parts += [f"{seeds} seed{'s' if seeds != 1 else ''}"] if seeds else []
  return ", ".join(parts)


def footer_text(record: dict, experiment: str | None = None) -> str:
  """The provenance line under a figure: software, machine, data and training settings."""
  env = record.get("environment") or {}
  software = ", ".join(f"{k} {env[k]}" for k in ("regjax", "jax", "flax") if env.get(k))
  cores = env.get("cpu_count")
  machine = ", ".join(
    str(x) for x in (env.get("cpu"), f"{cores} cores" if cores else None, env.get("backend")) if x
  )
  date = str(record.get("date") or "")[:10]
  parts = [software, machine, _settings_text(record, experiment), f"run of {date}" if date else ""]
  return "; ".join(p for p in parts if p)


def _save(fig, record: dict, experiment: str, path: str, note: str = "") -> str:
  """Put the footer (and an optional caption note) below everything drawn, save, close."""
  plt = _pyplot()
  renderer = fig.canvas.get_renderer()
  fig.canvas.draw()
  for legend in fig.legends:
    # Pin figure legends where the layout put them: a tight save re-anchors an "outside"
    # legend to the new figure edge, which is where the footer goes.
    where = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted())
    legend.set_loc("center")
    legend.set_bbox_to_anchor(where, transform=fig.transFigure)
  fig.set_layout_engine("none")
  box = fig.get_tightbbox(renderer)
  width, height = fig.get_figwidth(), fig.get_figheight()
  text = footer_text(record, experiment) + (f"\n{note}" if note else "")
  # Below the lowest artist (legends included), so the footer never covers data.
  fig.text(
    box.x0 / width,
    box.y0 / height - 0.1 / height,
    text,
    ha="left",
    va="top",
    fontsize=FOOTER_SIZE,
    color="0.35",
    linespacing=1.4,
  )
  fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)
  plt.close(fig)
  return path


def _legend_below(fig, axes, ncols: int = 4, extra=()) -> None:
  """One figure legend below the axes, deduplicated by label, so it never covers data."""
  handles, labels = [], []
  for ax in np.ravel(axes):
    for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
      if lab not in labels and not lab.startswith("_"):
        handles.append(h)
        labels.append(lab)
  for h, lab in extra:
    handles.append(h)
    labels.append(lab)
  if handles:
    fig.legend(
      handles, labels, loc="outside lower center", ncols=min(ncols, len(handles)), frameon=False
    )


def _strip_placement(config: str, placement: str) -> str:
  """A configuration's name without its placement word (the panel already says it)."""
  suffix = f" {placement}"
  return config.removesuffix(suffix)


def _baseline(summary: list[dict], tag: str | None = None) -> dict | None:
  """The no-noise entry (matching ``tag`` where a study trains one per placement)."""
  bases = [s for s in summary if s.get("placement") == "none"]
  tagged = [s for s in bases if tag is not None and s.get("tag") == tag]
  return (tagged or bases or [None])[0]


def _placements(summary: list[dict], preferred: tuple[str, ...]) -> list[str]:
  """Placements with noise present in a summary, the preferred ones first."""
  found = [s.get("placement") for s in summary if s.get("placement") not in (None, "none")]
  return [p for p in preferred if p in found] + sorted({p for p in found} - set(preferred))


def _ref_line(ax, base: dict | None, key: str, vertical: bool, label: str) -> None:
  """The no-noise mean as a dashed line with a +-sd band."""
  if base is None or math.isnan(_pct(base.get(key))):
    return
  mean, sd = _pct(base[key]), _sd(base.get(f"{key}_sd"), 100)
  span, line = (ax.axvspan, ax.axvline) if vertical else (ax.axhspan, ax.axhline)
  if sd > 0:
    span(mean - sd, mean + sd, color="0.85", zorder=0)
  line(mean, color="0.3", ls="--", lw=1, zorder=1, label=label)


# ---------------------------------------------------------------------------- headline


def _zoom_limits(
  points: list[tuple[float, float]], ref: float, window: float = 12.0
) -> tuple[float, float]:
  """An x range around the top cluster: (mean, sd) within ``window`` points of the reference."""
  pts = [(m, sd) for m, sd in points if not math.isnan(m)]
  if not pts:
    return 0.0, 100.0
  anchor = ref if not math.isnan(ref) else max(m for m, _ in pts)
  near = [(m, sd) for m, sd in pts if m >= anchor - window] or pts
  lo = min([m - sd for m, sd in near] + [anchor])
  hi = max([m + sd for m, sd in near] + [anchor])
  pad = max(0.3, 0.04 * (hi - lo))
  return lo - pad, hi + pad


def _accuracy_dots(ax, entries: list[dict], placement: str, limits=None) -> None:
  """Trained and recalibrated accuracy per configuration, one row each."""
  for i, s in enumerate(entries):
    for key, dy, style in (
      ("test_acc", -0.15, {"fmt": "o", "color": "C0"}),
      ("recal_test_acc", 0.15, {"fmt": "s", "color": "C3", "mfc": "white"}),
    ):
      x = _pct(s.get(key))
      label = "trained statistics" if key == "test_acc" else "after recalibration"
      ax.errorbar(
        x, i + dy, xerr=_sd(s.get(f"{key}_sd"), 100), capsize=2, ms=5, lw=1, label=label, **style
      )
      if limits and x < limits[0]:
        # Off the zoomed range: mark the value at the left edge instead of dropping it.
        ax.annotate(
          f"\u25c0 {x:.1f}",
          (limits[0], i + dy),
          xytext=(2, 0),
          textcoords="offset points",
          va="center",
          fontsize=7,
          color=style["color"],
        )
  ax.set_yticks(range(len(entries)))
  ax.set_yticklabels(
    [f"{_strip_placement(s['config'], placement)} (s\u00b2={_fmt(s.get('s2'))})" for s in entries]
  )
  ax.set_ylim(len(entries) - 0.5, -0.5)
  ax.grid(axis="x", color="0.92")


def plot_headline(record: dict, run_dir: str) -> list[str]:
  """Test accuracy per configuration, trained vs recalibrated, by placement."""
  plt = _pyplot()
  summary = record["experiments"]["headline"]["summary"]
  base = _baseline(summary)
  places = _placements(summary, ("pooled", "head"))
  groups = [[s for s in summary if s.get("placement") == p] for p in places]
  values = [
    (_pct(s.get(k)), _sd(s.get(f"{k}_sd"), 100))
    for s in summary
    for k in ("test_acc", "recal_test_acc")
  ]
  limits = _zoom_limits(values, _pct(base["test_acc"]) if base else math.nan)
  fig, axes = plt.subplots(
    max(1, len(places)),
    2,
    squeeze=False,
    layout="constrained",
    figsize=(10, 1.6 + 0.42 * max(1, len(summary))),
    gridspec_kw={
      "height_ratios": [max(1, len(g)) for g in groups] or [1],
      "width_ratios": (1, 1.5),
    },
  )
  for row, (place, group) in enumerate(zip(places, groups, strict=True)):
    full, zoom = axes[row]
    for ax, lim in ((full, (0, 100)), (zoom, limits)):
      _ref_line(ax, base, "test_acc", True, "no noise (trained) \u00b1 sd")
      if base is not None:
        ax.axvline(
          _pct(base.get("recal_test_acc")),
          color="C3",
          ls=":",
          lw=1,
          label="no noise (recalibrated)",
        )
      _accuracy_dots(ax, group, place, lim if ax is zoom else None)
      ax.set_xlim(*lim)
    full.set_title(PLACEMENT_NAMES.get(place, place), loc="left")
    zoom.set_title("same, zoomed near the baseline (\u25c0 = value off to the left)", loc="left")
    zoom.set_yticklabels([])
  for ax in axes[-1]:
    ax.set_xlabel("test accuracy (%)")
  fig.suptitle(
    "Headline: test accuracy with the trained BN statistics and after recalibration"
    "\n(mean over seeds, error bars = 1 sd over seeds; left: full 0-100 % range)"
  )
  _legend_below(fig, axes, ncols=4)
  path = os.path.join(run_dir, "headline.png")
  return [_save(fig, record, "headline", path, _nan_note(summary))]


def _nan_note(summary: list[dict]) -> str:
  """A caption note when some sds are undefined (a single seed)."""
  if any(math.isnan(_num(s.get("test_acc_sd"))) for s in summary if "test_acc_sd" in s):
    return "No error bar where the sd is undefined (a single seed)."
  return ""


def plot_contrasts(record: dict, run_dir: str) -> list[str]:
  """Forest plot of the headline's paired contrasts, one panel per family."""
  plt = _pyplot()
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  contrasts = record["experiments"]["headline"].get("contrasts") or []
  if not contrasts:
    return []
  families = list(dict.fromkeys(c.get("family") or "contrasts" for c in contrasts))
  groups = [[c for c in contrasts if (c.get("family") or "contrasts") == f] for f in families]
  fig, axes = plt.subplots(
    len(families),
    1,
    sharex=True,
    squeeze=False,
    layout="constrained",
    figsize=(10, 1.4 + 0.26 * len(contrasts) + 0.35 * len(families)),
    gridspec_kw={"height_ratios": [len(g) for g in groups]},
  )
  extent = max(
    [
      abs(100 * _num(c.get(k)))
      for c in contrasts
      for k in ("low", "high")
      if not math.isnan(_num(c.get(k)))
    ]
    + [1.0]
  )
  for ax, family, group in zip(axes[:, 0], families, groups, strict=True):
    _forest_panel(ax, group)
    metric = {c.get("metric") for c in group} - {"test_acc", None}
    suffix = f" (metric: {', '.join(sorted(metric))})" if metric else ""
    ax.set_title(f"family: {family}{suffix}", loc="left")
    if extent > 20:
      # Differences span tens of points next to ones under a point: linear near zero.
      ax.set_xscale("symlog", linthresh=5, linscale=1.5)
  _contrast_ticks(axes[-1, 0], extent)
  scale = "; symmetric-log scale beyond \u00b15 points" if extent > 20 else ""
  axes[-1, 0].set_xlabel(
    f"paired difference (first - second named) in accuracy, percentage points{scale}"
  )
  n = max((c.get("n") or 0) for c in contrasts) or "?"
  fig.suptitle(f"Headline contrasts: mean paired difference and 95 % interval (n = {n} seeds)")
  marks = [
    (Line2D([], [], marker="o", color="k", ls=""), "rejected at 5 % after Holm over all panels"),
    (Line2D([], [], marker="o", color="k", mfc="white", ls=""), "not rejected after Holm"),
  ]
  _legend_below(fig, [], ncols=2, extra=marks)
  path = os.path.join(run_dir, "headline_contrasts.png")
  return [_save(fig, record, "headline", path)]


def _contrast_ticks(ax, extent: float) -> None:
  """Round ticks in points within the data's extent (symlog's own are powers of ten)."""
  steps = (0, 1, 2, 5, 10, 20, 50, 100) if extent > 20 else ()
  ax.set_xlim(-1.08 * extent, 1.08 * extent)
  if steps:
    ticks = sorted({sign * t for t in steps if t <= extent for sign in (-1, 1)})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(_ticker().NullLocator())


def _ticker():
  """matplotlib.ticker, imported with the backend already chosen."""
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  return matplotlib.ticker


def _plain_log(ax, axis: str = "y") -> None:
  """A log axis labelled 1, 2, 5, 10 ... in plain numbers, not powers of ten."""
  ticker = _ticker()
  target = ax.yaxis if axis == "y" else ax.xaxis
  target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  target.set_minor_formatter(ticker.NullFormatter())


def _forest_panel(ax, group: list[dict]) -> None:
  """One family's contrasts: mean and 95 % interval, filled when Holm rejects."""
  for i, c in enumerate(group):
    mean, low, high = (100 * _num(c.get(k)) for k in ("mean", "low", "high"))
    err = [[max(0.0, mean - low)], [max(0.0, high - mean)]] if not math.isnan(low) else None
    ax.errorbar(
      mean,
      i,
      xerr=err,
      fmt="o",
      color="k",
      ms=5,
      capsize=2,
      lw=1,
      mfc="k" if c.get("reject_holm") else "white",
    )
  ax.axvline(0, color="C3", lw=1)
  ax.set_yticks(range(len(group)))
  ax.set_yticklabels([c.get("name", "?") for c in group])
  ax.set_ylim(len(group) - 0.5, -0.5)
  ax.grid(axis="x", color="0.92")


# ------------------------------------------------------------------------------ theory


def plot_theory(record: dict, run_dir: str) -> list[str]:
  """Closed forms vs Monte Carlo, and the pooled path against its linear prediction."""
  plt = _pyplot()
  rows = record["experiments"]["theory"]["rows"]
  closed = [r for r in rows if r.get("predicted") is not None and r.get("quantity") == "Delta"]
  pooled = [r for r in rows if r.get("predicted") is None and r.get("linear") is not None]
  fig, axes = plt.subplots(2, 2, layout="constrained", figsize=(10, 7.5))
  _theory_identity(axes[0, 0], closed)
  _theory_residuals(axes[0, 1], closed)
  for ax, quantity in zip(axes[1], ("Delta", "mean inflation"), strict=True):
    _theory_pooled(ax, [r for r in pooled if r.get("quantity") == quantity], quantity)
  fig.suptitle(
    "Theory checks: variance shift Delta = Var_test / Var_train, "
    "closed form vs Monte Carlo (error bars = 95 % interval)"
  )
  _legend_below(fig, axes, ncols=3)
  path = os.path.join(run_dir, "theory.png")
  return [_save(fig, record, "theory", path)]


def _ci(r: dict) -> list[list[float]]:
  """A row's 95 % interval as errorbar arguments (zero where it is missing)."""
  m, lo, hi = _num(r.get("measured")), _num(r.get("ci_low")), _num(r.get("ci_high"))
  return [
    [0.0 if math.isnan(lo) else max(0.0, m - lo)],
    [0.0 if math.isnan(hi) else max(0.0, hi - m)],
  ]


def _op_marker(r: dict) -> dict:
  """Colour by op; Uout beyond its published range (beta > 1) gets an open diamond."""
  color = METHOD_COLORS.get(r.get("op"), "k")
  if r.get("extension"):
    return {"fmt": "D", "color": color, "mfc": "white", "label": "Uout beta > 1 (extension)"}
  return {"fmt": "o", "color": color, "label": r.get("op")}


def _theory_identity(ax, closed: list[dict]) -> None:
  """Predicted vs measured Delta around the identity line."""
  for r in closed:
    ax.errorbar(r["predicted"], r["measured"], yerr=_ci(r), ms=4, capsize=2, **_op_marker(r))
  vals = [_num(r.get(k)) for r in closed for k in ("predicted", "measured")] or [0.0, 1.0]
  lo, hi = np.nanmin(vals), np.nanmax(vals)
  ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", label="identity (exact agreement)")
  ax.set_xlabel("predicted Delta (closed form, dimensionless)")
  ax.set_ylabel("measured Delta (Monte Carlo)")
  ax.set_title(f"(a) checks with a closed form ({len(closed)} rows)", loc="left")


def _theory_residuals(ax, closed: list[dict]) -> None:
  """Measured minus predicted per check, so agreement within the interval is visible."""
  for i, r in enumerate(closed):
    diff = _num(r.get("measured")) - _num(r.get("predicted"))
    style = _op_marker(r)
    ax.errorbar(i, diff, yerr=_ci(r), ms=4, capsize=2, **style)
    if r.get("agrees") is False:
      ax.annotate("disagrees", (i, diff), xytext=(3, 3), textcoords="offset points", fontsize=7)
  ax.axhline(0, color="0.5", lw=1, ls="--")
  checks = list(dict.fromkeys(r.get("check") for r in closed))
  starts = [next(i for i, r in enumerate(closed) if r.get("check") == c) for c in checks]
  ends = starts[1:] + [len(closed)]
  for end in ends[:-1]:
    ax.axvline(end - 0.5, color="0.85", lw=0.8)
  ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends, strict=True)])
  ax.set_xticklabels(checks, rotation=90, fontsize=7)
  ax.set_xlim(-0.7, len(closed) - 0.3)
  ax.set_ylabel("measured - predicted Delta")
  ax.set_title("(b) residuals, checks in table order", loc="left")


def _theory_pooled(ax, rows: list[dict], quantity: str) -> None:
  """Measured per op (bars with 95 % interval) against the linear prediction per s2."""
  levels = sorted({_num(r.get("s2")) for r in rows})
  ops = list(dict.fromkeys(r.get("op") for r in rows))
  width = 0.8 / max(1, len(ops))
  for j, s2 in enumerate(levels):
    at = [r for r in rows if _num(r.get("s2")) == s2]
    for k, op in enumerate(ops):
      for r in (r for r in at if r.get("op") == op):
        # Dots, not bars: the axis is zoomed onto the few-percent differences between ops.
        ax.errorbar(
          j - 0.4 + width * (k + 0.5), r["measured"], yerr=_ci(r), capsize=3, ms=6, **_op_marker(r)
        )
    linear = _num(at[0].get("linear")) if at else math.nan
    ax.hlines(
      linear, j - 0.45, j + 0.45, color="k", lw=1.5, ls="--", label="linear prediction (shape-free)"
    )
  vals = [_num(r.get(k)) for r in rows for k in ("measured", "linear")]
  if vals and not np.all(np.isnan(vals)):
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    ax.set_ylim(max(0.0, lo - 0.25 * (hi - lo + 1e-9)), hi + 0.15 * (hi - lo + 1e-9))
  ax.set_xticks(range(len(levels)))
  ax.set_xticklabels([f"s\u00b2 = {_fmt(s)}" for s in levels])
  ax.set_xlabel("noise variance s\u00b2 (matched across ops)")
  ax.set_ylabel(f"measured {quantity} (dimensionless)")
  tag = "c" if quantity == "Delta" else "d"
  ax.set_title(f"({tag}) pooled path ReLU -> noise -> max-pool: {quantity} per op", loc="left")


# ---------------------------------------------------------------------- variance shift


def plot_variance_shift(record: dict, run_dir: str) -> list[str]:
  """paper_shift per BN layer, one panel per placement, one line per configuration."""
  plt = _pyplot()
  summary = [s for s in record["experiments"]["headline"]["summary"] if s.get("layers")]
  if not summary:
    return []
  places = _placements(summary, ("pooled", "head")) or ["none"]
  base = _baseline(summary)
  layers = list(summary[0]["layers"])
  fig, axes = plt.subplots(
    1,
    len(places),
    sharey=True,
    squeeze=False,
    layout="constrained",
    figsize=(4.6 * len(places) + 0.6, 4.2),
  )
  styles = _line_styles(summary)
  for ax, place in zip(axes[0], places, strict=True):
    for s in [s for s in summary if s.get("placement") == place]:
      name = _strip_placement(s["config"], place)
      ax.plot(
        range(len(layers)),
        [_layer_shift(s, p) for p in layers],
        marker="o",
        ms=4,
        label=name,
        **styles[name],
      )
    if base is not None:
      ax.plot(
        range(len(layers)),
        [_layer_shift(base, p) for p in layers],
        color="k",
        ls="--",
        lw=1.2,
        label="no noise",
      )
    ax.set_yscale("log")
    _plain_log(ax)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers)
    ax.set_xlabel("BatchNorm layer (input side to head)")
    ax.set_title(PLACEMENT_NAMES.get(place, place), loc="left")
    ax.grid(color="0.92", which="both")
  axes[0, 0].set_ylabel("variance shift max(r, 1/r) (log)\nr = test-time Var / moving Var")
  fig.suptitle("Variance shift per BN layer (headline, mean over seeds; 1 = no shift)")
  _legend_below(fig, axes, ncols=4)
  return [_save(fig, record, "headline", os.path.join(run_dir, "variance_shift.png"))]


def _layer_shift(entry: dict, layer: str) -> float:
  """One BN layer's paper_shift, NaN where the layer is missing."""
  return _num(((entry.get("layers") or {}).get(layer) or {}).get("paper_shift"))


def _line_styles(summary: list[dict]) -> dict[str, dict]:
  """Colour by op, line style by strength, so one key serves every placement panel."""
  styles, seen = {}, {}
  for s in summary:
    name = _strip_placement(s["config"], s.get("placement", ""))
    if name in styles or s.get("placement") == "none":
      continue
    method = s.get("method", "none")
    k = seen[method] = seen.get(method, -1) + 1
    styles[name] = {
      "color": METHOD_COLORS.get(method, "k"),
      "ls": ("-", ":", "-.", (0, (5, 1)))[k % 4],
    }
  return styles


# ----------------------------------------------------------------------- recalibration


def plot_recalibration(record: dict, run_dir: str) -> list[str]:
  """Per configuration, test accuracy under each way of re-estimating the BN statistics."""
  plt = _pyplot()
  exp = record["experiments"]["recalibration"]
  table = exp.get("table") or []
  if not table:
    return []
  variants = exp.get("variants") or [k for k in table[0] if f"{k} sd" in table[0]]
  headline = (record["experiments"].get("headline") or {}).get("summary") or []
  base = _baseline(headline) if headline else None
  ncols = min(3, len(table))
  nrows = math.ceil(len(table) / ncols)
  fig, axes = plt.subplots(
    nrows,
    ncols,
    squeeze=False,
    layout="constrained",
    figsize=(3.6 * ncols + 1.6, 0.28 * len(variants) * nrows + 1.6),
  )
  for i, ax in enumerate(axes.flat):
    if i >= len(table):
      ax.set_visible(False)
      continue
    _recal_panel(ax, table[i], variants, base, show_labels=i % ncols == 0)
    ax.set_xlabel("test accuracy (%)")
  fig.suptitle(
    "Recalibration: test accuracy under each BN-statistics variant "
    "(mean, error bars = 1 sd over seeds)"
  )
  _legend_below(fig, axes, ncols=3)
  return [_save(fig, record, "recalibration", os.path.join(run_dir, "recalibration.png"))]


def _recal_panel(ax, row: dict, variants: list[str], base, show_labels: bool) -> None:
  """One configuration's dot plot; the trained statistics are the first row."""
  _ref_line(ax, base, "test_acc", True, "no noise (trained) \u00b1 sd")
  for j, v in enumerate(variants):
    trained = j == 0
    ax.errorbar(
      _pct(row.get(v)),
      j,
      xerr=_sd(row.get(f"{v} sd"), 100),
      capsize=2,
      ms=5,
      fmt="o" if trained else "s",
      color="C0" if trained else "C3",
      label="trained statistics" if trained else "recalibrated variant",
    )
  ax.set_yticks(range(len(variants)))
  ax.set_yticklabels(variants if show_labels else [])
  ax.set_ylim(len(variants) - 0.5, -0.5)
  ax.margins(x=0.15)
  recovered = _num(row.get("fraction_recovered"))
  extra = "" if math.isnan(recovered) else f"; {100 * recovered:.0f} % of gap recovered"
  ax.set_title(f"{row.get('config', '?')}{extra}", loc="left", fontsize=8)
  ax.grid(axis="x", color="0.92")


# -------------------------------------------------------------------------------- dose


def plot_dose(record: dict, run_dir: str) -> list[str]:
  """Accuracy and variance shift against the noise variance, one column per placement."""
  plt = _pyplot()
  summary = record["experiments"]["dose"]["summary"]
  places = _placements(summary, ("direct", "weight", "pooled"))
  if not places:
    return []
  fig, axes = plt.subplots(
    2,
    len(places),
    sharex=True,
    sharey="row",
    squeeze=False,
    layout="constrained",
    figsize=(3.9 * len(places) + 0.8, 6.6),
  )
  for col, place in enumerate(places):
    entries = [s for s in summary if s.get("placement") == place]
    base = _baseline(summary, f"({place})")
    _dose_panels(axes[0, col], axes[1, col], entries, base)
    axes[0, col].set_title(PLACEMENT_NAMES.get(place, place), loc="left")
    axes[1, col].set_xlabel("noise variance s\u00b2 (log)")
  axes[0, 0].set_ylabel("test accuracy (%)")
  axes[1, 0].set_ylabel("variance shift, mean over BN layers (log)")
  fig.suptitle(
    "Dose response: solid = trained statistics, dashed = recalibrated "
    "(error bars = 1 sd over seeds)"
  )
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  extra = [
    (Line2D([], [], color="k"), "trained statistics"),
    (Line2D([], [], color="k", ls="--"), "recalibrated"),
  ]
  if any(s.get("extension") for s in summary):
    extra.append((Line2D([], [], marker="*", color="k", ms=9, ls=""), "Uout beta > 1 (extension)"))
  _legend_below(fig, axes, ncols=7, extra=extra)
  return [_save(fig, record, "dose", os.path.join(run_dir, "dose.png"))]


def _dose_panels(acc_ax, shift_ax, entries: list[dict], base) -> None:
  """One placement: accuracy (top) and shift (bottom) per op against s2."""
  _ref_line(acc_ax, base, "test_acc", False, "no noise (trained) \u00b1 sd")
  if base is not None:
    shift_ax.axhline(_num(base.get("paper_shift")), color="0.3", ls="--", lw=1)
  for method in dict.fromkeys(s.get("method") for s in entries):
    pts = sorted((s for s in entries if s.get("method") == method), key=lambda s: _num(s["s2"]))
    color = METHOD_COLORS.get(method, "k")
    s2 = [_num(s.get("s2")) for s in pts]
    for key, ls in (("test_acc", "-"), ("recal_test_acc", "--")):
      acc_ax.errorbar(
        s2,
        [_pct(s.get(key)) for s in pts],
        ls=ls,
        marker="o",
        ms=4,
        yerr=[_sd(s.get(f"{key}_sd"), 100) for s in pts],
        capsize=2,
        color=color,
        label=method if key == "test_acc" else None,
      )
    shift_ax.plot(s2, [_num(s.get("paper_shift")) for s in pts], color=color, marker="o", ms=4)
    for ax, key, scale in (
      (acc_ax, "test_acc", 100),
      (acc_ax, "recal_test_acc", 100),
      (shift_ax, "paper_shift", 1),
    ):
      ext = [s for s in pts if s.get("extension")]
      ax.plot(
        [_num(s.get("s2")) for s in ext],
        [scale * _num(s.get(key)) for s in ext],
        ls="",
        marker="*",
        ms=11,
        color=color,
        mec="k",
        mew=0.5,
        zorder=5,
      )
  acc_ax.set_xscale("log")
  _plain_log(acc_ax, "x")
  shift_ax.set_yscale("log")
  _plain_log(shift_ax)
  for ax in (acc_ax, shift_ax):
    ax.grid(color="0.92", which="both")


# ------------------------------------------------------------------------------- width


def plot_width(record: dict, run_dir: str) -> list[str]:
  """Delta against the layer width d: Eq. 12, exact linear, Monte Carlo, BN measured."""
  plt = _pyplot()
  exp = record["experiments"]["width"]
  table = sorted(exp.get("table") or [], key=lambda t: _num(t.get("d")))
  if not table:
    return []
  fig, ax = plt.subplots(layout="constrained", figsize=(6.4, 4.4))
  d = [_num(t.get("d")) for t in table]
  for key, label, style in (
    ("eq12", "Eq. 12 (Li et al.)", {"color": "k", "ls": "--"}),
    ("exact_linear", "exact, linear layer", {"color": "C0"}),
    ("monte_carlo", "Monte Carlo", {"color": "C1", "ls": ":"}),
    ("measured_bn", "measured at the trained BN", {"color": "C3"}),
  ):
    ax.plot(d, [_num(t.get(key)) for t in table], marker="o", ms=4, label=label, **style)
  checks = exp.get("checks") or []
  ax.plot(
    [_num(c.get("d")) for c in checks],
    [_num(c.get("measured_bn")) for c in checks],
    ls="",
    marker=".",
    color="C3",
    alpha=0.4,
    label="measured, per seed",
  )
  ax.set_xscale("log", base=2)
  ax.set_xticks(d)
  ax.set_xticklabels([f"{v:g}" for v in d])
  ax.set_xlabel("width d of the layer before BN (channels, log2)")
  ax.set_ylabel("Delta = Var_test / Var_train (dimensionless)")
  ax.grid(color="0.92")
  rho = exp.get("rank_correlation") or {}
  fig.suptitle(
    f"Width: variance shift vs layer width (Spearman rho(d, Delta) = "
    f"{_fmt(rho.get('rho'), 2)} [{_fmt(rho.get('low'), 2)}, "
    f"{_fmt(rho.get('high'), 2)}])"
  )
  _legend_below(fig, [ax], ncols=3)
  return [_save(fig, record, "width", os.path.join(run_dir, "width.png"))]


# ------------------------------------------------------------------------------- depth


def _depth_points(exp: dict) -> dict[str, list[tuple[int, dict]]]:
  """Entries keyed by noise extent (all / first / no noise), with their block count."""
  out: dict[str, list[tuple[int, dict]]] = {}
  for s in exp.get("summary") or []:
    match = BLOCK_PATTERN.search(s.get("config", ""))
    if not match:
      continue
    which = match.group(2) or "all"
    extent = (
      "no noise"
      if s.get("placement") == "none"
      else "noise in first block"
      if which == "first"
      else f"noise in {which} blocks"
    )
    out.setdefault(extent, []).append((int(match.group(1)), s))
  return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _last_block_shift(entry: dict) -> float:
  """paper_shift at the last block's BN (the head BN is reported separately)."""
  names = sorted(
    (k for k in (entry.get("layers") or {}) if re.fullmatch(r"bn\d+", k)), key=lambda k: int(k[2:])
  )
  return _layer_shift(entry, names[-1]) if names else math.nan


def plot_depth(record: dict, run_dir: str) -> list[str]:
  """Last-BN shift and accuracy against the number of blocks."""
  plt = _pyplot()
  points = _depth_points(record["experiments"]["depth"])
  if not points:
    return []
  fig, (shift_ax, acc_ax) = plt.subplots(1, 2, layout="constrained", figsize=(9.5, 4.2))
  colors = {"no noise": "0.3", "noise in all blocks": "C0", "noise in first block": "C1"}
  for k, (extent, pts) in enumerate(points.items()):
    # A small sideways offset per curve keeps error bars at the same depth apart.
    blocks = [b + 0.04 * (k - (len(points) - 1) / 2) for b, _ in pts]
    style = {
      "color": colors.get(extent, "C2"),
      "marker": "o",
      "ms": 5,
      "ls": "--" if extent == "no noise" else "-",
    }
    shift_ax.plot(blocks, [_last_block_shift(s) for _, s in pts], label=extent, **style)
    acc_ax.errorbar(
      blocks,
      [_pct(s.get("test_acc")) for _, s in pts],
      capsize=2,
      yerr=[_sd(s.get("test_acc_sd"), 100) for _, s in pts],
      **style,
    )
  shift_ax.set_yscale("log")
  _plain_log(shift_ax)
  shift_ax.set_ylabel("variance shift at the last block's BN (log)")
  acc_ax.set_ylabel("test accuracy (%), error bars = 1 sd over seeds")
  all_blocks = sorted({b for pts in points.values() for b, _ in pts})
  for ax in (shift_ax, acc_ax):
    ax.set_xlabel("number of conv blocks")
    ax.set_xticks(all_blocks)
    ax.grid(color="0.92", which="both")
  fig.suptitle("Depth: dropout before BN in every block vs the first block only")
  _legend_below(fig, [shift_ax], ncols=3)
  return [_save(fig, record, "depth", os.path.join(run_dir, "depth.png"))]


# ------------------------------------------------------------------------------ orders


def _published_losses() -> dict[str, float]:
  """The per-order losses quoted by the literature the sweep replicates."""
  import models  # pylint: disable=import-outside-toplevel

  return dict(models.PUBLISHED_ORDER_LOSSES)


def _spread_labels(ys: list[float], gap: float) -> list[float]:
  """Label heights moved apart by at least ``gap`` (same units), keeping their order."""
  order = sorted(range(len(ys)), key=lambda i: ys[i])
  placed = [0.0] * len(ys)
  last = -math.inf
  for i in order:
    last = placed[i] = max(ys[i], last + gap)
  shift = (max(placed) - max(ys)) / 2 if ys else 0.0
  # Centre the column on the points instead of letting it drift upwards.
  return [p - shift for p in placed]


def plot_orders(record: dict, run_dir: str) -> list[str]:
  """Our mean test loss per block order against the quoted loss, orders labelled."""
  plt = _pyplot()
  exp = record["experiments"]["orders"]
  quoted = _published_losses()
  summary = [s for s in exp.get("summary") or [] if not math.isnan(_num(s.get("test_loss")))]
  known = [s for s in summary if s.get("order") in quoted]
  others = [s for s in summary if s.get("order") not in quoted]
  fig, ax = plt.subplots(layout="constrained", figsize=(8.4, 5.2))
  xs = [quoted[s["order"]] for s in known]
  ys = [_num(s["test_loss"]) for s in known]
  ax.errorbar(
    xs,
    ys,
    yerr=[_sd(s.get("test_loss_sd")) for s in known],
    fmt="o",
    color="C0",
    capsize=2,
    label="order with a quoted loss (mean \u00b1 1 sd over seeds)",
  )
  ax.set_xlabel("quoted test loss (published, cross-entropy)")
  ax.set_ylabel("our test loss (cross-entropy)")
  ax.grid(color="0.92")
  ax.margins(x=0.35, y=0.12)
  fig.canvas.draw()
  _label_points(ax, xs, ys, [s["order"] for s in known])
  # No quoted value to pair with: named in the key, off the axes, so the y range stays
  # on the orders that can be compared.
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  extra = [(Line2D([], [], ls=""), _unquoted_note(s)) for s in others]
  rho = exp.get("rank_correlation") or {}
  fig.suptitle(
    f"Block orders: our test loss vs the quoted one (Spearman rho = "
    f"{_fmt(rho.get('rho'), 2)} [{_fmt(rho.get('low'), 2)}, "
    f"{_fmt(rho.get('high'), 2)}], p = {_fmt(rho.get('p_value'), 2)})"
  )
  _legend_below(fig, [ax], ncols=1, extra=extra)
  return [_save(fig, record, "orders", os.path.join(run_dir, "orders.png"))]


def _unquoted_note(entry: dict) -> str:
  """The key line for an order without a quoted loss (the IC order)."""
  return (
    f"not quoted, not plotted: {entry['order']}, our loss "
    f"{_fmt(entry['test_loss'], 4)} \u00b1 {_fmt(entry.get('test_loss_sd'), 2)}"
  )


def _label_points(ax, xs: list[float], ys: list[float], names: list[str]) -> None:
  """Name each point from a label column beside the data, spread so no two labels overlap."""
  if not xs:
    return
  mid = (min(xs) + max(xs)) / 2
  reach = 0.06 * (max(xs) - min(xs) or 1e-3)
  to_data = ax.transData.inverted()
  # One text line (with leading) in data units, from the axes as laid out.
  gap = abs(to_data.transform((0, 14))[1] - to_data.transform((0, 0))[1])
  for side in (-1, 1):
    idx = [i for i, x in enumerate(xs) if (x <= mid) == (side < 0)]
    column = min(xs) - reach if side < 0 else max(xs) + reach
    for i, h in zip(idx, _spread_labels([ys[i] for i in idx], gap), strict=True):
      ax.annotate(
        names[i],
        (xs[i], ys[i]),
        xytext=(column, h),
        va="center",
        fontsize=7,
        ha="right" if side < 0 else "left",
        arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.6, "shrinkB": 4},
      )


# -------------------------------------------------------------------------- entry points

# (experiment, figure) in drawing order; the headline feeds three figures.
FIGURES: tuple[tuple[str, Callable[[dict, str], list[str]]], ...] = (
  ("theory", plot_theory),
  ("headline", plot_headline),
  ("headline", plot_contrasts),
  ("headline", plot_variance_shift),
  ("recalibration", plot_recalibration),
  ("dose", plot_dose),
  ("width", plot_width),
  ("depth", plot_depth),
  ("orders", plot_orders),
)


def plot_all(record: dict, run_dir: str, only=None) -> list[str]:
  """Write one PNG per experiment present in ``record`` into ``run_dir``; return the paths.

  ``only``: experiment names to draw (default: all present). A figure that fails is
  reported on stderr and skipped: a plotting problem must not cost the results of a
  finished run.
  """
  os.makedirs(run_dir, exist_ok=True)
  paths = []
  for name, draw in FIGURES:
    if not (record.get("experiments") or {}).get(name) or (only and name not in only):
      continue
    try:
      paths += draw(record, run_dir)
    except Exception as err:  # any failure: the run's results come first
      print(
        f"plots: {name} figure {draw.__name__} skipped ({type(err).__name__}: {err})",
        file=sys.stderr,
      )
      _pyplot().close("all")
  return paths


def regenerate(results_json: str, out_dir: str, only=None) -> list[str]:
  """Redraw the figures of a saved run (its ``results.json``) into ``out_dir``."""
  with open(results_json, encoding="utf-8") as f:
    record = json.load(f)
  return plot_all(record, out_dir, only)


def main(argv: list[str] | None = None) -> int:
  """Command line: ``python -m study.plots RESULTS_JSON OUT_DIR``."""
  parser = argparse.ArgumentParser(
    prog="python -m study.plots",
    description="Redraw the figures of a compare_dropout.py run from its results.json.",
  )
  parser.add_argument("results_json", metavar="RESULTS_JSON", help="the run's results.json")
  parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the PNGs (created if missing)")
  parser.add_argument(
    "--experiments",
    default=None,
    help="comma list of the experiments whose figures to draw (default: all)",
  )
  args = parser.parse_args(argv)
  only = args.experiments.split(",") if args.experiments else None
  for path in regenerate(args.results_json, args.out_dir, only):
    print(path)
  return 0


if __name__ == "__main__":
  # The examples folder holds `models` (quoted order losses); put it on the path.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())

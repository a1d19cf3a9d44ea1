"""Ratios, the results table, the MEMORY table, the TARGETS verdicts and the JSON file.

A row's "vs copy" is its ratio to the copy floor of the same mode ("fwd" or
"fwd+bwd"), size and dtype; "vs ref" its ratio to its reference (both
``timing.round_ratio``, with a 95 % interval). The targets are data:
``targets.toml`` next to this file.
"""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any

from benchmarks.cases.noise import COPY
from benchmarks.timing import round_ratio, summarize

TARGETS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.toml")
# Groups whose rows are compared with the copy floor.
FLOORED = ("floor", "noise", "batchnorm")


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds ``n``, ``median_ms``, ``min_ms`` and ``vs_copy`` / ``vs_ref`` with their
  intervals (``*_ci``) to every row."""
  for r in rows:
    summarize(r)
  index = {(r.get("size"), r.get("dtype"), r["op"], r["mode"]): r for r in rows}
  for r in rows:
    base = (r.get("size"), r.get("dtype"))
    copy = None
    if r["group"] in FLOORED:
      copy_mode = "fwd+bwd" if r["mode"].endswith("fwd+bwd") else "fwd"
      copy = index.get(base + (COPY, copy_mode))
    ref = index.get(base + (r["ref"], r["mode"])) if r.get("ref") else None
    r["vs_copy"], r["vs_copy_ci"] = round_ratio(r, copy)
    r["vs_ref"], r["vs_ref_ci"] = round_ratio(r, ref)


def fmt(v, width=8, digits=2) -> str:
  return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def fmt_ci(ci) -> str:
  return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
  """One line per row; a blank line between size/dtype/group blocks."""
  header = (
    f"{'op':<46} {'size':<6} {'dtype':<9} {'mode':<14} {'median ms':>10} "
    f"{'vs copy':>8} {'vs ref':>8} {'ref 95% CI':>11} {'n':>4}"
  )
  lines = [header, "-" * len(header)]
  previous = None
  for r in rows:
    group = (r.get("size"), r.get("dtype"), r["group"])
    if previous is not None and group != previous:
      lines.append("")
    previous = group
    median = f"{r['median_ms']:10.3f}" if r["median_ms"] is not None else f"{'FAILED':>10}"
    lines.append(
      f"{r['op']:<46} {str(r.get('size', '-')):<6} {str(r.get('dtype', '-')):<9} "
      f"{r['mode']:<14} {median} {fmt(r['vs_copy'])} {fmt(r['vs_ref'])} "
      f"{fmt_ci(r.get('vs_ref_ci')) if r.get('vs_ref') else '-':>11} {r['n']:>4}"
    )
  return "\n".join(lines)


def format_memory(memory: list[dict[str, Any]]) -> str:
  """One line per memory row: kept and temporary bytes per element, the residuals."""
  header = f"{'op':<46} {'size':<6} {'dtype':<9} {'kept B/elem':>11} {'temp B/elem':>11}  residuals"
  lines = [header, "-" * len(header)]
  for m in memory:
    res = ", ".join(m.get("residuals", [])) or m.get("error", "")
    lines.append(
      f"{m['op']:<46} {m['size']:<6} {m['dtype']:<9} "
      f"{fmt(m.get('bytes_per_element'), 11)} {fmt(m.get('temp_bytes_per_element'), 11)}"
      f"  {res[:60]}"
    )
  return "\n".join(lines)


def load_targets(path: str = TARGETS_PATH) -> dict[str, Any]:
  with open(path, "rb") as f:
    return tomllib.load(f)


def verdict(
  name: str, value, limit: float, unit: str = "x", same_program: bool = False
) -> dict[str, Any]:
  """One target: PASS/FAIL/SKIP, and ``decisive`` when the whole 95 % interval is on the
  verdict's side of the limit. ``value`` is a number, None, or ``(value, interval)``."""
  value, ci = value if isinstance(value, tuple) else (value, None)
  result = "SKIP" if value is None else ("PASS" if value <= limit else "FAIL")
  decisive = None if ci is None or value is None else (ci[1] <= limit or ci[0] > limit)
  if same_program and value is not None and limit >= 1.0:
    result, decisive = "PASS", True  # the same XLA program: a ratio of 1 by construction
  return {
    "target": name,
    "measured": value,
    "ci95": ci,
    "limit": limit,
    "unit": unit,
    "verdict": result,
    "decisive": decisive,
    "same_program": same_program,
  }


def ratio_targets(
  spec: dict[str, Any], index: dict[tuple, dict[str, Any]], dtype: str | None
) -> list[dict[str, Any]]:
  """The targets of one ``[[ratio]]`` entry for ``dtype`` (None: an entry without sizes)."""
  targets = []
  for size in spec.get("sizes", [None]):
    for mode in spec["modes"]:
      for op, bound in spec["ops"].items():
        limit = bound.get(dtype) if isinstance(bound, dict) else bound
        if limit is None:
          continue
        row = index.get((size, dtype, op, mode))
        value = (
          (None, None) if row is None else (row.get(spec["ratio"]), row.get(spec["ratio"] + "_ci"))
        )
        same = spec.get("same_program", False) and bool((row or {}).get("same_program_as_ref"))
        name = spec["title"].format(op=op, mode=mode, size=size, dtype=dtype, limit=limit)
        targets.append(verdict(name, value, limit, same_program=same))
  return targets


def evaluate_targets(
  rows: list[dict[str, Any]],
  memory: list[dict[str, Any]],
  dtypes: list[str],
  spec: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
  """Every target of ``spec`` (default: targets.toml) for the ``dtypes`` run, in the
  order the file's comments give; a target whose row was not run is SKIP."""
  spec = load_targets() if spec is None else spec
  index = {(r.get("size"), r.get("dtype"), r["op"], r["mode"]): r for r in rows}
  sized = [s for s in spec.get("ratio", []) if "sizes" in s]
  targets = [t for dtype in dtypes for s in sized for t in ratio_targets(s, index, dtype)]
  for s in spec.get("ratio", []):
    if "sizes" not in s:
      targets += ratio_targets(s, index, None)
  for s in spec.get("memory", []):
    for m in memory:
      if m["op"] == s["op"]:
        name = s["title"].format(size=m["size"], dtype=m["dtype"], limit=s["limit"])
        targets.append(verdict(name, m.get("residual_bytes"), s["limit"], " B"))
  return targets


def format_targets(targets: list[dict[str, Any]]) -> str:
  """The TARGETS section: verdict, '~' when within noise, the target, the measurement."""
  lines = [
    "TARGETS ([95 % interval over rounds]; '~' = the interval straddles the "
    "limit: within this machine's noise)"
  ]
  for t in targets:
    value = "not measured" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}"
    if t.get("ci95"):
      value += f" [{fmt_ci(t['ci95'])}]"
    mark = "~" if t.get("decisive") is False else " "
    if t.get("same_program"):
      value += " measured; the compiled XLA programs are identical"
    lines.append(f"  {t['verdict']:<4}{mark} {t['target']:<72} {value}")
  counts = {v: sum(t["verdict"] == v for t in targets) for v in ("PASS", "FAIL", "SKIP")}
  noisy = sum(t.get("decisive") is False for t in targets)
  lines.append(
    f"  {counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped; "
    f"{noisy} within noise (~)"
  )
  return "\n".join(lines)


def rounded_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows with their times in seconds rounded to 1 ns, for the JSON."""
  return [
    {
      k: ([round(t, 9) for t in v] if k in ("times_s", "round_medians_s") else v)
      for k, v in r.items()
    }
    for r in rows
  ]


def write_json(results: dict[str, Any], path: str) -> None:
  """Writes ``results`` to ``path``, creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)

"""claims.md: one line per claim tested, with its experiment, estimate and verdict.

Verdicts: ``reproduced`` (the interval lies on the claimed side of 0, or an
equivalence test passed for a "no difference" claim), ``contradicted`` (it lies on
the other side, or excludes 0 where the claim says "no difference"),
``inconclusive`` (anything else). See :func:`study.stats.verdict`.
"""

from __future__ import annotations

import dataclasses
import math

from study import stats


@dataclasses.dataclass(frozen=True)
class Claim:
  source: str
  statement: str
  experiment: str
  estimate: str
  verdict: str
  note: str = ""


def _points(d: dict) -> str:
  if math.isnan(d["low"]):
    return f"{100 * d['mean']:+.1f} points (n = {d['n']}, no interval)"
  return (
    f"{100 * d['mean']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
    f"(n = {d['n']}, Holm p = {d.get('p_holm', float('nan')):.2g})"
  )


def from_difference(
  source: str,
  statement: str,
  experiment: str,
  diff: dict,
  *,
  expected_sign: int | None = None,
  equivalence: bool | None = None,
  note: str = "",
) -> Claim:
  """A claim about a paired difference (a ``contrast`` dict), judged by its 95 % interval.

  With a Holm-adjusted p-value present, an interval that excludes 0 counts only if
  the adjusted test also rejects, so a family of tests does not inflate verdicts.
  """
  low, high = diff["low"], diff["high"]
  if diff.get("reject_holm") is False and not (equivalence is not None and equivalence):
    low, high = min(low, 0.0), max(high, 0.0)  # not significant after correction
  verdict = stats.verdict(low, high, expected_sign=expected_sign, equivalence=equivalence)
  return Claim(source, statement, experiment, _points(diff), verdict, note)


def to_markdown(claims: list[Claim], header: str) -> str:
  lines = [
    header,
    "",
    "| # | claim | source | experiment | estimate [95 % interval] | verdict | note |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, c in enumerate(claims, 1):
    cells = [str(i), c.statement, c.source, c.experiment, c.estimate, f"**{c.verdict}**", c.note]
    lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
  counts = {
    v: sum(c.verdict == v for c in claims) for v in ("reproduced", "contradicted", "inconclusive")
  }
  lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(claims)} claims."]
  return "\n".join(lines) + "\n"

"""Tests of examples/study/plots.py, the figures of a compare_dropout.py run.

Records are synthetic and small, built here with the schema the study writes, so the
tests run on a clean machine: plot_all writes a valid PNG for every experiment present
and nothing for the absent ones, a record with only `theory` works, a one-seed record
(NaN sds) still renders, the footer is built from the record, and `regenerate` and the
command line redraw a saved results.json.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import models
from study import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL = ("theory", "headline", "recalibration", "dose", "width", "depth", "orders")
FILES = {
  "theory": ["theory.png"],
  "headline": ["headline.png", "headline_contrasts.png", "variance_shift.png"],
  "recalibration": ["recalibration.png"],
  "dose": ["dose.png"],
  "width": ["width.png"],
  "depth": ["depth.png"],
  "orders": ["orders.png"],
}
NAN = float("nan")


def _layers(shift: float, n: int = 3) -> dict:
  """BN layer summaries whose shift grows with depth from ``shift``."""
  names = [f"bn{i}" for i in range(n)] + ["head_bn"]
  return {
    p: {
      "shift": shift * (i + 1),
      "paper_shift": shift * (i + 1),
      "delta": 1 / shift,
      "mean_offset": 0.01,
    }
    for i, p in enumerate(names)
  }


def _entry(
  config: str,
  method: str,
  placement: str,
  s2: float,
  acc: float,
  sd: float,
  seeds: int,
  tag: str = "",
  extension: bool = False,
  layers: int = 3,
) -> dict:
  """One summary entry as `experiments.summarize` writes it."""
  shift = 1.0 + s2 * (2.0 if placement in ("pooled", "direct", "weight") else 0.01)
  return {
    "config": config,
    "method": method,
    "placement": placement,
    "value": s2,
    "s2": s2,
    "order": "conv-bn-act-drop-pool",
    "tag": tag,
    "extension": extension,
    "seeds": list(range(seeds)),
    "test_acc": acc,
    "test_acc_sd": sd,
    "test_loss": 1 - acc,
    "test_loss_sd": sd,
    "train_acc": acc,
    "train_acc_sd": sd,
    "recal_test_acc": min(1.0, acc + 0.1),
    "recal_test_acc_sd": sd,
    "layers": _layers(shift, layers),
    "shift": shift,
    "paper_shift": shift,
    "mean_offset": 0.01,
  }


def _theory() -> dict:
  """Closed-form rows (one a Uout extension) and pooled-path rows without a prediction."""
  rows = []
  for op, ext in (("dropout", False), ("uout", False), ("uout", True)):
    for s2 in (1 / 3, 1.0):
      rows.append(
        {
          "check": f"Eq. 8 {op}",
          "op": op,
          "s2": s2,
          "params": {},
          "quantity": "Delta",
          "predicted": 0.5 * s2,
          "measured": 0.5 * s2 + 1e-3,
          "ci_low": 0.5 * s2,
          "ci_high": 0.5 * s2 + 2e-3,
          "agrees": True,
          "extension": ext,
        }
      )
      for quantity, linear in (("Delta", 0.6), ("mean inflation", 1.0)):
        rows.append(
          {
            "check": "pooled path",
            "op": op,
            "s2": s2,
            "params": {},
            "quantity": quantity,
            "predicted": None,
            "measured": linear * 0.95,
            "ci_low": linear * 0.94,
            "ci_high": linear * 0.96,
            "agrees": None,
            "extension": ext,
            "linear": linear,
          }
        )
  return {"rows": rows, "text": ""}


def _headline(seeds: int, sd: float) -> dict:
  """Baseline plus two ops at two placements, and contrasts in two families."""
  summary = [_entry("no noise", "none", "none", 0.0, 0.9, sd, seeds)]
  for place in ("pooled", "head"):
    for method, acc in (("dropout", 0.3 if place == "pooled" else 0.92), ("gaussian", 0.85)):
      summary.append(_entry(f"{method} rate=0.5 {place}", method, place, 1.0, acc, sd, seeds))
  contrasts = [
    {
      "name": f"c{i}",
      "family": fam,
      "metric": "test_acc",
      "mean": m,
      "low": m - 0.02,
      "high": m + 0.02,
      "n": seeds,
      "p_holm": 0.01,
      "reject_holm": i % 2 == 0,
    }
    for i, (fam, m) in enumerate((("vs none", -0.6), ("vs none", 0.01), ("placement", 0.6)))
  ]
  return {"summary": summary, "contrasts": contrasts}


def _recalibration(sd: float) -> dict:
  """Two configurations with three variants each."""
  variants = ["trained", "mean+var", "train mode"]
  table = []
  for config, acc in (("dropout rate=0.5 pooled", 0.3), ("gaussian rate=0.5 pooled", 0.8)):
    row = {"config": config, "fraction_recovered": 0.7}
    for k, v in enumerate(variants):
      row[v], row[f"{v} sd"] = acc + 0.05 * k, sd
    table.append(row)
  return {"table": table, "variants": variants}


def _dose(seeds: int, sd: float) -> dict:
  """Per placement a baseline and two ops at two levels (Uout's top level an extension)."""
  summary = []
  for place in ("direct", "weight", "pooled"):
    summary.append(
      _entry(f"no noise ({place})", "none", "none", 0.0, 0.9, sd, seeds, tag=f"({place})")
    )
    for method in ("dropout", "uout"):
      for s2 in (0.1, 1.0):
        summary.append(
          _entry(
            f"{method} {s2} {place}",
            method,
            place,
            s2,
            0.9 - 0.3 * s2,
            sd,
            seeds,
            extension=method == "uout" and s2 == 1.0,
          )
        )
  return {"summary": summary, "levels": [0.1, 1.0]}


def _width() -> dict:
  """Delta per width, with per-seed checks."""
  table = [
    {"d": d, "eq12": 0.4, "exact_linear": 0.39, "monte_carlo": 0.38, "measured_bn": 0.3 + 0.01 * k}
    for k, d in enumerate((8, 16, 64))
  ]
  checks = [dict(t, seed=0) for t in table]
  return {
    "table": table,
    "checks": checks,
    "rank_correlation": {"rho": NAN, "low": NAN, "high": NAN},
  }


def _depth(seeds: int, sd: float) -> dict:
  """No noise, noise in all blocks and in the first block, at two depths."""
  summary = []
  for blocks in (2, 3):
    summary.append(
      _entry(
        f"no noise {blocks} blocks",
        "none",
        "none",
        0.0,
        0.9,
        sd,
        seeds,
        tag=f"{blocks} blocks",
        layers=blocks,
      )
    )
    for which in ("all", "first"):
      summary.append(
        _entry(
          f"dropout rate=0.5 pooled {blocks} blocks, {which}",
          "dropout",
          "pooled",
          1.0,
          0.5,
          sd,
          seeds,
          tag=f"{blocks} blocks, {which}",
          layers=blocks,
        )
      )
  return {"summary": summary}


def _orders(seeds: int, sd: float) -> dict:
  """Three quoted orders and one (the IC order) without a quoted loss."""
  orders = list(models.PUBLISHED_ORDER_LOSSES)[:3] + ["act-bn-drop-conv-pool"]
  summary = []
  for k, order in enumerate(orders):
    e = _entry(f"dropout order [{order}]", "dropout", "order", 1 / 3, 0.5, sd, seeds)
    summary.append(dict(e, order=order, test_loss=1.7 + 0.01 * k))
  return {
    "summary": summary,
    "rank_correlation": {"rho": 0.5, "low": -0.5, "high": 1.0, "p_value": 0.6},
  }


def make_record(experiments=ALL, seeds: int = 3) -> dict:
  """A minimal record with the named experiments; one seed gives NaN sds, as the study does."""
  sd = NAN if seeds == 1 else 0.01
  builders = {
    "theory": _theory,
    "headline": lambda: _headline(seeds, sd),
    "recalibration": lambda: _recalibration(sd),
    "dose": lambda: _dose(seeds, sd),
    "width": _width,
    "depth": lambda: _depth(seeds, sd),
    "orders": lambda: _orders(seeds, sd),
  }
  return {
    "args": {
      "dataset": "mnist1d",
      "train_size": 500,
      "epochs": 7,
      "seeds": seeds,
      "order_epochs": 3,
      "order_seeds": seeds,
      "theory_samples": 4096,
    },
    "dataset": {"name": "mnist1d", "train_size": 500, "test_size": 100},
    "environment": {
      "regjax": "9.9.9",
      "jax": "0.1.2",
      "flax": "3.4.5",
      "cpu": "TestCPU",
      "cpu_count": 4,
      "backend": "cpu",
    },
    "date": "2030-01-02T03:04:05+00:00",
    "experiments": {name: builders[name]() for name in experiments},
  }


def _expected(experiments) -> set[str]:
  return {f for name in experiments for f in FILES[name]}


def _check_pngs(paths, run_dir) -> set[str]:
  """Every returned path is a non-empty PNG in ``run_dir``; returns the file names."""
  names = set()
  for path in paths:
    assert os.path.dirname(path) == str(run_dir)
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
    names.add(os.path.basename(path))
  assert names == set(os.listdir(run_dir))
  return names


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """plot_all on a record with every experiment, drawn once for the tests that read it."""
  run_dir = tmp_path_factory.mktemp("full")
  return plots.plot_all(make_record(), str(run_dir)), run_dir


def test_every_experiment_gets_its_figures(full_run):
  paths, run_dir = full_run
  assert _check_pngs(paths, run_dir) == _expected(ALL)


def test_only_theory(tmp_path):
  paths = plots.plot_all(make_record(["theory"]), str(tmp_path))
  assert _check_pngs(paths, tmp_path) == {"theory.png"}


@pytest.mark.parametrize("present", [("recalibration",), ("orders",), ("width", "depth")])
def test_absent_experiments_draw_nothing(tmp_path, present):
  paths = plots.plot_all(make_record(present), str(tmp_path))
  assert _check_pngs(paths, tmp_path) == _expected(present)


def test_one_seed_nan_sds_render(tmp_path, capsys):
  record = make_record(seeds=1)
  assert math.isnan(record["experiments"]["headline"]["summary"][0]["test_acc_sd"])
  paths = plots.plot_all(record, str(tmp_path))
  assert _check_pngs(paths, tmp_path) == _expected(ALL)
  assert "skipped" not in capsys.readouterr().err


def test_empty_record_draws_nothing(tmp_path):
  assert plots.plot_all({"experiments": {}}, str(tmp_path)) == []
  assert plots.plot_all({}, str(tmp_path)) == []


def test_footer_is_built_from_the_record():
  record = make_record()
  text = plots.footer_text(record, "headline")
  for part in (
    "regjax 9.9.9",
    "jax 0.1.2",
    "flax 3.4.5",
    "TestCPU",
    "4 cores",
    "cpu",
    "mnist1d 500 train",
    "7 epochs",
    "3 seeds",
    "2030-01-02",
  ):
    assert part in text, part
  # The order sweep has its own epochs; theory trains nothing and names its samples.
  assert "3 epochs" in plots.footer_text(record, "orders")
  theory = plots.footer_text(record, "theory")
  assert "4096 samples" in theory and "epochs" not in theory


def test_footer_counts_seeds_from_the_data_and_tolerates_gaps():
  record = make_record(seeds=1)
  assert "1 seed;" in plots.footer_text(record, "headline")
  assert plots.footer_text({}) == ""
  assert plots.footer_text({"environment": {"jax": "1"}}, "dose").startswith("jax 1")


def test_regenerate_round_trips_a_json_file(tmp_path):
  record = make_record(["theory", "width"])
  path = tmp_path / "results.json"
  # NaN is written as the study writes it (json's default allow_nan).
  path.write_text(json.dumps(record), encoding="utf-8")
  out = tmp_path / "figures"
  paths = plots.regenerate(str(path), str(out))
  assert _check_pngs(paths, out) == {"theory.png", "width.png"}


def test_command_line(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps(make_record(["width"])), encoding="utf-8")
  env = dict(os.environ, PYTHONPATH=str(EXAMPLES), MPLBACKEND="Agg")
  help_text = subprocess.run(
    [sys.executable, "-m", "study.plots", "--help"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "RESULTS_JSON" in help_text.upper()
  out = tmp_path / "out"
  done = subprocess.run(
    [sys.executable, "-m", "study.plots", str(path), str(out)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert done.stdout.split() == [str(out / "width.png")]


def test_a_failing_figure_is_reported_not_raised(tmp_path, capsys):
  record = make_record(["width", "depth"])
  record["experiments"]["width"]["table"] = [{"d": "not a number"}]
  paths = plots.plot_all(record, str(tmp_path))
  assert {os.path.basename(p) for p in paths} >= {"depth.png"}
  for path in paths:
    assert pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC
  assert "width figure plot_width skipped" in capsys.readouterr().err

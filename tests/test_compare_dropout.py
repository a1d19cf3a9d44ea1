"""Tests of the main study, examples/compare_dropout.py: its statistics helpers,
its configuration grid, and --quick smoke runs on MNIST-1D and mock tfds data."""

import csv
import json
import math
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("mnist1d")  # the `examples` extra
tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import compare_dropout as cd  # noqa: E402


def test_matched_variance_values():
  for method in ("dropout", "gaussian", "uout"):
    for s2 in (1 / 300, 0.25, 1.0, 3.0):
      assert cd.noise_variance(method, cd.value_for_variance(method, s2)) == pytest.approx(s2)
  assert cd.value_for_variance("uout", 1.0) == pytest.approx(math.sqrt(3))


def test_default_grid_pairs_every_op_at_both_variances():
  configs = cd.default_configs()
  assert len(configs) == 13 and configs[0].method == "none"
  levels = {round(c.s2, 9) for c in configs if c.method != "none"}
  assert levels == {round(1.0, 9), round(0.01 / 3, 9)}  # dropout 0.5's and uout 0.1's
  for placement in ("block", "head"):
    for method in ("dropout", "gaussian", "uout"):
      cell = [c for c in configs if (c.method, c.placement) == (method, placement)]
      assert sorted(c.setting for c in cell) == ["customary", "matched"]
      assert {round(c.s2, 9) for c in cell} == levels
  assert len({c.label for c in configs}) == 13


def test_t_quantiles_and_paired_significance():
  assert cd.t95(2) == pytest.approx(4.303) and cd.t95(12) == cd.t95(10) and cd.t95(0) == math.inf
  # A consistent gain is significant; the same mean gain with seed-to-seed noise is not.
  diff, half, sig = cd._paired([0.9, 0.91, 0.92], [0.8, 0.81, 0.82])
  assert diff == pytest.approx(0.1) and sig
  diff, half, sig = cd._paired([0.9, 0.7, 1.0], [0.8, 0.8, 0.7])
  assert diff == pytest.approx(0.1) and not sig and half > 0.1


def _check_run_folder(folder: pathlib.Path, expected_runs: int):
  record = json.loads((folder / "results.json").read_text())
  assert len(record["runs"]) == expected_runs
  with open(folder / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == expected_runs
  for name in ("accuracy.png", "variance_shift.png", "recalibration.png"):
    assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for run in record["runs"]:
    assert 0 <= run["test_acc"] <= 1 and 0 <= run["recal_test_acc"] <= 1
    assert run["shift_per_layer"] and all(v >= 1 for v in run["shift_per_layer"].values())
  return record


def test_quick_default_study_on_mnist1d(tmp_path, capsys):
  record = cd.main(["--quick", "--no-progress", "--out-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "no noise" in out and "uout beta=1.73 before BN" in out and str(tmp_path) in out
  record = _check_run_folder(tmp_path, 13 * 2)
  assert record["study"] == "placement" and len(record["summary"]) == 13
  assert len(record["matched_variance_contrasts"]) == 2 * 2 * 2  # placements x levels x ops
  # Four BN layers (three conv blocks and the head): the shift is measured at each.
  assert all(list(r["shift_per_layer"]) == ["bn0", "bn1", "bn2", "head_bn"]
             for r in record["runs"])
  assert {r["seed"] for r in record["runs"] if r["method"] == "none"} == {0, 1}


def test_quick_order_sweep_on_mock_mnist(tmp_path, capsys):
  with tfds.testing.mock_data(num_examples=64):
    record = cd.main(["--dataset", "mnist", "--quick", "--batch-size", "32", "--no-progress",
                      "--orders", "conv-drop-bn-act-pool", "--out-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "claimed loss" in out and "0.0324" in out  # the published number for this order
  record = _check_run_folder(tmp_path, 2)
  assert record["study"] == "orders" and record["dataset"] == "mnist"
  assert record["runs"][0]["order"] == "conv-drop-bn-act-pool"


def test_unavailable_dataset_is_one_line_not_a_trace(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    cd.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--quick", "--no-progress"])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "Traceback" not in err


def test_rank_correlation_with_ties():
  np.testing.assert_array_equal(cd._ranks([3.0, 1.0, 2.0, 2.0]), [4.0, 1.0, 2.5, 2.5])
  summary = [{"order": o, "test_loss": loss} for o, loss in cd.CLAIMED_ORDER_LOSS.items()]
  rho, n = cd.claimed_rank_correlation(summary, cd.CLAIMED_ORDER_LOSS)
  assert n == 10 and rho == pytest.approx(1.0)
  reversed_summary = [{"order": e["order"], "test_loss": -e["test_loss"]} for e in summary]
  assert cd.claimed_rank_correlation(reversed_summary, cd.CLAIMED_ORDER_LOSS)[0] == pytest.approx(-1)

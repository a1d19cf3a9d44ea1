"""The study's command line (examples/compare_dropout.py): option checks, and a --quick
pass of every experiment on MNIST-1D, digits and mock tfds data."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mnist1d")  # the `examples` extra
tfds = pytest.importorskip("tensorflow_datasets")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from study import cli, experiments


def test_defaults_quick_and_full():
  args = cli.parse_args([])
  assert args.experiments == ("theory", "headline", "recalibration")
  assert (args.seeds, args.epochs, args.train_size, args.theory_samples) == (5, 60, 1000, 2**20)
  quick = cli.parse_args(["--quick"])
  assert (quick.seeds, quick.epochs, quick.train_size) == (2, 2, 256)
  # Explicit options win over --quick's smaller values.
  explicit = cli.parse_args(["--quick", "--seeds", "3", "--epochs", "4"])
  assert (explicit.seeds, explicit.epochs) == (3, 4)
  full = cli.parse_args(["--full"])
  assert full.experiments == cli.ALL and full.seeds == 10 and full.order_seeds == 5
  # Recalibration reuses the headline's runs; --orders implies the order sweep.
  assert cli.parse_args(["--experiments", "recalibration"]).experiments == (
    "headline",
    "recalibration",
  )
  assert "orders" in cli.parse_args(["--experiments", "theory", "--orders", "all"]).experiments
  assert cli.parse_args(["--dataset", "digits"]).train_size is None


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["--orders", "conv-bogus"], "--orders"),
    (["--order-value", "-0.1"], "--order-value"),
    (["--order-value", "1.0"], "--order-value"),
    (["--order-noise", "uout", "--order-value", "nan"], "--order-value"),
    (["--experiments", "nope"], "--experiments"),
    (["--seeds", "0"], "--seeds"),
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--margin", "0"], "--margin"),
    (["--train-size", "10"], "--train-size"),
    (["--data-dir", "/nowhere"], "--data-dir"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--bogus"], "--bogus"),
  ],
)
def test_bad_options_are_one_line_errors(argv, needle, capsys):
  with pytest.raises(SystemExit) as info:
    cli.parse_args(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith("compare_dropout.py: error:") and needle in err


def test_missing_tfds_dataset_is_one_line(tmp_path):
  """No --data-dir and nothing prepared in TFDS's default folder: one line, exit 2."""
  env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
  proc = subprocess.run(
    [
      sys.executable,
      str(EXAMPLES / "compare_dropout.py"),
      "--dataset",
      "mnist",
      "--experiments",
      "headline",
      "--quick",
      "--no-progress",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 2
  err = proc.stderr.strip()
  assert "Traceback" not in err and err.startswith("error: dataset 'mnist' is not prepared")
  assert len(err.splitlines()) == 1


def test_help_lists_every_option():
  text = cli.build_parser().format_help()
  for action in cli.build_parser()._actions:
    assert action.help, action.option_strings
  assert "--full" in text and "--experiments" in text


def _record(folder: pathlib.Path) -> dict:
  record = json.loads((folder / "results.json").read_text())
  assert (folder / "claims.md").read_text().startswith("# Claims tested")
  env = record["environment"]
  for key in (
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "scipy",
    "cpu",
    "cpu_details",
    "cpu_count",
    "xla_flags",
  ):
    assert key in env
  return record


def _pngs(folder: pathlib.Path, names):
  for name in names:
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_quick_default_run(tmp_path, capsys):
  record = cli.main(["--quick", "--no-progress", "--out-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "== theory" in out and "== headline" in out and "== recalibration" in out
  record = _record(tmp_path)
  runs = record["experiments"]["headline"]["rows"]
  assert len(runs) == len(experiments.headline_configs()) * 2
  assert all(list(r["layers"]) == ["bn0", "bn1", "bn2", "head_bn"] for r in runs)
  for r in runs:
    assert 0 <= r["test_acc"] <= 1 and 0 <= r["recal_test_acc"] <= 1
    for layer in r["layers"].values():
      assert layer["shift"] >= 1 and layer["paper_shift"] >= 1 and layer["mean_offset"] >= 0
  with open(tmp_path / "results.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == len(runs)
  verdicts = {c["verdict"] for c in record["claims"]}
  assert verdicts <= {"reproduced", "contradicted", "inconclusive"}
  # Theory claims hold even in the small Monte Carlo.
  theory = [
    c
    for c in record["claims"]
    if c["experiment"].startswith("theory") and "closed form matches" in c["statement"]
  ]
  assert theory and all(c["verdict"] == "reproduced" for c in theory)
  _pngs(tmp_path, ["theory", "headline", "headline_contrasts", "recalibration"])


def test_quick_dose_width_depth(tmp_path):
  record = cli.main(
    ["--quick", "--no-progress", "--experiments", "dose,width,depth", "--out-dir", str(tmp_path)]
  )
  exps = _record(tmp_path)["experiments"]
  assert set(exps) == {"dose", "width", "depth"} == set(record["experiments"])
  assert {t["placement"] for t in exps["dose"]["interaction"]} == {"direct", "weight", "pooled"}
  width = exps["width"]["table"]
  assert [t["d"] for t in width] == [8, 64]
  for t in width:  # every Delta is a variance ratio in (0, 1.5)
    for key in ("eq12", "exact_linear", "monte_carlo", "measured_bn"):
      assert 0 < t[key] < 1.5
  assert {len(t["per_layer_shift"]) for t in exps["depth"]["table"]} == {2, 3}
  _pngs(tmp_path, ["dose", "width", "depth"])


def test_quick_orders_on_mock_mnist_and_digits(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    cli.main(
      [
        "--dataset",
        "mnist",
        "--quick",
        "--no-progress",
        "--experiments",
        "orders",
        "--orders",
        f"{experiments.models.DEFAULT_ORDER},{experiments.IC_ORDER}",
        "--out-dir",
        str(tmp_path / "orders"),
      ]
    )
  orders = _record(tmp_path / "orders")["experiments"]["orders"]
  assert [e["order"] for e in orders["summary"]] == [
    experiments.models.DEFAULT_ORDER,
    experiments.IC_ORDER,
  ]
  assert any("IC" in c["name"] for c in orders["contrasts"])
  _pngs(tmp_path / "orders", ["orders"])
  cli.main(
    [
      "--dataset",
      "digits",
      "--quick",
      "--no-progress",
      "--experiments",
      "headline",
      "--out-dir",
      str(tmp_path / "digits"),
    ]
  )
  digits = _record(tmp_path / "digits")
  assert digits["dataset"] == {"name": "digits", "train_size": 256, "test_size": 500}


def test_claim_verdicts_respect_holm():
  from study import claims

  diff = {"mean": 0.03, "low": 0.01, "high": 0.05, "n": 10, "p_holm": 0.2, "reject_holm": False}
  # The raw interval excludes 0, but Holm does not reject: not a finding.
  assert claims.from_difference("s", "x", "e", diff, expected_sign=+1).verdict == "inconclusive"
  diff.update(p_holm=0.001, reject_holm=True)
  assert claims.from_difference("s", "x", "e", diff, expected_sign=+1).verdict == "reproduced"
  assert claims.from_difference("s", "x", "e", diff, expected_sign=-1).verdict == "contradicted"
  # "No difference" needs an equivalence test; an excluded 0 contradicts it.
  assert claims.from_difference("s", "x", "e", diff, equivalence=False).verdict == "contradicted"
  table = claims.to_markdown(
    [claims.from_difference("s", "a | b", "e", diff, expected_sign=+1)], "# h"
  )
  assert "a / b" in table and "1 reproduced, 0 contradicted, 0 inconclusive of 1 claims." in table

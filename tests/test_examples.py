"""Smoke tests of the examples: they run end to end offline and write their metrics."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mnist1d")  # the `examples` extra

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_mnist1d_help():
  out = subprocess.run([sys.executable, str(EXAMPLES / "train_mnist1d.py"), "--help"],
                       capture_output=True, text=True, check=True)
  assert "--noise" in out.stdout and "--quick" in out.stdout


@pytest.mark.parametrize("noise", ["dropout", "uout"])
def test_train_mnist1d_quick(tmp_path, noise):
  example = _load("train_mnist1d")
  out = tmp_path / "metrics.json"
  metrics = example.main(["--quick", "--no-progress", "--noise", noise, "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["final"] == metrics["final"]
  assert saved["config"]["noise"] == noise
  # Two epochs learn something: 5 standard errors above chance (10 %) on 1000 test samples.
  assert saved["final"]["test_acc"] > 0.1 + 5 * (0.1 * 0.9 / 1000) ** 0.5
  assert len(saved["history"]) == 2

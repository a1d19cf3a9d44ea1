"""The README's code runs as written, and CI runs the README's test command."""

import pathlib
import re
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_quickstart_blocks():
  # functions, linen, NNX and diagnostics, each complete on its own
  assert len(BLOCKS) >= 4
  assert any("regjax.linen" in b for b in BLOCKS) and any("regjax.nnx" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_blocks_run(index):
  block = BLOCKS[index]
  namespace: dict = {}  # fresh: every block brings its own imports and data
  exec(compile(block, f"README.md block {index}", "exec"), namespace)
  if "logits" in namespace:  # the linen quickstart
    assert namespace["logits"].shape == (128, 10)
    assert "batch_stats" in namespace["updates"]
  if "y_eval" in namespace:  # the NNX quickstart
    assert namespace["y_train"].shape == namespace["y_eval"].shape == (128, 10)
    assert not np.allclose(namespace["y_train"], namespace["y_eval"])
  if "shift" in namespace:  # diagnostics: dropout keep 0.5 into BN gives delta = 0.5
    assert abs(float(np.mean(namespace["shift"].delta)) - 0.5) < 0.05
    recalibrated = namespace["variables"]["batch_stats"]["BatchNorm_0"]["var"]
    np.testing.assert_allclose(recalibrated, np.var(np.asarray(namespace["x"]), axis=0), rtol=1e-5)


def test_ci_runs_the_readme_test_command():
  install_and_test = re.search(r"# 2\. Install and run the checks.*\n(.*)\n", README).group(1)
  ci = (ROOT / ".ci" / "run").read_text()
  install = 'pip install -e ".[test,examples,docs,equinox]"'
  for command in (install, "bash scripts/check.sh"):
    assert command in install_and_test and command in ci
  # The command installs every extra pyproject.toml declares, so CI tests all of them.
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  extras = set(pyproject["project"]["optional-dependencies"])
  assert extras == set(re.search(r"\[(.*)\]", install).group(1).split(","))
  checks = (ROOT / "scripts" / "check.sh").read_text()
  steps = (
    "ruff check .",
    "ruff format --check .",
    "mypy",
    "mkdocs build --strict",
    "python -m pytest",
  )
  at = {step: checks.find(f"\n{step}") for step in steps}  # each at a line's start, in order
  assert -1 not in at.values() and list(at.values()) == sorted(at.values()), at
  # CI also builds the wheel and imports it, installed, from outside the source tree.
  for step in (
    "-m build",
    'twine" check --strict',
    "check_dist.py archives",
    "installed --equinox",
  ):
    assert step in ci, step

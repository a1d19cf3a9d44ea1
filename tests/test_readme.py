"""The README's code runs as written, and CI runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:  # later blocks build on names defined by earlier ones
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (128, 10)
  assert "batch_stats" in namespace["updates"]


def test_ci_runs_the_readme_test_command():
  install_and_test = re.search(r"# 2\. Install and run the checks.*\n(.*)\n", README).group(1)
  ci = (ROOT / ".ci" / "run").read_text()
  for command in ('pip install -e ".[test,examples]"', "bash scripts/check.sh"):
    assert command in install_and_test and command in ci
  checks = (ROOT / "scripts" / "check.sh").read_text()
  for step in ("ruff check .", "ruff format --check .", "mypy", "python -m pytest"):
    assert step in checks

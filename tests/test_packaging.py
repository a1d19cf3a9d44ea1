"""The release metadata agrees with itself: version, changelog, tag, license, extras.

Building and installing the artifacts is CI's job (.ci/run, .ci/check_dist.py); these checks
read files only.
"""

import datetime
import pathlib
import re
import subprocess
import tomllib

import pytest

import regjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
# "## [1.2.3] - 2026-12-04" or "## [Unreleased]"
SECTION = re.compile(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", re.M)


def test_version_is_semver_and_read_from_the_package():
  assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)", regjax.__version__)
  assert PYPROJECT["project"]["dynamic"] == ["version"]
  assert "version" not in PYPROJECT["project"]
  version = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
  assert version == {"attr": "regjax.__version__"}


def test_changelog_newest_release_is_the_version():
  sections = SECTION.findall(CHANGELOG)
  assert sections[0] == ("Unreleased", ""), sections[:2]
  released = sections[1:]
  assert released, "no released version in CHANGELOG.md"
  assert released[0][0] == regjax.__version__, (released[0], regjax.__version__)
  dates = [datetime.date.fromisoformat(date) for _, date in released]  # every one dated
  assert dates == sorted(dates, reverse=True)
  # Each version once, and a link for each section heading at the bottom.
  names = [name for name, _ in sections]
  assert len(names) == len(set(names))
  for name in names:
    assert re.search(rf"^\[{re.escape(name)}\]: https://", CHANGELOG, re.M), name


def test_a_release_tag_on_this_commit_names_the_version():
  try:
    out = subprocess.run(
      ["git", "tag", "--points-at", "HEAD", "--list", "v*"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=30,
    )
  except (OSError, subprocess.TimeoutExpired):
    pytest.skip("git is not available")
  if out.returncode != 0:
    pytest.skip("not a git checkout")
  for tag in out.stdout.split():
    assert tag == f"v{regjax.__version__}", (tag, regjax.__version__)


def test_license_is_apache_2_and_declared_as_an_expression():
  project = PYPROJECT["project"]
  assert project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License\n                           Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert re.match(r"Copyright \d{4} The regjax authors\n", text)
  # setuptools >= 77 refuses license classifiers next to a license expression.
  assert not [c for c in project["classifiers"] if c.startswith("License ::")]
  requires = PYPROJECT["build-system"]["requires"]
  assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires), requires


def test_metadata_fields_and_extras():
  project = PYPROJECT["project"]
  assert project["readme"] == "README.md" and project["requires-python"] == ">=3.11"
  assert set(project["urls"]) == {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
  classifiers = project["classifiers"]
  assert "Typing :: Typed" in classifiers and (ROOT / "regjax" / "py.typed").is_file()
  pythons = sorted(c.rsplit(" ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c))
  assert pythons and pythons[0] == "3.11"
  extras = project["optional-dependencies"]
  assert {"test", "examples", "equinox", "docs"} <= set(extras)
  assert any(r.startswith("equinox>=") for r in extras["equinox"])
  for package in ("mkdocs>=", "mkdocs-material>=", "mkdocstrings[python]>="):
    assert any(r.startswith(package) for r in extras["docs"]), package


def test_sdist_manifest_and_docs_changelog():
  manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
  for line in ("include CHANGELOG.md", "include LICENSE", "prune tests", "prune docs"):
    assert line in manifest, line
  assert '--8<-- "CHANGELOG.md"' in (ROOT / "docs" / "changelog.md").read_text()

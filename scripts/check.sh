#!/usr/bin/env bash
# The project's checks, in the order CI runs them: lint, format, types, docs, tests.
# Run from anywhere after `pip install -e ".[test,examples,docs,equinox]"`; extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff check (lint)"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== mypy (regjax/)"
mypy
echo "== mkdocs build --strict (the docs site, into a temporary directory)"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
mkdocs build --strict --site-dir "$site"
echo "== pytest"
python -m pytest "$@"

#!/usr/bin/env bash
# The project's checks, in the order CI runs them: lint, format, types, tests.
# Run from anywhere after `pip install -e ".[test,examples]"`; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff check (lint)"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== mypy (regjax/)"
mypy
echo "== pytest"
python -m pytest "$@"

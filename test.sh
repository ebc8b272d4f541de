#!/usr/bin/env bash
# Set up and run every check: ruff, mypy (strict) on the package, and the whole test suite.
# Usage: ./test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "== ruff"
.venv/bin/ruff check ciserver tests migrations bench
echo "== mypy --strict (ciserver)"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"

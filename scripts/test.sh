#!/usr/bin/env bash
# One command from a fresh clone: install with test dependencies, check the import layers and
# lint, then run every test not marked gpu or slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/lint-imports --no-cache
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest -q -m "not gpu and not slow" "$@"

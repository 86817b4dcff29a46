#!/usr/bin/env bash
# One command from a fresh clone: install with test dependencies, then run every test not marked gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -m "not gpu" "$@"

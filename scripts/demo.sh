#!/usr/bin/env bash
# One command from a fresh clone: install, then train and compare all methods (logitpair demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/logitpair demo "$@"

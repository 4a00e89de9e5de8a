#!/usr/bin/env bash
# Set up .venv from scratch if needed and run the whole test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -rs tests "$@"

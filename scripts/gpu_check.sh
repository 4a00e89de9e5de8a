#!/usr/bin/env bash
# One-shot release check on a lent GPU machine (H100/H200): build the CUDA kernels, run the GPU
# tests, the development sweep and the kernel benchmark.  For a short development window run
# benchmarks/gpu_sweep.py alone (README, "Kernels").  Run from the repository root; awqlib is
# imported via PYTHONPATH=. (no pip install, no network).  Logs and JSON go to $OUT (default ./gpu_check_out): the JSONs, this
# script's log and a tarball of every step's log (the device tool returns at most 8 files).  Every step
# has its own timeout so one hang cannot eat the budget; a full run takes ~10-13 min on an H100/H200.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
# The device tool returns at most 8 files: per-step logs go to LOGS and come back as one tarball.
LOGS="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AWQLIB_CACHE="${AWQLIB_CACHE:-$PWD/.cache/awqlib-kernels}"   # JIT build dir (ignored by git)
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG="$OUT/gpu_check.log"
TUNE="${GPU_CHECK_TUNE:-0}"      # 1: also time every kernel variant (benchmarks/tune_kernels.py)
BENCH="${GPU_CHECK_BENCH:-1}"    # 0: skip benchmarks/bench_kernels.py
status=0

step() {  # step NAME TIMEOUT_S LOGFILE CMD...
  local name="$1" limit="$2" log="$3"; shift 3
  echo "=== [$name] (timeout ${limit}s) $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  tar czf "$OUT/logs.tgz" -C "$LOGS" .   # refreshed after every step: a killed run still returns its logs
  [ "$rc" -eq 0 ] || status=1
  return 0
}

{
  echo "date: $(date -u)"
  nvidia-smi || true
  nvcc --version 2>&1 | tail -2 || true
  "$PY" - <<'PY' || true
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for mod in ("transformers", "safetensors", "ninja"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "missing", e)
PY
} 2>&1 | tee "$LOG"

# 1. Build for the GPU at hand (JIT, cached under $AWQLIB_CACHE); verbose so ptxas warnings show.
step build 100 "$LOGS/build.log" "$PY" -c "
import logging; logging.basicConfig(level=logging.INFO)
import awqlib.ops, awqlib.kernels as k
print(k.build(verbose=True))"

# 2. Kernel tests (the loader reuses the build above).  No -x: on a first run every failing shape
#    is worth seeing; --maxfail bounds the cascade after a sticky CUDA error.  The argument-check
#    tests run in their own process (a crash in C++ error handling must not hide the rest).
T=tests/test_kernels_cuda.py
step test_kernels 240 "$LOGS/pytest_kernels.log" "$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=40 $T \
  --deselect $T::test_bad_arguments --deselect $T::test_variant_refuses_what_it_cannot_do --deselect $T::test_tiled_refuses_untiled_kernels
step test_bad_args 40 "$LOGS/pytest_kernels.log" "$PY" -m pytest -q -rs -p no:cacheprovider \
  $T::test_bad_arguments $T::test_variant_refuses_what_it_cannot_do $T::test_tiled_refuses_untiled_kernels
if grep -q "Segmentation fault\|Fatal Python error" "$LOGS/pytest_kernels.log"; then
  step debug_bad_args 60 "$LOGS/debug.log" "$PY" scripts/debug_bad_args.py
  if command -v cuda-gdb >/dev/null; then
    step gdb_backtrace 120 "$LOGS/debug.log" cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt \
      --args "$PY" scripts/debug_bad_args.py features_twice
  fi
fi

# 3. End to end on the GPU (logits vs the reference path, fused and not; AWQ on CUDA; accelerate
#    placement: CPU offload on one GPU, two-GPU cases where there are two).
step test_gpu_e2e 90 "$LOGS/pytest_gpu.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_e2e.py tests/test_placement.py

# 4. The development sweep (correctness gate of every kernel variant, rooflines, variants x shapes
#    x M vs fp16, SASS instructions/KB next to each; benchmarks/gpu_sweep.py), then the tuning data
#    and the kernel benchmark (each writes its own JSON).
step gpu_sweep 300 "$LOGS/gpu_sweep.log" "$PY" -m benchmarks.gpu_sweep --budget "${SWEEP_BUDGET:-240}" \
  --out "$OUT/sweep.json"
if [ "$TUNE" = 1 ]; then
  step tune_kernels 110 "$LOGS/tune_kernels.log" "$PY" -m benchmarks.tune_kernels \
    --time-budget "${TUNE_BUDGET:-75}" --out "$OUT/tune_kernels.json"
fi
[ "$BENCH" = 1 ] && step bench_kernels 110 "$LOGS/bench_kernels.log" "$PY" -m benchmarks.bench_kernels \
  --time-budget "${BENCH_BUDGET:-80}" --out "$OUT/bench_kernels.json"

# 5. End-to-end generation benchmark, if present.
if [ -f benchmarks/bench_generate.py ]; then
  step bench_generate 100 "$LOGS/bench_generate.log" "$PY" -m benchmarks.bench_generate --new-tokens 64 \
    --out "$OUT/bench_generate.json"
fi

# 6. Host memory while loading a checkpoint onto the GPU (tensors go to their device as they are read,
#    casts happen there), with the CPU as the control.
step bench_load 100 "$LOGS/bench_load.log" "$PY" -m benchmarks.bench_load --devices cpu cuda auto \
  --dtype bfloat16 --layers 8 --out "$OUT/bench_load.json"

# 7. Quantization on the GPU: the first 3 blocks of a random Llama-3-8B-shaped model, lazily (one
#    block on the GPU), AWQ and the default method: s/block, whole-model extrapolation, peak memory.
step bench_quantize_gpu 300 "$LOGS/bench_quantize_gpu.log" "$PY" -m benchmarks.bench_quantize_gpu --blocks 3 \
  --out "$OUT/bench_quantize_gpu.json"

# The reply shows only the end of the output: repeat the essentials last.
echo "----- summary"
grep -hE "^(FAILED|ERROR)" "$LOGS"/pytest_*.log 2>/dev/null | head -n 30
grep -hE "passed|failed|error|Segmentation" "$LOGS"/pytest_*.log 2>/dev/null | tail -n 10
sed -n '/^| shape | M | variant/,$p' "$LOGS/gpu_sweep.log" 2>/dev/null
sed -n '/^summary/,$p' "$LOGS/tune_kernels.log" 2>/dev/null
sed -n '/^targets/,$p' "$LOGS/bench_kernels.log" 2>/dev/null
grep -hE "^\|" "$LOGS/bench_generate.log" "$LOGS/bench_load.log" "$LOGS/bench_quantize_gpu.log" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$LOGS" .
echo "gpu_check: overall status $status (0 = all steps passed); outputs in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit "$status"

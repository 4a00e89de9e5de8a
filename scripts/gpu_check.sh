#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200): build the CUDA kernels, run the GPU tests and
# the kernel benchmark.  Run from the repository root; awqlib is imported via PYTHONPATH=. (no
# pip install, no network).  Logs and JSON go to $OUT (default ./gpu_check_out), at most 8 files.
# Every step has its own timeout (sum ~8 min worst case, ~4-5 min typical) so one hang cannot
# eat the budget.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AWQLIB_CACHE="${AWQLIB_CACHE:-$PWD/.cache/awqlib-kernels}"   # JIT build dir (ignored by git)
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
LOG="$OUT/gpu_check.log"
status=0

step() {  # step NAME TIMEOUT_S LOGFILE CMD...
  local name="$1" limit="$2" log="$3"; shift 3
  echo "=== [$name] (timeout ${limit}s) $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
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
step build 150 "$OUT/build.log" "$PY" -c "
import logging; logging.basicConfig(level=logging.INFO)
import awqlib.ops, awqlib.kernels as k
print(k.build(verbose=True))"

# 2. Kernel tests (the loader reuses the build above).
step test_kernels 150 "$OUT/pytest_kernels.log" "$PY" -m pytest -x -q -rs tests/test_kernels_cuda.py

# 3. Other GPU-marked tests, if any.
if grep -rlq "mark.gpu\|pytest.mark.gpu" tests --include='*.py' --exclude=test_kernels_cuda.py 2>/dev/null; then
  step test_gpu_other 90 "$OUT/pytest_gpu.log" "$PY" -m pytest -q -rs -m gpu tests --ignore=tests/test_kernels_cuda.py
fi

# 4. Kernel benchmark (writes its own JSON); the time budget leaves headroom under the timeout.
step bench_kernels 100 "$OUT/bench_kernels.log" "$PY" benchmarks/bench_kernels.py \
  --time-budget "${BENCH_BUDGET:-75}" --out "$OUT/bench_kernels.json"

# 5. End-to-end generation benchmark, if present.
if [ -f benchmarks/bench_generate.py ]; then
  step bench_generate 90 "$OUT/bench_generate.log" "$PY" benchmarks/bench_generate.py --out "$OUT/bench_generate.json"
fi

echo "gpu_check: overall status $status (0 = all steps passed); outputs in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit "$status"

#!/usr/bin/env bash
# One short GPU window (a lent H100/H200 for ~15 minutes, start-up included; one device call of
# <= 600 s): the kernel work that needs a GPU, most important first, inside a hard deadline so
# that whatever did not fit is skipped rather than killed half-way.
#   1. benchmarks/gpu_sweep.py: build once, correctness gate of every kernel variant (a failing
#      variant is not timed), rooflines, variants x shapes x M against fp16 cuBLAS, compute-sanitizer
#      on a tiny shape (JSON after every case);
#   2. the stream kernel's GPU tests (tests/test_kernels_cuda.py, tests/test_gpu_e2e.py: stream,
#      group sums, concurrent graphs, chunked large-M, dequantize, in-process repack);
#   3. decode of a random 8B Llama, fp16 vs int4 (unfused / fused), batch 1 and 8, with the int4
#      weights in the stream runtime layout (benchmarks/bench_generate.py, graph-captured step).
# Run from the repository root:  AWQLIB_COMMIT=<hash> bash scripts/gpu_window.sh
# Results land in $OUT (the device tool's folder; default ./gpu_window_out).  Record them here:
#   python -m benchmarks.report --add <files>/sweep.json
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_window_out}"
mkdir -p "$OUT"
WINDOW_S="${WINDOW_S:-560}"          # the whole script; the device call's limit is 600 s
DEADLINE=$((SECONDS + WINDOW_S))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AWQLIB_CACHE="${AWQLIB_CACHE:-$PWD/.cache/awqlib-kernels}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG="$OUT/window.log"
status=0

left() { echo $((DEADLINE - SECONDS)); }

step() {  # step NAME MIN_S LIMIT_S LOGFILE CMD...: run if MIN_S seconds are left, for at most LIMIT_S
  local name="$1" need="$2" limit="$3" log="$4"; shift 4
  if [ "$(left)" -lt "$need" ]; then
    echo "=== [$name] skipped: $(left) s left, needs $need" | tee -a "$LOG"
    return 0
  fi
  local cap=$(( $(left) - 5 ))        # the kill after the limit's TERM stays inside the deadline too
  [ "$limit" -le "$cap" ] || limit="$cap"
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  rc=$?
  tail -n 40 "$log" >> "$LOG"
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

{
  echo "date: $(date -u); commit: ${AWQLIB_COMMIT:-not given}"
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
} 2>&1 | tee -a "$LOG"

# the sweep's own budget (200 s, hard stop at 220) + the sanitizer's (150 s) + building the sanitizer's case
step sweep 120 390 "$OUT/sweep.log" "$PY" -m benchmarks.gpu_sweep --out "$OUT/sweep.json" --budget 200 --sanitizer
step stream-tests 60 170 "$OUT/pytest.log" "$PY" -m pytest -q -p no:cacheprovider \
  -k "stream or group_sums or concurrently or chunked or dequantize or in_process" \
  tests/test_kernels_cuda.py tests/test_gpu_e2e.py
step decode 100 200 "$OUT/decode.log" env AWQLIB_LAYOUT=stream "$PY" -m benchmarks.bench_generate --size 8b \
  --batches 1,8 --new-tokens 64 --out "$OUT/decode_stream.json"
echo "window done in ${SECONDS}s, status $status" | tee -a "$LOG"
exit "$status"

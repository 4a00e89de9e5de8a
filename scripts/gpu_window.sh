#!/usr/bin/env bash
# One short GPU window (a lent H100/H200: 15 minutes of device time, start-up included), as two
# device calls of ~5.5 minutes each, so that either can be rerun inside the window:
#   part 1: benchmarks/gpu_sweep.py -- the prebuilt kernels (else one build, cached in .cache/
#           for part 2), correctness gate of every kernel variant (a failing variant is not timed),
#           rooflines, variants x shapes x M against fp16 cuBLAS (JSON after every case), the
#           default with its grid capped on the small shapes, compute-sanitizer on a tiny shape;
#   part 2: the stream kernels' GPU tests (tests/test_kernels_cuda.py, tests/test_gpu_e2e.py: both
#           variants, narrow, concurrent graphs, captured counters with no memset, chunked large-M,
#           dequantize, in-process repack) and
#           the block ops' (rms_norm, rotary, gated_act: -k block_op), then the wgmma ones apart,
#           then decode of a random 8B Llama, fp16 vs int4 (unfused / fused, the defaults; then fused
#           with the narrow kernels off, with programmatic dependent launch, with the deep ring, and
#           with warpgroup mma), batch 1 and 8, with the
#           int4 weights in the stream runtime layout (benchmarks/bench_generate.py).
# Each part stops inside its deadline ($WINDOW_S, default 330 s: give the call timeout_s 360); a
# step starts only when its minimum time is left.  Run from the repository root:
#   AWQLIB_COMMIT=<hash> bash scripts/gpu_window.sh 1      (then: ... 2; no argument: both)
# Part 3, only where a window still has >= 5 minutes after parts 1 and 2: ncu on gpu_sweep's
# NCU_CASES (64 tokens first: warpgroup mma, the four-m-tile kernel and its wide slices, with ncu's
# throughput and pipe sections -- L2-bound or tensor-pipe-bound decides the next kernel; then wgmma at 128, the
# default at one token on 70b-down and 4096x4096, the deep ring, the tiled layout), each saved as
# it ends.
# Before the window, on the CPU machine: `bash scripts/prebuild_device.sh` (the kernels compiled
# against the GPU machine's torch), and name "awqlib/_C.so" and "awqlib/_C.json" in the call's
# carry: no part then compiles anything (the log's first lines say which kernels load; a stale or
# mismatched prebuilt library is refused with the reason, and the part compiles as before).
# Results land in $OUT (the device tool's folder; default ./gpu_window_out).  Record them here:
#   python -m benchmarks.report --add <files>/sweep.json   (and <files>/decode_stream.json)
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_window_out}"
mkdir -p "$OUT"
PART="${1:-all}"
case "$PART" in 1|2|3|all) ;; *) echo "usage: $0 [1|2|3]" >&2; exit 2;; esac
WINDOW_S="${WINDOW_S:-$([ "$PART" = all ] && echo 560 || echo 330)}"   # this call's deadline
DEADLINE=$((SECONDS + WINDOW_S))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AWQLIB_CACHE="${AWQLIB_CACHE:-$PWD/.cache/awqlib-kernels}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG="$OUT/window$([ "$PART" = all ] || echo "-$PART").log"
status=0

left() { echo $((DEADLINE - SECONDS)); }

step() {  # step NAME MIN_S LIMIT_S LOGFILE CMD...: run if MIN_S seconds are left, for at most LIMIT_S;
  # returns the command's status (a skipped step 2: it did not pass)
  local name="$1" need="$2" limit="$3" log="$4"; shift 4
  if [ "$(left)" -lt "$need" ]; then
    echo "=== [$name] skipped: $(left) s left, needs $need" | tee -a "$LOG"
    return 2
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
  return "$rc"
}

{
  echo "date: $(date -u); commit: ${AWQLIB_COMMIT:-not given}"
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
  "$PY" -c "
import torch
from awqlib import kernels
lib, why = kernels.find_prebuilt(kernels.visible_capabilities())
print('prebuilt kernels:', f'{lib.name} matches (no build)' if lib else f'refused: {why}' if why else 'none carried')" || true
} 2>&1 | tee -a "$LOG"

if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  # the sweep's own budget (build included; hard stop 20 s later) + the sanitizer's 150 s at most
  step sweep 120 320 "$OUT/sweep.log" "$PY" -m benchmarks.gpu_sweep --out "$OUT/sweep.json" --budget 160 --sanitizer
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  step stream-tests 60 150 "$OUT/pytest.log" "$PY" -m pytest -q -p no:cacheprovider \
    -k "(stream or group_sums or concurrently or counters or memset or zeroes_per_call or chunked or dequantize or in_process or block_op or quantize_on_gpu) and not wgmma" \
    tests/test_kernels_cuda.py tests/test_gpu_e2e.py
  # the wgmma kernels' first GPU tests in a process of their own: a fault there leaves the others'
  # results whole; decode runs with wgmma only where they passed
  # pdl: the stream GEMMs launched early behind the block ops (which now let them), with no
  # counters memset in between -- neither was so when pdl last measured no gain
  options=none,pdl,deep+narrow
  if step wgmma-tests 40 75 "$OUT/pytest-wgmma.log" "$PY" -m pytest -q -p no:cacheprovider -k wgmma \
      tests/test_kernels_cuda.py; then
    options=$options,wgmma
  fi
  step decode 100 200 "$OUT/decode.log" env AWQLIB_LAYOUT=stream "$PY" -m benchmarks.bench_generate --size 8b \
    --batches 1,8 --new-tokens 64 --kernel-options "$options" --out "$OUT/decode_stream.json"
fi
if [ "$PART" = 3 ]; then
  step ncu 150 300 "$OUT/ncu-run.log" "$PY" -m benchmarks.gpu_sweep --out "$OUT/ncu.json" --tools-only --ncu
fi
echo "window done in ${SECONDS}s, status $status" | tee -a "$LOG"
exit "$status"

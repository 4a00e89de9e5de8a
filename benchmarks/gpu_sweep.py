#!/usr/bin/env python
"""The GPU-window tool: one call that builds, checks and measures the int4 kernels in <= 300 s.

Steps, in order (each writes its results into the JSON before the next starts):

1. device info; load the prebuilt kernels, else build (JIT, once, cached under $AWQLIB_CACHE);
   where they have the wgmma configuration, its first run as a canary in a child process
   (WGMMA_CANARY: a fault or hang there takes only stream:wgmma out, and the exit status is 2);
2. correctness gate: every kernel variant on small shapes and token counts, fresh random data,
   outputs from a NaN-poisoned allocator, relative error against an fp32 reference; a failure is
   recorded with where the output is wrong (unwritten NaNs, rows, columns mod the slice), the
   variants it touches are not timed (a wrong kernel's timings are worthless), the others still
   are, and the exit status is 2;
3. rooflines: a device-to-device copy (bytes read + written) and a read-only streaming kernel (a
   sum over 1 GB: what a GEMV's weight stream can hope for);
4. the sweep: variants x shapes x M against fp16 cuBLAS ``F.linear`` in the same run (CUDA graphs,
   weights rotated over > 3x L2, events), cheapest cases first so a budget cut drops the big ones;
5. the grid cases: the default on the small shapes with its persistent grid capped (GRID_CAPS),
   in the JSON's "grid";
6. a short table last: us, speedup vs fp16, weight TB/s, % of copy bandwidth, and the SASS
   warp-instructions per KB of the kernel that ran (benchmarks/sass_budget.json, written on the
   CPU machine by scripts/sass_budget.py).  ``python -m benchmarks.report --add sweep.json``
   records the run in benchmarks/results/ and RESULTS.md (the same table).

    python -m benchmarks.gpu_sweep --out $OUT/sweep.json             # the development loop
    python -m benchmarks.gpu_sweep --dry-run                         # the plan; no GPU needed
    python -m benchmarks.gpu_sweep --out $OUT/sweep.json --ncu       # + ncu on a few cases (NCU_CASES)
    python -m benchmarks.gpu_sweep --out $OUT/sweep.json --sanitizer # + compute-sanitizer, tiny shape

Step 1 compiles nothing where the call carries the prebuilt kernels (scripts/prebuild_device.sh
builds them on the CPU machine against the GPU machine's torch 2.11: the extension is tied to
torch's C++ ABI); else, or where they do not match (awqlib.kernels.find_prebuilt says why), it is
one ninja call for the GPU at hand only (sm_90a on an H100/H200), awq_stream.cu its longest part.  ``build_s`` and
``backend`` in the JSON say which happened.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from awqlib.kernels import source_constant
from awqlib.ops import Kernel, gemm_kernel_name
from benchmarks.common import (STREAM_DEFAULTS_ENV, STREAM_SMEM_LIMIT, copy_bandwidth, n_copies, run_info, scoped_env,
                               skip, stream_options_env, time_eager, time_graph, write_json)
from benchmarks.report import sweep_table, targets_table

ROOT = Path(__file__).resolve().parent.parent

SASS_JSON = ROOT / "benchmarks" / "sass_budget.json"

# (name, N out, K in)
# 8b-qkv and 8b-down: between 4096x4096 and 8b-gate_up, where kAuto's M 33-64 rule
# (kStreamFourTileMinWeights) crosses over
SHAPES = [("4096x4096", 4096, 4096), ("70b-down 8192x28672", 8192, 28672), ("8b-gate_up 28672x4096", 28672, 4096),
          ("70b-gate_up 57344x8192", 57344, 8192), ("8b-qkv 6144x4096", 6144, 4096),
          ("8b-down 4096x14336", 4096, 14336)]
MS = [1, 4, 16, 32, 64, 128, 256]  # 128, 256: the stream kernel in 2 and 4 passes against dequantize + cuBLAS
GROUP = 128

FOUR_TILE_MIN_WEIGHTS = source_constant("kStreamFourTileMinWeights")  # the automatic M 33-64 rule (awq_stream.cu: choose_stream)
STREAM_MAX_M = source_constant("kStreamMaxM")  # one pass of the stream kernel (csrc/awq_kernels.h)
STREAM_COMPACT_MAX_M = source_constant("kStreamCompactMaxM")  # ... in the compact configuration
STREAM_DEEP_MAX_M = source_constant("kStreamDeepMaxM")  # ... in the deep one (a fourth ring stage)
STREAM_WGMMA_MAX_M = source_constant("kStreamWgmmaMaxM")  # ... in the wgmma one


def deep_takes(M: int) -> bool:
    """Whether the deep configuration runs M rows: up to STREAM_DEEP_MAX_M, but not at two m-tiles
    (17-32 rows: csrc/awq_stream.cu's stream_supports)."""
    return M <= STREAM_DEEP_MAX_M and not 16 < M <= 32


STREAM_WIDE_MIN_M = source_constant("kStreamWideMinM")  # the wide configuration: M 17-64 per pass


def wide_takes(M: int) -> bool:
    """Whether the wide configuration runs every pass of M rows (passes of STREAM_MAX_M, the last
    with the rest: each of STREAM_WIDE_MIN_M rows or more; csrc/awq_stream.cu's choose_stream)."""
    rest = M % STREAM_MAX_M
    return M >= STREAM_WIDE_MIN_M and (rest == 0 or rest >= STREAM_WIDE_MIN_M)
DEEP_SMEM_MIN = source_constant("kH100SmemPerBlock")  # the deep configuration is sized for (and timed on) these
SKINNY_MAX_M_AUTO = source_constant("kSkinnyMaxMAuto")  # tiled layout: the skinny kernel, then dequantize
SM89_SMEM = source_constant("kSm89SmemPerBlock")  # shared memory per block of an sm_86/89 GPU

# (label, layout, kernel id): the variants timed.  "stream:auto" is what models run by default
# (the automatic choice under the library's default settings), "tiled:auto" what they ran before;
# the forced ones isolate one choice each: "stream:sums" differs from "stream" only at M <= 32
# (group sums; timed there only), the narrow ones only at M <= 8, "stream:auto:deep" (the default
# with AWQLIB_STREAM_DEEP=1: a fourth ring stage) only where deep_takes M, "stream:wgmma" (the
# stream kernel with AWQLIB_STREAM_WGMMA=1: warpgroup mma, sm_90a) at every M, in passes past
# STREAM_WGMMA_MAX_M.
VARIANTS = [("tiled:auto", "tiled", Kernel.AUTO), ("stream", "stream", Kernel.STREAM),
            ("stream:sums", "stream", Kernel.STREAM_GROUP_SUMS), ("stream:pdl", "stream", Kernel.STREAM),
            ("stream:narrow", "stream", Kernel.STREAM), ("stream:sums:narrow", "stream", Kernel.STREAM_GROUP_SUMS),
            ("stream:auto", "stream", Kernel.AUTO), ("stream:auto:sm89", "stream", Kernel.AUTO),
            ("stream:auto:deep", "stream", Kernel.AUTO), ("stream:wgmma", "stream", Kernel.STREAM),
            ("stream:wide", "stream", Kernel.STREAM)]
# environment a variant runs under (read by csrc/awq_ops.cpp on every call): "stream:pdl" is the
# stream kernel with programmatic dependent launch (its weights stream in while the previous
# kernel -- in the sweep's graphs, the same GEMM -- finishes); the narrow ones put the tokens on
# the mma's n8 side at M <= 8 (awq_stream.cu: NARROW).
VARIANT_ENV = {"stream:pdl": stream_options_env("pdl"), "stream:narrow": stream_options_env("narrow"),
               "stream:sums:narrow": stream_options_env("narrow"), "stream:auto": STREAM_DEFAULTS_ENV,
               # what a ~99 KB-per-block GPU (A10, L4, L40S, RTX) runs by default: the compact configuration
               "stream:auto:sm89": {**STREAM_DEFAULTS_ENV, STREAM_SMEM_LIMIT: str(SM89_SMEM)},
               # the default with the deep configuration where it fits (an H100/H200), opt-in until timed
               "stream:auto:deep": {**STREAM_DEFAULTS_ENV, "AWQLIB_STREAM_DEEP": "1"},
               # the stream kernel (scaled fragments) on warpgroup mma where the build and GPU have it
               "stream:wgmma": stream_options_env("wgmma"),
               # the stream kernel (scaled fragments) on 256-column slices at M 17-64 (half the
               # activation bytes per weight byte): against "stream" at the same M
               "stream:wide": stream_options_env("wide")}
# every other variant, whatever the environment the sweep started in
BASE_ENV = stream_options_env()
STREAM_KERNELS = (Kernel.STREAM, Kernel.STREAM_GROUP_SUMS, Kernel.STREAM_COMPACT, Kernel.STREAM_COMPACT_GROUP_SUMS)

# Correctness gate: every (layout, kernel) with the token counts it takes, on small shapes
# including tails (N % 128, K % 512) and every group regime.
GATE_SHAPES = [(192, 576, 64), (4096, 4096, 128), (1024, 2752, 32), (512, 2048, 256)]
GATE_VARIANTS = [
    ("gemm", Kernel.AUTO, (1, 5, 16, 32, 33, 100)),
    ("gemm", Kernel.SKINNY, (1, 17, 32)),
    ("gemm", Kernel.DEQUANT_CUBLAS, (1, 100)),
    ("tiled", Kernel.AUTO, (1, 16, 32, 33)),
    ("tiled", Kernel.SKINNY_SHALLOW, (1, 24)),
    ("stream", Kernel.STREAM, (1, 2, 7, 16, 17, 32, 33, 64, 100)),  # 100: two passes
    ("stream", Kernel.STREAM_GROUP_SUMS, (1, 7, 16, 17, 32, 33)),
    # the compact configuration (A100 at M 17-32, ~100 KB GPUs): checked here, not timed
    ("stream", Kernel.STREAM_COMPACT, (1, 7, 16, 17, 32, 40)),
    ("stream", Kernel.STREAM_COMPACT_GROUP_SUMS, (1, 16, 17)),
    ("stream", Kernel.AUTO, (1, 100)),
]
# gated again under a variant's environment: (label, layout, kernel, M)
GATE_ENV = [("stream:narrow", "stream", Kernel.STREAM, (1, 2, 7, 8, 9, 72)),  # 72: a last pass of 8 rows
            ("stream:sums:narrow", "stream", Kernel.STREAM_GROUP_SUMS, (1, 8)),
            ("stream:narrow", "stream", Kernel.STREAM_COMPACT, (1, 8)),
            ("stream:sums:narrow", "stream", Kernel.STREAM_COMPACT_GROUP_SUMS, (1, 5)),
            ("stream:auto", "stream", Kernel.AUTO, (1, 8, 17, 40, 100)),  # the default as a whole
            ("stream:auto:sm89", "stream", Kernel.AUTO, (1, 8, 17, 40)),  # ... on a ~99 KB GPU
            # the deep configuration: the default's choice and each stream kernel; 17: none (large)
            ("stream:auto:deep", "stream", Kernel.AUTO, (1, 8, 16, 17, 40)),
            ("stream:auto:deep", "stream", Kernel.STREAM, (1, 9, 16, 33, 64)),
            ("stream:auto:deep", "stream", Kernel.STREAM_GROUP_SUMS, (1, 16)),
            # warpgroup mma at each m-tile count (wgmma N 16, 32, 64, 128) and in passes (129: a last
            # pass of one row); under the automatic choice too (which asks for group sums: the wgmma
            # kernels scale fragments instead; past 32 tokens it is dequantize + cuBLAS on the gate's
            # shapes, below kStreamFourTileMinWeights)
            ("stream:wgmma", "stream", Kernel.STREAM, (1, 7, 16, 17, 32, 33, 64, 65, 100, 128, 129)),
            ("stream:wgmma", "stream", Kernel.AUTO, (1, 20)),
            # the wide slices at each of their m-tile counts, a row in the last reduction round (49),
            # in passes (100: 64 + 36; 80: a last pass of 16 takes the large configuration instead);
            # one row: the large configuration under the setting
            ("stream:wide", "stream", Kernel.STREAM, (1, 17, 32, 33, 49, 64, 80, 100)),
            ("stream:wide", "stream", Kernel.STREAM_GROUP_SUMS, (1, 17, 32)),
            ("stream:wide", "stream", Kernel.AUTO, (1, 20, 40))]
# outputs that must equal another variant's bit for bit (the deep ring keeps the large configuration's
# partition and arithmetic): checked by the gate case by case
SAME_BITS_AS = {"stream:auto:deep": "stream:auto"}
# gated again with programmatic dependent launch, back to back in one stream (the case it changes);
# (layout, kernel, M, the other stream options on in both chains): the narrow kernels too
# (bench_generate times them with PDL), and the deep ring (whose prologue issues 3 stages before the wait)
GATE_PDL = [("stream", Kernel.STREAM, (1, 33, 100), ()), ("stream", Kernel.STREAM_GROUP_SUMS, (1, 17), ()),
            ("stream", Kernel.STREAM_COMPACT, (1, 17), ()), ("stream", Kernel.STREAM, (1, 8), ("narrow",)),
            ("stream", Kernel.STREAM_GROUP_SUMS, (5,), ("narrow",)),
            ("stream", Kernel.STREAM_GROUP_SUMS, (1, 16), ("deep", "narrow")), ("stream", Kernel.STREAM, (33, 64), ("deep",)),
            ("stream", Kernel.STREAM, (1, 33, 100, 129), ("wgmma",)),
            ("stream", Kernel.STREAM, (17, 64), ("wide",))]
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def gate_plan(max_m: int | None = None, wgmma: bool = True) -> tuple[list, list, list]:
    """GATE_VARIANTS, GATE_ENV and GATE_PDL with their M up to ``max_m`` (--max-m: gate and time only
    those, e.g. to measure the rest while one configuration fails); without the wgmma cases where
    ``wgmma`` is false (kernels.wgmma_available: there the setting would run the large configuration)."""
    def upto(ms):
        return tuple(m for m in ms if max_m is None or m <= max_m)
    return ([(lay, k, upto(ms)) for lay, k, ms in GATE_VARIANTS],
            [(label, lay, k, upto(ms)) for label, lay, k, ms in GATE_ENV if wgmma or label != "stream:wgmma"],
            [(lay, k, upto(ms), options) for lay, k, ms, options in GATE_PDL if wgmma or "wgmma" not in options])


def variant_env(label: str):
    """The variant's environment (BASE_ENV with VARIANT_ENV's for ``label``) for the duration."""
    return scoped_env({**BASE_ENV, **VARIANT_ENV.get(label, {})})


NCU_METRICS = ("smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,"
               "dram__bytes_read.sum.per_second,gpu__time_duration.sum,"
               "smsp__average_warp_latency_issue_stalled_long_scoreboard,"
               "smsp__average_warp_latency_issue_stalled_wait,smsp__average_warp_latency_issue_stalled_barrier,"
               "smsp__average_warp_latency_issue_stalled_math_pipe_throttle")
# shared-memory stalls too (the four-m-tile kernel reads 4x the activation bytes of its weights), not
# yet run on a GPU: a run that fails with them is rerun with NCU_METRICS alone
NCU_METRICS_MORE = (NCU_METRICS + ",smsp__average_warp_latency_issue_stalled_short_scoreboard,"
                    "smsp__average_warp_latency_issue_stalled_mio_throttle")
# ncu's own sections, with the added metrics: what is busy against its peak -- L2 and DRAM throughput
# (SpeedOfLight, MemoryWorkloadAnalysis: the L2 -> SM bytes, the activations every 128-column slice
# reads again, which at 64 tokens are twice the weights') and the pipes (ComputeWorkloadAnalysis:
# the tensor pipe's utilisation, mma.sync against its ceiling).  Stable section names, unlike
# metric names across ncu versions; dropped with the added metrics on a retry.
NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis")


class OutOfTime(Exception):
    pass


NARROW_MAX_M = source_constant("kStreamNarrowMaxM")  # the narrow kernels' pass limit (csrc/awq_kernels.h)


def is_timed(label: str, kernel: Kernel, M: int) -> bool:
    """Whether the sweep times variant ``label`` at M: group sums change nothing past M 32
    (awq_stream.cu: group_sums_pay), the narrow kernels nothing past M 8."""
    if label.endswith(":narrow") and M > NARROW_MAX_M:
        return False
    if label == "stream:auto:sm89" and M > STREAM_COMPACT_MAX_M:  # dequantize + cuBLAS there
        return False
    if label == "stream:auto:deep" and not deep_takes(M):  # the large configuration there
        return False
    if label == "stream:wide" and not STREAM_WIDE_MIN_M <= M <= STREAM_MAX_M:  # one launch of its own
        return False
    return not (kernel == Kernel.STREAM_GROUP_SUMS and M > 32)


def timed_on(label: str, kernel: Kernel, M: int, N: int, K: int) -> bool:
    """is_timed on one shape: the deep variant only where it runs the deep configuration (at M
    33-64 on weights below kStreamFourTileMinWeights the automatic choice is dequantize + cuBLAS,
    stream:auto's own cell)."""
    return is_timed(label, kernel, M) and (label != "stream:auto:deep" or ", deep," in kernel_label(label, M, N, K))


def timed_variants(arg: str) -> list[str]:
    """--variants: a comma-separated list of VARIANTS labels, or "all"."""
    labels = [v[0] for v in VARIANTS]
    chosen = labels if arg == "all" else [a.strip() for a in arg.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in labels]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; the variants are {labels}, or 'all'")
    return chosen


def plan_text(args) -> str:
    timed = timed_variants(args.variants)
    cases = sum(1 + sum(timed_on(label, k, m, N, K) for label, _, k in VARIANTS if label in timed)
                for _, N, K in SHAPES for m in args.ms)
    variants, env, pdl = gate_plan(args.max_m)
    gate = sum(len(ms) * (2 if k in STREAM_KERNELS else 1) for _, k, ms in variants) * len(GATE_SHAPES)
    gate_env = sum((2 if k in STREAM_KERNELS else 1) * len(ms) for _, _, k, ms in env) * len(GATE_SHAPES)
    gate_pdl = sum(len(ms) for _, _, ms, _ in pdl) * len(GATE_SHAPES)
    lines = [
        f"gpu_sweep plan (budget {args.budget:.0f} s, output {args.out}):",
        "  1. device info; load the prebuilt kernels, else build them (JIT, cached in $AWQLIB_CACHE); the wgmma"
        f" canary ({WGMMA_CANARY}) in a child process where the kernels have wgmma",
        f"  2. correctness gate: {gate} cases ({len(GATE_VARIANTS)} layout/kernel variants x {len(GATE_SHAPES)} shapes"
        f" x their M), fp16, + bf16 for the stream kernels; + {gate_env} under the variants' environments"
        " (narrow, the defaults, the deep ring, warpgroup mma);"
        f" + {gate_pdl} chains with programmatic dependent launch against plain ones; a failing variant is not timed",
        "  3. rooflines: device-to-device copy, read-only streaming sum",
        f"  4. sweep: {cases} timings = {len(SHAPES)} shapes x M {args.ms} x ({', '.join(timed)}, fp16)",
        f"  5. grid: stream:auto with its CTAs capped at {GRID_CAPS} (0: one per SM) on "
        f"{', '.join(s for s, _, _ in GRID_SHAPES)} at M {GRID_MS}",
        "  6. table (+ SASS instr/KB from benchmarks/sass_budget.json)",
    ]
    if args.tools_only:
        lines[2:] = ["  2-6. no gate, no sweep (--tools-only)"]
    if args.ncu:
        lines.append(f"  +  ncu on {', '.join(f'{s} M={m} {v}' for s, m, v in NCU_CASES)}: "
                     f"{' '.join(ncu_command(*NCU_CASES[0]))}")
    if args.sanitizer:
        lines.append(f"  +  compute-sanitizer memcheck on a tiny shape: {' '.join(sanitizer_command())}")
    return "\n".join(lines)


# (shape, M, variant) profiled with --ncu, most wanted first (a window's minutes may end the list).
# 64 tokens first, where the targets are furthest: warpgroup mma (are its tensor cores busy, or the
# dequantizing warps, or L2?) and the four-m-tile mma.sync kernel (0.76x fp16 where its math alone
# would allow ~3x: the tensor pipe, L2 -- its activations are twice its weights' bytes -- or
# latency?) and the wide slices (half those activation bytes: does L2 throughput fall and the time
# with it?).  Their answer decides the next kernel: L2-bound calls for wider slices, pipe-bound for
# wgmma.  Then warpgroup mma at 128; the default at one token (after the counters' memset left
# the graphs) on the large and the small shape; the deep ring; the rest.
NCU_CASES = [("70b-down", 64, "stream:wgmma"), ("70b-down", 64, "stream:auto"), ("70b-down", 64, "stream:wide"),
             ("70b-down", 128, "stream:wgmma"),
             ("70b-down", 1, "stream:auto"), ("4096x4096", 1, "stream:auto"), ("70b-down", 1, "stream:auto:deep"),
             ("70b-down", 1, "stream:wgmma"), ("70b-down", 64, "stream:auto:deep"), ("4096x4096", 1, "tiled:auto")]


def ncu_command(shape: str, M: int, variant: str, metrics: str = NCU_METRICS_MORE,
                sections: tuple[str, ...] = NCU_SECTIONS) -> list[str]:
    return ["ncu", "--clock-control", "none", "-k", "regex:awq", "--launch-skip", "3", "-c", "1",
            *(a for name in sections for a in ("--section", name)), "--metrics", metrics,
            sys.executable, "-m", "benchmarks.gpu_sweep", "--profile-case", f"{shape},{M},{variant}"]


def run_ncu(shape: str, M: int, variant: str, log: Path) -> dict:
    """One ncu case; rerun with the metrics known to work (no sections) where the added ones fail it."""
    r = run_tool(ncu_command(shape, M, variant), log, 120)
    if r.get("rc") not in (0, None, "timeout"):
        r = {**run_tool(ncu_command(shape, M, variant, NCU_METRICS, ()), log.with_suffix(".retry.log"), 120),
             "first_try": r}
    return r


def sanitizer_command(wgmma: bool = True) -> list[str]:
    """memcheck on the tiny shape, every variant (stream:wgmma only where its canary passed)."""
    return ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m",
            "benchmarks.gpu_sweep", "--profile-case", f"tiny,5+20+100,{'all' if wgmma else 'all-but-wgmma'},2"]


# ----------------------------------------------------------------------------- helpers

def make_weight(K: int, N: int, g: int, layout: str, device="cuda"):
    from awqlib.packing import pack_awq, to_layout
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, device=device)
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32, device=device)
    scales = ((torch.rand(K // g, N, device=device) * 0.01 + 0.001)
              * torch.where(torch.rand(K // g, N, device=device) < 0.1, -1.0, 1.0)).half()
    qweight, qzeros = pack_awq(codes, zeros)
    return (qweight, qzeros, scales), to_layout(layout, qweight, qzeros, scales)


def poison():
    big = [torch.full((s,), float("nan"), device="cuda") for s in (64 << 20, 16 << 20)]
    small = [torch.full((s,), float("nan"), device="cuda") for s in (1 << 18,) * 8]
    del big, small


def gate_cases(N: int, K: int, g: int, layout: str, kernel: Kernel, ms, env: str | None = None) -> list[dict]:
    """One (layout, kernel) on one shape at each M, fp16 (and bf16 for the stream kernels), under
    variant ``env``'s environment if given: the gate's cases, failures printed."""
    from awqlib.packing import dequantize_gemm
    gemm, (qw, qz, sc) = make_weight(K, N, g, layout)
    cases = []
    for dtype in (torch.float16, torch.bfloat16) if kernel in STREAM_KERNELS else (torch.float16,):
        w32 = dequantize_gemm(*gemm, g, dtype=torch.float32) if dtype == torch.float16 else \
            dequantize_gemm(gemm[0], gemm[1], gemm[2].to(dtype), g, dtype=torch.float32)
        scd = sc.to(dtype)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            poison()
            try:
                with variant_env(env or ""):
                    out = torch.ops.awqlib.awq_gemm_variant(x, qw, qz, scd, g, int(kernel), 0)
                torch.cuda.synchronize()
                ref = x.float() @ w32
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(out).all()) and err < REL_TOL[dtype]
                msg = f"rel err {err:.2e}" + ("" if ok else "; " + where_wrong(out, ref, REL_TOL[dtype]))
                if ok and env in SAME_BITS_AS:
                    with variant_env(SAME_BITS_AS[env]):
                        base = torch.ops.awqlib.awq_gemm_variant(x, qw, qz, scd, g, int(kernel), 0)
                    if not torch.equal(out, base):
                        ok = False
                        msg += f"; differs from {SAME_BITS_AS[env]}, whose bits it must have: " + \
                            where_wrong(out, base.float(), 1e-6)
            except RuntimeError as e:  # a refused case is a failure here: the gate lists only valid ones
                if lacks_smem(str(e)):
                    continue  # a configuration this GPU has no room for (the large M 17-32 one on an A100)
                ok, msg = False, f"{type(e).__name__}: {str(e)[:200]}"
            cases.append({"layout": layout, "kernel": kernel.name, **({"env": env} if env else {}), "N": N, "K": K,
                          "g": g, "M": M, "dtype": str(dtype).split(".")[-1], "ok": ok, "detail": msg})
            if not ok:
                print(f"GATE FAIL {layout}/{kernel.name}{' [' + env + ']' if env else ''} N{N} K{K} g{g} M{M} {dtype}: "
                      f"{msg}", flush=True)
    return cases


def gate(report: dict, save, max_m: int | None = None, wgmma: bool = True) -> bool:
    from awqlib.packing import dequantize_gemm
    variants, env, pdl = gate_plan(max_m, wgmma)
    cases = []
    for N, K, g in GATE_SHAPES:
        for layout, kernel, ms in variants:
            cases += gate_cases(N, K, g, layout, kernel, ms)
        for label, layout, kernel, ms in env:
            cases += gate_cases(N, K, g, layout, kernel, ms, env=label)
        for layout, kernel, ms, options in pdl:
            gemm, (qw, qz, sc) = make_weight(K, N, g, layout)
            w32 = dequantize_gemm(*gemm, g, dtype=torch.float32)
            for M in ms:
                case = gate_pdl_case(qw, qz, sc, w32, g, kernel, M, options)
                if case is None:
                    continue
                cases.append({"layout": layout, "kernel": kernel.name, "pdl": True, "options": list(options), "N": N,
                              "K": K, "g": g, "M": M, "dtype": "float16", **case})
                if not case["ok"]:
                    print(f"GATE FAIL {layout}/{kernel.name}+PDL{''.join('+' + o for o in options)} N{N} K{K} g{g} "
                          f"M{M}: {case['detail']}", flush=True)
    report["gate"] = gate_summary(cases)
    save()
    print(f"correctness gate: {len(cases) - len(report['gate']['failed'])}/{len(cases)} passed", flush=True)
    return not report["gate"]["failed"]


def lacks_smem(error: str) -> bool:
    """A stream kernel's refusal because every configuration it considered needs more shared memory
    than this GPU gives a block (awq_stream.cu's choose_stream names each one, its bytes and the
    device's): by design, not a failure."""
    considered = error.count(" configuration runs passes of at most ")
    needs = re.findall(r"needs (\d+) bytes of shared memory per block \(the device has (\d+)\)", error)
    return considered > 0 and len(needs) == considered and all(int(a) > int(b) for a, b in needs)


def gate_pdl_case(qw, qz, sc, w32, g: int, kernel: Kernel, M: int, options: tuple[str, ...] = ()) -> dict | None:
    """A chain of launches in one stream, with programmatic dependent launch and without: a, then
    x.neg_(), b on it, and c on b -- the stream kernel's own output, which it may start reading
    before b has finished (b lets dependents launch early; c must wait for b before reading its
    activations).  Each launch must equal its plain twin bit for bit (the partition and the
    reduction order do not depend on PDL), and a the reference.  None: refused for lack of shared
    memory (by design).  ``options``: the stream options (common.STREAM_OPTIONS) on in both chains."""
    x0 = torch.randn(M, w32.shape[0], device="cuda", dtype=torch.float16) * 0.1

    def chain(pdl: bool):
        x = x0.clone()
        poison()
        with scoped_env(stream_options_env(*(("pdl",) if pdl else ()), *options)):
            a = torch.ops.awqlib.awq_gemm_variant(x, qw, qz, sc, g, int(kernel), 0)
            x.neg_()
            b = torch.ops.awqlib.awq_gemm_variant(x, qw, qz, sc, g, int(kernel), 0)
            # (square shapes only: b must fit the weight's input)
            c = torch.ops.awqlib.awq_gemm_variant(b, qw, qz, sc, g, int(kernel), 0) if b.shape[-1] == x.shape[-1] else None
        torch.cuda.synchronize()
        return a, b, c

    try:
        plain, pdl = chain(False), chain(True)
    except RuntimeError as e:
        if lacks_smem(str(e)):
            return None
        return {"ok": False, "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    ref = x0.float() @ w32
    err = ((pdl[0].float() - ref).norm() / ref.norm()).item()
    ok = bool(torch.isfinite(pdl[0]).all()) and err < REL_TOL[torch.float16]
    detail = f"rel err {err:.2e}" + ("" if ok else "; " + where_wrong(pdl[0], ref, REL_TOL[torch.float16]))
    for name, p, q in zip("abc", plain, pdl):
        if p is not None and not torch.equal(p, q):
            ok, detail = False, detail + f"; launch {name} differs from its plain twin: " + where_wrong(q, p, 1e-6)
    return {"ok": ok, "detail": detail}


def gate_summary(cases: list[dict]) -> dict:
    return {"cases": len(cases), "failed": [c for c in cases if not c["ok"]]}


def where_wrong(out: torch.Tensor, ref: torch.Tensor, tol: float) -> str:
    """Where a failed output is wrong, for diagnosis after the window: NaN elements (the poisoned
    allocator's: never written), and the rows / columns (mod 128 = the stream kernel's slice, mod 64
    = its n-atom) of elements off by more than tol x the output's RMS."""
    out, ref = out.float().cpu(), ref.float().cpu()
    nan = torch.isnan(out)
    bad = nan | ((out - ref).abs() > tol * ref.pow(2).mean().sqrt())
    if not bad.any():
        return "no element off by more than tol x RMS (a spread error)"
    rows = bad.any(1).nonzero().flatten().tolist()
    cols = bad.any(0).nonzero().flatten()
    return (f"{int(bad.sum())} of {bad.numel()} elements wrong ({int(nan.sum())} NaN = unwritten); rows "
            f"{rows[:8]}{'...' if len(rows) > 8 else ''} of {out.shape[0]}; {cols.numel()} of {out.shape[1]} columns, "
            f"first {cols[:8].tolist()}, mod 128 {sorted(set((cols % 128).tolist()))[:16]}, "
            f"slices {sorted(set((cols // 128).tolist()))[:16]}")


# variants whose environment turns on a configuration the library's defaults do not run
OPT_IN_ENVS = ("stream:auto:deep", "stream:wgmma", "stream:wide")
# the kernels each default variant runs (csrc/awq_stream.cu: choose_stream), by Kernel name
DEFAULT_RUNS = {"stream:auto": (Kernel.STREAM.name, Kernel.STREAM_GROUP_SUMS.name),
                "stream:auto:deep": (Kernel.STREAM.name, Kernel.STREAM_GROUP_SUMS.name),
                "stream:auto:sm89": (Kernel.STREAM_COMPACT.name, Kernel.STREAM_COMPACT_GROUP_SUMS.name)}


def failed_variants(gate_report: dict) -> set[str]:
    """Sweep variants (labels) a failed gate case rules out: same layout and kernel, or the
    automatic choice on that layout (which may have dispatched to the failing kernel)."""
    labels = set()
    for c in gate_report.get("failed", []):
        if c.get("pdl"):  # a failure only with programmatic dependent launch (and its other options)
            want = stream_options_env("pdl", *c.get("options", ()))
            labels |= {label for label, layout, _ in VARIANTS
                       if VARIANT_ENV.get(label) == want and layout == c["layout"]}
            continue
        env = VARIANT_ENV.get(c.get("env"), {})  # a failure under a variant's environment: the variants run in it
        for label, layout, kernel in VARIANTS:
            if env and VARIANT_ENV.get(label, {}) != env:
                continue
            sm89 = "stream:auto:sm89"  # runs the compact configuration only
            if label == sm89 and c["kernel"] not in DEFAULT_RUNS[sm89] + (Kernel.AUTO.name,):
                continue
            if layout == c["layout"] and (kernel.name == c["kernel"] or kernel == Kernel.AUTO
                                          or c["kernel"] == Kernel.AUTO.name):
                labels.add(label)
        # a default (narrow kernels included, PDL off) is ruled out by any failure of the kernels it
        # runs, whatever environment the case ran under -- but one under an opt-in configuration's
        # environment (the deep ring) only rules out the variants that run it
        labels |= {label for label, kernels in DEFAULT_RUNS.items()
                   if c["layout"] == "stream" and c["kernel"] in kernels
                   and (c.get("env") not in OPT_IN_ENVS or label == c.get("env"))}
    return labels


def rooflines(report: dict, save):
    report["copy_GBps"] = copy_bandwidth()
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").view(torch.int32)
    buf.random_(0, 16)
    t = min(time_eager(lambda: buf.sum(dtype=torch.int64), reps=10) for _ in range(3))
    report["read_GBps"] = (1 << 30) / t / 1e9
    del buf
    save()
    print(f"rooflines: copy {report['copy_GBps']:.0f} GB/s (read + write), read-only sum {report['read_GBps']:.0f} GB/s",
          flush=True)


def sass_table() -> dict:
    """kernel instantiation -> instr/KB (sm_90), from the JSON scripts/sass_budget.py wrote."""
    if not SASS_JSON.is_file():
        return {}
    rows = json.loads(SASS_JSON.read_text())
    return {r["kernel"]: r["instr_per_kb"] for r in rows if r["arch"] == "90" and r["instr_per_kb"]}


def kernel_label(variant: str, M: int, N: int, K: int) -> str:
    """The instantiation a variant runs (for the SASS column), fp16; past one pass (64 rows, wgmma
    STREAM_WGMMA_MAX_M): its first."""
    if variant in ("stream:auto", "stream:auto:deep") and (
            M > STREAM_MAX_M or (M > STREAM_COMPACT_MAX_M and N * K < FOUR_TILE_MIN_WEIGHTS)):
        return "dequant+cuBLAS"  # the stream layout's (csrc/awq_stream.cu: choose_stream)
    compact = variant == "stream:auto:sm89"  # a ~99 KB GPU's default: the compact configuration, M <= 32
    if compact and M > STREAM_COMPACT_MAX_M:
        return "dequant+cuBLAS"
    if variant.startswith("stream"):  # the sweep's group size (128) is FINE only for wgmma (below)
        wgmma = variant == "stream:wgmma"
        wide = variant == "stream:wide" and wide_takes(M)
        mb = 1 if M <= 16 else 2 if M <= 32 else 4 if M <= STREAM_MAX_M or not wgmma else 8
        stage = 128 if mb == 8 or (wide and mb == 4) else 256 if mb == 4 or compact or wide else 512
        exact = K % stage == 0 and N % (256 if wide else 128) == 0
        auto = variant.startswith("stream:auto")  # group sums where they pay, the narrow kernels at M <= 8
        sums = (variant.startswith("stream:sums") or auto) and mb <= (1 if compact else 2)
        narrow = (variant.endswith(":narrow") or auto) and M <= NARROW_MAX_M
        config = ("compact" if compact else "deep" if variant == "stream:auto:deep" and deep_takes(M)
                  else "wgmma" if wgmma else "wide" if wide else "large")  # scripts/sass_budget.py names CONFIG so
        # FINE: the group ends inside what a warp walks of a stage (wgmma: the whole stage)
        fine = wgmma and GROUP < stage
        narrow = narrow and not wgmma
        flags = ", ".join(str(f).lower() for f in (exact, fine, sums))
        return f"awq_stream_kernel<half, {mb}, {flags}, {config}, {str(narrow).lower()}>"
    if variant == "tiled:auto" and M <= SKINNY_MAX_M_AUTO:
        return f"awq_skinny_kernel<half, {1 if M <= 16 else 2}, 2, true>"
    return "dequant+cuBLAS"


def weight_bytes(N: int, K: int) -> float:
    """Bytes a call streams for the weight: int4 codes, fp16 scales and int4 zeros per group."""
    return K * N // 2 + (K // GROUP) * N * 2.5


def sweep_row(name: str, N: int, K: int, M: int, variant: str, t: float, t_ref: float, copy_gbps: float,
              sass: dict, ran: str | None = None) -> dict:
    """One timed case (seconds per call of the variant and of fp16 F.linear) as the JSON records it.
    ``ran``: the kernel the library says it ran (ops.gemm_kernel_name); where it differs from
    kernel_label's prediction, the row keeps that as "kernel_predicted"."""
    tbps = (weight_bytes(N, K) + 2 * M * (K + N)) / t / 1e12
    kl = kernel_label(variant, M, N, K)
    row = {"shape": name, "N": N, "K": K, "M": M, "variant": variant, "us": t * 1e6, "fp16_us": t_ref * 1e6,
           "speedup": t_ref / t, "TBps": tbps, "pct_copy": 100 * tbps * 1e3 / copy_gbps, "kernel": ran or kl,
           "sass_instr_per_kb": sass.get(ran or kl)}
    if ran and ran != kl:
        row["kernel_predicted"] = kl
    return row


def kernel_ran(x, q, g: int, kernel: Kernel) -> str | None:
    """The kernel awq_gemm_variant runs for this call under the current settings, as the CUDA kernels
    name it (ops.gemm_kernel_name), or None where they cannot say (not loaded: the reference answers;
    a library from before the op)."""
    try:
        name = gemm_kernel_name(x, q[0], q[1], q[2], g, kernel)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return None if name == "reference" else name


# The default on the small shapes with its persistent grid capped (awq_gemm_variant's `splits` for a
# stream kernel; 0: one CTA per SM): 4096x4096 at one token reached only 1.18x fp16 on the H200,
# where each CTA streams 2 stages and most slices are split over 4 CTAs; whether fewer CTAs, each
# splitting fewer slices, do better is what these cases say.  (shape, N, K), M, caps.
GRID_SHAPES = [("4096x4096", 4096, 4096), ("8b-qkv 6144x4096", 6144, 4096)]
GRID_MS = (1, 16)
GRID_CAPS = (16, 32, 64, 96, 0)


def stream_grid(M: int, N: int, K: int, ctas: int) -> tuple[int, int]:
    """(CTAs launched, units per CTA) of the large stream configuration's persistent grid capped
    at ``ctas`` (csrc/awq_stream.cu plan_stream)."""
    units = -(-N // 128) * -(-K // (256 if M > 32 else 512))
    per = -(-units // max(1, min(units, ctas)))
    return -(-units // per), per


def grid_table(report: dict) -> str:
    rows = report.get("grid", [])
    lines = ["| shape | M | CTA cap | CTAs | units per CTA | µs | fp16 µs | speedup |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['M']} | {r['cap']} | {r['ctas']} | {r['per']} | {r['us']:.1f} | {r['fp16_us']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + (f"\ngrid cases stopped: {report['grid_error']}" if report.get("grid_error") else "")


def grid_cases(args, report: dict, save, t0: float):
    """stream:auto with its grid capped (GRID_CAPS) on GRID_SHAPES at the GRID_MS the run times
    (--ms, --max-m): report["grid"], one row per case (the cap, the grid it launched, us, and fp16's
    in the same run); a failure is recorded, not raised (the sweep is done)."""
    rows = report.setdefault("grid", [])
    ms = [m for m in GRID_MS if m in args.ms and (args.max_m is None or m <= args.max_m)]
    try:
        props = torch.cuda.get_device_properties(0)
        l2, cap = getattr(props, "L2_cache_size", 50 << 20), int(props.total_memory * 0.2)
        for name, N, K in GRID_SHAPES:
            qs = [make_weight(K, N, GROUP, "stream")[1] for _ in range(n_copies(int(weight_bytes(N, K)), l2, cap))]
            w16s = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
                    for _ in range(n_copies(2 * K * N, l2, cap))]
            for M in ms:
                if time.time() - t0 > args.budget:
                    raise OutOfTime
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                ref_calls = [lambda w=w: F.linear(x, w) for w in w16s]
                t_ref = time_graph(ref_calls, time_eager(ref_calls[0], reps=2))
                for ctas in GRID_CAPS:
                    calls = [lambda q=q, c=ctas: torch.ops.awqlib.awq_gemm_variant(x, q[0], q[1], q[2], GROUP,
                                                                                   int(Kernel.AUTO), c)
                             for q in qs]
                    with variant_env("stream:auto"):
                        t = time_graph(calls, time_eager(calls[0], reps=2))
                    launched, per = stream_grid(M, N, K, ctas or props.multi_processor_count)
                    rows.append({"shape": name, "N": N, "K": K, "M": M, "cap": ctas, "ctas": launched, "per": per,
                                 "kernel": kernel_label("stream:auto", M, N, K), "us": t * 1e6, "fp16_us": t_ref * 1e6,
                                 "speedup": t_ref / t})
                    save()
                    print(f"grid {name:18s} M={M:2d} cap {ctas:3d}: {launched:3d} CTAs x {per:2d} units "
                          f"{t * 1e6:7.1f} us  {t_ref / t:5.2f}x fp16", flush=True)
    except OutOfTime:
        raise
    except Exception as e:  # noqa: BLE001 -- a tool at the end of the window: record, go on to ncu
        report["grid_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        save()
        print(f"grid cases stopped: {report['grid_error']}", flush=True)


def sweep(args, report: dict, save, t0: float, excluded: set[str] = frozenset()):
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    cap = int(props.total_memory * 0.2)
    sass = sass_table()
    rows = report.setdefault("sweep", [])
    broken: set[str] = set()  # variants whose timing raised: not tried again (the others go on)
    if props.shared_memory_per_block_optin < DEEP_SMEM_MIN:  # the deep ring does not fit: stream:auto again
        excluded = set(excluded) | {"stream:auto:deep"}
    order = sorted(((N * K, name, N, K) for name, N, K in SHAPES))
    for _, name, N, K in order:
        g = GROUP
        nq = n_copies(int(weight_bytes(N, K)), l2, cap)
        weights = {layout: [make_weight(K, N, g, layout)[1] for _ in range(nq)]
                   for label, layout, _ in VARIANTS if label not in excluded}
        w16s = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(n_copies(2 * K * N, l2, cap))]
        for M in args.ms:
            if time.time() - t0 > args.budget:
                raise OutOfTime
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref_calls = [lambda w=w: F.linear(x, w) for w in w16s]
            t_ref = time_graph(ref_calls, time_eager(ref_calls[0], reps=2))
            for label, layout, kernel in VARIANTS:
                if label in excluded or label in broken or not timed_on(label, kernel, M, N, K):
                    continue
                calls = [lambda q=q: torch.ops.awqlib.awq_gemm_variant(x, q[0], q[1], q[2], g, int(kernel), 0)
                         for q in weights[layout]]
                try:
                    with variant_env(label):
                        t = time_graph(calls, time_eager(calls[0], reps=2))
                        ran = kernel_ran(x, weights[layout][0], g, kernel)
                except RuntimeError as e:  # e.g. a launch attribute the driver refuses under capture
                    broken.add(label)
                    report.setdefault("errors", []).append({"shape": name, "M": M, "variant": label,
                                                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    save()
                    print(f"TIMING ERROR {name} M={M} {label}: {e}; {label} is not timed further", flush=True)
                    continue
                rows.append(sweep_row(name, N, K, M, label, t, t_ref, report["copy_GBps"], sass, ran))
                save()
                r = rows[-1]
                if "kernel_predicted" in r:
                    print(f"NOTE {name} M={M} {label}: ran {r['kernel']}, kernel_label predicted "
                          f"{r['kernel_predicted']}", flush=True)
                print(f"{name:24s} M={M:3d} {label:11s} {r['us']:8.1f} us  fp16 {r['fp16_us']:8.1f} us  "
                      f"{r['speedup']:5.2f}x  {r['TBps']:5.2f} TB/s ({r['pct_copy']:4.1f}% copy)", flush=True)
            del x, ref_calls
        del weights, w16s
        torch.cuda.empty_cache()


def device_info(props, capability) -> dict:
    """What the JSON records of the card (``props``: torch.cuda.get_device_properties)."""
    return {"name": props.name, "sms": props.multi_processor_count, "capability": list(capability),
            "smem_optin": getattr(props, "shared_memory_per_block_optin", None)}


def new_report(argv: list[str], budget: float) -> dict:
    return {**run_info("gpu_sweep", argv), "torch": torch.__version__, "budget_s": budget}


def save_report(report: dict, out: Path, t0: float) -> None:
    """Write the JSON (atomically: the run may be killed at any point and the file must stay whole)."""
    report["elapsed_s"] = time.time() - t0
    write_json(out, report)


def profile_case(spec: str) -> int:
    """Run one case eagerly a few times (the target of --ncu and --sanitizer): "shape,M,variant[,reps]",
    M a number or several joined by '+', variant a VARIANTS label or "all" (which adds the compact
    configuration, gated but not timed; "all-but-wgmma": without stream:wgmma, where its canary
    failed), reps the calls per case (default 5: ncu skips the first 3; the sanitizer needs 2,
    memcheck being slow)."""
    name, m, variant, *rest = spec.split(",")
    ms = [int(v) for v in m.split("+")]
    reps = int(rest[0]) if rest else 5
    shapes = {"70b-down": (8192, 28672), "4096x4096": (4096, 4096), "tiny": (192, 768)}  # tiny: tails (K % 512, N % 128)
    N, K = shapes[name]
    # tiny: group 64 (FINE: the group changes inside a warp's k-slice) and 128 (where group sums run)
    groups = (64, 128) if name == "tiny" else (GROUP,)
    from awqlib import kernels
    assert kernels.load(), "kernels failed to load"
    every = variant in ("all", "all-but-wgmma")
    chosen = [v for v in VARIANTS if (every and not (variant == "all-but-wgmma" and v[0] == "stream:wgmma"))
              or variant == v[0]]
    if every:
        chosen += [("stream:compact", "stream", Kernel.STREAM_COMPACT),
                   ("stream:compact:sums", "stream", Kernel.STREAM_COMPACT_GROUP_SUMS)]
    for g in groups:
        for label, layout, kernel in chosen:
            q = make_weight(K, N, g, layout)[1]
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                with variant_env(label):
                    for _ in range(reps):
                        torch.ops.awqlib.awq_gemm_variant(x, q[0], q[1], q[2], g, int(kernel), 0)
                torch.cuda.synchronize()
                print(f"profile-case {label} g{g} M{M}: ok")
    return 0


# The first run of the wgmma kernels, in a child process: a tiny shape with tails, groups of 64 and
# 128 rows (FINE up to 64 tokens; at 65-128 a 128-row group fills a stage), every m-tile count and a
# second pass.  A fault (illegal instruction or address) would leave this process's CUDA context
# unusable, a hang would eat the window: in a child, either only takes the variant out.
WGMMA_CANARY = "tiny,5+20+40+100+129,stream:wgmma,2"
WGMMA_CANARY_TIMEOUT_S = 90


def wgmma_canary() -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "--profile-case", WGMMA_CANARY]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=WGMMA_CANARY_TIMEOUT_S)
        return {"ok": r.returncode == 0, "rc": r.returncode, "tail": (r.stdout + r.stderr)[-2000:]}
    except subprocess.TimeoutExpired:
        return {"ok": False, "rc": "timeout", "tail": f"no exit within {WGMMA_CANARY_TIMEOUT_S} s (a hang?)"}


def run_tool(cmd: list[str], log: Path, timeout: int) -> dict:
    if shutil.which(cmd[0]) is None:
        return {"cmd": " ".join(cmd), "skipped": f"{cmd[0]} not on PATH"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log.write_text(r.stdout + r.stderr)
        return {"cmd": " ".join(cmd), "rc": r.returncode, "log": str(log), "tail": (r.stdout + r.stderr)[-3000:]}
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd), "rc": "timeout"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sweep.json"))
    ap.add_argument("--budget", type=float, default=280.0, help="hard time budget in seconds (build included)")
    ap.add_argument("--ms", type=int, nargs="+", default=MS)
    ap.add_argument("--max-m", type=int, help="gate and time only M <= this (a window working around one failing"
                    " configuration; the report records it)")
    ap.add_argument("--variants", default="all",
                    help="the variants timed, comma-separated (default: all); every variant is gated whatever this"
                         " says (stream:wgmma where the kernels have it and its canary passed)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check imports; no GPU needed")
    ap.add_argument("--skip-gate", action="store_true", help="time without the correctness gate (never for results)")
    ap.add_argument("--ncu", action="store_true",
                    help="also profile with ncu (NCU_CASES: warpgroup mma and the default on 70b-down at 64 "
                         "tokens, then 128 and one; the deep ring; the default and the tiled layout on 4096x4096 "
                         "at one)")
    ap.add_argument("--sanitizer", action="store_true", help="also run compute-sanitizer memcheck on a tiny shape")
    ap.add_argument("--tools-only", action="store_true",
                    help="no gate and no sweep: build, then only --ncu / --sanitizer (a window's leftover minutes)")
    ap.add_argument("--profile-case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile_case:
        return profile_case(args.profile_case)
    if args.max_m is not None:
        args.ms = [m for m in args.ms if m <= args.max_m]

    print(plan_text(args), flush=True)
    if args.dry_run:
        from awqlib import kernels  # noqa: F401 -- the imports the real run needs
        print(f"dry run: imports ok; SASS table {'found' if SASS_JSON.is_file() else 'missing'} ({SASS_JSON}); "
              f"CUDA available: {torch.cuda.is_available()}")
        return 0

    t0 = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = new_report(sys.argv[1:] if argv is None else argv, args.budget)

    def save():
        save_report(report, out, t0)

    if not torch.cuda.is_available():
        return skip(report, out, "no CUDA device")

    def on_alarm(*_):
        raise OutOfTime

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(math.ceil(args.budget + 20)))  # hard stop even inside a hung case
    status = 0
    wgmma = False  # may stream:wgmma run: built for and on an sm_90a GPU, and its canary passed
    try:
        props = torch.cuda.get_device_properties(0)
        report["device"] = device_info(props, torch.cuda.get_device_capability(0))
        from awqlib import kernels
        tb = time.time()
        if not kernels.load():
            report["error"] = "kernels failed to build/load"
            save()
            print(report["error"])
            return 1
        report["build_s"] = time.time() - tb
        report["backend"] = kernels.backend()
        print(f"device {props.name}, {props.multi_processor_count} SMs; kernels {report['backend']} in "
              f"{report['build_s']:.0f} s", flush=True)
        save()
        wgmma = kernels.wgmma_available()
        if not wgmma:  # AWQLIB_STREAM_WGMMA=1 would run the large configuration: not the variant's kernel
            report["wgmma"] = "unavailable: the kernels were not built for 9.0a, or this GPU is not sm_90"
        else:  # never run on a GPU before: a fault or hang there must not take the rest of the window down
            report["wgmma"] = wgmma_canary()
            wgmma = report["wgmma"]["ok"]
            if not wgmma:
                status = 2  # as a failed gate: the first run of new tensor-core code failed
            save()
            print(f"wgmma canary: {'ok' if wgmma else 'FAILED, not gated or timed: ' + report['wgmma']['tail'][-500:]}",
                  flush=True)
        timed = set(timed_variants(args.variants)) - (set() if wgmma else {"stream:wgmma"})
        excluded: set[str] = {v[0] for v in VARIANTS} - timed
        if args.tools_only:
            excluded = {v[0] for v in VARIANTS}
        elif not args.skip_gate and not gate(report, save, args.max_m, wgmma):
            excluded |= failed_variants(report["gate"])
            report["not_timed"] = sorted(failed_variants(report["gate"]))
            status = 2
            print(f"correctness gate FAILED (see the JSON's gate.failed): not timing {sorted(excluded)}", flush=True)
        if not excluded >= {v[0] for v in VARIANTS}:  # else nothing to time; the tools below still run
            rooflines(report, save)
            sweep(args, report, save, t0, excluded)
            if "stream:auto" not in excluded:
                grid_cases(args, report, save, t0)
    except OutOfTime:
        report["truncated"] = f"budget of {args.budget:.0f} s reached"
        print(f"\n{report['truncated']}: remaining cases skipped", flush=True)
    finally:
        signal.alarm(0)
        save()
    if args.ncu:
        report["ncu"] = []
        for s, m, v in NCU_CASES:  # saved after each: a window's hard stop keeps the cases done
            if v == "stream:wgmma" and not wgmma:
                continue  # unavailable (it would profile the large configuration), or its canary failed
            report["ncu"].append(run_ncu(s, m, v, out.parent / f"ncu_{s}_m{m}_{v.replace(':', '_')}.log"))
            save()
    if args.sanitizer:
        report["sanitizer"] = run_tool(sanitizer_command(wgmma), out.parent / "sanitizer.log", 150)
        save()
        if report["sanitizer"].get("rc") not in (0, None):
            status = max(status, 3)  # exit statuses: 2 gate, 3 sanitizer; the JSON has both
    if report.get("sweep"):
        print("\n" + sweep_table(report) + "\n\n" + targets_table(report))
    if report.get("grid") or report.get("grid_error"):
        print("\n" + grid_table(report))
    print(f"\nwrote {out} ({report['elapsed_s']:.0f} s); record it: python -m benchmarks.report --add {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())

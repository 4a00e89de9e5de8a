#!/usr/bin/env python
"""Benchmark torch.ops.awqlib.awq_gemm against fp16 torch (cuBLAS) on Llama-shaped linears, with
the weights in the warp-tiled runtime layout (AWQLIB_LAYOUT=tiled; benchmarks/gpu_sweep.py times
the default, the stream layout, against it).

For every (N x K) weight and token count M it reports the AWQ kernel time (µs), its achieved
memory bandwidth (int4 weights + zeros + scales + activations + output, in GB/s), that bandwidth
as a percentage of a device-to-device copy measured in the same run, TFLOPS, and the speedup over
``F.linear`` with an fp16 weight measured in the same run.

Method: enough copies of each weight are rotated that their total size exceeds 3x the L2 cache,
so every call streams its weight from DRAM (as in a real model, where the next layer evicts this
one).  Calls are captured in a CUDA graph (launch overhead would otherwise dominate the
microsecond cases) and timed with CUDA events over several replays.

    python -m benchmarks.bench_kernels --out bench.json --time-budget 180
    python -m benchmarks.bench_kernels --quick

Runs (and prints a message) on a machine without CUDA, writing a JSON with "skipped".
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from awqlib import kernels
from benchmarks.common import copy_bandwidth, n_copies, run_info, time_eager, time_graph, write_json
from benchmarks.report import kernels_table

SHAPES = [  # (model, N out, K in)
    ("llama2-7b qkv", 12288, 4096),
    ("llama2-7b o", 4096, 4096),
    ("llama2-7b gate_up", 22016, 4096),
    ("llama2-7b down", 4096, 11008),
    ("llama3-8b qkv", 6144, 4096),
    ("llama3-8b gate_up", 28672, 4096),
    ("llama3-8b down", 4096, 14336),
    ("llama2-70b qkv", 10240, 8192),
    ("llama2-70b o", 8192, 8192),
    ("llama2-70b gate_up", 57344, 8192),
    ("llama2-70b down", 8192, 28672),
]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_SHAPES = SHAPES[:4]
QUICK_MS = [1, 4, 8, 16, 64, 256, 1024]

# The dispatch for warp-tiled weights in csrc/awq_dispatch.h (for the table), read from the source.
SKINNY_MAX_M_AUTO = kernels.source_constant("kSkinnyMaxMAuto")


def path_for(m: int, n: int, k: int, g: int) -> str:
    return "skinny" if m <= SKINNY_MAX_M_AUTO else "dequant+cublas"


def _print_row(row: dict) -> None:
    nan = float("nan")
    print(f"{row['shape']:20s} {row['N']:6d} {row['K']:6d} {row['M']:5d} {row['path']:>14s} {row['awq_us']:9.1f} "
          f"{(row['fp16_us'] if row['fp16_us'] is not None else nan):9.1f} "
          f"{(row['speedup'] if row['speedup'] is not None else nan):7.2f} "
          f"{row['GBps']:7.0f} {row['pct_copy_bw']:6.1f} {row['TFLOPS']:7.1f}", flush=True)


def _print_targets(results: list) -> None:
    """The issue's H100 targets next to what this run measured."""
    def speed(shape_nk, m):
        r = [x["speedup"] for x in results if (x["N"], x["K"]) == shape_nk and x["M"] == m and x["speedup"]]
        return r[0] if r else None

    def fmt(v):
        return "not measured" if v is None else f"{v:.2f}x"

    m16 = [x["speedup"] for x in results if x["M"] == 16 and x["speedup"]]
    big = [x["speedup"] for x in results if x["M"] >= 1024 and x["speedup"]]
    print("\ntargets (H100, vs fp16 in the same run):")
    print(f"  M=1  8192x28672 >= 3.3x : {fmt(speed((8192, 28672), 1))}")
    print(f"  M=1  4096x4096  >= 2.5x : {fmt(speed((4096, 4096), 1))}")
    print(f"  M=16 (min over shapes) >= 2.5x : {fmt(min(m16) if m16 else None)}"
          f"  (median {fmt(sorted(m16)[len(m16) // 2] if m16 else None)})")
    print(f"  M>=1024 (min over shapes) >= 0.9x : {fmt(min(big) if big else None)}")


def _bench_shape(name, N, K, ms, g, l2, cap, copy_bw, args, t0, results, report) -> bool:
    """Time every M of ``ms`` on one (N, K) weight; returns True once the time budget is spent."""
    wbytes = K * N // 2 + (K // g) * N * (2 + 0.5)
    nq = n_copies(int(wbytes), l2, cap)
    # Weights in the warp-tiled runtime layout, as from_quantized serves them with AWQLIB_LAYOUT=tiled (random words:
    # any permutation of random words is random).
    qws = [(torch.randint(-2**31, 2**31 - 1, (N // 64, K // 32, 256), dtype=torch.int32, device="cuda"),
            torch.randint(-2**31, 2**31 - 1, (K // g, N // 8), dtype=torch.int32, device="cuda"),
            (torch.rand(K // g, N, device="cuda") * 0.01).half()) for _ in range(nq)]
    w16s = []
    if not args.no_baseline:
        nf = n_copies(2 * K * N, l2, cap)
        w16s = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nf)]
    out_of_time = False
    for M in ms:
        if time.time() - t0 > args.time_budget:
            print(f"time budget of {args.time_budget:.0f}s reached; skipping the remaining cases")
            report["truncated"] = True
            out_of_time = True
            break
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        awq_calls = [lambda q=q: torch.ops.awqlib.awq_gemm(x, q[0], q[1], q[2], g) for q in qws]
        try:
            est = time_eager(awq_calls[0], reps=2)
            t_awq = time_graph(awq_calls, est)
            t_ref = None
            if w16s:
                ref_calls = [lambda w=w: F.linear(x, w) for w in w16s]
                t_ref = time_graph(ref_calls, time_eager(ref_calls[0], reps=2))
        except torch.OutOfMemoryError:
            print(f"{name:20s} {N:6d} {K:6d} {M:5d}  out of memory, skipped")
            torch.cuda.empty_cache()
            continue
        nbytes = wbytes + 2 * M * K + 2 * M * N
        gbps = nbytes / t_awq / 1e9
        row = {"shape": name, "N": N, "K": K, "M": M, "path": path_for(M, N, K, g), "awq_us": t_awq * 1e6,
               "fp16_us": t_ref * 1e6 if t_ref else None, "speedup": (t_ref / t_awq) if t_ref else None,
               "GBps": gbps, "pct_copy_bw": 100 * gbps / copy_bw, "TFLOPS": 2 * M * N * K / t_awq / 1e12,
               "weight_copies": nq}
        results.append(row)
        _print_row(row)
        del x, awq_calls
    del qws, w16s
    torch.cuda.empty_cache()
    return out_of_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--time-budget", type=float, default=600.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--quick", action="store_true", help="4 shapes, 7 token counts")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp16 torch baseline")
    args = ap.parse_args(argv)

    report: dict = {**run_info("bench_kernels", sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "group_size": args.group_size}
    if not torch.cuda.is_available():
        msg = "bench_kernels: no CUDA device; nothing to benchmark"
        print(msg)
        report["skipped"] = msg
        if args.out:
            write_json(args.out, report)
        return 0

    import awqlib.ops  # noqa: F401

    t0 = time.time()
    ok = kernels.load()
    report["backend"] = kernels.backend() if ok else "reference (kernels unavailable)"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    report["device"] = props.name
    report["sms"] = props.multi_processor_count
    copy_bw = copy_bandwidth()
    report["copy_GBps"] = copy_bw
    print(f"device {props.name}  SMs {props.multi_processor_count}  L2 {l2 >> 20} MB  backend {report['backend']}  "
          f"(setup {time.time() - t0:.1f}s)")
    print(f"device-to-device copy: {copy_bw:.0f} GB/s")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    ms = QUICK_MS if args.quick else MS
    g = args.group_size
    cap = int(props.total_memory * 0.25)  # memory for rotated weight copies, per kind
    results = []
    hdr = (f"{'shape':20s} {'N':>6s} {'K':>6s} {'M':>5s} {'path':>14s} {'awq us':>9s} {'fp16 us':>9s} {'speedup':>7s} "
           f"{'GB/s':>7s} {'%copy':>6s} {'TFLOPS':>7s}")
    print(hdr)
    print("-" * len(hdr))
    # Cases run in priority passes so that a time budget drops the least informative ones: first
    # the token counts the issue sets targets for (1, 16, >= 1024) on every shape, then the rest.
    first = [m for m in ms if m in (1, 16, 1024)]
    passes = [first, [m for m in ms if m not in first]]
    out_of_time = False
    for pass_ms in passes:
        for name, N, K in shapes:
            if out_of_time or not pass_ms:
                break
            out_of_time = _bench_shape(name, N, K, pass_ms, g, l2, cap, copy_bw, args, t0, results, report)
    results.sort(key=lambda r: ([s[0] for s in shapes].index(r["shape"]), r["M"]))
    print("\nsorted:")
    print(hdr)
    print("-" * len(hdr))
    for row in results:
        _print_row(row)
    _print_targets(results)
    report["results"] = results
    report["elapsed_s"] = time.time() - t0
    print("\n" + kernels_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out} (record it: python -m benchmarks.report --add {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time every CUDA kernel variant of awq_gemm on Llama shapes, to set the dispatch thresholds in
csrc/awq_dispatch.h (kSkinnyMaxMAuto) and the skinny kernel's split-K heuristic from data.

Each (shape, M) runs every applicable variant through ``torch.ops.awqlib.awq_gemm_variant`` on
the warp-tiled runtime layout (skinny tensor-core kernel with a deep / shallow register prefetch,
also with forced split-K factors; dequantize + cuBLAS) and on the GEMM (checkpoint) layout (the
skinny kernel), plus the automatic choice and fp16 ``F.linear``, all timed the way bench_kernels.py
times (rotated weights, CUDA graphs, events).  (The stream layout's variants: gpu_sweep.py.)  Prints the table and the winner per case; writes JSON (without a GPU: a JSON that
says "skipped", exit status 1).

    python -m benchmarks.tune_kernels --out tune.json --time-budget 120
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from awqlib.ops import Kernel
from benchmarks.common import copy_bandwidth, n_copies, run_info, skip, time_eager, time_graph, write_json
from benchmarks.report import tune_table

SHAPES = [("4096x4096", 4096, 4096), ("70b down", 8192, 28672), ("7b gate_up", 22016, 4096),
          ("8b qkv", 6144, 4096), ("8b down", 4096, 14336)]
MS = [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 512]
SPLIT_SWEEP_MS = (1, 4, 16)
SPLITS = [1, 2, 4, 8, 16, 32, 64]


def variants(m: int):
    """(label, layout, kernel, splits); layout 'gemm' is the checkpoint layout, 'tiled' the runtime one."""
    K = Kernel
    out = [("auto", "tiled", K.AUTO, 0), ("gemm:auto", "gemm", K.AUTO, 0)]
    if m <= 32:
        out += [("gemm:skinny-d2", "gemm", K.SKINNY_SHALLOW, 0), ("skinny", "tiled", K.SKINNY, 0),
                ("skinny-d2", "tiled", K.SKINNY_SHALLOW, 0)]
        if m in SPLIT_SWEEP_MS:
            out += ([(f"skinny/s{s}", "tiled", K.SKINNY, s) for s in SPLITS]
                    + [(f"skinny-d2/s{s}", "tiled", K.SKINNY_SHALLOW, s) for s in SPLITS])
    out.append(("dequant+cublas", "tiled", K.DEQUANT_CUBLAS, 0))
    return [(label, layout, int(k), s) for label, layout, k, s in out]


def tune_row(name: str, N: int, K: int, M: int, t_ref: float, times: dict[str, float]) -> dict:
    """One case of the JSON from its timings in seconds (``times``: per variant label, "auto" among
    them): µs, the fastest variant other than the automatic choice, and how far auto is from it."""
    best = min((t, lab) for lab, t in times.items() if lab != "auto")
    return {"shape": name, "N": N, "K": K, "M": M, "fp16_us": t_ref * 1e6, "us": {k: v * 1e6 for k, v in times.items()},
            "best": best[1], "auto_vs_best": times["auto"] / best[0]}


def new_report(argv: list[str], group_size: int) -> dict:
    return {**run_info("tune_kernels", argv), "torch": torch.__version__, "group_size": group_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    report = new_report(sys.argv[1:] if argv is None else argv, args.group_size)
    if not torch.cuda.is_available():
        return skip(report, args.out, "no CUDA device")
    from awqlib import kernels
    from awqlib.packing import tile_qweight
    props = torch.cuda.get_device_properties(0)
    report["device"] = props.name
    if not kernels.load():  # the variants are the CUDA kernels': nothing to time on the reference
        report["error"] = "kernels failed to build/load"
        print(f"tune_kernels: {report['error']}", file=sys.stderr)
        if args.out:
            write_json(args.out, report)
        return 1
    report["backend"] = kernels.backend()
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    cap = int(props.total_memory * 0.25)
    report.update(copy_GBps=copy_bandwidth(), rows=[])
    print(f"device {props.name}, copy {report['copy_GBps']:.0f} GB/s")
    g = args.group_size
    t0 = time.time()
    best_rows = []
    for name, N, K in SHAPES:
        if time.time() - t0 > args.time_budget:
            report["truncated"] = f"time budget of {args.time_budget:.0f} s reached"
            print(report["truncated"])
            break
        wbytes = K * N // 2 + (K // g) * N * 2.5
        qws = [(torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32, device="cuda"),
                torch.randint(-2**31, 2**31 - 1, (K // g, N // 8), dtype=torch.int32, device="cuda"),
                (torch.rand(K // g, N, device="cuda") * 0.01).half()) for _ in range(n_copies(int(wbytes), l2, cap))]
        qws = [(q, tile_qweight(q), z, s) for q, z, s in qws]
        w16s = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
                for _ in range(n_copies(2 * K * N, l2, cap))]
        for M in MS:
            if time.time() - t0 > args.time_budget:
                report["truncated"] = f"time budget of {args.time_budget:.0f} s reached"
                break
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref_calls = [lambda w=w: F.linear(x, w) for w in w16s]
            t_ref = time_graph(ref_calls, time_eager(ref_calls[0], reps=2))
            times = {}
            for label, layout, kern, splits in variants(M):
                calls = [lambda q=q, w=(q[1] if layout == "tiled" else q[0]), k=kern, s=splits:
                         torch.ops.awqlib.awq_gemm_variant(x, w, q[2], q[3], g, k, s) for q in qws]
                try:
                    times[label] = time_graph(calls, time_eager(calls[0], reps=2))
                except RuntimeError as e:  # a variant that refuses the shape
                    print(f"  {label}: {str(e).splitlines()[0]}")
            row = tune_row(name, N, K, M, t_ref, times)
            report["rows"].append(row)
            best = (times[row["best"]], row["best"])
            gbps = (wbytes + 2 * M * (K + N)) / best[0] / 1e9
            line = (f"{name:11s} M={M:4d} fp16 {t_ref * 1e6:8.1f}  auto {times['auto'] * 1e6:8.1f} "
                    f"({t_ref / times['auto']:.2f}x)  best {best[1]:18s} {best[0] * 1e6:8.1f} "
                    f"({t_ref / best[0]:.2f}x, {gbps:.0f} GB/s)")
            best_rows.append(line)
            print(line, flush=True)
            print("    " + "  ".join(f"{k}={v * 1e6:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1])),
                  flush=True)
        del qws, w16s
        torch.cuda.empty_cache()
    print("\nsummary (best variant per case):")
    for line in best_rows:
        print(line)
    print("\n" + tune_table(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

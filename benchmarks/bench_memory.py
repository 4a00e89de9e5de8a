"""Peak memory and wall time of quantizing a model bigger than we want to hold: a randomly
initialised Llama-architecture model (~4 GB in fp16, built from a config, saved as shards, no
download), quantized lazily block by block (``from_pretrained(lazy=True)``). The quantization runs
in a child process so its peak RSS is its own; the child runs with ``MALLOC_MMAP_THRESHOLD_=8388608``
(the setting README recommends for memory-bound runs) unless ``--glibc-default``.

    python -m benchmarks.bench_memory --out bench_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import CONFIG, build, rss_now, run_info, skip, write_json
from benchmarks.report import memory_table

N_SAMPLES, SEQLEN = 4, 256  # calibration: random tokens (memory does not depend on their values)


def child(src: str, out: str, lazy: bool, n_grid: int) -> None:
    import torch
    from awqlib import AutoAWQ
    baseline = rss_now()  # the interpreter with torch, transformers and awqlib imported
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (N_SAMPLES, SEQLEN))
    t0 = time.perf_counter()
    m = AutoAWQ.from_pretrained(src, lazy=lazy)
    m.quantize(None, {"w_bit": 4, "q_group_size": 128}, calib_data=list(ids), n_samples=N_SAMPLES, seqlen=SEQLEN,
               save_dir=out, overwrite=True, n_grid=n_grid, device="cpu")
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "baseline_rss_bytes": baseline,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "torch": torch.__version__, "torch_cuda": torch.version.cuda}))


def make_report(argv: list[str], measured: dict, model_bytes: int, quantized_bytes: int, threshold: str | None,
                n_grid: int, lazy: bool) -> dict:
    """The run's JSON: provenance, the child's measurements (``measured``: wall_s, baseline_rss_bytes,
    peak_rss_bytes, torch, torch_cuda) and the job they belong to."""
    return {**run_info("bench_memory", argv), "device": "cpu", **measured, "model_bytes": model_bytes,
            "ratio": round(measured["peak_rss_bytes"] / model_bytes, 3), "malloc_mmap_threshold": threshold,
            "quantized_bytes": quantized_bytes, "config": dict(CONFIG), "n_samples": N_SAMPLES, "seqlen": SEQLEN,
            "n_grid": n_grid, "lazy": lazy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n-grid", type=int, default=2, help="search grid (memory does not depend on it; time does)")
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                    help="decoder blocks (fewer: a quick check; the per-block peak does not depend on it)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="run the child with glibc's default allocation policy (no MALLOC_MMAP_THRESHOLD_)")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--eager", action="store_true", help="load the whole model (the in-memory path), not lazily")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    CONFIG["num_hidden_layers"] = a.layers
    if a.child:
        child(a.child[0], a.child[1], not a.eager, a.n_grid)
        return 0
    if not common.PROC_STATUS.is_file():
        why = f"resident memory is read from {common.PROC_STATUS} (Linux only)"
        return skip(run_info("bench_memory", argv), a.out, why)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="awqlib-mem-"))
    src = work / "src"
    if not (src / "config.json").exists():
        size = build(src)
    else:
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"model: {size / 1e9:.2f} GB fp16 in {src}", flush=True)
    env = dict(os.environ)
    if not a.glibc_default:  # see awqlib.lazy.release_memory: allocations >= 8 MB get their own mapping
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(8 << 20))
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", str(src), str(work / "q"),
           "--n-grid", str(a.n_grid), "--layers", str(a.layers)] + (["--eager"] if a.eager else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        r = {**run_info("bench_memory", argv), "device": "cpu",
             "error": f"the quantizing child failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"}
        write_json(a.out, r)
        return 1
    r = make_report(argv, json.loads(res.stdout.strip().splitlines()[-1]), size,
                    sum(f.stat().st_size for f in (work / "q").glob("*.safetensors")),
                    env.get("MALLOC_MMAP_THRESHOLD_"), a.n_grid, not a.eager)
    print(memory_table([r]))
    write_json(a.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

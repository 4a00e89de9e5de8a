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

from benchmarks.common import CONFIG, build, rss_now

def child(src: str, out: str, lazy: bool, n_grid: int) -> None:
    import torch
    from awqlib import AutoAWQ
    baseline = rss_now()  # the interpreter with torch, transformers and awqlib imported
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 256))
    t0 = time.perf_counter()
    m = AutoAWQ.from_pretrained(src, lazy=lazy)
    m.quantize(None, {"w_bit": 4, "q_group_size": 128}, calib_data=list(ids), n_samples=4, seqlen=256,
               save_dir=out, overwrite=True, n_grid=n_grid, device="cpu")
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "baseline_rss_bytes": baseline,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "torch": torch.__version__}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n-grid", type=int, default=2, help="search grid (memory does not depend on it; time does)")
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                    help="decoder blocks (fewer: a quick check; the per-block peak does not depend on it)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="run the child with glibc's default allocation policy (no MALLOC_MMAP_THRESHOLD_)")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--eager", action="store_true", help="child: load the whole model (the in-memory path)")
    a = ap.parse_args()
    CONFIG["num_hidden_layers"] = a.layers
    if a.child:
        child(a.child[0], a.child[1], not a.eager, a.n_grid)
        return
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
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", str(src), str(work / "q"), "--n-grid", str(a.n_grid)],
                         capture_output=True, text=True, check=True, env=env)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(model_bytes=size, ratio=round(r["peak_rss_bytes"] / size, 3),
             malloc_mmap_threshold=env.get("MALLOC_MMAP_THRESHOLD_"),
             quantized_bytes=sum(f.stat().st_size for f in (work / "q").glob("*.safetensors")), config=CONFIG)
    print(f"| model size | peak RSS | RSS / size | RSS after imports | wall |\n|---|---|---|---|---|\n"
          f"| {size / 1e9:.2f} GB | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['ratio']:.1%} | "
          f"{r['baseline_rss_bytes'] / 1e9:.2f} GB | {r['wall_s']} s |")
    Path(a.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

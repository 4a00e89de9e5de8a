"""Peak memory and wall time of quantizing a model bigger than we want to hold: a randomly
initialised Llama-architecture model (~4 GB in fp16, built from a config, saved as shards, no
download), quantized lazily block by block (``from_pretrained(lazy=True)``). The quantization runs
in a child process so its peak RSS is its own.

    python benchmarks/bench_memory.py --out bench_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build(folder: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float16)
    model.save_pretrained(folder, max_shard_size="1GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def child(src: str, out: str, lazy: bool, n_grid: int) -> None:
    import torch
    from awqlib import AutoAWQ
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 256))
    t0 = time.perf_counter()
    m = AutoAWQ.from_pretrained(src, lazy=lazy)
    m.quantize(None, {"w_bit": 4, "q_group_size": 128}, calib_data=list(ids), n_samples=4, seqlen=256,
               save_dir=out, overwrite=True, n_grid=n_grid, device="cpu")
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n-grid", type=int, default=2, help="search grid (memory does not depend on it; time does)")
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--eager", action="store_true", help="child: load the whole model (the in-memory path)")
    a = ap.parse_args()
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
    res = subprocess.run([sys.executable, __file__, "--child", str(src), str(work / "q"), "--n-grid", str(a.n_grid)],
                         capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(model_bytes=size, ratio=round(r["peak_rss_bytes"] / size, 3),
             quantized_bytes=sum(f.stat().st_size for f in (work / "q").glob("*.safetensors")), config=CONFIG)
    print(f"| model size | peak RSS | RSS / size | wall |\n|---|---|---|---|\n"
          f"| {size / 1e9:.2f} GB | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['ratio']:.1%} | {r['wall_s']} s |")
    Path(a.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

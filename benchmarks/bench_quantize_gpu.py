"""Quantization speed and peak GPU memory on a Llama-3-8B-shaped model (random weights).

Builds the first ``--blocks`` decoder blocks of a Llama-3-8B-shaped model (hidden 4096, inter 14336,
32 heads, 8 KV heads, vocab 128256) with random fp16 weights, saves it, and quantizes it lazily
(one block at a time on the device, the way an 8B model is quantized on one GPU) with each method at
its default settings (128 x 512 calibration tokens, g128).  Reports seconds per block, the whole
model's extrapolated time (32 blocks) and peak GPU memory against the fp16 model's size.
Prints a table and writes JSON; no timed assertions.

    python -m benchmarks.bench_quantize_gpu --out bench_quantize_gpu.json      # on a GPU
    python -m benchmarks.bench_quantize_gpu --tiny --device cpu                 # smoke test (tiny shape)

Without a GPU (and without ``--device cpu``) it writes a JSON that says "skipped" and exits 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from awqlib import AutoAWQ, awq
from benchmarks.common import device_label, run_info, skip, write_json
from benchmarks.report import quantize_gpu_table

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False, num_hidden_layers=32)
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024)


def fp16_model_bytes(cfg_kw: dict) -> int:
    """Size in fp16 of the whole (all-blocks) model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig
    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(LlamaConfig(**cfg_kw))
    return 2 * sum(p.numel() for p in m.parameters())


def build(folder: Path, cfg_kw: dict, blocks: int, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fast
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg_kw, "num_hidden_layers": blocks}),
                                                 dtype=torch.float16)
    model.save_pretrained(folder)


def timed_blocks(device: torch.device) -> list[float]:
    """Wrap awq.quantize_block to record each block's wall time (synchronised on CUDA)."""
    times: list[float] = []
    inner = awq.quantize_block

    def wrapper(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        return out

    awq.quantize_block = wrapper
    return times


def make_report(argv: list[str], name: str, device: torch.device, model_blocks: int, group_size: int,
                n_samples: int, seqlen: int, rows: list[dict]) -> dict:
    """The run's JSON: provenance, the job, and one row per method (seconds per block, the whole
    model's extrapolated time, peak GPU memory).  "device" is torch's ("cuda", "cpu"), "gpu" the card."""
    return {**run_info("bench_quantize_gpu", argv), "torch": torch.__version__, "model": name, "device": str(device),
            "gpu": device_label(device) if device.type == "cuda" else None, "model_blocks": model_blocks,
            "group_size": group_size, "n_samples": n_samples, "seqlen": seqlen, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--methods", default=",".join(dict.fromkeys(["awq", awq.DEFAULT_METHOD])))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same layout (smoke test)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny: a smoke test)")
    ap.add_argument("--out", default="bench_quantize_gpu.json")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return skip(run_info("bench_quantize_gpu", argv), a.out, "no CUDA device")
    cfg_kw = TINY if a.tiny else LLAMA3_8B
    n_full = cfg_kw["num_hidden_layers"]
    model_bytes = fp16_model_bytes(cfg_kw)
    g = torch.Generator().manual_seed(0)
    calib = list(torch.randint(0, cfg_kw["vocab_size"], (a.n_samples, a.seqlen), generator=g))
    qc = {"w_bit": 4, "q_group_size": a.group_size, "zero_point": True, "version": "gemm"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        t0 = time.perf_counter()
        build(src, cfg_kw, a.blocks, device)
        print(f"built {a.blocks} blocks in {time.perf_counter() - t0:.1f} s", flush=True)
        block_times = timed_blocks(device)
        for method in a.methods.split(","):
            block_times.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            m = AutoAWQ.from_pretrained(str(src), lazy=True, torch_dtype=torch.float16)
            m.quantize(None, qc, calib_data=calib, n_samples=a.n_samples, seqlen=a.seqlen, method=method,
                       device=device, save_dir=Path(tmp) / f"q-{method.replace('+', '-')}", overwrite=True)
            total = m.stats["quantize_seconds"]
            per_block = statistics.median(block_times)
            fixed = total - sum(block_times)  # capture of the first block's inputs, loading, ...
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            r = {"method": method, "blocks": a.blocks, "seconds_per_block": round(per_block, 2),
                 "block_seconds": [round(t, 2) for t in block_times], "other_seconds": round(fixed, 2),
                 "extrapolated_whole_model_s": round(fixed + n_full * per_block, 1),
                 "peak_gpu_bytes": peak, "fp16_model_bytes": model_bytes,
                 "peak_over_model": round(peak / model_bytes, 3) if peak else None}
            rows.append(r)
            print(json.dumps(r), flush=True)
            del m
    report = make_report(argv, "tiny Llama-3-shaped" if a.tiny else "Llama-3-8B-shaped", device, n_full,
                         a.group_size, a.n_samples, a.seqlen, rows)
    print("\n" + quantize_gpu_table(report))
    write_json(a.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

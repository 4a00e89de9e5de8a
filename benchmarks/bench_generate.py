"""Decode throughput (tokens/s) of a randomly initialised Llama-architecture model: fp16 vs
awqlib int4 with ``fuse_layers`` (fused linears and one-op norms, rotary and activation), batch 1
and 8. No download: the model is built from a config on the GPU and quantized with round-to-nearest
(speed does not depend on the scales). The int4 model is timed unfused, with q/k/v and gate/up
fused, then with fuse_layers' one-op norms, rotary and activation too (the library's default
settings); ``--kernel-options none,pdl+narrow`` times it again with the stream kernel's launch
options set so ("none": every option off; csrc/awq_ops.cpp reads them on every call, so one model
serves all). Last, the control: a fresh
fp16 model with the same one-op block ops (fp16 GEMMs). Rows are written to the JSON as they are
measured.

    python -m benchmarks.bench_generate --size 8b --out bench_generate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import (STREAM_DEFAULTS_ENV, STREAM_OPTIONS, STREAM_SMEM_LIMIT, run_info, scoped_env, skip,
                               stream_options_env, time_graph, write_json)
from benchmarks.report import decode_table


def parse_kernel_options(text: str) -> list[tuple[str, ...]]:
    """'none,pdl,pdl+narrow' -> [('none',), ('pdl',), ('narrow', 'pdl')] ("none": every option off);
    an unknown name is an error naming the accepted ones."""
    combos = []
    for item in filter(None, text.split(",")):
        names = tuple(sorted(item.split("+")))
        if "none" in names and names != ("none",):
            raise argparse.ArgumentTypeError(f"kernel option 'none' (every option off) stands alone, got {item!r}")
        bad = [n for n in names if n not in STREAM_OPTIONS and n != "none"]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown kernel option {bad[0]!r} in {item!r}; accepted: "
                                             f"{', '.join(STREAM_OPTIONS)} (joined with + or ,), or none")
        if len(set(names)) != len(names) or names in combos:
            raise argparse.ArgumentTypeError(f"kernel option {item!r} repeats an option or a combination")
        combos.append(names)
    return combos


def kernel_options(names: tuple[str, ...]):
    """Every option in ``names`` on, the others off, for the duration."""
    return scoped_env(stream_options_env(*(n for n in names if n != "none")))


SIZES = {  # Llama-architecture shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}


@torch.no_grad()
def decode_tps(model, batch: int, prompt: int, new: int, vocab: int, static: bool = False) -> float:
    """Tokens/s of HF generate.  ``static``: with a static KV cache (what a compiled forward needs),
    warmed up at the timed lengths so that compilation and CUDA-graph recording stay out of the time."""
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
        for _ in range(3):  # compile, then the graphs mode="reduce-overhead" records
            model.generate(input_ids=ids, **kw)
    model.generate(input_ids=ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, **kw)
    torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - t0)


@torch.no_grad()
def graph_step_ms(model, batch: int, vocab: int) -> float | None:
    """GPU time of one decode-sized forward (batch x 1 token, no KV cache), captured in a CUDA graph
    so that Python and launch overhead drop out: the part of a decode step int4 weights change.
    None if this transformers version's forward cannot be captured."""
    ids = torch.randint(0, vocab, (batch, 1), device="cuda")
    try:
        return time_graph([lambda: model(input_ids=ids, use_cache=False)], est_s=1e-3) * 1e3
    except Exception as e:  # noqa: BLE001 -- report, do not fail the benchmark
        print(f"graph capture failed: {type(e).__name__}: {e}")
        return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b", choices=sorted(SIZES))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench_generate.json")
    ap.add_argument("--compiled", action="store_true",
                    help="also time generate of the fuse_layers model with a static cache and its forward compiled "
                         "(mode='reduce-overhead': decode steps as CUDA graphs; compiling takes minutes)")
    ap.add_argument("--kernel-options", type=parse_kernel_options, default=[],
                    help="also time the fused int4 model with these stream-kernel options set (the others off), e.g. "
                         "none,pdl+narrow (none: every option off; the plain rows run the defaults: narrow on)")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    from awqlib.packing import runtime_layout
    if a.kernel_options and runtime_layout() != "stream":
        ap.error(f"--kernel-options are the stream kernel's: set AWQLIB_LAYOUT=stream (the runtime layout is "
                 f"{runtime_layout()!r}, whose kernels ignore them)")
    if not torch.cuda.is_available():
        return skip(run_info("bench_generate", argv), a.out, "no CUDA device")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from awqlib import AutoAWQ
    from awqlib.fuse import fuse_block_ops, fuse_linears

    cfg = LlamaConfig(**SIZES[a.size], vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    report = {**run_info("bench_generate", argv), "size": a.size, "prompt": a.prompt,
              "new_tokens": a.new_tokens, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "runtime_layout": runtime_layout(), "rows": rows}

    def measure(label, static=False):
        for b in batches:
            tps = decode_tps(model, b, a.prompt, a.new_tokens, cfg.vocab_size, static)
            step = None if static else graph_step_ms(model, b, cfg.vocab_size)  # a compiled forward records its own
            rows.append({"model": label, "batch": b, "tokens_per_s": round(tps, 1),
                         "graph_step_ms": round(step, 3) if step else None})
            print(json.dumps(rows[-1]), flush=True)
            write_json(a.out, report)  # after every row: a run stopped at its time limit keeps what it measured

    measure("fp16")
    # One model, changed step by step (one quantization: an 8B model's RTN is the slow part), each
    # step timed: int4 without fusion, q/k/v and gate/up fused (what fuse_layers=True did before it
    # fused the block ops), then the block ops too: fuse_layers=True.
    wrapped = AutoAWQ.from_model(model)
    # (quantize leaves the linears on the GPU in the kernels' runtime layout, as from_quantized does)
    wrapped.quantize(None, {"w_bit": 4, "q_group_size": 128}, method="rtn", device="cuda")
    # with --kernel-options the plain rows run the library's defaults (else as the environment says,
    # but on this GPU's shared memory: never an inherited STREAM_SMEM_LIMIT cap)
    plain = (lambda: scoped_env(STREAM_DEFAULTS_ENV if a.kernel_options else {STREAM_SMEM_LIMIT: None}))
    with plain():
        measure("awq-int4")
    fuse_linears(wrapped.model, wrapped.spec)
    with plain():
        measure("awq-int4-fused")
    fuse_block_ops(wrapped.model, wrapped.spec)
    with plain():
        measure("awq-int4-fuse-layers")
    for names in a.kernel_options:
        with kernel_options(names):
            measure("awq-int4-fuse-layers+" + "+".join(names))
    if a.compiled:
        eager_forward = model.forward
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        with plain():
            measure("awq-int4-fuse-layers-compiled", static=True)
        model.forward = eager_forward
    # the control: fp16 GEMMs with the same one-op norms, rotary and activation (a fresh fp16 model)
    del wrapped, model
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    fuse_block_ops(model, AutoAWQ.from_model(model).spec)
    measure("fp16-block-ops")
    print(f"\n{a.size} Llama, {report['device']}, prompt {a.prompt}, {a.new_tokens} new tokens, "
          f"int4 weights in the {report['runtime_layout']} runtime layout")
    print(decode_table(report))
    write_json(a.out, report)


if __name__ == "__main__":
    sys.exit(main())

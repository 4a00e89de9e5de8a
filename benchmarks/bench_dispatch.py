"""How many ops one decode step dispatches, per decoder layer and in all, per model family.

On a GPU each op here is at least one kernel (a few microseconds each at decode, even inside a
CUDA graph), and in HF ``generate`` each costs host time to dispatch: an 8B decode step runs ~40
per layer in transformers' code, ~1300 in all, which is why the int4 linears' speed shows only
partly in a decode step (benchmarks/RESULTS.md).  This counts them on the CPU, no GPU needed: every
op that reaches the dispatcher, views and allocations left out (they launch nothing), with an
awqlib op counted once (one kernel on CUDA).  Tiny random models of the tests' families, fp16,
one new token after a 4-token prompt with transformers' KV cache, batch 1.

    python -m benchmarks.bench_dispatch [--archs llama,qwen3,...] [--out bench_dispatch.json]

Variants: ``fp16`` (transformers as is), ``fp16+block-ops`` (awqlib.fuse.fuse_block_ops on the fp16
model), ``int4`` (RTN g64, the WQLinear op), ``int4+fused-linears`` (q/k/v and gate/up as one GEMM)
and ``int4 fuse_layers`` (both: what ``from_quantized(fuse_layers=True)`` gives).  Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import run_info, tiny_model, write_json
from benchmarks.report import dispatch_table

# ops that only describe memory (views, allocation): no kernel on any device
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "expand", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "slice", "select", "alias", "as_strided", "detach", "split", "split_with_sizes", "unbind",
    "chunk", "unflatten", "flatten", "lift_fresh", "empty", "empty_like", "new_empty", "empty_strided",
})
DEFAULT_ARCHS = ("llama", "qwen3", "gemma3", "phi3", "mixtral", "qwen3_moe")
VARIANTS = ("fp16", "fp16+block-ops", "int4", "int4+fused-linears", "int4 fuse_layers")


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while ``on`` (an op's own inner ops are not seen: the mode is off
    inside its handler)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.on = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.on and name not in NO_KERNEL:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def decode_step_ops(model, block) -> tuple[collections.Counter, collections.Counter]:
    """(the ops of ``block`` in one decode step, the ops of the whole step)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=g)
    # transformers renamed past_key_values to cache (5.2x): use the name this version has
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = model(input_ids=ids[:, :4], use_cache=True)[cache_arg]
    in_block, whole = OpCounter(), OpCounter()
    in_block.on = False
    hooks = [block.register_forward_pre_hook(lambda *a: setattr(in_block, "on", True)),
             block.register_forward_hook(lambda *a: setattr(in_block, "on", False))]
    try:
        with whole, in_block:
            model(input_ids=ids[:, 4:], use_cache=True, **{cache_arg: cache})
    finally:
        for h in hooks:
            h.remove()
    return in_block.counts, whole.counts


def variant_models(arch: str):
    """Yield (variant, model) for VARIANTS, in order; the int4 ones are one model changed step by step."""
    from awqlib import AutoAWQ
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops, fuse_linears

    model = tiny_model(arch).half().eval()
    spec = get_spec(model.config.model_type)
    yield "fp16", model
    control = tiny_model(arch).half().eval()
    fuse_block_ops(control, spec)
    yield "fp16+block-ops", control
    AutoAWQ.from_model(model).quantize(None, {"w_bit": 4, "q_group_size": 64}, method="rtn")
    model.half()  # quantizing on a CPU computes (and leaves the model) in fp32
    yield "int4", model
    fuse_linears(model, spec)
    yield "int4+fused-linears", model
    fuse_block_ops(model, spec)
    yield "int4 fuse_layers", model


def measure(arch: str) -> dict:
    """Per variant: the ops of the first decoder layer and of the whole step, by op for the layer."""
    from awqlib.arch import get_spec
    from awqlib.arch.blocks import get_blocks

    out = {}
    for variant, model in variant_models(arch):
        blocks = get_blocks(model, get_spec(model.config.model_type))
        layer, step = decode_step_ops(model, blocks[0])
        out[variant] = {"per_layer": sum(layer.values()), "step": sum(step.values()), "layers": len(blocks),
                        "layer_ops": dict(sorted(layer.items()))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="tiny test families (tests/conftest.py ARCHS)")
    ap.add_argument("--out", default="bench_dispatch.json")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    rows: dict[str, dict] = {}
    report = {**run_info("bench_dispatch", argv), "device": "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "variants": list(VARIANTS), "rows": rows}
    for arch in a.archs.split(","):
        rows[arch] = measure(arch)
        write_json(a.out, report)
    print(dispatch_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Block-output error on held-out tokens, per method/option, for the first blocks of a model.

A cheap, model-agnostic check of a quantization variant: each of the first ``--blocks`` decoder
blocks is quantized (from the same fp inputs) by every variant, and its output on *held-out* tokens
is compared with the fp block's output (relative MSE).  Calibration and held-out tokens never
overlap; neither comes from the perplexity evaluation text.  Prints a table and writes JSON.

    python -m benchmarks.bench_blocks --model smollm2 --blocks 3 --variants 'rtn;awq;awq+gptq'
    python -m benchmarks.bench_blocks --model tiny:qwen2 --variants 'rtn;awq;awq+gptq' --group-size 128
    a variant: METHOD or METHOD:option=value,option=value (AWQOptions fields), e.g. awq+gptq:clip_asym=true
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from awqlib import awq
from awqlib.arch import get_spec
from awqlib.calib import get_calib_tokens
from awqlib.config import QuantConfig
from benchmarks.common import effective_options, run_info, skip, tiny_model, write_json
from benchmarks.report import blocks_table

REPO = Path(__file__).resolve().parents[1]


def parse_variant(v: str) -> tuple[str, dict]:
    method, _, rest = v.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition("=")
        opts[k] = json.loads(val.lower() if val.lower() in ("true", "false") else val)
    return method, opts


def load(model_arg: str, data: Path, n_calib: int, n_held: int, seqlen: int):
    """(model, calibration token rows, held-out token rows)."""
    if model_arg.startswith("tiny:"):
        model = tiny_model(model_arg.split(":", 1)[1])
        g = torch.Generator().manual_seed(1)
        v = model.config.vocab_size
        return model, torch.randint(0, v, (16, 64), generator=g), torch.randint(0, v, (16, 64), generator=g)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if model_arg == "smollm2":
        from awqlib.offline import smollm2_path
        model_arg = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_arg)
    model = AutoModelForCausalLM.from_pretrained(model_arg, dtype=torch.float32).eval()
    lines = [l.strip() for l in (data / "wikitext2-tokenized-valid.txt").read_text(encoding="utf-8").splitlines()]
    lines = [l for l in lines if len(l) > 200]
    calib = get_calib_tokens(lines[:n_calib], tok, n_calib, seqlen)
    held = get_calib_tokens(lines[n_calib:n_calib + n_held], tok, n_held, seqlen)
    return model, calib, held


def make_report(argv: list[str], model: str, group_size: int, blocks: int, n_calib: int, n_held: int,
                threads: int, rows: dict) -> dict:
    """The run's JSON: provenance, the job and, per variant, each block's relative error and seconds."""
    return {**run_info("bench_blocks", argv), "device": "cpu", "torch": torch.__version__, "threads": threads,
            "model": model, "group_size": group_size, "blocks": blocks, "n_calib": n_calib, "n_held": n_held,
            "rows": rows}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a folder, 'smollm2', or tiny:<arch> (tests' random models)")
    ap.add_argument("--data", default=os.environ.get("AWQLIB_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--variants", default="rtn;awq;awq+gptq", help="';'-separated; the first is the baseline")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=32, help="calibration lines (validation text)")
    ap.add_argument("--n-held", type=int, default=16, help="held-out lines after them (validation text)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="bench_blocks.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (1 on a shared machine: spinning threads stall under oversubscription)")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    text = Path(a.data) / "wikitext2-tokenized-valid.txt"
    if not a.model.startswith("tiny:") and not text.is_file():
        return skip(run_info("bench_blocks", argv), a.out, f"no calibration text at {text} (--data)")
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    model, calib, held = load(a.model, Path(a.data), a.n_calib, a.n_held, a.seqlen)
    spec = get_spec(model.config.model_type)
    qcfg = QuantConfig(group_size=a.group_size)
    c_in, c_kw = awq.capture_inputs(model, spec, calib, 8, cpu, cpu)
    h_in, h_kw = awq.capture_inputs(model, spec, held, 8, cpu, cpu)
    names = [v.strip() for v in a.variants.split(";") if v.strip()]
    variants = [parse_variant(v) for v in names]
    rows = {n: {"rel_err": [], "seconds": [], "settings": effective_options(*v)} for n, v in zip(names, variants)}
    blocks = awq.get_blocks(model, spec)
    for i in range(a.blocks):
        blk = blocks[i]

        def run(b, inps, kws):
            return [awq.run_block(b, x, kws[x.shape[0]]) for x in inps]

        ref_h = run(blk, h_in, h_kw[i])
        ref_c = run(blk, c_in, c_kw[i])
        den = sum(r.pow(2).sum().item() for r in ref_h)
        for name, (method, opts) in zip(names, variants):
            b = copy.deepcopy(blk)
            t0 = time.perf_counter()
            if method == "rtn":
                awq.rtn_quantize_block(b, spec, qcfg)
            else:
                awq.quantize_block(b, spec, qcfg, awq.make_options(method, **opts), c_in, c_kw[i], cpu)
            dt = time.perf_counter() - t0
            err = sum((o - r).pow(2).sum().item() for o, r in zip(run(b, h_in, h_kw[i]), ref_h)) / den
            rows[name]["rel_err"].append(err)
            rows[name]["seconds"].append(round(dt, 2))
            print(json.dumps({"block": i, "variant": name, "rel_err": err, "seconds": round(dt, 2)}), flush=True)
        c_in, h_in = ref_c, ref_h  # the next block is calibrated on fp outputs (awqlib's default)
    report = make_report(argv, a.model, a.group_size, a.blocks, a.n_calib, a.n_held, a.threads, rows)
    print("\n" + blocks_table(report))
    write_json(a.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""AutoAWQ 0.2.9 vs awqlib on the same job, measured in one run on this machine:
SmolLM2-135M-Instruct in fp32 on the CPU, group size 64, calibration = the first N lines over
200 characters of wikitext2-tokenized-valid.txt, seqlen 512.

AutoAWQ runs in its own virtual environment (it needs transformers 4.51):

    python3 -m venv /work/venv-autoawq
    /work/venv-autoawq/bin/pip install torch==2.13.0 transformers==4.51.3 autoawq==0.2.9 accelerate
    # AutoAWQ's CPU restore bug: its quantizer keeps `{k: v.cpu() ...}` as the copy to restore, which on
    # a CPU model aliases the weights. This script refuses to run an unpatched AutoAWQ; patch with
    sed -i 's/org_sd = {k: v.cpu() for k/org_sd = {k: v.detach().cpu().clone() for k/' \\
        /work/venv-autoawq/lib/python3.11/site-packages/awq/quantize/quantizer.py

    python -m benchmarks.bench_vs_autoawq --autoawq-python /work/venv-autoawq/bin/python \\
        --n-texts 128 --blocks 3 --out vs_autoawq.json

``--blocks N`` quantizes only the first N decoder blocks in both (wall time per block; the full
model takes AutoAWQ ~45 minutes here); ``--blocks 0`` runs the whole model and also reports
perplexity on the first ``--windows`` windows of wikitext2-raw-test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import run_info, skip, write_json
from benchmarks.report import vs_autoawq_table

# Which AutoAWQ the run compares with; refuses an AutoAWQ with the CPU restore bug (see above).
AUTOAWQ_PROBE = r'''
import importlib.metadata as md, inspect, json, sys
import awq.quantize.quantizer as qz
if "v.cpu() for k" in inspect.getsource(qz):
    sys.exit("AutoAWQ's quantizer.py is unpatched (org_sd aliasing bug on CPU); see bench_vs_autoawq.py")
print(json.dumps({p: md.version(p) for p in ("autoawq", "torch", "transformers")}))
'''

AUTOAWQ_CHILD = r'''
import json, sys, time, torch
from awq import AutoAWQForCausalLM
from transformers import AutoTokenizer
path, texts_file, blocks, g, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
texts = json.load(open(texts_file))
tok = AutoTokenizer.from_pretrained(path)
m = AutoAWQForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
if blocks:
    m.model.model.layers = m.model.model.layers[:blocks]
    m.model.config.num_hidden_layers = blocks
t0 = time.perf_counter()
m.quantize(tok, quant_config={"zero_point": True, "q_group_size": g, "w_bit": 4, "version": "GEMM"},
           calib_data=texts, max_calib_samples=len(texts), max_calib_seq_len=512)
dt = time.perf_counter() - t0
if out != "-":
    m.save_quantized(out)
print(json.dumps({"quantize_s": dt}))
'''


def probe_autoawq(python: str) -> dict | str:
    """AutoAWQ's, its torch's and its transformers' versions in ``python``'s environment, or why
    that environment cannot run the comparison."""
    if not Path(python).is_file():
        return f"no AutoAWQ interpreter at {python} (--autoawq-python; the module docstring says how to make one)"
    p = subprocess.run([python, "-c", AUTOAWQ_PROBE], capture_output=True, text=True)
    if p.returncode:
        return f"AutoAWQ is not usable in {python}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def autoawq_folder(src: Path, dst: Path) -> Path:
    """transformers 4.51 spellings: rope_theta at the top level, an explicit tokenizer class."""
    import shutil
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst


def make_report(argv: list[str], job: dict, awqlib_res: dict, autoawq_res: dict | None, autoawq_env: dict | None,
                torch_version: str) -> dict:
    """The run's JSON: provenance, the job, each tool's quantize_s (and ppl on a whole-model run)
    and ``speedup``: AutoAWQ's time over awqlib's (how many times faster awqlib was)."""
    res = {**run_info("bench_vs_autoawq", argv), "device": "cpu", "torch": torch_version,
           "autoawq_env": autoawq_env, "job": job, "awqlib": awqlib_res}
    if autoawq_res is not None:
        res["autoawq"] = autoawq_res
        res["speedup"] = round(autoawq_res["quantize_s"] / awqlib_res["quantize_s"], 2)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--autoawq-python", default="/work/venv-autoawq/bin/python")
    ap.add_argument("--data", default=os.environ.get("AWQLIB_DATA", "../shared/data"))
    ap.add_argument("--n-texts", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=3, help="quantize the first N blocks only; 0: the whole model")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--skip-autoawq", action="store_true", help="time awqlib alone (no comparison to record)")
    ap.add_argument("--out", default="vs_autoawq.json")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    env = None
    if not a.skip_autoawq:  # before awqlib's minutes: a comparison without AutoAWQ is no comparison
        env = probe_autoawq(a.autoawq_python)
        if isinstance(env, str):
            return skip(run_info("bench_vs_autoawq", argv), a.out, env)
    data = Path(a.data)
    if not (data / "wikitext2-tokenized-valid.txt").is_file():
        return skip(run_info("bench_vs_autoawq", argv), a.out, f"no calibration text in {data} (--data)")

    import torch
    from transformers import AutoTokenizer

    from awqlib import AutoAWQ
    from awqlib.eval import load_eval_tokens, perplexity
    from awqlib.offline import smollm2_path

    src = smollm2_path()
    lines = [l.strip() for l in (data / "wikitext2-tokenized-valid.txt").read_text().splitlines()]
    texts = [l for l in lines if len(l) > 200][: a.n_texts]
    work = Path(tempfile.mkdtemp(prefix="awqlib-vs-"))
    (work / "texts.json").write_text(json.dumps(texts))
    full = a.blocks == 0
    n_blocks = json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"] if full else a.blocks
    job = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "group_size": a.group_size, "n_texts": len(texts),
           "seqlen": 512, "blocks": n_blocks, "threads": torch.get_num_threads(), "whole_model": full}
    if full:
        job["windows"] = a.windows
    tok = AutoTokenizer.from_pretrained(src)
    eval_tokens = load_eval_tokens(tok, str(data / "wikitext2-raw-test.txt")) if full else None

    # awqlib
    m = AutoAWQ.from_pretrained(str(src), torch_dtype=torch.float32)
    if not full:
        m.model.model.layers = m.model.model.layers[: a.blocks]
        m.model.config.num_hidden_layers = a.blocks
    t0 = time.perf_counter()
    m.quantize(tok, {"w_bit": 4, "q_group_size": a.group_size}, calib_data=texts, n_samples=len(texts), seqlen=512)
    mine = {"quantize_s": round(time.perf_counter() - t0, 1)}
    if full:
        mine["ppl"] = round(perplexity(m, eval_tokens, 1024, a.windows), 3)
    print(json.dumps(mine), flush=True)
    del m

    # AutoAWQ (patched), same job
    theirs = None
    if not a.skip_autoawq:
        folder = autoawq_folder(src, work / "autoawq-src")
        out = str(work / "autoawq-q") if full else "-"
        p = subprocess.run([a.autoawq_python, "-c", AUTOAWQ_CHILD, str(folder), str(work / "texts.json"),
                            str(a.blocks), str(a.group_size), out], capture_output=True, text=True)
        if p.returncode:
            print(f"AutoAWQ failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            rep = make_report(argv, job, mine, None, env, torch.__version__)
            rep["error"] = f"AutoAWQ failed (exit {p.returncode}): {p.stderr.strip()[-500:]}"
            write_json(a.out, rep)
            return 1
        r = json.loads(p.stdout.strip().splitlines()[-1])
        theirs = {"quantize_s": round(r["quantize_s"], 1)}
        if full:  # AutoAWQ's checkpoint is GEMM: awqlib loads it
            q = AutoAWQ.from_quantized(out)
            theirs["ppl"] = round(perplexity(q, eval_tokens, 1024, a.windows), 3)
        print(json.dumps(theirs), flush=True)
    rep = make_report(argv, job, mine, theirs, env, torch.__version__)
    if theirs is not None:
        print("\n" + vs_autoawq_table([rep]))
    write_json(a.out, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

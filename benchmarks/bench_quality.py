"""Perplexity and wall time of fp / RTN / AWQ on SmolLM2-135M (offline), printed as a table and
written as JSON.  Conventions: ../shared/data/README.md (wikitext2 test, windows of 1024 tokens).

    python -m benchmarks.bench_quality --data ../shared/data --windows 32 --out results.json
    python -m benchmarks.bench_quality --ablate     # each AWQ option on/off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from awqlib import AutoAWQ, awq
from awqlib.eval import load_eval_tokens, perplexity
from awqlib.offline import smollm2_path
from benchmarks.bench_blocks import parse_variant
from benchmarks.common import effective_options, run_info, write_json
from benchmarks.report import quality_table

SEQLEN = 512  # calibration sequence length


def calib_lines(path: Path, n: int, min_chars: int = 200) -> list[str]:
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if len(l) > min_chars][:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model_dir, tok, method, calib, qc, windows, eval_tokens, **opts):
    m = AutoAWQ.from_pretrained(model_dir, torch_dtype=torch.float32)
    t0 = time.perf_counter()
    if method != "fp":
        m.quantize(tok, qc, calib_data=calib, n_samples=len(calib), seqlen=SEQLEN, method=method, **opts)
    dt = time.perf_counter() - t0
    ppl = perplexity(m, eval_tokens, 1024, windows)
    r = {"method": method, "ppl": round(ppl, 3), "quantize_s": round(dt, 1), "options": opts,
         "settings": effective_options(method, opts)}
    reports = getattr(m, "reports", None) or []
    if method not in ("fp", "rtn"):
        # where the time went, and how often the identity scale won (same search in awq and awq+gptq)
        r["gptq_s"] = round(sum(rep.gptq_seconds for rep in reports), 1)
        ratios = [s.ratio for rep in reports for s in rep.scales.values()]
        r["identity_chosen"] = f"{sum(x == awq.IDENTITY for x in ratios)}/{len(ratios)}"
    return m, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("AWQLIB_DATA", "../shared/data"))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--only", default="fp,rtn,awq",
                    help="methods, ','-separated, or ';'-separated METHOD:option=value,... (bench_blocks.py syntax)")
    ap.add_argument("--out", default="bench_quality.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (1 on a shared machine: spinning threads stall under oversubscription)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    model_dir = smollm2_path()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    eval_tokens = load_eval_tokens(tok, str(data / "wikitext2-raw-test.txt"))
    calib = calib_lines(data / "wikitext2-tokenized-valid.txt", a.n_samples)
    qc = {"w_bit": 4, "q_group_size": a.group_size, "zero_point": True, "version": "gemm"}
    rows = []
    configs = [parse_variant(v.strip()) for v in (a.only.split(";") if ";" in a.only else a.only.split(","))
               if v.strip()]  # "METHOD:a=1,b=2;" is one variant with two options
    if a.ablate:  # each change on/off against the defaults, plus AutoAWQ's procedure
        configs = [("fp", {}), ("rtn", {}), ("awq", {}),
                   ("awq", {"propagate_quantized": False}),
                   ("awq", {"grid_includes_one": False}),
                   ("awq", {"apply_clip": False}),
                   ("awq", {"duo_scaling": False}),
                   ("awq", {"max_search_tokens": 2048}),
                   ("awq", {"propagate_quantized": False, "grid_includes_one": False})]
    for method, opts in configs:
        _, r = run(model_dir, tok, method, calib, qc, a.windows, eval_tokens, **opts)
        r["peak_rss_mb"] = round(peak_rss_mb())
        rows.append(r)
        print(json.dumps(r), flush=True)
    blocks = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    report = {**run_info("bench_quality", sys.argv[1:]), "model": "SmolLM2-135M-Instruct", "group_size": a.group_size,
              "n_calib_texts": len(calib), "seqlen": SEQLEN, "blocks": blocks, "windows": a.windows,
              "threads": a.threads, "torch": torch.__version__, "rows": rows}
    print("\n" + quality_table([report]))
    write_json(a.out, report)


if __name__ == "__main__":
    main()

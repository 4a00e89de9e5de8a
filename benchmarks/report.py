"""The tables of benchmarks/RESULTS.md, rendered from the JSON the benchmark scripts wrote, so that a
recorded figure cannot drift from what a script measured.

Each table sits between two markers that name its JSON in benchmarks/results/ (several names: one
table over several runs of the same script):

    <!-- generated: kernels-h200-2026-11-27 (python -m benchmarks.report; edit the JSON, not this table) -->
    | ... |
    <!-- end generated -->

Everything outside the markers is prose and is left alone.  The JSON's "benchmark" field (written
by benchmarks.common.run_info) picks the renderer; the scripts print their tables with the same
functions.  Reading and checking need no torch (writing goes through awqlib's atomic writer).

    python -m benchmarks.report                    # re-render every table in RESULTS.md
    python -m benchmarks.report --check            # exit 1 and print a diff when RESULTS.md is stale
    python -m benchmarks.report --add sweep.json   # record a run: copy it into results/, add its section, render
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.common import write_atomic

BENCH_DIR = Path(__file__).resolve().parent
NOTE = "python -m benchmarks.report; edit the JSON, not this table"
BEGIN = "<!-- generated: {names} (" + NOTE + ") -->"
END = "<!-- end generated -->"
REGION = re.compile(r"^<!-- generated: (?P<names>[^()]+?) \([^)]*\) -->\n(?P<body>.*?)^" + re.escape(END) + "$",
                    re.M | re.S)


class ReportError(Exception):
    """A results file or RESULTS.md the report cannot render: one line for the user."""


# ----------------------------------------------------------------------------- renderers

def _ratio(x: float) -> str:
    return f"{x:.2f}x"


def kernels_table(report: dict) -> str:
    """bench_kernels: shapes x M, 'awqlib µs / fp16 µs (speedup)' per cell."""
    rows = report["results"]
    shapes = list(dict.fromkeys((r["shape"], r["N"], r["K"]) for r in rows))
    ms = sorted({r["M"] for r in rows})
    by_case = {(r["shape"], r["M"]): r for r in rows}

    def cell(r):
        if r is None:
            return "-"
        if r["fp16_us"] is None:
            return f"{r['awq_us']:.1f}"
        return f"{r['awq_us']:.1f} / {r['fp16_us']:.1f} ({_ratio(r['speedup'])})"

    lines = ["| shape (N x K) | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for name, n, k in shapes:
        lines.append(f"| {name} {n}x{k} | " + " | ".join(cell(by_case.get((name, m))) for m in ms) + " |")
    return "\n".join(lines)


DECODE_MODELS = {  # bench_generate's row labels
    "fp16": "fp16",
    "fp16-block-ops": "fp16 with awqlib's one-op norms, rotary and activation (control)",
    "awq-int4": "awqlib int4",
    "awq-int4-fused": "awqlib int4, q/k/v and gate/up fused",   # fuse_layers=True until it fused the block ops too
    "awq-int4-fuse-layers": "awqlib int4, `fuse_layers=True` (fused linears, one-op norms, rotary, activation)",
    "awq-int4-fuse-layers-compiled": "awqlib int4, `fuse_layers=True`, forward compiled (reduce-overhead), static cache",
}


def decode_table(report: dict) -> str:
    """bench_generate: tokens/s of HF generate and the graph-captured step, vs fp16 at the same batch."""
    rows = report["rows"]
    base = {r["batch"]: r["graph_step_ms"] for r in rows if r["model"] == "fp16"}
    lines = ["| model | batch | HF `generate` tokens/s | one decode-sized forward in a CUDA graph, ms |",
             "|---|---|---|---|"]
    for r in rows:
        step, step0 = r["graph_step_ms"], base.get(r["batch"])
        if step is None:
            st = "n/a"
        elif r["model"] == "fp16" or not step0:
            st = f"{step:.2f}"
        else:
            st = f"{step:.2f} ({_ratio(step0 / step)})"
        base_model, _, options = r["model"].partition("+")  # "+pdl+narrow": bench_generate --kernel-options
        options = "narrow and PDL off" if options == "none" else options.replace("+", " + ")
        name = DECODE_MODELS.get(base_model, base_model) + (f", {options}" if options else "")
        if r["model"].startswith("awq-") and report.get("runtime_layout"):  # which kernels the int4 rows ran
            name += f", {report['runtime_layout']} layout"
        lines.append(f"| {name} | {r['batch']} | {r['tokens_per_s']:.1f} | {st} |")
    return "\n".join(lines)


QUALITY_METHODS = {"fp": "fp", "rtn": "round-to-nearest", "awq": "awqlib AWQ"}


def short_command(command: str) -> str:
    """'python -m benchmarks.bench_quality --only fp' (or 'python benchmarks/bench_quality.py ...')
    as the table shows it: 'bench_quality.py --only fp'."""
    cmd = re.sub(r"^\S*python\S*\s+", "", command)
    cmd = re.sub(r"^-m\s+benchmarks\.(\w+)", r"\1.py", cmd)
    return re.sub(r"^benchmarks/", "", cmd)


def quality_table(reports: list[dict]) -> str:
    """bench_quality: one row per method and run, with the command that produced it."""
    lines = ["| run | result | command |", "|---|---|---|"]
    for rep in reports:
        for r in rep["rows"]:
            run = QUALITY_METHODS.get(r["method"], r["method"])
            result = f"ppl {r['ppl']:.3f}"
            if r["method"] not in ("fp", "rtn"):
                run += f", {rep['n_calib_texts']} texts, seqlen {rep['seqlen']}"
                s = r["quantize_s"]
                result += f" in {s:.0f} s ({s / rep['blocks']:.1f} s/block incl. capture)"
            elif r["method"] == "rtn":
                result += f", {r['quantize_s']:.1f} s"
            if r.get("options"):
                run += ", " + ", ".join(f"{k}={v}" for k, v in r["options"].items())
            if r.get("peak_rss_mb") is not None:
                gb = r["peak_rss_mb"] * 2**20 / 1e9  # the script's MB are ru_maxrss / 1024: MiB
                result += f"; peak RSS of the whole benchmark process {gb:.2f} GB"
            lines.append(f"| {run} | {result} | `{short_command(rep['command'])}` |")
    return "\n".join(lines)


def sass_table(spec: dict, kernels: list[dict]) -> str:
    """scripts/sass_budget.py's JSON (``kernels``), the rows ``spec`` picks, labelled as it says; a
    retired kernel's row (its source deleted) with the figures the spec kept of its last SASS."""
    by_name = {(k["arch"], k["kernel"]): k for k in kernels}
    lines = ["| kernel (what it serves) | regs | spills | smem/CTA | CTAs/SM (limit) | instr/KB | issue ceiling, H200 |",
             "|---|---|---|---|---|---|---|"]
    for row in spec["rows"]:
        if "retired" in row:
            if (spec["arch"], row["kernel"]) in by_name:
                raise ReportError(f"{row['kernel']!r} is marked retired, but {spec['data']} still has it")
            if "figures" not in row:
                raise ReportError(f"the retired kernel {row['kernel']!r} has no 'figures' (its last SASS)")
        k = row["figures"] if "retired" in row else by_name.get((spec["arch"], row["kernel"]))
        if k is None:
            raise ReportError(f"{spec['data']} has no sm_{spec['arch']} kernel {row['kernel']!r}")
        label = row["label"] + (f" (retired {row['retired']})" if "retired" in row else "")
        smem = (k["static_smem"] + (k["dyn_smem"] or 0)) / 1024
        lines.append(f"| {label} | {k['registers']} | {k['spill_stores'] + k['spill_loads']} | {smem:.0f} KB | "
                     f"{k['ctas_per_sm']} ({k['ctas_limited_by']}) | {k['instr_per_kb']:.1f} | "
                     f"{k['issue_tbps_h200']:.2f} TB/s |")
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    """gpu_sweep: every timed case, with the SASS instructions per KB of the kernel that ran."""
    lines = ["| shape | M | variant | µs | fp16 µs | speedup | weight TB/s | % of copy | SASS instr/KB | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("sweep", []):
        sk = f"{r['sass_instr_per_kb']:.1f}" if r.get("sass_instr_per_kb") else "-"
        lines.append(f"| {r['shape']} | {r['M']} | {r['variant']} | {r['us']:.1f} | {r['fp16_us']:.1f} | "
                     f"{_ratio(r['speedup'])} | {r['TBps']:.2f} | {r['pct_copy']:.1f} | {sk} | `{r['kernel']}` |")
    return "\n".join(lines)


# Issue 10's speed targets (int4 g128 vs fp16 cuBLAS in the same run): (what, M, shape or "median"
# or "min", the target speedup).  "median"/"min" run over the shapes the sweep timed.
SPEED_TARGETS = [("70b down 8192x28672", 1, "70b-down 8192x28672", 2.8), ("4096x4096", 1, "4096x4096", 2.0),
                 ("median over shapes", 16, "median", 2.5), ("median over shapes", 64, "median", 1.5),
                 ("every cell", None, "min", 0.9)]


def targets_table(report: dict) -> str:
    """gpu_sweep: each variant against issue 10's targets, and stream against the layout models use
    today (what decides whether stream becomes the default runtime layout)."""
    rows = report.get("sweep", [])
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| target | " + " | ".join(variants) + " | goal |", "|---|" + "---|" * (len(variants) + 1)]
    for what, m, how, goal in SPEED_TARGETS:
        cells = []
        for v in variants:
            xs = [r["speedup"] for r in rows if r["variant"] == v and (m is None or r["M"] == m)
                  and (how in ("median", "min") or r["shape"] == how)]
            if not xs:
                cells.append("-")
                continue
            x = statistics.median(xs) if how == "median" else min(xs)
            cells.append(f"{_ratio(x)} ({'met' if x >= goal else 'not met'})")
        lines.append(f"| {what}{f', M={m}' if m else ''} | " + " | ".join(cells) + f" | >= {_ratio(goal)} |")
    by = {(r["shape"], r["M"], r["variant"]): r["us"] for r in rows}
    for new, old, why in (("stream:auto", "tiled:auto", "the default against the default before 2026-11-30"),
                          ("stream", "tiled:auto", "the stream layout's kernel against the tiled layout's"),
                          ("stream:auto:sm89", "tiled:auto",
                           "a ~99 KB-per-block GPU's default, the compact configuration, on this GPU, M <= 32"),
                          ("stream:sums", "stream", "group sums against scaled fragments, M <= 32"),
                          ("stream:pdl", "stream", "programmatic dependent launch against plain launches"),
                          ("stream:narrow", "stream", "tokens on the mma's n8 side against 16-row tiles, M <= 8"),
                          ("stream:sums:narrow", "stream:sums", "the same with group sums"),
                          ("stream:auto:deep", "stream:auto",
                           "the default with a fourth ring stage (the deep configuration), M <= 16 and 33-64"),
                          ("stream:wgmma", "stream", "warpgroup mma against mma.sync, both with scaled fragments"),
                          ("stream:wgmma", "stream:auto", "warpgroup mma against the default"),
                          ("stream:wide", "stream",
                           "256-column slices against 128 (half the activation bytes), scaled fragments, M 17-64")):
        cells = [(m, by[(s, m, old)], us) for (s, m, v), us in by.items() if v == new and (s, m, old) in by]
        if cells:
            wins, geo = _wins_and_mean([(t, us) for _, t, us in cells])
            lines.append("")
            by_m = sorted({m for m, _, _ in cells})
            per_m = ", ".join(f"{m}: {_ratio(_wins_and_mean([(t, us) for mm, t, us in cells if mm == m])[1])}"
                              for m in by_m)
            lines.append(f"{new} vs {old} ({why}): faster in {wins} of {len(cells)} cells, geometric mean {_ratio(geo)}"
                         + (f" (by M: {per_m})." if len(by_m) > 1 else "."))
    return "\n".join(lines)


def _wins_and_mean(pairs: list[tuple[float, float]]) -> tuple[int, float]:
    """(cells where the second time is the shorter, geometric mean of first / second) of time pairs."""
    geo = 1.0
    for t, s in pairs:
        geo *= (t / s) ** (1 / len(pairs))
    return sum(t > s for t, s in pairs), geo


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def vs_autoawq_table(reports: list[dict]) -> str:
    """bench_vs_autoawq: one row per run, AutoAWQ's and awqlib's wall time on the same job (and the
    perplexity of both when the run quantized the whole model)."""
    lines = ["| run | result | command |", "|---|---|---|"]
    for rep in reports:
        job, nb, speed = rep["job"], rep["job"]["blocks"], rep["speedup"]
        a, w = rep["autoawq"], rep["awqlib"]
        tools = f"AutoAWQ {rep['autoawq_env']['autoawq']} (CPU bug patched) vs awqlib"
        if job.get("whole_model"):
            faster = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
            ppl = "lower" if w["ppl"] < a["ppl"] else "higher" if w["ppl"] > a["ppl"] else "the same"
            run = (f"{tools}, whole model, {job['n_texts']} texts, same run, {rep['date'][:10]} "
                   f"(ppl on the first {job['windows']} windows)")
            result = (f"AutoAWQ {a['quantize_s']:.1f} s ({a['quantize_s'] / nb:.1f} s/block), ppl {a['ppl']:.3f}; "
                      f"**awqlib {w['quantize_s']:.1f} s ({w['quantize_s'] / nb:.1f} s/block), ppl {w['ppl']:.3f}: "
                      f"{faster}, {ppl} perplexity**")
        else:
            run = f"{tools}, same job, same run, first {nb} blocks"
            result = (f"{a['quantize_s']:.1f} s vs {w['quantize_s']:.1f} s ({a['quantize_s'] / nb:.1f} vs "
                      f"{w['quantize_s'] / nb:.1f} s/block, {speed:.1f}x)")
        lines.append(f"| {run} | {result} | `{short_command(rep['command'])}` |")
    return "\n".join(lines)


def _torch_build(rep: dict) -> str:
    """'2.14.1 (CUDA build)' from the torch version and torch.version.cuda a run recorded."""
    if "torch_cuda" not in rep:
        return rep["torch"]
    return f"{rep['torch'].partition('+')[0]} ({'CUDA' if rep['torch_cuda'] else 'CPU'} build)"


def memory_table(reports: list[dict]) -> str:
    """bench_memory: one row per job; a run of the same job as the row above (same command, model,
    calibration and allocator) is that row's rerun, and a run that differs from it only in glibc's
    allocation policy is described as such."""
    rows: list[list[str]] = []  # run, result, command
    job_keys = ("config", "n_samples", "seqlen", "n_grid", "lazy", "model_bytes")
    prev = None
    for rep in reports:
        short = f"{rep['peak_rss_bytes'] / 1e9:.2f} GB ({rep['ratio']:.1%}), {rep['wall_s']:.1f} s"
        same_job = prev is not None and all(rep.get(k) == prev.get(k) for k in job_keys)
        thr = rep["malloc_mmap_threshold"]
        if same_job and rep["command"] == prev["command"] and thr == prev["malloc_mmap_threshold"]:
            rows[-1][1] += f"; a rerun {short}"
            continue
        if same_job and not thr:
            run, result = "the same with glibc's default allocation policy", short
        else:
            cfg = rep["config"]
            policy = f"`MALLOC_MMAP_THRESHOLD_={thr}`" if thr else "glibc's default allocation policy"
            run = (f"{'lazy' if rep['lazy'] else 'in-memory'} quantization of a {_gb(rep['model_bytes'])} fp16 Llama "
                   f"({cfg['hidden_size']} hidden, {cfg['num_hidden_layers']} layers), {rep['n_samples']}x{rep['seqlen']} "
                   f"calibration tokens, n_grid {rep['n_grid']}, whole run, {policy}")
            result = (f"peak RSS **{_gb(rep['peak_rss_bytes'])} = {rep['ratio']:.1%} of the model** "
                      f"({_gb(rep['baseline_rss_bytes'])} of it is the interpreter with torch {_torch_build(rep)}, "
                      f"transformers and awqlib imported), {rep['wall_s']:.1f} s")
        rows.append([run, result, f"`{short_command(rep['command'])}`"])
        prev = rep
    return "\n".join(["| run | result | command |", "|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows])


def blocks_table(report: dict) -> str:
    """bench_blocks: held-out relative block-output MSE per variant and block, and its mean ratio to
    the first (baseline) variant's."""
    rows, n = report["rows"], report["blocks"]
    names = list(rows)
    base = rows[names[0]]["rel_err"]
    lines = [f"{report['model']}, g{report['group_size']}, first {n} blocks, held-out relative block-output MSE",
             "", "| variant | " + " | ".join(f"block {i}" for i in range(n)) + f" | mean vs {names[0]} | s |",
             "|---|" + "---|" * n + "---|---|"]
    for name in names:
        e = rows[name]["rel_err"]
        rel = sum(x / y for x, y in zip(e, base)) / len(e)
        lines.append(f"| {name} | " + " | ".join(f"{x:.3e}" for x in e)
                     + f" | {rel:.3f} | {sum(rows[name]['seconds']):.1f} |")
    return "\n".join(lines)


def dispatch_table(report: dict) -> str:
    """bench_dispatch: ops one decode step dispatches per decoder layer (and in the whole step of the
    tiny model), per family and variant."""
    variants = report["variants"]
    lines = ["ops per decoder layer in one decode step (whole step of the tiny model in brackets)", "",
             "| family | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for arch, row in report["rows"].items():
        lines.append(f"| {arch} | " + " | ".join(f"{row[v]['per_layer']} ({row[v]['step']})" for v in variants) + " |")
    return "\n".join(lines)


def load_table(report: dict) -> str:
    """bench_load: host anonymous memory growth while loading a checkpoint, per device."""
    size = report["checkpoint_bytes"]
    lines = [f"checkpoint: {_gb(size)} ({report['layers']} blocks)", "",
             "| device | dtype | load | host anonymous RSS growth (peak) | / checkpoint |", "|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['load_s']} s | {r['peak_rss_growth_bytes'] / 1e9:.3f} GB | "
                     f"{r['ratio']:.1%} |")
    for e in report.get("errors", []):
        lines.append(f"| {e['device']} | failed (the JSON's errors) | - | - | - |")
    return "\n".join(lines)


def quantize_gpu_table(report: dict) -> str:
    """bench_quantize_gpu: seconds per block, the whole model extrapolated, peak GPU memory."""
    n_full = report["model_blocks"]
    lines = [f"{report['model']}, {report['n_samples']}x{report['seqlen']} calibration tokens, "
             f"g{report['group_size']}, {report['device']}", "",
             f"| method | s/block | whole model ({n_full} blocks), extrapolated | peak GPU memory | / fp16 model |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        peak = f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r["peak_gpu_bytes"] else "n/a"
        frac = f"{r['peak_over_model']:.1%}" if r["peak_over_model"] else "n/a"
        lines.append(f"| {r['method']} | {r['seconds_per_block']} | {r['extrapolated_whole_model_s']} s | {peak} | {frac} |")
    return "\n".join(lines)


def tune_table(report: dict) -> str:
    """tune_kernels: per case, fp16, the automatic choice and the fastest variant (µs, speedup)."""
    lines = ["| shape | M | fp16 µs | auto µs | best variant | best µs | auto / best |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        auto, best = r["us"]["auto"], r["us"][r["best"]]
        lines.append(f"| {r['shape']} {r['N']}x{r['K']} | {r['M']} | {r['fp16_us']:.1f} | "
                     f"{auto:.1f} ({_ratio(r['fp16_us'] / auto)}) | `{r['best']}` | "
                     f"{best:.1f} ({_ratio(r['fp16_us'] / best)}) | {r['auto_vs_best']:.2f} |")
    return "\n".join(lines)


def device_name(report: dict) -> str | None:
    """The card a run used: gpu_sweep records a dict (name, SMs, ...), the other scripts a name."""
    dev = report.get("gpu") or report.get("device")  # bench_quantize_gpu: "device" is torch's, "gpu" the card
    return dev.get("name") if isinstance(dev, dict) else dev


# the AWQLIB_* settings (of run_info's "env") that change what a run measures: shown with its command
RUN_SETTINGS = ("AWQLIB_LAYOUT", "AWQLIB_STREAM_PDL", "AWQLIB_STREAM_NARROW", "AWQLIB_STREAM_DEEP",
                "AWQLIB_STREAM_WGMMA", "AWQLIB_STREAM_SMEM_LIMIT")


def provenance(report: dict, extra: list[str] = ()) -> str:
    """One line under a table: where, when, on which code and with which command (and settings)
    the run was made, how it ended (truncated, error) and, for a run transcribed from an older
    table, that it was."""
    env = report.get("env") or {}
    settings = " ".join(f"{k}={env[k]}" for k in RUN_SETTINGS if k in env)
    sms = report["device"].get("sms") if isinstance(report.get("device"), dict) else None
    dev = (device_name(report) or "") + (f" ({sms} SMs)" if sms else "")
    facts = [dev if dev and dev != "cpu" else "CPU", f"torch {report['torch']}" if report.get("torch") else "",
             f"backend {report['backend']}" if report.get("backend") else "",
             str(report.get("date") or "date not recorded"), f"commit {report.get('commit') or 'not recorded'}",
             f"code {report['code_sha256'][:12]}" if report.get("code_sha256") else "",
             f"`{report['command']}`" if report.get("command") else "", f"with `{settings}`" if settings else "", *extra]
    for key in ("skipped", "error", "truncated", "source"):
        if report.get(key):
            facts.append(f"{key}: {report[key]}")
    return "Run: " + "; ".join(f for f in facts if f) + "."


def provenances(reports: list[dict]) -> str:
    return "\n".join(dict.fromkeys(provenance(r) for r in reports))


def sweep_section(report: dict) -> str:
    """gpu_sweep: one line of what ran where (device, torch, commit, gate, rooflines), then the table."""
    extra = []
    gate = report.get("gate")
    if gate:
        passed = gate["cases"] - len(gate["failed"])
        extra.append(f"correctness gate {passed}/{gate['cases']} passed")
    wg = report.get("wgmma")
    if isinstance(wg, dict) and not wg.get("ok"):
        extra.append(f"stream:wgmma not gated or timed: its canary failed (rc {wg.get('rc')})")
    elif isinstance(wg, str):
        extra.append(f"stream:wgmma {wg}")
    if "copy_GBps" in report:
        extra.append(f"copy {report['copy_GBps']:.0f} GB/s")
    if "read_GBps" in report:
        extra.append(f"read-only {report['read_GBps']:.0f} GB/s")
    for err in report.get("errors", []):
        extra.append(f"{err['variant']} not timed from {err['shape']} M={err['M']} on: {err['error']}")
    line = provenance(report, extra)
    if not report.get("sweep"):
        return line + " No timings."
    return line + "\n\n" + sweep_table(report) + "\n\n" + targets_table(report)


def _one(reports: list[dict]) -> dict:
    if len(reports) != 1:
        raise ReportError(f"a {reports[0]['benchmark']} table renders one run, not {len(reports)}")
    return reports[0]


def _one_run(table):
    """A renderer of a table of one run, then its provenance line."""
    return lambda reps, _: table(_one(reps)) + "\n\n" + provenances(reps)


def _runs(table):
    """A renderer of a table of several runs, then their provenance lines."""
    return lambda reps, _: table(reps) + "\n\n" + provenances(reps)


GPU, CPU = "## CUDA kernels", "## Quantization on the CPU"


@dataclass(frozen=True)
class Kind:
    """What report.py knows of one kind of run (a JSON's "benchmark")."""
    render: Callable      # (runs, benchmarks dir) -> its RESULTS.md region
    timings: str | None   # the key of the timed cases a run must have to be recorded (a sweep may hold only its gate)
    section: str          # --add puts a new run at the end of the section whose heading starts so ...
    prefix: str           # ... as results/<prefix>-<card>-<date>.json


KINDS = {
    "bench_kernels": Kind(_one_run(kernels_table), "results", GPU, "kernels"),
    "bench_generate": Kind(_one_run(decode_table), "rows", GPU, "decode"),
    "bench_quality": Kind(_runs(quality_table), "rows", CPU, "quality"),
    "gpu_sweep": Kind(lambda reps, _: sweep_section(_one(reps)), None, GPU, "sweep"),
    "bench_vs_autoawq": Kind(_runs(vs_autoawq_table), "autoawq", CPU, "vs-autoawq"),
    "bench_memory": Kind(_runs(memory_table), "peak_rss_bytes", CPU, "memory"),
    "bench_blocks": Kind(_one_run(blocks_table), "rows", CPU, "blocks"),
    "bench_dispatch": Kind(_one_run(dispatch_table), "rows", CPU, "dispatch"),
    "bench_load": Kind(_one_run(load_table), "runs", GPU, "load"),
    "bench_quantize_gpu": Kind(_one_run(quantize_gpu_table), "rows", GPU, "quantize"),
    "tune_kernels": Kind(_one_run(tune_table), "rows", GPU, "tune"),
}
# rendered, not added with --add: the SASS table reads scripts/sass_budget.py's JSON through its spec
RENDERERS = {kind: k.render for kind, k in KINDS.items()} | {
    "sass_budget": lambda reps, bench_dir: sass_table(
        _one(reps), json.loads((bench_dir / _one(reps)["data"]).read_text())) + "\n\n" + provenances(reps),
}


# ----------------------------------------------------------------------------- RESULTS.md

def load(bench_dir: Path, name: str, pending: dict[str, dict] | None = None) -> dict:
    if pending and name in pending:
        return pending[name]
    path = bench_dir / "results" / f"{name}.json"
    if not path.is_file():
        raise ReportError(f"RESULTS.md names {name}, but {path} does not exist")
    data = json.loads(path.read_text())
    if data.get("benchmark") not in RENDERERS:
        raise ReportError(f"{path}: 'benchmark' is {data.get('benchmark')!r}; accepted: {', '.join(RENDERERS)}")
    return data


def render_region(bench_dir: Path, names: list[str], pending: dict[str, dict] | None = None) -> str:
    reports = [load(bench_dir, n, pending) for n in names]
    kinds = {r["benchmark"] for r in reports}
    if len(kinds) != 1:
        raise ReportError(f"one table mixes runs of {', '.join(sorted(kinds))}: {' '.join(names)}")
    return RENDERERS[kinds.pop()](reports, bench_dir)


def render(text: str, bench_dir: Path, pending: dict[str, dict] | None = None) -> str:
    """RESULTS.md's text with every generated region re-rendered from its JSON (``pending``: runs
    not written to results/ yet, by name)."""
    found = len(REGION.findall(text))
    if found != len(re.findall(r"^<!-- generated:", text, re.M)):  # a marker opens a line; prose may quote one
        raise ReportError("RESULTS.md has a '<!-- generated: ...' marker without its '<!-- end generated -->'")

    def sub(m):
        names = m.group("names").split()
        return BEGIN.format(names=" ".join(names)) + "\n" + render_region(bench_dir, names, pending) + "\n" + END
    return REGION.sub(sub, text)


def stale_diff(bench_dir: Path = BENCH_DIR) -> str:
    """A unified diff from RESULTS.md as it is to RESULTS.md as the JSON renders it ('' = up to date)."""
    path = bench_dir / "RESULTS.md"
    text = path.read_text()
    return "".join(difflib.unified_diff(text.splitlines(True), render(text, bench_dir).splitlines(True),
                                        f"{path} (as committed)", f"{path} (rendered from results/)"))


def update(bench_dir: Path = BENCH_DIR) -> bool:
    """Re-render RESULTS.md in place; True when it changed."""
    path = bench_dir / "RESULTS.md"
    text = path.read_text()
    new = render(text, bench_dir)
    if new != text:
        write_atomic(path, new)
    return new != text


def run_name(report: dict) -> str:
    """'sweep-h200-2026-12-01' from a run's benchmark, device and date."""
    slug = re.sub(r"[^a-z0-9]+", "-", (device_name(report) or "cpu").lower().replace("nvidia", "")).strip("-") or "cpu"
    if not report.get("date"):
        raise ReportError("the run has no 'date' (written by benchmarks.common.run_info); cannot name it")
    return f"{KINDS[report['benchmark']].prefix}-{slug}-{report['date'][:10]}"


def add(src: Path, bench_dir: Path = BENCH_DIR) -> str:
    """Record a run: copy ``src`` into results/ (a new name if another run has taken its own), add a
    section for it to RESULTS.md unless one names it, and re-render.  Returns the run's name."""
    raw = Path(src).read_text()
    report = json.loads(raw)
    if not isinstance(report, dict):
        raise ReportError(f"{src}: not a benchmark run (a JSON object written by a benchmark's --out)")
    kind = report.get("benchmark")
    if kind not in KINDS:
        raise ReportError(f"{src}: 'benchmark' is {kind!r}; --add accepts runs of {', '.join(KINDS)}")
    if report.get("skipped"):
        raise ReportError(f"{src}: the run was skipped ({report['skipped']}): nothing to record")
    if str(report.get("backend") or "").startswith("reference"):
        raise ReportError(f"{src}: timed on the PyTorch reference ({report['backend']}), not the CUDA kernels: "
                          "not a kernel measurement")
    timings = KINDS[kind].timings
    if timings and not report.get(timings):
        raise ReportError(f"{src}: no timings ({timings!r} is empty): nothing to record")
    try:
        KINDS[kind].render([report], bench_dir)  # renderable, before anything is written
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ReportError(f"{src}: not a {kind} run as its script writes it ({type(e).__name__}: {e})") from None
    base = run_name(report)
    name, i = base, 1
    while (bench_dir / "results" / f"{name}.json").is_file() and \
            (bench_dir / "results" / f"{name}.json").read_text() != raw:
        i += 1
        name = f"{base}-{i}"
    md = bench_dir / "RESULTS.md"
    text = md.read_text()
    if not any(name in m.group("names").split() for m in REGION.finditer(text)):
        heading = re.search("^" + re.escape(KINDS[kind].section) + r"\b.*$", text, re.M)
        if heading is None:
            raise ReportError(f"RESULTS.md has no section '{KINDS[kind].section}' for a {kind} run")
        nxt = text.find("\n## ", heading.end())
        at = len(text) if nxt < 0 else nxt + 1
        # the JSON's name keeps headings apart (several runs of a kind on one day)
        title = f"### {kind}: {device_name(report) or 'CPU'}, {report['date'][:10]} (`results/{name}.json`)"
        section = f"{title}\n\n{BEGIN.format(names=name)}\n{END}\n\n"
        text = text[:at].rstrip("\n") + "\n\n" + section + text[at:]
    new = render(text, bench_dir, {name: report})  # the whole new RESULTS.md, before anything is written
    write_atomic(bench_dir / "results" / f"{name}.json", raw)
    if new != md.read_text():
        write_atomic(md, new)
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The JSON lives in benchmarks/results/; a run's script writes it with --out.")
    ap.add_argument("--check", action="store_true", help="exit 1 and print a diff when RESULTS.md is out of date")
    ap.add_argument("--add", metavar="JSON", help="record a run (e.g. gpu_sweep's sweep.json), then render")
    ap.add_argument("--dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)  # tests: a copy of benchmarks/
    args = ap.parse_args(argv)
    try:
        if args.check:
            diff = stale_diff(args.dir)
            if diff:
                print(diff, end="")
                print("RESULTS.md is out of date with benchmarks/results/: run python -m benchmarks.report",
                      file=sys.stderr)
                return 1
            print("RESULTS.md is up to date")
            return 0
        if args.add:
            name = add(Path(args.add), args.dir)
            print(f"recorded {args.add} as results/{name}.json; RESULTS.md rendered")
            return 0
        print("RESULTS.md " + ("re-rendered" if update(args.dir) else "already up to date"))
        return 0
    except (ReportError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"report: {type(e).__name__}: {e}" if not isinstance(e, ReportError) else f"report: {e}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

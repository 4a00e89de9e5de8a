"""benchmarks/RESULTS.md's tables are rendered from the JSON in benchmarks/results/
(benchmarks/report.py): the committed file is up to date with its JSON, a figure edited by hand (or a
JSON edited without re-rendering) is caught, and recording a GPU sweep is one step (--add)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

if not (Path(__file__).resolve().parents[1] / "benchmarks" / "report.py").is_file():
    pytest.skip("benchmarks/ is not shipped in the sdist", allow_module_level=True)
from benchmarks import report  # noqa: E402  -- a broken import fails, it does not skip

BENCH = Path(report.__file__).resolve().parent
KERNELS_CELL = "| llama2-7b qkv 12288x4096 | 20.9 / 27.5 (1.32x) |"


def copy_bench(tmp_path: Path) -> Path:
    """RESULTS.md and the data it is rendered from, in a scratch folder."""
    d = tmp_path / "benchmarks"
    d.mkdir()
    shutil.copy(BENCH / "RESULTS.md", d)
    shutil.copy(BENCH / "sass_budget.json", d)
    shutil.copytree(BENCH / "results", d / "results")
    return d


def region_names(text: str) -> set[str]:
    return {n for m in report.REGION.finditer(text) for n in m.group("names").split()}


def test_committed_results_md_is_up_to_date(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out
    # every recorded run is shown, and the tables this file is about are generated, not typed
    names = region_names((BENCH / "RESULTS.md").read_text())
    assert names == {p.stem for p in (BENCH / "results").glob("*.json")}
    assert {"kernels-h200-2026-11-27", "decode-h200-2026-11-27", "sass-budget-sm90"} <= names


def test_a_hand_edited_figure_is_caught(tmp_path, capsys):
    d = copy_bench(tmp_path)
    md = d / "RESULTS.md"
    text = md.read_text()
    assert KERNELS_CELL in text
    md.write_text(text.replace(KERNELS_CELL, "| llama2-7b qkv 12288x4096 | 19.9 / 27.5 (1.38x) |")
                  .replace("Every figure here", "Every number here"))
    assert report.main(["--check", "--dir", str(d)]) == 1
    out = capsys.readouterr().out
    assert "-| llama2-7b qkv 12288x4096 | 19.9 / 27.5 (1.38x)" in out and "+" + KERNELS_CELL in out
    assert "Every number here" not in out  # prose is not the report's business
    assert report.main(["--dir", str(d)]) == 0  # re-rendering restores the figure, keeps the prose
    new = md.read_text()
    assert KERNELS_CELL in new and "Every number here" in new
    assert report.main(["--check", "--dir", str(d)]) == 0


@pytest.mark.parametrize("edit", ["kernels", "sass"])
def test_an_edited_json_changes_its_table(tmp_path, capsys, edit):
    d = copy_bench(tmp_path)
    if edit == "kernels":
        path = d / "results" / "kernels-h200-2026-11-27.json"
        data = json.loads(path.read_text())
        data["results"][0]["awq_us"] = 19.94
    else:  # the SASS table's figures come from scripts/sass_budget.py's JSON, its labels from results/
        path = d / "sass_budget.json"
        data = json.loads(path.read_text())
        row = next(r for r in data if r["arch"] == "90" and r["kernel"] == "awq_stream_kernel<half, 1, true, false, false, large, false>")
        row["instr_per_kb"] = 171.2
    path.write_text(json.dumps(data))
    assert report.main(["--check", "--dir", str(d)]) == 1
    out = capsys.readouterr().out
    if edit == "kernels":
        assert "+| llama2-7b qkv 12288x4096 | 19.9 / 27.5" in out
    else:  # the edited figure in the row of that kernel (its other columns follow the kernel's build)
        added = [line for line in out.splitlines() if line.startswith("+| **after**: stream, fp16, M <= 16 (decode;")]
        assert len(added) == 1 and " | 171.2 | " in added[0], out


def test_retired_kernel_rows_keep_their_figures(tmp_path, capsys):
    """A retired kernel's row (its source deleted) shows the figures the spec kept, labelled retired;
    a row marked retired whose kernel the SASS JSON still has, or without figures, is an error."""
    d = copy_bench(tmp_path)
    spec_path = d / "results" / "sass-budget-sm90.json"
    spec = json.loads(spec_path.read_text())
    retired = [r for r in spec["rows"] if "retired" in r]
    assert retired and all(r["figures"]["instr_per_kb"] > 0 for r in retired)
    text = (d / "RESULTS.md").read_text()
    for r in retired:
        assert f"| {r['label']} (retired {r['retired']}) | {r['figures']['registers']} |" in text
    live = next(r for r in spec["rows"] if "retired" not in r)
    for broken in ({**live, "retired": "2026-12-01", "figures": retired[0]["figures"]},  # still in the JSON
                   {k: v for k, v in retired[0].items() if k != "figures"}):                # no figures
        spec_path.write_text(json.dumps({**spec, "rows": [broken]}))
        assert report.main(["--check", "--dir", str(d)]) == 2
        assert "retired" in capsys.readouterr().err


def test_broken_markers_and_missing_runs_are_errors(tmp_path, capsys):
    d = copy_bench(tmp_path)
    md = d / "RESULTS.md"
    text = md.read_text()
    md.write_text(text.replace("kernels-h200-2026-11-27 (", "kernels-h100-2026-11-27 (", 1))
    assert report.main(["--check", "--dir", str(d)]) == 2
    assert "kernels-h100-2026-11-27" in capsys.readouterr().err
    md.write_text(text.replace(report.END, "", 1))
    assert report.main(["--dir", str(d)]) == 2
    assert "without its" in capsys.readouterr().err
    assert md.read_text() == text.replace(report.END, "", 1)  # nothing written


def synthetic_sweep(gpu_sweep, path: Path, scale: float = 1.0) -> dict:
    """A sweep.json as gpu_sweep writes it, built with its own functions (no GPU)."""
    rep = gpu_sweep.new_report(["--out", str(path)], 200.0)
    rep["date"] = "2001-01-02T03:04:05Z"  # a date no real run has: recorded under a fresh name
    props = SimpleNamespace(name="NVIDIA H200", multi_processor_count=132, shared_memory_per_block_optin=232448)
    rep["device"] = gpu_sweep.device_info(props, (9, 0))
    rep["gate"] = gpu_sweep.gate_summary([{"ok": True}] * 7)
    rep.update(copy_GBps=4260.0, read_GBps=3900.0)
    sass = gpu_sweep.sass_table()
    name, N, K = gpu_sweep.SHAPES[0]
    rep["sweep"] = [gpu_sweep.sweep_row(name, N, K, M, label, 1e-5 * (i + 1) * scale, 1.3e-5, rep["copy_GBps"], sass)
                    for i, (M, (label, _, _)) in enumerate(itertools.product(gpu_sweep.MS[:2], gpu_sweep.VARIANTS))]
    gpu_sweep.save_report(rep, path, time.time())
    return rep


def test_add_records_a_gpu_sweep(tmp_path, capsys):
    from benchmarks import gpu_sweep
    d = copy_bench(tmp_path)
    src = tmp_path / "out" / "sweep.json"
    rep = synthetic_sweep(gpu_sweep, src)
    assert report.main(["--add", str(src), "--dir", str(d)]) == 0, capsys.readouterr().err
    run = f"sweep-h200-{rep['date'][:10]}"
    assert (d / "results" / f"{run}.json").read_text() == src.read_text()  # the run's JSON, as written
    text = (d / "RESULTS.md").read_text()
    assert text.count(f"<!-- generated: {run} (") == 1
    assert f"### gpu_sweep: NVIDIA H200, {rep['date'][:10]} (`results/{run}.json`)\n" in text
    assert text.index("## CUDA kernels") < text.index(run) < text.index("## SASS instruction budget")
    assert "NVIDIA H200 (132 SMs)" in text and "correctness gate 7/7 passed; copy 4260 GB/s" in text
    # M=1: tiled:auto 10 µs, stream 20 µs, stream:sums 30 µs, stream:pdl 40 µs, stream:narrow 50 µs,
    # stream:sums:narrow 60 µs, stream:auto 70 µs, stream:auto:sm89 80 µs, stream:auto:deep 90 µs, stream:wgmma
    # 100 µs, fp16 13 µs; the stream rows carry their kernels' SASS figures
    assert f"| {gpu_sweep.SHAPES[0][0]} | 1 | tiled:auto | 10.0 | 13.0 | 1.30x |" in text
    sass = gpu_sweep.sass_table()
    for kernel in ("awq_stream_kernel<half, 1, true, false, false, large, false>",
                   "awq_stream_kernel<half, 1, true, false, true, large, false>",
                   "awq_stream_kernel<half, 1, true, false, false, large, true>",
                   "awq_stream_kernel<half, 1, true, false, true, large, true>"):
        assert f"| {sass[kernel]:.1f} | `{kernel}` |" in text
    # issue 10's targets per variant, and the comparisons that decide the default runtime layout
    assert ("| 4096x4096, M=1 | 1.30x (not met) | 0.65x (not met) | 0.43x (not met) | 0.32x (not met) | "
            "0.26x (not met) | 0.22x (not met) | 0.19x (not met) | 0.16x (not met) | 0.14x (not met) | "
            "0.13x (not met) | 0.12x (not met) | >= 2.00x |") in text
    assert "| 70b down 8192x28672, M=1 | - | - | - | - | - | - | - | - | - | - | - | >= 2.80x |" in text  # not timed
    assert "stream:auto vs tiled:auto (the default against the default before 2026-11-30): faster in 0 of 2" in text
    # the default's rows name what it runs: group sums and the narrow kernels at one token
    assert (f"| {gpu_sweep.SHAPES[0][0]} | 1 | stream:auto | 70.0 | 13.0 | 0.19x |") in text
    assert "`awq_stream_kernel<half, 1, true, false, true, large, true>` |" in text
    assert "stream vs tiled:auto (the stream layout's kernel against the tiled layout's): faster in 0 of 2 cells" in text
    assert "stream:sums vs stream (group sums against scaled fragments, M <= 32): faster in 0 of 2 cells" in text
    assert "stream:pdl vs stream (programmatic dependent launch against plain launches): faster in 0 of 2" in text
    assert "stream:narrow vs stream (tokens on the mma's n8 side against 16-row tiles, M <= 8): faster in 0 of 2" in text
    assert "stream:sums:narrow vs stream:sums (the same with group sums): faster in 0 of 2" in text
    assert ("stream:auto:deep vs stream:auto (the default with a fourth ring stage (the deep configuration), M <= 16 "
            "and 33-64): faster in 0 of 2") in text
    assert f"| {gpu_sweep.SHAPES[0][0]} | 1 | stream:auto:deep | 90.0 | 13.0 | 0.14x |" in text
    assert "`awq_stream_kernel<half, 1, true, false, true, deep, true>` |" in text
    # warpgroup mma: its own instantiation (a 128-row group ends inside its 512-row stage: FINE)
    assert "stream:wgmma vs stream (warpgroup mma against mma.sync, both with scaled fragments): faster in 0 of 2" in text
    assert f"| {gpu_sweep.SHAPES[0][0]} | 1 | stream:wgmma | 100.0 | 13.0 | 0.13x |" in text
    assert f"| {sass['awq_stream_kernel<half, 1, true, true, false, wgmma, false>']:.1f} | " \
        "`awq_stream_kernel<half, 1, true, true, false, wgmma, false>` |" in text
    assert ("stream:wide vs stream (256-column slices against 128 (half the activation bytes), scaled fragments, "
            "M 17-64): faster in 0 of 2") in text
    assert report.main(["--check", "--dir", str(d)]) == 0
    assert KERNELS_CELL in text  # the other tables untouched

    assert report.main(["--add", str(src), "--dir", str(d)]) == 0  # the same file again: nothing new
    assert (d / "RESULTS.md").read_text() == text
    second = tmp_path / "out2" / "sweep.json"
    synthetic_sweep(gpu_sweep, second, scale=2.0)  # another run, same card, same day: its own name
    assert report.main(["--add", str(second), "--dir", str(d)]) == 0
    text2 = (d / "RESULTS.md").read_text()
    assert f"<!-- generated: {run}-2 (" in text2 and "| 1 | tiled:auto | 20.0 | 13.0 | 0.65x |" in text2
    assert report.main(["--check", "--dir", str(d)]) == 0


def test_add_refuses_a_file_it_cannot_place(tmp_path, capsys):
    d = copy_bench(tmp_path)
    src = tmp_path / "x.json"
    src.write_text(json.dumps({"results": []}))
    assert report.main(["--add", str(src), "--dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert "--add accepts runs of " in err and "gpu_sweep" in err.split("accepts runs of ")[1]
    src.write_text(json.dumps({"benchmark": "gpu_sweep", "date": "2026-12-01T10:00:00Z", "skipped": "no CUDA device"}))
    assert report.main(["--add", str(src), "--dir", str(d)]) == 2  # a run on a machine without a GPU
    assert "nothing to record" in capsys.readouterr().err
    kernels_run = json.loads((BENCH / "results" / "kernels-h200-2026-11-27.json").read_text())
    refused = {  # what each refusal must say
        "a JSON list": ([kernels_run], "not a benchmark run"),
        "timed on the reference": (dict(kernels_run, date="2026-12-01", backend="reference (kernels unavailable)"),
                                   "not a kernel measurement"),
        "no timings": (dict(kernels_run, date="2026-12-01", results=[]), "no timings"),
        "a value of the wrong type": (dict(kernels_run, date="2026-12-01",
                                           results=[dict(kernels_run["results"][0], awq_us="fast")]),
                                      "not a bench_kernels run as its script writes it"),
        "a missing field": (dict(kernels_run, date="2026-12-01", results=[{"M": 1}]),
                            "not a bench_kernels run as its script writes it"),
    }
    before = (d / "RESULTS.md").read_text()
    for what, (data, message) in refused.items():
        src.write_text(json.dumps(data))
        assert report.main(["--add", str(src), "--dir", str(d)]) == 2, what
        assert message in capsys.readouterr().err, what
    # nothing was written: no results file, no section, no temporary file left behind
    assert sorted(p.name for p in (d / "results").iterdir()) == sorted(p.name for p in (BENCH / "results").iterdir())
    assert (d / "RESULTS.md").read_text() == before and not list(d.glob(".*.tmp"))


def test_every_table_says_where_its_run_came_from():
    """Each generated table carries its run's provenance; a transcribed one says it was transcribed."""
    text = (BENCH / "RESULTS.md").read_text()
    regions = list(report.REGION.finditer(text))
    assert regions and all("\nRun: " in m.group("body") or m.group("body").startswith("Run: ") for m in regions)
    kernels = next(m.group("body") for m in regions if "kernels-h200-2026-11-27" in m.group("names"))
    assert "source: transcribed from the table recorded in RESULTS.md" in kernels and "commit 9353684" in kernels


# ----------------------------------------------------------------------------- the other scripts' JSON

PROVENANCE = ("benchmark", "date", "commit", "code_sha256", "command")
# the text RESULTS.md recorded for these runs before their JSON was transcribed: the renderer must
# reproduce it byte for byte
RECORDED_ROWS = [
    "| AutoAWQ 0.2.9 (CPU bug patched) vs awqlib, whole model, 32 texts, same run, 2026-11-27 (ppl on the first 16 "
    "windows) | AutoAWQ 1426.4 s (47.5 s/block), ppl 26.233; **awqlib 331.8 s (11.1 s/block), ppl 26.149: 4.3x faster, "
    "lower perplexity** | `bench_vs_autoawq.py --n-texts 32 --blocks 0 --windows 16` |",
    "| AutoAWQ 0.2.9 (CPU bug patched) vs awqlib, same job, same run, first 3 blocks | 331.2 s vs 51.4 s (110.4 vs "
    "17.1 s/block, 6.4x) | `bench_vs_autoawq.py --n-texts 128 --blocks 3` |",
    "| lazy quantization of a 3.96 GB fp16 Llama (2048 hidden, 36 layers), 4x256 calibration tokens, n_grid 2, whole "
    "run, `MALLOC_MMAP_THRESHOLD_=8388608` | peak RSS **1.31 GB = 33.0% of the model** (0.54 GB of it is the "
    "interpreter with torch 2.14.1 (CUDA build), transformers and awqlib imported), 510.7 s | `bench_memory.py` |",
    "| the same with glibc's default allocation policy | 1.66 GB (42.0%), 370.5 s; a rerun 1.68 GB (42.3%), 398.4 s | "
    "`bench_memory.py --glibc-default` |",
]


def test_transcribed_comparison_and_memory_rows_render_as_recorded():
    regions = {n: m.group("body") for m in report.REGION.finditer((BENCH / "RESULTS.md").read_text())
               for n in m.group("names").split()}
    for row, name in zip(RECORDED_ROWS, ["vs-autoawq-cpu-2026-11-27", "vs-autoawq-cpu-2026-11-26",
                                         "memory-cpu-2026-11-27", "memory-cpu-2026-11-27-glibc"]):
        assert row in regions[name].splitlines(), name  # generated, not typed
        data = json.loads((BENCH / "results" / f"{name}.json").read_text())
        assert data["transcribed"] is True and data["source"].startswith("transcribed from the table")
    # the rerun is its own JSON, shown in the row of the run it repeats
    assert "memory-cpu-2026-11-27-glibc-rerun" in regions


def fake_reports() -> dict[str, dict]:
    """Each script's JSON, built by the script's own function from made-up measurements."""
    from benchmarks import (bench_blocks, bench_load, bench_memory, bench_quantize_gpu, bench_vs_autoawq,
                            tune_kernels)
    import torch
    argv = ["--out", "x.json"]
    job = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "group_size": 64, "n_texts": 8, "seqlen": 512,
           "blocks": 30, "threads": 2, "whole_model": True, "windows": 4}
    rows = {"rtn": {"rel_err": [2e-2, 4e-2], "seconds": [0.5, 0.25]}, "awq": {"rel_err": [1e-2, 1e-2], "seconds": [3, 4]}}
    qrow = {"method": "awq", "blocks": 3, "seconds_per_block": 12.5, "block_seconds": [12.5, 12.4, 12.6],
            "other_seconds": 3.0, "extrapolated_whole_model_s": 403.0, "peak_gpu_bytes": 3 * 2**30,
            "fp16_model_bytes": 16 * 10**9, "peak_over_model": 0.201}
    load_run = {"device": "cuda", "dtype": "torch.bfloat16", "load_s": 1.5, "baseline_rss_bytes": 10**9,
                "peak_rss_growth_bytes": 5 * 10**7, "finite_logits": True, "backend": "cuda (jit)"}
    tune = {**tune_kernels.new_report(argv, 128), "device": "NVIDIA H200", "backend": "cuda (jit)", "copy_GBps": 4000.0,
            "rows": [tune_kernels.tune_row("4096x4096", 4096, 4096, 1, 13e-6, {"auto": 10e-6, "skinny": 10e-6,
                                                                                 "gemm:gemv": 8e-6})]}
    return {
        "bench_vs_autoawq": bench_vs_autoawq.make_report(argv, job, {"quantize_s": 100.0, "ppl": 26.5},
                                                         {"quantize_s": 450.0, "ppl": 26.0}, {"autoawq": "0.2.9"},
                                                         "2.14.1"),
        "bench_memory": bench_memory.make_report(argv, {"wall_s": 61.25, "baseline_rss_bytes": 5.4e8,
                                                        "peak_rss_bytes": 1.3e9, "torch": "2.14.1+cu130",
                                                        "torch_cuda": "13.0"}, 4 * 10**9, 10**9, "8388608", 2, True),
        "bench_blocks": bench_blocks.make_report(argv, "tiny:llama", 32, 2, 16, 16, 1, rows),
        "bench_load": bench_load.make_report(argv, 2 * 10**9, 8, "bfloat16", [load_run], [], "NVIDIA H200"),
        "bench_quantize_gpu": bench_quantize_gpu.make_report(argv, "Llama-3-8B-shaped", torch.device("cpu"), 32, 128,
                                                             128, 512, [qrow]),
        "tune_kernels": tune,
    }


# what each renderer must show of the made-up measurements above
EXPECTED_ROWS = {
    "bench_vs_autoawq": "| AutoAWQ 450.0 s (15.0 s/block), ppl 26.000; **awqlib 100.0 s (3.3 s/block), ppl 26.500: "
                        "4.5x faster, higher perplexity** | `bench_vs_autoawq.py --out x.json` |",
    "bench_memory": "| peak RSS **1.30 GB = 32.5% of the model** (0.54 GB of it is the interpreter with torch 2.14.1 "
                    "(CUDA build), transformers and awqlib imported), 61.2 s | `bench_memory.py --out x.json` |",
    "bench_blocks": "| awq | 1.000e-02 | 1.000e-02 | 0.375 | 7.0 |",
    "bench_load": "| cuda | torch.bfloat16 | 1.5 s | 0.050 GB | 2.5% |",
    "bench_quantize_gpu": "| awq | 12.5 | 403.0 s | 3.00 GiB | 20.1% |",
    "tune_kernels": "| 4096x4096 4096x4096 | 1 | 13.0 | 10.0 (1.30x) | `gemm:gemv` | 8.0 (1.62x) | 1.25 |",
}
NEW_KINDS = sorted(EXPECTED_ROWS)


def test_each_script_writes_provenance_and_its_results():
    reps = fake_reports()
    assert sorted(reps) == NEW_KINDS
    results_keys = {"bench_vs_autoawq": {"job", "awqlib", "autoawq", "speedup"},
                    "bench_memory": {"wall_s", "baseline_rss_bytes", "peak_rss_bytes", "model_bytes", "ratio",
                                     "malloc_mmap_threshold", "quantized_bytes", "config"},
                    "bench_blocks": {"model", "group_size", "blocks", "n_calib", "n_held", "rows"},
                    "bench_load": {"checkpoint_bytes", "layers", "dtype", "runs"},
                    "bench_quantize_gpu": {"model", "device", "gpu", "group_size", "n_samples", "seqlen", "rows"},
                    "tune_kernels": {"device", "torch", "copy_GBps", "rows"}}
    for kind, rep in reps.items():
        assert all(rep.get(k) for k in PROVENANCE) and rep["benchmark"] == kind, kind
        assert rep["command"] == f"python -m benchmarks.{kind} --out x.json"
        assert results_keys[kind] <= set(rep), (kind, results_keys[kind] - set(rep))
        assert rep["device"], kind  # where it measured: a card's name or "cpu"
        json.dumps(rep)  # and it is JSON
    assert reps["bench_vs_autoawq"]["speedup"] == 4.5
    assert reps["bench_load"]["runs"][0]["ratio"] == 0.025 and reps["bench_memory"]["ratio"] == 0.325
    assert reps["tune_kernels"]["rows"][0]["best"] == "gemm:gemv"  # the automatic choice is not a candidate


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_renderers_and_add_take_each_new_kind(tmp_path, capsys, kind):
    rep = fake_reports()[kind]
    assert EXPECTED_ROWS[kind] in report.RENDERERS[kind]([rep], BENCH)
    d = copy_bench(tmp_path)
    src = tmp_path / "run.json"
    src.write_text(json.dumps(rep))
    assert report.main(["--add", str(src), "--dir", str(d)]) == 0, capsys.readouterr().err
    text = (d / "RESULTS.md").read_text()
    name = report.run_name(rep)
    assert name.startswith(report.KINDS[kind].prefix + "-") and (d / "results" / f"{name}.json").is_file()
    body = next(m.group("body") for m in report.REGION.finditer(text) if m.group("names") == name)
    assert EXPECTED_ROWS[kind] in body and "\nRun: " in body and "`python -m benchmarks." in body
    section = report.KINDS[kind].section
    after = text.index(section)
    assert after < text.index(name) < text.index("\n## ", after + 1)  # in its section
    assert report.main(["--check", "--dir", str(d)]) == 0
    # a run of this kind without its measurements is refused, and so is one that was skipped
    before = text
    for broken, message in ((dict(rep, **{report.KINDS[kind].timings: None}), "no timings"),
                            ({k: rep[k] for k in PROVENANCE} | {"skipped": "no CUDA device"}, "was skipped")):
        src.write_text(json.dumps(broken))
        assert report.main(["--add", str(src), "--dir", str(d)]) == 2, kind
        assert message in capsys.readouterr().err
    assert (d / "RESULTS.md").read_text() == before


def test_memory_rows_group_reruns_and_the_allocator():
    base = fake_reports()["bench_memory"]
    glibc = dict(base, malloc_mmap_threshold=None, command="python -m benchmarks.bench_memory --glibc-default",
                 peak_rss_bytes=1.7e9, ratio=0.425, wall_s=300.0)
    again = dict(glibc, peak_rss_bytes=1.8e9, ratio=0.45, wall_s=310.0)
    other = dict(base, config=dict(base["config"], num_hidden_layers=2))
    lines = report.memory_table([base, glibc, again, other]).splitlines()[2:]
    assert len(lines) == 3
    assert lines[1] == ("| the same with glibc's default allocation policy | 1.70 GB (42.5%), 300.0 s; a rerun 1.80 GB "
                        "(45.0%), 310.0 s | `bench_memory.py --glibc-default` |")
    assert lines[2].startswith("| lazy quantization of a 4.00 GB fp16 Llama (2048 hidden, 2 layers)")


def test_vs_autoawq_describes_a_slower_or_partial_run():
    rep = fake_reports()["bench_vs_autoawq"]
    slow = dict(rep, awqlib={"quantize_s": 900.0, "ppl": 25.0}, speedup=0.5)
    assert "0.5x" not in report.vs_autoawq_table([slow]) and "2.0x slower, lower perplexity**" in \
        report.vs_autoawq_table([slow])
    part = dict(rep, job=dict(rep["job"], whole_model=False, blocks=3), awqlib={"quantize_s": 30.0},
                autoawq={"quantize_s": 90.0}, speedup=3.0)
    assert "| AutoAWQ 0.2.9 (CPU bug patched) vs awqlib, same job, same run, first 3 blocks | 90.0 s vs 30.0 s " \
           "(30.0 vs 10.0 s/block, 3.0x) |" in report.vs_autoawq_table([part])


def skip_cases(tmp_path: Path):
    """(script, arguments) that cannot run on this machine or with these arguments."""
    return {"tune_kernels": [], "bench_quantize_gpu": [], "bench_load": ["--devices", "cpu", "cuda"],
            "bench_vs_autoawq": ["--autoawq-python", str(tmp_path / "no-venv" / "python")],
            "bench_blocks": ["--model", "smollm2", "--data", str(tmp_path / "no-data")], "bench_memory": []}


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_a_script_that_cannot_run_writes_skipped_and_fails(tmp_path, monkeypatch, capsys, kind):
    import importlib

    import torch

    from benchmarks import common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(common, "PROC_STATUS", tmp_path / "no-proc" / "status")  # bench_memory: not Linux
    script = importlib.import_module(f"benchmarks.{kind}")
    out = tmp_path / "out" / "run.json"
    args = skip_cases(tmp_path)[kind] + ["--out", str(out)]
    assert script.main(args) == 1
    rep = json.loads(out.read_text())
    assert rep["skipped"] and rep["benchmark"] == kind and all(rep.get(k) for k in PROVENANCE)
    assert rep["command"] == f"python -m benchmarks.{kind} " + " ".join(args)
    assert "skipped" in capsys.readouterr().err
    d = copy_bench(tmp_path)
    assert report.main(["--add", str(out), "--dir", str(d)]) == 2
    assert f"the run was skipped ({rep['skipped']})" in capsys.readouterr().err
    assert not (d / "results" / f"{report.run_name(rep)}.json").exists()


def test_bench_blocks_runs_and_its_json_records(tmp_path, capsys):
    """The whole script on a tiny random model (seconds): what it writes is what --add records."""
    from benchmarks import bench_blocks
    out = tmp_path / "blocks.json"
    assert bench_blocks.main(["--model", "tiny:llama", "--blocks", "1", "--variants", "rtn;awq", "--group-size", "32",
                              "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "bench_blocks" and rep["device"] == "cpu" and list(rep["rows"]) == ["rtn", "awq"]
    assert len(rep["rows"]["awq"]["rel_err"]) == 1 and 0 < rep["rows"]["awq"]["rel_err"][0] < 1
    printed = capsys.readouterr().out
    assert report.blocks_table(rep) in printed  # the script prints the table RESULTS.md would show
    d = copy_bench(tmp_path)
    assert report.main(["--add", str(out), "--dir", str(d)]) == 0
    assert report.blocks_table(rep) in (d / "RESULTS.md").read_text()


def test_run_info_names_the_code_a_run_started_with(monkeypatch):
    """A benchmark's provenance is the code it imported: sources edited or committed while it runs
    (a 15-minute quantization) must not be credited with its numbers."""
    from benchmarks import common
    before = common.run_info("bench_quality", ["--only", "awq"])
    monkeypatch.setattr(common, "code_sha256", lambda root=common.ROOT: "edited-while-running")
    monkeypatch.setattr(common.time, "time", lambda: common._STARTED["started"] + 900.0)
    after = common.run_info("bench_quality", ["--only", "awq"])
    assert after["code_sha256"] == before["code_sha256"] != "edited-while-running"
    assert after["commit"] == before["commit"] and after["date"] == before["date"]
    assert after["ended"] > after["date"]
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")  # set after the start: not what the run ran with
    assert common.run_info("bench_quality", [])["env"] == before["env"]


def test_a_sweep_variant_that_failed_to_time_is_named():
    from benchmarks import gpu_sweep
    rep = gpu_sweep.new_report(["--out", "x.json"], 200.0)
    rep.update(device={"name": "NVIDIA H200", "sms": 132}, sweep=[],
               errors=[{"shape": "4096x4096", "M": 1, "variant": "stream:pdl", "error": "RuntimeError: capture"}])
    assert "stream:pdl not timed from 4096x4096 M=1 on: RuntimeError: capture" in report.sweep_section(rep)


def test_sweep_comparisons_break_down_by_token_count():
    """A comparison of two variants gives its geometric mean over all cells and, where the cells span
    several token counts, per token count (the defaults are decided per range of M)."""
    def row(shape, M, variant, us):
        return {"shape": shape, "M": M, "variant": variant, "us": us, "speedup": 1.0}
    rows = [row("a", 1, "stream", 10.0), row("a", 1, "stream:wgmma", 5.0), row("b", 1, "stream", 10.0),
            row("b", 1, "stream:wgmma", 20.0), row("a", 64, "stream", 30.0), row("a", 64, "stream:wgmma", 10.0)]
    text = report.targets_table({"sweep": rows})
    assert ("stream:wgmma vs stream (warpgroup mma against mma.sync, both with scaled fragments): faster in 2 of 3 "
            "cells, geometric mean 1.44x (by M: 1: 1.00x, 64: 3.00x).") in text
    one_m = report.targets_table({"sweep": rows[:4]})
    assert "faster in 1 of 2 cells, geometric mean 1.00x." in one_m and "by M" not in one_m


def test_provenance_names_the_settings_a_run_ran_with():
    rep = {"benchmark": "gpu_sweep", "date": "2026-11-30", "command": "python -m benchmarks.gpu_sweep",
           "env": {"AWQLIB_STREAM_PDL": "1", "AWQLIB_CACHE": "/somewhere", "AWQLIB_LAYOUT": "stream"}}
    line = report.provenance(rep)
    assert "`python -m benchmarks.gpu_sweep`; with `AWQLIB_LAYOUT=stream AWQLIB_STREAM_PDL=1`" in line
    assert "/somewhere" not in line
    assert "with `" not in report.provenance({**rep, "env": {}})


def test_decode_table_names_the_runtime_layout_of_the_int4_rows():
    rows = [{"model": m, "batch": 1, "tokens_per_s": 10.0, "graph_step_ms": ms}
            for m, ms in (("fp16", 2.0), ("awq-int4", 1.0), ("awq-int4-fused", 0.8))]
    text = report.decode_table({"rows": rows, "runtime_layout": "stream"})
    assert "| fp16 | 1 | 10.0 | 2.00 |" in text
    assert "| awqlib int4, stream layout | 1 | 10.0 | 1.00 (2.00x) |" in text
    assert "| awqlib int4, q/k/v and gate/up fused, stream layout | 1 | 10.0 | 0.80 (2.50x) |" in text
    assert "layout" not in report.decode_table({"rows": rows})  # runs that did not record it
    # rows timed with the stream kernel's opt-in options (bench_generate --kernel-options)
    rows.append({"model": "awq-int4-fuse-layers+narrow+pdl", "batch": 1, "tokens_per_s": 12.0, "graph_step_ms": 0.5})
    rows.append({"model": "fp16-block-ops", "batch": 1, "tokens_per_s": 11.0, "graph_step_ms": 1.6})
    text = report.decode_table({"rows": rows, "runtime_layout": "stream"})
    assert ("| awqlib int4, `fuse_layers=True` (fused linears, one-op norms, rotary, activation), narrow + pdl, "
            "stream layout | 1 | 12.0 | 0.50 (4.00x) |") in text
    assert "| fp16 with awqlib's one-op norms, rotary and activation (control) | 1 | 11.0 | 1.60 (1.25x) |" in text
    rows.append({"model": "awq-int4-fuse-layers+none", "batch": 1, "tokens_per_s": 12.0, "graph_step_ms": 0.5})
    assert "activation), narrow and PDL off, stream layout | 1 |" in report.decode_table({"rows": rows,
                                                                                        "runtime_layout": "stream"})


def test_bench_generate_kernel_options_are_strict(monkeypatch):
    import argparse
    import os

    from benchmarks import bench_generate
    assert bench_generate.parse_kernel_options("pdl,narrow,pdl+narrow") == [("pdl",), ("narrow",), ("narrow", "pdl")]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown kernel option 'sums'.*accepted: pdl, narrow"):
        bench_generate.parse_kernel_options("pdl,sums")
    for repeated in ("pdl,pdl", "pdl+pdl", "pdl+narrow,narrow+pdl"):
        with pytest.raises(argparse.ArgumentTypeError, match="repeats"):
            bench_generate.parse_kernel_options(repeated)
    assert bench_generate.parse_kernel_options("none,pdl+narrow") == [("none",), ("narrow", "pdl")]
    with pytest.raises(argparse.ArgumentTypeError, match="'none' .* stands alone"):
        bench_generate.parse_kernel_options("none+pdl")
    monkeypatch.setenv("AWQLIB_LAYOUT", "tiled")  # options that the runtime layout's kernels ignore
    with pytest.raises(SystemExit):
        bench_generate.main(["--kernel-options", "narrow"])
    monkeypatch.delenv("AWQLIB_LAYOUT")
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")
    monkeypatch.delenv("AWQLIB_STREAM_NARROW", raising=False)
    with bench_generate.kernel_options(("narrow",)):
        assert (os.environ["AWQLIB_STREAM_NARROW"], os.environ["AWQLIB_STREAM_PDL"]) == ("1", "0")
    with bench_generate.kernel_options(("none",)):
        assert (os.environ["AWQLIB_STREAM_NARROW"], os.environ["AWQLIB_STREAM_PDL"]) == ("0", "0")
    assert os.environ["AWQLIB_STREAM_PDL"] == "1" and "AWQLIB_STREAM_NARROW" not in os.environ


def test_bench_generate_without_a_gpu_writes_skipped_and_fails(tmp_path, monkeypatch, capsys):
    import torch

    from benchmarks import bench_generate
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "decode.json"
    assert bench_generate.main(["--out", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert rep["skipped"] == "no CUDA device" and rep["benchmark"] == "bench_generate"
    assert all(rep.get(k) for k in PROVENANCE)


def test_quality_rows_record_every_setting_they_ran_with():
    """A row says what it measured even after a default changes (act-order became the default after
    runs made without it)."""
    from awqlib import awq
    from benchmarks.common import effective_options
    s = effective_options("awq+gptq", {"gptq_damp": 0.2})
    assert s["gptq_damp"] == 0.2 and s["gptq"] is True
    assert s["gptq_act_order"] == awq.AWQOptions().gptq_act_order
    assert set(s) == set(awq.AWQOptions.__dataclass_fields__)
    assert effective_options("awq", {})["gptq"] is False
    assert effective_options("rtn", {}) == {} == effective_options("fp", {})
    json.dumps(s)  # JSON-ready


def test_provenance_takes_the_callers_commit_and_stamps_the_end(tmp_path, monkeypatch):
    """A GPU machine's copy carries the git metadata of an older checkout: $AWQLIB_COMMIT, where set,
    is the commit recorded; and a report's ``ended`` is when it was last written, not when it began."""
    from benchmarks import common
    monkeypatch.setenv("AWQLIB_COMMIT", "abc1234")
    assert common._code_state()["commit"] == "abc1234"
    rep = {"benchmark": "x", "date": "2001-01-02T03:04:05Z", "ended": "2001-01-02T03:04:05Z"}
    common.write_json(tmp_path / "r.json", rep)
    ended = json.loads((tmp_path / "r.json").read_text())["ended"]
    assert ended > rep["date"] and ended[:4] == time.strftime("%Y", time.gmtime())

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
        row = next(r for r in data if r["arch"] == "90" and r["kernel"] == "awq_stream_kernel<half, 1, true, false, false>")
        row["instr_per_kb"] = 171.2
    path.write_text(json.dumps(data))
    assert report.main(["--check", "--dir", str(d)]) == 1
    out = capsys.readouterr().out
    assert ("+| llama2-7b qkv 12288x4096 | 19.9 / 27.5" if edit == "kernels" else
            "+| **after**: stream, fp16, M <= 16 (decode; K % 512 = 0, N % 128 = 0, group >= 128) | 128 | 0 | 160 KB"
            " | 1 (smem) | 171.2 |") in out


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
    assert text.index("## CUDA kernels") < text.index(run) < text.index("## SASS instruction budget")
    assert "NVIDIA H200 (132 SMs)" in text and "correctness gate 7/7 passed; copy 4260 GB/s" in text
    # M=1: tiled:auto 10 µs, stream 20 µs, stream:sums 30 µs, fp16 13 µs; the stream rows carry their
    # kernels' SASS figures
    assert f"| {gpu_sweep.SHAPES[0][0]} | 1 | tiled:auto | 10.0 | 13.0 | 1.30x |" in text
    assert "| 174.8 | `awq_stream_kernel<half, 1, true, false, false>` |" in text
    assert "| 151.2 | `awq_stream_kernel<half, 1, true, false, true>` |" in text
    # issue 10's targets per variant, and the comparison that decides the default runtime layout
    assert "| 4096x4096, M=1 | 1.30x (not met) | 0.65x (not met) | 0.43x (not met) | >= 2.00x |" in text
    assert "| 70b down 8192x28672, M=1 | - | - | - | >= 2.80x |" in text  # a shape the run did not time
    assert "stream vs tiled:auto (the runtime layout models use today): faster in 0 of 2 cells" in text
    assert "stream:sums vs stream (group sums against scaled fragments, M <= 32): faster in 0 of 2 cells" in text
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
    assert "accepts runs of gpu_sweep" in capsys.readouterr().err
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

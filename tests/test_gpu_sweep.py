"""benchmarks/gpu_sweep.py on the CPU: the plan prints, the imports the GPU run needs work, and the
plan is consistent with the library (every gated case is one the kernels accept; every timed
kernel has a SASS budget row).  The GPU run itself happens in a GPU window."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "benchmarks" / "gpu_sweep.py").is_file():
    pytest.skip("benchmarks/ is not shipped in the sdist", allow_module_level=True)
from benchmarks import gpu_sweep  # noqa: E402  -- a broken import fails, it does not skip


def test_dry_run_prints_the_plan(capsys, tmp_path):
    assert gpu_sweep.main(["--dry-run", "--out", str(tmp_path / "s.json"), "--ncu", "--sanitizer"]) == 0
    out = capsys.readouterr().out
    for step in ("correctness gate", "rooflines", "sweep", "ncu --clock-control none", "compute-sanitizer"):
        assert step in out
    assert "dry run: imports ok" in out
    assert not (tmp_path / "s.json").exists()  # a dry run writes nothing


def test_gate_cases_are_valid_for_their_layouts():
    from awqlib.kernels import source_constant
    from awqlib.ops import Kernel
    from awqlib.packing import can_use_layout
    for label, _, _, ms in gpu_sweep.GATE_ENV:  # the narrow kernels, and past them (ignored there)
        assert label in gpu_sweep.VARIANT_ENV and min(ms) <= gpu_sweep.NARROW_MAX_M
    assert max(m for *_, ms in gpu_sweep.GATE_ENV for m in ms) > gpu_sweep.NARROW_MAX_M
    for N, K, g in gpu_sweep.GATE_SHAPES:
        for _, layout, _, _ in gpu_sweep.GATE_ENV:
            assert can_use_layout(layout, K, N, g), (layout, N, K, g)
        for layout, kernel, ms in gpu_sweep.GATE_VARIANTS:
            assert can_use_layout(layout, K, N, g), (layout, N, K, g)
            if kernel in gpu_sweep.STREAM_KERNELS:  # one pass and more than one (64 rows, compact 32)
                pass_rows = source_constant("kStreamCompactMaxM" if "COMPACT" in kernel.name else "kStreamMaxM")
                assert min(ms) <= pass_rows and (kernel in (Kernel.STREAM_GROUP_SUMS, Kernel.STREAM_COMPACT_GROUP_SUMS)
                                                 or max(ms) > pass_rows)
    # the wgmma configuration: every m-tile count (wgmma N 16 to 128), one pass and more than one
    wgmma = [ms for label, _, kernel, ms in gpu_sweep.GATE_ENV if label == "stream:wgmma" and kernel == Kernel.STREAM]
    pass_rows = source_constant("kStreamWgmmaMaxM")
    assert len(wgmma) == 1 and {1, 17, 33, pass_rows // 2 + 1, pass_rows, pass_rows + 1} <= set(wgmma[0]), wgmma
    # the wide one: both m-tile counts at their ends, a pass of its own after a full one, and one it
    # leaves to the large configuration
    wide = [ms for label, _, kernel, ms in gpu_sweep.GATE_ENV if label == "stream:wide" and kernel == Kernel.STREAM]
    low, high = source_constant("kStreamWideMinM"), source_constant("kStreamMaxM")
    assert len(wide) == 1 and {low, 32, 33, high} <= set(wide[0]), wide
    assert any(m > high and gpu_sweep.wide_takes(m) for m in wide[0])
    assert any(m > high and not gpu_sweep.wide_takes(m) for m in wide[0])


def test_timed_kernels_have_sass_rows():
    table = ROOT / "benchmarks" / "sass_budget.json"
    if not table.is_file():
        pytest.skip("benchmarks/sass_budget.json not generated")
    names = {r["kernel"] for r in json.loads(table.read_text())}
    for _, N, K in gpu_sweep.SHAPES:
        for M in gpu_sweep.MS:
            for label, _, _ in gpu_sweep.VARIANTS:
                kl = gpu_sweep.kernel_label(label, M, N, K)
                assert kl == "dequant+cuBLAS" or kl in names, kl


def test_gpu_window_script_selects_what_it_claims():
    """scripts/gpu_window.sh (the one device call of a GPU window) is valid bash, names modules that
    exist, and its pytest selection collects the stream kernels' GPU tests, both variants, the
    serving tests and the block ops' tests: a renamed test would otherwise silently drop out of the next window."""
    import re
    import subprocess
    import sys
    script = ROOT / "scripts" / "gpu_window.sh"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--tools-only --ncu" in text  # part 3: ncu on gpu_sweep's NCU_CASES
    for module in re.findall(r"-m (benchmarks\.\w+)", text):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    expr = re.search(r'-k "([^"]+)"', text).group(1)
    files = re.search(r"(tests/test_kernels_cuda\.py tests/test_gpu_e2e\.py)", text).group(1).split()
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", expr,
                          *files], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    names = {line.split("[")[0].split("::")[-1] for line in res.stdout.splitlines() if "::" in line}
    for test in ("test_stream_kernel_fp16", "test_stream_kernel_bf16", "test_stream_group_sums", "test_stream_kernel_compact",
                 "test_stream_kernel_narrow",
                 "test_stream_kernel_deterministic", "test_two_graphs_replayed_concurrently_on_two_streams",
                 "test_dequantize_stream_bit_exact",
                 "test_block_op_rms_norm", "test_block_op_rotary", "test_block_op_gated_act",
                 "test_block_op_cuda_graph_capture", "test_block_op_fallbacks_compute_the_reference",
                 "test_stream_auto_choice_per_gpu_class", "test_stream_settings_are_strict", "test_awq_quantize_on_gpu",
                 "test_captured_split_k_launches_hold_no_memset", "test_capture_before_any_eager_launch_zeroes_per_call",
                 "test_graphs_sharing_a_pool_keep_their_counters", "test_stream_pdl_after_the_block_ops",
                 "test_stream_gemm_add_is_the_gemm_plus_the_residual", "test_block_op_add_rms_norm"):
        assert test in names, (test, sorted(names))
    assert not any("wgmma" in n for n in names), "the wgmma tests run in a process of their own"
    # ... that one: the wgmma tests, the PDL test's wgmma cases among them
    assert re.search(r"-m pytest -q -p no:cacheprovider -k wgmma \\\n\s+tests/test_kernels_cuda\.py", text)
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", "wgmma",
                          "tests/test_kernels_cuda.py"], cwd=ROOT, capture_output=True, text=True)
    wg = [line.split("::")[-1] for line in res.stdout.splitlines() if "::" in line]
    assert sum(t.startswith("test_stream_kernel_wgmma[") for t in wg) >= 90, wg[:5]
    assert {"test_stream_pdl_reads_what_the_previous_kernel_wrote[wgmma-M1]",
            "test_stream_pdl_reads_what_the_previous_kernel_wrote[wgmma-M100]"} <= set(wg), wg


def test_gate_failure_says_where_and_rules_out_only_its_variants():
    import torch
    from awqlib.ops import Kernel
    ref = torch.randn(3, 384)
    out = ref.clone()
    out[1, 130:132] += 5.0          # slice 1, columns 2-3 of it
    out[2, 300] = float("nan")      # never written
    msg = gpu_sweep.where_wrong(out, ref, 2e-3)
    assert "3 of 1152 elements wrong (1 NaN = unwritten)" in msg and "rows [1, 2] of 3" in msg
    assert "first [130, 131, 300]" in msg and "slices [1, 2]" in msg
    assert "spread" in gpu_sweep.where_wrong(ref, ref, 2e-3)

    def failed(layout, kernel):
        return {"failed": [{"layout": layout, "kernel": kernel.name}]}
    every_stream = {label for label, layout, _ in gpu_sweep.VARIANTS if layout == "stream"}
    assert gpu_sweep.failed_variants(failed("stream", Kernel.STREAM_GROUP_SUMS)) == {"stream:sums", "stream:sums:narrow",
                                                                                    "stream:auto", "stream:auto:deep"}
    assert gpu_sweep.failed_variants(failed("stream", Kernel.AUTO)) == every_stream
    assert gpu_sweep.failed_variants(failed("stream", Kernel.STREAM)) == {"stream", "stream:pdl", "stream:narrow",
                                                                         "stream:auto", "stream:auto:deep",
                                                                         "stream:wgmma", "stream:wide"}
    # a failure under the deep ring's, warpgroup mma's or the wide slices' environment rules out that
    # variant alone (the default does not run it)
    for env, kernels in (("stream:auto:deep", ("STREAM", "STREAM_GROUP_SUMS", "AUTO")), ("stream:wgmma", ("STREAM", "AUTO")),
                         ("stream:wide", ("STREAM", "AUTO"))):
        for kernel in kernels:  # (what the gate runs under each)
            assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "env": env, "kernel": kernel}]}) == {env}
    # (the wide variant times scaled fragments: its group sums are gated, not timed)
    assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "env": "stream:wide",
                                                  "kernel": "STREAM_GROUP_SUMS"}]}) == set()
    assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "kernel": "STREAM", "pdl": True}]}) == {"stream:pdl"}
    # a failure under the narrow variants' environment rules out those, and the default (narrow too)
    narrow = {"layout": "stream", "env": "stream:narrow"}
    assert gpu_sweep.failed_variants({"failed": [{**narrow, "kernel": "STREAM"}]}) == {"stream:narrow", "stream:auto",
                                                                                     "stream:auto:deep"}
    assert gpu_sweep.failed_variants({"failed": [{**narrow, "kernel": "STREAM_GROUP_SUMS"}]}) == {"stream:sums:narrow",
                                                                                                "stream:auto",
                                                                                                "stream:auto:deep"}
    # the default gated as a whole rules out itself only
    assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "env": "stream:auto", "kernel": "AUTO"}]}) == \
        {"stream:auto"}
    assert gpu_sweep.failed_variants({"failed": [{**narrow, "kernel": "STREAM_COMPACT"}]}) == {"stream:auto:sm89"}
    # with PDL and the narrow kernels at once: no timed variant runs both
    assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "kernel": "STREAM", "pdl": True,
                                                  "options": ["narrow"]}]}) == set()
    assert gpu_sweep.failed_variants({"failed": [{"layout": "stream", "kernel": "STREAM_GROUP_SUMS", "pdl": True,
                                                  "options": ["deep", "narrow"]}]}) == set()
    assert gpu_sweep.failed_variants(failed("tiled", Kernel.SKINNY_SHALLOW)) == {"tiled:auto"}
    assert gpu_sweep.failed_variants(failed("gemm", Kernel.SKINNY)) == set()
    # gated, not timed; the automatic choice runs it where the large configuration does not fit
    assert gpu_sweep.failed_variants(failed("stream", Kernel.STREAM_COMPACT)) == {"stream:auto", "stream:auto:sm89",
                                                                                  "stream:auto:deep"}
    assert gpu_sweep.failed_variants({"failed": []}) == set()


def test_gate_skips_only_configurations_the_gpu_has_no_room_for():
    """The gate passes over a stream configuration this GPU cannot give its shared memory (the large
    M 17-32 one on an A100) and counts every other refusal as a failure -- with two configurations
    considered (wgmma asked for), only when neither has the room.  The messages it reads are
    awq_stream.cu's choose_stream (tests/test_cpu_twin.py reads them from the code itself)."""
    src = (ROOT / "csrc" / "awq_stream.cu").read_text()
    assert '" configuration runs passes of at most "' in src and '" rows; its pass of "' in src
    assert '" bytes of shared memory per block (the device has "' in src
    clause = ("the {} configuration runs passes of at most {} rows; its pass of 20 rows needs {} bytes of shared "
              "memory per block (the device has 166912)")
    shape = ("the wgmma configuration runs passes of at most 128 rows; its pass of 20 rows does not take N = 4096, "
             "K = 4096, group_size 96 (it needs ...)")
    refusal = "awq_gemm_variant: the stream kernel cannot run 20 rows of this weight: "
    assert gpu_sweep.lacks_smem(refusal + clause.format("large", 64, 213008))
    assert not gpu_sweep.lacks_smem(refusal + clause.format("large", 64, 163856))  # refused for the shape: a failure
    assert gpu_sweep.lacks_smem(refusal + clause.format("large", 64, 213008) + "; and " +
                                clause.format("wgmma", 128, 208896) + " (AWQLIB_STREAM_WGMMA=1)")
    assert not gpu_sweep.lacks_smem(refusal + clause.format("large", 64, 213008) + "; and " + shape)
    assert not gpu_sweep.lacks_smem("CUDA error: an illegal memory access was encountered")


def test_variant_env_is_set_for_the_variant_only(monkeypatch):
    import os
    monkeypatch.delenv("AWQLIB_STREAM_PDL", raising=False)
    with gpu_sweep.variant_env("stream:pdl"):
        assert os.environ["AWQLIB_STREAM_PDL"] == "1"
    assert "AWQLIB_STREAM_PDL" not in os.environ
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")  # an ambient setting does not leak into the plain variants
    with gpu_sweep.variant_env("stream"):
        assert os.environ["AWQLIB_STREAM_PDL"] == "0"
    with gpu_sweep.variant_env("stream:pdl"):
        assert os.environ["AWQLIB_STREAM_PDL"] == "1"
    assert os.environ["AWQLIB_STREAM_PDL"] == "1"
    # nor does an ambient shared-memory cap (it would time an A100's choice on this GPU), which the
    # sm89 variant sets for itself
    monkeypatch.setenv("AWQLIB_STREAM_SMEM_LIMIT", "166912")
    for label in [v[0] for v in gpu_sweep.VARIANTS]:
        with gpu_sweep.variant_env(label):
            want = str(gpu_sweep.SM89_SMEM) if label == "stream:auto:sm89" else None
            assert os.environ.get("AWQLIB_STREAM_SMEM_LIMIT") == want, label
    assert os.environ["AWQLIB_STREAM_SMEM_LIMIT"] == "166912"


def test_narrow_variants_are_timed_where_they_run():
    """The narrow kernels run at M <= 8 only (past that a variant would time the plain kernel again
    under another name), group sums at M <= 32."""
    from awqlib.ops import Kernel
    for label, _, kernel in gpu_sweep.VARIANTS:
        timed = [m for m in gpu_sweep.MS if gpu_sweep.is_timed(label, kernel, m)]
        if label.endswith(":narrow"):
            assert timed == [m for m in gpu_sweep.MS if m <= gpu_sweep.NARROW_MAX_M] and timed, label
        elif kernel == Kernel.STREAM_GROUP_SUMS or label == "stream:auto:sm89":  # sm89: the compact one, M <= 32
            assert timed == [m for m in gpu_sweep.MS if m <= 32], label
        elif label == "stream:auto:deep":  # the deep configuration: M <= 16 and 33-64 (gpu_sweep.deep_takes)
            assert timed == [m for m in gpu_sweep.MS if m <= 16 or 32 < m <= 64] and timed, label
        elif label == "stream:wide":  # the wide configuration: M 17-64 in one launch
            assert timed == [m for m in gpu_sweep.MS if 16 < m <= 64] and timed, label
        else:
            assert timed == gpu_sweep.MS, label
    for M in (1, 4):  # and the SASS column names the narrow instantiation where it runs
        assert gpu_sweep.kernel_label("stream:narrow", M, 4096, 4096).endswith(", true>")
    assert gpu_sweep.kernel_label("stream:sums:narrow", 1, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, large, true>"


def test_kernel_label_of_the_default_follows_the_automatic_choice():
    """stream:auto's rows name what kAuto runs (csrc/awq_dispatch.h): group sums and the narrow kernels
    at one token, the four-m-tile kernel at M 33-64 only from FOUR_TILE_MIN_WEIGHTS, else dequantize."""
    assert gpu_sweep.kernel_label("stream:auto", 1, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, large, true>"
    assert gpu_sweep.kernel_label("stream:auto", 16, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, large, false>"
    big = int(gpu_sweep.FOUR_TILE_MIN_WEIGHTS ** 0.5)
    assert gpu_sweep.kernel_label("stream:auto", 40, big, big).startswith("awq_stream_kernel<half, 4,")
    assert gpu_sweep.kernel_label("stream:auto", 40, 4096, 4096) == "dequant+cuBLAS"
    assert gpu_sweep.kernel_label("stream:auto", 100, big, big) == "dequant+cuBLAS"
    # a ~99 KB GPU's default: the compact configuration, group sums at M <= 16 only
    assert gpu_sweep.kernel_label("stream:auto:sm89", 1, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, compact, true>"
    assert gpu_sweep.kernel_label("stream:auto:sm89", 20, 4096, 4096) == \
        "awq_stream_kernel<half, 2, true, false, false, compact, false>"
    # the deep configuration where it exists (M <= 16 and 33-64: gpu_sweep.deep_takes), the large one at 17-32
    assert gpu_sweep.kernel_label("stream:auto:deep", 1, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, deep, true>"
    assert gpu_sweep.kernel_label("stream:auto:deep", 16, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, false, true, deep, false>"
    assert gpu_sweep.kernel_label("stream:auto:deep", 17, 4096, 4096) == \
        "awq_stream_kernel<half, 2, true, false, true, large, false>"
    assert gpu_sweep.kernel_label("stream:auto:deep", 40, big, big) == \
        "awq_stream_kernel<half, 4, true, false, false, deep, false>"
    assert gpu_sweep.kernel_label("stream:auto:deep", 40, 4096, 4096) == "dequant+cuBLAS"
    assert gpu_sweep.kernel_label("stream:auto:deep", 100, big, big) == "dequant+cuBLAS"


def test_kernel_label_of_wgmma_follows_its_passes():
    """stream:wgmma's rows name its first pass's instantiation: up to 64 tokens in 256- or 512-row
    stages (the sweep's groups of 128 rows change inside those: FINE), 65-128 (and the first pass of
    more) in 128-row stages at eight m-tiles."""
    assert gpu_sweep.kernel_label("stream:wgmma", 1, 4096, 4096) == \
        "awq_stream_kernel<half, 1, true, true, false, wgmma, false>"
    assert gpu_sweep.kernel_label("stream:wgmma", 64, 4096, 4096) == \
        "awq_stream_kernel<half, 4, true, true, false, wgmma, false>"
    for M in (65, 128, 256):
        assert gpu_sweep.kernel_label("stream:wgmma", M, 4096, 4096) == \
            "awq_stream_kernel<half, 8, true, false, false, wgmma, false>"
    assert gpu_sweep.kernel_label("stream", 128, 4096, 4096) == \
        "awq_stream_kernel<half, 4, true, false, false, large, false>"


@pytest.mark.parametrize("first_rc", [0, 1])
def test_ncu_reruns_with_the_known_metrics_only_when_the_added_ones_fail(monkeypatch, tmp_path, first_rc):
    calls = []

    sections = []

    def fake_run_tool(cmd, log, timeout):
        calls.append(cmd[cmd.index("--metrics") + 1])
        sections.append([cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"])
        return {"cmd": " ".join(cmd), "rc": first_rc if len(calls) == 1 else 0}
    monkeypatch.setattr(gpu_sweep, "run_tool", fake_run_tool)
    r = gpu_sweep.run_ncu("70b-down", 64, "stream:auto", tmp_path / "ncu.log")
    assert r["rc"] == 0 and "--profile-case 70b-down,64,stream:auto" in r["cmd"]
    if first_rc == 0:
        assert calls == [gpu_sweep.NCU_METRICS_MORE] and "first_try" not in r
    else:
        assert calls == [gpu_sweep.NCU_METRICS_MORE, gpu_sweep.NCU_METRICS] and r["first_try"]["rc"] == 1
    # the sections with the added metrics only (a retry runs what ran before)
    assert sections == [list(gpu_sweep.NCU_SECTIONS), []][:len(calls)] and "SpeedOfLight" in gpu_sweep.NCU_SECTIONS
    assert {shape for shape, _, _ in gpu_sweep.NCU_CASES} <= {"70b-down", "4096x4096"}  # profile_case's shapes


def test_grid_cases_plan_and_record_what_they_cannot_run(monkeypatch):
    """The grid mirror matches plan_stream (4096x4096: 256 units, so 48 CTAs launch 43 of 6 units),
    and grid_cases records a failure instead of raising (a weight that cannot be made: no GPU here,
    or a broken helper), and prints it."""
    def broken(*args, **kwargs):
        raise RuntimeError("no weight")
    monkeypatch.setattr(gpu_sweep, "make_weight", broken)
    assert gpu_sweep.stream_grid(1, 4096, 4096, 132) == (128, 2)
    assert gpu_sweep.stream_grid(16, 4096, 4096, 48) == (43, 6)
    assert gpu_sweep.stream_grid(64, 4096, 4096, 16) == (16, 32)  # 256-row k-tiles at four m-tiles
    report, saved = {}, []
    args = SimpleNamespace(ms=[1, 4], max_m=None, budget=100.0)
    gpu_sweep.grid_cases(args, report, lambda: saved.append(1), time.time())
    assert report["grid"] == [] and report["grid_error"] and saved
    assert "grid cases stopped" in gpu_sweep.grid_table(report)


def test_variants_option_names_what_it_times():
    labels = [v[0] for v in gpu_sweep.VARIANTS]
    assert gpu_sweep.timed_variants("all") == labels
    assert gpu_sweep.timed_variants("stream:wgmma, stream:auto") == ["stream:wgmma", "stream:auto"]
    with pytest.raises(SystemExit, match=r"--variants: unknown \['stream:nope'\]"):
        gpu_sweep.timed_variants("stream,stream:nope")

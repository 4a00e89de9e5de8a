"""The stream kernel's own CUDA source, run on the CPU (csrc/cpu_twin.h, tests/cpu_twin/).

tests/test_stream_emulation.py re-states the kernel's formulas in Python; this runs the code that a
GPU would run -- the launch as launch_stream describes it (describe_stream: plan, parameters,
instantiation, geometry), the loader's pointer walk, the ring in its steady state, the flush and
the split-slice reduction -- compiled by the host C++ compiler, every CUDA thread a fiber, cp.async
data landing only when waited for (or at once), warp collectives exchanging registers as the PTX
ISA defines them.  It also fails on a deadlock, a cp.async outside shared memory or the inputs, two
warps writing one shared byte between the same barriers, PDL ordering, and (guard pages) an access
past either end of a buffer.  What it cannot show: speed, races between CTAs, a read racing a write
inside one barrier interval, the memory model (csrc/cpu_twin.h).

Needs a host C++20 compiler and the CUDA headers (cuda_fp16.h); skipped without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from awqlib.kernels import source_dir
from awqlib.toolchain import find_cuda_home
from conftest import stream_case

HARNESS = Path(__file__).parent / "cpu_twin" / "stream_twin.cpp"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cuda_include() -> Path | None:
    for root in filter(None, (os.environ.get("CUDA_HOME"), find_cuda_home(), "/usr/local/cuda")):
        inc = Path(root) / "include"
        if (inc / "cuda_fp16.h").is_file() and (inc / "cuda_runtime.h").is_file():
            return inc
    return None


def _compile(source: Path, out_dir: Path) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip(f"needs a host C++ compiler and the CUDA headers (found compiler={cxx}, headers={inc})")
    csrc = source_dir()
    exe = out_dir / source.stem
    # -Werror=attributes: a CUDA attribute the twin does not handle would otherwise be dropped silently
    cmd = [cxx, "-std=c++20", "-O1", "-Werror=attributes", "-I", str(csrc), "-I", str(inc), str(source), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"the CPU twin does not compile:\n{' '.join(cmd)}\n{r.stderr[-6000:]}"
    return exe


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return _compile(HARNESS, tmp_path_factory.mktemp("cpu_twin"))


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return _compile(HARNESS.parent / "twin_selftest.cpp", tmp_path_factory.mktemp("twin_selftest"))


SELFTESTS = {  # check -> (exit status, what the twin must report)
    "mma": (0, "ok"),
    "wgmma": (0, "ok"),
    "lazy": (0, "ok"),
    "pdl_ok": (0, "ok"),
    "deadlock": (1, "deadlocked: 32 threads wait at __syncthreads, 16 at a warp collective, 16 exited"),
    "smem_bounds": (1, "cp.async destination outside the dynamic shared memory"),
    "global_bounds": (1, "cp.async source outside every input buffer"),
    "race": (1, "shared-memory byte 0 written by warps 0 and 1 between the same two barriers"),
    "pdl_read": (1, "cp.async from an input the previous kernel may still write, before griddepcontrol.wait"),
    "pdl_write": (1, "an output was written before griddepcontrol.wait"),
    "divergent": (1, "lanes of warp 0 at different warp-collective instructions"),
    "underrun": (3, "memory fault at 0x"),
}


@pytest.mark.parametrize("check_name", SELFTESTS)
def test_the_twin_itself(selftest, check_name):
    """The twin's PTX semantics agree with each other (ldmatrix's and mma's fragment layouts give
    A @ B) and with the PTX ISA's wgmma layouts (A and D fragments, the 128-byte swizzle), a
    cp.async lands only when waited for, and what must fail fails with its reason."""
    r = subprocess.run([str(selftest), check_name], capture_output=True, text=True, timeout=120)
    status, text = SELFTESTS[check_name]
    assert r.returncode == status and text in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
    if check_name == "underrun":
        assert "before the start of the test buffer, in CTA 0 thread 5" in r.stderr


def _write(d: Path, **arrays: torch.Tensor) -> None:
    for name, t in arrays.items():
        t.contiguous().view(torch.uint8).numpy().tofile(d / f"{name}.bin")


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype).reshape(shape)


def _run(twin: Path, d: Path, *args) -> str:
    r = subprocess.run([str(twin), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"CPU twin failed (exit {r.returncode}): {r.stderr.strip()[-3000:]}"
    return r.stdout


CONFIGS = {"large": 0, "compact": 1, "deep": 2, "wgmma": 3}  # csrc/awq_kernels.h: StreamConfig


def run_gemm(twin, d, x, stream, g, N, sms, sums=False, config="large", pdl=False, narrow=False, timing="lazy",
             order="forward", launch: dict | None = None):
    """The kernel's output [M, N]; ``launch`` receives what the harness printed of the launch (grid,
    per, units, slices, max_parts, smem, planned_refills, weight_bytes_read, warp_mmas, stage_k, m_tiles)."""
    M, K = x.shape
    dt = "fp16" if x.dtype == torch.float16 else "bf16"
    _write(d, x=x, **stream)
    printed = _run(twin, d, "gemm", d, dt, M, N, K, g, sms, int(sums), CONFIGS[config], int(pdl), int(narrow), timing,
                   order)
    if launch is not None:
        words = printed.split()
        launch.update({words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)})
    return _read(d / "out.bin", x.dtype, (M, N))


def check(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, sums: bool):
    """Against x @ W^T in fp64, W^T dequantized as the reference rounds it (to the dtype), or unrounded
    for group sums; the kernel sums in fp32 and rounds the output once.  So almost every output is
    the reference rounded to the dtype, bit for bit (a conversion that truncates misses half)."""
    assert not out.isnan().any(), "some outputs were never written"
    w = q if sums else q.to(x.dtype).double()
    ref = x.double() @ w
    rounded = ref.to(x.dtype)
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(out.double(), rounded.double(), rtol=2 * eps, atol=1e-3 * ref.abs().max().item() * eps)
    same = (out == rounded).double().mean().item()
    assert same >= 0.99, f"only {same:.2%} of the outputs are the reference rounded to {x.dtype}"


# Each case runs in four settings, so that each dtype meets both copy timings and both orders
# (eager: a ring slot refilled while a warp still reads it is overwritten; lazy: a stage read before
# its wait is stale; forward / reverse: which warp runs ahead, which CTA arrives last, which end of
# every buffer touches its guard page).
SETTINGS = [("fp16", "lazy", "forward"), ("fp16", "eager", "reverse"), ("bf16", "eager", "forward"),
            ("bf16", "lazy", "reverse")]

# (M, N, K, group, SMs, configuration, refills): the last, the least number of ring refills the case's
# plan must make after the prologue (a guard on the case list: the steady state of the pipeline,
# which decode shapes on a GPU run hundreds of times per launch, stays covered; 0: a case about
# something else).
CASES = [
    (1, 256, 4096, 128, 2, "large", 12),   # MB = 1, EXACT, coarse groups: 8 units per CTA
    (5, 192, 4160, 64, 2, "large", 12),    # MB = 1, not EXACT (N and K tails), FINE
    (20, 256, 4096, 32, 2, "large", 12),   # MB = 2, FINE
    (40, 256, 2048, 64, 2, "large", 12),   # MB = 4 (k-tile 256)
    (64, 256, 2048, 128, 3, "large", 6),   # MB = 4, full m-tiles, split slices
    (1, 256, 2048, 32, 2, "compact", 12),     # compact, MB = 1, FINE
    (24, 256, 2048, 64, 2, "compact", 12),    # compact, MB = 2 (2 stages)
    (1, 384, 2560, 128, 5, "large", 0),    # slices of 5 k-tiles on CTAs of 3: a slice in three parts
    (1, 128, 2048, 1024, 3, "large", 0),   # a group spans k-tiles
    (3, 128, 1536, 256, 2, "large", 0),    # two groups per k-tile
    (1, 64, 768, 768, 2, "large", 0),      # group == K, K not a multiple of the stage
    (16, 128, 4096, 128, 8, "large", 0),    # a slice in 8 parts: the last arriver's outputs in two batches
    (64, 128, 2560, 64, 5, "large", 0),     # MB = 4, a slice in 5 parts: eight batches of outputs
    (1, 192, 576, 32, 3, "compact", 0),       # compact, tails, FINE
    (1, 256, 4096, 128, 2, "deep", 10),      # deep (4 stages), EXACT
    (5, 192, 4160, 64, 2, "deep", 12),       # deep, tails, FINE
    (16, 256, 4096, 32, 2, "deep", 10),      # deep, a full m-tile, FINE
    (40, 256, 2048, 64, 2, "deep", 10),      # deep, MB = 4 (k-tile 256)
    (64, 192, 2304, 128, 3, "deep", 0),      # deep, MB = 4, full m-tiles, tails, split slices
]


def _ids(cases):
    return [f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-sm{c[4]}{'' if c[5] == 'large' else '-' + c[5]}" for c in cases]


@pytest.mark.parametrize("dtype,timing,order", SETTINGS, ids=["-".join(s) for s in SETTINGS])
@pytest.mark.parametrize("M,N,K,g,sms,config,refills", CASES, ids=_ids(CASES))
def test_stream_kernel_source_on_cpu(twin, tmp_path, M, N, K, g, sms, config, refills, dtype, timing, order):
    x, q, stream = stream_case(M, N, K, g, DTYPES[dtype], seed=M + N + K + g)
    launch = {}
    out = run_gemm(twin, tmp_path, x, stream, g, N, sms, config=config, timing=timing, order=order, launch=launch)
    check(out, x, q, sums=False)
    assert launch["planned_refills"] >= refills, launch
    assert launch["weight_bytes_read"] == K * N // 2, launch  # every weight byte, once


SUMS_CASES = [  # group sums: M <= 32 (compact: M <= 16), groups of >= 128 rows (compact >= 64)
    (20, 256, 4096, 128, 2, "large", 12),  # MB = 2: 8 units per CTA
    (1, 256, 4096, 256, 2, "large", 12),   # MB = 1, two groups per k-tile
    (5, 256, 1024, 128, 3, "large", 0),
    (1, 256, 1536, 128, 4, "large", 0),    # a CTA flushes a split slice mid-run, then goes on with cleared sums
    (1, 128, 640, 128, 2, "large", 0),     # K tail
    (20, 192, 1024, 128, 3, "large", 0),   # MB = 2, N tail
    (1, 256, 2048, 64, 2, "compact", 12),     # compact
    (1, 256, 4096, 128, 2, "deep", 10),      # deep
]


SUMS_SETTINGS = [("fp16", "lazy", "reverse"), ("bf16", "eager", "forward")]  # both timings, both orders


@pytest.mark.parametrize("dtype,timing,order", SUMS_SETTINGS, ids=["-".join(s) for s in SUMS_SETTINGS])
@pytest.mark.parametrize("M,N,K,g,sms,config,refills", SUMS_CASES, ids=_ids(SUMS_CASES))
def test_group_sums_source_on_cpu(twin, tmp_path, M, N, K, g, sms, config, refills, dtype, timing, order):
    x, q, stream = stream_case(M, N, K, g, DTYPES[dtype], seed=3 * M + N + K)
    launch = {}
    out = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=True, config=config, timing=timing, order=order,
                   launch=launch)
    check(out, x, q, sums=True)
    assert launch["planned_refills"] >= refills and launch["weight_bytes_read"] == K * N // 2, launch
    scaled = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=False, config=config)
    assert not torch.equal(out, scaled), "group sums ran the scaled instantiation"


# The narrow kernels (M <= 8: tokens on the mma's n8 side).  The twin's mma sums each product of a
# k16 step exactly and rounds once into the fp32 accumulator, as for the 16-row tiling, so the two
# tilings' outputs are the same bits; a GPU's tensor core may round differently, so there the
# check is against the reference only.  (M, N, K, group, SMs, configuration, group sums, refills)
NARROW_CASES = [
    (1, 256, 4096, 128, 2, "large", False, 12),  # EXACT, coarse groups
    (8, 256, 4096, 128, 2, "large", True, 12),   # every token a lane pair holds, group sums
    (5, 192, 4160, 64, 2, "large", False, 12),   # N and K tails, FINE
    (2, 384, 2560, 128, 5, "large", False, 0),   # slices in three parts
    (3, 256, 2048, 32, 2, "compact", False, 12),    # compact, FINE
    (1, 256, 2048, 64, 2, "compact", True, 12),     # compact, group sums
    (4, 192, 4608, 256, 2, "large", True, 0),    # group sums with tails (not EXACT)
    (6, 256, 4096, 32, 3, "large", False, 0),    # EXACT, FINE
    (1, 192, 1280, 64, 2, "compact", False, 0),     # compact with tails
    (7, 256, 2048, 128, 2, "compact", False, 0),    # compact, EXACT, scaled
    (8, 256, 4096, 128, 2, "deep", True, 10),       # deep, group sums
    (3, 192, 4160, 64, 2, "deep", False, 12),       # deep, tails, FINE
]
NARROW_SETTINGS = [("fp16", "lazy", "forward"), ("bf16", "eager", "reverse")]


@pytest.mark.parametrize("dtype,timing,order", NARROW_SETTINGS, ids=["-".join(s) for s in NARROW_SETTINGS])
@pytest.mark.parametrize("M,N,K,g,sms,config,sums,refills", NARROW_CASES,
                         ids=[i + ("-sums" if c[6] else "") for i, c in zip(_ids(NARROW_CASES), NARROW_CASES)])
def test_narrow_kernels_source_on_cpu(twin, tmp_path, M, N, K, g, sms, config, sums, refills, dtype, timing, order):
    x, q, stream = stream_case(M, N, K, g, DTYPES[dtype], seed=7 * M + N + K + g)
    narrow, wide = {}, {}
    out = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, config=config, narrow=True, timing=timing,
                   order=order, launch=narrow)
    check(out, x, q, sums=sums)
    assert narrow["planned_refills"] >= refills and narrow["weight_bytes_read"] == K * N // 2, narrow
    ref = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, config=config, launch=wide)
    assert torch.equal(out, ref), "the narrow and the 16-row tiling differ"
    # per atom a warp computes: 8 n8-tiles (x 16 rows), or narrow 4 m16 column tiles (x 8 tokens)
    assert narrow["warp_mmas"] * 2 == wide["warp_mmas"], (narrow, wide)
    if K % (256 if config == "compact" else 512) == 0 and N % 128 == 0:  # EXACT: no zero-filled tail atoms
        assert narrow["warp_mmas"] == (N // 64) * (K // 16) * 4, narrow


@pytest.mark.parametrize("sums", [False, True])
def test_narrow_kernels_with_pdl(twin, tmp_path, sums):
    """The narrow kernels' PDL prologue (weights before the wait, everything else after): the same
    bits as their plain launch, in either CTA order."""
    M, N, K, g, sms = 5, 256, 4096, 128, 3  # slices split over CTAs, rings refilled
    x, q, stream = stream_case(M, N, K, g, torch.float16, seed=13)
    base = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, narrow=True)
    check(base, x, q, sums=sums)
    for order in ("forward", "reverse"):
        out = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, pdl=True, narrow=True, timing="eager",
                       order=order)
        assert torch.equal(out, base), order


def test_narrow_is_ignored_past_eight_tokens(twin, tmp_path):
    M, N, K, g = 9, 256, 2048, 128
    x, q, stream = stream_case(M, N, K, g, torch.float16, seed=9)
    asked, plain = {}, {}
    out = run_gemm(twin, tmp_path, x, stream, g, N, 2, narrow=True, launch=asked)
    check(out, x, q, sums=False)
    run_gemm(twin, tmp_path, x, stream, g, N, 2, launch=plain)
    assert asked["warp_mmas"] == plain["warp_mmas"] == (N // 64) * (K // 16) * 8


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("timing", ["lazy", "eager"])
def test_copy_timing_launch_mode_and_cta_order_change_nothing(twin, tmp_path, pdl, timing):
    """Whenever cp.async data lands (as late as the wait allows, or at once), with the PDL prologue
    or without (with it, the twin fails a read of an input or a write of an output before the wait),
    whatever order the CTAs and warps run in: the same bits (the split-slice reduction adds the
    parts in part order)."""
    M, N, K, g, sms = 3, 256, 4096, 128, 3  # 16 units on 3 CTAs: slices split, rings refilled
    x, q, stream = stream_case(M, N, K, g, torch.float16, seed=11)
    launch = {}
    base = run_gemm(twin, tmp_path, x, stream, g, N, sms, launch=launch)
    check(base, x, q, sums=False)
    assert launch["planned_refills"] > 0 and launch["max_parts"] > 1, launch
    for order in ("forward", "reverse"):
        out = run_gemm(twin, tmp_path, x, stream, g, N, sms, pdl=pdl, timing=timing, order=order)
        assert torch.equal(out, base), (pdl, timing, order)


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("sums,narrow", [(False, False), (True, False), (True, True)],
                         ids=["scaled", "group-sums", "narrow-group-sums"])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_deep_ring_is_the_large_kernel_bit_for_bit(twin, tmp_path, M, sums, narrow, pdl):
    """The deep configuration (AWQLIB_STREAM_DEEP: a fourth stage) keeps the large one's partition
    and arithmetic, so its outputs are the same bits, launched plainly or with PDL (whose prologue
    then issues three stages' weights before the wait); its prologue has one stage more in flight,
    so each CTA refills its ring once less; two m-tiles (17-32 tokens) have no deep configuration."""
    N, K, g, sms = 256, 8192, 128, 2  # 32 units per CTA: the 4-slot ring wraps many times
    x, q, stream = stream_case(M, N, K, g, torch.float16, seed=17 + M)
    large, deep = {}, {}
    a = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, narrow=narrow, launch=large)
    check(a, x, q, sums=sums and M <= 32)  # group sums pay at <= 2 m-tiles only (group_sums_pay)
    for order, timing in (("forward", "lazy"), ("reverse", "eager")):
        b = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, narrow=narrow, config="deep", pdl=pdl,
                     timing=timing, order=order, launch=deep)
        assert torch.equal(a, b), (order, timing)
    assert (deep["grid"], deep["per"], deep["warp_mmas"]) == (large["grid"], large["per"], large["warp_mmas"])
    assert deep["planned_refills"] == large["planned_refills"] - large["grid"], (deep, large)
    assert deep["smem"] == large["smem"] * 4 // 3  # a stage more of the same bytes
    for rows in (17, 32, 65):
        xr, _, stream_r = stream_case(rows, N, K, g, torch.float16, seed=3)
        _write(tmp_path, x=xr, **stream_r)
        r = subprocess.run([str(twin), *map(str, ("gemm", tmp_path, "fp16", rows, N, K, g, sms, 0, CONFIGS["deep"], 0,
                                                  0, "lazy", "forward"))], capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "stream_supports refuses" in r.stderr, (rows, r.stderr)


def test_deep_four_m_tiles_with_split_slices_and_pdl(twin, tmp_path):
    """The deep configuration at four m-tiles (M 33-64) on slices split over CTAs, group 32 (FINE)
    and N and K tails, under PDL in either CTA order: the large kernel's bits."""
    M, N, K, g, sms = 64, 192, 2304, 32, 3  # 18 units on 3 CTAs: each slice in two parts
    x, q, stream = stream_case(M, N, K, g, torch.bfloat16, seed=23)
    large = {}
    a = run_gemm(twin, tmp_path, x, stream, g, N, sms, launch=large)
    check(a, x, q, sums=False)
    assert large["max_parts"] > 1, large
    for order, timing in (("forward", "eager"), ("reverse", "lazy")):
        b = run_gemm(twin, tmp_path, x, stream, g, N, sms, config="deep", pdl=True, timing=timing, order=order)
        assert torch.equal(a, b), (order, timing)


# The warpgroup-mma configuration (kConfigWgmma, sm_90a): the twin runs its wgmma as the PTX ISA
# defines them -- A from each warp's registers, B read through the descriptor from 128-byte-swizzled
# shared memory (the dynamic shared memory starting 1040 bytes into the window, as on a GPU, so the
# kernel's search for a 1024-byte boundary runs), applied -- B read, results written -- at issue
# when the copies land late (LAZY: a stage not yet landed is stale) and at the covering wgmma_wait
# when they land at once (EAGER: a slot refilled before the wait is overwritten, results read
# before it stale).  Each output is summed over
# the whole stage by one warpgroup, so the bits differ from the large kernel's (k-warp partial sums).
# (M, N, K, group, SMs, refills): every m-tile count (wgmma N 16, 32, 64, 128), tails, group changes
# inside a stage (FINE: 32 to 256 rows) and not, split slices.
WGMMA_CASES = [
    (1, 256, 4096, 128, 2, 10),    # MB = 1, EXACT, FINE (4 groups per 512-row stage)
    (5, 192, 4160, 64, 2, 12),     # MB = 1, N and K tails, FINE
    (16, 256, 4096, 512, 2, 10),   # MB = 1, one group per stage
    (20, 256, 4096, 32, 2, 10),    # MB = 2, groups of 2 atoms
    (32, 192, 2560, 128, 3, 0),    # MB = 2, tails, split slices
    (40, 256, 2048, 64, 2, 10),    # MB = 4 (256-row stages), FINE
    (64, 256, 2048, 256, 3, 0),    # MB = 4, one group per stage, split slices
    (64, 128, 2560, 64, 5, 0),     # MB = 4, a slice in 5 parts
    (33, 192, 2304, 128, 3, 0),    # MB = 4, tails
    (1, 64, 768, 768, 2, 0),       # group == K, K not a multiple of the stage
    (128, 128, 3072, 128, 2, 10),  # MB = 8 (5 stages of 128 rows), EXACT, one group per stage
    (100, 192, 1088, 64, 3, 0),    # MB = 8, N and K tails, FINE (two groups per stage), split slices
    (65, 128, 1280, 32, 5, 0),     # MB = 8, one row past 4 m-tiles, groups of 2 atoms, a slice in 5 parts
    (128, 192, 1024, 128, 2, 0),   # MB = 8, an N tail, no split slice (the flush straight to the output)
]
WGMMA_SETTINGS = [("fp16", "lazy", "forward"), ("bf16", "eager", "reverse")]


@pytest.mark.parametrize("dtype,timing,order", WGMMA_SETTINGS, ids=["-".join(s) for s in WGMMA_SETTINGS])
@pytest.mark.parametrize("M,N,K,g,sms,refills", WGMMA_CASES, ids=_ids([(*c[:5], "large") for c in WGMMA_CASES]))
def test_wgmma_kernels_source_on_cpu(twin, tmp_path, M, N, K, g, sms, refills, dtype, timing, order):
    x, q, stream = stream_case(M, N, K, g, DTYPES[dtype], seed=5 * M + N + K + g)
    wg = {}
    out = run_gemm(twin, tmp_path, x, stream, g, N, sms, config="wgmma", timing=timing, order=order, launch=wg)
    check(out, x, q, sums=False)
    assert wg["planned_refills"] >= refills and wg["weight_bytes_read"] == K * N // 2, wg
    # the tensor-core work of the 16-row mma.sync tiling (a warp's wgmma: 16 columns x 16 MB tokens,
    # 2 MB m16n8k16): per unit of 128 columns x stage_k rows, 16 n8-tiles x stage_k / 16 k-steps per m-tile
    assert wg["warp_mmas"] == wg["units"] * wg["stage_k"] * wg["m_tiles"], wg


@pytest.mark.parametrize("M", [7, 40, 100])
def test_wgmma_kernels_with_pdl(twin, tmp_path, M):
    """The wgmma kernels' PDL prologue (weights before the wait; activations after it): the plain
    launch's bits, in either CTA order and copy timing."""
    N, K, g, sms = 256, 4096, 128, 3
    x, q, stream = stream_case(M, N, K, g, torch.float16, seed=29 + M)
    base = run_gemm(twin, tmp_path, x, stream, g, N, sms, config="wgmma")
    check(base, x, q, sums=False)
    for order, timing in (("forward", "eager"), ("reverse", "lazy")):
        out = run_gemm(twin, tmp_path, x, stream, g, N, sms, config="wgmma", pdl=True, timing=timing, order=order)
        assert torch.equal(out, base), (order, timing)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dequantize_source_on_cpu_is_bit_exact(twin, tmp_path, dtype):
    K, N, g = 256, 192, 64
    x, q, stream = stream_case(1, N, K, g, DTYPES[dtype], seed=5)
    _write(tmp_path, **stream)
    _run(twin, tmp_path, "dequant", tmp_path, dtype, K, N, g)
    assert torch.equal(_read(tmp_path / "out.bin", DTYPES[dtype], (K, N)), q.to(DTYPES[dtype]))

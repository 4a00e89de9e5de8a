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

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from awqlib.kernels import source_constant, source_dir
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


CONFIGS = {"large": 0, "compact": 1, "deep": 2, "wgmma": 3, "wide": 4}  # csrc/awq_kernels.h: StreamConfig


def run_gemm(twin, d, x, stream, g, N, sms, sums=False, config="large", pdl=False, narrow=False, timing="lazy",
             order="forward", launch: dict | None = None, residual: torch.Tensor | None = None):
    """The kernel's output [M, N] (plus ``residual`` [M, N], added in its epilogue); ``launch``
    receives what the harness printed of the launch (grid, per, units, slices, max_parts, smem,
    planned_refills, weight_bytes_read, warp_mmas, stage_k, m_tiles)."""
    M, K = x.shape
    dt = "fp16" if x.dtype == torch.float16 else "bf16"
    _write(d, x=x, **stream)
    (d / "residual.bin").unlink(missing_ok=True)
    if residual is not None:
        _write(d, residual=residual)
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
    (20, 512, 4096, 128, 2, "wide", 12),     # wide (256-column slices), MB = 2, EXACT
    (40, 512, 2048, 64, 2, "wide", 12),      # wide, MB = 4 (k-tile 128, 4 stages), two groups per k-tile
    (64, 320, 2176, 32, 3, "wide", 0),       # wide, MB = 4, full m-tiles, N tail, FINE, split slices
    (33, 256, 1536, 128, 5, "wide", 0),      # wide, a slice in four parts, one row in its third reduction round
    (17, 256, 1280, 1280, 2, "wide", 0),     # wide, MB = 2, group == K
    (32, 512, 2048, 128, 3, "wide", 0),      # wide, MB = 2 full, split slices
    (48, 448, 2304, 384, 2, "wide", 0),      # wide, MB = 4, rows 33-47 in the third round, N tail, a group
                                             # only its k-tile divides
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
    (24, 512, 4096, 128, 2, "wide", 12),     # wide, MB = 2
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


# (M, N, K, group, SMs, configuration, narrow, sums): each way an output element is written -- one
# CTA's whole slice, the last arriver of a split one, a wgmma owner's registers -- with tails
RESIDUAL_CASES = [
    (1, 256, 4096, 128, 2, "large", True, True),    # narrow, group sums, whole slices
    (5, 192, 4160, 64, 2, "large", False, False),   # tails
    (1, 384, 2560, 128, 5, "large", False, False),  # a slice in three parts: the last arriver writes
    (40, 256, 2048, 64, 3, "large", False, False),  # MB = 4, split slices
    (24, 256, 2048, 64, 2, "compact", False, False),
    (7, 256, 4096, 128, 3, "wgmma", False, False),  # the owners' registers, split slices
    (100, 192, 2048, 128, 2, "wgmma", False, False),  # MB = 8, N tail
    (40, 320, 2048, 64, 3, "wide", False, False),  # wide, MB = 4: rounds of the reduction, split slices, N tail
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("M,N,K,g,sms,config,narrow,sums", RESIDUAL_CASES,
                         ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{c[5]}" for c in RESIDUAL_CASES])
def test_residual_epilogue_on_cpu(twin, tmp_path, M, N, K, g, sms, config, narrow, sums, dtype):
    """awq_gemm_add's epilogue: with a residual the kernel writes out + residual, the two added as
    torch adds the tensors (rounded once more) -- bit for bit the plain launch's output plus the
    residual, wherever the element is written; PDL reads the residual after its wait."""
    x, q, stream = stream_case(M, N, K, g, DTYPES[dtype], seed=11 + M + N)
    residual = (torch.randn(M, N) * 4).to(DTYPES[dtype])
    base = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, config=config, narrow=narrow)
    check(base, x, q, sums=sums)
    for pdl, order in ((False, "forward"), (True, "reverse")):
        out = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=sums, config=config, narrow=narrow, pdl=pdl,
                       order=order, residual=residual)
        assert torch.equal(out, base + residual), (pdl, order)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dequantize_source_on_cpu_is_bit_exact(twin, tmp_path, dtype):
    K, N, g = 256, 192, 64
    x, q, stream = stream_case(1, N, K, g, DTYPES[dtype], seed=5)
    _write(tmp_path, **stream)
    _run(twin, tmp_path, "dequant", tmp_path, dtype, K, N, g)
    assert torch.equal(_read(tmp_path / "out.bin", DTYPES[dtype], (K, N)), q.to(DTYPES[dtype]))


# ---- which stream kernel serves a call: csrc/awq_stream.cu's choose_stream (what awq_dispatch.h's
# choose_kernel asks for every stream-layout call) and the instantiation its first launch runs (stream_kernel_name),
# from the source itself, on the CPU.

H100_SMEM, A100_SMEM, SM89_SMEM = (source_constant(n) for n in ("kH100SmemPerBlock", "kA100SmemPerBlock",
                                                               "kSm89SmemPerBlock"))
ROOT = Path(__file__).resolve().parent.parent


def choose(twin, queries: list[dict]) -> list[str]:
    """choose_stream's answer to each query: "stream CONFIG PASS SUMS FIRST | LAST | GRID PER" (the
    first and last launches' instantiations, the first one's grid and units per CTA), "dequant" or
    "refused MESSAGE".  A query: M, N, K, and optionally g (128), dtype ("fp16"), limit (the device's
    shared memory per block: H100_SMEM), auto / compact / sums / deep / wide / wgmma (the request: False),
    narrow (the setting: True) and sms (the CTAs the grid may have: 132)."""
    return _ask(twin, "choose", queries,
                ("dtype", "M", "N", "K", "g", "limit", "auto", "compact", "sums", "deep", "wide", "wgmma", "narrow",
                 "sms"),
                dict(dtype="fp16", g=128, limit=H100_SMEM, auto=False, compact=False, sums=False, deep=False,
                     wide=False, wgmma=False, narrow=True, sms=132))


def _ask(twin, command: str, queries: list[dict], fields: tuple, defaults: dict) -> list[str]:
    """The twin's answers to `command`'s queries, one line each (`fields` in order, `defaults` for
    what a query leaves out)."""
    text = "\n".join(" ".join(str(int(v) if isinstance(v, bool) else v) for v in
                              (({**defaults, **q})[f] for f in fields)) for q in queries)
    r = subprocess.run([str(twin), command, "-"], input=text, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == len(queries), r.stdout[-2000:]
    return answers


def _head(answer: str) -> str:
    """An answer without its last launch and grid: "stream CONFIG PASS SUMS FIRST"."""
    return answer.split(" | ")[0]


def _kernel(answer: str) -> str:
    """The first launch's instantiation, or "dequant" / the refusal."""
    return _head(answer).split(" ", 4)[4] if answer.startswith("stream ") else answer


BIG = dict(N=8192, K=8192)     # 2^26 weights: four m-tiles pay (kStreamFourTileMinWeights)
SQUARE = dict(N=4096, K=4096)
# (query, answer): the stream rows of awq_dispatch.h's header table, per GPU class and setting
CHOICES = [
    (dict(M=1, auto=True, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, true>"),
    (dict(M=1, auto=True, narrow=False, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, false>"),
    (dict(M=9, auto=True, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, false>"),
    (dict(M=20, auto=True, dtype="bf16", **SQUARE), "stream 0 64 1 awq_stream_kernel<bf16, 2, true, false, true, large, false>"),
    (dict(M=40, auto=True, **SQUARE), "dequant"),   # four m-tiles lose below 2^26 weights
    (dict(M=40, auto=True, **BIG), "stream 0 64 1 awq_stream_kernel<half, 4, true, false, false, large, false>"),
    (dict(M=40, auto=True, N=8128, K=8192), "dequant"),  # just under 2^26
    (dict(M=65, auto=True, **BIG), "dequant"),      # one launch at most
    (dict(M=1, auto=True, limit=A100_SMEM, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, true>"),
    (dict(M=20, auto=True, limit=A100_SMEM, **SQUARE), "stream 1 32 1 awq_stream_kernel<half, 2, true, false, false, compact, false>"),
    (dict(M=40, auto=True, limit=A100_SMEM, **BIG), "stream 0 64 1 awq_stream_kernel<half, 4, true, false, false, large, false>"),
    (dict(M=1, auto=True, limit=SM89_SMEM, **SQUARE), "stream 1 32 1 awq_stream_kernel<half, 1, true, false, true, compact, true>"),
    (dict(M=40, auto=True, limit=SM89_SMEM, **BIG), "dequant"),
    # the deep ring where asked for: M <= 16 and 33-64, where it fits
    (dict(M=1, auto=True, deep=True, **SQUARE), "stream 2 64 1 awq_stream_kernel<half, 1, true, false, true, deep, true>"),
    (dict(M=20, auto=True, deep=True, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 2, true, false, true, large, false>"),
    (dict(M=64, auto=True, deep=True, **BIG), "stream 2 64 1 awq_stream_kernel<half, 4, true, false, false, deep, false>"),
    (dict(M=1, auto=True, deep=True, limit=A100_SMEM, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, true>"),
    # the wide slices where asked for: every pass 17-64 rows (so not at M <= 16, nor with a last
    # pass of 16 or fewer), ahead of the deep ring; on an A100 too
    (dict(M=20, auto=True, wide=True, **SQUARE), "stream 4 64 1 awq_stream_kernel<half, 2, true, false, true, wide, false>"),
    (dict(M=64, auto=True, wide=True, deep=True, **BIG), "stream 4 64 1 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=40, auto=True, wide=True, limit=A100_SMEM, **BIG), "stream 4 64 1 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=40, auto=True, wide=True, **SQUARE), "dequant"),  # the automatic choice's 2^26 rule stands
    (dict(M=1, auto=True, wide=True, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 1, true, false, true, large, true>"),
    (dict(M=100, wide=True, **SQUARE), "stream 4 64 0 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=80, wide=True, **SQUARE), "stream 0 64 0 awq_stream_kernel<half, 4, true, false, false, large, false>"),
    (dict(M=40, wide=True, N=4160, K=4096), "stream 4 64 0 awq_stream_kernel<half, 4, false, false, false, wide, false>"),
    (dict(M=40, wide=True, wgmma=True, **SQUARE), "stream 3 128 0 awq_stream_kernel<half, 4, true, true, false, wgmma, false>"),
    # ... also where the large configuration does not run: an A100 at 17-32 rows (forced, in passes,
    # and the automatic choice, which would otherwise take the compact one), a group only its k-tile divides
    (dict(M=20, wide=True, limit=A100_SMEM, **SQUARE), "stream 4 64 0 awq_stream_kernel<half, 2, true, false, false, wide, false>"),
    (dict(M=90, wide=True, limit=A100_SMEM, **SQUARE), "stream 4 64 0 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=20, auto=True, wide=True, limit=A100_SMEM, **SQUARE), "stream 4 64 1 awq_stream_kernel<half, 2, true, false, true, wide, false>"),
    (dict(M=40, wide=True, N=4096, K=4608, g=384), "stream 4 64 0 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=40, auto=True, wide=True, N=8192, K=8448, g=384), "stream 4 64 1 awq_stream_kernel<half, 4, true, false, false, wide, false>"),
    (dict(M=40, auto=True, N=8192, K=8448, g=384), "dequant"),  # (without it)
    (dict(M=20, auto=True, wide=True, limit=SM89_SMEM, **SQUARE), "stream 1 32 1 awq_stream_kernel<half, 2, true, false, false, compact, false>"),
    # warpgroup mma where asked for (and the device runs it): every pass, up to 128 rows; the
    # automatic choice keeps its own limits (dequantize + cuBLAS past 64 rows)
    (dict(M=1, auto=True, wgmma=True, **SQUARE), "stream 3 128 1 awq_stream_kernel<half, 1, true, true, false, wgmma, false>"),
    (dict(M=100, wgmma=True, **SQUARE), "stream 3 128 0 awq_stream_kernel<half, 8, true, false, false, wgmma, false>"),
    (dict(M=129, wgmma=True, **SQUARE), "stream 3 128 0 awq_stream_kernel<half, 8, true, false, false, wgmma, false>"),
    (dict(M=100, auto=True, wgmma=True, **BIG), "dequant"),
    (dict(M=100, wgmma=True, limit=A100_SMEM, **SQUARE), "stream 0 64 0 awq_stream_kernel<half, 4, true, false, false, large, false>"),
    (dict(M=100, wgmma=True, compact=True, **SQUARE), "stream 1 32 0 awq_stream_kernel<half, 2, true, false, false, compact, false>"),
    (dict(M=100, wgmma=True, N=4096, K=4608, g=384), "stream 3 128 0 awq_stream_kernel<half, 8, true, false, false, wgmma, false>"),
    # forced kernels in passes; tails (not EXACT) and groups a warp's stage walk ends inside (FINE)
    (dict(M=100, sums=True, **SQUARE), "stream 0 64 1 awq_stream_kernel<half, 4, true, false, false, large, false>"),
    (dict(M=5, N=192, K=4160, g=64), "stream 0 64 0 awq_stream_kernel<half, 1, false, true, false, large, true>"),
    (dict(M=1, N=4096, K=4096, g=32, compact=True, sums=True), "stream 1 32 1 awq_stream_kernel<half, 1, true, true, false, compact, true>"),
]


@pytest.mark.parametrize("query,answer", CHOICES, ids=[f"{i}" for i in range(len(CHOICES))])
def test_stream_choice_follows_the_stated_rules(twin, query, answer):
    assert [_head(a) for a in choose(twin, [query])] == [answer]


def test_stream_refusals_name_every_configuration_considered(twin):
    """A forced stream kernel that cannot run is refused with the reason of each configuration it
    considered; gpu_sweep's gate skips only the refusals where none had the room (lacks_smem)."""
    from benchmarks import gpu_sweep
    A100 = dict(limit=A100_SMEM, **SQUARE)
    smem, shape, both, both_smem, auto = choose(twin, [
        dict(M=20, **A100),                                      # the large M 17-32 stage: 214 KB
        dict(M=4, N=192, K=576, g=96),                           # no k-tile that group divides
        dict(M=100, wgmma=True, N=4096, K=4608, g=384, limit=A100_SMEM),  # wgmma's stage is too big, large refuses g
        dict(M=20, wgmma=True, **A100),                          # neither has the room
        dict(M=4, N=192, K=576, g=96, auto=True)])               # the automatic choice falls back
    assert auto == "dequant"
    assert smem.startswith("refused the stream kernel cannot run 20 rows of this weight: the large configuration "
                           "runs passes of at most 64 rows; its pass of 20 rows needs "), smem
    assert smem.endswith(f" bytes of shared memory per block (the device has {A100_SMEM})")
    assert "does not take N = 192, K = 576, group_size 96" in shape and "k-tile of 512 rows" in shape
    assert "the large configuration" in both and "does not take" in both
    assert "; and the wgmma configuration runs passes of at most 128 rows; its pass of 100 rows needs " in both
    assert both.endswith("(AWQLIB_STREAM_WGMMA=1)")
    assert [gpu_sweep.lacks_smem(m) for m in (smem, shape, both, both_smem)] == [True, False, False, True]
    # the wide configuration, where asked for and it runs none of the passes: named in turn
    wide_smem, wide_rows = choose(twin, [dict(M=20, wide=True, limit=SM89_SMEM, **SQUARE),
                                         dict(M=4, N=192, K=576, g=96, wide=True)])
    assert wide_smem.startswith("refused the stream kernel cannot run 20 rows of this weight: the large configuration")
    assert "; and the wide configuration runs passes of at most 64 rows; its pass of 20 rows needs " in wide_smem
    assert wide_smem.endswith(f" bytes of shared memory per block (the device has {SM89_SMEM}) (AWQLIB_STREAM_WIDE=1)")
    assert wide_rows.endswith("; and the wide configuration runs passes of at most 64 rows; its pass of 4 rows is too "
                              "few for it (it runs passes of 17 rows and more) (AWQLIB_STREAM_WIDE=1)"), wide_rows
    assert gpu_sweep.lacks_smem(wide_smem) and not gpu_sweep.lacks_smem(wide_rows)


def dispatch(twin, queries: list[dict], reads: list | None = None) -> list[str]:
    """awq_dispatch.h's answer to each query (awq_ops.cpp's whole choice): the first launch's kernel
    as the awq_gemm_kernel_name op names it, or "refused MESSAGE"; `reads` receives how many times
    each choice asked for the stream settings.  A query: layout, M, N, K, kernel (an
    awqlib.ops.Kernel), and optionally g (128), dtype, limit, deep, wide, wgmma, narrow (as in choose)."""
    lines = _ask(twin, "dispatch", queries,
                 ("dtype", "layout", "M", "N", "K", "g", "kernel", "limit", "deep", "wide", "wgmma", "narrow"),
                 dict(dtype="fp16", g=128, limit=H100_SMEM, deep=False, wide=False, wgmma=False, narrow=True))
    if reads is not None:
        reads.extend(int(line.split(" ", 1)[0]) for line in lines)
    return [line.split(" ", 1)[1] for line in lines]


def _sweep_settings(label: str) -> dict:
    """What a gpu_sweep variant's environment sets (awq_ops.cpp reads AWQLIB_STREAM_*: unset is the
    default, "0" off, "1" on); the GPU an H100/H200 unless the environment caps its shared memory."""
    from benchmarks import gpu_sweep
    env = {**gpu_sweep.BASE_ENV, **gpu_sweep.VARIANT_ENV.get(label, {})}
    limit = env.get("AWQLIB_STREAM_SMEM_LIMIT")
    return dict(deep=env.get("AWQLIB_STREAM_DEEP") == "1", wide=env.get("AWQLIB_STREAM_WIDE") == "1",
                wgmma=env.get("AWQLIB_STREAM_WGMMA") == "1",
                narrow=env.get("AWQLIB_STREAM_NARROW") != "0", limit=int(limit) if limit else H100_SMEM)


def test_gpu_sweep_labels_what_the_library_runs(twin):
    """gpu_sweep.kernel_label (which names each timed cell's kernel for its SASS column, and decides
    which cells the deep variant times) predicts the library's choice -- awq_dispatch.h from the
    variant's kernel id, layout and settings -- for every variant, shape and token count: a change to
    the dispatch that the sweep does not follow fails here, on the CPU."""
    from benchmarks import gpu_sweep
    cases = [(label, layout, kernel, M, N, K) for label, layout, kernel in gpu_sweep.VARIANTS
             for _, N, K in gpu_sweep.SHAPES for M in sorted({*gpu_sweep.MS, 2, 8, 9, 17, 33, 63, 65, 100, 129})]
    answers = dispatch(twin, [dict(layout=layout, M=M, N=N, K=K, g=gpu_sweep.GROUP, kernel=int(kernel),
                                   **_sweep_settings(label)) for label, layout, kernel, M, N, K in cases])
    wrong = [(label, M, N, K, gpu_sweep.kernel_label(label, M, N, K), a)
             for (label, layout, kernel, M, N, K), a in zip(cases, answers) if gpu_sweep.kernel_label(label, M, N, K) != a]
    assert not wrong, wrong[:10]


GEMM, TILED, STREAM = "gemm", "tiled", "stream"
# (query, answer): awq_dispatch.h's table for the GEMM and warp-tiled layouts, the kernel ids on the
# stream layout, and the refusals of a forced kernel
DISPATCH = [
    (dict(layout=GEMM, M=1, kernel=0), "awq_skinny_kernel<half, 1, 2, false>"),
    (dict(layout=GEMM, M=16, kernel=0, dtype="bf16"), "awq_skinny_kernel<bf16, 1, 2, false>"),
    (dict(layout=GEMM, M=17, kernel=0), "awq_skinny_kernel<half, 2, 2, false>"),
    (dict(layout=GEMM, M=32, kernel=0), "awq_skinny_kernel<half, 2, 2, false>"),
    (dict(layout=GEMM, M=33, kernel=0), "dequant+cuBLAS"),
    (dict(layout=GEMM, M=1, kernel=0, N=4104), "dequant+cuBLAS"),        # N % 64: no fused kernel
    (dict(layout=GEMM, M=1, kernel=0, g=48, K=4128), "dequant+cuBLAS"),  # group % 32
    (dict(layout=GEMM, M=20, kernel=2), "awq_skinny_kernel<half, 2, 4, false>"),
    (dict(layout=GEMM, M=33, kernel=5), "refused awq_gemm_variant: the skinny kernel takes M <= 32"),
    (dict(layout=GEMM, M=1, kernel=2, N=4104), "refused awq_gemm_variant: the fused kernels need N % 64 == 0, "
                                               "K % 32 == 0 and group_size % 32 == 0"),
    (dict(layout=GEMM, M=1, kernel=6), "refused awq_gemm_variant: the stream kernel needs the stream layout"),
    # the retired ids (a CUDA-core GEMV, a tiled mma.sync GEMM) and ids past the last: unknown on every layout
    (dict(layout=GEMM, M=1, kernel=1), "refused awq_gemm_variant: unknown kernel 1"),
    (dict(layout=GEMM, M=40, kernel=3), "refused awq_gemm_variant: unknown kernel 3"),
    (dict(layout=TILED, M=1, kernel=1), "refused awq_gemm_variant: unknown kernel 1"),
    (dict(layout=STREAM, M=1, kernel=3), "refused awq_gemm_variant: unknown kernel 3"),
    (dict(layout=STREAM, M=1, kernel=10), "refused awq_gemm_variant: unknown kernel 10"),
    (dict(layout=TILED, M=32, kernel=0), "awq_skinny_kernel<half, 2, 2, true>"),
    (dict(layout=TILED, M=33, kernel=0), "dequant+cuBLAS"),
    (dict(layout=TILED, M=8, kernel=2), "awq_skinny_kernel<half, 1, 4, true>"),
    (dict(layout=TILED, M=1, kernel=7), "refused awq_gemm_variant: the stream kernel needs the stream layout"),
    (dict(layout=TILED, M=4, kernel=4), "dequant+cuBLAS"),
    (dict(layout=STREAM, M=1, kernel=0), "awq_stream_kernel<half, 1, true, false, true, large, true>"),
    (dict(layout=STREAM, M=1, kernel=6), "awq_stream_kernel<half, 1, true, false, false, large, true>"),
    (dict(layout=STREAM, M=1, kernel=7, narrow=False), "awq_stream_kernel<half, 1, true, false, true, large, false>"),
    (dict(layout=STREAM, M=1, kernel=8), "awq_stream_kernel<half, 1, true, false, false, compact, true>"),
    (dict(layout=STREAM, M=20, kernel=9), "awq_stream_kernel<half, 2, true, false, false, compact, false>"),
    (dict(layout=STREAM, M=1, kernel=4), "dequant+cuBLAS"),
    (dict(layout=STREAM, M=1, kernel=2), "refused awq_gemm_variant: a stream-layout weight is served by the stream "
                                         "kernel or dequantize + cuBLAS only"),
    (dict(layout=STREAM, M=2**31, kernel=0), "dequant+cuBLAS"),
    (dict(layout=STREAM, M=2**31, kernel=4), "dequant+cuBLAS"),
    (dict(layout=STREAM, M=2**31, kernel=6), "refused awq_gemm_variant: the stream kernel takes fewer than 2^31 "
                                             "rows, got 2147483648"),
    # the fused kernels' 32-bit indexing: rows, and rows x outputs
    (dict(layout=GEMM, M=2**31, kernel=0), "dequant+cuBLAS"),
    (dict(layout=GEMM, M=16, N=2**27, K=32, g=32, kernel=0), "dequant+cuBLAS"),
    (dict(layout=TILED, M=32, N=2**26, K=32, g=32, kernel=0), "dequant+cuBLAS"),
    (dict(layout=GEMM, M=2**31, kernel=2), "refused awq_gemm_variant: the fused kernels take fewer than 2^31 rows "
                                           "and outputs (M x N), got M = 2147483648, N = 4096"),
]


@pytest.mark.parametrize("query,answer", DISPATCH, ids=[f"{i}" for i in range(len(DISPATCH))])
def test_dispatch_follows_the_stated_rules(twin, query, answer):
    assert dispatch(twin, [{"N": 4096, "K": 4096, **query}]) == [answer]


def test_only_a_stream_layout_call_reads_the_stream_settings(twin):
    """awq_ops.cpp reads AWQLIB_STREAM_DEEP / WGMMA / SMEM_LIMIT (and refuses an invalid one) when the
    choice asks for them: once for a stream-layout call the stream kernel may serve, never for the
    other layouts, a forced dequantize + cuBLAS or 2^31 rows."""
    reads: list[int] = []
    dispatch(twin, [{"N": 4096, "K": 4096, **q} for q, _ in DISPATCH], reads)
    from awqlib.ops import Kernel
    may_stream = {int(Kernel.AUTO), *(int(k) for k in Kernel if k.name.startswith("STREAM"))}
    assert reads == [int(q["layout"] == STREAM and q["kernel"] in may_stream and q["M"] < 2**31) for q, _ in DISPATCH]
    assert 0 < sum(reads) < len(reads)


def test_every_launchable_stream_kernel_has_a_sass_budget_row(twin):
    """Every instantiation the host can launch -- any request, GPU class, dtype, token count, group
    regime and tail -- is one scripts/sass_budget.py measured (benchmarks/sass_budget.json, sm_90),
    so the sweep's SASS column and the budget test cover what runs."""
    import itertools
    rows = json.loads((ROOT / "benchmarks" / "sass_budget.json").read_text())
    measured = {r["kernel"] for r in rows if r["arch"] == "90"}
    shapes = [(4096, 4096, 128), (192, 576, 64), (1024, 2752, 32), (512, 2048, 256), (4096, 4608, 384),
              (128, 2048, 1024), (64, 768, 768)]
    kinds = [dict(auto=True), dict(), dict(sums=True), dict(compact=True), dict(compact=True, sums=True)]
    queries = [dict(dtype=dt, M=M, N=N, K=K, g=g, limit=limit, deep=deep, wide=wide, wgmma=wgmma, narrow=narrow,
                    **kind)
               for dt in ("fp16", "bf16") for M in (1, 2, 8, 9, 16, 17, 32, 33, 64, 65, 100, 128, 129)
               for N, K, g in shapes for limit in (H100_SMEM, A100_SMEM, SM89_SMEM) for kind in kinds
               for deep, wide, wgmma, narrow in itertools.product((False, True), repeat=4)]
    names = {name for a in choose(twin, queries) if a.startswith("stream ")
             for name in (_kernel(a), a.split(" | ")[1])}  # each call's first and last launch
    assert len(names) > 100, len(names)  # the queries reach most of the instantiations
    assert names <= measured, sorted(names - measured)[:10]


def test_gpu_sweep_grid_is_the_plan(twin):
    """gpu_sweep.stream_grid (the grid cases' CTAs and units per CTA) is plan_stream's grid for the
    large configuration's first launch, the CTA cap applied as awq_ops.cpp does (at most one per SM)."""
    from benchmarks import gpu_sweep
    cases = [(M, N, K, cap) for _, N, K in [*gpu_sweep.GRID_SHAPES, ("70b-down", 8192, 28672)] for M in (1, 16, 32, 33, 64)
             for cap in (*gpu_sweep.GRID_CAPS, 1, 7, 500)]
    answers = choose(twin, [dict(M=M, N=N, K=K, sms=min(cap, 132) if cap else 132) for M, N, K, cap in cases])
    for (M, N, K, cap), a in zip(cases, answers):
        assert a.startswith("stream "), (M, N, K, a)
        grid, per = map(int, a.split(" | ")[2].split())
        assert gpu_sweep.stream_grid(M, N, K, min(cap, 132) if cap else 132) == (grid, per), (M, N, K, cap)


def test_every_mutation_still_applies():
    """Each of tests/cpu_twin/mutations.py's kernel bugs edits exactly one place of today's sources:
    a change to the kernel (or to a comment a mutation anchors on) that leaves one stale fails here,
    in CI, rather than at the next mutation run."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("twin_mutations", HARNESS.parent / "mutations.py")
    mutations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutations)
    stale = [(name, where[0] if where else "awq_stream.cu", old[:60])
             for name, edits in mutations.MUTS.items() for old, _new, *where in edits
             if (source_dir() / (where[0] if where else "awq_stream.cu")).read_text().count(old) != 1]
    assert not stale, stale
    assert set(mutations.CAUGHT_BY) <= set(mutations.MUTS)


def test_stream_serves_decode_is_the_kernels_rule(twin):
    """packing.stream_serves_decode (which keeps a layer in the tiled layout where the stream kernel
    would not take one token) says what choose_stream says of one token in either configuration."""
    from awqlib.packing import stream_serves_decode
    cases = [(K, N, g) for K in (256, 512, 768, 1024, 1536, 2048, 2752, 4096, 4608, 5120, 11008, 14336)
             for N in (64, 192, 4096) for g in (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, -1)
             if K % (K if g == -1 else g) == 0]
    answers = choose(twin, [dict(M=1, N=N, K=K, g=K if g == -1 else g, compact=compact)
                            for K, N, g in cases for compact in (False, True)])
    takes = [a.startswith("stream ") for a in answers]
    wrong = [(K, N, g) for i, (K, N, g) in enumerate(cases)
             if stream_serves_decode(K, N, g) != (takes[2 * i] or takes[2 * i + 1])]
    assert not wrong, wrong[:10]
    assert any(takes) and not all(takes)


def _slices(twin, capacity: int, queries: list[tuple[int, int, int]]) -> list[int]:
    """The twin's answers to awq_counters.h's question for (stream, capture, counters) queries."""
    r = subprocess.run([str(twin), "slices", str(capacity)], input="\n".join(" ".join(map(str, q)) for q in queries),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [int(a) for a in r.stdout.split()]


SLICE_MIN = 1024  # awq_counters.h kCaptureSliceCounters


def test_captured_counters_share_a_slice_per_capture_and_stream(twin):
    """A launch's counters (awq_counters.h): the launches of one capture (or, capture id 0, the eager
    ones) on one stream share a slice; another stream or capture gets its own; a launch that needs
    more gets a fresh, larger slice, which the next launches of its pair share; a spent arena
    answers -1 (a memset per call)."""
    queries = [(1, 7, 10), (1, 7, 300), (2, 7, 10), (1, 8, 10), (1, 7, 5000), (1, 7, 10), (2, 7, 1024),
               (3, 9, 10), (3, 9, 120)]
    assert _slices(twin, 8192, queries) == [0, 0, 1024, 2048, 3072, 3072, 1024, -1, -1]
    assert _slices(twin, 8192 + 1024, [*queries, (3, 9, 1)]) == [0, 0, 1024, 2048, 3072, 3072, 1024, 8072, 8072, 8072]
    # the last slice that fits exactly is given; the next is not
    assert _slices(twin, 3 * SLICE_MIN, [(1, 1, 5), (2, 1, 5), (3, 1, SLICE_MIN), (4, 1, 1)]) == [0, 1024, 2048, -1]
    # eager launches (capture id 0) take a slice per stream like any capture
    assert _slices(twin, 4 * SLICE_MIN, [(1, 0, 5), (1, 0, 9), (2, 0, 5), (1, 3, 5)]) == [0, 0, 1024, 2048]


def test_captured_counters_never_overlap(twin):
    """Random launches of many captures on several streams: no two (stream, capture) pairs ever hold
    overlapping counters, no slice leaves the arena, a pair keeps its slice while it suffices, and -1
    comes only when what is left of the arena is less than the slice needed."""
    import random
    rng = random.Random(5)
    capacity = 64 * SLICE_MIN
    queries = [(rng.randrange(4), rng.randrange(40), rng.choice([1, 17, 448, 1024, 1025, 3000])) for _ in range(400)]
    answers = _slices(twin, capacity, queries)
    held: dict[tuple[int, int], tuple[int, int]] = {}   # each pair's current slice
    owner: list[tuple[int, int, tuple[int, int]]] = []  # every slice handed out: [start, end) and its pair
    for (stream, capture, n), at in zip(queries, answers):
        pair, size = (stream, capture), max(n, SLICE_MIN)
        if pair in held and held[pair][1] >= n:
            assert at == held[pair][0], (pair, n, at)
            continue
        used = max((end for _, end, _ in owner), default=0)
        if at == -1:
            assert capacity - used < size, (pair, n, used)
            continue
        assert 0 <= at and at + size <= capacity, (at, size)
        assert all(at >= end or at + size <= start for start, end, _ in owner), (pair, at, size)
        owner.append((at, at + size, pair))
        held[pair] = (at, size)
    assert len(owner) > 20 and answers.count(-1) > 20  # the run filled the arena and went on past it

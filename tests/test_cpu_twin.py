"""The stream kernel's own CUDA source, run on the CPU (csrc/cpu_twin.h, tests/cpu_twin/).

tests/test_stream_emulation.py re-states the kernel's formulas in Python; this runs the code that a
GPU would run -- the launch plan (plan_stream, params_for), the instantiation stream_kernel_of
picks, the loader's pointer walk, the ring, the flush and the split-slice reduction -- compiled by
the host C++ compiler, every CUDA thread a fiber, cp.async data landing only when waited for (or at
once), warp collectives exchanging registers as the PTX ISA defines them.  It also fails on a
deadlock, a cp.async outside shared memory or outside the inputs, and (guard pages) any access
past the end of a buffer.  What it cannot show: speed, races between CTAs, the memory model.

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
from awqlib.packing import pack_columns, stream_qweight, stream_qzeros, stream_scales
from awqlib.toolchain import find_cuda_home

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
    cmd = [cxx, "-std=c++20", "-O1", "-Wno-attributes", "-I", str(csrc), "-I", str(inc), str(source), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"the CPU twin does not compile:\n{' '.join(cmd)}\n{r.stderr[-6000:]}"
    return exe


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return _compile(HARNESS, tmp_path_factory.mktemp("cpu_twin"))


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return _compile(HARNESS.parent / "twin_selftest.cpp", tmp_path_factory.mktemp("twin_selftest"))


SELFTESTS = {  # check -> what the twin must report (None: passes)
    "mma": None,
    "lazy": None,
    "deadlock": "deadlocked: 32 threads wait at __syncthreads, 16 at a warp collective, 16 exited",
    "smem_bounds": "cp.async destination outside the dynamic shared memory",
    "global_bounds": "cp.async source outside every input buffer",
}


@pytest.mark.parametrize("check_name", SELFTESTS)
def test_the_twin_itself(selftest, check_name):
    """The twin's PTX semantics agree with each other (ldmatrix's and mma's fragment layouts give
    A @ B), a cp.async lands only when waited for, and what must fail fails with its reason."""
    r = subprocess.run([str(selftest), check_name], capture_output=True, text=True, timeout=120)
    want = SELFTESTS[check_name]
    if want is None:
        assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stdout
    else:
        assert r.returncode == 1 and want in r.stdout, r.stdout


def _write(d: Path, **arrays: torch.Tensor) -> None:
    for name, t in arrays.items():
        t.contiguous().view(torch.uint8).numpy().tofile(d / f"{name}.bin")


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype).reshape(shape)


def _case(M, N, K, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32, generator=gen)
    scales = (torch.rand(K // g, N, generator=gen) * 0.01 + 1e-3).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    q = (codes - zeros.repeat_interleave(g, 0)).double() * scales.double().repeat_interleave(g, 0)
    stream = dict(qweight=stream_qweight(pack_columns(codes)), qzeros=stream_qzeros(pack_columns(zeros)),
                  scales=stream_scales(scales))
    return x, q, stream


def _run(twin: Path, d: Path, *args) -> str:
    r = subprocess.run([str(twin), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"CPU twin failed (exit {r.returncode}): {r.stderr.strip()[-3000:]}"
    return r.stdout


def run_gemm(twin, d, x, stream, g, N, sms, sums=False, compact=False, pdl=False, timing="lazy", order="forward"):
    M, K = x.shape
    dt = "fp16" if x.dtype == torch.float16 else "bf16"
    _write(d, x=x, **stream)
    _run(twin, d, "gemm", d, dt, M, N, K, g, sms, int(sums), int(compact), int(pdl), timing, order)
    return _read(d / "out.bin", x.dtype, (M, N))


def check(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, sums: bool):
    """Against x @ W^T in fp64, W^T dequantized as the reference rounds it (to the dtype), or unrounded
    for group sums; the kernel sums in fp32 and rounds the output once."""
    assert not out.isnan().any(), "some outputs were never written"
    w = q if sums else q.to(x.dtype).double()
    ref = x.double() @ w
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(out.double(), ref.to(x.dtype).double(), rtol=2 * eps, atol=1e-3 * ref.abs().max().item() * eps)


CASES = [  # (M, N, K, group, SMs, compact): every instantiation regime, split slices, tails
    (1, 256, 1024, 128, 3, False),   # EXACT, coarse: 4 units on 3 CTAs, a slice split over two
    (5, 192, 576, 64, 3, False),     # not EXACT (N and K tails), FINE
    (1, 128, 2048, 1024, 3, False),  # a group spans k-tiles
    (3, 128, 1536, 256, 2, False),   # two groups per k-tile
    (1, 64, 768, 768, 2, False),     # group == K, K not a multiple of the stage
    (20, 128, 1024, 32, 3, False),   # MB = 2, FINE
    (40, 128, 512, 64, 2, False),    # MB = 4, k-tile 256
    (64, 256, 1024, 128, 4, False),  # MB = 4, full m-tiles, split slices
    (1, 192, 576, 32, 3, True),      # compact, tails, FINE
    (24, 128, 1024, 64, 3, True),    # compact, MB = 2
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("M,N,K,g,sms,compact", CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-sm{c[4]}{'-compact' if c[5] else ''}" for c in CASES])
def test_stream_kernel_source_on_cpu(twin, tmp_path, M, N, K, g, sms, compact, dtype):
    """Every case in both schedules: CTAs and threads in index order, and reversed (bf16)."""
    x, q, stream = _case(M, N, K, g, DTYPES[dtype], seed=M + N + K + g)
    order = "reverse" if dtype == "bf16" else "forward"
    check(run_gemm(twin, tmp_path, x, stream, g, N, sms, compact=compact, order=order), x, q, sums=False)


SUMS_CASES = [  # group sums: M <= 32 (compact: M <= 16), groups of >= 128 rows (compact >= 64)
    (5, 256, 1024, 128, 3, False),
    (1, 256, 1536, 128, 4, False),   # a CTA flushes a split slice mid-run, then goes on with cleared sums
    (1, 128, 640, 128, 2, False),    # K tail
    (20, 192, 1024, 128, 3, False),  # MB = 2, N tail
    (1, 128, 1024, 64, 3, True),     # compact
]


@pytest.mark.parametrize("M,N,K,g,sms,compact", SUMS_CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-sm{c[4]}{'-compact' if c[5] else ''}" for c in SUMS_CASES])
def test_group_sums_source_on_cpu(twin, tmp_path, M, N, K, g, sms, compact):
    x, q, stream = _case(M, N, K, g, torch.float16, seed=3 * M + N + K)
    out = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=True, compact=compact)
    check(out, x, q, sums=True)
    scaled = run_gemm(twin, tmp_path, x, stream, g, N, sms, sums=False, compact=compact)
    assert not torch.equal(out, scaled), "group sums ran the scaled instantiation"


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("timing", ["lazy", "eager"])
def test_copy_timing_launch_mode_and_cta_order_change_nothing(twin, tmp_path, pdl, timing):
    """Whenever cp.async data lands (as late as the wait allows, or at once), with the PDL prologue
    or without, in whatever order the CTAs arrive: the same bits (the split-slice reduction adds the
    parts in part order)."""
    M, N, K, g, sms = 3, 256, 2048, 128, 5  # 8 units on 4 CTAs of 2: every slice split
    x, q, stream = _case(M, N, K, g, torch.float16, seed=11)
    base = run_gemm(twin, tmp_path, x, stream, g, N, sms)
    check(base, x, q, sums=False)
    for order in ("forward", "reverse"):
        out = run_gemm(twin, tmp_path, x, stream, g, N, sms, pdl=pdl, timing=timing, order=order)
        assert torch.equal(out, base), (pdl, timing, order)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dequantize_source_on_cpu_is_bit_exact(twin, tmp_path, dtype):
    K, N, g = 256, 192, 64
    x, q, stream = _case(1, N, K, g, DTYPES[dtype], seed=5)
    _write(tmp_path, **stream)
    _run(twin, tmp_path, "dequant", tmp_path, dtype, K, N, g)
    assert torch.equal(_read(tmp_path / "out.bin", DTYPES[dtype], (K, N)), q.to(DTYPES[dtype]))

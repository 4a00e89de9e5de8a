"""GPU tests of the CUDA kernels against an fp32 dequantize-then-matmul reference.

Skipped without a CUDA device.  Inputs are fresh random numbers on every run (no fixed seed), so
repeated runs keep exploring; a failure prints the shape, dtype and seed-free error ratio.

Error bound.  The kernels dequantize w = (q - z) * s with one rounding to the activation dtype
(relative error <= 2^-11 for fp16, 2^-8 for bf16; uniform, so RMS ~ u / sqrt(3)), accumulate in
fp32 (negligible) and round the output once more (same u).  With random-sign terms the relative
error of a dot product equals the per-term relative error, so
    ||out - ref|| / ||ref|| ~ sqrt(2) * u / sqrt(3) ~ 4e-4 (fp16), 3.2e-3 (bf16)
plus, for bf16, rounding the fp16 scales to bf16 (another u / sqrt(3) ~ 2.3e-3, systematic per
group and column but random across them).  The bounds below leave a 5x margin: an index bug (a
wrong column, row, group or nibble) gives errors of order 1.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from awqlib import kernels
from awqlib.ops import Kernel, gemm_kernel_name
from awqlib.packing import dequantize_gemm, pack_awq

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    # On a GPU machine the kernels must build and load: a silent fallback would test the reference.
    assert kernels.load(), "awqlib CUDA kernels failed to build/load (see the warning above)"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("awqlib::awq_gemm", "CUDA")


@functools.lru_cache(maxsize=8)
def weight(K: int, N: int, g: int):
    """Random AWQ weight (codes, zeros, scales) in the GEMM layout, on the GPU."""
    gs = K if g == -1 else g
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 16, (K // gs, N), dtype=torch.int32, device="cuda")
    # Scales of realistic magnitude (|w| ~ 0.01..0.1), some negative to catch sign mix-ups.
    scales = ((torch.rand(K // gs, N, device="cuda") * 0.01 + 0.001)
              * torch.where(torch.rand(K // gs, N, device="cuda") < 0.1, -1.0, 1.0)).half()
    qweight, qzeros = pack_awq(codes, zeros)
    w32 = dequantize_gemm(qweight, qzeros, scales, g, dtype=torch.float32)  # exact W^T [K, N]
    return qweight, qzeros, scales, w32


def poison_allocator():
    """Fill the caching allocator's free blocks with NaN so that a kernel which leaves part of its
    output (or split-K workspace) unwritten produces NaN instead of stale plausible numbers."""
    big = [torch.full((s,), float("nan"), device="cuda") for s in (64 << 20, 16 << 20)]
    small = [torch.full((s,), float("nan"), device="cuda") for s in (1 << 18,) * 8]
    del big, small


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(x, K, N, g, dtype, *, out=None):
    qweight, qzeros, scales, w32 = weight(K, N, g)
    if out is None:
        poison_allocator()
        out = torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
    ref = x.float() @ w32
    if dtype == torch.bfloat16:  # the kernel (like the reference op) uses scales rounded to bf16
        ref = x.float() @ dequantize_gemm(qweight, qzeros, scales.to(torch.bfloat16), g, dtype=torch.float32)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == dtype
    assert torch.isfinite(out).all(), f"non-finite output for M={x.shape[:-1]} N={N} K={K} g={g} {dtype}"
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"rel err {err:.2e} for M={tuple(x.shape[:-1])} N={N} K={K} g={g} {dtype}"
    return out


# (N, K, group) combos: tiny, odd tile counts (N = 192 is not a multiple of the 256-column block),
# Llama-like shapes, K with 43 (2752) and 86 (11008) k-tiles, every group size.
COMBOS = [
    (64, 128, 32),
    (192, 576, 64),
    (4096, 4096, 128),
    (11008, 2752, 64),
    (4096, 11008, 128),
    (14336, 4096, 32),
]

# The kernels' M limits, read from csrc/ (so that a changed threshold moves the tested boundaries)
SKINNY_MAX_M = kernels.source_constant("kSkinnyMaxM")            # what the skinny kernels accept
STREAM_MAX_M = kernels.source_constant("kStreamMaxM")            # what the stream kernel accepts
STREAM_COMPACT_MAX_M = kernels.source_constant("kStreamCompactMaxM")  # ... in its compact configuration
STREAM_NARROW_MAX_M = kernels.source_constant("kStreamNarrowMaxM")  # ... in its narrow kernels
STREAM_WGMMA_MAX_M = kernels.source_constant("kStreamWgmmaMaxM")  # ... in its wgmma configuration
FOUR_TILE_MIN_WEIGHTS = kernels.source_constant("kStreamFourTileMinWeights")  # where kAuto runs M 33-64


def auto_stream_kernel(M: int, N: int, K: int, compact: bool = False) -> Kernel:
    """What the automatic choice runs on a stream-layout weight (csrc/awq_dispatch.h, kAuto) where the
    configuration fits: group sums (which fall back to scaled fragments where they do not pay), at
    M 33-64 only for weights of FOUR_TILE_MIN_WEIGHTS elements or more, past that dequantize + cuBLAS."""
    if M > STREAM_MAX_M or (M > STREAM_COMPACT_MAX_M and N * K < FOUR_TILE_MIN_WEIGHTS):
        return Kernel.DEQUANT_CUBLAS
    return Kernel.STREAM_COMPACT_GROUP_SUMS if compact else Kernel.STREAM_GROUP_SUMS
SKINNY_MAX_M_AUTO = kernels.source_constant("kSkinnyMaxMAuto")  # auto choice on GEMM and warp-tiled weights
M_TILE = 16  # rows of one mma.sync m16n8k16 tile: the tensor-core kernels change configuration at multiples


def edges(*limits: int) -> list[int]:
    """Each limit and the first M past it."""
    return [m for limit in limits for m in (limit, limit + 1)]


MS = sorted({1, 3, 4, 5, 6, 7, 8, 13, 33, 64, 127, 257, 1024, 4097, *edges(M_TILE, SKINNY_MAX_M_AUTO)})


@pytest.mark.parametrize("N,K,g", COMBOS, ids=[f"N{n}-K{k}-g{g}" for n, k, g in COMBOS])
@pytest.mark.parametrize("M", MS)
def test_gemm_fp16(M, N, K, g):
    if M * N * K > 4097 * 14336 * 4096 // 2 and M > 1024:
        pytest.skip("largest M only on the smaller shapes (time)")
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    check(x, K, N, g, torch.float16)


@pytest.mark.parametrize("N,K,g", [COMBOS[1], COMBOS[2], COMBOS[4]], ids=["N192", "N4096", "K11008"])
@pytest.mark.parametrize("M", [1, 5, 8, 13, 16, 33, 64, 257, 1024])
def test_gemm_bf16(M, N, K, g):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    check(x, K, N, g, torch.bfloat16)


@pytest.mark.parametrize("M", [1, 8, 16, 100])
def test_deterministic(M):
    """Split-K reduces in a fixed order: two calls are bitwise identical."""
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    a = torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
    poison_allocator()
    b = torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
    assert torch.equal(a, b)


@pytest.mark.parametrize("M", [4, 64, 600])
def test_non_contiguous_and_batched_input(M):
    N, K, g = 192, 576, 64
    xt = torch.randn(K, M, device="cuda", dtype=torch.float16)
    check(xt.t(), K, N, g, torch.float16)                      # transposed view
    big = torch.randn(M, 2 * K, device="cuda", dtype=torch.float16)
    check(big[:, ::2], K, N, g, torch.float16)                 # strided view
    flat = torch.randn(M * K + 1, device="cuda", dtype=torch.float16)
    check(flat[1:].view(M, K), K, N, g, torch.float16)         # contiguous but 2-byte aligned
    check(torch.randn(2, 3, K, device="cuda", dtype=torch.float16), K, N, g, torch.float16)  # [B, T, K]


@pytest.mark.parametrize("N,K,g", [(200, 576, 64), (64, 40, -1), (64, 96, -1), (128, 4096, -1), (64, 160, 32)])
@pytest.mark.parametrize("M", [1, 7, 40])
def test_fallback_shapes(M, N, K, g):
    """Shapes outside the fused kernels' tiling (N % 64 != 0, K % 32 != 0) take dequantize + matmul;
    g = -1 with K % 32 == 0 and K = 5 k-tiles (odd split-K remainders) take the fused kernels."""
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    check(x, K, N, g, torch.float16)


def test_empty_input():
    qweight, qzeros, scales, _ = weight(128, 64, 32)
    out = torch.ops.awqlib.awq_gemm(torch.empty(0, 128, device="cuda", dtype=torch.float16), qweight, qzeros, scales, 32)
    assert out.shape == (0, 64)


@pytest.mark.parametrize("N,K,g", [(4096, 4096, 128), (24, 64, 32), (192, 576, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_bit_exact(N, K, g, dtype):
    """awq_dequantize equals the PyTorch reference bit for bit: (q - z) is exact in fp16/bf16 and the
    kernel multiplies by the scale with the same single rounding."""
    gs = K if g == -1 else g
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 16, (K // gs, N), dtype=torch.int32, device="cuda")
    scales = (torch.randn(K // gs, N, device="cuda") * 0.01).to(dtype)
    qweight, qzeros = pack_awq(codes, zeros)
    poison_allocator()
    out = torch.ops.awqlib.awq_dequantize(qweight, qzeros, scales, g)
    ref = dequantize_gemm(qweight, qzeros, scales, g)
    assert out.dtype == dtype and torch.equal(out, ref)


def test_bad_arguments():
    qweight, qzeros, scales, _ = weight(128, 64, 32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.awqlib.awq_gemm(torch.randn(2, 128, device="cuda"), qweight, qzeros, scales, 32)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.awqlib.awq_gemm(torch.randn(2, 64, device="cuda").half(), qweight, qzeros, scales, 32)
    with pytest.raises(RuntimeError, match="qzeros"):
        torch.ops.awqlib.awq_gemm(torch.randn(2, 128, device="cuda").half(), qweight, qzeros, scales, 64)


@pytest.mark.parametrize("M", [1, 8, 33])
def test_non_default_stream(M):
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
        out2 = out * 1  # consumed on the same stream
    torch.cuda.current_stream().wait_stream(s)
    check(x, K, N, g, torch.float16, out=out2)


@pytest.mark.parametrize("M", [1, 8, 33, 600])  # skinny (split-K: counters), dequant + cuBLAS
def test_cuda_graph_capture(M):
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture, as torch recommends
        torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, g)
    for _ in range(2):  # replay with new data: the graph must read x afresh and reset its counters
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(x, K, N, g, torch.float16, out=out)


@pytest.mark.parametrize("M", [1, 33])
def test_torch_compile_fullgraph(M):
    N, K, g = 192, 576, 64
    qweight, qzeros, scales, _ = weight(K, N, g)

    @torch.compile(fullgraph=True)
    def f(x):
        return torch.ops.awqlib.awq_gemm(x * 1.0, qweight, qzeros, scales, g) + 0.0

    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    check(x, K, N, g, torch.float16, out=f(x))


# Every kernel variant (forced through awq_gemm_variant), including forced split-K factors that
# leave uneven remainders: the automatic dispatch must never be the only thing tested.
VARIANT_M = {Kernel.SKINNY: [1, 3, 8, 9, M_TILE, M_TILE + 1, SKINNY_MAX_M], Kernel.DEQUANT_CUBLAS: [1, 16, 100],
             Kernel.SKINNY_SHALLOW: [1, 8, M_TILE, SKINNY_MAX_M - 8]}
VARIANT_CASES = [(int(k), m) for k, ms in VARIANT_M.items() for m in ms]


@pytest.mark.parametrize("splits", [0, 1, 3, 7])
@pytest.mark.parametrize("N,K,g", [COMBOS[1], COMBOS[2], (11008, 2752, 32)], ids=["N192", "N4096", "K2752-g32"])
@pytest.mark.parametrize("kernel,M", VARIANT_CASES, ids=[f"k{k}-M{m}" for k, m in VARIANT_CASES])
def test_kernel_variants(kernel, M, N, K, g, splits):
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qweight, qzeros, scales, g, kernel, splits)
    check(x, K, N, g, torch.float16, out=out)


@pytest.mark.parametrize("kernel", [int(Kernel.SKINNY), int(Kernel.SKINNY_SHALLOW)])
@pytest.mark.parametrize("M", [1, 8, M_TILE, SKINNY_MAX_M])
def test_skinny_bf16(kernel, M):
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.awqlib.awq_gemm_variant(x, qweight, qzeros, scales, g, kernel, 0)
    check(x, K, N, g, torch.bfloat16, out=out)


def test_variant_refuses_what_it_cannot_do():
    qweight, qzeros, scales, _ = weight(128, 64, 32)
    x = torch.randn(SKINNY_MAX_M + 1, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=f"skinny kernel takes M <= {SKINNY_MAX_M}"):
        torch.ops.awqlib.awq_gemm_variant(x, qweight, qzeros, scales, 32, int(Kernel.SKINNY), 0)
    for retired_or_past_the_last in (1, 3, max(Kernel) + 1):  # ids 1 and 3: the retired GEMV and tiled GEMM
        with pytest.raises(RuntimeError, match=f"unknown kernel {retired_or_past_the_last}"):
            torch.ops.awqlib.awq_gemm_variant(x, qweight, qzeros, scales, 32, retired_or_past_the_last, 0)
        with pytest.raises(RuntimeError, match=f"unknown kernel {retired_or_past_the_last}"):  # also with no rows
            torch.ops.awqlib.awq_gemm_variant(x[:0], qweight, qzeros, scales, 32, retired_or_past_the_last, 0)


# The warp-tiled runtime layout (what from_quantized serves on CUDA with AWQLIB_LAYOUT=tiled).
TILED_CASES = ([(int(k), m) for k in (Kernel.AUTO, Kernel.SKINNY, Kernel.SKINNY_SHALLOW)
                for m in (1, 4, 8, M_TILE, M_TILE + 1, SKINNY_MAX_M_AUTO)]
               + [(int(Kernel.AUTO), SKINNY_MAX_M_AUTO + 1), (int(Kernel.AUTO), 100), (int(Kernel.DEQUANT_CUBLAS), 1),
                  (int(Kernel.DEQUANT_CUBLAS), 40)])


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("N,K,g", [COMBOS[1], COMBOS[2], (11008, 2752, 32)], ids=["N192", "N4096", "K2752-g32"])
@pytest.mark.parametrize("kernel,M", TILED_CASES, ids=[f"k{k}-M{m}" for k, m in TILED_CASES])
def test_tiled_layout(kernel, M, N, K, g, splits):
    from awqlib.packing import tile_qweight
    qweight, qzeros, scales, _ = weight(K, N, g)
    qt = tile_qweight(qweight)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qt, qzeros, scales, g, kernel, splits)
    check(x, K, N, g, torch.float16, out=out)


@pytest.mark.parametrize("M", [1, *edges(M_TILE, SKINNY_MAX_M_AUTO), 64])
def test_tiled_layout_bf16(M):
    from awqlib.packing import tile_qweight
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    check(x, K, N, g, torch.bfloat16, out=torch.ops.awqlib.awq_gemm(x, tile_qweight(qweight), qzeros, scales, g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_tiled_bit_exact(dtype):
    from awqlib.packing import tile_qweight
    K, N, g = 576, 192, 64
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32, device="cuda")
    scales = (torch.randn(K // g, N, device="cuda") * 0.01).to(dtype)
    qweight, qzeros = pack_awq(codes, zeros)
    poison_allocator()
    out = torch.ops.awqlib.awq_dequantize(tile_qweight(qweight), qzeros, scales, g)
    assert torch.equal(out, dequantize_gemm(qweight, qzeros, scales, g))


def test_tiled_refuses_the_stream_kernel():
    from awqlib.packing import tile_qweight
    qweight, qzeros, scales, _ = weight(576, 192, 64)
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="the stream kernel needs the stream layout"):
        torch.ops.awqlib.awq_gemm_variant(x, tile_qweight(qweight), qzeros, scales, 64, int(Kernel.STREAM), 0)


# --- the stream layout (the default runtime layout) and its streaming kernel (Kernel.STREAM) -------

STREAM_COMBOS = COMBOS + [  # (N, K, group): tails (K % 512, N % 128), every group regime, Llama-like shapes
    (1024, 3072, 256),
    (512, 2048, 1024),
    (256, 768, -1),
]
# the configuration changes at one and two m-tiles; M 33..STREAM_MAX_M share the last one
STREAM_MS = sorted({1, 2, 3, 7, 8, 13, 31, 48, *edges(M_TILE, 2 * M_TILE), STREAM_MAX_M})


def stream_lacks_smem(M: int, kernel: Kernel = Kernel.STREAM) -> int | None:
    """The bytes of shared memory the kernel's configuration for M needs where this GPU cannot give
    them to a block (the kernel refuses, naming them), else None; any other refusal raises."""
    qs, zs, ss = stream_weight(512, 128, 128)
    x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
    try:
        torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(kernel), 0)
        return None
    except RuntimeError as e:
        m = re.search(r"needs (\d+) bytes of shared memory", str(e))
        if m is None or int(m.group(1)) <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
            raise  # refused for another reason, or although it fits: a real failure
        return int(m.group(1))


def skip_if_stream_does_not_fit(M: int, kernel: Kernel = Kernel.STREAM):
    """Skip where this GPU cannot give the stream kernel's configuration for M its shared memory
    (an A100's 163 KB per block is less than the large M 17-32 configuration needs; a ~100 KB GPU
    has room for the compact ones only), after checking that the automatic choice then falls back,
    correctly."""
    needs = stream_lacks_smem(M, kernel)
    if needs is None:
        return
    qs, zs, ss = stream_weight(512, 128, 128)
    x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
    check(x, 512, 128, 128, torch.float16, out=torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128))
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    pytest.skip(f"the stream kernel's configuration for M={M} needs {needs} B of shared memory, "
                f"this GPU gives a block {optin} B")


def stream_weight(K: int, N: int, g: int, dtype=torch.float16):
    from awqlib.packing import stream_qweight, stream_qzeros, stream_scales
    qweight, qzeros, scales, _ = weight(K, N, g)
    return stream_qweight(qweight), stream_qzeros(qzeros), stream_scales(scales.to(dtype))


@pytest.mark.parametrize("N,K,g", STREAM_COMBOS, ids=[f"N{n}-K{k}-g{g}" for n, k, g in STREAM_COMBOS])
@pytest.mark.parametrize("M", STREAM_MS)
def test_stream_kernel_fp16(M, N, K, g):
    skip_if_stream_does_not_fit(M)
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0)
    check(x, K, N, g, torch.float16, out=out)
    # the automatic choice on a stream-layout weight is the kernel auto_stream_kernel names, bit for bit
    auto = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(auto_stream_kernel(M, N, K)), 0)
    assert torch.equal(torch.ops.awqlib.awq_gemm(x, qs, zs, ss, g), auto)


@pytest.mark.parametrize("N,K,g", [STREAM_COMBOS[1], STREAM_COMBOS[2], STREAM_COMBOS[4], STREAM_COMBOS[6]],
                         ids=["N192", "N4096", "K11008", "g256"])
@pytest.mark.parametrize("M", [1, 5, *edges(M_TILE), 2 * M_TILE, STREAM_MAX_M])
def test_stream_kernel_bf16(M, N, K, g):
    skip_if_stream_does_not_fit(M)
    qs, zs, ss = stream_weight(K, N, g, torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    poison_allocator()
    check(x, K, N, g, torch.bfloat16, out=torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0))


def group_sums_apply(M: int, K: int, g: int) -> bool:
    """Where Kernel.STREAM_GROUP_SUMS runs group sums (awq_stream.cu group_sums_pay): M <= 32 and
    groups no finer than a warp's 128-row k-slice; elsewhere it is Kernel.STREAM."""
    return M <= 2 * M_TILE and (K if g == -1 else g) >= 128


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,g", STREAM_COMBOS, ids=[f"N{n}-K{k}-g{g}" for n, k, g in STREAM_COMBOS])
@pytest.mark.parametrize("M", [1, 7, M_TILE, M_TILE + 1, 2 * M_TILE, 2 * M_TILE + 1])
def test_stream_group_sums(M, N, K, g, dtype):
    """Group sums (the scale applied once per group to fp32 sums) are correct against the fp32
    reference, deterministic, and run exactly where they are meant to: elsewhere the variant is the
    scaled stream kernel, bit for bit."""
    skip_if_stream_does_not_fit(M)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM_GROUP_SUMS), 0)
    check(x, K, N, g, dtype, out=out)
    again = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM_GROUP_SUMS), 0)
    assert torch.equal(out, again)
    scaled = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0)
    if group_sums_apply(M, K, g):
        assert not torch.equal(out, scaled), "no weight is rounded to the activations' dtype: the sums differ"
    else:
        assert torch.equal(out, scaled)


def stream_kernels_run(fn):
    """(fn's result, the template arguments <T, MB, EXACT, FINE, SUMS, CONFIG, NARROW> of every stream
    kernel it launched, as the profiler names them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, {tuple(a.strip() for a in m.group(1).split(",")) for e in prof.events()
                    for m in [re.search(r"awq_stream_kernel<([^>]*)>", e.name)] if m}


@pytest.mark.parametrize("kernel,dtype", [(Kernel.STREAM, torch.float16), (Kernel.STREAM, torch.bfloat16),
                                          (Kernel.STREAM_GROUP_SUMS, torch.float16),
                                          (Kernel.STREAM_COMPACT, torch.float16),
                                          (Kernel.STREAM_COMPACT_GROUP_SUMS, torch.bfloat16)],
                         ids=["fp16", "bf16", "sums-fp16", "compact-fp16", "compact-sums-bf16"])
@pytest.mark.parametrize("N,K,g", [STREAM_COMBOS[1], STREAM_COMBOS[2], STREAM_COMBOS[4], STREAM_COMBOS[6]],
                         ids=["N192", "N4096", "K11008", "g256"])
@pytest.mark.parametrize("M", [1, STREAM_NARROW_MAX_M, STREAM_NARROW_MAX_M + 1])
def test_stream_kernel_narrow(M, N, K, g, dtype, kernel, monkeypatch):
    """AWQLIB_STREAM_NARROW=1 (and unset): at M <= 8 the kernels that put the tokens on the mma's n8 side (half
    the mma) run -- the profiler names the instantiation -- correct against the fp32 reference and
    deterministic; in a pass of more than 8 rows it changes nothing.  (A tensor core may round the
    two tilings' sums differently, so they are not compared bit for bit below 9 rows.)"""
    skip_if_stream_does_not_fit(M, kernel)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    monkeypatch.setenv("AWQLIB_STREAM_NARROW", "0")
    wide = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)
    monkeypatch.setenv("AWQLIB_STREAM_NARROW", "1")
    poison_allocator()
    out, launched = stream_kernels_run(lambda: torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0))
    check(x, K, N, g, dtype, out=out)
    assert torch.equal(out, torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0))
    # which instantiation ran: NARROW is awq_stream_kernel's last template argument
    ran = {args[-1] for args in launched}
    assert ran == ({"true"} if M <= STREAM_NARROW_MAX_M else {"false"}), ran
    if M > STREAM_NARROW_MAX_M:
        assert torch.equal(out, wide)
    monkeypatch.delenv("AWQLIB_STREAM_NARROW")  # on by default: what the narrow setting runs
    assert torch.equal(out, torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0))


STREAM_DEEP_MAX_M = kernels.source_constant("kStreamDeepMaxM")  # the deep configuration's rows (not 17-32)
H100_SMEM = kernels.source_constant("kH100SmemPerBlock")  # what the deep configuration is sized to fit


def stream_configs_run(fn) -> set[str]:
    """The CONFIG template argument (csrc/awq_kernels.h: StreamConfig, 0 large, 1 compact, 2 deep, 3 wgmma, 4 wide) of
    every stream kernel ``fn`` launches."""
    return {args[5] for args in stream_kernels_run(fn)[1]}


@pytest.mark.parametrize("kernel,dtype", [(Kernel.STREAM, torch.float16), (Kernel.STREAM_GROUP_SUMS, torch.float16),
                                          (Kernel.STREAM, torch.bfloat16), (Kernel.AUTO, torch.float16)],
                         ids=["fp16", "sums-fp16", "bf16", "auto-fp16"])
@pytest.mark.parametrize("N,K,g", [STREAM_COMBOS[1], STREAM_COMBOS[2], STREAM_COMBOS[5]], ids=["N192", "N4096", "g32"])
@pytest.mark.parametrize("M", [1, M_TILE, M_TILE + 1, STREAM_DEEP_MAX_M, STREAM_DEEP_MAX_M + 1])
def test_stream_kernel_deep(M, N, K, g, dtype, kernel, monkeypatch):
    """AWQLIB_STREAM_DEEP=1: at M <= 16 and 33-64 on a GPU with an H100's shared memory per block
    the deep configuration (a fourth ring stage) runs -- the profiler names it -- and gives the
    large one's outputs bit for bit (the same partition and arithmetic); at 17-32 rows or past 64,
    or on a smaller GPU, the choice is what it is without the setting (at M 33-64 the automatic
    choice is dequantize + cuBLAS on these shapes, below FOUR_TILE_MIN_WEIGHTS: the next test has
    one above)."""
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)  # the device's own shared memory
    skip_if_stream_does_not_fit(M, Kernel.STREAM if kernel == Kernel.AUTO else kernel)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    monkeypatch.setenv("AWQLIB_STREAM_DEEP", "0")
    # a forced stream kernel runs the large configuration here (skip_if_stream_does_not_fit); what the
    # automatic choice runs (a stream kernel, or dequantize + cuBLAS) the profiler says
    plain_configs = (stream_configs_run(lambda: torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0))
                     if kernel == Kernel.AUTO else {"0"})
    plain = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)
    monkeypatch.setenv("AWQLIB_STREAM_DEEP", "1")
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)
    check(x, K, N, g, dtype, out=out)
    assert torch.equal(out, plain)
    deep_configs = stream_configs_run(lambda: torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0))
    deep_fits = torch.cuda.get_device_properties(0).shared_memory_per_block_optin >= H100_SMEM
    from benchmarks import gpu_sweep
    if gpu_sweep.deep_takes(M) and deep_fits and plain_configs == {"0"}:  # (none at 2 m-tiles)
        assert deep_configs == {"2"}, deep_configs
    else:
        assert deep_configs == plain_configs, (deep_configs, plain_configs)


STREAM_WIDE_MIN_M = kernels.source_constant("kStreamWideMinM")  # the wide configuration: M 17-64 per pass


@pytest.mark.parametrize("kernel,dtype", [(Kernel.STREAM, torch.float16), (Kernel.STREAM_GROUP_SUMS, torch.float16),
                                          (Kernel.STREAM, torch.bfloat16), (Kernel.AUTO, torch.float16)],
                         ids=["fp16", "sums-fp16", "bf16", "auto-fp16"])
@pytest.mark.parametrize("N,K,g", [STREAM_COMBOS[2], (320, 2176, 32)], ids=["N4096", "N320-tail-g32"])
@pytest.mark.parametrize("M", [STREAM_WIDE_MIN_M, 3 * M_TILE + 1, STREAM_MAX_M + M_TILE, 100])  # 80: a last pass of 16
def test_stream_kernel_wide(M, N, K, g, dtype, kernel, monkeypatch):
    """AWQLIB_STREAM_WIDE=1: where every pass has 17-64 rows the wide configuration (256-column
    slices) runs -- the profiler names it (CONFIG 4) -- with the reference's outputs, deterministic,
    under an A100's shared memory as under an H100's (where the large configuration at 17-32 rows
    does not fit one); elsewhere (16 rows, a last pass of 16, the automatic choice's dequantize +
    cuBLAS) the choice is what it is without the setting, bit for bit.  Its partition is its own (two
    k-warps, other split parts), so its outputs may differ from the large configuration's in their
    last bits."""
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)
    forced = Kernel.STREAM if kernel == Kernel.AUTO else kernel
    monkeypatch.setenv("AWQLIB_STREAM_WIDE", "1")
    skip_if_stream_does_not_fit(min(M, STREAM_MAX_M), forced)  # what the setting runs (a ~99 KB GPU: none)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)

    def run():
        return torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)

    monkeypatch.setenv("AWQLIB_STREAM_WIDE", "0")
    large_fits = stream_lacks_smem(min(M, STREAM_MAX_M), forced) is None  # (an A100 at 17-32 rows: not)
    plain = run() if large_fits else None
    dequantized = kernel == Kernel.AUTO and large_fits and stream_configs_run(run) == set()
    monkeypatch.setenv("AWQLIB_STREAM_WIDE", "1")
    poison_allocator()
    out = check(x, K, N, g, dtype, out=run())
    assert torch.equal(out, run())
    from benchmarks import gpu_sweep
    wide_takes = gpu_sweep.wide_takes(M) and not dequantized  # every pass 17-64 rows
    if wide_takes:
        assert stream_configs_run(run) == {"4"}
    else:
        assert plain is not None and torch.equal(out, plain)
    monkeypatch.setenv("AWQLIB_STREAM_SMEM_LIMIT", str(kernels.source_constant("kA100SmemPerBlock")))
    if wide_takes:  # it fits an A100's 163 KB too
        assert torch.equal(run(), out) and stream_configs_run(run) == {"4"}


def stream_grids_launched(fn, tmp_path) -> list[int]:
    """The grid (CTAs) of every stream kernel ``fn`` launches, from the profiler's trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    grids = [e["args"]["grid"][0] for e in events
             if "awq_stream_kernel" in e.get("name", "") and "grid" in e.get("args", {})]
    assert grids, "the profiler's trace names no stream kernel launch with its grid"
    return grids


@pytest.mark.parametrize("kernel", [Kernel.STREAM, Kernel.STREAM_GROUP_SUMS, Kernel.AUTO])
@pytest.mark.parametrize("M", [1, M_TILE])
def test_stream_grid_cap(M, kernel, tmp_path):
    """awq_gemm_variant's `splits` caps a stream kernel's persistent grid (gpu_sweep's grid cases):
    the grid launched is plan_stream's for that many CTAs (4096x4096: 256 units; 1, 7, 43 or 128
    CTAs), correct and deterministic at each; 0 and caps past the SMs launch one CTA per SM's grid.
    The partition differs, so the sums may differ in their last bits between caps."""
    skip_if_stream_does_not_fit(M)
    K, N, g = 4096, 4096, 128
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    units = (N // 128) * (K // 512)

    def grid_for(cap):  # plan_stream: no empty CTAs
        per = -(-units // min(units, cap))
        return -(-units // per)

    def run(cap):
        return torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), cap)

    full = run(0)
    assert stream_grids_launched(lambda: run(0), tmp_path) == [grid_for(sms)]
    assert torch.equal(full, run(65535))
    assert stream_grids_launched(lambda: run(65535), tmp_path) == [grid_for(sms)]
    for cap in (1, 7, 48):
        poison_allocator()
        out = check(x, K, N, g, torch.float16, out=run(cap))
        assert torch.equal(out, run(cap)), cap
        assert stream_grids_launched(lambda: run(cap), tmp_path) == [grid_for(cap)], cap


@pytest.mark.parametrize("M", [2 * M_TILE + 1, STREAM_DEEP_MAX_M])
def test_stream_kernel_deep_in_the_automatic_choice_at_four_m_tiles(M, monkeypatch):
    """At 33-64 tokens the automatic choice runs the four-m-tile stream kernel on weights of
    FOUR_TILE_MIN_WEIGHTS elements or more; AWQLIB_STREAM_DEEP=1 makes it the deep configuration there
    (where it fits), with the same bits."""
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)
    skip_if_stream_does_not_fit(M)
    side = int(FOUR_TILE_MIN_WEIGHTS ** 0.5)  # 8192 x 8192: the smallest square weight the rule takes
    N = K = side
    qs, zs, ss = stream_weight(K, N, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("AWQLIB_STREAM_DEEP", "0")
    plain_configs = stream_configs_run(lambda: torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128))
    plain = torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128)
    assert plain_configs == {"0"}, plain_configs
    monkeypatch.setenv("AWQLIB_STREAM_DEEP", "1")
    out = check(x, K, N, 128, torch.float16, out=torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128))
    assert torch.equal(out, plain)
    deep_fits = torch.cuda.get_device_properties(0).shared_memory_per_block_optin >= H100_SMEM
    configs = stream_configs_run(lambda: torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128))
    assert configs == ({"2"} if deep_fits else {"0"}), configs


def needs_wgmma():
    """Skip where the wgmma configuration cannot run: off an sm_90 GPU, or with a toolkit before CUDA 12.
    On an H100/H200 with CUDA 12+ the kernels this process loaded must have it (9.0a is what a build
    for that GPU targets): a test that skips there would hide the configuration's coverage."""
    from awqlib import toolchain
    if kernels.wgmma_available():
        return
    default = toolchain.arch_list_for(None, [torch.cuda.get_device_capability()], torch.version.cuda)
    if toolchain.has_wgmma(default):  # what a build for this GPU with this toolkit targets
        pytest.fail(f"the CUDA kernels in this process ({kernels.backend()}) have no wgmma kernels for this GPU: "
                    f"rebuild them for it ({default}, its default; check TORCH_CUDA_ARCH_LIST) to test the wgmma "
                    "configuration")
    pytest.skip("the wgmma configuration needs kernels built for 9.0a on an sm_90 GPU (CUDA 12+)")


# (N, K, group): tails (N % 128, K % 256) with groups of 64 rows (FINE: four per 256-row stage), a
# full shape, a K tail (2752) with groups of 64, groups of 32 on long K, 256-row groups, one group (-1: K)
WGMMA_COMBOS = [STREAM_COMBOS[1], STREAM_COMBOS[2], STREAM_COMBOS[3], STREAM_COMBOS[5], STREAM_COMBOS[-3],
                STREAM_COMBOS[-1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,g", WGMMA_COMBOS, ids=[f"N{n}-K{k}-g{g}" for n, k, g in WGMMA_COMBOS])
@pytest.mark.parametrize("M", [1, 7, M_TILE, M_TILE + 1, 2 * M_TILE, 2 * M_TILE + 1, STREAM_MAX_M, STREAM_MAX_M + 1,
                               STREAM_MAX_M + 36, STREAM_WGMMA_MAX_M, STREAM_WGMMA_MAX_M + 36])
def test_stream_kernel_wgmma(M, N, K, g, dtype, monkeypatch):
    """AWQLIB_STREAM_WGMMA=1: the warpgroup-mma configuration (dequantized weights as wgmma's A in
    registers, the tokens as its N from 128-byte-swizzled shared memory) runs every pass -- the
    profiler names CONFIG 3 -- and is correct against the fp32 reference at each m-tile count (wgmma
    N 16, 32, 64, 128; past 128 tokens in two passes), with tails, every group regime and both
    dtypes, and deterministic; without the setting the large configuration runs."""
    needs_wgmma()
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)
    monkeypatch.delenv("AWQLIB_STREAM_DEEP", raising=False)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)

    def run():
        return torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0)

    monkeypatch.setenv("AWQLIB_STREAM_WGMMA", "1")
    poison_allocator()
    out, launched = stream_kernels_run(run)
    check(x, K, N, g, dtype, out=out)
    assert {args[5] for args in launched} == {"3"}, launched
    assert torch.equal(out, run())
    monkeypatch.setenv("AWQLIB_STREAM_WGMMA", "0")
    assert stream_configs_run(run) == {"0"}


def test_stream_kernel_wgmma_takes_what_only_it_can(monkeypatch):
    """Groups of 384 rows at 100 tokens: the large configuration (passes of 64 in 256-row stages)
    does not take them, the wgmma one (one pass in 128-row stages) does -- and runs, rather than the
    call being refused for the large one's sake."""
    needs_wgmma()
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)
    M, N, K, g = 100, 256, 3072, 384
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)

    def run():
        return torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0)

    monkeypatch.setenv("AWQLIB_STREAM_WGMMA", "1")
    out, launched = stream_kernels_run(run)
    check(x, K, N, g, torch.float16, out=out)
    assert {args[5] for args in launched} == {"3"}, launched
    monkeypatch.setenv("AWQLIB_STREAM_WGMMA", "0")
    with pytest.raises(RuntimeError, match="does not take"):
        run()


COMPACT_COMBOS = COMBOS[:3] + COMBOS[4:] + STREAM_COMBOS[-3:]  # (14336, 4096, 32): full tiles, group 32 (FINE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,g", COMPACT_COMBOS, ids=[f"N{n}-K{k}-g{g}" for n, k, g in COMPACT_COMBOS])
@pytest.mark.parametrize("M", [1, 2, 7, M_TILE, M_TILE + 1, 24, STREAM_COMPACT_MAX_M])
def test_stream_kernel_compact(M, N, K, g, dtype):
    """The compact configuration (k-tile 256; two stages at M 17-32), what an A100 runs at M 17-32
    and a ~100 KB GPU at M <= 32: correct, deterministic, and what the automatic choice runs where
    the large configuration does not fit.  Its group sums (M <= 16, groups >= 64 rows) likewise."""
    skip_if_stream_does_not_fit(M, Kernel.STREAM_COMPACT)
    qs, zs, ss = stream_weight(K, N, g, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM_COMPACT), 0)
    check(x, K, N, g, dtype, out=out)
    assert torch.equal(out, torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM_COMPACT), 0))
    if stream_lacks_smem(M) is not None:  # the large one does not fit here: AUTO is the compact one, with sums
        auto = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(auto_stream_kernel(M, N, K, compact=True)), 0)
        assert torch.equal(torch.ops.awqlib.awq_gemm(x, qs, zs, ss, g), auto)
    sums = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM_COMPACT_GROUP_SUMS), 0)
    check(x, K, N, g, dtype, out=sums)
    if M <= M_TILE and (K if g == -1 else g) >= 64:
        assert not torch.equal(sums, out), "group sums round no weight to the activations' dtype"
    else:
        assert torch.equal(sums, out)


@pytest.mark.parametrize("kernel,M,wgmma", [(Kernel.STREAM, 1, False), (Kernel.STREAM, 48, False),
                                            (Kernel.STREAM, 100, False), (Kernel.STREAM_GROUP_SUMS, 7, False),
                                            (Kernel.STREAM_COMPACT, 20, False), (Kernel.STREAM, 1, True),
                                            (Kernel.STREAM, 48, True), (Kernel.STREAM, 100, True),
                                            (Kernel.STREAM, 164, True)],
                         ids=["M1", "M48", "M100", "sums-M7", "compact-M20", "wgmma-M1", "wgmma-M48", "wgmma-M100",
                              "wgmma-M164"])
def test_stream_pdl_reads_what_the_previous_kernel_wrote(kernel, M, wgmma, monkeypatch):
    """With AWQLIB_STREAM_PDL=1 (programmatic dependent launch) the stream kernel streams its first
    weights in before the previous kernel in the stream has finished.  It must still read the
    activations that kernel writes (an elementwise kernel, or the stream kernel before it: the
    chain x -> y -> z), share counters and workspace with the launch before it, and give the
    plain launches' outputs bit for bit, eagerly and replayed from a CUDA graph.  The wgmma
    configuration (AWQLIB_STREAM_WGMMA=1) likewise, on a long K (28672: every slice split over
    several CTAs, so the last arrivers' reduction runs in each launch)."""
    if wgmma:
        needs_wgmma()
        monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)
    monkeypatch.setenv("AWQLIB_STREAM_WGMMA", "1" if wgmma else "0")
    monkeypatch.delenv("AWQLIB_STREAM_DEEP", raising=False)
    skip_if_stream_does_not_fit(min(M, STREAM_MAX_M), kernel)
    K, N = (28672, 1024) if wgmma else (2048, 2048)
    qs, zs, ss = stream_weight(K, N, 128)
    square = stream_weight(N, N, 128)  # z = y W2: activations the previous stream kernel wrote

    def chain(x):
        a = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(kernel), 0)
        x.neg_()
        b = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(kernel), 0)
        c = torch.ops.awqlib.awq_gemm_variant(b, *square, 128, int(kernel), 0)
        return a, b, c

    x0 = torch.randn(M, K, device="cuda", dtype=torch.float16) * 0.1
    monkeypatch.delenv("AWQLIB_STREAM_PDL", raising=False)
    plain = chain(x0.clone())
    check(x0, K, N, 128, torch.float16, out=plain[0])
    check(-x0, K, N, 128, torch.float16, out=plain[1])
    check(plain[1], N, N, 128, torch.float16, out=plain[2])
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")
    poison_allocator()
    for got, want in zip(chain(x0.clone()), plain):
        assert torch.equal(got, want)
    if wgmma:  # what ran: the wgmma configuration, every launch of the chain (CONFIG 3)
        assert stream_configs_run(lambda: chain(x0.clone())) == {"3"}
    xg = x0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture
        chain(xg.clone())
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(xg)
    xg.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("M", [1, 8, 16])
def test_stream_pdl_after_the_block_ops(M, monkeypatch):
    """The block ops let the next kernel launch as soon as their CTAs are resident
    (allow_dependent_launch), so under AWQLIB_STREAM_PDL=1 the gate/up GEMM streams weights in while
    rms_norm still runs, and the down GEMM while gated_act does.  Each must still read what the
    block op wrote: the MLP's outputs equal the plain launches' bit for bit, eagerly and replayed
    from a CUDA graph (where nothing else sits between the block op and the GEMM)."""
    from awqlib import blockops
    for name in ("AWQLIB_STREAM_WGMMA", "AWQLIB_STREAM_DEEP", "AWQLIB_STREAM_SMEM_LIMIT"):
        monkeypatch.delenv(name, raising=False)
    K, inter = 2048, 2048
    gate_up, down = stream_weight(K, 2 * inter, 128), stream_weight(inter, K, 128)
    w = torch.randn(K, device="cuda", dtype=torch.float16) * 0.5 + 1

    def mlp(x):
        h = blockops.rms_norm(x, w, 1e-6)
        gate, up = torch.ops.awqlib.awq_gemm(h, *gate_up, 128).chunk(2, dim=-1)
        return torch.ops.awqlib.awq_gemm(blockops.gated_act(gate, up, "silu"), *down, 128)

    x0 = torch.randn(M, K, device="cuda", dtype=torch.float16)
    assert "stream" in gemm_kernel_name(x0, *gate_up, 128)
    monkeypatch.delenv("AWQLIB_STREAM_PDL", raising=False)
    plain = mlp(x0)
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")
    poison_allocator()
    assert torch.equal(mlp(x0), plain)
    xg = x0.clone()
    graph, out = capture(lambda: mlp(xg))
    for _ in range(3):
        xg.copy_(torch.randn_like(xg))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.delenv("AWQLIB_STREAM_PDL")
        assert torch.equal(out, mlp(xg))
        monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")


# sharedMemPerBlockOptin of an A100 and of an sm_86/89 GPU, as awq_stream.cu sizes its configurations for
A100_SMEM, SM89_SMEM = kernels.source_constant("kA100SmemPerBlock"), kernels.source_constant("kSm89SmemPerBlock")


@pytest.mark.parametrize("K,g", [(4096, 64), (4096, 128), (4096, 256), (3072, 768), (1536, 512), (4096, 4096),
                                 (3840, 192), (2304, 96), (1152, 384)])
def test_stream_serves_decode_names_what_the_kernel_takes(K, g):
    """packing.stream_serves_decode (which decides a module's runtime layout) says yes exactly where
    the stream kernel takes one token in either configuration: a no keeps the tiled layout."""
    from awqlib.packing import stream_serves_decode
    N = 128
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)

    def runs(kernel):
        try:
            torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)
            return True
        except RuntimeError as e:
            if "does not take" in str(e):  # the shape refused
                return False
            if "bytes of shared memory per block" in str(e):  # the shape taken, no room for it on this GPU
                return True
            raise

    assert stream_serves_decode(K, N, g) == (runs(Kernel.STREAM) or runs(Kernel.STREAM_COMPACT))


@pytest.mark.parametrize("limit,M,K,N,expected,large_fits", [
    (A100_SMEM, 1, 4096, 1024, Kernel.STREAM_GROUP_SUMS, True),
    (A100_SMEM, 20, 4096, 1024, Kernel.STREAM_COMPACT_GROUP_SUMS, False),
    (A100_SMEM, 40, 8192, 8192, Kernel.STREAM_GROUP_SUMS, True),   # 2^26 weights: four m-tiles pay
    (A100_SMEM, 40, 8192, 8128, Kernel.DEQUANT_CUBLAS, True),      # just fewer: dequantize + cuBLAS
    (A100_SMEM, 40, 4096, 1024, Kernel.DEQUANT_CUBLAS, True),
    (SM89_SMEM, 1, 4096, 1024, Kernel.STREAM_COMPACT_GROUP_SUMS, False),
    (SM89_SMEM, 20, 4096, 1024, Kernel.STREAM_COMPACT_GROUP_SUMS, False),
    (SM89_SMEM, 40, 8192, 8192, Kernel.DEQUANT_CUBLAS, False),
], ids=["A100-M1", "A100-M20", "A100-M40", "A100-M40-below", "A100-M40-small", "sm89-M1", "sm89-M20", "sm89-M40"])
def test_stream_auto_choice_per_gpu_class(limit, M, K, N, expected, large_fits, monkeypatch):
    """What an A100 and a 99 KB GPU run, checked on whatever GPU this is (AWQLIB_STREAM_SMEM_LIMIT
    caps the shared memory the kernels may use): the automatic choice is that kernel, bit for bit,
    and correct; the large configuration is refused where it does not fit, naming its bytes."""
    if torch.cuda.get_device_properties(0).shared_memory_per_block_optin < limit:
        pytest.skip("this GPU has less shared memory per block than the class checked")
    monkeypatch.setenv("AWQLIB_STREAM_SMEM_LIMIT", str(limit))
    g = 128
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    auto = check(x, K, N, g, torch.float16, out=torch.ops.awqlib.awq_gemm(x, qs, zs, ss, g))
    assert torch.equal(auto, torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(expected), 0))
    if large_fits:
        check(x, K, N, g, torch.float16, out=torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0))
    else:
        with pytest.raises(RuntimeError, match=rf"bytes of shared memory per block \(the device has {limit}\)"):
            torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.STREAM), 0)


@pytest.mark.parametrize("name,value,message", [
    ("AWQLIB_STREAM_SMEM_LIMIT", "160KB", "AWQLIB_STREAM_SMEM_LIMIT must be a positive number of bytes"),
    ("AWQLIB_STREAM_PDL", "yes", "AWQLIB_STREAM_PDL must be 0 or 1"),
    ("AWQLIB_STREAM_NARROW", "on", "AWQLIB_STREAM_NARROW must be 0 or 1"),
    ("AWQLIB_STREAM_DEEP", "true", "AWQLIB_STREAM_DEEP must be 0 or 1"),
    ("AWQLIB_STREAM_WGMMA", "yes", "AWQLIB_STREAM_WGMMA must be 0 or 1"),
    ("AWQLIB_STREAM_WIDE", "2", "AWQLIB_STREAM_WIDE must be 0 or 1"),
])
def test_stream_settings_are_strict(name, value, message, monkeypatch):
    qs, zs, ss = stream_weight(512, 128, 128)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(Kernel.STREAM), 0)


@pytest.mark.parametrize("name,value,message", [
    ("AWQLIB_STREAM_SMEM_LIMIT", "0", "AWQLIB_STREAM_SMEM_LIMIT must be a positive number of bytes"),
    ("AWQLIB_STREAM_DEEP", "true", "AWQLIB_STREAM_DEEP must be 0 or 1"),
    ("AWQLIB_STREAM_WGMMA", "yes", "AWQLIB_STREAM_WGMMA must be 0 or 1"),
    ("AWQLIB_STREAM_WIDE", "yes", "AWQLIB_STREAM_WIDE must be 0 or 1"),
])
def test_stream_choice_settings_are_strict_on_every_stream_call(name, value, message, monkeypatch):
    """The settings the choice of configuration reads are checked on every stream-layout call, also
    one the automatic choice sends to dequantize + cuBLAS (awq_dispatch.h reads them for the stream
    layout only: a GEMM-layout call neither reads nor refuses them)."""
    qs, zs, ss = stream_weight(512, 128, 128)
    qweight, qzeros, scales, _ = weight(512, 128, 128)
    x = torch.randn(100, 512, device="cuda", dtype=torch.float16)
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128)
    check(x, 512, 128, 128, torch.float16, out=torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, 128))


def test_kernel_name_reads_the_settings_its_call_reads(monkeypatch):
    """ops.gemm_kernel_name refuses an invalid setting exactly where the call it names would: the
    narrow setting only when a stream kernel is named."""
    qweight, qzeros, scales, _ = weight(512, 128, 128)
    qs, zs, ss = stream_weight(512, 128, 128)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("AWQLIB_STREAM_NARROW", "on")
    assert gemm_kernel_name(x, qweight, qzeros, scales, 128).startswith("awq_")  # GEMM layout: not read
    for run in (lambda: gemm_kernel_name(x, qs, zs, ss, 128), lambda: torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128)):
        with pytest.raises(RuntimeError, match="AWQLIB_STREAM_NARROW must be 0 or 1"):
            run()


@pytest.mark.parametrize("M", [1, M_TILE, 2 * M_TILE + 1, STREAM_MAX_M])
def test_stream_kernel_deterministic(M):
    skip_if_stream_does_not_fit(M)
    qs, zs, ss = stream_weight(28672, 1024, 128)  # long K: every slice split over several CTAs
    x = torch.randn(M, 28672, device="cuda", dtype=torch.float16)
    a = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(Kernel.STREAM), 0)
    poison_allocator()
    b = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 128, int(Kernel.STREAM), 0)
    assert torch.equal(a, b)
    check(x, 28672, 1024, 128, torch.float16, out=a)


@pytest.mark.parametrize("M", [1, 100])  # the stream kernel; the stream-layout dequantize + cuBLAS
def test_stream_layout_large_m_and_graph(M):
    qs, zs, ss = stream_weight(4096, 4096, 128)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 128)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(x, 4096, 4096, 128, torch.float16, out=out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,g", [(192, 576, 64), (4096, 4096, 128), (256, 768, -1)])
def test_dequantize_stream_bit_exact(N, K, g, dtype):
    """The stream-layout dequantize (the stream kernel's own arithmetic) equals the reference bit for bit."""
    qs, zs, ss = stream_weight(K, N, g, dtype)
    poison_allocator()
    out = torch.ops.awqlib.awq_dequantize(qs, zs, ss, g)
    qweight, qzeros, scales, _ = weight(K, N, g)
    assert torch.equal(out, dequantize_gemm(qweight, qzeros, scales.to(dtype), g))


def test_stream_refuses_other_layouts_and_kernels():
    qs, zs, ss = stream_weight(576, 192, 64)
    qweight, qzeros, scales, _ = weight(576, 192, 64)
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="stream-layout weight"):
        torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 64, int(Kernel.SKINNY), 0)
    with pytest.raises(RuntimeError, match="needs the stream layout"):
        torch.ops.awqlib.awq_gemm_variant(x, qweight, qzeros, scales, 64, int(Kernel.STREAM), 0)
    # group 96 < the 512-row k-tile and not a power of two: no configuration takes it, AUTO falls back
    qs, zs, ss = stream_weight(576, 192, 96)
    with pytest.raises(RuntimeError, match="runs passes of at most 64 rows"):
        torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, 96, int(Kernel.STREAM), 0)
    check(x, 576, 192, 96, torch.float16, out=torch.ops.awqlib.awq_gemm(x, qs, zs, ss, 96))
    # the same refusals from the op that names the kernel instead of running it
    with pytest.raises(RuntimeError, match="runs passes of at most 64 rows"):
        gemm_kernel_name(x, qs, zs, ss, 96, Kernel.STREAM)
    with pytest.raises(RuntimeError, match="needs the stream layout"):
        gemm_kernel_name(x, qweight, qzeros, scales, 64, Kernel.STREAM)
    assert gemm_kernel_name(x, qs, zs, ss, 96) == "dequant+cuBLAS"


def test_kernel_names_are_what_the_sweep_predicts(monkeypatch):
    """ops.gemm_kernel_name on this GPU, under each gpu_sweep variant's settings, names the kernel
    gpu_sweep.kernel_label predicts (on an H100/H200, the GPU class the prediction assumes) and one
    with a SASS budget row; the tiled layout's skinny kernel too."""
    from benchmarks import gpu_sweep
    monkeypatch.delenv("AWQLIB_STREAM_SMEM_LIMIT", raising=False)  # the device's own shared memory
    if torch.cuda.get_device_properties(0).shared_memory_per_block_optin < gpu_sweep.DEEP_SMEM_MIN:
        pytest.skip("the sweep's predictions are for an H100/H200's shared memory")
    sass = gpu_sweep.sass_table()
    N, K, g = 4096, 4096, 128
    weights = {layout: gpu_sweep.make_weight(K, N, g, layout)[1] for layout in ("stream", "tiled")}
    for M in (1, 8, 9, 17, 40, 64, 100, 129):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        for label, layout, kernel in gpu_sweep.VARIANTS:
            if label == "stream:wgmma" and not kernels.wgmma_available():
                continue
            with gpu_sweep.variant_env(label):
                ran = gpu_sweep.kernel_ran(x, weights[layout], g, kernel)
            assert ran == gpu_sweep.kernel_label(label, M, N, K), (label, M)
            assert ran == "dequant+cuBLAS" or ran in sass, (label, M, ran)


@pytest.mark.parametrize("kernel,M", [(Kernel.STREAM, 65), (Kernel.STREAM, 100), (Kernel.STREAM, 128),
                                      (Kernel.STREAM, 200), (Kernel.STREAM_COMPACT, 33), (Kernel.STREAM_COMPACT, 80),
                                      (Kernel.STREAM_GROUP_SUMS, 90)])
def test_stream_kernel_in_passes(kernel, M):
    """Past one pass (64 rows; compact 32) the stream kernel runs passes, one launch each, sharing
    the workspace and the counters: every pass equals that pass run alone, bit for bit, and the
    automatic choice stays dequantize + cuBLAS there (2 and 4 passes at best tied it on an H200)."""
    pass_rows = STREAM_COMPACT_MAX_M if kernel in (Kernel.STREAM_COMPACT, Kernel.STREAM_COMPACT_GROUP_SUMS) else STREAM_MAX_M
    for rows in {pass_rows, M % pass_rows or pass_rows}:
        skip_if_stream_does_not_fit(rows, kernel)
    K, N, g = 4096, 1024, 128
    qs, zs, ss = stream_weight(K, N, g)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    poison_allocator()
    out = torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(kernel), 0)
    check(x, K, N, g, torch.float16, out=out)
    for r0 in range(0, M, pass_rows):
        alone = torch.ops.awqlib.awq_gemm_variant(x[r0:r0 + pass_rows].contiguous(), qs, zs, ss, g, int(kernel), 0)
        assert torch.equal(out[r0:r0 + pass_rows], alone), f"pass at row {r0}"
    if M > STREAM_MAX_M:
        auto = torch.ops.awqlib.awq_gemm(x, qs, zs, ss, g)
        assert torch.equal(auto, torch.ops.awqlib.awq_gemm_variant(x, qs, zs, ss, g, int(Kernel.DEQUANT_CUBLAS), 0))


# --- serving: concurrent graphs, bounded temporaries ---------------------------------------------

@pytest.mark.parametrize("layout", ["gemm", "tiled", "stream"])
def test_two_graphs_replayed_concurrently_on_two_streams(layout):
    """Two CUDA graphs, each holding split-K launches, replayed at the same time on two streams:
    their arrival counters must not be shared (each capture gets its own), or the outputs would be
    wrong or unwritten."""
    from awqlib.packing import to_layout
    N, K, g = 4096, 4096, 128
    qweight, qzeros, scales, _ = weight(K, N, g)
    qw, qz, sc = to_layout(layout, qweight, qzeros, scales)
    xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for M in (1, 8)]
    graphs, outs = [], []
    for x in xs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append([torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g) for _ in range(8)])
        graphs.append(graph)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for x in xs:
            x.copy_(torch.randn_like(x))
        torch.cuda.synchronize()
        for graph, stream in zip(graphs, streams):
            with torch.cuda.stream(stream):
                graph.replay()
        torch.cuda.synchronize()
        for x, out in zip(xs, outs):
            for o in out:
                check(x, K, N, g, torch.float16, out=o)


# an elementwise add kernel as cudaGraphDebugDotPrint names it (ATen's add functor)
_ADD_KERNEL = re.compile(r"CUDAFunctor_add|AddFunctor", re.IGNORECASE)


@pytest.mark.parametrize("layout", ["gemm", "tiled", "stream"])
@pytest.mark.parametrize("M", [1, 16, 100])  # decode (narrow), one m-tile, dequantize + cuBLAS
def test_stream_gemm_add_is_the_gemm_plus_the_residual(layout, M, monkeypatch, tmp_path):
    """awq_gemm_add (a layer's residual add after its last linear): bit for bit residual + awq_gemm,
    eagerly, with programmatic dependent launch, and replayed from a CUDA graph -- in which the stream
    kernel's launches hold no add kernel (its epilogue adds), where the other paths' do; bf16 and
    non-contiguous residuals alike; a residual of another dtype or shape gets torch's promotion and
    broadcasting."""
    from awqlib.packing import to_layout
    N, K, g = 4096, 4096, 128
    qw, qz, sc = to_layout(layout, *weight(K, N, g)[:3])
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    r = torch.randn(M, N, device="cuda", dtype=torch.float16) * 4
    want = r + torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)
    poison_allocator()
    assert torch.equal(torch.ops.awqlib.awq_gemm_add(x, qw, qz, sc, g, r), want)
    monkeypatch.setenv("AWQLIB_STREAM_PDL", "1")
    assert torch.equal(torch.ops.awqlib.awq_gemm_add(x, qw, qz, sc, g, r), want)
    monkeypatch.delenv("AWQLIB_STREAM_PDL")
    graph, out, dot = _captured_dot(lambda: torch.ops.awqlib.awq_gemm_add(x, qw, qz, sc, g, r), tmp_path, "add")
    epilogue = "stream" in gemm_kernel_name(x, qw, qz, sc, g)
    assert epilogue == (layout == "stream" and M <= 16)
    assert bool(_ADD_KERNEL.search(dot)) != epilogue, dot[:3000]
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, r + torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g))
    xb, rb = x.bfloat16(), torch.randn(N, M, device="cuda", dtype=torch.bfloat16).t()  # a transposed residual
    assert torch.equal(torch.ops.awqlib.awq_gemm_add(xb, qw, qz, sc, g, rb), rb + torch.ops.awqlib.awq_gemm(xb, qw, qz, sc, g))
    for other in (r.float(), r[:1], r[:, :1]):
        got = torch.ops.awqlib.awq_gemm_add(x, qw, qz, sc, g, other)
        assert got.dtype == other.dtype and torch.equal(got, other + torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g))


# A captured graph's nodes as cudaGraphDebugDotPrint writes them (torch's debug_dump): a memset
# node's label says MEMSET, an at::zeros fill kernel's name holds FillFunctor.
_ZEROING = re.compile(r"MEMSET|FillFunctor", re.IGNORECASE)


def _captured_dot(fn, tmp_path, name: str) -> tuple[torch.cuda.CUDAGraph, object, str]:
    """fn() captured (debug mode, so the graph can be printed): the graph, fn's result, the DOT text."""
    graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    with torch.cuda.graph(graph):
        result = fn()
    path = tmp_path / f"{name}.dot"
    graph.debug_dump(str(path))
    return graph, result, path.read_text()


def _stream_weight(K: int, N: int, g: int):
    from awqlib.packing import to_layout
    return to_layout("stream", *weight(K, N, g)[:3])


@pytest.mark.parametrize("layout", ["tiled", "stream"])
def test_captured_split_k_launches_hold_no_memset(layout, tmp_path):
    """Split-K launches captured after one launch outside capture take their counters from the
    device's arena (csrc/awq_counters.h): the graph holds their kernels and no memset or fill for
    their counters, and replayed again and again (the counters left zero by each launch's last
    arrivers) it stays right."""
    from awqlib.packing import to_layout
    N, K, g = 4096, 4096, 128
    qw, qz, sc = to_layout(layout, *weight(K, N, g)[:3])
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)  # a launch outside capture: the arena exists
    torch.cuda.synchronize()
    name = gemm_kernel_name(x, qw, qz, sc, g)
    assert "stream" in name if layout == "stream" else "skinny" in name, name
    graph, outs, dot = _captured_dot(lambda: [torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g) for _ in range(4)],
                                     tmp_path, layout)
    kernel = re.escape(name.split("<")[0])
    assert len(re.findall(kernel, dot)) >= 4, dot[:3000]  # the DOT names the kernels it holds
    assert not _ZEROING.search(dot), _ZEROING.search(dot).group(0)
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for o in outs:
            check(x, K, N, g, torch.float16, out=o)


def test_capture_before_any_eager_launch_zeroes_per_call():
    """In a process whose first awq_gemm call on the device is inside a capture (no arena can be
    made there), each captured split-K launch gets its own counters and a captured zeroing: the DOT
    shows them (so the check above can see one), the replays are right, and a warning says why."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import re, sys, tempfile, torch
        from awqlib import kernels
        from awqlib.packing import to_layout
        sys.path.insert(0, sys.argv[1])
        import test_kernels_cuda as t
        assert kernels.load()
        N, K, g = 4096, 4096, 128
        qw, qz, sc = to_layout("stream", *t.weight(K, N, g)[:3])
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            import pathlib
            graph, outs, dot = t._captured_dot(lambda: [torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g) for _ in range(3)],
                                               pathlib.Path(d), "first")
        assert len(t._ZEROING.findall(dot)) >= 3, dot[:3000]
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            for o in outs:
                t.check(x, K, N, g, torch.float16, out=o)
        print("ok")
    """)
    from pathlib import Path
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-c", code, str(here)], cwd=here.parent, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
    assert "warm up eagerly first" in r.stderr, r.stderr[-2000:]  # said once, with the reason


def test_graphs_sharing_a_pool_keep_their_counters():
    """Graphs captured into one memory pool (as serving engines capture one graph per batch size)
    and replayed in turns: each capture's counters are its own arena slice, which no allocation of
    another capture reuses, so every replay is right."""
    N, K, g = 4096, 4096, 128
    qw, qz, sc = _stream_weight(K, N, g)
    pool = torch.cuda.graph_pool_handle()
    xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for M in (1, 4, 16)]
    for x in xs:
        torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for x in xs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            h = torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)
            outs.append([h, torch.ops.awqlib.awq_gemm(x, qw, qz, sc, g)])
        graphs.append(graph)
    for _ in range(4):
        for graph, x, out in zip(graphs, xs, outs):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            for o in out:
                check(x, K, N, g, torch.float16, out=o)


@pytest.mark.parametrize("layout", ["gemm", "tiled", "stream"])
def test_large_m_dequant_is_chunked(layout):
    """A weight whose dense copy exceeds the 256 MB budget (8192 x 32768 fp16 = 512 MB) is
    dequantized and multiplied in column chunks: correct, and the call's temporaries stay under
    the budget (plus the output)."""
    from awqlib.packing import to_layout
    N, K, g, M = 32768, 8192, 128, 100
    qw, qz, sc = to_layout(layout, *weight(K, N, g)[:3])
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    x[:, :64] @ torch.zeros(64, 64, device="cuda", dtype=torch.float16)  # cuBLAS workspace exists before measuring
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = torch.ops.awqlib.awq_gemm_variant(x, qw, qz, sc, g, int(Kernel.DEQUANT_CUBLAS), 0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= (256 << 20) + 2 * M * N * 2, f"peak temporary {peak / 2**20:.0f} MB: not chunked"
    check(x, K, N, g, torch.float16, out=out)


# ------------------------------------------------------------------ block ops (csrc/awq_block_ops.cu)
# Each CUDA op against the reference (awqlib/blockops.py) run on CPU copies of its inputs
# (tests/block_op_checks.py says how close): rotary bit for bit (every product and sum is one
# correctly rounded fp32 operation, then rounded to the dtype, as torch's tensor ops round);
# rms_norm and gated_act within the reference's roundings of an fp32 value that may differ in its
# last bits (sum of squares and rsqrtf; expf and tanhf), at most one dtype ulp at the rounding
# after it, and bit for bit for at least 99% of fp16/bf16 outputs.  Names contain "block_op": the
# GPU window selects them with -k (scripts/gpu_window.sh).

from awqlib import blockops  # noqa: E402
from block_op_checks import check_gated_act, check_rms_norm, check_rotary, rotary_id  # noqa: E402

BLOCK_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
NORM_WARP_MAX = kernels.source_constant("kNormWarpMaxHidden")  # up to here a row is one warp's, then one CTA's
NORM_HIDDEN = sorted({64, 128, 256, NORM_WARP_MAX, NORM_WARP_MAX + 8, 2048, 2048 + 3, 4096, 5120})
ROWS = [(1,), (4, 37)]  # decode, prefill
EPS = 1e-6


def cuda_randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view starting one element into a buffer: not 16-byte aligned (scalar path)."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=["decode", "prefill"])
@pytest.mark.parametrize("hidden", NORM_HIDDEN)
def test_block_op_rms_norm(hidden, rows, dtype):
    x = cuda_randn(*rows, hidden, dtype=dtype, scale=3.0)
    w = cuda_randn(hidden, dtype=dtype)
    poison_allocator()
    check_rms_norm(blockops.rms_norm(x, w, EPS), x, w, EPS, what=f"llama rms_norm {rows} x {hidden} {dtype}")
    w_gemma = cuda_randn(hidden, dtype=dtype, scale=0.3)  # Gemma stores w - 1
    poison_allocator()
    out = blockops.rms_norm(x, w_gemma, EPS, weight_offset=1.0, scale_in_fp32=True)
    check_rms_norm(out, x, w_gemma, EPS, 1.0, True, what=f"gemma rms_norm {rows} x {hidden} {dtype}")


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=["decode", "prefill"])
@pytest.mark.parametrize("hidden", NORM_HIDDEN)
def test_block_op_add_rms_norm(hidden, rows, dtype):
    """add_rms_norm (the residual add before a block's second norm, in the norm's kernel): the sum is
    torch's residual + x bit for bit, the norm rms_norm's of that sum; strided and misaligned
    inputs take the same kernel or the reference, with the same answer."""
    x = cuda_randn(*rows, hidden, dtype=dtype, scale=3.0)
    residual = cuda_randn(*rows, hidden, dtype=dtype, scale=3.0)
    w = cuda_randn(hidden, dtype=dtype)
    for xx, rr in ((x, residual), (misaligned(x), residual), (x, misaligned(residual)),
                   (x, residual.transpose(0, -1).contiguous().transpose(0, -1))):
        poison_allocator()
        total, out = blockops.add_rms_norm(xx, rr, w, EPS)
        assert torch.equal(total, rr + xx), f"add_rms_norm {rows} x {hidden} {dtype}: the sum is not residual + x"
        check_rms_norm(out, rr + xx, w, EPS, what=f"llama add_rms_norm {rows} x {hidden} {dtype}")
    w_gemma = cuda_randn(hidden, dtype=dtype, scale=0.3)
    poison_allocator()
    total, out = blockops.add_rms_norm(x, residual, w_gemma, EPS, weight_offset=1.0, scale_in_fp32=True)
    assert torch.equal(total, residual + x)
    check_rms_norm(out, residual + x, w_gemma, EPS, 1.0, True, what=f"gemma add_rms_norm {rows} x {hidden} {dtype}")


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_block_op_rms_norm_per_head(head_dim, dtype):
    """Qwen3's q_norm / k_norm: many short rows (a warp each) of a [batch, seq, heads, head_dim] view."""
    q = cuda_randn(4, 37, 32 * head_dim, dtype=dtype).view(4, 37, 32, head_dim)
    w = cuda_randn(head_dim, dtype=dtype)
    poison_allocator()
    check_rms_norm(blockops.rms_norm(q, w, EPS), q, w, EPS, what=f"q_norm {head_dim} {dtype}")


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
def test_block_op_rms_norm_strided_and_misaligned(dtype):
    wide = cuda_randn(37, 4096 + 64, dtype=dtype)
    w = cuda_randn(4096, dtype=dtype)
    for x in (wide[:, :4096], misaligned(wide[:, :4096].contiguous()), wide[:, :512].t()):
        ww = w[: x.shape[-1]]
        check_rms_norm(blockops.rms_norm(x, ww, EPS), x, ww, EPS, what=f"rms_norm strides {x.stride()}")
    wm = misaligned(w)
    check_rms_norm(blockops.rms_norm(wide[:, :4096], wm, EPS), wide[:, :4096], wm, EPS, what="misaligned weight")


def rotary_inputs(batch, seq, hq, hk, head_dim, rot, dtype, unsqueeze_dim, cos_batch):
    """q and k as transformers makes them: one fused projection viewed [b, s, h, d], transposed to
    [b, h, s, d] for unsqueeze_dim 1; cos/sin [cos_batch, seq, rot] with equal halves."""
    qkv = cuda_randn(batch, seq, (hq + 2 * hk) * head_dim, dtype=dtype)
    q = qkv[..., : hq * head_dim].view(batch, seq, hq, head_dim)
    k = qkv[..., hq * head_dim: (hq + hk) * head_dim].view(batch, seq, hk, head_dim)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.rand(cos_batch, seq, 1, device="cuda") * 8192
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
    emb = torch.cat((pos * inv, pos * inv), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


ROTARY_SHAPES = [  # (batch, seq, q heads, k heads, head_dim, rotary dim)
    (1, 1, 32, 8, 128, 128),    # decode, Llama-8B
    (4, 37, 32, 8, 128, 128),   # prefill
    (2, 5, 16, 16, 64, 64),
    (2, 5, 8, 4, 256, 256),     # Gemma
    (2, 9, 8, 8, 128, 64),      # partial rotary (Phi-3 style)
    (2, 9, 8, 8, 128, 96),
    (2, 3, 4, 2, 80, 80),       # R/2 = 40: not a whole number of fp16 vectors (scalar path)
]


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=[rotary_id(*s) for s in ROTARY_SHAPES])
@pytest.mark.parametrize("cos_batch", ["one", "each"])
def test_block_op_rotary(shape, unsqueeze_dim, dtype, cos_batch):
    b, s, hq, hk, d, r = shape
    q, k, cos, sin = rotary_inputs(b, s, hq, hk, d, r, dtype, unsqueeze_dim, 1 if cos_batch == "one" else b)
    poison_allocator()
    outs = blockops.rotary(q, k, cos, sin, unsqueeze_dim)
    check_rotary(outs, q, k, cos, sin, unsqueeze_dim, what=f"rotary {shape} dim{unsqueeze_dim} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_op_rotary_other_layouts(dtype):
    """Contiguous q/k, a misaligned q (scalar path), a q whose last dim is strided (copied first),
    cos/sin with a strided last dim (copied first)."""
    q, k, cos, sin = rotary_inputs(2, 7, 8, 4, 128, 128, dtype, 1, 2)
    cases = [(q.contiguous(), k.contiguous(), cos, sin), (misaligned(q.contiguous()), k, cos, sin),
             (torch.stack([q, q], dim=-1)[..., 0], k, cos, sin),
             (q, k, torch.stack([cos, cos], dim=-1)[..., 0], torch.stack([sin, sin], dim=-1)[..., 1])]
    for qq, kk, cc, ss in cases:
        check_rotary(blockops.rotary(qq, kk, cc, ss, 1), qq, kk, cc, ss, 1,
                     what=f"rotary q strides {qq.stride()} cos strides {cc.stride()}")


GATED_FEATURES = [14336, 11008, 2048 + 3, 8]


@pytest.mark.parametrize("dtype", BLOCK_DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", ROWS, ids=["decode", "prefill"])
@pytest.mark.parametrize("features", GATED_FEATURES)
def test_block_op_gated_act(features, rows, act, dtype):
    gate_up = cuda_randn(*rows, 2 * features, dtype=dtype, scale=3.0)  # one fused gate/up GEMM output
    gate, up = gate_up[..., :features], gate_up[..., features:]
    poison_allocator()
    check_gated_act(blockops.gated_act(gate, up, act), gate, up, act, what=f"{act} halves {rows} x {features} {dtype}")
    g, u = gate.contiguous(), up.contiguous()
    check_gated_act(blockops.gated_act(g, u, act), g, u, act, what=f"{act} contiguous {rows} x {features} {dtype}")
    gm = misaligned(g)
    check_gated_act(blockops.gated_act(gm, u, act), gm, u, act, what=f"{act} misaligned {rows} x {features} {dtype}")


def test_block_op_empty_inputs():
    x = torch.empty(0, 4096, device="cuda", dtype=torch.float16)
    assert blockops.rms_norm(x, torch.ones(4096, device="cuda", dtype=torch.float16), EPS).shape == (0, 4096)
    q = torch.empty(1, 32, 0, 128, device="cuda", dtype=torch.float16)
    cs = torch.empty(1, 0, 128, device="cuda", dtype=torch.float16)
    qo, ko = blockops.rotary(q, q[:, :8], cs, cs)
    assert qo.shape == q.shape and ko.shape == (1, 8, 0, 128)
    g = torch.empty(0, 11008, device="cuda", dtype=torch.bfloat16)
    assert blockops.gated_act(g, g, "silu").shape == g.shape


def test_block_op_fallbacks_compute_the_reference():
    """What the kernels do not take runs the reference expression in ATen ops: the same tensors,
    the same bits as the Python reference on this device (it is the same sequence of ops)."""
    x = cuda_randn(5, 4096, dtype=torch.float16)
    for w in (cuda_randn(4096, dtype=torch.float32),            # weight dtype != x dtype (promotes)
              torch.tensor(1.5, dtype=torch.float16),            # a 0-dim CPU weight
              cuda_randn(5, 4096, dtype=torch.float16)):          # a weight of another shape (broadcast)
        got = blockops.rms_norm(x, w, EPS)
        ref = blockops._reference_rms_norm(x, w, EPS, 0.0, False)
        assert got.dtype == ref.dtype and torch.equal(got, ref), w.shape
    q, k, cos, sin = rotary_inputs(2, 7, 8, 4, 128, 128, torch.float16, 1, 2)
    for args in ((q, k, cos.float(), sin.float()),                  # cos dtype != q dtype
                 (q, k.float(), cos, sin),                          # k dtype != q dtype
                 (q, k, cos[:, :1], sin[:, :1])):                   # one position broadcast over the sequence
        got, ref = blockops.rotary(*args, 1), blockops._reference_rotary(*args, 1)
        for g_, r_ in zip(got, ref):
            assert g_.dtype == r_.dtype and g_.shape == r_.shape and torch.equal(g_, r_)
    g = cuda_randn(3, 512, dtype=torch.float16)
    got = blockops.gated_act(g, g.float(), "silu")
    assert torch.equal(got, blockops._reference_gated_act(g, g.float(), "silu"))
    xd = cuda_randn(3, 64, dtype=torch.float64)                     # a dtype the kernels do not take
    assert torch.equal(blockops.rms_norm(xd, xd[0], EPS), blockops._reference_rms_norm(xd, xd[0], EPS, 0.0, False))
    for r in (x.float(), x[:1]):  # a residual of another dtype (promotes), of another shape (broadcast)
        got, ref = blockops.add_rms_norm(x, r, x[0], EPS), blockops._reference_add_rms_norm(x, r, x[0], EPS, 0.0, False)
        assert all(g_.dtype == r_.dtype and torch.equal(g_, r_) for g_, r_ in zip(got, ref)), r.shape


def test_block_op_errors_on_cuda_name_what_is_accepted():
    x = cuda_randn(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"act 'relu' is not one of silu, gelu_tanh"):
        blockops.gated_act(x, x, "relu")
    with pytest.raises(ValueError, match=r"gate \(2, 8\) and up \(2, 7\) differ in shape"):
        blockops.gated_act(x, x[:, :7], "silu")
    q = cuda_randn(1, 2, 3, 8, dtype=torch.float16)
    cs = cuda_randn(1, 3, 5, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"rotary dim 5 must be even and <= the head dim 8"):
        blockops.rotary(q, q, cs, cs)
    with pytest.raises(ValueError, match=r"unsqueeze_dim must be 1 \(\[batch, heads, seq, dim\]\) or 2"):
        blockops.rotary(q, q, cs[..., :4], cs[..., :4], 0)
    with pytest.raises(ValueError, match="weight_offset needs scale_in_fp32=True"):
        blockops.rms_norm(x, x[0], EPS, weight_offset=1.0)


def test_block_op_kernels_are_registered_for_cuda():
    for op in ("rms_norm", "add_rms_norm", "rotary", "gated_act"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"awqlib::{op}", "CUDA"), op


def capture(fn):
    """fn() captured in a CUDA graph (after a warm-up on a side stream, as torch recommends): the
    graph and the outputs of its capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def test_block_op_cuda_graph_capture():
    x, w = cuda_randn(4, 4096, dtype=torch.bfloat16), cuda_randn(4096, dtype=torch.bfloat16)
    qh = cuda_randn(1, 4, 32, 128, dtype=torch.bfloat16)  # q_norm rows: the warp-per-row kernel
    wh = cuda_randn(128, dtype=torch.bfloat16)
    q, k, cos, sin = rotary_inputs(1, 4, 32, 8, 128, 128, torch.bfloat16, 1, 1)
    gu = cuda_randn(4, 2 * 14336, dtype=torch.bfloat16)
    gate, up = gu[:, :14336], gu[:, 14336:]
    r = cuda_randn(4, 4096, dtype=torch.bfloat16)
    graph, (n, nh, (qo, ko), a, (total, nr)) = capture(
        lambda: (blockops.rms_norm(x, w, EPS), blockops.rms_norm(qh, wh, EPS), blockops.rotary(q, k, cos, sin, 1),
                 blockops.gated_act(gate, up, "silu"), blockops.add_rms_norm(x, r, w, EPS)))
    for _ in range(2):  # new data each replay: the graph must read its inputs afresh
        for t in (x, qh, gu, r):
            t.copy_(torch.randn_like(t))
        q.copy_(torch.randn_like(q))  # a transposed view of its projection: copied in place
        graph.replay()
        torch.cuda.synchronize()
        check_rms_norm(n, x, w, EPS, what="captured rms_norm")
        check_rms_norm(nh, qh, wh, EPS, what="captured q_norm")
        check_rotary((qo, ko), q, k, cos, sin, 1, what="captured rotary")
        check_gated_act(a, gate, up, "silu", what="captured gated_act")
        assert torch.equal(total, r + x)
        check_rms_norm(nr, r + x, w, EPS, what="captured add_rms_norm")


def test_block_op_non_default_stream():
    x, w = cuda_randn(37, 5120, dtype=torch.float16), cuda_randn(5120, dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = blockops.rms_norm(x, w, EPS)
    torch.cuda.current_stream().wait_stream(s)
    check_rms_norm(out, x, w, EPS, what="rms_norm on a side stream")

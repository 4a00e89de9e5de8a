"""Layer 1: the packed layout and the quantization primitives, bit-exact."""

import torch
import pytest

from awqlib.packing import (AWQ_ORDER, dequantize_gemm, gemv_to_gemm, gemv_zeros_width, pack_columns,
                            unpack_columns)
from awqlib.quant import compute_qparams, dequantize, fake_quantize, quantize


def test_bit_diagram():
    # columns 0..7 hold codes 0x1..0x8; nibble i must hold column AWQ_ORDER[i]
    codes = torch.arange(1, 9, dtype=torch.int32).view(1, 8)
    packed = pack_columns(codes).item() & 0xFFFFFFFF
    nibbles = [(packed >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [AWQ_ORDER[i] + 1 for i in range(8)]
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert packed == 0x86427531


def test_pack_unpack_roundtrip_random():
    codes = torch.randint(0, 16, (37, 64), dtype=torch.int32)
    packed = pack_columns(codes)
    assert packed.dtype == torch.int32 and packed.shape == (37, 8)
    assert torch.equal(unpack_columns(packed), codes)
    assert torch.equal(unpack_columns(pack_columns(codes, interleave=False), interleave=False), codes)


def test_sign_bit():
    codes = torch.full((1, 8), 15, dtype=torch.int32)
    assert pack_columns(codes).item() == -1


def _python_pack(codes, order):
    out = []
    for row in codes.tolist():
        r = []
        for j in range(0, len(row), 8):
            v = 0
            for i in range(8):
                v |= row[j + order[i]] << (4 * i)
            r.append(v - (1 << 32) if v >= 1 << 31 else v)
        out.append(r)
    return torch.tensor(out, dtype=torch.int32)


def test_pack_matches_python_loop():
    codes = torch.randint(0, 16, (5, 24), dtype=torch.int32)
    assert torch.equal(pack_columns(codes), _python_pack(codes, AWQ_ORDER))


@pytest.mark.parametrize("g", [32, 64, 128])
def test_dequantize_formula(g):
    k, n = 256, 48
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    z = torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    s = torch.rand(k // g, n).half()
    w = dequantize_gemm(pack_columns(q), pack_columns(z), s, g, dtype=torch.float32)
    ref = (q.float() - z.float().repeat_interleave(g, 0)) * s.float().repeat_interleave(g, 0)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_gemv_to_gemm(g):
    n, k = 40, 512
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)               # W codes [out, in]
    z = torch.randint(0, 16, (n, k // g), dtype=torch.int32)
    s = torch.rand(n, k // g).half()
    width = gemv_zeros_width(k, g)
    zpad = torch.zeros(n, width * 8, dtype=torch.int32)
    zpad[:, : k // g] = z
    spad = torch.zeros(n, width * 8, dtype=torch.float16)
    spad[:, : k // g] = s
    qw, qz, sc = gemv_to_gemm(_python_pack(q, range(8)), _python_pack(zpad, range(8)), spad, g)
    assert torch.equal(qw, pack_columns(q.t().contiguous()))
    assert torch.equal(qz, pack_columns(z.t().contiguous()))
    assert torch.equal(sc, s.t())


def test_qparams_zero_point_range():
    w = torch.randn(16, 128)
    s, z = compute_qparams(w, 4, 64, True)
    q = quantize(w, s, z)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(s, s.half().float())  # scales are exactly representable in fp16
    err = (dequantize(q, s, z) - w).abs()
    assert (err <= s.repeat_interleave(64, 1) * 0.5 + 1e-6).all()


def test_symmetric_zero_is_fixed():
    w = torch.randn(8, 64)
    s, z = compute_qparams(w, 4, 64, zero_point=False)
    assert (z == 8).all()
    q = quantize(w, s, z)
    assert q.min() >= 1 and q.max() <= 15  # -7..7 around 8


def test_fake_quantize_is_dequantized_codes():
    w = torch.randn(32, 256)
    s, z = compute_qparams(w, 4, 128, True)
    assert torch.equal(fake_quantize(w, 4, 128, True), dequantize(quantize(w, s, z), s, z))


def test_per_channel_group():
    w = torch.randn(8, 96)
    s, z = compute_qparams(w, 4, -1, True)
    assert s.shape == (8, 1)


# --- warp-tiled runtime layout ---------------------------------------------------------------

def test_tile_rows_cover_each_chunk_row_once():
    from awqlib.packing import TILE_ROWS
    assert sorted(r for q in TILE_ROWS for r in q) == list(range(32))


@pytest.mark.parametrize("K,N", [(32, 64), (96, 192), (256, 128)])
def test_tile_for_kernels_bit_exact(K, N):
    """Every word lands where the skinny kernel's lane reads it (explicit loops as the spec)."""
    from awqlib.packing import TILE_ROWS, tile_for_kernels, untile_from_kernels
    qweight = torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32)
    t = tile_for_kernels(qweight)
    assert t.shape == (N // 64, K // 32, 256) and t.dtype == torch.int32
    for nb in range(N // 64):
        for kc in range(K // 32):
            for lane in range(32):
                g, q = divmod(lane, 4)
                for j in range(8):
                    assert t[nb, kc, 8 * lane + j] == qweight[32 * kc + TILE_ROWS[q][j], 8 * nb + g]
    assert torch.equal(untile_from_kernels(t), qweight)


def test_tile_refuses_bad_shapes():
    from awqlib.packing import tile_for_kernels, untile_from_kernels
    with pytest.raises(ValueError, match="K % 32"):
        tile_for_kernels(torch.zeros(48, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="N % 64"):
        tile_for_kernels(torch.zeros(64, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="256"):
        untile_from_kernels(torch.zeros(1, 1, 128, dtype=torch.int32))

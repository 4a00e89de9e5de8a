"""Layer 1: the packed layout and the quantization primitives, bit-exact."""

import torch
import pytest

from awqlib.packing import (AWQ_ORDER, dequantize_gemm, gemv_shapes, gemv_to_gemm, gemv_zeros_width, pack_columns,
                            unpack_columns)
from awqlib.quant import compute_qparams, dequantize, effective_group_size, fake_quantize, quantize


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


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_gemv_to_gemm(g):
    n, k = 40, 512
    groups = k // effective_group_size(g, k)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)               # W codes [out, in]
    z = torch.randint(0, 16, (n, groups), dtype=torch.int32)
    s = torch.rand(n, groups).half()
    width = gemv_zeros_width(k, g)
    assert width > 0 and gemv_shapes(k, n, g) == {"qweight": (n, k // 8), "qzeros": (n, width),
                                                  "scales": (n, width * 8)}
    zpad = torch.zeros(n, width * 8, dtype=torch.int32)
    zpad[:, :groups] = z
    spad = torch.zeros(n, width * 8, dtype=torch.float16)
    spad[:, :groups] = s
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
def test_tile_qweight_bit_exact(K, N):
    """Every word lands where the skinny kernel's lane reads it (explicit loops as the spec)."""
    from awqlib.packing import TILE_ROWS, tile_qweight, untile_qweight
    qweight = torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32)
    t = tile_qweight(qweight)
    assert t.shape == (N // 64, K // 32, 256) and t.dtype == torch.int32
    for nb in range(N // 64):
        for kc in range(K // 32):
            for lane in range(32):
                g, q = divmod(lane, 4)
                for j in range(8):
                    assert t[nb, kc, 8 * lane + j] == qweight[32 * kc + TILE_ROWS[q][j], 8 * nb + g]
    assert torch.equal(untile_qweight(t), qweight)


# (repack, inverse, its K multiple, a K it refuses, a valid K, the inverse's word count, a count it refuses)
RUNTIME_LAYOUTS = [("tile_qweight", "untile_qweight", 32, 48, 64, 256, 128),
                   ("stream_qweight", "unstream_qweight", 16, 24, 32, 128, 256)]


@pytest.mark.parametrize("pack, unpack, k_mult, bad_k, good_k, words, bad_words", RUNTIME_LAYOUTS)
def test_runtime_layouts_refuse_bad_shapes(pack, unpack, k_mult, bad_k, good_k, words, bad_words):
    from awqlib import packing
    with pytest.raises(ValueError, match=f"K % {k_mult}"):
        getattr(packing, pack)(torch.zeros(bad_k, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="N % 64"):
        getattr(packing, pack)(torch.zeros(good_k, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=str(words)):
        getattr(packing, unpack)(torch.zeros(1, 1, bad_words, dtype=torch.int32))


# --- stream runtime layout (csrc/awq_stream.cu) ------------------------------------------------

STREAM_SHAPES = [(16, 64, 16), (64, 192, 32), (256, 128, 64), (384, 256, 128), (256, 64, -1)]


def _random_awq(K, N, g, dtype=torch.float16):
    gs = K if g == -1 else g
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32)
    zeros = torch.randint(0, 16, (K // gs, N), dtype=torch.int32)
    scales = ((torch.rand(K // gs, N) * 0.01 + 1e-4) * torch.where(torch.rand(K // gs, N) < 0.2, -1.0, 1.0)).to(dtype)
    qweight, qzeros = pack_columns(codes), pack_columns(zeros)
    return codes, zeros, qweight, qzeros, scales


def test_stream_index_is_a_permutation_of_the_atom():
    from awqlib.packing import STREAM_SCALE_COLS, STREAM_WEIGHT_INDEX, STREAM_ZERO_COLS
    assert sorted(STREAM_WEIGHT_INDEX.flatten().tolist()) == list(range(16 * 64))
    assert sorted(STREAM_SCALE_COLS) == list(range(64)) and sorted(STREAM_ZERO_COLS) == list(range(64))


@pytest.mark.parametrize("K,N,g", STREAM_SHAPES)
def test_stream_layout_spec_and_roundtrip(K, N, g):
    """Every nibble lands where the kernel's lane reads it (explicit loops as the spec), and
    unstream(stream(q)) == q for the weights, zeros and scales."""
    from awqlib.packing import (STREAM_NIBBLES, stream_qweight, stream_qzeros, stream_scales, unstream_qweight)
    codes, zeros, qweight, qzeros, scales = _random_awq(K, N, g)
    qs = stream_qweight(qweight)
    assert qs.shape == (N // 64, K // 16, 128) and qs.dtype == torch.int32
    assert torch.equal(stream_qweight(qweight, block_columns=64), qs)  # blockwise repack, same words
    words = qs.to(torch.int64) & 0xFFFFFFFF
    for nt in range(N // 64):
        for kt in range(K // 16):
            for lane in (0, 5, 17, 31):
                g_, q = divmod(lane, 4)
                rows = (2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9)
                for j in range(4):
                    w = int(words[nt, kt, 4 * lane + j])
                    for i, (ri, hi) in enumerate(STREAM_NIBBLES):
                        col = 64 * nt + 16 * j + 8 * hi + g_
                        assert (w >> (4 * i)) & 0xF == codes[16 * kt + rows[ri], col]
    zs, ss = stream_qzeros(qzeros), stream_scales(scales)
    zw = zs.to(torch.int64) & 0xFFFFFFFF
    for grp in range(zs.shape[0]):
        for nt in range(N // 64):
            for g_ in range(8):
                for j in range(4):
                    for h in range(2):
                        col = 64 * nt + 16 * j + 8 * h + g_
                        assert ss[grp, 64 * nt + 8 * g_ + 2 * j + h] == scales[grp, col]
                        assert (int(zw[grp, 8 * nt + g_]) >> (4 * (j + 4 * h))) & 0xF == zeros[grp, col]
    assert torch.equal(unstream_qweight(qs), qweight)
    assert torch.equal(stream_qzeros(zs, inverse=True), qzeros)
    assert torch.equal(stream_scales(ss, inverse=True), scales)


def _half_pairs(words: torch.Tensor, dtype) -> torch.Tensor:
    """int32 [...] -> [..., 2] of ``dtype``: the two 16-bit halves (low first), raw bits."""
    return words.contiguous().view(dtype).view(*words.shape, 2)


def emulate_stream_dequant(qs, zs, ss, group_size, dtype):
    """Dense W^T [K, N] computed exactly the way csrc/awq_stream.cu dequantizes a lane's words:
    lop3 with the magic exponent, (magic + q) - (magic + z) exact, the fp16 high-nibble path as
    fma(hi, 1/16, -(64 + z)), one rounding by the scale; and placed by the mma B-fragment map
    (lane (g, q), word j -> n8-tiles 2j / 2j+1, slot g, k-pairs 2q / 2q+8)."""
    nt_, kt_, _ = qs.shape
    K, N = 16 * kt_, 64 * nt_
    gs = K if group_size == -1 else group_size
    out = torch.full((K, N), float("nan"), dtype=dtype)
    u = qs.to(torch.int64) & 0xFFFFFFFF
    zu = zs.to(torch.int64) & 0xFFFFFFFF
    fp16 = dtype == torch.float16
    magic = 0x64006400 if fp16 else 0x43004300

    def lop3(w, mask, c):  # (w & mask) | c -> int32 bits
        v = (w & mask) | c
        return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)

    one16 = torch.tensor(1 / 16, dtype=dtype)
    for lane in range(32):
        g, q = divmod(lane, 4)
        for j in range(4):
            w = u[:, :, 4 * lane + j]                                            # [NT, KT]
            kt_idx = torch.arange(kt_)
            grp = (16 * kt_idx) // gs                                            # [KT]
            zword = zu[grp][:, g::8].t()                                         # [NT, KT]: lane g's zero word
            zlo = _half_pairs(lop3(zword >> (4 * j), 0x000F000F, magic), dtype)  # (magic + z_c0, magic + z_c1)
            s2 = ss[grp].view(kt_, nt_, 64)[:, :, 8 * g + 2 * j: 8 * g + 2 * j + 2].permute(1, 0, 2)  # [NT, KT, 2]
            if fp16:
                # 64.0 has ulp 1/16: the zero goes to bits 4..7 -> (64 + z_c0, 64 + z_c1)
                zhi = _half_pairs(lop3((zword << 4) >> (4 * j), 0x00F000F0, 0x54005400), dtype)
                parts = [(w, 0x000F000F, False), (w, 0x00F000F0, True), (w >> 8, 0x000F000F, False),
                         (w >> 8, 0x00F000F0, True)]
            else:  # bf16 has 7 mantissa bits: a nibble at bits 4..7 would reach the exponent
                parts = [(w, 0x000F000F, False), (w >> 4, 0x000F000F, False), (w >> 8, 0x000F000F, False),
                         (w >> 12, 0x000F000F, False)]
            for pi, (src, mask, high) in enumerate(parts):
                col_half = pi // 2                                               # 0: c0, 1: c1
                v = _half_pairs(lop3(src, mask, magic), dtype)                   # [NT, KT, 2]
                if high:
                    d = (v.float() * one16.float() - zhi[..., col_half:col_half + 1].float()).to(dtype)
                else:
                    d = v - zlo[..., col_half:col_half + 1]
                d = d * s2[..., col_half:col_half + 1]                           # one rounding
                rows = (2 * q + 8 * (pi % 2), 2 * q + 8 * (pi % 2) + 1)           # b0: 2q.., b1: 2q+8..
                col = 16 * j + 8 * col_half + g                                  # n8-tile 2j + col_half, slot g
                for e in range(2):
                    kk = (16 * torch.arange(kt_)).view(1, -1) + rows[e]
                    nn_ = (64 * torch.arange(nt_)).view(-1, 1) + col
                    out[kk.expand(nt_, -1), nn_.expand(-1, kt_)] = d[..., e]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N,g", STREAM_SHAPES)
def test_stream_dequant_bit_identical(K, N, g, dtype):
    """The kernel's arithmetic on the stream layout gives W^T bit for bit equal to dequantizing the
    GEMM layout (and so does the reference op on stream tensors)."""
    from awqlib.packing import stream_qweight, stream_qzeros, stream_scales
    _, _, qweight, qzeros, scales = _random_awq(K, N, g)
    sc = scales.to(dtype)
    ref = dequantize_gemm(qweight, qzeros, sc, g)
    qs, zs, ss = stream_qweight(qweight), stream_qzeros(qzeros), stream_scales(sc)
    emu = emulate_stream_dequant(qs, zs, ss, g, dtype)
    assert torch.equal(emu, ref)
    assert torch.equal(dequantize_gemm(qs, zs, ss, g), ref)

"""The AWQ GEMM on-disk layout, defined once.

Every quantized linear ``y = x @ W^T`` (W is [N out, K in]) is stored as

* ``qweight`` int32 [K, N / 8]   -- eight 4-bit codes per int32, along N
* ``qzeros``  int32 [K / g, N / 8] -- the zero points, packed the same way
* ``scales``  fp16  [K / g, N]

and dequantizes to ``W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.

Within one int32 the eight output columns ``8j .. 8j+7`` are interleaved::

    bit   31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
    nibble   7      6      5      4      3      2     1      0
    column  8j+7   8j+5   8j+3   8j+1   8j+6   8j+4  8j+2   8j+0

i.e. nibble ``i`` holds column ``8j + AWQ_ORDER[i]`` with
``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.

Why: the CUDA kernels turn int4 into fp16 with the "magic number" trick:
``lop3`` ORs a nibble into the mantissa of 0x6400 (fp16 1024.0) and a
subtraction removes the bias.  One ``lop3`` with mask 0x000f000f extracts
nibbles 0 and 4 of a register into the two fp16 halves of a 32-bit word, and
after a ``>> 4`` the same mask yields nibbles 1 and 5, and so on.  Nibbles
(0, 4) hold columns (0, 1), nibbles (1, 5) hold columns (2, 3): every
extracted pair is two *adjacent* output columns, which is the order an
``half2`` FMA and the mma accumulator fragments want.  The interleave costs
nothing at dequant time and saves a shuffle per pair.  This is the layout
AutoAWQ, vLLM, SGLang and transformers read, so it is also our only on-disk
format; kernel-specific repacking happens at load time.
"""

from __future__ import annotations

import torch

from .quant import effective_group_size, pack_factor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Position of column c (0..7) inside the int32: the inverse permutation.
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))


def _order(bits: int) -> tuple[int, ...]:
    # AWQ only defines the interleave for 4 bits; other widths pack in order.
    return AWQ_ORDER if bits == 4 else tuple(range(pack_factor(bits)))


def pack_columns(codes: torch.Tensor, bits: int = 4, interleave: bool = True) -> torch.Tensor:
    """Pack unsigned integer codes [R, C] (C a multiple of 32/bits) into int32 [R, C*bits/32].

    ``interleave=True`` uses AWQ_ORDER (the GEMM layout); ``False`` packs columns
    in order (AutoAWQ's GEMV layout).
    """
    pf = pack_factor(bits)
    rows, cols = codes.shape
    if cols % pf:
        raise ValueError(f"cannot pack {cols} columns: not a multiple of {pf}")
    order = _order(bits) if interleave else tuple(range(pf))
    c = codes.to(torch.int64).reshape(rows, cols // pf, pf)[:, :, list(order)]
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64)
    packed = (c << shifts).sum(dim=-1)  # disjoint bit ranges: sum == or
    # Reinterpret the low 32 bits as a signed int32 (nibble 7 may set the sign bit).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_columns(packed: torch.Tensor, bits: int = 4, interleave: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [R, P] -> int32 codes [R, P*32/bits]."""
    pack_factor(bits)  # validates bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, P, pf], nibble order
    if interleave and bits == 4:
        codes = codes[:, :, list(AWQ_REVERSE_ORDER)]  # nibble AWQ_REVERSE_ORDER[c] holds column c
    return codes.reshape(packed.shape[0], -1)


def pack_awq(qweight_t: torch.Tensor, zeros_t: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes W^T [K, N] and zeros [K/g, N] -> (qweight, qzeros) in the GEMM layout."""
    return pack_columns(qweight_t, bits), pack_columns(zeros_t, bits)


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bits: int = 4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Any layout (GEMM, warp-tiled, stream) -> dense W^T [K, N] in ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    qweight, qzeros, scales = as_gemm_params(qweight, qzeros, scales)
    q = unpack_columns(qweight, bits)  # [K, N]
    z = unpack_columns(qzeros, bits)                  # [K/g, N]
    k = q.shape[0]
    g = effective_group_size(group_size, k)
    s = scales.to(dtype)
    w = (q.view(k // g, g, -1) - z.unsqueeze(1)).to(dtype) * s.unsqueeze(1)
    return w.view(k, -1)


# --- The warp-tiled runtime layout (never on disk) ----------------------------------------
#
# On CUDA, from_quantized repacks each qweight once into the order the skinny kernel
# (csrc/awq_skinny.cu) reads it.  In the GEMM layout a warp that owns 64 output columns (8 words)
# reads 32 bytes from each of 32 rows that lie N/2 bytes apart: short scattered DRAM bursts,
# measured on an H200 at ~1.4 TB/s of its 4.3.  Tiled, the same 32 rows x 8 words (1 KB) are one
# contiguous block, each lane's 8 words are 32 contiguous bytes (two 16-byte loads), and the
# blocks of one column strip follow each other along K: a warp streams its weights sequentially.
#
#   qweight_tiled[nb, kc, 8 * lane + j] = qweight[32 kc + TILE_ROWS[q][j], 8 nb + g],  lane = 4 g + q
#
# TILE_ROWS[q] = (2q, 2q+1, 2q+8, 2q+9, 16+2q, 17+2q, 24+2q, 25+2q): the k-rows whose word g lane
# (g, q) needs for the B fragments of the two m16n8k16 k-steps of a 32-row chunk.
TILE_N, TILE_K = 64, 32
TILE_ROWS = tuple(tuple(16 * (j // 4) + 8 * ((j % 4) // 2) + 2 * q + (j % 2) for j in range(8)) for q in range(4))


def can_tile(in_features: int, out_features: int, group_size: int, bits: int = 4) -> bool:
    g = effective_group_size(group_size, in_features)
    return bits == 4 and out_features % TILE_N == 0 and in_features % TILE_K == 0 and g % TILE_K == 0


def tile_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """GEMM-layout qweight [K, N/8] -> warp-tiled [N/64, K/32, 256] (a permutation of the words)."""
    k, n8 = qweight.shape
    if k % TILE_K or n8 % (TILE_N // 8):
        raise ValueError(f"tile_qweight: qweight {tuple(qweight.shape)} needs K % {TILE_K} == 0 and "
                         f"N % {TILE_N} == 0")
    rows = torch.tensor(TILE_ROWS, device=qweight.device).flatten()          # (q, j) -> row in chunk
    t = qweight.view(k // TILE_K, TILE_K, n8 // 8, 8).permute(2, 0, 3, 1)     # [nb, kc, g, row]
    return t[..., rows].reshape(n8 // 8, k // TILE_K, 256).contiguous()      # (g, q, j) = 8 * lane + j


def untile_qweight(qtiled: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile_qweight`: warp-tiled [N/64, K/32, 256] -> GEMM layout [K, N/8]."""
    nb, kc, w = qtiled.shape
    if w != 256:
        raise ValueError(f"untile_qweight: expected [N/64, K/32, 256], got {tuple(qtiled.shape)}")
    rows = torch.tensor(TILE_ROWS, device=qtiled.device).flatten()
    inv = torch.argsort(rows)                                                  # row in chunk -> (q, j)
    t = qtiled.view(nb, kc, 8, 32)[..., inv]                                  # [nb, kc, g, row]
    return t.permute(1, 3, 0, 2).reshape(kc * TILE_K, nb * 8).contiguous()


# --- The stream runtime layout (never on disk) ---------------------------------------------
#
# What csrc/awq_stream.cu reads: the Marlin/vLLM atom order, with AWQ zero points.  The weight is
# cut into atoms of 16 k-rows x 64 output columns (512 bytes); atom (nt, kt) is stored at
# qweight_stream[nt, kt] as 128 words, 4 per lane, lane l = 4 g + q owning words 4 l .. 4 l + 3
# (one 16-byte shared-memory load).  Word j of lane (g, q) holds the codes of columns
# c0 = 16 j + g and c1 = c0 + 8 at rows r = (2q, 2q+1, 2q+8, 2q+9) of the atom, nibble i holding
# (r[STREAM_NIBBLES[i][0]], c0 or c1 per STREAM_NIBBLES[i][1]).  For mma.m16n8k16 that is:
#
#   (w & 0x000f000f)  -> rows (2q, 2q+1)  of column c0: b0 of n8-tile 2j, slot g
#   (w & 0x00f000f0)  -> rows (2q+8, 2q+9) of column c0 (times 16): b1 of n8-tile 2j
#   the same on (w >> 8)                  -> b0, b1 of n8-tile 2j + 1 (column c1)
#
# so the k-pairs the B fragment needs come out of one lop3 each: no byte permute, one shift per
# 8 weights (the GEMM layout pairs adjacent *columns* and needs a PRMT per pair).  Atoms are
# stored column-strip major ([N/64][K/16]): a CTA owning 64 a columns streams `a` contiguous
# runs along K.
#
# Scales and zeros are permuted inside every 64-column block so that lane g finds the 8 columns
# it dequantizes (c0, c1 of words 0..3) in one 16-byte vector of scales and one int32 of zeros:
#   scales_stream[grp, 64 nt + 8 g + 2 j + h]            = scales[grp, 64 nt + 16 j + 8 h + g]
#   nibble i of qzeros_stream[grp, 8 nt + g]             = zero of column 64 nt + 16 (i % 4) + 8 (i // 4) + g
# (nibbles (j, j + 4) = (c0, c1) of word j: one lop3 gives both as an fp16 pair).  Same bytes as
# the GEMM layout: 4 + 16/g + 4/g bits per weight.
STREAM_K, STREAM_N = 16, 64
STREAM_NIBBLES = ((0, 0), (2, 0), (0, 1), (2, 1), (1, 0), (3, 0), (1, 1), (3, 1))  # (row index, c1?)


def _stream_weight_index() -> torch.Tensor:
    """[128, 8]: position (row * 64 + column) inside the 16x64 atom of nibble i of word 4 l + j."""
    idx = torch.empty(128, 8, dtype=torch.int64)
    for lane in range(32):
        g, q = divmod(lane, 4)
        rows = (2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9)
        for j in range(4):
            for i, (ri, hi) in enumerate(STREAM_NIBBLES):
                idx[4 * lane + j, i] = rows[ri] * STREAM_N + 16 * j + 8 * hi + g
    return idx


STREAM_WEIGHT_INDEX = _stream_weight_index()
# Column of a 64-column block held at position p of the permuted scales / zero codes.
STREAM_SCALE_COLS = tuple(16 * ((p % 8) // 2) + 8 * (p % 2) + p // 8 for p in range(64))
STREAM_ZERO_COLS = tuple(16 * ((p % 8) % 4) + 8 * ((p % 8) // 4) + p // 8 for p in range(64))


def can_stream(in_features: int, out_features: int, group_size: int, bits: int = 4) -> bool:
    g = effective_group_size(group_size, in_features)
    return bits == 4 and out_features % STREAM_N == 0 and in_features % STREAM_K == 0 and g % STREAM_K == 0


# The k-tiles of the stream kernel's decode configurations (csrc/awq_stream.cu, StreamCfg at M <= 16:
# 512 rows in the large one, 256 in the compact one).  A group must divide a tile (a power of two
# times 16), be a whole number of tiles, or span K (awq_stream.cu: stream_supports).
STREAM_DECODE_K_TILES = (512, 256)


def stream_serves_decode(in_features: int, out_features: int, group_size: int, bits: int = 4) -> bool:
    """Whether the stream kernel takes one token on this shape, in either configuration.  Where it
    does not (group 96, 192, 384, ...), a stream-layout weight would run dequantize + cuBLAS at
    decode, slower than fp16: WQLinear.tile_for_kernels then keeps the tiled layout."""
    g = effective_group_size(group_size, in_features)
    if not can_use_layout("stream", in_features, out_features, group_size, bits) or in_features % g:
        return False
    power_of_two = (g // 16) & (g // 16 - 1) == 0
    return any(tile % g == 0 and power_of_two if g < tile else g % tile == 0 or g == in_features
               for tile in STREAM_DECODE_K_TILES)


def _check_stream_shape(k: int, n: int, what: str) -> None:
    if k % STREAM_K or n % STREAM_N:
        raise ValueError(f"{what}: the stream layout needs K % {STREAM_K} == 0 and N % {STREAM_N} == 0, "
                         f"got K={k}, N={n}")


def stream_qweight(qweight: torch.Tensor, block_columns: int = 1024) -> torch.Tensor:
    """GEMM-layout qweight [K, N/8] -> stream layout [N/64, K/16, 128] (see above).  Works through
    ``block_columns`` output columns at a time so the int64 temporaries stay ~24 B x K x block
    (repacking a 70B model's layers at load must not need gigabytes of scratch)."""
    k, n8 = qweight.shape
    _check_stream_shape(k, n8 * 8, "stream_qweight")
    out = torch.empty(n8 // 8, k // STREAM_K, 128, dtype=torch.int32, device=qweight.device)
    index = STREAM_WEIGHT_INDEX.to(qweight.device)
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    step = max(1, block_columns // STREAM_N)
    for nt0 in range(0, n8 // 8, step):
        nt1 = min(n8 // 8, nt0 + step)
        codes = unpack_columns(qweight[:, 8 * nt0: 8 * nt1]).to(torch.int64)        # [K, cols]
        atoms = codes.view(k // STREAM_K, STREAM_K, nt1 - nt0, STREAM_N).permute(2, 0, 1, 3)
        atoms = atoms.reshape(nt1 - nt0, k // STREAM_K, STREAM_K * STREAM_N)
        words = (atoms[..., index] << shifts).sum(-1)                                # [nt, KT, 128]
        out[nt0:nt1] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return out


def unstream_qweight(qstream: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`stream_qweight`: [N/64, K/16, 128] -> GEMM layout [K, N/8]."""
    if qstream.dim() != 3 or qstream.shape[2] != 128:
        raise ValueError(f"unstream_qweight: expected [N/64, K/16, 128], got {tuple(qstream.shape)}")
    nt, kt, _ = qstream.shape
    shifts = torch.arange(0, 32, 4, device=qstream.device, dtype=torch.int32)
    nib = (qstream.unsqueeze(-1) >> shifts) & 0xF                                   # [NT, KT, 128, 8]
    atoms = torch.empty(nt, kt, STREAM_K * STREAM_N, dtype=torch.int32, device=qstream.device)
    atoms[..., STREAM_WEIGHT_INDEX.to(qstream.device)] = nib
    codes = atoms.view(nt, kt, STREAM_K, STREAM_N).permute(1, 2, 0, 3).reshape(kt * STREAM_K, nt * STREAM_N)
    return pack_columns(codes)


def _permute_cols(t: torch.Tensor, cols: tuple[int, ...], inverse: bool) -> torch.Tensor:
    idx = torch.tensor(cols, device=t.device)
    if inverse:
        idx = torch.argsort(idx)
    r, n = t.shape
    return t.view(r, n // STREAM_N, STREAM_N)[..., idx].reshape(r, n).contiguous()


def stream_scales(scales: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """scales [K/g, N] -> the stream layout's per-lane order (``inverse=True``: back)."""
    _check_stream_shape(STREAM_K, scales.shape[1], "stream_scales")
    return _permute_cols(scales, STREAM_SCALE_COLS, inverse)


def stream_qzeros(qzeros: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """GEMM-layout qzeros [K/g, N/8] -> the stream layout's (same shape; ``inverse=True``: back)."""
    _check_stream_shape(STREAM_K, qzeros.shape[1] * 8, "stream_qzeros")
    if inverse:
        return pack_columns(_permute_cols(unpack_columns(qzeros, interleave=False), STREAM_ZERO_COLS, True))
    return pack_columns(_permute_cols(unpack_columns(qzeros), STREAM_ZERO_COLS, False), interleave=False)


# --- Layout names -------------------------------------------------------------------------
#
# "gemm"   the checkpoint layout, [K, N/8]
# "tiled"  the warp-tiled runtime layout of csrc/awq_skinny.cu, [N/64, K/32, 256]
# "stream" the stream runtime layout of csrc/awq_stream.cu, [N/64, K/16, 128] (+ permuted zeros/scales)
LAYOUTS = ("gemm", "tiled", "stream")
# What WQLinear.tile_for_kernels (and so from_quantized and quantize on CUDA) repacks to.  "stream":
# on an H200 (benchmarks/RESULTS.md, 2026-11-30) its kernels passed the GPU tests and beat the
# tiled layout's skinny kernel by 1.4-1.8x at M = 1 on the 8B gate/up and 70B shapes (2.71x fp16
# against 1.57x on 70b-down), losing 8-13 % on 4096 x 4096 at 1-32 tokens; the 8B decode step with
# fuse_layers and the narrow kernels takes 3.66 ms against fp16's 6.78 (group sums, in the
# automatic choice since, were not in that run).  Measured on an H200 only.  AWQLIB_LAYOUT=tiled
# keeps the older path.
DEFAULT_RUNTIME_LAYOUT = "stream"


def runtime_layout() -> str:
    """The runtime layout CUDA weights are repacked to: $AWQLIB_LAYOUT if set, else the default."""
    import os
    name = os.environ.get("AWQLIB_LAYOUT", "") or DEFAULT_RUNTIME_LAYOUT
    if name not in LAYOUTS[1:]:
        raise ValueError(f"AWQLIB_LAYOUT={name!r}: expected one of {LAYOUTS[1:]}")
    return name


def layout_of(qweight: torch.Tensor) -> str:
    """The layout a qweight is stored in, from its shape (the one thing every holder agrees on)."""
    if qweight.dim() == 2:
        return "gemm"
    if qweight.dim() == 3 and qweight.shape[2] == 256:
        return "tiled"
    if qweight.dim() == 3 and qweight.shape[2] == 128:
        return "stream"
    raise ValueError(f"qweight of shape {tuple(qweight.shape)} is in no known layout {LAYOUTS}")


def can_use_layout(layout: str, in_features: int, out_features: int, group_size: int, bits: int = 4) -> bool:
    if layout == "gemm":
        return True
    if layout == "tiled":
        return can_tile(in_features, out_features, group_size, bits)
    if layout == "stream":
        g = effective_group_size(group_size, in_features)
        return can_stream(in_features, out_features, group_size, bits) and g % 32 == 0
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def to_layout(layout: str, qweight: torch.Tensor, qzeros: torch.Tensor,
              scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, qzeros, scales) from any layout to ``layout`` (through the GEMM layout; exact)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout_of(qweight) == layout:
        return qweight, qzeros, scales
    qw, qz, sc = as_gemm_params(qweight, qzeros, scales)
    if layout == "tiled":
        return tile_qweight(qw), qz, sc
    if layout == "stream":
        out = stream_qweight(qw), stream_qzeros(qz), stream_scales(sc)
        if out[0].is_cuda:
            # The stream kernel may prefetch qweight before the previous kernel in the stream has
            # finished (AWQLIB_STREAM_PDL, csrc/awq_ops.cpp): that kernel must not be this repack.
            torch.cuda.current_stream(out[0].device).synchronize()
        return out
    return qw, qz, sc


def is_stream(qweight: torch.Tensor) -> bool:
    return qweight.dim() == 3 and qweight.shape[2] == 128


def as_gemm_layout(qweight: torch.Tensor) -> torch.Tensor:
    """qweight in the GEMM layout, whichever layout it is stored in."""
    if qweight.dim() != 3:
        return qweight
    return unstream_qweight(qweight) if is_stream(qweight) else untile_qweight(qweight)


def as_gemm_params(qweight: torch.Tensor, qzeros: torch.Tensor,
                   scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, qzeros, scales) in the GEMM layout from any layout; the qweight's shape tells
    which (the stream layout also permutes qzeros and scales, the warp-tiled one does not)."""
    if is_stream(qweight):
        return unstream_qweight(qweight), stream_qzeros(qzeros, inverse=True), stream_scales(scales, inverse=True)
    return as_gemm_layout(qweight), qzeros, scales


# --- AutoAWQ's GEMV layout, read at load time and converted to the GEMM layout ----------

def gemv_zeros_width(in_features: int, group_size: int, bits: int = 4) -> int:
    """Number of int32 columns AutoAWQ's GEMV layout uses for qzeros (it pads; group_size -1 is one
    group of ``in_features``, as AutoAWQ's WQLinear_GEMV reads it)."""
    pf = pack_factor(bits)
    g = effective_group_size(group_size, in_features)
    mult = {32: 4, 64: 2}.get(g, 1)
    n_groups = in_features // g
    base = -(-n_groups // pf)
    return -(-base // mult) * mult


def gemv_shapes(in_features: int, out_features: int, group_size: int, bits: int = 4) -> dict[str, tuple[int, int]]:
    """{"qweight", "qzeros", "scales": shape} of one linear in AutoAWQ's GEMV layout (see :func:`gemv_to_gemm`)."""
    width = gemv_zeros_width(in_features, group_size, bits)
    return {"qweight": (out_features, in_features // pack_factor(bits)), "qzeros": (out_features, width),
            "scales": (out_features, width * pack_factor(bits))}


def gemv_to_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert AutoAWQ's GEMV layout to the GEMM layout, bit-exactly.

    GEMV stores ``qweight`` int32 [N, K/8] (packed along K, in order),
    ``qzeros`` int32 [N, padded] (groups packed along K, in order) and
    ``scales`` fp16 [N, padded*8] (first K/g columns used).
    """
    n, kp = qweight.shape
    pf = pack_factor(bits)
    k = kp * pf
    g = effective_group_size(group_size, k)
    if not k or k % g:
        raise ValueError(f"GEMV qweight implies in_features={k}, not a positive multiple of group_size={g}")
    n_groups = k // g
    codes = unpack_columns(qweight, bits, interleave=False)            # [N, K]
    zeros = unpack_columns(qzeros, bits, interleave=False)[:, :n_groups]  # [N, K/g]
    sc = scales[:, :n_groups]                                            # [N, K/g]
    return (pack_columns(codes.t().contiguous(), bits), pack_columns(zeros.t().contiguous(), bits),
            sc.t().contiguous().to(torch.float16))

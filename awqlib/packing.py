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
    """GEMM (or warp-tiled) layout -> dense W^T [K, N] in ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    q = unpack_columns(as_gemm_layout(qweight), bits)  # [K, N]
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


def tile_for_kernels(qweight: torch.Tensor) -> torch.Tensor:
    """GEMM-layout qweight [K, N/8] -> warp-tiled [N/64, K/32, 256] (a permutation of the words)."""
    k, n8 = qweight.shape
    if k % TILE_K or n8 % (TILE_N // 8):
        raise ValueError(f"tile_for_kernels: qweight {tuple(qweight.shape)} needs K % {TILE_K} == 0 and "
                         f"N % {TILE_N} == 0")
    rows = torch.tensor(TILE_ROWS, device=qweight.device).flatten()          # (q, j) -> row in chunk
    t = qweight.view(k // TILE_K, TILE_K, n8 // 8, 8).permute(2, 0, 3, 1)     # [nb, kc, g, row]
    return t[..., rows].reshape(n8 // 8, k // TILE_K, 256).contiguous()      # (g, q, j) = 8 * lane + j


def untile_from_kernels(qtiled: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile_for_kernels`: warp-tiled [N/64, K/32, 256] -> GEMM layout [K, N/8]."""
    nb, kc, w = qtiled.shape
    if w != 256:
        raise ValueError(f"untile_from_kernels: expected [N/64, K/32, 256], got {tuple(qtiled.shape)}")
    rows = torch.tensor(TILE_ROWS, device=qtiled.device).flatten()
    inv = torch.argsort(rows)                                                  # row in chunk -> (q, j)
    t = qtiled.view(nb, kc, 8, 32)[..., inv]                                  # [nb, kc, g, row]
    return t.permute(1, 3, 0, 2).reshape(kc * TILE_K, nb * 8).contiguous()


def as_gemm_layout(qweight: torch.Tensor) -> torch.Tensor:
    """qweight in the GEMM layout, whichever layout it is stored in."""
    return untile_from_kernels(qweight) if qweight.dim() == 3 else qweight


# --- AutoAWQ's GEMV layout, read at load time and converted to the GEMM layout ----------

def gemv_zeros_width(in_features: int, group_size: int, bits: int = 4) -> int:
    """Number of int32 columns AutoAWQ's GEMV layout uses for qzeros (it pads)."""
    pf = pack_factor(bits)
    mult = {32: 4, 64: 2}.get(group_size, 1)
    n_groups = in_features // group_size
    base = -(-n_groups // pf)
    return -(-base // mult) * mult


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
    if k % group_size:
        raise ValueError(f"GEMV qweight implies in_features={k}, not a multiple of group_size={group_size}")
    n_groups = k // group_size
    codes = unpack_columns(qweight, bits, interleave=False)            # [N, K]
    zeros = unpack_columns(qzeros, bits, interleave=False)[:, :n_groups]  # [N, K/g]
    sc = scales[:, :n_groups]                                            # [N, K/g]
    return (pack_columns(codes.t().contiguous(), bits), pack_columns(zeros.t().contiguous(), bits),
            sc.t().contiguous().to(torch.float16))

"""Quantization primitives: small, stateless functions on plain tensors.

Convention: a weight ``w`` is [out, in] (``nn.Linear.weight``); groups run along
``in``.  Quantization parameters are [out, in/g].  ``scale`` is rounded to fp16
*before* the codes are computed, so that what the search evaluates
(:func:`fake_quantize`) is bit-for-bit what the checkpoint dequantizes to.
"""

from __future__ import annotations

import torch

STORE_DTYPE = torch.float16  # the scales dtype of the AWQ format


def effective_group_size(group_size: int, in_features: int) -> int:
    """The number of input features sharing one (scale, zero): ``group_size``, or all of them for
    -1 (AutoAWQ's "one group per output channel"; 0 is read the same way)."""
    return in_features if group_size in (-1, 0) else group_size


def pack_factor(bits: int) -> int:
    """How many ``bits``-wide codes one int32 holds."""
    if 32 % bits:
        raise ValueError(f"bits={bits} does not divide 32; supported widths: 2, 4, 8")
    return 32 // bits


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    inp = w.shape[-1]
    g = effective_group_size(group_size, inp)
    if inp % g:
        raise ValueError(f"in_features={inp} is not a multiple of group_size={g}")
    return w.reshape(*w.shape[:-1], inp // g, g)


def compute_qparams(w: torch.Tensor, bits: int = 4, group_size: int = 128,
                    zero_point: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters for ``w`` [..., out, in] -> (scale, zero) [..., out, in/g].

    Zero point: scale = (max - min) / (2^b - 1), zero = -round(min / scale).
    Symmetric: scale = absmax / (2^(b-1) - 1), zero = 2^(b-1) (the AWQ format
    always stores unsigned codes with a zero point; symmetric means z is fixed).
    """
    wg = _grouped(w.float(), group_size)
    maxq = 2**bits - 1
    if zero_point:
        wmax = wg.amax(dim=-1)
        wmin = wg.amin(dim=-1)
        scale = ((wmax - wmin).clamp(min=1e-5) / maxq)
        scale = scale.clamp(max=torch.finfo(STORE_DTYPE).max).to(STORE_DTYPE).float()
        zero = (-torch.round(wmin / scale)).clamp(0, maxq)
    else:
        half = 2 ** (bits - 1)
        scale = (wg.abs().amax(dim=-1).clamp(min=1e-5) / (half - 1))
        scale = scale.clamp(max=torch.finfo(STORE_DTYPE).max).to(STORE_DTYPE).float()
        zero = torch.full_like(scale, float(half))
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Integer codes in [0, 2^b - 1], int32, same shape as ``w``."""
    wg = _grouped(w.float(), w.shape[-1] // scale.shape[-1])
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - z) * s in fp32, same shape as ``q``."""
    qg = _grouped(q.float(), q.shape[-1] // scale.shape[-1])
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def clamp_groups(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``wg`` [out, n_groups, g] clamped to each group's range [lo, hi] (each [out, n_groups, 1])."""
    return torch.minimum(torch.maximum(wg, lo), hi)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True) -> torch.Tensor:
    """quantize -> dequantize (round-to-nearest), returned in ``w``'s dtype."""
    scale, zero = compute_qparams(w, bits, group_size, zero_point)
    return dequantize(quantize(w, scale, zero, bits), scale, zero).to(w.dtype)


# Work on weights in row chunks of about this many fp32 bytes: quantization groups lie within a
# row, so chunks are independent, and the temporaries stay a few small chunks instead of a few
# copies of the largest weight in the block, which is what bounds peak memory when quantizing
# lazily.  Measured (bench_memory.py, 2048 x 5632 linears): 4 MB chunks gave the lowest peak RSS
# and were faster than 16 MB ones (glibc reuses small freed chunks; large ones fragment the heap).
ROW_CHUNK_BYTES = 4 << 20


def row_chunks(w: torch.Tensor, multiple: int = 1, chunk_bytes: int = ROW_CHUNK_BYTES) -> list[slice]:
    """Slices of ``w``'s rows (dim 0), each ~``chunk_bytes`` of fp32, a multiple of ``multiple`` rows."""
    step = max(multiple, chunk_bytes // (4 * w.shape[-1]) // multiple * multiple)
    return [slice(r, r + step) for r in range(0, w.shape[0], step)]


FINITE_CHUNK = 1 << 24  # elements checked at a time: the temporaries stay ~16 MB whatever the tensor


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/inf values ``t`` holds (0 for an integer tensor), in one pass over chunks (a
    checkpoint's embedding can be GBs; its bool mask should not be)."""
    if not t.is_floating_point():
        return 0
    flat, n = t.reshape(-1), 0
    for i in range(0, flat.numel(), FINITE_CHUNK):
        c = flat[i:i + FINITE_CHUNK]
        if c.element_size() == 1:  # torch has no isfinite for float8_e4m3fn; fp16 holds every fp8 value
            c = c.to(torch.float16)
        ok = torch.isfinite(c)
        if not bool(ok.all()):
            n += int((~ok).sum())
    return n

"""How close the CUDA block ops (csrc/awq_block_ops.cu) must be to the reference (awqlib/blockops.py).

The kernels round where the reference rounds; they may differ from it only in fp32 values that
come from a reduction or a transcendental (rms_norm's sum of squares and rsqrtf; silu's expf,
gelu's tanhf).  Each check therefore bounds that fp32 value around its exact (float64) value,
takes every dtype value it could round to (one step wider than the bound on either side), and
applies the rest of the reference's roundings to both ends: every output must lie in between
(rounding is monotone).  That alone would let a kernel skip one of the roundings (the result moves
by less than the bound), so where the output dtype is fp16 or bf16 the check also asks that
`exact_share` of the outputs equal the reference bit for bit: an fp32 difference of a few ulps
changes the rounded value of about 2^-10 of the elements, a rounding left out a quarter or more.

Everything here runs on CPU tensors (the inputs the kernel was given, copied back).
"""

from __future__ import annotations

import math

import torch

from awqlib import blockops

# The kernels' fp32 intermediates are within this relative distance of their exact values: sums of
# squares in another order, rsqrtf (2 ulp), expf / tanhf (2 ulp) -- each a few 2^-23 -- 8x over.
RMS_REL = 2.0 ** -19
ACT_REL = 2.0 ** -21
EXACT_SHARE = 0.99


def rotary_id(batch, seq, q_heads, k_heads, head_dim, rot_dim) -> str:
    """A test id for a rotary shape: b<batch>s<seq>h<q heads>-<k heads>d<head dim>r<rotary dim>."""
    return f"b{batch}s{seq}h{q_heads}-{k_heads}d{head_dim}r{rot_dim}"


def _widen(lo64: torch.Tensor, hi64: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of `dtype` at or below lo64 and at or above hi64: rounded, then one step outward."""
    lo, hi = lo64.to(dtype), hi64.to(dtype)
    return (torch.nextafter(lo, torch.full_like(lo, -math.inf)), torch.nextafter(hi, torch.full_like(hi, math.inf)))


def _inside(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str):
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    ok = (out >= lo) & (out <= hi)  # NaN (an element never written, after poisoning) is outside
    if not ok.all():
        i = int((~ok).flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {out.numel()} outputs outside the bound; first at flat "
                             f"index {i}: {out.flatten()[i].item()!r} not in [{lo.flatten()[i].item()!r}, "
                             f"{hi.flatten()[i].item()!r}]")


def _exact_share(out: torch.Tensor, ref: torch.Tensor, what: str, where: torch.Tensor | None = None):
    if out.dtype == torch.float32:
        return  # no rounding after the fp32 values that may differ: every element shows their last bits
    same = out == ref
    if where is not None:
        same = same[where]
    share = same.float().mean().item() if same.numel() else 1.0
    assert share >= EXACT_SHARE, f"{what}: only {share:.4f} of the outputs equal the reference bit for bit"


def _same_meta(out: torch.Tensor, ref: torch.Tensor, what: str):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, out.dtype, ref.shape, ref.dtype)
    assert out.is_contiguous(), f"{what}: output not contiguous (strides {out.stride()})"


def check_rms_norm(out, x, weight, eps, weight_offset=0.0, scale_in_fp32=False, what="rms_norm"):
    out, x, weight = out.cpu(), x.cpu(), weight.cpu()
    ref = blockops._reference_rms_norm(x, weight, eps, weight_offset, scale_in_fp32)
    _same_meta(out, ref, what)
    x64 = x.double()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    d = y64.abs() * RMS_REL
    if scale_in_fp32:  # round(y * (offset + w)), y and the product in fp32
        ylo, yhi = _widen(y64 - d, y64 + d, torch.float32)
        f = weight_offset + weight.float()
        a, b = (ylo * f).to(x.dtype), (yhi * f).to(x.dtype)
    else:  # round(w * round(y))
        ylo, yhi = _widen(y64 - d, y64 + d, x.dtype)
        a, b = weight * ylo, weight * yhi
    _inside(out, a, b, what)
    _exact_share(out, ref, what)


def check_gated_act(out, gate, up, act, what="gated_act"):
    out, gate, up = out.cpu(), gate.cpu(), up.cpu()
    ref = blockops._reference_gated_act(gate, up, act)
    _same_meta(out, ref, what)
    g64 = gate.double()
    if act == "silu":
        a64 = g64 * torch.sigmoid(g64)
    else:
        a64 = 0.5 * g64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64 ** 3)))
    # |x| too: gelu's 1 + tanh cancels for x << 0, where an ulp of tanh near -1 is an absolute error
    d = (a64.abs() + g64.abs()) * ACT_REL
    alo, ahi = _widen(a64 - d, a64 + d, gate.dtype)  # round(act(gate)), then round(that * up)
    _inside(out, alo * up, ahi * up, what)
    # where gelu cancels (gate < -3) the rounded activation differs more often: bounded above, not counted
    _exact_share(out, ref, what, where=None if act == "silu" else gate > -3)


def check_rotary(outs, q, k, cos, sin, unsqueeze_dim, what="rotary"):
    """Bit for bit: every product and sum is one correctly rounded fp32 operation, then rounded to
    the dtype, exactly as the reference's tensor ops (which compute fp16/bf16 in fp32) round."""
    refs = blockops._reference_rotary(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), unsqueeze_dim)
    for name, out, ref in zip("qk", outs, refs):
        out = out.cpu()
        _same_meta(out, ref, f"{what} {name}")
        if not torch.equal(out, ref):
            bad = out != ref
            raise AssertionError(f"{what} {name}: {int(bad.sum())} of {out.numel()} differ from the reference, first "
                                 f"at {tuple(int(i) for i in bad.nonzero()[0])}")

"""The decoder block's small ops, one ``torch.library`` op each: RMSNorm (alone, or with the residual
add before it), rotary embedding, gated activation.

At decode a block's linears move a few megabytes each, while everything around them (two norms,
the rotary embedding of q and k, the activation) is a few kilobytes spread over ~35 separate
kernels in transformers' code: on an H200 a decode-sized forward of an 8B model spends about as
long in them as in its int4 linears, and HF ``generate`` spends its host time dispatching them.
Each op here is one kernel on CUDA (``csrc/awq_block_ops.cu``) and one dispatcher call.

The reference implementations (``CompositeExplicitAutograd``: every device) are transformers'
own expressions, with the same roundings, so on the CPU a block using these ops gives the bits the
unmodified block gives; the CUDA kernels compute the same function (each rounding where
transformers rounds), allowed to differ by the last bit of a reduction or a transcendental.
Outputs are contiguous on every device, as the CUDA kernels write them and as the fake
implementations say (torch.compile lays memory out by the fake's strides).
``awqlib.fuse`` decides where a model may use them.  This module only declares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import wants_grad

ACTIVATIONS = ("silu", "gelu_tanh")  # gated_act's `act`: transformers' "silu" and "gelu_pytorch_tanh"

_lib = torch.library.Library("awqlib", "FRAGMENT")
# RMSNorm over the last dim.  scale_in_fp32=False (Llama, Qwen, Mistral, Phi-3):
#   weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)        -- the normalized x rounded, then scaled
# scale_in_fp32=True (Gemma: weight_offset 1, the weights store w - 1):
#   ((x * rsqrt(mean(x^2) + eps)) * (weight_offset + weight)).to(x.dtype)   -- all in fp32, one rounding
_lib.define("rms_norm(Tensor x, Tensor weight, float eps, float weight_offset, bool scale_in_fp32) -> Tensor")
# The residual add before a block's second norm and that norm, in one op: (residual + x, rms_norm(residual + x)),
# the sum rounded to its dtype as torch's add rounds it (the norm reads the rounded sum).
_lib.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float weight_offset, "
            "bool scale_in_fp32) -> (Tensor, Tensor)")
# Rotary embedding of q and k in one call, transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin
# over the first R = cos.shape[-1] features of each head (R <= head_dim, even; the rest pass through),
# cos/sin of shape [batch or 1, seq, R] unsqueezed at `unsqueeze_dim` (1: q is [batch, heads, seq, dim];
# 2: [batch, seq, heads, dim]).
_lib.define("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim) -> (Tensor, Tensor)")
# act(gate) * up, elementwise (gate and up: same shape, e.g. the two halves of a fused gate/up GEMM).
_lib.define("gated_act(Tensor gate, Tensor up, str act) -> Tensor")


def _check_rms_norm(weight_offset, scale_in_fp32):
    if weight_offset and not scale_in_fp32:
        raise ValueError("rms_norm: weight_offset needs scale_in_fp32=True (no model rounds first and offsets)")


def _reference_rms_norm(x, weight, eps, weight_offset, scale_in_fp32):
    _check_rms_norm(weight_offset, scale_in_fp32)
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:
        return (y * (weight_offset + weight.float())).to(x.dtype).contiguous()
    return (weight * y.to(x.dtype)).contiguous()


def _reference_add_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32):
    _check_rms_norm(weight_offset, scale_in_fp32)
    s = (residual + x).contiguous()
    return s, _reference_rms_norm(s, weight, eps, weight_offset, scale_in_fp32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rotary(q, k, cos, sin, unsqueeze_dim):
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rotary: unsqueeze_dim must be 1 ([batch, heads, seq, dim]) or 2 ([batch, seq, heads, "
                         f"dim]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D and cos {tuple(cos.shape)} / "
                         f"sin {tuple(sin.shape)} 3-D of one shape")
    r, d = cos.shape[-1], q.shape[-1]
    if r % 2 or r > d or k.shape[-1] != d:
        raise ValueError(f"rotary: rotary dim {r} must be even and <= the head dim {d} of q and k")


def _reference_rotary(q, k, cos, sin, unsqueeze_dim):
    _check_rotary(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]

    def rotate(x):
        if r == x.shape[-1]:
            return ((x * cos) + (_rotate_half(x) * sin)).contiguous()
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat([(x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass], dim=-1).contiguous()

    return rotate(q), rotate(k)


def _check_gated(gate, up, act):
    if act not in ACTIVATIONS:
        raise ValueError(f"gated_act: act {act!r} is not one of {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape:
        raise ValueError(f"gated_act: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")


def _reference_gated_act(gate, up, act):
    _check_gated(gate, up, act)
    return ((F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up).contiguous()


_lib.impl("rms_norm", _reference_rms_norm, "CompositeExplicitAutograd")
_lib.impl("add_rms_norm", _reference_add_rms_norm, "CompositeExplicitAutograd")
_lib.impl("rotary", _reference_rotary, "CompositeExplicitAutograd")
_lib.impl("gated_act", _reference_gated_act, "CompositeExplicitAutograd")


@torch.library.register_fake("awqlib::rms_norm")
def _fake_rms_norm(x, weight, eps, weight_offset, scale_in_fp32):
    _check_rms_norm(weight_offset, scale_in_fp32)
    dtype = x.dtype if scale_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("awqlib::add_rms_norm")
def _fake_add_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32):
    s = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.result_type(residual, x),
                    device=x.device)
    return s, _fake_rms_norm(s, weight, eps, weight_offset, scale_in_fp32)


# the outputs' dtypes follow the reference's type promotion (e.g. bf16 q with fp32 cos gives fp32)
@torch.library.register_fake("awqlib::rotary")
def _fake_rotary(q, k, cos, sin, unsqueeze_dim):
    _check_rotary(q, k, cos, sin, unsqueeze_dim)
    table = torch.promote_types(cos.dtype, sin.dtype)
    return (q.new_empty(q.shape, dtype=torch.promote_types(q.dtype, table)),
            k.new_empty(k.shape, dtype=torch.promote_types(k.dtype, table)))


@torch.library.register_fake("awqlib::gated_act")
def _fake_gated_act(gate, up, act):
    _check_gated(gate, up, act)
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


# The ops have no autograd kernel: one registered from Python runs a Python step on every call,
# no_grad included (~5 us each here), which decode, where these ops matter, cannot afford.  Where a
# gradient is wanted the wrappers below run the reference expression itself, which autograd
# differentiates (training pays its kernels; inference keeps one).  ops.wants_grad decides.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
             scale_in_fp32: bool = False) -> torch.Tensor:
    if wants_grad(x, weight):
        return _reference_rms_norm(x, weight, eps, weight_offset, scale_in_fp32)
    return torch.ops.awqlib.rms_norm(x, weight, eps, weight_offset, scale_in_fp32)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
                 scale_in_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)) in one op."""
    if wants_grad(x, residual, weight):
        return _reference_add_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32)
    return torch.ops.awqlib.add_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if wants_grad(q, k, cos, sin):
        return _reference_rotary(q, k, cos, sin, unsqueeze_dim)
    return torch.ops.awqlib.rotary(q, k, cos, sin, unsqueeze_dim)


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    if wants_grad(gate, up):
        return _reference_gated_act(gate, up, act)
    return torch.ops.awqlib.gated_act(gate, up, act)

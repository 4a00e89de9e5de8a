"""WQLinear: an nn.Linear replacement holding a weight in the AWQ GEMM layout."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .packing import dequantize_gemm, pack_awq
from .quant import compute_qparams, quantize


class WQLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored as packed int4 (see :mod:`awqlib.packing`).

    Buffers are exactly the checkpoint tensors: ``qweight`` int32 [in, out/8],
    ``qzeros`` int32 [in/g, out/8], ``scales`` fp16 [in/g, out], ``bias`` fp16 [out].
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, device=None):
        super().__init__()
        g = in_features if group_size in (-1, 0) else group_size
        pf = 32 // bits
        if in_features % g or out_features % pf:
            raise ValueError(f"WQLinear({in_features} -> {out_features}): in_features must be a multiple of "
                             f"group_size={g} and out_features a multiple of {pf}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // pf, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(in_features // g, out_features // pf, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(in_features // g, out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                    qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> "WQLinear":
        """Round-to-nearest quantize ``linear.weight`` (or use the given (scale, zero) [out, in/g])."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, device=w.device)
        scale, zero = qparams if qparams is not None else compute_qparams(w, bits, group_size, zero_point)
        q = quantize(w, scale, zero, bits)                    # [out, in]
        m.qweight, m.qzeros = pack_awq(q.t().contiguous(), zero.t().to(torch.int32).contiguous(), bits)
        m.scales = scale.t().contiguous().to(torch.float16)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(torch.float16).clone()
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        return dequantize_gemm(self.qweight, self.qzeros, self.scales, self.group_size, self.bits, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.announce(x.device)
        out = ops.awq_gemm(x, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

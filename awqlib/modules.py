"""WQLinear: an nn.Linear replacement holding a weight in the AWQ GEMM layout."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, ops
from .packing import as_gemm_layout, can_tile, dequantize_gemm, pack_awq, tile_for_kernels
from .quant import compute_qparams, effective_group_size, pack_factor, quantize, row_chunks


class WQLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored as packed int4 (see :mod:`awqlib.packing`).

    Buffers are exactly the checkpoint tensors: ``qweight`` int32 [in, out/8],
    ``qzeros`` int32 [in/g, out/8], ``scales`` fp16 [in/g, out], ``bias`` fp16 [out].
    After :meth:`tile_for_kernels` ``qweight`` holds the same words in the warp-tiled runtime
    layout [out/64, in/32, 256]; ``state_dict()`` still gives (and ``load_state_dict`` still takes)
    the GEMM layout, so checkpoints never see the runtime layout.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, device=None):
        super().__init__()
        g = effective_group_size(group_size, in_features)
        pf = pack_factor(bits)
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
        self._register_state_dict_hook(_state_dict_gemm_layout)
        self._register_load_state_dict_pre_hook(_load_into_layout, with_module=True)

    @property
    def tiled(self) -> bool:
        return self.qweight.dim() == 3

    def tile_for_kernels(self) -> bool:
        """Repack ``qweight`` into the warp-tiled layout the CUDA kernels stream fastest (once, at
        load time); False (and nothing changes) where the shape does not allow it."""
        if self.tiled:
            return True
        if not can_tile(self.in_features, self.out_features, self.group_size, self.bits):
            return False
        self.qweight = tile_for_kernels(self.qweight)
        return True

    def gemm_qweight(self) -> torch.Tensor:
        """``qweight`` in the GEMM (checkpoint) layout, whichever layout the module holds."""
        return as_gemm_layout(self.qweight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                    qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> "WQLinear":
        """Round-to-nearest quantize ``linear.weight`` (or use the given (scale, zero) [out, in/g])."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, device=w.device)
        pf = pack_factor(bits)
        # Output rows in chunks (a multiple of the pack factor): the temporaries stay small however
        # large the weight is.  Rows are independent, so this is exact.
        for r in row_chunks(w, multiple=pf):
            r0 = r.start
            scale, zero = (qparams[0][r], qparams[1][r]) if qparams is not None else \
                compute_qparams(w[r], bits, group_size, zero_point)
            q = quantize(w[r], scale, zero, bits)                    # [rows, in]
            qw, qz = pack_awq(q.t().contiguous(), zero.t().to(torch.int32).contiguous(), bits)
            m.qweight[:, r0 // pf: r0 // pf + qw.shape[1]] = qw
            m.qzeros[:, r0 // pf: r0 // pf + qz.shape[1]] = qz
            m.scales[:, r] = scale.t().to(torch.float16)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(torch.float16).clone()
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        return dequantize_gemm(self.qweight, self.qzeros, self.scales, self.group_size, self.bits, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels.announce(x.device)
        out = ops.awq_gemm(x, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _state_dict_gemm_layout(module: WQLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "qweight"
    if key in state_dict and state_dict[key].dim() == 3:
        state_dict[key] = as_gemm_layout(state_dict[key])


def _load_into_layout(module: WQLinear, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "qweight"
    if module.tiled and key in state_dict and state_dict[key].dim() == 2:
        state_dict[key] = tile_for_kernels(state_dict[key])

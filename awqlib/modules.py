"""WQLinear: an nn.Linear replacement holding a weight in the AWQ GEMM layout."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import kernels, ops
from .packing import (as_gemm_params, can_use_layout, dequantize_gemm, layout_of, pack_awq, runtime_layout,
                      stream_serves_decode, to_layout)
from .quant import compute_qparams, effective_group_size, pack_factor, quantize, row_chunks

log = logging.getLogger("awqlib")

KERNEL_DEVICE_TYPES = ("cuda",)  # where the CUDA extension serves the ops (elsewhere: the reference)


class WQLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored as packed int4 (see :mod:`awqlib.packing`).

    Buffers are exactly the checkpoint tensors: ``qweight`` int32 [in, out/8],
    ``qzeros`` int32 [in/g, out/8], ``scales`` fp16 [in/g, out], ``bias`` fp16 [out].
    :attr:`layout` names how they are stored ("gemm", or a runtime layout the CUDA kernels read
    faster: "tiled" [out/64, in/32, 256], "stream" [out/64, in/16, 128] with permuted zeros and
    scales; :mod:`awqlib.packing`); :meth:`set_layout` repacks.  ``state_dict()`` always gives
    (and ``load_state_dict`` always takes) the GEMM layout, so checkpoints never see a runtime one.
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
        self._scales_cast: torch.Tensor | None = None  # scales_for's converted copy (not a buffer)
        self._register_state_dict_hook(_state_dict_gemm_layout)
        self._register_load_state_dict_pre_hook(_load_into_layout, with_module=True)

    @property
    def layout(self) -> str:
        """"gemm", "tiled" or "stream" (:mod:`awqlib.packing`)."""
        return layout_of(self.qweight)

    @property
    def tiled(self) -> bool:
        """True in a runtime layout (any but the checkpoint's GEMM layout)."""
        return self.layout != "gemm"

    def set_layout(self, layout: str) -> bool:
        """Repack ``qweight`` (and, for "stream", ``qzeros`` and ``scales``) into ``layout``, exactly;
        False (and nothing changes) where the shape does not allow it."""
        if layout == self.layout:
            return True
        if not can_use_layout(layout, self.in_features, self.out_features, self.group_size, self.bits):
            return False
        self.qweight, self.qzeros, self.scales = to_layout(layout, self.qweight, self.qzeros, self.scales)
        self._scales_cast = None
        return True

    def tile_for_kernels(self) -> bool:
        """Repack into the runtime layout the CUDA kernels serve (:func:`awqlib.packing.runtime_layout`:
        "stream", or $AWQLIB_LAYOUT), once, after a load or an in-process quantize; False where the
        shape allows none.  A group size the stream kernel cannot take at one token gets the tiled
        layout (its skinny kernel takes it) instead of dequantize + cuBLAS at every decode step."""
        if self.tiled:
            return True
        layout = runtime_layout()
        if layout == "stream" and not stream_serves_decode(self.in_features, self.out_features, self.group_size,
                                                           self.bits):
            layout = "tiled"
        return self.set_layout(layout)

    def gemm_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, qzeros, scales) in the GEMM (checkpoint) layout, whichever layout the module holds."""
        return as_gemm_params(self.qweight, self.qzeros, self.scales)

    def gemm_qweight(self) -> torch.Tensor:
        """``qweight`` in the GEMM (checkpoint) layout, whichever layout the module holds."""
        return self.gemm_params()[0]

    def scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        """``scales`` in the activations' dtype.  The fp16 buffer stays the exported one; a bf16 copy
        is made once, not on every call, and dropped whenever the buffer may change (repack, load,
        ``.to()``; code that writes into ``scales`` in place must call :meth:`set_layout` or reload)."""
        s = self.scales
        if s.dtype == dtype or dtype not in (torch.float16, torch.bfloat16):
            return s
        cast = self._scales_cast
        if cast is None or cast.dtype != dtype or cast.device != s.device:
            cast = self._scales_cast = s.to(dtype)
        return cast

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.cpu()``, ``.half()`` ...; where that moves the weights to another
        device, the layout follows: onto a device the kernels serve, GEMM-layout weights are repacked
        for the kernels (as a load onto that device would), so a model loaded on the CPU and moved
        runs the same kernels as one loaded in place; onto the CPU, a runtime layout goes back to the
        GEMM layout (the one the reference reads fastest).  A cast or a move to the same device
        leaves the buffers as they are (a captured graph may hold them).  (Weights accelerate moves
        in for an offloaded module's forward are set, not ``_apply``-ed: they stay in the GEMM layout,
        which the kernels read too; ``AWQModel.tile_for_kernels()`` repacks after any other mover.)"""
        self._scales_cast = None
        before = self.qweight.device
        if self.layout == "gemm" and before.type not in KERNEL_DEVICE_TYPES and torch.cuda.is_available():
            runtime_layout()  # a bad $AWQLIB_LAYOUT fails before this module moves, not half-way through it
        out = super()._apply(fn, *args, **kwargs)
        self._follow_device(before)
        return out

    def _follow_device(self, before: torch.device) -> None:
        """The layout for where the weights are now, having been on ``before`` (see :meth:`_apply`)."""
        q = self.qweight
        if type(q) is not torch.Tensor or q.device == before:
            return
        if q.device.type in KERNEL_DEVICE_TYPES:
            if self.layout == "gemm" and kernels.load():
                self.tile_for_kernels()
        elif q.device.type == "cpu" and self.tiled:
            self.set_layout("gemm")

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
        out = ops.awq_gemm(x, self.qweight, self.qzeros, self.scales_for(x.dtype), self.group_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` (a layer's residual add after its last linear): one op, which the
        CUDA stream kernel runs in its epilogue."""
        if self.bias is not None:
            return residual + self.forward(x)
        kernels.announce(x.device)
        return ops.awq_gemm_add(x, self.qweight, self.qzeros, self.scales_for(x.dtype), self.group_size, residual)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _state_dict_gemm_layout(module: WQLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    keys = [prefix + k for k in ("qweight", "qzeros", "scales")]
    if all(k in state_dict for k in keys) and layout_of(state_dict[keys[0]]) != "gemm":
        for k, v in zip(keys, as_gemm_params(*(state_dict[k] for k in keys))):
            state_dict[k] = v


def _load_into_layout(module: WQLinear, state_dict: dict, prefix: str, *args) -> None:
    module._scales_cast = None
    keys = [prefix + k for k in ("qweight", "qzeros", "scales")]
    if module.layout == "gemm" or not all(k in state_dict for k in keys):
        return
    if layout_of(state_dict[keys[0]]) == "gemm":
        for k, v in zip(keys, to_layout(module.layout, *(state_dict[k] for k in keys))):
            state_dict[k] = v


def repack_for_kernels(model: nn.Module) -> int:
    """Repack every quantized linear whose weights are on CUDA into the runtime layout the kernels
    serve (:meth:`WQLinear.tile_for_kernels`), so only that layout reaches them after a load and
    after an in-process quantize alike (and :meth:`WQLinear._apply` after a move onto CUDA).  A linear
    on (or offloaded to) the CPU or disk stays in the GEMM layout, which every path reads.  Returns
    how many were repacked now (not those already in a runtime layout); 0 without the kernels."""
    linears = [m for m in model.modules() if isinstance(m, WQLinear) and m.qweight.device.type in KERNEL_DEVICE_TYPES]
    if not linears or not kernels.load():
        return 0
    n = sum(m.tile_for_kernels() for m in linears if not m.tiled)
    layouts = sorted({m.layout for m in linears})
    log.info("awqlib: %d of %d quantized linears on CUDA repacked for the kernels (layouts now: %s)",
             n, len(linears), ", ".join(layouts))
    return n

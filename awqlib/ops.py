"""The quantized-matmul ops, dispatched through ``torch.library``.

``torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)`` computes
``x @ W^T`` for a weight stored in the AWQ GEMM layout (``qweight`` 2-D) or in the warp-tiled
runtime layout the CUDA kernels read fastest (3-D; see :mod:`awqlib.packing`).

* The pure-PyTorch reference (dequantize, then matmul) is registered for
  ``CompositeExplicitAutograd`` and so runs on every device.
* The CUDA extension (``csrc/``) registers kernels for the ``CUDA`` key of the
  same op; once loaded, CUDA tensors go to them and everything else keeps the
  reference.  One call site, and ``torch.compile`` sees one opaque op with a
  fake (meta) implementation.

This module only declares; building, loading and choosing the backend is :mod:`awqlib.kernels`.
"""

from __future__ import annotations

import torch

from .packing import TILE_K, TILE_N, dequantize_gemm
from .quant import effective_group_size


def as_gemm_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """(K, N/8) of a qweight in the GEMM layout [K, N/8] or the warp-tiled one [N/64, K/32, 256]."""
    if qweight.dim() == 3:
        return qweight.shape[1] * TILE_K, qweight.shape[0] * TILE_N // 8
    return tuple(qweight.shape)


_lib = torch.library.Library("awqlib", "DEF")
_lib.define("awq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")
_lib.define("awq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")
# Same function as awq_gemm with the CUDA kernel choice forced, for tuning and tests (other devices
# ignore both knobs and run the reference).  kernel: 0 auto, 1 CUDA-core GEMV, 2 skinny tensor-core
# (register prefetch, 4 chunks deep), 3 tiled tensor-core GEMM, 4 dequantize + cuBLAS, 5 skinny
# (register prefetch, 2 deep).
# splits: 0 auto, else the split-K factor.
_lib.define("awq_gemm_variant(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size, "
            "int kernel, int splits) -> Tensor")


def _check(x, qweight, qzeros, scales, group_size):
    k, n8 = as_gemm_shape(qweight)
    if x.shape[-1] != k:
        raise ValueError(f"awq_gemm: input has {x.shape[-1]} features, the weight expects {k}")
    g = effective_group_size(group_size, k)
    if scales.shape != (k // g, n8 * 8) or qzeros.shape != (k // g, n8):
        raise ValueError(f"awq_gemm: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit "
                         f"qweight {tuple(qweight.shape)} with group_size {group_size}")


def _reference_gemm(x, qweight, qzeros, scales, group_size):
    _check(x, qweight, qzeros, scales, group_size)
    w = dequantize_gemm(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return torch.matmul(x, w)


def _reference_dequantize(qweight, qzeros, scales, group_size):
    return dequantize_gemm(qweight, qzeros, scales, group_size)


def _reference_gemm_variant(x, qweight, qzeros, scales, group_size, kernel, splits):
    return _reference_gemm(x, qweight, qzeros, scales, group_size)


_lib.impl("awq_gemm", _reference_gemm, "CompositeExplicitAutograd")
_lib.impl("awq_gemm_variant", _reference_gemm_variant, "CompositeExplicitAutograd")
_lib.impl("awq_dequantize", _reference_dequantize, "CompositeExplicitAutograd")


@torch.library.register_fake("awqlib::awq_gemm")
def _fake_gemm(x, qweight, qzeros, scales, group_size):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("awqlib::awq_gemm_variant")
def _fake_gemm_variant(x, qweight, qzeros, scales, group_size, kernel, splits):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("awqlib::awq_dequantize")
def _fake_dequantize(qweight, qzeros, scales, group_size):
    return scales.new_empty((as_gemm_shape(qweight)[0], scales.shape[1]))


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> torch.Tensor:
    return torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.awqlib.awq_dequantize(qweight, qzeros, scales, group_size)

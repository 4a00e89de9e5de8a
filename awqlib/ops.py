"""The quantized-matmul ops, dispatched through ``torch.library``.

``torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)`` computes
``x @ W^T`` for a weight stored in the AWQ GEMM layout (see :mod:`awqlib.packing`).

* The pure-PyTorch reference (dequantize, then matmul) is registered for
  ``CompositeExplicitAutograd`` and so runs on every device.
* The CUDA extension (``csrc/``) registers kernels for the ``CUDA`` key of the
  same op; once loaded, CUDA tensors go to them and everything else keeps the
  reference.  One call site, and ``torch.compile`` sees one opaque op with a
  fake (meta) implementation.
"""

from __future__ import annotations

import logging

import torch

from .packing import dequantize_gemm

log = logging.getLogger("awqlib")

_lib = torch.library.Library("awqlib", "DEF")
_lib.define("awq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")
_lib.define("awq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")


def _check(x, qweight, qzeros, scales, group_size):
    k, n8 = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"awq_gemm: input has {x.shape[-1]} features, the weight expects {k}")
    g = k if group_size in (-1, 0) else group_size
    if scales.shape != (k // g, n8 * 8) or qzeros.shape != (k // g, n8):
        raise ValueError(f"awq_gemm: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit "
                         f"qweight {tuple(qweight.shape)} with group_size {group_size}")


def _reference_gemm(x, qweight, qzeros, scales, group_size):
    _check(x, qweight, qzeros, scales, group_size)
    w = dequantize_gemm(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return torch.matmul(x, w)


def _reference_dequantize(qweight, qzeros, scales, group_size):
    return dequantize_gemm(qweight, qzeros, scales, group_size)


_lib.impl("awq_gemm", _reference_gemm, "CompositeExplicitAutograd")
_lib.impl("awq_dequantize", _reference_dequantize, "CompositeExplicitAutograd")


@torch.library.register_fake("awqlib::awq_gemm")
def _fake_gemm(x, qweight, qzeros, scales, group_size):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("awqlib::awq_dequantize")
def _fake_dequantize(qweight, qzeros, scales, group_size):
    return scales.new_empty((qweight.shape[0], scales.shape[1]))


_announced: set[str] = set()


def backend_for(device: torch.device) -> str:
    """Which implementation serves tensors on ``device`` (and build/load the kernels if it is CUDA)."""
    if device.type == "cuda":
        from . import kernels
        if kernels.load():
            return "cuda-kernels"
        return "reference (CUDA kernels unavailable)"
    return "reference"


def announce(device: torch.device) -> None:
    """Log once per device type which implementation runs."""
    if device.type in _announced:
        return
    _announced.add(device.type)
    log.info("awqlib: quantized linears on %s use the %s implementation", device.type, backend_for(device))


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> torch.Tensor:
    return torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.awqlib.awq_dequantize(qweight, qzeros, scales, group_size)

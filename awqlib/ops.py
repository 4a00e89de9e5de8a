"""The quantized-matmul ops, dispatched through ``torch.library``.

``torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)`` computes
``x @ W^T`` for a weight stored in the AWQ GEMM layout (``qweight`` 2-D) or in a runtime layout
the CUDA kernels read faster (3-D: warp-tiled or stream; see :mod:`awqlib.packing`).

* The pure-PyTorch reference (dequantize, then matmul) is registered for
  ``CompositeExplicitAutograd`` and so runs on every device.
* The CUDA extension (``csrc/``) registers kernels for the ``CUDA`` key of the
  same op; once loaded, CUDA tensors go to them and everything else keeps the
  reference.  One call site, and ``torch.compile`` sees one opaque op with a
  fake (meta) implementation.

This module only declares; building, loading and choosing the backend is :mod:`awqlib.kernels`.
"""

from __future__ import annotations

import enum

import torch

from .packing import STREAM_K, TILE_K, TILE_N, dequantize_gemm, layout_of
from .quant import effective_group_size


def as_gemm_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """(K, N/8) of a qweight in the GEMM layout [K, N/8], the warp-tiled one [N/64, K/32, 256] or the
    stream one [N/64, K/16, 128]."""
    layout = layout_of(qweight)
    if layout == "gemm":
        return tuple(qweight.shape)
    return qweight.shape[1] * (TILE_K if layout == "tiled" else STREAM_K), qweight.shape[0] * TILE_N // 8


class Kernel(enum.IntEnum):
    """Kernel ids of ``awq_gemm_variant`` (mirror of ``enum Kernel`` in csrc/awq_dispatch.h; a test
    checks that the two agree).  Ids 1 and 3 (a CUDA-core GEMV and a tiled mma.sync GEMM) are
    retired: the CUDA kernels refuse them as unknown."""
    AUTO = 0             # pick by layout and M (the dispatch awq_gemm uses)
    SKINNY = 2           # skinny tensor-core kernel, register ring 4 chunks deep, M <= 32 (GEMM or warp-tiled layout)
    DEQUANT_CUBLAS = 4   # dequantize (in bounded column chunks) + cuBLAS, any layout and M
    SKINNY_SHALLOW = 5   # skinny tensor-core kernel, register ring 2 chunks deep
    STREAM = 6           # streaming mma.sync kernel on the stream layout, passes of <= 64 rows (AUTO: one pass,
    #                      with group sums); the narrow kernels for passes of <= 8 rows unless AWQLIB_STREAM_NARROW=0;
    #                      with AWQLIB_STREAM_DEEP=1, a fourth ring stage at M <= 16 and 33-64 where it fits (H100/H200);
    #                      with AWQLIB_STREAM_WIDE=1, 256-column slices where every pass has 17-64 rows;
    #                      with AWQLIB_STREAM_WGMMA=1, warpgroup mma (an sm_90a build on an H100/H200) in passes
    #                      of <= 128 rows
    STREAM_GROUP_SUMS = 7  # the same, scaling per-group fp32 sums once per group where that pays (M <= 32, g >= 128)
    STREAM_COMPACT = 8   # STREAM in the compact shared-memory configuration (81/70 KB), passes of <= 32 rows: what
    #                      an A100 runs at M 17-32 and a ~100 KB-per-block GPU (A10, L4, L40S, RTX) at M <= 32
    STREAM_COMPACT_GROUP_SUMS = 9  # STREAM_GROUP_SUMS in the compact configuration (sums pay at M <= 16, g >= 64)


_lib = torch.library.Library("awqlib", "DEF")
_lib.define("awq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")
_lib.define("awq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor")
# residual + awq_gemm(x, ...): a decoder layer's residual add after its last linear, which the CUDA stream
# kernel does in its epilogue (one kernel instead of two; the same bits: the product rounded, then the sum).
_lib.define("awq_gemm_add(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size, Tensor residual) "
            "-> Tensor")
# Same function as awq_gemm with the CUDA kernel choice forced, for tuning and tests (other devices
# ignore both knobs and run the reference).  kernel: a Kernel id (above).  splits: 0 auto, else the
# split-K factor -- for the stream kernels, the most CTAs of their persistent grid (0: one per SM).
_lib.define("awq_gemm_variant(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size, "
            "int kernel, int splits) -> Tensor")
# A question about the loaded CUDA kernels, not a computation: whether AWQLIB_STREAM_WGMMA=1 runs
# their wgmma kernels on a GPU of this compute capability (awqlib.kernels.wgmma_available).  Only the
# library answers it (csrc/awq_ops.cpp registers it for every dispatch key); without it there is
# no implementation.  Defined here, with the other schemas, so that loading the library twice in a
# process only re-registers implementations (a second definition would abort the load).
_lib.define("stream_wgmma_runs_on(int major, int minor) -> bool")
# What awq_gemm_variant would run for these arguments under the current settings, without running
# it: the CUDA kernels name the first launch's kernel as scripts/sass_budget.py names kernels (or
# "dequant+cuBLAS"), refusing what awq_gemm_variant refuses; other devices run the reference.
_lib.define("awq_gemm_kernel_name(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size, "
            "int kernel, int splits) -> str")


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


def _reference_gemm_add(x, qweight, qzeros, scales, group_size, residual):
    return (residual + _reference_gemm(x, qweight, qzeros, scales, group_size)).contiguous()


def _reference_dequantize(qweight, qzeros, scales, group_size):
    return dequantize_gemm(qweight, qzeros, scales, group_size)


def _reference_gemm_variant(x, qweight, qzeros, scales, group_size, kernel, splits):
    return _reference_gemm(x, qweight, qzeros, scales, group_size)


_lib.impl("awq_gemm", _reference_gemm, "CompositeExplicitAutograd")
_lib.impl("awq_gemm_variant", _reference_gemm_variant, "CompositeExplicitAutograd")
_lib.impl("awq_gemm_add", _reference_gemm_add, "CompositeExplicitAutograd")
_lib.impl("awq_dequantize", _reference_dequantize, "CompositeExplicitAutograd")


def _reference_gemm_kernel_name(x, qweight, qzeros, scales, group_size, kernel, splits):
    _check(x, qweight, qzeros, scales, group_size)
    return "reference"


_lib.impl("awq_gemm_kernel_name", _reference_gemm_kernel_name, "CompositeExplicitAutograd")


@torch.library.register_fake("awqlib::awq_gemm")
def _fake_gemm(x, qweight, qzeros, scales, group_size):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("awqlib::awq_gemm_variant")
def _fake_gemm_variant(x, qweight, qzeros, scales, group_size, kernel, splits):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("awqlib::awq_gemm_add")
def _fake_gemm_add(x, qweight, qzeros, scales, group_size, residual):
    out = x.new_empty((*x.shape[:-1], scales.shape[1]))
    return x.new_empty(torch.broadcast_shapes(out.shape, residual.shape), dtype=torch.result_type(residual, out))


@torch.library.register_fake("awqlib::awq_dequantize")
def _fake_dequantize(qweight, qzeros, scales, group_size):
    return scales.new_empty((as_gemm_shape(qweight)[0], scales.shape[1]))


class _GemmWithInputGrad(torch.autograd.Function):
    """awq_gemm with a gradient for its input, for trainable modules around frozen int4 linears
    (LoRA adapters): d(x W)/dx = grad W^T, W dequantized for the backward only, as the reference's
    forward does.  The packed weights are integer codes with no gradient.  A Function rather than an
    autograd kernel registered on the op: that would run a Python step on every call, no_grad
    included (~5 us each here), which decode cannot afford."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, group_size):
        ctx.save_for_backward(qweight, qzeros, scales)
        ctx.group_size = group_size
        return torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)

    @staticmethod
    def backward(ctx, grad):
        qweight, qzeros, scales = ctx.saved_tensors
        # the op's own dequantize (the CUDA kernel on a GPU, bit-exact with the reference) where the
        # dtypes agree, as they do for fp16/bf16 activations (WQLinear.scales_for)
        w = (awq_dequantize(qweight, qzeros, scales, ctx.group_size) if scales.dtype == grad.dtype
             else dequantize_gemm(qweight, qzeros, scales, ctx.group_size, dtype=grad.dtype))
        return torch.matmul(grad, w.t()), None, None, None, None


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a gradient of any of ``tensors`` (the ops' wrappers then take a
    differentiable path; otherwise the op alone, with no Python step)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> torch.Tensor:
    if wants_grad(x):
        return _GemmWithInputGrad.apply(x, qweight, qzeros, scales, group_size)
    return torch.ops.awqlib.awq_gemm(x, qweight, qzeros, scales, group_size)


def awq_gemm_add(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, residual: torch.Tensor) -> torch.Tensor:
    """``residual + awq_gemm(x, ...)``, as one kernel where the CUDA stream kernel runs."""
    if wants_grad(x, residual):
        return residual + awq_gemm(x, qweight, qzeros, scales, group_size)
    return torch.ops.awqlib.awq_gemm_add(x, qweight, qzeros, scales, group_size, residual)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.awqlib.awq_dequantize(qweight, qzeros, scales, group_size)


def gemm_kernel_name(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int, kernel: Kernel = Kernel.AUTO, splits: int = 0) -> str:
    """The kernel ``awq_gemm_variant(x, ..., kernel, splits)`` would run (``Kernel.AUTO``: what
    :func:`awq_gemm` runs) under the current settings, without running it: on CUDA the first
    launch's kernel, its instantiation as ``scripts/sass_budget.py`` names it
    (``"awq_stream_kernel<half, 1, true, false, true, large, true>"``), or ``"dequant+cuBLAS"``;
    ``"reference"`` where the PyTorch reference runs.  Raises what the call would raise for a kernel
    that cannot serve it."""
    return torch.ops.awqlib.awq_gemm_kernel_name(x, qweight, qzeros, scales, group_size, int(kernel), splits)

// Launchers of the decoder block's small ops (csrc/awq_block_ops.cu).  Like awq_kernels.h for the
// GEMMs, they see raw pointers, sizes and strides only, so the kernels compile without the ATen
// headers (which cost nvcc over a minute of a first build); awq_block_ops.cpp checks the tensors,
// allocates the outputs, runs the reference expression where no kernel takes a call, and registers
// the ops.  Each launcher picks the kernel's geometry and vector width from what it is given (16-byte
// vectors wherever every pointer and stride allows them), so the host side decides only whether a
// kernel takes the call.  A launcher reports nothing: the caller checks the launch
// (C10_CUDA_KERNEL_LAUNCH_CHECK), as awq_ops.cpp does after the GEMM launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace awq {

// The element types the block-op kernels take: the tensor's dtype, every input alike.
enum class BlockElem { kHalf, kBFloat16, kFloat };
constexpr int kBlockVecBytes = 16;  // a thread's unit of work where aligned: one LDG.128 / STG.128
// The kernels index in 32 bits: a call whose rows or units of work (elements at worst) exceed this
// runs the reference expression instead.
constexpr uint32_t kBlockMaxUnits = static_cast<uint32_t>(std::numeric_limits<int32_t>::max());

// rms_norm / add_rms_norm over rows of `hidden` contiguous elements (residual and sum_out null for
// rms_norm; with them, sum_out = residual + x, which the norm reads).
struct NormCall {
  const void* x;
  const void* residual;
  const void* weight;
  void* out;
  void* sum_out;
  int64_t rows;
  int hidden;
  float eps, weight_offset;
  bool scale_in_fp32;
  BlockElem elem;
  cudaStream_t stream;
};
void launch_rms_norm(const NormCall& c);

// q or k seen as [d0, d1, d2, D] (rows in d0, d1, d2 order; the output row `row` is contiguous at
// row * D); d0 is the batch, the sequence index is d1 or d2 (RotaryArgs::seq_dim).  Strides in
// elements; D's is 1.
struct RotaryTensor {
  const void* in;
  void* out;
  uint32_t rows, d1, d2;
  int64_t stride0, stride1, stride2;
};

struct RotaryArgs {
  RotaryTensor q, k;
  const void* cos;
  const void* sin;
  int64_t cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s;  // stride_b 0: one cos row for every batch
  int seq_dim;                                                     // the dim of q/k holding the sequence: 1 or 2
  int head_dim, rot_dim;
  uint32_t units_per_row;  // rot_dim / 2 / elems pair units, then (head_dim - rot_dim) / elems pass-through units
  uint32_t units;          // (q.rows + k.rows) * units_per_row
};

// unsqueeze_dim 1: q is [B, H, S, D], the sequence in dim 2; unsqueeze_dim 2: [B, S, H, D], in dim 1.
constexpr int rotary_seq_dim(int64_t unsqueeze_dim) { return unsqueeze_dim == 1 ? 2 : 1; }

// Fills a's units_per_row and units (so a caller leaves them 0) and launches; nothing for no units.
void launch_rotary(RotaryArgs a, BlockElem elem, cudaStream_t stream);

// out[rows, features] (contiguous) = act(gate) * up, gate and up rows `*_row_stride` elements apart.
struct GatedCall {
  const void* gate;
  const void* up;
  void* out;
  int64_t gate_row_stride, up_row_stride;
  int64_t rows;
  int features;
  bool silu;  // else gelu with the tanh approximation
  BlockElem elem;
  cudaStream_t stream;
};
void launch_gated_act(const GatedCall& c);

}  // namespace awq

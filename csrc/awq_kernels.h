// Host-side launchers of the AWQ CUDA kernels.  The .cu files only see raw pointers so that they
// compile without the (slow to parse) ATen headers; awq_ops.cpp does the tensor checks,
// allocations (through the caching allocator, so CUDA-graph safe) and dispatch.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace awq {

enum class DType { kHalf, kBFloat16 };

// y[M, N] = x[M, K] @ W^T[K, N], W^T from the AWQ GEMM layout.
struct GemmArgs {
  const void* x;            // [M, K] activations (T), 16-byte aligned, contiguous
  const int32_t* qweight;   // [K, N/8]
  const int32_t* qzeros;    // [K/g, N/8]
  const void* scales;       // [K/g, N] (T)
  void* out;                // [M, N] (T)
  float* workspace;         // [splits, M, N] fp32 split-K partials (unused when splits == 1)
  int32_t* counters;        // one zero-initialised arrival counter per output tile (splits > 1)
  int M, N, K, group_size;
  int splits;
};

// A launch plan: how many split-K slices and how many output tiles (= counters needed).
struct Plan {
  int config;   // kernel variant (GEMM only)
  int splits;   // split-K factor (>= 1)
  int tiles;    // number of output tiles, i.e. counters to zero when splits > 1
};

// ---- GEMV / small batch: M in [1, kGemvMaxM], CUDA cores.
constexpr int kGemvMaxM = 8;
Plan plan_gemv(int M, int N, int K, int num_sms);
void launch_gemv(DType dt, const GemmArgs& a, cudaStream_t stream);

// ---- Tensor-core GEMM: M > kGemvMaxM.
Plan plan_gemm(int M, int N, int K, int num_sms);
void launch_gemm(DType dt, const GemmArgs& a, const Plan& plan, cudaStream_t stream);

// ---- Dequantize to a dense W^T [K, N] (T = scales' dtype).  Any N multiple of 8, any group
// size dividing K.
void launch_dequant(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                    int K, int N, int group_size, cudaStream_t stream);

// Requirements of the fused kernels (GEMV and GEMM); other shapes take dequantize + cuBLAS.
constexpr int kFusedNMultiple = 64;   // one warp of the GEMM covers 64 columns
constexpr int kFusedKMultiple = 32;   // one pipeline stage covers 32 rows of K
constexpr int kFusedGroupMultiple = 32;  // so a 32-row stage never straddles two groups

}  // namespace awq

// Dequantize the AWQ GEMM layout to a dense W^T [K, N] (element type T = the scales' dtype).
//
// Used by torch.ops.awqlib.awq_dequantize, by the large-M path (dequantize once, then one
// cuBLAS GEMM wins once the matmul is compute-bound) and by shapes the fused kernels do not
// cover.  It is purely memory-bound: each thread reads one packed word (8 columns of one k-row),
// its zero word and 8 scales (both L2-resident: shared by group_size rows) and writes 16 bytes.
// Consecutive threads take consecutive words of a row, so reads and writes are coalesced.
#include "awq_common.cuh"
#include "awq_kernels.h"

namespace awq {
namespace {

constexpr int kDequantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
awq_dequant_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                   const T* __restrict__ scales, T* __restrict__ out, int K, int N, int group_size) {
  const int N8 = N / 8;
  const size_t idx = (size_t)blockIdx.x * kDequantThreads + threadIdx.x;  // packed-word index
  if (idx >= (size_t)K * N8) return;
  const int k = static_cast<int>(idx / N8);
  const int j = static_cast<int>(idx % N8);
  const int grp = k / group_size;
  const uint32_t word = __ldg(qweight + idx);
  const uint32_t zword = __ldg(qzeros + (size_t)grp * N8 + j);
  const uint4 s8 = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + 8 * j));
  GroupParams<T> gp;
  gp.load(zword, s8);
  using T2 = typename Traits<T>::T2;
  uint4 o;
  o.x = as_u32<T2>(gp.dequant(word, 0));  // columns 8j+0, 8j+1
  o.y = as_u32<T2>(gp.dequant(word, 1));  // columns 8j+2, 8j+3
  o.z = as_u32<T2>(gp.dequant(word, 2));
  o.w = as_u32<T2>(gp.dequant(word, 3));
  reinterpret_cast<uint4*>(out)[idx] = o;  // out[k * N + 8 j] == 8 * idx
}

// The same for a warp-tiled qweight: one warp per 32 x 64 tile.  Lane l = 4 g + q reads its 32
// contiguous bytes (8 words: word g of the tile, rows 2q, 2q+1, 2q+8, 2q+9, +16 each) and
// writes 8 columns of each of those 8 rows; for each row the 8 lanes with the same q write 128
// contiguous bytes.
constexpr int kTileWarpsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(32 * kTileWarpsPerBlock)
awq_dequant_tiled_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                         const T* __restrict__ scales, T* __restrict__ out, int K, int N, int group_size) {
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x * kTileWarpsPerBlock + (threadIdx.x >> 5);
  const int KC = K / kTileK;
  if (tile >= (N / kTileN) * KC) return;
  const int nb = tile / KC, kc = tile % KC;
  const int g = lane >> 2, q = lane & 3;
  const int N8 = N / 8;
  const int word = nb * (kTileN / 8) + g;
  const int grp = kc * kTileK / group_size;
  const uint4* src = reinterpret_cast<const uint4*>(qweight) + ((size_t)tile * 32 + lane) * 2;
  const uint4 lo = __ldg(src), hi = __ldg(src + 1);
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  GroupParams<T> gp;
  gp.load(__ldg(qzeros + (size_t)grp * N8 + word),
          __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + 8 * word)));
  using T2 = typename Traits<T>::T2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int row = kc * kTileK + tile_row(j, q);
    uint4 o;
    o.x = as_u32<T2>(gp.dequant(w[j], 0));
    o.y = as_u32<T2>(gp.dequant(w[j], 1));
    o.z = as_u32<T2>(gp.dequant(w[j], 2));
    o.w = as_u32<T2>(gp.dequant(w[j], 3));
    *reinterpret_cast<uint4*>(out + (size_t)row * N + 8 * word) = o;
  }
}

}  // namespace

void launch_dequant_tiled(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                          int K, int N, int group_size, cudaStream_t stream) {
  const int tiles = (N / kTileN) * (K / kTileK);
  if (tiles == 0) return;
  const unsigned blocks = static_cast<unsigned>((tiles + kTileWarpsPerBlock - 1) / kTileWarpsPerBlock);
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight);
  const auto* qz = reinterpret_cast<const uint32_t*>(qzeros);
  if (dt == DType::kHalf) {
    awq_dequant_tiled_kernel<__half><<<blocks, 32 * kTileWarpsPerBlock, 0, stream>>>(
        qw, qz, static_cast<const __half*>(scales), static_cast<__half*>(out), K, N, group_size);
  } else {
    awq_dequant_tiled_kernel<__nv_bfloat16><<<blocks, 32 * kTileWarpsPerBlock, 0, stream>>>(
        qw, qz, static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out), K, N, group_size);
  }
}

void launch_dequant(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out, int K,
                    int N, int group_size, cudaStream_t stream) {
  const size_t words = (size_t)K * (N / 8);
  if (words == 0) return;
  const unsigned blocks = static_cast<unsigned>((words + kDequantThreads - 1) / kDequantThreads);
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight);
  const auto* qz = reinterpret_cast<const uint32_t*>(qzeros);
  if (dt == DType::kHalf) {
    awq_dequant_kernel<__half><<<blocks, kDequantThreads, 0, stream>>>(
        qw, qz, static_cast<const __half*>(scales), static_cast<__half*>(out), K, N, group_size);
  } else {
    awq_dequant_kernel<__nv_bfloat16><<<blocks, kDequantThreads, 0, stream>>>(
        qw, qz, static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out), K, N, group_size);
  }
}

}  // namespace awq

// GEMV / small-batch kernel: y[M, N] = x[M, K] @ W^T, M = 1..8, on CUDA cores.
//
// Why CUDA cores: with M <= 8 there is almost no reuse of a weight, so the kernel is bound by
// reading the int4 weights from DRAM (K*N/2 bytes).  Everything below is about keeping enough
// bytes in flight and touching each weight exactly once for all M rows.
//
// Tiling.  A block of 8 warps owns kGemvBN = 256 output columns = 32 packed int32 words per
// k-row, i.e. exactly one word (8 columns) per lane.  The K dimension is cut into stages of
// kGemvBK = 32 rows; warp w handles rows w, w+8, w+16, w+24 of every stage, so a warp reads one
// 128-byte row of words per step (conflict-free shared loads) and the 8 warps' partial sums are
// added once at the end through shared memory.
//
// Pipelining.  Global -> shared copies use 16-byte cp.async (128-bit loads, no register
// staging) into a kGemvStages-deep ring: while the block computes stage s, the copies of the
// next kGemvStages-1 stages are in flight (5 x 4 KB per block).  Zero points, scales and the
// 32 x M activation slice ride in the same stage; since group_size % 32 == 0 a stage lies in a
// single quantization group.
//
// Math.  Each word is dequantized with lop3 + magic number into 4 (T, T) pairs of adjacent
// columns (see awq_common.cuh), converted to fp32 and multiply-added into fp32 accumulators
// acc[m][8] -- one pass over the weights serves all M rows.
//
// Filling the GPU.  N/256 column blocks are too few for e.g. N = 4096, so K is split across
// blockIdx.y.  Each split writes fp32 partials to a workspace; the last block to arrive at a
// column tile (atomic counter) sums the partials in a fixed order (deterministic) and writes the
// output.  No second kernel, no host sync; the counters come zeroed (awq_ops.cpp: counters_for)
// and the last block resets its own, for the next launch.
#include "awq_common.cuh"
#include "awq_kernels.h"

#include <algorithm>

namespace awq {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvBN = 256;                 // output columns per block
constexpr int kGemvWords = kGemvBN / 8;      // packed words per k-row and block == warp size
constexpr int kGemvBK = 32;                  // k rows per stage
constexpr int kGemvStages = 6;               // pipeline depth
constexpr int kGemvRowsPerWarp = kGemvBK / kGemvWarps;
// Split-K heuristics: aim for this many blocks per SM, but give every split at least
// kGemvMinTilesPerSplit stages of work so the pipeline has something to overlap.
constexpr int kGemvTargetBlocksPerSm = 4;
constexpr int kGemvMinTilesPerSplit = 4;

static_assert(kGemvWords == 32, "one packed word per lane");
static_assert(kGemvBK % kGemvWarps == 0, "rows split evenly over warps");

template <int M>
struct GemvStage {
  uint32_t w[kGemvBK * kGemvWords];   // 32 rows x 32 words  (4 KB)
  uint32_t z[kGemvWords];             // zero points of the stage's group
  uint4 s[kGemvBN / 8];               // 256 scales, 8 per uint4
  uint4 x[M * kGemvBK / 8];           // activations [M][32]
};

template <int M>
union GemvSmem {
  GemvStage<M> stage[kGemvStages];
  float red[kGemvWarps * kGemvBN];    // epilogue: per-warp partial sums
};

template <typename T, int M>
__global__ void __launch_bounds__(kGemvThreads)
awq_gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ ws, int32_t* __restrict__ counters,
                int N, int K, int group_size, int tiles_per_split) {
  __shared__ GemvSmem<M> sm;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int N8 = N / 8;
  const int n0 = blockIdx.x * kGemvBN;     // first output column of the block
  const int w0 = n0 / 8;                   // first packed word of the block
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  const int ktiles = K / kGemvBK;
  const int kt_begin = split * tiles_per_split;
  const int kt_end = min(kt_begin + tiles_per_split, ktiles);
  const int ntiles = kt_end - kt_begin;

  // One 16-byte copy per thread for the weights, a few threads for zeros/scales/activations.
  auto load_stage = [&](int slot, int kt) {
    GemvStage<M>& st = sm.stage[slot];
    const int k0 = kt * kGemvBK;
    const int grp = k0 / group_size;
    {
      const int r = tid / (kGemvWords / 4);          // 8 chunks per row
      const int c = tid % (kGemvWords / 4);
      const int word = w0 + 4 * c;
      const bool ok = word < N8;                      // N % 64 == 0: chunks are all-in or all-out
      cp_async16(&st.w[r * kGemvWords + 4 * c], ok ? (const void*)(qweight + (size_t)(k0 + r) * N8 + word) : qweight,
                 ok);
    }
    if (tid < kGemvWords / 4) {
      const int word = w0 + 4 * tid;
      const bool ok = word < N8;
      cp_async16(&st.z[4 * tid], ok ? (const void*)(qzeros + (size_t)grp * N8 + word) : qzeros, ok);
    } else if (tid >= 32 && tid < 32 + kGemvBN / 8) {
      const int i = tid - 32;
      const int col = n0 + 8 * i;
      const bool ok = col < N;
      cp_async16(&st.s[i], ok ? (const void*)(scales + (size_t)grp * N + col) : scales, ok);
    } else if (tid >= 64 && tid < 64 + M * (kGemvBK / 8)) {
      const int i = tid - 64;
      const int m = i / (kGemvBK / 8);
      const int c = i % (kGemvBK / 8);
      cp_async16(&st.x[i], x + (size_t)m * K + k0 + 8 * c, true);
    }
  };

  float acc[M][8];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.f;

  // Prologue: fill kGemvStages-1 slots.  Every iteration commits exactly one group (possibly
  // empty) so that wait_group<kGemvStages-2> always means "the tile I need has landed".
#pragma unroll
  for (int s = 0; s < kGemvStages - 1; ++s) {
    if (s < ntiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<kGemvStages - 2>();
    __syncthreads();  // tile t visible to all; everyone is done with the slot refilled below
    {
      const int nt = t + kGemvStages - 1;
      if (nt < ntiles) load_stage(nt % kGemvStages, kt_begin + nt);
      cp_async_commit();
    }
    const GemvStage<M>& st = sm.stage[t % kGemvStages];
    GroupParams<T> gp;
    gp.load(st.z[lane], st.s[lane]);
    const T* xs = reinterpret_cast<const T*>(st.x);
#pragma unroll
    for (int i = 0; i < kGemvRowsPerWarp; ++i) {
      const int r = warp + kGemvWarps * i;
      const uint32_t word = st.w[r * kGemvWords + lane];
      float xv[M];
#pragma unroll
      for (int m = 0; m < M; ++m) xv[m] = Traits<T>::to_float(xs[m * kGemvBK + r]);
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float2 f = Traits<T>::to_float2(gp.dequant(word, p));
#pragma unroll
        for (int m = 0; m < M; ++m) {
          acc[m][2 * p] = fmaf(xv[m], f.x, acc[m][2 * p]);
          acc[m][2 * p + 1] = fmaf(xv[m], f.y, acc[m][2 * p + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused for the reduction below

  // Sum the 8 warps' partials: thread tid finalises column n0 + tid.
  const int n = n0 + tid;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float4* dst = reinterpret_cast<float4*>(&sm.red[warp * kGemvBN + 8 * lane]);
    dst[0] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    dst[1] = make_float4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
    __syncthreads();
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += sm.red[w * kGemvBN + tid];
    if (n < N) {
      if (splits == 1) out[(size_t)m * N + n] = Traits<T>::from_float(v);
      else ws[((size_t)split * M + m) * N + n] = v;
    }
    __syncthreads();
  }
  if (splits == 1) return;

  // Split-K: the last block to finish this column tile reduces all partials.
  if (!arrive_last(&counters[blockIdx.x], splits)) return;
  if (n < N) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
      for (int s = 0; s < splits; ++s) v += __ldcg(&ws[((size_t)s * M + m) * N + n]);
      out[(size_t)m * N + n] = Traits<T>::from_float(v);
    }
  }
  if (tid == 0) counters[blockIdx.x] = 0;
}

template <typename T, int M>
void launch_gemv_m(const GemmArgs& a, int tiles_per_split, cudaStream_t stream) {
  const dim3 grid((a.N + kGemvBN - 1) / kGemvBN, a.splits);
  awq_gemv_kernel<T, M><<<grid, kGemvThreads, 0, stream>>>(
      static_cast<const T*>(a.x), reinterpret_cast<const uint32_t*>(a.qweight),
      reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const T*>(a.scales), static_cast<T*>(a.out),
      a.workspace, a.counters, a.N, a.K, a.group_size, tiles_per_split);
}

template <typename T>
void launch_gemv_t(const GemmArgs& a, int tps, cudaStream_t stream) {
  switch (a.M) {
    case 1: launch_gemv_m<T, 1>(a, tps, stream); break;
    case 2: launch_gemv_m<T, 2>(a, tps, stream); break;
    case 3: launch_gemv_m<T, 3>(a, tps, stream); break;
    case 4: launch_gemv_m<T, 4>(a, tps, stream); break;
    case 5: launch_gemv_m<T, 5>(a, tps, stream); break;
    case 6: launch_gemv_m<T, 6>(a, tps, stream); break;
    case 7: launch_gemv_m<T, 7>(a, tps, stream); break;
    case 8: launch_gemv_m<T, 8>(a, tps, stream); break;
    default: break;  // unreachable: the caller checks M <= kGemvMaxM
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace

static_assert(kGemvMaxM == 8, "launch_gemv_t instantiates M = 1..8");

Plan plan_gemv(int M, int N, int K, int num_sms, int splits_override) {
  const int tiles = ceil_div(N, kGemvBN);
  const int ktiles = K / kGemvBK;
  int splits = ceil_div(kGemvTargetBlocksPerSm * num_sms, tiles);
  splits = std::min(splits, std::max(1, ktiles / kGemvMinTilesPerSplit));
  // The fp32 partials (written and re-read) should stay well below the weight traffic.
  splits = std::min(splits, std::max(1, K / (64 * M)));
  if (splits_override > 0) splits = splits_override;
  splits = std::max(1, std::min(splits, ktiles));
  const int tps = ceil_div(ktiles, splits);
  splits = ceil_div(ktiles, tps);  // no empty splits
  return Plan{0, splits, tiles};
}

void launch_gemv(DType dt, const GemmArgs& a, cudaStream_t stream) {
  const int ktiles = a.K / kGemvBK;
  const int tps = ceil_div(ktiles, a.splits);
  if (dt == DType::kHalf) launch_gemv_t<__half>(a, tps, stream);
  else launch_gemv_t<__nv_bfloat16>(a, tps, stream);
}

}  // namespace awq

// Tensor-core GEMM: y[M, N] = x[M, K] @ W^T for M > kGemvMaxM, W^T from the AWQ GEMM layout.
//
// mma.sync.m16n8k16 wants its B operand (16 k x 8 n) as pairs of *consecutive k* per register:
// lane l holds B[2q, 2q+1][g] and B[2q+8, 2q+9][g] with g = l/4, q = l%4.  The AWQ layout gives
// us pairs of *adjacent columns* of one k-row for free (lop3 on nibbles p, p+4).  We get k-pairs
// without any shared-memory round trip of the dequantized values:
//
//  * Column permutation.  A warp covers 64 output columns = 8 packed words per k-row.  Lane l
//    reads only word g = l/4 and uses its 8 columns as the 8 n8-tiles of the warp: in n8-tile
//    t, B-column slot g is real column 8g + t.  So every nibble a lane dequantizes is used by
//    exactly one mma and no lane dequantizes a value twice.
//  * k-pairs.  Lane l dequantizes word g of rows 2q, 2q+1, 2q+8, 2q+9 (the rows its fragment
//    needs) into (col 2p, col 2p+1) pairs and one byte-permute per register forms
//    (row k, row k+1) pairs of a single column: exactly b0/b1 of n8-tiles 2p and 2p+1.
//  * Output.  Accumulator c0/c1 of tile t sit in slots 2q, 2q+1, i.e. real columns 16q + t and
//    16q + 8 + t: lane l ends up owning 16 *contiguous* output columns [16q, 16q+16) of rows g
//    and g+8, written with two 16-byte stores.
//
// Tiling.  Block tile BM x BN x 32 (BN = 64 * WARPS_N), warps arranged WARPS_M x WARPS_N, each
// warp computing (BM / WARPS_M) x 64 with MT = BM / (16 WARPS_M) m16 tiles.  Four variants
// (chosen by M) trade per-block reuse against the number of blocks:
//     config 0: BM = 16,  4 warps (1 x 4), BN = 256      M <= 16
//     config 1: BM = 32,  4 warps (1 x 4), BN = 256      M <= 32
//     config 2: BM = 64,  8 warps (2 x 4), BN = 256      M <= 64
//     config 3: BM = 128, 8 warps (4 x 2), BN = 128      M >  64
//
// Pipelining.  A kGemmStages-deep cp.async ring (16-byte copies) holds, per stage, the
// activation tile BM x 32, the packed weights 32 x BN/8 words, and the zero points / scales of
// the stage's group (group_size % 32 == 0, so a 32-row stage is inside one group).
// Shared-memory row strides are padded so that ldmatrix (A, 80-byte rows) and the per-lane
// 32-bit weight loads (B, stride == 4 mod 16 words) are bank-conflict free.
//
// Filling the GPU.  For small M the output has few tiles, so K is split over blockIdx.z; the
// last block to arrive at a tile (atomic counter) sums the fp32 partials in split order
// (deterministic) and writes the output -- no extra kernel, no host sync.
#include "awq_common.cuh"
#include "awq_kernels.h"

#include <algorithm>

namespace awq {
namespace {

constexpr int kGemmBK = 32;              // k rows per stage (two m16n8k16 k-steps)
constexpr int kGemmStages = 4;           // cp.async pipeline depth
constexpr int kAStride = kGemmBK + 8;    // halves per activation row in smem: 80 B, see above
constexpr int kGemmTargetBlocksPerSm = 2;  // split-K aims at this many blocks per SM
constexpr int kGemmMinTilesPerSplit = 4;   // ... but keeps >= 4 stages of work per split
constexpr int kSmemDefaultLimit = 48 * 1024;

template <int BM, int WARPS_M, int WARPS_N>
struct GemmCfg {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kBN = 64 * WARPS_N;
  static constexpr int kWords = kBN / 8;                                   // packed words per k-row
  static constexpr int kMT = BM / (16 * WARPS_M);                          // m16 tiles per warp
  static constexpr int kBStride = kWords + ((4 - kWords % 16) + 16) % 16;  // == 4 (mod 16) words
  static constexpr int kABytes = BM * kAStride * 2;
  static constexpr int kBBytes = kGemmBK * kBStride * 4;
  static constexpr int kZBytes = kWords * 4;
  static constexpr int kSBytes = kBN * 2;
  static constexpr int kStageBytes = kABytes + kBBytes + kZBytes + kSBytes;
  static constexpr int kSmemBytes = kStageBytes * kGemmStages;
  static_assert(kMT >= 1 && BM == kMT * 16 * WARPS_M, "BM must be a multiple of 16 * WARPS_M");
  static_assert(kBStride % 16 == 4, "conflict-free B reads need a stride of 4 (mod 16) words");
  static_assert(kABytes % 16 == 0 && kBBytes % 16 == 0 && kZBytes % 16 == 0 && kSBytes % 16 == 0,
                "cp.async destinations must stay 16-byte aligned");
};

template <typename T, int BM, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(GemmCfg<BM, WARPS_M, WARPS_N>::kThreads, 1)
awq_gemm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ ws, int32_t* __restrict__ counters,
                int M, int N, int K, int group_size, int tiles_per_split) {
  using Cfg = GemmCfg<BM, WARPS_M, WARPS_N>;
  using T2 = typename Traits<T>::T2;
  constexpr int kMT = Cfg::kMT;
  constexpr int kBN = Cfg::kBN;
  constexpr int kWords = Cfg::kWords;
  constexpr int kBStride = Cfg::kBStride;

  extern __shared__ __align__(16) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % WARPS_M;
  const int wn = warp / WARPS_M;
  const int g = lane >> 2;  // mma "groupID": B column slot / accumulator row
  const int q = lane & 3;   // mma "threadID_in_group": k-pair / accumulator column pair

  const int N8 = N / 8;
  const int n0 = blockIdx.x * kBN;
  const int w0 = n0 / 8;
  const int m0 = blockIdx.y * BM;
  const int split = blockIdx.z;
  const int splits = gridDim.z;
  const int ktiles = K / kGemmBK;
  const int kt_begin = split * tiles_per_split;
  const int kt_end = min(kt_begin + tiles_per_split, ktiles);
  const int ntiles = kt_end - kt_begin;

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * Cfg::kStageBytes + Cfg::kABytes); };
  auto stage_z = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * Cfg::kStageBytes + Cfg::kABytes + Cfg::kBBytes);
  };
  auto stage_s = [&](int s) {
    return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes + Cfg::kABytes + Cfg::kBBytes + Cfg::kZBytes);
  };

  auto load_stage = [&](int slot, int kt) {
    const int k0 = kt * kGemmBK;
    const int grp = k0 / group_size;
    T* As = stage_a(slot);
    uint32_t* Bs = stage_b(slot);
    uint32_t* Zs = stage_z(slot);
    T* Ss = stage_s(slot);
    // Activations: BM rows x 4 chunks of 8 elements; rows >= M are zero-filled.
    for (int i = tid; i < BM * (kGemmBK / 8); i += Cfg::kThreads) {
      const int r = i / (kGemmBK / 8);
      const int c = i % (kGemmBK / 8);
      const int row = m0 + r;
      const bool ok = row < M;
      cp_async16(As + r * kAStride + 8 * c, ok ? (const void*)(x + (size_t)row * K + k0 + 8 * c) : x, ok);
    }
    // Weights: 32 rows x kWords/4 chunks of 4 words (N % 64 == 0: a chunk is all-in or all-out).
    constexpr int kBChunks = kWords / 4;
    for (int i = tid; i < kGemmBK * kBChunks; i += Cfg::kThreads) {
      const int r = i / kBChunks;
      const int c = i % kBChunks;
      const int word = w0 + 4 * c;
      const bool ok = word < N8;
      cp_async16(Bs + r * kBStride + 4 * c, ok ? (const void*)(qweight + (size_t)(k0 + r) * N8 + word) : qweight,
                 ok);
    }
    // Zero points (kWords/4 chunks) then scales (kBN/8 chunks) of the stage's group.
    for (int i = tid; i < kBChunks + kBN / 8; i += Cfg::kThreads) {
      if (i < kBChunks) {
        const int word = w0 + 4 * i;
        const bool ok = word < N8;
        cp_async16(Zs + 4 * i, ok ? (const void*)(qzeros + (size_t)grp * N8 + word) : qzeros, ok);
      } else {
        const int j = i - kBChunks;
        const int col = n0 + 8 * j;
        const bool ok = col < N;
        cp_async16(Ss + 8 * j, ok ? (const void*)(scales + (size_t)grp * N + col) : scales, ok);
      }
    }
  };

  float acc[kMT][8][4] = {};  // fp32 accumulators (mt, n8-tile, fragment element)

  // Prologue: kGemmStages-1 stages in flight.  One commit per iteration (possibly empty), so
  // wait_group<kGemmStages-2> at iteration t guarantees stage t has landed.
#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < ntiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  const int wcol = wn * 8 + g;  // the packed word (8 columns) this lane dequantizes
  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<kGemmStages - 2>();
    __syncthreads();  // stage t visible; the slot refilled below was consumed at t-1 by everyone
    {
      const int nt = t + kGemmStages - 1;
      if (nt < ntiles) load_stage(nt % kGemmStages, kt_begin + nt);
      cp_async_commit();
    }
    const int slot = t % kGemmStages;
    const T* As = stage_a(slot);
    const uint32_t* Bs = stage_b(slot);
    GroupParams<T> gp;
    gp.load(stage_z(slot)[wcol], *reinterpret_cast<const uint4*>(stage_s(slot) + 8 * wcol));

#pragma unroll
    for (int ks = 0; ks < kGemmBK / 16; ++ks) {
      // A fragments: ldmatrix.x4, lane l addresses row (l % 16), k offset 8 * (l / 16), which
      // yields registers {rows 0-7, k 0-7}, {rows 8-15, k 0-7}, {rows 0-7, k 8-15},
      // {rows 8-15, k 8-15} == a0..a3 of m16n8k16.
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int row = (wm * kMT + mt) * 16 + (lane & 15);
        ldmatrix_x4(a[mt], As + row * kAStride + ks * 16 + (lane >> 4) * 8);
      }
      // B fragments: rows 2q, 2q+1 (b0) and 2q+8, 2q+9 (b1) of word wcol.
      const int r0 = ks * 16 + 2 * q;
      const uint32_t wr0 = Bs[r0 * kBStride + wcol];
      const uint32_t wr1 = Bs[(r0 + 1) * kBStride + wcol];
      const uint32_t wr8 = Bs[(r0 + 8) * kBStride + wcol];
      const uint32_t wr9 = Bs[(r0 + 9) * kBStride + wcol];
      mma_k16<T, kMT>(acc, gp, wr0, wr1, wr8, wr9, a);
    }
  }
  cp_async_wait<0>();

  // Epilogue.  Lane owns rows (g, g+8) of each m16 tile and columns [16q, 16q+16) of the warp's
  // 64: element t of the first 8 is acc[..][t][0 or 2], of the second 8 acc[..][t][1 or 3].
  const int col = n0 + wn * 64 + 16 * q;
  const bool col_ok = col < N;  // N % 64 == 0: the warp's 64 columns are all-in or all-out
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + (wm * kMT + mt) * 16 + g + 8 * h;
      if (row >= M || !col_ok) continue;
      float v0[8], v1[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        v0[t] = acc[mt][t][2 * h];
        v1[t] = acc[mt][t][2 * h + 1];
      }
      if (splits == 1) {
        uint4* dst = reinterpret_cast<uint4*>(out + (size_t)row * N + col);
        dst[0] = pack8<T>(v0);
        dst[1] = pack8<T>(v1);
      } else {
        float4* dst = reinterpret_cast<float4*>(ws + ((size_t)split * M + row) * N + col);
        dst[0] = make_float4(v0[0], v0[1], v0[2], v0[3]);
        dst[1] = make_float4(v0[4], v0[5], v0[6], v0[7]);
        dst[2] = make_float4(v1[0], v1[1], v1[2], v1[3]);
        dst[3] = make_float4(v1[4], v1[5], v1[6], v1[7]);
      }
    }
  }
  if (splits == 1) return;

  // Split-K: the last block to finish this output tile sums all partials in split order.
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (!arrive_last(&counters[tile], splits)) return;
  for (int i = tid; i < BM * (kBN / 4); i += Cfg::kThreads) {
    const int r = i / (kBN / 4);
    const int c = n0 + 4 * (i % (kBN / 4));
    const int row = m0 + r;
    if (row >= M || c >= N) continue;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(ws + ((size_t)s * M + row) * N + c));
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    T2 lo, hi;
    lo.x = Traits<T>::from_float(sum.x);
    lo.y = Traits<T>::from_float(sum.y);
    hi.x = Traits<T>::from_float(sum.z);
    hi.y = Traits<T>::from_float(sum.w);
    uint2 packed = make_uint2(as_u32<T2>(lo), as_u32<T2>(hi));
    *reinterpret_cast<uint2*>(out + (size_t)row * N + c) = packed;
  }
  if (tid == 0) counters[tile] = 0;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T, int BM, int WARPS_M, int WARPS_N>
void launch_cfg(const GemmArgs& a, cudaStream_t stream) {
  using Cfg = GemmCfg<BM, WARPS_M, WARPS_N>;
  auto kernel = awq_gemm_kernel<T, BM, WARPS_M, WARPS_N>;
  if constexpr (Cfg::kSmemBytes > kSmemDefaultLimit) {
    // Opt in to > 48 KB of dynamic shared memory, once per device (a host-side attribute, not a
    // stream operation, so it is fine during CUDA-graph capture).
    static bool configured[64] = {};
    int dev = 0;
    cudaGetDevice(&dev);
    if (dev < 64 && !configured[dev]) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
      configured[dev] = true;
    }
  }
  const int ktiles = a.K / kGemmBK;
  const int tps = ceil_div(ktiles, a.splits);
  const dim3 grid(ceil_div(a.N, Cfg::kBN), ceil_div(a.M, BM), a.splits);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      static_cast<const T*>(a.x), reinterpret_cast<const uint32_t*>(a.qweight),
      reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const T*>(a.scales), static_cast<T*>(a.out),
      a.workspace, a.counters, a.M, a.N, a.K, a.group_size, tps);
}

template <typename T>
void launch_t(const GemmArgs& a, int config, cudaStream_t stream) {
  switch (config) {
    case 0: launch_cfg<T, 16, 1, 4>(a, stream); break;
    case 1: launch_cfg<T, 32, 1, 4>(a, stream); break;
    case 2: launch_cfg<T, 64, 2, 4>(a, stream); break;
    default: launch_cfg<T, 128, 4, 2>(a, stream); break;
  }
}

// Block tile (BM, BN) of each config, for planning.  Must match launch_t.
constexpr int kCfgBM[4] = {16, 32, 64, 128};
constexpr int kCfgBN[4] = {256, 256, 256, 128};

}  // namespace

Plan plan_gemm(int M, int N, int K, int num_sms, int splits_override) {
  const int config = M <= 16 ? 0 : M <= 32 ? 1 : M <= 64 ? 2 : 3;
  const int tiles = ceil_div(M, kCfgBM[config]) * ceil_div(N, kCfgBN[config]);
  const int ktiles = K / kGemmBK;
  int splits = ceil_div(kGemmTargetBlocksPerSm * num_sms, tiles);
  splits = std::min(splits, std::max(1, ktiles / kGemmMinTilesPerSplit));
  // fp32 partials are written and re-read: keep them below about the weight bytes (K*N/2).
  splits = std::min(splits, std::max(1, K / (8 * M)));
  if (splits_override > 0) splits = splits_override;
  splits = std::max(1, std::min(splits, ktiles));
  const int tps = ceil_div(ktiles, splits);
  splits = ceil_div(ktiles, tps);
  return Plan{config, splits, tiles};
}

void launch_gemm(DType dt, const GemmArgs& a, const Plan& plan, cudaStream_t stream) {
  if (dt == DType::kHalf) launch_t<__half>(a, plan.config, stream);
  else launch_t<__nv_bfloat16>(a, plan.config, stream);
}

}  // namespace awq

// Skinny tensor-core kernel: y[M, N] = x[M, K] @ W^T for few tokens (M <= 32), the decode case.
//
// Why tensor cores for M = 1..32.  With few rows the work is reading the int4 weights once, at
// DRAM speed.  What stops a CUDA-core GEMV from getting there is instruction issue: every
// weight costs a dequantize (lop3 + sub + mul per pair), two fp32 conversions and M fused
// multiply-adds, so at M = 8 the SM runs out of issue slots long before DRAM runs out of bytes.
// Here a weight costs only its dequantize; m16n8k16 does the multiply-adds for up to 16 rows
// (MT = 1) or 32 rows (MT = 2) at once, whatever M is.  The padded rows are free: the tensor
// cores are idle in a memory-bound kernel anyway.
//
// From nibbles to mma fragments (awq_common.cuh: mma_k16).  mma.sync.m16n8k16 wants its B operand
// (16 k x 8 n) as pairs of *consecutive k* per register: lane l holds B[2q, 2q+1][g] and
// B[2q+8, 2q+9][g] with g = l/4, q = l%4.  The AWQ GEMM layout gives pairs of *adjacent columns*
// of one k-row for free (lop3 on nibbles p, p+4).  k-pairs without a shared-memory round trip:
//  * Column permutation.  A warp covers 64 output columns = 8 packed words per k-row.  Lane l
//    reads only word g = l/4 and uses its 8 columns as the warp's 8 n8-tiles: in n8-tile t,
//    B-column slot g is real column 8g + t.  So every nibble a lane dequantizes feeds exactly one
//    mma, and no lane dequantizes a value twice.
//  * k-pairs.  Lane l dequantizes word g of rows 2q, 2q+1, 2q+8, 2q+9 (the rows its fragment
//    needs) into (col 2p, col 2p+1) pairs, and one byte-permute per register forms (row k, row
//    k+1) pairs of a single column: exactly b0/b1 of n8-tiles 2p and 2p+1.  (The stream layout,
//    awq_stream.cu, stores k-pairs already interleaved and needs no such permute.)
//  * Output.  Accumulators c0/c1 of tile t sit in slots 2q, 2q+1, i.e. real columns 16q + t and
//    16q + 8 + t: lane l owns 16 *contiguous* output columns [16q, 16q+16) of rows g and g+8.
//
// Work split.  A warp owns 64 output columns (8 packed words: lane l reads word l/4, above) and a
// set of 32-row chunks of K.  A block is kSkWarps warps on the *same* 64 columns, each taking
// every kSkWarps-th chunk of the block's K range; their partial sums are added once through
// shared memory, so splitting K inside a block costs no global traffic.  blockIdx.y splits K
// further when N / 64 blocks are too few to fill the GPU; the last block of a column tile adds
// the splits' fp32 partials in split order (deterministic), as in the other kernels.
//
// Memory pipeline without shared memory or barriers.  Weights go straight from global memory
// to registers (ld.global.cs: streamed, evict first).  Each warp keeps kD chunks of loads in
// flight in a register ring (weights, activations, zero points and scales of the chunk); the
// ring is indexed with compile-time constants only, so it stays in registers, and there is no
// __syncthreads in the main loop: warps run independently.
//
// Two weight layouts.  From the GEMM (checkpoint) layout a lane makes one 4-byte load per k-row
// (a warp-wide load: 4 rows x 32 bytes, rows N/2 bytes apart).  From the warp-tiled layout
// (awqlib/packing.py, repacked once at load) a lane's 8 words are 32 contiguous bytes, two
// 16-byte loads, and a warp reads its whole 1 KB chunk contiguously.
//
// Measured on an H200 (benchmarks/RESULTS.md): ~1.5-1.65 TB/s at M = 1..8 on large weights,
// 35-40% of the copy bandwidth, 1.3-1.55x fp16 cuBLAS.  Not yet understood.  The register ring
// holds ~40-50 KB per SM in flight (D = 2: 96 registers, 5 blocks; D = 4: 163 registers, 3
// blocks), likely too little; a CUDA-core GEMV with a deeper cp.async ring on the GEMM layout
// stopped at ~1.45 TB/s too, and the tiled layout gained only ~10%.  The stream kernel
// (awq_stream.cu: a shared-memory cp.async ring on its own layout) is the answer that followed;
// this kernel serves the warp-tiled layout (shapes whose group size the stream kernel cannot
// take at one token) and GEMM-layout weights on CUDA (offloaded linears, direct op calls).
#include "awq_common.cuh"
#include "awq_kernels.h"

#include <algorithm>
#include <map>
#include <mutex>

namespace awq {
namespace {

constexpr int kSkWarps = 4;                 // warps per block (split of the block's K range)
constexpr int kSkThreads = 32 * kSkWarps;
constexpr int kSkBN = 64;                   // output columns per block (one warp's width)
constexpr int kSkChunk = 32;                // k rows per chunk: two m16n8k16 k-steps, one group
constexpr int kSkRedStride = kSkBN + 4;     // padded row of the reduction buffer (floats)
// Split-K heuristics (see plan_skinny).
constexpr int kSkMinChunksPerWarp = 2;
static_assert(kSkBN == kTileN && kSkChunk == kTileK && 32 * 8 == kTileWords, "a warp-tiled tile is one warp's chunk");

// Everything one chunk (32 k-rows x this lane's word) needs, loaded ahead of use.
template <int MT>
struct Chunk {
  uint32_t w[8];           // rows 2q, 2q+1, 2q+8, 2q+9 of k-step 0, then of k-step 1
  uint32_t a[2][MT][4];    // A fragments (activations) per k-step and m16 tile
  uint32_t z;              // packed zero points of the chunk's group
  uint4 s;                 // 8 scales of the chunk's group
};

// A fragments of m16n8k16 for a 32-row chunk: a0 = (row g, k 2q..2q+1), a1 = (row g+8, same k),
// a2 = (row g, k 2q+8..2q+9), a3 = (row g+8, k 2q+8..); rows past M are zero.  x is tiny and
// read by every block, so these loads hit L2 (or L1).
template <typename T, int MT>
__device__ __forceinline__ void load_x(uint32_t (&a)[2][MT][4], const T* __restrict__ x, int k0, int M, int K,
                                       int lane) {
  const int g = lane >> 2, q = lane & 3;
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);  // two elements per word (K even)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row0 = 16 * mt + g, row1 = row0 + 8;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int k = k0 + 16 * ks + 2 * q;
      a[ks][mt][0] = row0 < M ? __ldg(xw + ((size_t)row0 * K + k) / 2) : 0u;
      a[ks][mt][1] = row1 < M ? __ldg(xw + ((size_t)row1 * K + k) / 2) : 0u;
      a[ks][mt][2] = row0 < M ? __ldg(xw + ((size_t)row0 * K + k + 8) / 2) : 0u;
      a[ks][mt][3] = row1 < M ? __ldg(xw + ((size_t)row1 * K + k + 8) / 2) : 0u;
    }
  }
}

template <typename T, int MT, bool TILED>
__device__ __forceinline__ void load_chunk(Chunk<MT>& c, const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                                           const uint32_t* __restrict__ qzeros, const T* __restrict__ scales, int k0,
                                           int word, int M, int N, int K, int group_size, int lane) {
  const int g = lane >> 2, q = lane & 3;
  const int N8 = N / 8;
  if constexpr (TILED) {
    // Warp-tiled layout: this lane's 8 words of tile (word / 8, k0 / 32) are 32 contiguous bytes,
    // and the warp's 32 lanes read the whole 1 KB tile at once.
    const uint4* src = reinterpret_cast<const uint4*>(qweight) +
                       (((size_t)(word >> 3) * (K / kSkChunk) + k0 / kSkChunk) * 32 + lane) * 2;
    const uint4 lo = __ldcs(src), hi = __ldcs(src + 1);
    c.w[0] = lo.x; c.w[1] = lo.y; c.w[2] = lo.z; c.w[3] = lo.w;
    c.w[4] = hi.x; c.w[5] = hi.y; c.w[6] = hi.z; c.w[7] = hi.w;
  } else {
    // GEMM layout: one 4-byte load per row; a warp-wide load covers 4 rows x 32 bytes.
#pragma unroll
    for (int j = 0; j < 8; ++j) c.w[j] = __ldcs(qweight + (size_t)(k0 + tile_row(j, q)) * N8 + word);
  }
  load_x<T, MT>(c.a, x, k0, M, K, lane);
  const int grp = k0 / group_size;
  c.z = __ldg(qzeros + (size_t)grp * N8 + word);
  c.s = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + 8 * word));
}

template <typename T, int MT>
__device__ __forceinline__ void mma_words(float (&acc)[MT][8][4], const uint32_t (&w)[8], const uint32_t (&a)[2][MT][4],
                                          uint32_t z, uint4 sc) {
  GroupParams<T> gp;
  gp.load(z, sc);
  mma_k16<T, MT>(acc, gp, w[0], w[1], w[2], w[3], a[0]);
  mma_k16<T, MT>(acc, gp, w[4], w[5], w[6], w[7], a[1]);
}

template <typename T, int MT>
__device__ __forceinline__ void mma_chunk(float (&acc)[MT][8][4], const Chunk<MT>& c) {
  mma_words<T, MT>(acc, c.w, c.a, c.z, c.s);
}

// Add the block's kSkWarps partial sums through shared memory (red: [kSkWarps][MT * 16][kSkRedStride]
// floats), then write the output -- or, with split-K, this split's fp32 partials, and the last
// block of the column tile adds all splits in split order (deterministic) and writes the output.
template <typename T, int MT>
__device__ __forceinline__ void finish_block(const float (&acc)[MT][8][4], float* red, T* __restrict__ out,
                                             float* __restrict__ ws, int32_t* __restrict__ counters, int M, int N) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * kSkBN, split = blockIdx.y, splits = gridDim.y;
  auto at = [&](int w, int r, int c) -> float& { return red[(w * MT * 16 + r) * kSkRedStride + c]; };
  // Accumulator (mt, t, i) of lane (g, q) is row 16 mt + g + 8 (i / 2), column 16 q + 8 (i % 2) + t
  // of the block's 64 (the file's header: Output).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) at(warp, 16 * mt + g + 8 * (i / 2), 16 * q + 8 * (i % 2) + t) = acc[mt][t][i];
  __syncthreads();
  const int rows = min(M, MT * 16);
  for (int idx = tid; idx < rows * kSkBN; idx += kSkThreads) {
    const int r = idx / kSkBN, col = idx % kSkBN;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kSkWarps; ++w) v += at(w, r, col);
    if (n0 + col < N) {
      if (splits == 1) out[(size_t)r * N + n0 + col] = Traits<T>::from_float(v);
      else ws[((size_t)split * M + r) * N + n0 + col] = v;
    }
  }
  if (splits == 1) return;

  if (!arrive_last(&counters[blockIdx.x], splits)) return;
  for (int idx = tid; idx < rows * kSkBN; idx += kSkThreads) {
    const int r = idx / kSkBN, col = idx % kSkBN;
    if (n0 + col >= N) continue;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += __ldcg(&ws[((size_t)s * M + r) * N + n0 + col]);
    out[(size_t)r * N + n0 + col] = Traits<T>::from_float(v);
  }
  if (tid == 0) counters[blockIdx.x] = 0;  // ready for the next launch (no memset needed)
}

template <typename T, int MT, int kD, bool TILED>
__global__ void __launch_bounds__(kSkThreads)
awq_skinny_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                  const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ ws,
                  int32_t* __restrict__ counters, int M, int N, int K, int group_size, int chunks_per_split) {
  __shared__ float red[kSkWarps][MT * 16][kSkRedStride];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int word = blockIdx.x * (kSkBN / 8) + (lane >> 2);  // this lane's packed word
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(c_begin + chunks_per_split, K / kSkChunk);
  const int span = c_end - c_begin - warp;
  const int my_chunks = span > 0 ? (span + kSkWarps - 1) / kSkWarps : 0;
  auto chunk_k0 = [&](int i) { return (c_begin + warp + kSkWarps * i) * kSkChunk; };

  float acc[MT][8][4] = {};  // fp32 accumulators (mt, n8-tile, fragment element)

  Chunk<MT> ring[kD];
#pragma unroll
  for (int d = 0; d < kD; ++d)
    if (d < my_chunks) load_chunk<T, MT, TILED>(ring[d], x, qweight, qzeros, scales, chunk_k0(d), word, M, N, K, group_size, lane);
  for (int base = 0; base < my_chunks; base += kD) {
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      const int i = base + d;
      if (i < my_chunks) {
        mma_chunk<T, MT>(acc, ring[d]);
        if (i + kD < my_chunks)
          load_chunk<T, MT, TILED>(ring[d], x, qweight, qzeros, scales, chunk_k0(i + kD), word, M, N, K, group_size,
                                   lane);
      }
    }
  }

  finish_block<T, MT>(acc, &red[0][0][0], out, ws, counters, M, N);
}


int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T>
using SkinnyKernel = void (*)(const T*, const uint32_t*, const uint32_t*, const T*, T*, float*, int32_t*, int, int, int,
                              int, int);

// The instantiation serving (M, depth, layout): MT = 2 m16 tiles above 16 rows, a register ring of
// `depth` chunks (2 or 4).
template <typename T>
SkinnyKernel<T> pick(int M, int depth, bool tiled) {
  const bool two = skinny_m_tiles(M) == 2, deep = skinny_depth(depth) == 4;
  if (tiled) {
    if (two) return deep ? awq_skinny_kernel<T, 2, 4, true> : awq_skinny_kernel<T, 2, 2, true>;
    return deep ? awq_skinny_kernel<T, 1, 4, true> : awq_skinny_kernel<T, 1, 2, true>;
  }
  if (two) return deep ? awq_skinny_kernel<T, 2, 4, false> : awq_skinny_kernel<T, 2, 2, false>;
  return deep ? awq_skinny_kernel<T, 1, 4, false> : awq_skinny_kernel<T, 1, 2, false>;
}

// Resident blocks per SM of a kernel (registers and shared memory decide), asked once per kernel.
template <typename T>
int blocks_per_sm(SkinnyKernel<T> kernel) {
  static std::mutex mu;
  static std::map<SkinnyKernel<T>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(kernel);
  if (it != cache.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kSkThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it; fall back to a conservative guess
    n = 4;
  }
  return cache[kernel] = std::max(n, 1);
}

}  // namespace

Plan plan_skinny(DType dt, int M, int N, int K, int depth, bool tiled, int num_sms, int splits_override) {
  const int tiles = ceil_div(N, kSkBN);
  const int chunks = K / kSkChunk;
  int splits;
  if (splits_override > 0) {
    splits = splits_override;
  } else {
    // One full wave: as many blocks as can be resident at once.  The blocks are long-lived (they
    // stream their whole K range), so a partial second wave would run at a fraction of the
    // bandwidth for a long time.
    const int per_sm = dt == DType::kHalf ? blocks_per_sm<__half>(pick<__half>(M, depth, tiled))
                                          : blocks_per_sm<__nv_bfloat16>(pick<__nv_bfloat16>(M, depth, tiled));
    const int resident = num_sms * per_sm;
    splits = std::max(1, resident / tiles);
    splits = std::min(splits, std::max(1, chunks / (kSkWarps * kSkMinChunksPerWarp)));
    // The fp32 partials are written and read once: keep them under 1/2 of the weight bytes
    // (2 * 4 * splits * M * N <= K * N / 4).  Measured on an H200 (tune_kernels.py), more
    // splits pay for their traffic up to about there: M = 16 on 4096 x 4096 ran fastest at 8.
    splits = std::min(splits, std::max(1, K / (32 * M)));
  }
  splits = std::max(1, std::min(splits, chunks));
  const int cps = ceil_div(chunks, splits);
  splits = ceil_div(chunks, cps);  // no empty splits
  return Plan{splits, tiles};
}

void launch_skinny(DType dt, const GemmArgs& a, int depth, bool tiled, cudaStream_t stream) {
  const int cps = ceil_div(a.K / kSkChunk, a.splits);
  const dim3 grid(ceil_div(a.N, kSkBN), a.splits);
  if (dt == DType::kHalf) {
    pick<__half>(a.M, depth, tiled)<<<grid, kSkThreads, 0, stream>>>(
        static_cast<const __half*>(a.x), reinterpret_cast<const uint32_t*>(a.qweight),
        reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const __half*>(a.scales),
        static_cast<__half*>(a.out), a.workspace, a.counters, a.M, a.N, a.K, a.group_size, cps);
  } else {
    pick<__nv_bfloat16>(a.M, depth, tiled)<<<grid, kSkThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(a.x), reinterpret_cast<const uint32_t*>(a.qweight),
        reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const __nv_bfloat16*>(a.scales),
        static_cast<__nv_bfloat16*>(a.out), a.workspace, a.counters, a.M, a.N, a.K, a.group_size, cps);
  }
}

}  // namespace awq

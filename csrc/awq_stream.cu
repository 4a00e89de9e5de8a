// Streaming tensor-core kernel for few tokens (M = 1..64) on the stream runtime layout.
//
// Why.  At M <= 64 the job is to stream the int4 weights from DRAM once, and the older kernels
// (awq_skinny.cu, awq_gemv.cu) are limited by *instruction issue*, not by bytes: 370-600
// warp-instructions per KB of weights (scripts/sass_budget.py), which caps them near 1.8-2.9
// TB/s on an H200 even at 100 % issue (shared/design/kernels-v2.md).  This kernel is built to
// spend <= 175-190 per KB:
//
//  * Layout (awqlib/packing.py, "stream layout", repacked once at load): 16x64 atoms, one 16-byte
//    fragment per lane, k-pairs pre-interleaved, so a word of 8 weights becomes the mma B
//    fragments of two n8-tiles with 4 lop3 + 1 shift (fp16) and no byte permute; scales and zero
//    points are permuted so a lane reads its 8 columns' scales with one 16-byte and zeros with one
//    4-byte shared load per group.
//  * Exactness: (magic + q) - (magic + z) is exact and the single multiply by the scale rounds
//    once, as in the reference (fp16 high nibbles: fma(16 q + 1024, 1/16, -(64 + z)), also exact).
//  * Pipeline: a kStages-deep cp.async ring in shared memory; a stage is 256 k-rows x 128 columns
//    (16 KB of weights) plus the activations, scales and zeros it needs.  Every shared-memory
//    access is [ring-slot base + compile-time offset] (the slot is a counter), and there is no
//    integer division in the loop (group and slice positions advance with counters).
//  * Work split: 8 warps = 2 (64-column n-atoms) x 4 (k-slices of 64 rows).  A persistent grid
//    (SMs x CTAs per SM) takes the (column slice, k-tile) units in slice-major order, each CTA a
//    contiguous run ("striped" partition), so every SM streams the same number of bytes whatever
//    the shape.  A slice split over several CTAs is reduced deterministically: each part writes
//    fp32 partials to its own workspace slot, the last to arrive (arrive_last) adds the slots in
//    part order and writes the output.  Counters live in the per-call workspace (zeroed by the
//    caller on the stream), so concurrent launches and graphs never share one.
//
// NOT the automatic choice yet: validated on the CPU only (layout, arithmetic, SASS budget); it
// becomes the default once tests/test_kernels_cuda.py passes on a GPU and benchmarks/gpu_sweep.py
// shows it winning (see awq_ops.cpp).
#include "awq_common.cuh"
#include "awq_kernels.h"

#include <algorithm>

namespace awq {
namespace {

constexpr int kStThreads = 256;
constexpr int kStWarps = kStThreads / 32;
constexpr int kNA = 2;                          // 64-column n-atoms per CTA (one per n-warp)
constexpr int kKW = kStWarps / kNA;             // warps along K
constexpr int kKA = 4;                          // k16 atoms per warp per stage
constexpr int kSliceN = 64 * kNA;               // output columns of a slice (128)
constexpr int kStageK = 16 * kKA * kKW;         // k rows per stage (256)
constexpr int kAtomWords = 128;                 // one 16x64 atom: 32 lanes x 4 words
constexpr int kMaxGroupsPerStage = kStageK / 32;  // group_size >= 32
static_assert(kStWarps % kNA == 0, "warps split evenly over n-atoms");

template <int MB>
struct StreamCfg {
  // MB m16 tiles (M <= 16 MB).  Stages and CTAs per SM chosen so that >= 32-64 KB of weights are
  // in flight per SM within 228 KB of shared memory (see kernels-v2.md §5.2).
  static constexpr int kStages = MB == 1 ? 3 : MB == 2 ? 5 : 3;
  static constexpr int kMinBlocks = MB == 1 ? 2 : 1;
  static constexpr int kRows = 16 * MB;
  static constexpr int kBBytes = kNA * kKA * kKW * kAtomWords * 4;  // 16 KB
  static constexpr int kARowBytes = kStageK * 2;                     // 512 B, 32 chunks of 16 B
  static constexpr int kABytes = kRows * kARowBytes;
  static constexpr int kSBytes = kMaxGroupsPerStage * kSliceN * 2;   // scales of up to 8 groups
  static constexpr int kZBytes = kMaxGroupsPerStage * (kSliceN / 8) * 4;
  static constexpr int kOffA = kBBytes;
  static constexpr int kOffS = kOffA + kABytes;
  static constexpr int kOffZ = kOffS + kSBytes;
  static constexpr int kStageBytes = kOffZ + kZBytes;
  static constexpr int kRedBytes = kRows * kSliceN * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes + kRedBytes;
  static_assert(kStageBytes % 16 == 0 && kOffA % 16 == 0 && kOffS % 16 == 0 && kOffZ % 16 == 0,
                "cp.async destinations stay 16-byte aligned");
};

// Dequantization of one stream-layout word into the B fragments of n8-tiles 2j (column c0) and
// 2j + 1 (column c1): lo = rows 2q, 2q+1 (b0), hi = rows 2q+8, 2q+9 (b1).  zlo = (magic + z_c0,
// magic + z_c1), zhi = (64 + z_c0, 64 + z_c1) (fp16 only), sc = (s_c0, s_c1).
template <typename T> struct StreamDequant;

template <> struct StreamDequant<__half> {
  struct Group {
    __half2 zlo[4], zhi[4], sc[4];
  };
  __device__ __forceinline__ static void load_group(Group& gp, uint32_t zw, uint4 s8) {
    // nibbles (j, j+4) of zw are the zeros of (c0, c1) of word j.
    gp.zlo[0] = as_t2<__half2>(lop3_and_or(zw, 0x000f000fu, 0x64006400u));
    gp.zlo[1] = as_t2<__half2>(lop3_and_or(zw >> 4, 0x000f000fu, 0x64006400u));
    gp.zlo[2] = as_t2<__half2>(lop3_and_or(zw >> 8, 0x000f000fu, 0x64006400u));
    gp.zlo[3] = as_t2<__half2>(lop3_and_or(zw >> 12, 0x000f000fu, 0x64006400u));
    // 64.0 has ulp 1/16: the zero goes to bits 4..7 to read as 64 + z.
    gp.zhi[0] = as_t2<__half2>(lop3_and_or(zw << 4, 0x00f000f0u, 0x54005400u));
    gp.zhi[1] = as_t2<__half2>(lop3_and_or(zw, 0x00f000f0u, 0x54005400u));
    gp.zhi[2] = as_t2<__half2>(lop3_and_or(zw >> 4, 0x00f000f0u, 0x54005400u));
    gp.zhi[3] = as_t2<__half2>(lop3_and_or(zw >> 8, 0x00f000f0u, 0x54005400u));
    gp.sc[0] = as_t2<__half2>(s8.x);
    gp.sc[1] = as_t2<__half2>(s8.y);
    gp.sc[2] = as_t2<__half2>(s8.z);
    gp.sc[3] = as_t2<__half2>(s8.w);
  }
  // b[0], b[1]: tile 2j; b[2], b[3]: tile 2j+1.
  __device__ __forceinline__ static void word(uint32_t (&b)[4], uint32_t w, const Group& gp, int j) {
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    const uint32_t w8 = w >> 8;
    const __half2 lo0 = as_t2<__half2>(lop3_and_or(w, 0x000f000fu, 0x64006400u));
    const __half2 hi0 = as_t2<__half2>(lop3_and_or(w, 0x00f000f0u, 0x64006400u));
    const __half2 lo1 = as_t2<__half2>(lop3_and_or(w8, 0x000f000fu, 0x64006400u));
    const __half2 hi1 = as_t2<__half2>(lop3_and_or(w8, 0x00f000f0u, 0x64006400u));
    const __half2 s0 = __low2half2(gp.sc[j]), s1 = __high2half2(gp.sc[j]);
    b[0] = as_u32<__half2>(__hmul2(__hsub2(lo0, __low2half2(gp.zlo[j])), s0));
    b[1] = as_u32<__half2>(__hmul2(__hfma2(hi0, sixteenth, __hneg2(__low2half2(gp.zhi[j]))), s0));
    b[2] = as_u32<__half2>(__hmul2(__hsub2(lo1, __high2half2(gp.zlo[j])), s1));
    b[3] = as_u32<__half2>(__hmul2(__hfma2(hi1, sixteenth, __hneg2(__high2half2(gp.zhi[j]))), s1));
  }
};

template <> struct StreamDequant<__nv_bfloat16> {
  // bf16 has 7 mantissa bits: a nibble at bits 4..7 would reach the exponent, so every nibble is
  // shifted down to bits 0..3 (3 shifts per word instead of 1).
  struct Group {
    __nv_bfloat162 zlo[4], sc[4];
  };
  __device__ __forceinline__ static void load_group(Group& gp, uint32_t zw, uint4 s8) {
    gp.zlo[0] = as_t2<__nv_bfloat162>(lop3_and_or(zw, 0x000f000fu, 0x43004300u));
    gp.zlo[1] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 4, 0x000f000fu, 0x43004300u));
    gp.zlo[2] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 8, 0x000f000fu, 0x43004300u));
    gp.zlo[3] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 12, 0x000f000fu, 0x43004300u));
    gp.sc[0] = as_t2<__nv_bfloat162>(s8.x);
    gp.sc[1] = as_t2<__nv_bfloat162>(s8.y);
    gp.sc[2] = as_t2<__nv_bfloat162>(s8.z);
    gp.sc[3] = as_t2<__nv_bfloat162>(s8.w);
  }
  __device__ __forceinline__ static void word(uint32_t (&b)[4], uint32_t w, const Group& gp, int j) {
    using B2 = __nv_bfloat162;
    const B2 s0 = __low2bfloat162(gp.sc[j]), s1 = __high2bfloat162(gp.sc[j]);
    const B2 z0 = __low2bfloat162(gp.zlo[j]), z1 = __high2bfloat162(gp.zlo[j]);
    b[0] = as_u32<B2>(__hmul2(__hsub2(as_t2<B2>(lop3_and_or(w, 0x000f000fu, 0x43004300u)), z0), s0));
    b[1] = as_u32<B2>(__hmul2(__hsub2(as_t2<B2>(lop3_and_or(w >> 4, 0x000f000fu, 0x43004300u)), z0), s0));
    b[2] = as_u32<B2>(__hmul2(__hsub2(as_t2<B2>(lop3_and_or(w >> 8, 0x000f000fu, 0x43004300u)), z1), s1));
    b[3] = as_u32<B2>(__hmul2(__hsub2(as_t2<B2>(lop3_and_or(w >> 12, 0x000f000fu, 0x43004300u)), z1), s1));
  }
};

// Where a CTA's unit walk stands: column slice, k-tile in the slice, and the first group of the
// k-tile (advanced by counters, never by division).
struct Cursor {
  int slice, kt, grp, sub;
  __device__ __forceinline__ void advance(int KT, int spg, int grp_step) {
    if (++kt == KT) {
      kt = 0;
      ++slice;
      grp = 0;
      sub = 0;
    } else if (++sub == spg) {
      sub = 0;
      grp += grp_step;
    }
  }
};

struct StreamParams {
  int M, N, K;
  int KT;         // k-tiles (kStageK rows) per slice
  int KT16;       // k16 atoms of K
  int NT;         // 64-column atoms of N
  int groups;     // K / group_size
  int spg;        // k-tiles per group step (group_size >= kStageK), else 1
  int grp_step;   // groups per step: kStageK / group_size (group_size < kStageK), else 1
  int gps;        // groups per k-tile (group_size < kStageK), else 1
  int gshift;     // log2(group_size / 16) when group_size < kStageK (atom -> slot), else 31
  int per;        // units per CTA
  int units;      // slices * KT
  int max_parts;  // workspace slots per slice
};

template <typename T, int MB>
__global__ void __launch_bounds__(kStThreads, StreamCfg<MB>::kMinBlocks)
awq_stream_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                  const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ ws,
                  int32_t* __restrict__ counters, const StreamParams p) {
  using Cfg = StreamCfg<MB>;
  using DQ = StreamDequant<T>;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  float* red = reinterpret_cast<float*>(smem + kStages * Cfg::kStageBytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % kNA, wk = warp / kNA;
  const int g = lane >> 2, q = lane & 3;

  const int u_begin = blockIdx.x * p.per;
  const int u_end = min(u_begin + p.per, p.units);
  const int n_units = u_end - u_begin;
  if (n_units <= 0) return;

  // ---- loader state (one division each, here, not in the loop)
  auto cursor_at = [&](int u) {
    Cursor c;
    c.slice = u / p.KT;
    c.kt = u - c.slice * p.KT;
    c.sub = c.kt % p.spg;
    c.grp = (c.kt / p.spg) * p.grp_step;
    return c;
  };
  Cursor ld = cursor_at(u_begin);

  // The rows of A past M are zero in every stage, written once.
  for (int i = tid; i < kStages * (Cfg::kRows - min(p.M, Cfg::kRows)) * 32; i += kStThreads) {
    const int per_stage = (Cfg::kRows - p.M) * 32;
    const int s = i / per_stage, r = i % per_stage;
    *reinterpret_cast<uint4*>(smem + s * Cfg::kStageBytes + Cfg::kOffA + (p.M + r / 32) * Cfg::kARowBytes +
                              (r % 32) * 16) = make_uint4(0, 0, 0, 0);
  }

  // Per-thread loader addresses, fixed but for the k-tile and slice terms.  Weight chunk
  // r = 0..3 of thread tid: n-atom r / 2, atom (tid / 32) + 8 (r % 2) of the k-tile, lane chunk
  // tid % 32, i.e. two 8 KB runs, each contiguous along K.
  constexpr int kAtomsPerStage = kKA * kKW;                 // 16 atoms = 8 KB per n-atom
  const int a_row = tid >> 5, a_ch = tid & 31;              // activations: row a_row + 8 r, chunk a_ch
  const size_t nstride = (size_t)p.KT16 * 32;                // uint4s between n-atoms
  // Weight source of the loader's k-tile: advanced by 8 KB per stage, rebuilt on a slice change.
  auto wsrc_at = [&](const Cursor& c) {
    return qweight + (size_t)c.slice * kNA * nstride + (size_t)(c.kt * kAtomsPerStage + a_row) * 32 + a_ch;
  };
  const uint4* wsrc = wsrc_at(ld);
  auto load_stage = [&](int slot, const Cursor& c) {
    uint8_t* st = smem + slot * Cfg::kStageBytes;
    const int atom0 = c.kt * kAtomsPerStage + a_row;
    const uint4* src = wsrc;
#pragma unroll
    for (int r = 0; r < Cfg::kBBytes / 16 / kStThreads; ++r) {
      const int na = r / 2, half = r % 2;                    // compile-time
      const bool ok = atom0 + 8 * half < p.KT16 && c.slice * kNA + na < p.NT;
      cp_async16(st + (tid + r * kStThreads) * 16, ok ? (const void*)(src + na * nstride + half * 256) : (const void*)qweight,
                 ok);
    }
    // Activations: rows < M, 32 chunks of 8 elements per row, XOR-swizzled by row for ldmatrix.
    const int k = c.kt * kStageK + 8 * a_ch;
#pragma unroll
    for (int r = 0; r < Cfg::kRows / 8; ++r) {
      const int m = a_row + 8 * r;
      if (m < p.M) {
        const bool ok = k < p.K;
        cp_async16(st + Cfg::kOffA + m * Cfg::kARowBytes + ((a_ch ^ (m & 7)) * 16),
                   ok ? (const void*)(x + (size_t)m * p.K + k) : (const void*)x, ok);
      }
    }
    // Scales (16 chunks per group) and zeros (4 chunks per group) of the k-tile's groups.
    if (tid < kMaxGroupsPerStage * 20) {
      const int gi = tid / 20, ch = tid % 20;
      const int grp = c.grp + gi;
      const bool ok = gi < p.gps && grp < p.groups;
      if (ch < 16) {
        const int col = c.slice * kSliceN + 8 * ch;
        const bool okc = ok && col < p.N;
        cp_async16(st + Cfg::kOffS + gi * kSliceN * 2 + ch * 16,
                   okc ? (const void*)(scales + (size_t)grp * p.N + col) : (const void*)scales, okc);
      } else {
        const int word = c.slice * (kSliceN / 8) + 4 * (ch - 16);
        const bool okw = ok && word < p.N / 8;
        cp_async16(st + Cfg::kOffZ + gi * (kSliceN / 8) * 4 + (ch - 16) * 16,
                   okw ? (const void*)(qzeros + (size_t)grp * (p.N / 8) + word) : (const void*)qzeros, okw);
      }
    }
  };

  // ---- consumer state: per-lane shared-memory offsets, fixed for the whole kernel
  const int b_off = ((wn * kKA * kKW + wk * kKA) * 32 + lane) * 16;          // + 512 i
  int a_off[kKA];
#pragma unroll
  for (int i = 0; i < kKA; ++i) {
    const int row = lane & 15, ch = 2 * (wk * kKA + i) + (lane >> 4);
    a_off[i] = Cfg::kOffA + row * Cfg::kARowBytes + ((ch ^ (row & 7)) * 16);  // + mb * 16 rows
  }
  int slot_of[kKA];  // group slot (within the k-tile) of atom i
#pragma unroll
  for (int i = 0; i < kKA; ++i) slot_of[i] = p.gshift == 31 ? 0 : (wk * kKA + i) >> p.gshift;
  const int s_off = Cfg::kOffS + (wn * 64 + 8 * g) * 2;
  const int z_off = Cfg::kOffZ + (wn * 8 + g) * 4;

  float acc[MB][8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][t][e] = 0.f;

  // Prologue: kStages - 1 stages in flight, one commit group each (possibly empty).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_units) {
      load_stage(s, ld);
      ld.advance(p.KT, p.spg, p.grp_step);
      wsrc = ld.kt == 0 ? wsrc_at(ld) : wsrc + kAtomsPerStage * 32;
    }
    cp_async_commit();
  }

  Cursor cs = cursor_at(u_begin);  // consumer position (slice and k-tile)

  // Flush the accumulators of slice cs.slice: add the kKW k-warps in order through `red`, then
  // write the output, or this part's fp32 partials and let the last part reduce.
  auto flush = [&]() {
#pragma unroll 1
    for (int w = 0; w < kKW; ++w) {
      if (wk == w) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = 16 * mb + g + 8 * (e >> 1), col = wn * 64 + 8 * t + 2 * q + (e & 1);
              float& r = red[row * kSliceN + col];
              r = (w == 0 ? 0.f : r) + acc[mb][t][e];
              acc[mb][t][e] = 0.f;
            }
      }
      __syncthreads();
    }
    const int slice = cs.slice;
    const int first = (slice * p.KT) / p.per;                  // CTA holding the slice's first unit
    const int last = ((slice + 1) * p.KT - 1) / p.per;
    const int parts = last - first + 1;
    const int n0 = slice * kSliceN;
    const int rows = min(p.M, Cfg::kRows);
    if (parts == 1) {
      for (int i = tid; i < rows * kSliceN; i += kStThreads) {
        const int r = i / kSliceN, col = i % kSliceN;
        if (n0 + col < p.N) out[(size_t)r * p.N + n0 + col] = Traits<T>::from_float(red[i]);
      }
    } else {
      const int part = blockIdx.x - first;
      float* slot = ws + ((size_t)slice * p.max_parts + part) * rows * kSliceN;
      for (int i = tid; i < rows * kSliceN; i += kStThreads) slot[i] = red[i];
      if (arrive_last(&counters[slice], parts)) {
        const float* base = ws + (size_t)slice * p.max_parts * rows * kSliceN;
        for (int i = tid; i < rows * kSliceN; i += kStThreads) {
          const int r = i / kSliceN, col = i % kSliceN;
          float v = 0.f;
          for (int s = 0; s < parts; ++s) v += __ldcg(base + (size_t)s * rows * kSliceN + i);
          if (n0 + col < p.N) out[(size_t)r * p.N + n0 + col] = Traits<T>::from_float(v);
        }
      }
    }
    __syncthreads();  // `red` is reused by the next flush
  };

  // One stage per iteration.  The ring slot is a counter (no modulo) and every shared-memory
  // access is [slot base + compile-time offset]; the slice-end flush is a branch taken once per
  // slice per CTA.
  int rd = 0, wr = kStages - 1;  // ring slots being consumed / refilled
#pragma unroll 1
  for (int t = 0; t < n_units; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage t landed for everyone; slot `wr` was consumed at t-1 by everyone
    if (t + kStages - 1 < n_units) {
      load_stage(wr, ld);
      ld.advance(p.KT, p.spg, p.grp_step);
      wsrc = ld.kt == 0 ? wsrc_at(ld) : wsrc + kAtomsPerStage * 32;
    }
    cp_async_commit();
    wr = wr + 1 == kStages ? 0 : wr + 1;

    const uint8_t* st = smem + rd * Cfg::kStageBytes;
    rd = rd + 1 == kStages ? 0 : rd + 1;
    typename DQ::Group gp;
#pragma unroll
    for (int i = 0; i < kKA; ++i) {
      // group_size >= 32: a group change can only come at an even atom
      if (i == 0 || (i % 2 == 0 && slot_of[i] != slot_of[i - 1])) {
        const uint4 s8 = *reinterpret_cast<const uint4*>(st + s_off + slot_of[i] * kSliceN * 2);
        const uint32_t zw = *reinterpret_cast<const uint32_t*>(st + z_off + slot_of[i] * (kSliceN / 8) * 4);
        DQ::load_group(gp, zw, s8);
      }
      const uint4 wv = *reinterpret_cast<const uint4*>(st + b_off + i * 512);
      uint32_t a[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) ldmatrix_x4(a[mb], st + a_off[i] + mb * 16 * Cfg::kARowBytes);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b[4];
        DQ::word(b, words[j], gp, j);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          Mma<T>::run(acc[mb][2 * j], a[mb], b[0], b[1]);
          Mma<T>::run(acc[mb][2 * j + 1], a[mb], b[2], b[3]);
        }
      }
    }
    if (cs.kt == p.KT - 1 || t == n_units - 1) flush();
    cs.advance(p.KT, p.spg, p.grp_step);
  }
  cp_async_wait<0>();
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T, int MB>
void launch_mb(const GemmArgs& a, const StreamParams& p, int grid, cudaStream_t stream) {
  using Cfg = StreamCfg<MB>;
  auto kernel = awq_stream_kernel<T, MB>;
  // Opt in to > 48 KB of dynamic shared memory (a host-side attribute: fine during graph capture;
  // idempotent, so racing threads are harmless).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  kernel<<<grid, kStThreads, Cfg::kSmemBytes, stream>>>(
      static_cast<const T*>(a.x), reinterpret_cast<const uint4*>(a.qweight),
      reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const T*>(a.scales), static_cast<T*>(a.out),
      a.workspace, a.counters, p);
}

int mb_for(int M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

int log2_exact(int v) {
  int r = 0;
  while ((1 << r) < v) ++r;
  return (1 << r) == v ? r : -1;
}

StreamParams params_for(int M, int N, int K, int group_size, int per, int grid) {
  StreamParams p{};
  p.M = M;
  p.N = N;
  p.K = K;
  p.KT = ceil_div(K, kStageK);
  p.KT16 = K / 16;
  p.NT = N / 64;
  p.groups = K / group_size;
  if (group_size < kStageK) {
    p.spg = 1;
    p.grp_step = kStageK / group_size;
    p.gps = p.grp_step;
    p.gshift = log2_exact(group_size / 16);
  } else {
    p.spg = group_size >= K ? p.KT : group_size / kStageK;
    p.grp_step = 1;
    p.gps = 1;
    p.gshift = 31;
  }
  const int slices = ceil_div(N, kSliceN);
  p.units = slices * p.KT;
  p.per = per;
  p.max_parts = std::min(grid, ceil_div(p.KT, p.per) + 1);
  return p;
}

}  // namespace

bool stream_supports(int M, int N, int K, int group_size) {
  if (M < 1 || M > kStreamMaxM || N % 64 || K % 16 || group_size % 32 || K % group_size) return false;
  if (group_size < kStageK) return kStageK % group_size == 0 && log2_exact(group_size / 16) >= 0;
  return group_size % kStageK == 0 || group_size == K;
}

StreamPlan plan_stream(int M, int N, int K, int group_size, int num_sms) {
  const int per_sm = mb_for(M) == 1 ? StreamCfg<1>::kMinBlocks : StreamCfg<2>::kMinBlocks;
  const int slices = ceil_div(N, kSliceN);
  const int units = slices * ceil_div(K, kStageK);
  const int grid0 = std::max(1, std::min(units, num_sms * per_sm));
  const int per = ceil_div(units, grid0);
  StreamPlan plan;
  plan.grid = ceil_div(units, per);  // no empty CTAs
  plan.per = per;
  const StreamParams p = params_for(M, N, K, group_size, per, plan.grid);
  plan.slices = slices;
  plan.workspace_floats = (size_t)slices * p.max_parts * std::min(M, 16 * mb_for(M)) * kSliceN;
  plan.counters = slices;
  return plan;
}

void launch_stream(DType dt, const GemmArgs& a, const StreamPlan& plan, cudaStream_t stream) {
  const StreamParams p = params_for(a.M, a.N, a.K, a.group_size, plan.per, plan.grid);
  const int mb = mb_for(a.M);
  if (dt == DType::kHalf) {
    if (mb == 1) launch_mb<__half, 1>(a, p, plan.grid, stream);
    else if (mb == 2) launch_mb<__half, 2>(a, p, plan.grid, stream);
    else launch_mb<__half, 4>(a, p, plan.grid, stream);
  } else {
    if (mb == 1) launch_mb<__nv_bfloat16, 1>(a, p, plan.grid, stream);
    else if (mb == 2) launch_mb<__nv_bfloat16, 2>(a, p, plan.grid, stream);
    else launch_mb<__nv_bfloat16, 4>(a, p, plan.grid, stream);
  }
}

}  // namespace awq

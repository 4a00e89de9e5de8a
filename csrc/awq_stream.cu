// Streaming tensor-core kernel for few tokens (M = 1..64 per launch, 1..128 on warpgroup mma;
// awq_ops.cpp runs more rows in passes) on the stream runtime layout.
//
// Why.  At M <= 64 the job is to stream the int4 weights from DRAM once, and the older kernels
// (awq_skinny.cu; a CUDA-core GEMV, since retired) are limited by *instruction issue*, not by
// bytes: 370-600 warp-instructions per KB of weights (scripts/sass_budget.py), which caps them
// near 1.8-2.9 TB/s on an H200 even at 100 % issue (shared/design/kernels-v2.md).  This kernel is built to
// spend <= 175 per KB (scripts/sass_budget.py; the figures: benchmarks/RESULTS.md):
//
//  * Layout (awqlib/packing.py, "stream layout", repacked once at load): 16x64 atoms, one 16-byte
//    fragment per lane, k-pairs pre-interleaved, so a word of 8 weights becomes the mma B
//    fragments of two n8-tiles with 4 lop3 + 1 shift (fp16) and no byte permute; scales and zero
//    points are permuted so a lane reads its 8 columns' scales with one 16-byte and zeros with one
//    4-byte shared load per group.
//  * Exactness: (magic + q) - (magic + z) is exact and the single multiply by the scale rounds
//    once, as in the reference (fp16 high nibbles: fma(16 q + 1024, 1/16, -(64 + z)), also exact).
//    Group sums (Kernel.STREAM_GROUP_SUMS, M <= 32, groups >= 128 rows) skip that multiply: the
//    mma sums the exact products x (q - z) in fp32 and the scale is applied in fp32 once per
//    warp k-slice (GroupSums: about 13 % fewer instructions per KB).
//  * Pipeline: a 3-stage (deep: 4) cp.async ring in shared memory; a stage is 512 k-rows x 128 columns
//    (32 KB of weights; 256 rows at M > 32) plus the activations, scales and zeros it needs, so
//    64 KB of weights are in flight per SM (GPUs with less shared memory per block run the
//    compact configuration, StreamCfg: 256-row stages, 2-3 of them; the deep one, AWQLIB_STREAM_DEEP,
//    has 4 stages at M <= 16 and 33-64: 96 and 48 KB in flight; the wgmma one 3-5, below).  Every shared-memory access
//    is [ring-slot base + compile-time offset] (the slot is a counter), and there is no integer
//    division in the loop (group, slice and pointer positions advance by constants).
//  * Few tokens (M <= 8, on unless AWQLIB_STREAM_NARROW=0: NARROW below): the mma's operands
//    swapped, so that the weights fill its 16-row side and the tokens its 8-column one -- half the
//    mma of the 16-row tiling.
//  * Warpgroup mma (sm_90a, kConfigWgmma: AWQLIB_STREAM_WGMMA=1, WGMMA below): the same ring,
//    partition and dequantization, but each warpgroup of 4 warps takes one n-atom through the whole
//    stage and issues wgmma.mma_async -- the dequantized weights as its A from registers (each warp
//    the 16 columns of one word of its lanes' fragments), the tokens as its N (16 MB of them) from
//    shared memory in the 128-byte-swizzled K-major layout.  The tensor cores then run while the
//    warps dequantize the next 64 k, where mma.sync makes each warp wait for its own; and no k-warp
//    partial sums are added at the end of a slice (each output has one owner, whose registers go
//    straight to the output or the workspace).  Up to 128 tokens in one pass (wgmma's N = 128).
//  * Wide slices (kConfigWide: AWQLIB_STREAM_WIDE=1, M 17-64): 4 n-atoms x 2 k-slices per CTA, so
//    a slice's activations are read once per 256 columns instead of 128 (why: before StreamCfg).
//  * Work split: one CTA of 8 warps per SM = 2 (64-column n-atoms) x 4 (k-slices of 128 rows).
//    The persistent grid (one CTA per SM; fewer where awq_gemm_variant's `splits` caps it, a
//    tuning knob) takes the (column slice, k-tile) units in slice-major order, each CTA a
//    contiguous run ("striped" partition), so every SM streams the same number of bytes whatever
//    the shape.  A slice split over several CTAs is reduced deterministically: each part writes
//    fp32 partials to its own workspace slot, the last to arrive (arrive_last) adds the slots in
//    part order and writes the output, and resets its counter (awq_ops.cpp: counters_for).
//
// Checked on the CPU (layout arithmetic bit for bit, indexing by tests/test_stream_emulation.py,
// this source itself by its CPU twin, tests/test_cpu_twin.py -- which is why the CUDA runtime
// side below sits in #ifndef AWQ_HOST_EMULATION -- and the SASS budget by tests/test_sass_budget.py)
// and on an H200 (tests/test_kernels_cuda.py, benchmarks/gpu_sweep.py: benchmarks/RESULTS.md), after
// which the stream layout became packing.DEFAULT_RUNTIME_LAYOUT.
#include "awq_common.cuh"
#include "awq_kernels.h"

#include <algorithm>
#include <cstddef>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace awq {
namespace {

constexpr int kStThreads = 256;
constexpr int kStWarps = kStThreads / 32;
constexpr int kAtomWords = 128;                 // one 16x64 atom: 32 lanes x 4 words
// 64-column n-atoms of a CTA's column slice (one per n-warp; the other warps split the stage's
// k-rows): 2, so a slice is 128 columns and 4 warps share each atom's k-rows -- or 4 in the wide
// configuration (before StreamCfg), 256 columns and 2 warps along K.
constexpr int na_for(int config) { return config == kConfigWide ? 4 : 2; }
constexpr int kw_for(int config) { return kStWarps / na_for(config); }       // warps along K
constexpr int slice_n_for(int config) { return 64 * na_for(config); }        // output columns of a slice
static_assert(kStWarps % na_for(kConfigLarge) == 0 && kStWarps % na_for(kConfigWide) == 0,
              "warps split evenly over n-atoms");

// k16 atoms per warp per stage: 8 (a warp streams 4 KB per stage, which amortises the loader
// and the ring bookkeeping: sass_budget.py), 4 at M > 32 where the activations take the room, and
// 4 in the compact configuration; 2 at M > 64 (wgmma: 128 tokens take 32 KB of a 128-row stage).
constexpr int ka_for(int MB, int config) { return MB == 8 ? 2 : MB == 4 || config == kConfigCompact ? 4 : 8; }

// Five shared-memory configurations (StreamConfig).  The large one (3 stages of 16-32 KB of
// weights, 152-208 KB per CTA) is for H100/H200 (227 KB per block), and for an A100 (163 KB) at
// MB = 1 and 4.  The compact one (k-tile 256; 3 stages at MB = 1, 2 at MB = 2: 81 and 70 KB with
// the static part) is what fits the A100 at MB = 2 and the ~99 KB of an sm_86/89/120 GPU (A10,
// L4, L40S, RTX); there M > 32 takes dequantize + cuBLAS (no MB = 4 stage fits: 2 x 50.5 KB).
// These two must keep fitting those GPUs (static_asserts below), else a whole class of them
// silently falls back.
// The deep one (opt-in: awq_ops.cpp stream_deep) is the large one with a fourth stage at MB = 1
// (213 KB with the static part: 96 KB of weights in flight per SM instead of 64) and MB = 4 (203
// KB: 48 KB instead of 32); four MB = 2 stages (69 KB each) do not fit.  Why: on an H200 the large
// kernel streams 70b-down at M = 1 at 65 % of the copy bandwidth with its warps 60 % idle, stalled
// on long-scoreboard (the cp.async data) and fixed-latency waits more than on anything else (ncu:
// benchmarks/RESULTS.md); more bytes in flight is the lever that leaves.  At M = 64 its stages take
// ~3 us each where their mma alone would take ~1 (estimated at ~6 cycles per mma.sync): whether a
// deeper ring is what they lack is what timing the deep one there says.  It fits H100/H200 only,
// yet is compiled for every architecture in the build (32 kernels an A100 or sm_89 never
// launches): compiling it out below sm_90 would leave a PTX build JIT-compiled for an H100
// without it.
// The wgmma one (opt-in: awq_ops.cpp stream_wgmma) has the large one's stages for warpgroup mma: 4
// of them at MB = 1 and 4 (3 at MB = 2: 69 KB each), and at MB = 8 (65-128 tokens, one pass where
// the others take two or dequantize + cuBLAS) 5 stages of 128 rows (8 KB of weights, 32 KB of
// activations; 3 loaded ahead of the one read: load_ahead_for), each on a 1024-byte boundary (the
// 128-byte swizzle of its activation blocks).  Its
// sums go from the registers to the output (no `red`), so rows past M are zeroed once -- hygiene:
// no output reads them.  Its kernels exist only in an sm_90a build (their bodies trap elsewhere),
// which stream_wgmma_built tells the host; an sm_90a kernel runs on an H100/H200 only.
// The wide one (opt-in: awq_ops.cpp stream_wide) is about the activations' bytes, at MB = 2 and 4.
// Every CTA working on a column slice reads the stage's activations for its columns alone: 2 M
// bytes per k-row against the 32 kNA bytes of weights of the slice's 64 kNA columns, M / 32 of the
// weight bytes with 128-column slices -- twice them at 64 tokens, all of it L2 -> SM traffic on top of
// the weights (shared/design/kernels-v2.md asks for 256-column CTAs at M 17-64).  The wide CTA
// spans 4 n-atoms (256 columns) with 2 warps along K: half the activation bytes per weight byte, the
// same 64 columns per warp (so the same accumulators, dequantization and mma per weight), twice the
// fp32 partials per split part.  Its stages: MB = 2 three of 256 rows (32 KB of weights, 16 KB of
// activations: 160 KB with the static part), MB = 4 four of 128 rows (16 + 16 KB: 139 KB) -- so it
// fits an A100 too, where it also takes the 17-32 rows the large configuration has no room for.
// At four m-tiles its k-warp sums go through the consumed slot in rounds of kRedRows rows
// (flush_pair: a whole slice's 64 x 256 fp32 would be 64 KB, more than a stage).  Whether the
// traffic is what bounds M 17-64 (0.5-0.8x fp16 on an H200 where the mma alone would allow ~3x) is
// what timing it says: opt-in until then.
static_assert(kStreamCompactMaxM == 32, "the compact configurations are MB = 1 and 2");
static_assert(kStreamDeepMaxM == kStreamMaxM, "the deep configuration is MB = 1 and 4");
constexpr int stages_for(int MB, int config) {
  return config == kConfigCompact && MB == 2 ? 2
         : config == kConfigDeep              ? 4
         : config == kConfigWgmma             ? (MB == 2 ? 3 : MB == 8 ? 5 : 4)
         : config == kConfigWide              ? (MB == 4 ? 4 : 3)
                                              : 3;
}
// Stages the loader keeps ahead of the one consumed: all but that one -- except for wgmma at MB = 8,
// where one wgmma group stays in flight at all times, the last of a stage into the next (waiting
// for it at the stage's end would expose half a stage's tensor-core work every stage: 4 of each
// warpgroup's 8 m64n128k16), so a slot is refilled only two stages after it was consumed.
constexpr int wgmma_groups_in_flight(int MB, int config) { return config == kConfigWgmma && MB == 8 ? 1 : 0; }
constexpr int load_ahead_for(int MB, int config) { return stages_for(MB, config) - 1 - wgmma_groups_in_flight(MB, config); }
constexpr int kH100SmemPerBlock = 232448;     // sharedMemPerBlockOptin of an H100 / H200 (227 KB)
constexpr int kA100SmemPerBlock = 166912;     // ... of an A100 (163 KB)
constexpr int kSm89SmemPerBlock = 101376;     // ... of an sm_86/89 GPU (99 KB)
constexpr int kStaticSmemAllowance = 2048;    // the kernel's static shared memory (1040 B on sm_90)

// The most rows (of `rows`, halving) whose fp32 sums over `slice_n` columns fit `bytes`.
constexpr int red_rows_for(int rows, int slice_n, int bytes) {
  return rows * slice_n * 4 <= bytes || rows <= 1 ? rows : red_rows_for(rows / 2, slice_n, bytes);
}

template <int MB, int CONFIG>
struct StreamCfg {
  // MB m16 tiles (M <= 16 MB; MB = 8 only for wgmma).  One CTA of 8 warps per SM (as Marlin),
  // kLoadAhead stages of weights in flight per SM (kStages - 1, or kStages - 2: load_ahead_for).
  static constexpr bool kCompact = CONFIG == kConfigCompact;
  static constexpr bool kWgmma = CONFIG == kConfigWgmma;
  static constexpr bool kWide = CONFIG == kConfigWide;
  static_assert(CONFIG == kConfigLarge || kCompact || CONFIG == kConfigDeep || kWgmma || kWide,
                "a configuration of StreamConfig");
  static_assert(!kCompact || 16 * MB <= kStreamCompactMaxM, "no compact configuration for M > 32");
  static_assert(CONFIG != kConfigDeep || MB != 2, "no deep configuration at two m-tiles (4 x 69 KB)");
  static_assert(MB != 8 || kWgmma, "eight m-tiles (128 tokens): the wgmma configuration only");
  static_assert(!kWide || MB == 2 || MB == 4, "the wide configuration: two and four m-tiles (M 17-64)");
  static constexpr int kNA = na_for(CONFIG);                         // n-atoms of a slice
  static constexpr int kKW = kw_for(CONFIG);                         // warps along K
  static constexpr int kSliceN = slice_n_for(CONFIG);                // 128 (256 wide)
  static constexpr int kKA = ka_for(MB, CONFIG);
  // k-rows of a stage: 512 (256 at MB = 4 or compact, 128 at 8; wide: 256, and 128 at MB = 4)
  static constexpr int kStageK = 16 * kKA * kKW;
  static constexpr int kMaxGroups = kStageK / 32;                    // group_size >= 32
  static constexpr int kStages = stages_for(MB, CONFIG);
  static constexpr int kLoadAhead = load_ahead_for(MB, CONFIG);
  static constexpr int kWgmmaInFlight = wgmma_groups_in_flight(MB, CONFIG);  // wgmma groups a stage leaves
  static_assert(kLoadAhead >= 1, "a stage in flight while one is consumed");
  static constexpr int kMinBlocks = 1;
  static constexpr int kRows = 16 * MB;
  static constexpr int kBBytes = kNA * kKA * kKW * kAtomWords * 4;  // 32 KB (16 KB)
  static constexpr int kARowBytes = kStageK * 2;                     // 1 KB (512 B)
  static constexpr int kABytes = kRows * kARowBytes;
  static constexpr int kSBytes = kMaxGroups * kSliceN * 2;
  static constexpr int kZBytes = kMaxGroups * (kSliceN / 8) * 4;
  // Activation row m's 16-byte chunk ch (8 k) sits at kOffA + m kARowBytes + (ch ^ (m % 8)) 16 (rows
  // XOR-swizzled for ldmatrix), or for wgmma in the operand's 128-byte-swizzled K-major blocks
  // (awq_common.cuh), one per 64 k of kRows rows of 128 bytes: kOffA + (ch / 8) kABlockBytes + m 128
  // + ((ch % 8) ^ (m % 8)) 16.
  static constexpr int kABlockBytes = kRows * kSwizzleRowBytes;
  static constexpr int kOffA = kBBytes;
  static constexpr int kOffS = kOffA + kABytes;
  static constexpr int kOffZ = kOffS + kSBytes;
  // wgmma: every stage on a 1024-byte boundary (so are its activation blocks), found at run time
  // (the dynamic shared memory follows the static part: kAlignSlack)
  static constexpr int kStageBytes = kWgmma ? (kOffZ + kZBytes + kSwizzleBlockBytes - 1) / kSwizzleBlockBytes *
                                                  kSwizzleBlockBytes
                                            : kOffZ + kZBytes;
  static constexpr int kAlignSlack = kWgmma ? kSwizzleBlockBytes : 0;
  // The k-warp reduction buffer [kRedRows][kSliceN] fp32 reuses the ring slot just consumed, from
  // its start: the weights (and, at MB = 4, activation rows < 32 <= M), which the loader rewrites in
  // full before that slot is read again.  So 3 stages fit an A100's 163 KB at MB = 1 and 4.  It holds
  // kRedRows of the slice's rows at a time: all kRows of them, except in the wide configuration
  // (MB = 4: 16 rows a round, flush_pair).  (wgmma has none: one owner per output.)
  static constexpr int kRewrittenBytes = kBBytes + (MB == 4 ? 32 * kARowBytes : 0);
  static constexpr int kRedRows = kWgmma ? 0 : red_rows_for(kRows, kSliceN, kRewrittenBytes);
  static constexpr int kRedBytes = kRedRows * kSliceN * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes + kAlignSlack;
  static_assert(kWgmma || (kRedRows >= 16 && kRows % kRedRows == 0 && (kWide || kRedRows == kRows)),
                "the reduction buffer holds whole m16 tiles (all of them, but in the wide configuration)");
  static_assert(!kWgmma || (kOffA % kSwizzleBlockBytes == 0 && kABlockBytes % kSwizzleBlockBytes == 0),
                "wgmma: activation blocks on 1024-byte boundaries");
  static_assert(kStageBytes % 16 == 0 && kOffA % 16 == 0 && kOffS % 16 == 0 && kOffZ % 16 == 0,
                "cp.async destinations stay 16-byte aligned");
  static_assert(!kCompact || kSmemBytes + kStaticSmemAllowance <= kSm89SmemPerBlock,
                "the compact configurations must fit a 99 KB GPU");
  static_assert((CONFIG != kConfigDeep && !kWgmma) || kSmemBytes + kStaticSmemAllowance <= kH100SmemPerBlock,
                "the deep and wgmma configurations must fit an H100");
  static_assert(CONFIG != kConfigLarge || MB == 2 || kSmemBytes + kStaticSmemAllowance <= kA100SmemPerBlock,
                "the large M <= 16 and M 33-64 configurations must fit an A100");
  static_assert(!kWide || kSmemBytes + kStaticSmemAllowance <= kA100SmemPerBlock,
                "the wide configurations fit an A100");
};

// Dequantization of one stream-layout word into the B fragments of n8-tiles 2j (column c0) and
// 2j + 1 (column c1): lo = rows 2q, 2q+1 (b0), hi = rows 2q+8, 2q+9 (b1).  zlo = (magic + z_c0,
// magic + z_c1), zhi = (64 + z_c0, 64 + z_c1) (fp16 only), sc = (s_c0, s_c1).
template <typename T> struct StreamDequant;

constexpr uint32_t kLoNibbles = 0x000f000fu;  // bits 0..3 of both halves: rows 2q, 2q+1
constexpr uint32_t kHiNibbles = 0x00f000f0u;  // bits 4..7 of both halves: rows 2q+8, 2q+9 (x 16)
constexpr uint32_t kHalf64 = 0x54005400u;     // two fp16 64.0 (ulp 1/16): OR-ing 16 z reads 64 + z

// (x.lo, x.lo) and (x.hi, x.hi) of a pair, for either pair type.
__device__ __forceinline__ __half2 broadcast_lo(__half2 v) { return __low2half2(v); }
__device__ __forceinline__ __half2 broadcast_hi(__half2 v) { return __high2half2(v); }
__device__ __forceinline__ __nv_bfloat162 broadcast_lo(__nv_bfloat162 v) { return __low2bfloat162(v); }
__device__ __forceinline__ __nv_bfloat162 broadcast_hi(__nv_bfloat162 v) { return __high2bfloat162(v); }

// The B fragments of a word from its four (q - z) pairs d (d[0], d[1]: column c0; d[2], d[3]:
// column c1), times the columns' scales sc = (s_c0, s_c1) if SCALED.
template <bool SCALED, typename T2>
__device__ __forceinline__ void finish_word(uint32_t (&b)[4], T2 (&d)[4], T2 sc) {
  if constexpr (SCALED) {
    const T2 s0 = broadcast_lo(sc), s1 = broadcast_hi(sc);
    d[0] = __hmul2(d[0], s0);
    d[1] = __hmul2(d[1], s0);
    d[2] = __hmul2(d[2], s1);
    d[3] = __hmul2(d[3], s1);
  }
#pragma unroll
  for (int h = 0; h < 4; ++h) b[h] = as_u32<T2>(d[h]);
}

template <> struct StreamDequant<__half> {
  struct Group {
    __half2 zlo[4], zhi[4], sc[4];
  };
  __device__ __forceinline__ static void load_group(Group& gp, uint32_t zw, uint4 s8) {
    // nibbles (j, j+4) of zw are the zeros of (c0, c1) of word j.
    gp.zlo[0] = as_t2<__half2>(lop3_and_or(zw, kLoNibbles, Traits<__half>::kMagic));
    gp.zlo[1] = as_t2<__half2>(lop3_and_or(zw >> 4, kLoNibbles, Traits<__half>::kMagic));
    gp.zlo[2] = as_t2<__half2>(lop3_and_or(zw >> 8, kLoNibbles, Traits<__half>::kMagic));
    gp.zlo[3] = as_t2<__half2>(lop3_and_or(zw >> 12, kLoNibbles, Traits<__half>::kMagic));
    // 64.0 has ulp 1/16: the zero goes to bits 4..7 to read as 64 + z.
    gp.zhi[0] = as_t2<__half2>(lop3_and_or(zw << 4, kHiNibbles, kHalf64));
    gp.zhi[1] = as_t2<__half2>(lop3_and_or(zw, kHiNibbles, kHalf64));
    gp.zhi[2] = as_t2<__half2>(lop3_and_or(zw >> 4, kHiNibbles, kHalf64));
    gp.zhi[3] = as_t2<__half2>(lop3_and_or(zw >> 8, kHiNibbles, kHalf64));
    gp.sc[0] = as_t2<__half2>(s8.x);
    gp.sc[1] = as_t2<__half2>(s8.y);
    gp.sc[2] = as_t2<__half2>(s8.z);
    gp.sc[3] = as_t2<__half2>(s8.w);
  }
  // Entry 0 only, of one word's columns: zw >> 4 j (its zeros in nibbles 0 and 4) and its scale pair
  // (the wgmma kernels, whose warps dequantize one word of each lane fragment).
  __device__ __forceinline__ static void load_group_word(Group& gp, uint32_t zw, uint32_t s2) {
    gp.zlo[0] = as_t2<__half2>(lop3_and_or(zw, kLoNibbles, Traits<__half>::kMagic));
    gp.zhi[0] = as_t2<__half2>(lop3_and_or(zw << 4, kHiNibbles, kHalf64));
    gp.sc[0] = as_t2<__half2>(s2);
  }
  // b[0], b[1]: tile 2j; b[2], b[3]: tile 2j+1.  SCALED: (q - z) s, else q - z (exact small
  // integers: the group-sums kernels apply the scale to fp32 sums, GroupSums).
  template <bool SCALED = true>
  __device__ __forceinline__ static void word(uint32_t (&b)[4], uint32_t w, const Group& gp, int j) {
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    const uint32_t w8 = w >> 8;
    const __half2 lo0 = as_t2<__half2>(lop3_and_or(w, kLoNibbles, Traits<__half>::kMagic));
    const __half2 hi0 = as_t2<__half2>(lop3_and_or(w, kHiNibbles, Traits<__half>::kMagic));
    const __half2 lo1 = as_t2<__half2>(lop3_and_or(w8, kLoNibbles, Traits<__half>::kMagic));
    const __half2 hi1 = as_t2<__half2>(lop3_and_or(w8, kHiNibbles, Traits<__half>::kMagic));
    __half2 d[4] = {__hsub2(lo0, __low2half2(gp.zlo[j])), __hfma2(hi0, sixteenth, __hneg2(__low2half2(gp.zhi[j]))),
                    __hsub2(lo1, __high2half2(gp.zlo[j])), __hfma2(hi1, sixteenth, __hneg2(__high2half2(gp.zhi[j])))};
    finish_word<SCALED>(b, d, gp.sc[j]);
  }
};

template <> struct StreamDequant<__nv_bfloat16> {
  // bf16 has 7 mantissa bits: a nibble at bits 4..7 would reach the exponent, so every nibble is
  // shifted down to bits 0..3 (3 shifts per word instead of 1).
  struct Group {
    __nv_bfloat162 zlo[4], sc[4];
  };
  __device__ __forceinline__ static void load_group(Group& gp, uint32_t zw, uint4 s8) {
    gp.zlo[0] = as_t2<__nv_bfloat162>(lop3_and_or(zw, kLoNibbles, Traits<__nv_bfloat16>::kMagic));
    gp.zlo[1] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 4, kLoNibbles, Traits<__nv_bfloat16>::kMagic));
    gp.zlo[2] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 8, kLoNibbles, Traits<__nv_bfloat16>::kMagic));
    gp.zlo[3] = as_t2<__nv_bfloat162>(lop3_and_or(zw >> 12, kLoNibbles, Traits<__nv_bfloat16>::kMagic));
    gp.sc[0] = as_t2<__nv_bfloat162>(s8.x);
    gp.sc[1] = as_t2<__nv_bfloat162>(s8.y);
    gp.sc[2] = as_t2<__nv_bfloat162>(s8.z);
    gp.sc[3] = as_t2<__nv_bfloat162>(s8.w);
  }
  __device__ __forceinline__ static void load_group_word(Group& gp, uint32_t zw, uint32_t s2) {
    gp.zlo[0] = as_t2<__nv_bfloat162>(lop3_and_or(zw, kLoNibbles, Traits<__nv_bfloat16>::kMagic));
    gp.sc[0] = as_t2<__nv_bfloat162>(s2);
  }
  template <bool SCALED = true>
  __device__ __forceinline__ static void word(uint32_t (&b)[4], uint32_t w, const Group& gp, int j) {
    using B2 = __nv_bfloat162;
    constexpr uint32_t kMagic = Traits<__nv_bfloat16>::kMagic;
    const B2 z0 = __low2bfloat162(gp.zlo[j]), z1 = __high2bfloat162(gp.zlo[j]);
    B2 d[4] = {__hsub2(as_t2<B2>(lop3_and_or(w, kLoNibbles, kMagic)), z0),
               __hsub2(as_t2<B2>(lop3_and_or(w >> 4, kLoNibbles, kMagic)), z0),
               __hsub2(as_t2<B2>(lop3_and_or(w >> 8, kLoNibbles, kMagic)), z1),
               __hsub2(as_t2<B2>(lop3_and_or(w >> 12, kLoNibbles, kMagic)), z1)};
    finish_word<SCALED>(b, d, gp.sc[j]);
  }
};

// Group sums.  Scaling every dequantized pair costs one HMUL2 per two weights: 128 of a warp's
// ~700 instructions per stage at M <= 16.  The scale is constant over a group's rows, so
// sum_k x_k (q_k - z) s = s sum_k x_k (q_k - z): the mma accumulates unscaled sums in `part` (the
// products x (q - z) are exact, |q - z| <= 15, and summed in fp32 like every mma here), and at
// the end of each stage -- a warp's 128-row k-slice lies in one group -- they are folded into
// the accumulators with one FFMA each.  The fold reads the scales of the accumulator's own
// columns, 8 t + 2 q + e (t the n8-tile, e the column of the pair), which the stream layout's
// scale permutation puts at positions 16 q + 8 e + t: two 16-byte shared loads per fold, shared
// by the lanes of equal q.  No weight is rounded to T, so the result is closer to the exact
// product than the scaled path's.  A fold (MB * 32 FFMA + 16 conversions; the cleared sums cost nothing, the next
// mma reads RZ) saves the stage's 16 kKA HMUL2 when it comes once per stage, at MB <= 2 without
// FINE groups (sm_90 SASS, fp16, MB = 1: about 13 % fewer instructions per KB).  Where a FINE
// group change folds inside a branch, the sums are cleared by moves and the loop got longer than
// the scaled one (measured by sass_budget.py at group 64), so those are not instantiated
// (group_sums_pay).
// A warp's fp32 accumulators: MB m16 tiles x NT tiles x 4 per lane (mma.m16n8k16's C/D): 8 n8
// column tiles, or in the narrow kernels 4 m16 column tiles (kAccTiles).
template <int MB, int NT>
__device__ __forceinline__ void zero_accumulators(float (&acc)[MB][NT][4]) {
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][t][e] = 0.f;
}

template <typename T, int MB, int NT>
struct GroupSums {
  float part[MB][NT][4];
  __device__ __forceinline__ void clear() { zero_accumulators(part); }
  // acc += part * scales (sq: the lane's 16 scales in shared memory), then part = 0.
  __device__ __forceinline__ void fold(float (&acc)[MB][NT][4], const uint8_t* sq) {
    static_assert(NT == 8, "the n8-tile accumulators");
    using T2 = typename Traits<T>::T2;
    const uint4 u0 = *reinterpret_cast<const uint4*>(sq), u1 = *reinterpret_cast<const uint4*>(sq + 16);
    const uint32_t w[2][4] = {{u0.x, u0.y, u0.z, u0.w}, {u1.x, u1.y, u1.z, u1.w}};
    float sc[2][8];  // [e][t]
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = Traits<T>::to_float2(as_t2<T2>(w[e][i]));
        sc[e][2 * i] = f.x;
        sc[e][2 * i + 1] = f.y;
      }
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mb][t][e] = fmaf(part[mb][t][e], sc[e & 1][t], acc[mb][t][e]);
    clear();
  }
  // The narrow kernels' fold: accumulator (t, e) is column 16 t + g + 8 (e >> 1), whose scale the
  // lane holds already -- the group's sc[t] = (s of column 16 t + g, s of 16 t + 8 + g) that
  // dequantized word t -- so no shared-memory load.
  __device__ __forceinline__ void fold_narrow(float (&acc)[MB][NT][4], const typename Traits<T>::T2 (&sc)[4]) {
    static_assert(MB == 1 && NT == 4, "the narrow accumulators");
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float2 f = Traits<T>::to_float2(sc[t]);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[0][t][e] = fmaf(part[0][t][e], e >> 1 ? f.y : f.x, acc[0][t][e]);
    }
    clear();
  }
};

// f(std::integral_constant<int, I>) for I in [B, E): loop indices usable as template arguments.
template <int B, int E, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (B < E) {
    f(std::integral_constant<int, B>{});
    static_for<B + 1, E>(f);
  }
}

// Where the loader's unit walk stands: column slice, k-tile in the slice, and the first group
// of the k-tile with its sub-step counter (advanced by counters, never by division).
struct Cursor {
  int slice, kt, grp, sub;
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
  int pdl;        // launched as a programmatic dependent launch: the prologue streams weights first
};

// The CTAs that hold slice `slice`'s units (the persistent grid's contiguous runs): the first, and
// how many -- more than one when a run boundary falls inside the slice.  This CTA is part
// blockIdx.x - first.
struct SliceParts {
  int first, parts;
};
__device__ __forceinline__ SliceParts slice_parts(int slice, int KT, int per) {
  const int first = (slice * KT) / per, last = ((slice + 1) * KT - 1) / per;
  return {first, last - first + 1};
}

// The last arriver sums kOutputsInFlight outputs per thread at once, so that their loads of each
// part are in flight together: at 16-64 rows one output at a time is 8-32 rounds of dependent L2
// round trips per part, microseconds the CTA's stream waits on.  (16-byte accesses here cost the
// streaming loop 3-4 % more instructions per KB in the SASS -- ptxas allocates the whole kernel
// differently -- so the accesses stay 4 bytes wide.)
constexpr int kOutputsInFlight = 4;

// Output element `at`: the fp32 sum rounded to T -- plus, where the launch has a residual
// (awq_gemm_add: a layer's residual add after its last linear), residual[at], the two added in
// fp32 and rounded again, as torch's add of the two tensors rounds.  Read after
// grid_dependency_wait, like every input a previous kernel may write.
template <typename T>
__device__ __forceinline__ void store_out(T* __restrict__ out, const T* __restrict__ residual, size_t at, float v) {
  T o = Traits<T>::from_float(v);
  if (residual != nullptr) o = Traits<T>::from_float(__fadd_rn(Traits<T>::to_float(o), Traits<T>::to_float(residual[at])));
  out[at] = o;
}

// After this CTA wrote its part of split slice `slice` ([rows][SLICE_N] fp32 in its workspace
// slot): the last part to arrive adds the slots in part order (deterministic) and writes the
// output.  Out of line: it runs once per slice and CTA, and keeps its divisions and stores out of
// the streaming loop.
template <typename T, int SLICE_N>
__device__ AWQ_NOINLINE void sum_parts(T* __restrict__ out, const T* __restrict__ residual,
                                       const float* __restrict__ ws, int32_t* __restrict__ counters, int N,
                                       int max_parts, int slice, int rows, int parts) {
  const int tid = threadIdx.x;
  const int n0 = slice * SLICE_N;
  const int n = rows * SLICE_N;  // sums of a slot
  if (!arrive_last(&counters[slice], parts)) return;
  const float* base = ws + (size_t)slice * max_parts * n;
  for (int i0 = tid; i0 < n; i0 += kOutputsInFlight * kStThreads) {
    float v[kOutputsInFlight] = {};
    for (int s = 0; s < parts; ++s) {
#pragma unroll
      for (int u = 0; u < kOutputsInFlight; ++u)
        if (i0 + u * kStThreads < n) v[u] += __ldcg(base + (size_t)s * n + i0 + u * kStThreads);
    }
#pragma unroll
    for (int u = 0; u < kOutputsInFlight; ++u) {
      const int i = i0 + u * kStThreads, r = i / SLICE_N, col = i % SLICE_N;
      if (i < n && n0 + col < N) store_out(out, residual, (size_t)r * N + n0 + col, v[u]);
    }
  }
  if (tid == 0) counters[slice] = 0;  // ready for the next launch (awq_ops.cpp: counters_for)
}

// Write slice `slice` from the CTA's fp32 sums `red` [rows][SLICE_N]: straight to the output
// when one CTA covered the whole slice, else into this part's workspace slot for sum_parts.  Out
// of line, as sum_parts.
template <typename T, int SLICE_N>
__device__ AWQ_NOINLINE void write_slice(const float* red, T* __restrict__ out, const T* __restrict__ residual,
                                         float* __restrict__ ws, int32_t* __restrict__ counters, int N, int KT,
                                         int per, int max_parts, int slice, int rows) {
  const int tid = threadIdx.x;
  const SliceParts sp = slice_parts(slice, KT, per);
  const int n0 = slice * SLICE_N;
  const int n = rows * SLICE_N;  // sums of a slot, and of `red`
  if (sp.parts == 1) {
    for (int i = tid; i < n; i += kStThreads) {
      const int r = i / SLICE_N, col = i % SLICE_N;
      if (n0 + col < N) store_out(out, residual, (size_t)r * N + n0 + col, red[i]);
    }
    return;
  }
  float* slot = ws + ((size_t)slice * max_parts + blockIdx.x - sp.first) * n;
  for (int i = tid; i < n; i += kStThreads) slot[i] = red[i];
  sum_parts<T, SLICE_N>(out, residual, ws, counters, N, max_parts, slice, rows, sp.parts);
}

// EXACT: K % kStageK == 0 and N % kSliceN == 0, so no load needs a bounds predicate (the
// instantiation real models run); otherwise tails are zero-filled.  FINE: group_size < 16 kKA, so
// the group can change inside a warp's k-slice (group_size 32, 64); otherwise a warp loads its
// scales and zeros once per stage.  SUMS ("group sums"): the mma accumulates sum_k x (q - z) of
// each group in fp32 registers of its own, multiplied by the group's scales once when the group
// ends, instead of one HMUL2 per two weights (GroupSums below).  CONFIG: the shared-memory
// configuration (StreamConfig, StreamCfg).
// NARROW (MB = 1, M <= kStreamNarrowMaxM): the mma computes (W^T x^T)^T -- "swap AB".  At M = 1
// the 16-row m16n8k16 tiling spends 15 of its 16 rows on padding; with the dequantized weights as
// the A operand (16 output columns x 16 k) and the tokens as the n8 B operand, each mma covers 16
// columns instead of 8: half the mma per weight, and one ldmatrix.x4 carries the B fragments of
// two atoms.  It costs no rearranging: the four B fragments a word's dequantization makes (the
// n8-tiles of columns 16 j + g and 16 j + 8 + g, rows 2q.. and 2q+8..) are, in the order
// {0, 2, 1, 3}, exactly the A fragment of columns 16 j .. 16 j + 15.
// WGMMA (CONFIG kConfigWgmma, sm_90a): the same swap on warpgroup mma.  wgmma's A is 64 rows, 16
// per warp in that same fragment layout, so warp wq of a warpgroup dequantizes word wq of each
// lane's fragment (columns 16 wq ..) and the 4 warps together hold an atom's 64 columns; its B is
// the 16 MB tokens x 16 k read by the tensor cores from the stage's activation blocks; its fp32
// D stays in registers across the CTA's part of a slice (one owner per output: the flush writes
// them out, no k-warps to add, no `red`).  The 4 wgmma of a 64-k block are committed as a group and
// run while the next block is dequantized; the stage waits for all of them before the barrier
// after which the loader may refill its slot (at MB = 8 for all but its last group, which the next
// stage's wait covers: a slot is refilled two stages after it was read, load_ahead_for).
// FINE there means a group ends inside the stage (group_size < kStageK).
template <typename T, int MB, bool EXACT, bool FINE, bool SUMS, int CONFIG, bool NARROW>
__global__ void __launch_bounds__(kStThreads, StreamCfg<MB, CONFIG>::kMinBlocks)
awq_stream_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                  const T* __restrict__ scales, T* __restrict__ out, const T* __restrict__ residual,
                  float* __restrict__ ws, int32_t* __restrict__ counters, const StreamParams p) {
  using Cfg = StreamCfg<MB, CONFIG>;
  using DQ = StreamDequant<T>;
#if defined(__CUDA_ARCH__) && !defined(AWQ_WGMMA_ARCH)
  if constexpr (Cfg::kWgmma) {  // no wgmma below sm_90a: nothing to compile (launch_stream never runs it there)
    __trap();
    return;
  }
#endif
  static_assert(!(SUMS && FINE), "group sums fold once per stage: a warp's k-slice must lie in one group");
  static_assert(!NARROW || (MB == 1 && Cfg::kKA % 2 == 0), "narrow: <= 8 tokens, atoms in pairs");
  constexpr bool kWg = Cfg::kWgmma;  // warpgroup mma (WGMMA below)
  static_assert(!kWg || (!SUMS && !NARROW), "wgmma: scaled fragments, the tokens on its N side");
  // accumulator tiles per warp over its 64 columns: 4 m16 column tiles (narrow) or 8 n8 ones; wgmma:
  // the warp's 16 columns x 16 MB tokens, 2 MB n8 tiles (MB x 2 here)
  constexpr int kAccTiles = kWg ? 2 : NARROW ? 4 : 8;
  constexpr int kStages = Cfg::kStages;
  constexpr int kKA = Cfg::kKA;
  constexpr int kStageK = Cfg::kStageK;
  constexpr int kNA = Cfg::kNA, kKW = Cfg::kKW, kSliceN = Cfg::kSliceN;  // the slice's n-atoms, k-warps, columns
  constexpr int kChunksPerRow = kStageK / 8;               // 16-byte activation chunks per row
  uint8_t* const smem = [] {
    uint8_t* base = dynamic_smem();
    if constexpr (Cfg::kAlignSlack > 0)  // to the next 1024-byte boundary of the shared window
      base += (kSwizzleBlockBytes - smem_address(base) % kSwizzleBlockBytes) % kSwizzleBlockBytes;
    return base;
  }();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % kNA, wk = warp / kNA;
  const int g = lane >> 2, q = lane & 3;

  const int u_begin = blockIdx.x * p.per;
  const int u_end = min(u_begin + p.per, p.units);
  const int n_units = u_end - u_begin;
  if (n_units <= 0) return;

  // ---- loader.  Every thread keeps its global sources as pointers advanced by constants per
  // stage (rebuilt only on a slice change) and its shared-memory destinations as compile-time
  // offsets from the ring slot.  Weight chunk r of thread tid: n-atom r / kWR, atom
  // warp + 8 (r % kWR) of the k-tile, lane chunk `lane` (kNA runs of kAtomsPerStage atoms, each
  // contiguous along K).  Activations: chunk tid % kChunksPerRow of rows tid / kChunksPerRow + kAStep r.
  // Scales / zeros: index tid + 256 r < kSzChunks gps loads chunk % kSzChunks (kSChunks of scales,
  // then the zeros': 16 and 4 for a 128-column slice) of group index / kSzChunks of the k-tile.
  constexpr int kAtomsPerStage = kKA * kKW;                 // atoms per n-atom and stage
  constexpr int kWR = kAtomsPerStage / 8;                    // weight chunks per thread and n-atom
  constexpr int kAStep = kStThreads / kChunksPerRow;         // activation rows per pass
  constexpr int kSChunks = kSliceN * 2 / 16, kZChunks = kSliceN / 2 / 16;  // a group's 16-byte chunks
  constexpr int kSzChunks = kSChunks + kZChunks;
  constexpr int kSzRounds = (Cfg::kMaxGroups * kSzChunks + kStThreads - 1) / kStThreads;
  static_assert(kAtomsPerStage % 8 == 0 && kStThreads % kChunksPerRow == 0 && Cfg::kRows % kAStep == 0, "tiling");
  const size_t nstride = (size_t)p.KT16 * 32;                // uint4s between n-atoms
  const int a_ch = tid % kChunksPerRow, a_row = tid / kChunksPerRow;
  const T* x_row = x + (size_t)a_row * p.K + 8 * a_ch;
  const size_t a_src_step = (size_t)kAStep * p.K;
  const int a_rows_end = min(p.M, Cfg::kRows);
  // where activation chunk ch of row m goes in a stage (StreamCfg: kARowBytes, kABlockBytes)
  auto a_chunk_offset = [](int m, int ch) {
    if constexpr (kWg)
      return Cfg::kOffA + (ch >> 3) * Cfg::kABlockBytes + m * kSwizzleRowBytes + (((ch & 7) ^ (m & 7)) * 16);
    else
      return Cfg::kOffA + m * Cfg::kARowBytes + ((ch ^ (m & 7)) * 16);
  };
  int sz_dst[kSzRounds], sz_gi[kSzRounds], sz_slice_bytes[kSzRounds], sz_col[kSzRounds];
  bool sz_on[kSzRounds], sz_scale[kSzRounds];
  size_t sz_row[kSzRounds];
  const uint8_t* sz_base[kSzRounds];
#pragma unroll
  for (int r = 0; r < kSzRounds; ++r) {
    const int idx = tid + r * kStThreads, ch = idx % kSzChunks;
    sz_gi[r] = idx / kSzChunks;
    sz_on[r] = sz_gi[r] < p.gps;
    sz_scale[r] = ch < kSChunks;
    sz_dst[r] = sz_scale[r] ? Cfg::kOffS + sz_gi[r] * kSliceN * 2 + ch * 16
                            : Cfg::kOffZ + sz_gi[r] * (kSliceN / 8) * 4 + (ch - kSChunks) * 16;
    sz_row[r] = sz_scale[r] ? (size_t)p.N * sizeof(T) : (size_t)p.N / 2;  // bytes per group
    sz_base[r] = sz_scale[r] ? reinterpret_cast<const uint8_t*>(scales) + ch * 16
                             : reinterpret_cast<const uint8_t*>(qzeros) + (ch - kSChunks) * 16;
    sz_slice_bytes[r] = sz_scale[r] ? kSliceN * sizeof(T) : kSliceN / 2;
    sz_col[r] = sz_scale[r] ? 8 * ch : 32 * (ch - kSChunks);  // first column of the chunk in the slice
  }

  struct Loader {
    Cursor c;
    const uint4* w;                // weight chunk 0 of this thread's k-tile
    const uint8_t* sz[kSzRounds];  // scale / zero chunk of group c.grp + sz_gi
    int k;                         // first k of the k-tile
  };
  auto loader_at = [&](int slice, int kt, int sub, int grp) {
    Loader l;
    l.c.slice = slice;
    l.c.kt = kt;
    l.c.sub = sub;
    l.c.grp = grp;
    l.w = qweight + (size_t)l.c.slice * kNA * nstride + (size_t)(l.c.kt * kAtomsPerStage + warp) * 32 + lane;
#pragma unroll
    for (int r = 0; r < kSzRounds; ++r)
      l.sz[r] = sz_base[r] + (size_t)(l.c.grp + sz_gi[r]) * sz_row[r] + (size_t)l.c.slice * sz_slice_bytes[r];
    l.k = l.c.kt * kStageK;
    return l;
  };
  // Moving from the last k-tile of a slice to the first of the next is a constant jump too: the
  // weights by kNA runs less the KT - 1 k-tiles walked, scales / zeros by one slice less the
  // groups walked.
  const int grp_last = ((p.KT - 1) / p.spg) * p.grp_step;
  const ptrdiff_t w_wrap = (ptrdiff_t)kNA * nstride - (ptrdiff_t)(p.KT - 1) * kAtomsPerStage * 32;
  ptrdiff_t sz_wrap[kSzRounds];
#pragma unroll
  for (int r = 0; r < kSzRounds; ++r) sz_wrap[r] = sz_slice_bytes[r] - (ptrdiff_t)grp_last * (ptrdiff_t)sz_row[r];
  auto loader_next = [&](Loader& l) {
    if (l.c.kt + 1 == p.KT) {  // next slice
      ++l.c.slice;
      l.c.kt = l.c.sub = l.c.grp = 0;
      l.w += w_wrap;
      l.k = 0;
#pragma unroll
      for (int r = 0; r < kSzRounds; ++r) l.sz[r] += sz_wrap[r];
      return;
    }
    ++l.c.kt;
    l.w += kAtomsPerStage * 32;
    l.k += kStageK;
    if (++l.c.sub == p.spg) {
      l.c.sub = 0;
      l.c.grp += p.grp_step;
#pragma unroll
      for (int r = 0; r < kSzRounds; ++r) l.sz[r] += sz_row[r] * p.grp_step;
    }
  };
  const int slice0 = u_begin / p.KT, kt0 = u_begin - slice0 * p.KT;  // once, before the loop
  Loader ld = loader_at(slice0, kt0, kt0 % p.spg, (kt0 / p.spg) * p.grp_step);

  // The rows of A past M are zero in every stage, written once.
  for (int i = tid; i < kStages * (Cfg::kRows - min(p.M, Cfg::kRows)) * kChunksPerRow; i += kStThreads) {
    const int per_stage = (Cfg::kRows - p.M) * kChunksPerRow;
    const int s = i / per_stage, r = i % per_stage;
    const int row = p.M + r / kChunksPerRow, ch = r % kChunksPerRow;  // (every chunk of the row, in any order)
    *reinterpret_cast<uint4*>(smem + s * Cfg::kStageBytes + a_chunk_offset(row, ch)) = make_uint4(0, 0, 0, 0);
  }

  // A stage's int4 weights (written only when the model is loaded: awq_ops.cpp stream_pdl) ...
  auto load_weights = [&](int slot, const Loader& l) {
    uint8_t* st = smem + slot * Cfg::kStageBytes;
    const int atom0 = l.c.kt * kAtomsPerStage + warp;
    // n-atom na's run of the k-tile: nstride apart
    const auto run = [&](int na) { return na == 0 ? l.w : l.w + na * nstride; };
    if constexpr (EXACT) {
      // chunk r: run r / kWR, 8 atoms (4 KB) further along K per r % kWR -- an immediate offset
      static_for<0, kNA * kWR>([&](auto rc) {
        constexpr int r = decltype(rc)::value;
        cp_async16_stream<(r % kWR) * 256 * 16>(st + (tid + r * kStThreads) * 16, run(r / kWR));
      });
    } else {
#pragma unroll
      for (int r = 0; r < kNA * kWR; ++r) {
        const int na = r / kWR, sub = r % kWR;  // compile-time
        const uint4* src = run(na) + sub * 256;
        const bool ok = atom0 + 8 * sub < p.KT16 && l.c.slice * kNA + na < p.NT;
        cp_async16(st + (tid + r * kStThreads) * 16, ok ? (const void*)src : (const void*)qweight, ok);
      }
    }
  };
  // ... and its scales, zeros and activations (which the kernel just before may have written: the
  // activations always, scales and zeros where they were cast or copied for this call).
  auto load_inputs = [&](int slot, const Loader& l) {
    uint8_t* st = smem + slot * Cfg::kStageBytes;
#pragma unroll
    for (int r = 0; r < kSzRounds; ++r) {
      if (sz_on[r]) {
        if constexpr (EXACT) {
          cp_async16(st + sz_dst[r], l.sz[r], true);
        } else {
          const bool ok = l.c.grp + sz_gi[r] < p.groups &&
                          l.c.slice * kSliceN + sz_col[r] < p.N;
          cp_async16(st + sz_dst[r], ok ? (const void*)l.sz[r] : (const void*)scales, ok);
        }
      }
    }
    // Activations: rows < M (a warp-uniform loop: at M = 1 one pass for two warps, none for the
    // rest), XOR-swizzled by row for ldmatrix (wgmma: for its descriptor).
    const T* xs = x_row + l.k;
#pragma unroll 1
    for (int m = a_row; m < a_rows_end; m += kAStep, xs += a_src_step) {
      uint8_t* dst = st + a_chunk_offset(m, a_ch);
      if constexpr (EXACT) {
        cp_async16(dst, xs, true);
      } else {
        const bool ok = l.k + 8 * a_ch < p.K;
        cp_async16(dst, ok ? (const void*)xs : (const void*)x, ok);
      }
    }
  };

  // ---- consumer state: per-lane shared-memory offsets, fixed for the whole kernel
  const int b_off = ((wn * kKA * kKW + wk * kKA) * 32 + lane) * 16;          // + 512 i
  // Atom i reads 16-byte chunk ch = 2 (wk kKA + i) + lane / 16 of its row, swizzled to ch ^ (row % 8).
  // The swizzle only touches ch's low 3 bits, which for i = i0 + 4 j are 2 i0 + lane / 16: so the
  // offset of atom i is the offset of atom i % 4 plus 128 bytes per j, an immediate.  Four
  // registers instead of kKA, and no swizzle arithmetic in the loop (ptxas otherwise
  // rematerialises each offset, ~4 instructions per ldmatrix).
  constexpr int kChunkBytes = 16, kChunksPerAtom = 2, kSwizzleChunks = 8;  // ldmatrix rows; the XOR's period
  constexpr int kASwizzled = kSwizzleChunks / kChunksPerAtom;  // atoms per swizzle period
  constexpr int kASwizzleBytes = kSwizzleChunks * kChunkBytes;  // how far apart their repeats lie
  static_assert(kWg || kKA % kASwizzled == 0, "atoms come in whole swizzle periods");
  // Narrow: one ldmatrix.x4 per atom pair (2 i, 2 i + 1): rows 0..7 (the tokens), lane l giving
  // row l % 8 of chunk l / 8 of the pair -- so 2 offsets per period.
  constexpr int kAOffsets = NARROW ? kASwizzled / 2 : kASwizzled;
  int a_off[kAOffsets];
#pragma unroll
  for (int i = 0; i < kAOffsets; ++i) {
    const int row = NARROW ? lane & 7 : lane & 15;
    const int ch = NARROW ? 2 * (wk * kKA + 2 * i) + (lane >> 3) : 2 * (wk * kKA + i) + (lane >> 4);
    a_off[i] = Cfg::kOffA + row * Cfg::kARowBytes + ((ch ^ (row & 7)) * 16);  // + mb * 16 rows
  }
  int slot_of[kKA];  // group slot (within the k-tile) of atom i
#pragma unroll
  for (int i = 0; i < kKA; ++i) slot_of[i] = p.gshift == 31 ? 0 : (wk * kKA + i) >> p.gshift;
  const int s_off = Cfg::kOffS + (wn * 64 + 8 * g) * 2;
  const int z_off = Cfg::kOffZ + (wn * 8 + g) * 4;
  // wgmma: warpgroup wg = warp / 4 takes n-atom wg of the slice through the whole stage, and its
  // warp wq = warp % 4 the word wq of each lane's fragment -- the A fragment of the atom's columns
  // 16 wq .. 16 wq + 15 (as NARROW's word j), the warp's 16 rows of the wgmma's 64; its scales are
  // the 4 bytes at 4 wq of the lane's 16, its zeros the nibbles wq and wq + 4 of the lane's word.
  static_assert(!kWg || kStWarps == 4 * kNA, "wgmma: one warpgroup per n-atom");
  [[maybe_unused]] const int wq = warp & 3, wg = warp >> 2;
  [[maybe_unused]] const int wb_off = (wg * kAtomsPerStage * 32 + lane) * 16 + 4 * wq;  // + 512 per atom
  [[maybe_unused]] const int ws_off = Cfg::kOffS + (wg * 64 + 8 * g) * 2 + 4 * wq;
  [[maybe_unused]] const int wz_off = Cfg::kOffZ + (wg * 8 + g) * 4;
  [[maybe_unused]] const bool group_starts[4] = {p.gshift <= 1, p.gshift <= 2, p.gshift <= 3, p.gshift <= 4};

  float acc[MB][kAccTiles][4];
  zero_accumulators(acc);
  // SUMS: the group's unscaled sums, and where the lane's fold scales sit (see GroupSums).
  [[maybe_unused]] GroupSums<T, MB, kAccTiles> sums;  // never touched (so no registers) unless SUMS
  if constexpr (SUMS) sums.clear();
  [[maybe_unused]] const int sq_off = Cfg::kOffS + (wn * 64 + 16 * q) * 2;

  // Prologue: kAhead stages in flight, one commit group each (possibly empty).  Their int4
  // weights first: the previous kernel in the stream does not write them, so under programmatic
  // dependent launch they stream in while it finishes; scales, zeros and activations (and every
  // write: counters, workspace, output) only after grid_dependency_wait.  Group 0 holds every
  // prologue stage's weights, group s stage s's other inputs: stage s is complete once groups
  // <= s are, as in the loop.
  // Without PDL the stages go in one by one (stage 0 complete as early as possible: group 0 is
  // stage 0 alone).  A uniform branch, outside the loop.
  constexpr int kAhead = Cfg::kLoadAhead;
  if (p.pdl) {
    Loader pro[kAhead];
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      pro[s] = ld;
      if (s < n_units) {
        load_weights(s, ld);
        loader_next(ld);
      }
    }
    grid_dependency_wait();
    allow_dependent_launch();  // our CTAs are resident: the next kernel may start its own prologue
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      if (s < n_units) load_inputs(s, pro[s]);
      cp_async_commit();
    }
  } else {
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      if (s < n_units) {
        load_weights(s, ld);
        load_inputs(s, ld);
        loader_next(ld);
      }
      cp_async_commit();
    }
  }

  int c_slice = slice0, c_kt = kt0;  // consumer position

  // Flush the accumulators of slice c_slice: add the kKW k-warps in order through `red`, then
  // write the slice (write_slice, out of line: it runs once per slice, not per stage).  Only the
  // rows < M go through `red` (write_slice reads no other): at M = 1 that is 4 lanes of a warp
  // in 16 of its 32 accesses per round, about 16 shared-memory wavefronts instead of 256 (lanes
  // g = 0..7 of one column are kSliceN floats apart: 8-way bank conflicts) -- per slice, a cost
  // on the scale of a whole stage for the small shapes where each CTA streams only a few stages.
  const int rows_out = min(p.M, Cfg::kRows);
  // Where this lane's accumulator (mb, t, e) sits in the slice: {row (token), column}.  mma C/D:
  // (row g + 8 (e >> 1), column 2 q + (e & 1)) of tile t of m16 tile mb; narrow, rows are columns;
  // wgmma D: row g + 8 (e >> 1) of the warp's 16 columns, column (token) 2 q + (e & 1) of n8 tile
  // 2 mb + t.
  struct Place {
    int row, col;
  };
  const auto place = [&](int mb, int t, int e) -> Place {
    if constexpr (kWg) return {8 * (kAccTiles * mb + t) + 2 * q + (e & 1), wg * 64 + 16 * wq + g + 8 * (e >> 1)};
    else if constexpr (NARROW) return {2 * q + (e & 1), wn * 64 + 16 * t + g + 8 * (e >> 1)};
    else return {16 * mb + g + 8 * (e >> 1), wn * 64 + 8 * t + 2 * q + (e & 1)};
  };
  auto flush = [&](const uint8_t* consumed) {
    float* red = reinterpret_cast<float*>(const_cast<uint8_t*>(consumed));  // see StreamCfg::kRedBytes
    __syncthreads();  // every warp is done reading the slot `red` overwrites
#pragma unroll 1
    for (int w = 0; w < kKW; ++w) {
      if (wk == w) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int t = 0; t < kAccTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const auto [row, col] = place(mb, t, e);
              if (row < rows_out) {
                float& r = red[row * kSliceN + col];
                r = (w == 0 ? 0.f : r) + acc[mb][t][e];
              }
              acc[mb][t][e] = 0.f;
            }
      }
      __syncthreads();
    }
    write_slice<T, kSliceN>(red, out, residual, ws, counters, p.N, p.KT, p.per, p.max_parts, c_slice, rows_out);
    __syncthreads();  // `red` (a ring slot) is refilled from the next iteration on
  };
  // wgmma: each output has one owner, a register of one thread, so the slice's sums go from the
  // registers to the output, or into this CTA's workspace slot of a split slice for sum_parts: no
  // `red` (at 128 tokens it would be 64 KB, more than a stage), and no barrier but the arrival's.
  // Wide: the same once flush_pair has added k-warp 1's sums into k-warp 0's registers (`owner`:
  // the warps whose registers hold the sums).  Every accumulator is zero before sum_parts, an
  // out-of-line call no register must live across.
  auto flush_owned = [&](bool owner) {
    const SliceParts sp = slice_parts(c_slice, p.KT, p.per);
    const int n0 = c_slice * kSliceN;
    float* const slot = sp.parts == 1 ? nullptr
                                      : ws + ((size_t)c_slice * p.max_parts + blockIdx.x - sp.first) * rows_out * kSliceN;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int t = 0; t < kAccTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const auto [row, col] = place(mb, t, e);
          if (owner && row < rows_out) {
            if (slot != nullptr) slot[row * kSliceN + col] = acc[mb][t][e];
            else if (n0 + col < p.N) store_out(out, residual, (size_t)row * p.N + n0 + col, acc[mb][t][e]);
          }
          acc[mb][t][e] = 0.f;
        }
    if (slot != nullptr) sum_parts<T, kSliceN>(out, residual, ws, counters, p.N, p.max_parts, c_slice, rows_out, sp.parts);
  };
  // Wide at four m-tiles (two k-warps per n-atom; a slice's sums, 64 KB, more than `red` holds): k-warp
  // 1's sums go through `red` -- kRedRows rows a round, what the consumed slot holds -- into k-warp
  // 0's registers (the two added as flush adds them), whose warps then own the slice's outputs.  No
  // out-of-line call while sums are live in registers (write_slice's would keep every later round's
  // accumulators across it: spills).  At two m-tiles the slice's sums fit `red`: flush, as the others.
  auto flush_pair = [&](const uint8_t* consumed) {
    float* red = reinterpret_cast<float*>(const_cast<uint8_t*>(consumed));  // see StreamCfg::kRedBytes
    constexpr int kRound = kWg ? Cfg::kRows : Cfg::kRedRows;  // (never 0: the wgmma kernels take flush_owned)
    static_for<0, Cfg::kRows / kRound>([&](auto rc) {
      constexpr int r0 = decltype(rc)::value * kRound;
      if constexpr (r0 > 0) {
        if (r0 >= rows_out) return;  // (uniform; the first round always has rows)
      }
      // f(accumulator, its place in `red`) for each of the round's outputs this lane holds
      const auto each_output = [&](auto&& f) {
#pragma unroll
        for (int mb = r0 / 16; mb < (r0 + kRound) / 16; ++mb)
#pragma unroll
          for (int t = 0; t < kAccTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const auto [row, col] = place(mb, t, e);
              if (row < rows_out) f(acc[mb][t][e], red[(row - r0) * kSliceN + col]);
            }
      };
      __syncthreads();  // the slot's last readers (the stage, or the round before) are done
      if (wk == 1) each_output([](float& a, float& r) { r = a; });
      __syncthreads();
      if (wk == 0) each_output([](float& a, const float& r) { a += r; });
    });
    flush_owned(wk == 0);
  };

  // One stage per iteration.  The ring slot is a counter (no modulo) and every shared-memory
  // access is [slot base + compile-time offset]; the slice-end flush is a branch taken once per
  // slice per CTA.
  int rd = 0, wr = kAhead;  // ring slots being consumed / refilled
#pragma unroll 1
  for (int t = 0; t < n_units; ++t) {
    if constexpr (!kWg) {  // (the wgmma loop reads no ldmatrix offsets)
#pragma unroll
      for (int i = 0; i < kAOffsets; ++i) keep_in_register(a_off[i]);
    }
    cp_async_wait<kAhead - 1>();
    if constexpr (kWg) fence_proxy_async_smem();  // the landed copies, to wgmma's reads
    // stage t landed for everyone; slot `wr` was consumed at t-1 (kWgmmaInFlight: at t-2, whose
    // last wgmma group the first block of t-1 waited for) by everyone
    __syncthreads();
    if (t + kAhead < n_units) {
      load_weights(wr, ld);
      load_inputs(wr, ld);
      loader_next(ld);
    }
    cp_async_commit();
    wr = wr + 1 == kStages ? 0 : wr + 1;

    const uint8_t* st = smem + rd * Cfg::kStageBytes;
    rd = rd + 1 == kStages ? 0 : rd + 1;
    typename DQ::Group gp;
    if constexpr (kWg) {
      // Per 64-k block: the warp's 4 A fragments, then 4 wgmma on them, which run while the next
      // block is dequantized; all waited for before the barrier that lets the loader refill this slot.
      const uint64_t desc0 = wgmma_desc_k_major_sw128(smem_address(st + Cfg::kOffA));
      float(&d)[8 * MB] = reinterpret_cast<float(&)[8 * MB]>(acc);
      static_for<0, kAtomsPerStage / 4>([&](auto bc) {
        constexpr int blk = decltype(bc)::value;
        uint32_t af[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int i = 4 * blk + j;
          // FINE: groups of 2^gshift >= 2 atoms start where i is a multiple of it, so an atom whose
          // lowest set bit is `low` starts one iff 2^gshift <= low (group_starts[log2 low])
          const int low = i & -i;
          if (i == 0 || (FINE && low >= 2 && group_starts[low >= 16 ? 3 : low >= 8 ? 2 : low >= 4 ? 1 : 0])) {
            const int slot = FINE ? i >> p.gshift : 0;
            const uint32_t s2 = *reinterpret_cast<const uint32_t*>(st + ws_off + slot * kSliceN * 2);
            const uint32_t zw = *reinterpret_cast<const uint32_t*>(st + wz_off + slot * (kSliceN / 8) * 4);
            DQ::load_group_word(gp, zw >> (4 * wq), s2);
          }
          uint32_t b[4];
          DQ::word(b, *reinterpret_cast<const uint32_t*>(st + wb_off + i * 512), gp, 0);
          af[j][0] = b[0];  // {0, 2, 1, 3}: the A fragment (NARROW)
          af[j][1] = b[2];
          af[j][2] = b[1];
          af[j][3] = b[3];
        }
#pragma unroll
        for (int e = 0; e < 8 * MB; ++e) fence_operand(d[e]);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j)
          Wgmma<T, 16 * MB>::run(d, af[j], desc0 + ((blk * Cfg::kABlockBytes + 32 * j) >> 4));
        wgmma_commit();
        if constexpr (Cfg::kWgmmaInFlight > 0) {
          // only this block's group left in flight: the one before (block 0: the last stage's last)
          // is done before the next block's dequantization rewrites its A registers (two blocks a
          // stage: the loop reuses them every other block)
          wgmma_wait<Cfg::kWgmmaInFlight>();
#pragma unroll
          for (int e = 0; e < 8 * MB; ++e) fence_operand(d[e]);
        }
      });
      if constexpr (Cfg::kWgmmaInFlight == 0) {
        wgmma_wait<0>();
#pragma unroll
        for (int e = 0; e < 8 * MB; ++e) fence_operand(d[e]);
      }
    }
    [[maybe_unused]] uint32_t xb[4];  // narrow: the B fragments (tokens) of atoms i, i + 1 (i even)
#pragma unroll
    for (int i = 0; i < (kWg ? 0 : kKA); ++i) {
      // group_size >= 32: a group change can only come at an even atom
      if (i == 0 || (FINE && i % 2 == 0 && slot_of[i] != slot_of[i - 1])) {
        const uint4 s8 = *reinterpret_cast<const uint4*>(st + s_off + slot_of[i] * kSliceN * 2);
        const uint32_t zw = *reinterpret_cast<const uint32_t*>(st + z_off + slot_of[i] * (kSliceN / 8) * 4);
        DQ::load_group(gp, zw, s8);
      }
      const uint4 wv = *reinterpret_cast<const uint4*>(st + b_off + i * 512);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
      if constexpr (NARROW) {
        if (i % 2 == 0) ldmatrix_x4(xb, st + a_off[(i / 2) % kAOffsets] + (i / kASwizzled) * kASwizzleBytes);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b[4];
          DQ::template word<!SUMS>(b, words[j], gp, j);
          const uint32_t w16[4] = {b[0], b[2], b[1], b[3]};  // the A fragment of columns 16 j ..
          Mma<T>::run((SUMS ? sums.part[0] : acc[0])[j], w16, xb[2 * (i % 2)], xb[2 * (i % 2) + 1]);
        }
      } else {
        uint32_t a[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
          ldmatrix_x4(a[mb], st + a_off[i % kASwizzled] + (i / kASwizzled) * kASwizzleBytes + mb * 16 * Cfg::kARowBytes);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b[4];
          DQ::template word<!SUMS>(b, words[j], gp, j);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            float(&d)[kAccTiles][4] = SUMS ? sums.part[mb] : acc[mb];
            Mma<T>::run(d[2 * j], a[mb], b[0], b[1]);
            Mma<T>::run(d[2 * j + 1], a[mb], b[2], b[3]);
          }
        }
      }
    }
    if constexpr (SUMS) {  // one group per k-slice
      if constexpr (NARROW) sums.fold_narrow(acc, gp.sc);
      else sums.fold(acc, st + sq_off + slot_of[kKA - 1] * kSliceN * 2);
    }
    if (c_kt == p.KT - 1 || t == n_units - 1) {
      if constexpr (Cfg::kWgmmaInFlight > 0) {  // the stage's last group too
        float(&d)[8 * MB] = reinterpret_cast<float(&)[8 * MB]>(acc);
        wgmma_wait<0>();
#pragma unroll
        for (int e = 0; e < 8 * MB; ++e) fence_operand(d[e]);
      }
      if constexpr (kWg) flush_owned(true);
      else if constexpr (Cfg::kRedRows < Cfg::kRows) flush_pair(st);  // (wide, four m-tiles)
      else flush(st);
    }
    if (++c_kt == p.KT) {
      c_kt = 0;
      ++c_slice;
    }
  }
  // (the last stage flushed, so nothing is in flight; said for ptxas, which otherwise makes every
  // iteration wait for all wgmma before the loop's back edge, in case one reached the exit)
  if constexpr (Cfg::kWgmmaInFlight > 0) wgmma_wait<0>();
  cp_async_wait<0>();
}

// Dequantize the stream layout to a dense W^T [K, N] with the streaming kernel's own arithmetic
// (so awq_dequantize on a stream-layout weight checks it bit for bit against the reference).
// One thread per (atom, lane): its 4 words are 32 weights, 8 per word at rows (2q, 2q+1, 2q+8,
// 2q+9) x columns (16 j + g, 16 j + 8 + g).  Used by awq_dequantize and the large-M path.
constexpr int kDequantStreamThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDequantStreamThreads)
awq_dequant_stream_kernel(const uint4* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                          const T* __restrict__ scales, T* __restrict__ out, int K, int N, int group_size) {
  using DQ = StreamDequant<T>;
  const int KT16 = K / 16;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // (nt, kt, lane)
  if (idx >= (size_t)(N / 64) * KT16 * 32) return;
  const int lane = static_cast<int>(idx % 32);
  const size_t atom = idx / 32;
  const int kt = static_cast<int>(atom % KT16), nt = static_cast<int>(atom / KT16);
  const int g = lane >> 2, q = lane & 3;
  const int grp = kt * 16 / group_size;
  const uint4 wv = __ldg(qweight + idx);
  const uint32_t zw = __ldg(qzeros + (size_t)grp * (N / 8) + nt * 8 + g);
  const uint4 s8 = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + nt * 64 + 8 * g));
  typename DQ::Group gp;
  DQ::load_group(gp, zw, s8);
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  using T2 = typename Traits<T>::T2;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t b[4];
    DQ::word(b, words[j], gp, j);  // scaled: the reference's (q - z) s rounded to T
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // b[h]: column c0 (h < 2) or c1, rows 2q (+8 if h odd), +1
      const T2 v = as_t2<T2>(b[h]);
      const int col = nt * 64 + 16 * j + 8 * (h >> 1) + g;
      const int row = kt * 16 + 2 * q + 8 * (h & 1);
      out[(size_t)row * N + col] = v.x;
      out[(size_t)(row + 1) * N + col] = v.y;
    }
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Where group sums pay (GroupSums): one fold per stage, MB * 32 FFMA against the 16 kKA HMUL2
// it saves (large: MB <= 2; compact: MB = 1), and never with FINE groups.
constexpr bool group_sums_pay(int MB, int KA, bool fine) { return 32 * MB < 16 * KA && !fine; }

// The template flags of the instantiation that runs a launch (awq_stream_kernel's EXACT, FINE,
// SUMS and NARROW; describe_mb finds them).
struct StreamFlags {
  bool exact, fine, sums, narrow;
};

// The instantiation with flags `f` (group sums only where group_sums_pay, narrow only at MB = 1 and
// never on wgmma: flags_for sets them so).
template <typename T, int MB, int CONFIG, bool NARROW>
auto stream_kernel_variant(const StreamFlags& f) {
  constexpr int kKA = StreamCfg<MB, CONFIG>::kKA;
  if constexpr (CONFIG != kConfigWgmma && group_sums_pay(MB, kKA, false)) {
    if (f.sums)
      return f.exact ? awq_stream_kernel<T, MB, true, false, true, CONFIG, NARROW>
                     : awq_stream_kernel<T, MB, false, false, true, CONFIG, NARROW>;
  }
  return f.exact ? (f.fine ? awq_stream_kernel<T, MB, true, true, false, CONFIG, NARROW>
                           : awq_stream_kernel<T, MB, true, false, false, CONFIG, NARROW>)
                 : (f.fine ? awq_stream_kernel<T, MB, false, true, false, CONFIG, NARROW>
                           : awq_stream_kernel<T, MB, false, false, false, CONFIG, NARROW>);
}

template <typename T, int MB, int CONFIG>
auto stream_kernel_for(const StreamFlags& f) {
  if constexpr (MB == 1 && CONFIG != kConfigWgmma) {
    if (f.narrow) return stream_kernel_variant<T, MB, CONFIG, true>(f);
  }
  return stream_kernel_variant<T, MB, CONFIG, false>(f);
}

// m16 tiles for M rows in one launch: 1, 2, 4, or 8 (65-128 rows: the wgmma configuration only).
int m_tiles(int M) { return M <= 16 ? 1 : M <= 32 ? 2 : M <= 64 ? 4 : 8; }

// The most rows `config` takes in one launch.
int config_max_m(StreamConfig config) {
  return config == kConfigCompact ? kStreamCompactMaxM
         : config == kConfigDeep  ? kStreamDeepMaxM
         : config == kConfigWgmma ? kStreamWgmmaMaxM
                                  : kStreamMaxM;
}

// Whether `config` has an instantiation for M rows (one launch): up to its row limit, for the
// deep one not at two m-tiles, for the wide one only at two and four (kStreamWideMinM and up).
// The wgmma one only in a build with sm_90a code (stream_wgmma_built).
bool config_takes(int M, StreamConfig config) {
  return M >= 1 && M <= config_max_m(config) && !(config == kConfigDeep && m_tiles(M) == 2) &&
         !(config == kConfigWide && M < kStreamWideMinM) && (config != kConfigWgmma || stream_wgmma_built());
}

// The m-tiles of `config`'s instantiation for M rows; a host error (std::invalid_argument) where it
// has none, rather than another configuration's kernel run past its rows.
int mb_for(int M, StreamConfig config) {
  if (!config_takes(M, config))
    throw std::invalid_argument("awq stream kernel: configuration " + std::to_string(int(config)) +
                                " has no instantiation for " + std::to_string(M) + " rows");
  return m_tiles(M);
}
int stage_k_for(int M, StreamConfig config) { return 16 * ka_for(mb_for(M, config), config) * kw_for(config); }

// f(MB, CONFIG) -- as std::integral_constants -- for the instantiation that serves `mb` m-tiles
// in `config` (mb_for's), the one place that maps the two to template arguments.
template <typename F>
auto with_instantiation(StreamConfig config, int mb, F&& f) {
  using std::integral_constant;
  if (config == kConfigDeep)
    return mb == 1 ? f(integral_constant<int, 1>{}, integral_constant<int, kConfigDeep>{})
                   : f(integral_constant<int, 4>{}, integral_constant<int, kConfigDeep>{});
  if (config == kConfigWgmma)
    return mb == 1   ? f(integral_constant<int, 1>{}, integral_constant<int, kConfigWgmma>{})
           : mb == 2 ? f(integral_constant<int, 2>{}, integral_constant<int, kConfigWgmma>{})
           : mb == 4 ? f(integral_constant<int, 4>{}, integral_constant<int, kConfigWgmma>{})
                     : f(integral_constant<int, 8>{}, integral_constant<int, kConfigWgmma>{});
  if (config == kConfigCompact)
    return mb == 1 ? f(integral_constant<int, 1>{}, integral_constant<int, kConfigCompact>{})
                   : f(integral_constant<int, 2>{}, integral_constant<int, kConfigCompact>{});
  if (config == kConfigWide)
    return mb == 2 ? f(integral_constant<int, 2>{}, integral_constant<int, kConfigWide>{})
                   : f(integral_constant<int, 4>{}, integral_constant<int, kConfigWide>{});
  return mb == 1   ? f(integral_constant<int, 1>{}, integral_constant<int, kConfigLarge>{})
         : mb == 2 ? f(integral_constant<int, 2>{}, integral_constant<int, kConfigLarge>{})
                   : f(integral_constant<int, 4>{}, integral_constant<int, kConfigLarge>{});
}

int log2_exact(int v) {
  int r = 0;
  while ((1 << r) < v) ++r;
  return (1 << r) == v ? r : -1;
}

StreamParams params_for(int M, int N, int K, int group_size, int per, int grid, StreamConfig config) {
  const int kStageK = stage_k_for(M, config);
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
  const int slices = ceil_div(N, slice_n_for(config));
  p.units = slices * p.KT;
  p.per = per;
  p.max_parts = std::min(grid, ceil_div(p.KT, p.per) + 1);
  return p;
}

// One launch of the stream kernel, as launch_stream makes it (and the CPU twin runs it): the
// instantiation, its geometry and its parameters.  PDL is what the caller asked for; launch_stream
// drops it where the kernel that runs has no griddepcontrol.wait.
template <typename T>
struct StreamLaunch {
  decltype(&awq_stream_kernel<T, 1, true, false, false, kConfigLarge, false>) kernel;
  int grid, block, smem_bytes;
  StreamParams p;
};

// The flags of the instantiation that runs shape `p`: EXACT where no load needs a bounds predicate,
// FINE where a group ends inside what a warp walks of a stage (its kKA atoms, or with wgmma all of
// them), group sums where asked for and they pay (group_sums_pay; never with wgmma, whose kernels
// scale fragments), NARROW where asked for at MB = 1 and M <= kStreamNarrowMaxM (not with wgmma).
template <int MB, int CONFIG>
StreamFlags flags_for(const StreamParams& p, bool group_sums, bool narrow) {
  using Cfg = StreamCfg<MB, CONFIG>;
  const int warp_atoms = Cfg::kWgmma ? Cfg::kKA * Cfg::kKW : Cfg::kKA;
  StreamFlags f{};
  f.exact = p.K % Cfg::kStageK == 0 && p.N % Cfg::kSliceN == 0;
  f.fine = p.gshift < 31 && (16 << p.gshift) < 16 * warp_atoms;
  f.sums = group_sums && !Cfg::kWgmma && group_sums_pay(MB, Cfg::kKA, f.fine);
  f.narrow = narrow && MB == 1 && !Cfg::kWgmma && p.M <= kStreamNarrowMaxM;
  return f;
}

template <typename T, int MB, int CONFIG>
StreamLaunch<T> describe_mb(const StreamParams& p, int grid, bool group_sums, bool pdl, bool narrow) {
  StreamLaunch<T> d{stream_kernel_for<T, MB, CONFIG>(flags_for<MB, CONFIG>(p, group_sums, narrow)), grid, kStThreads,
                    StreamCfg<MB, CONFIG>::kSmemBytes, p};
  d.p.pdl = pdl;
  return d;
}

template <typename T>
StreamLaunch<T> describe_stream(int M, int N, int K, int group_size, const StreamPlan& plan, bool group_sums,
                                bool pdl, bool narrow) {
  const StreamParams p = params_for(M, N, K, group_size, plan.per, plan.grid, plan.config);
  return with_instantiation(plan.config, mb_for(M, plan.config), [&](auto mb, auto config) {
    return describe_mb<T, decltype(mb)::value, decltype(config)::value>(p, plan.grid, group_sums, pdl, narrow);
  });
}

// Names of StreamConfig as scripts/sass_budget.py prints them (its STREAM_CONFIGS).
const char* config_name(StreamConfig config) {
  return config == kConfigCompact ? "compact"
         : config == kConfigDeep  ? "deep"
         : config == kConfigWgmma ? "wgmma"
         : config == kConfigWide  ? "wide"
                                  : "large";
}

// The dequantize kernel's grid: one thread per (atom, lane).
unsigned dequant_stream_blocks(int K, int N) {
  const size_t threads = (size_t)(N / 64) * (K / 16) * 32;
  return static_cast<unsigned>((threads + kDequantStreamThreads - 1) / kDequantStreamThreads);
}

#ifndef AWQ_HOST_EMULATION  // the CUDA runtime side: launches and device queries
// What launch_stream needs of a kernel on the current device, asked of the runtime once per (kernel,
// device): its opt-in to `smem_bytes` (> 48 KB) of dynamic shared memory -- a host-side attribute,
// fine during graph capture -- and whether it was compiled for sm_90+, so holds griddepcontrol.wait
// (awq_common.cuh grid_dependency_wait; a PTX JIT of an sm_80 build on an H100 has none).  Only a
// successful opt-in is remembered: a failure skips the launch and stays the runtime's last error,
// which the caller's launch check reports.
struct KernelReady {
  bool ok;
  bool has_grid_dependency_wait;
};

KernelReady kernel_ready(const void* kernel, int smem_bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, KernelReady> known;
  int dev = 0;
  cudaGetDevice(&dev);
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, dev);
  auto it = known.find(key);
  if (it == known.end()) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess)
      return {false, false};
    cudaFuncAttributes attr{};
    const bool wait = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
                      attr.binaryVersion >= 90;
    it = known.emplace(key, KernelReady{true, wait}).first;
  }
  return it->second;
}

template <typename T>
void launch_described(const GemmArgs& a, StreamLaunch<T> d, cudaStream_t stream) {
  const KernelReady ready = kernel_ready(reinterpret_cast<const void*>(d.kernel), d.smem_bytes);
  if (!ready.ok) return;
  d.p.pdl = d.p.pdl && ready.has_grid_dependency_wait;  // PDL only where the kernel that runs waits
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(d.grid);
  cfg.blockDim = dim3(d.block);
  cfg.dynamicSmemBytes = d.smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;  // see grid_dependency_wait
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = d.p.pdl ? 1 : 0;
  // A failure stays the runtime's last error, which the caller's launch check reports.
  (void)cudaLaunchKernelEx(&cfg, d.kernel, static_cast<const T*>(a.x), reinterpret_cast<const uint4*>(a.qweight),
                           reinterpret_cast<const uint32_t*>(a.qzeros), static_cast<const T*>(a.scales),
                           static_cast<T*>(a.out), static_cast<const T*>(a.residual), a.workspace, a.counters,
                           d.p);
}

// Static shared memory of a configuration (the reduction's last-arriver flag): what the compiler
// reserved, asked of the runtime rather than restated; the same for every T/EXACT/FINE/SUMS.
template <int MB, int CONFIG>
int stream_static_smem_bytes() {
  static const int bytes = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, awq_stream_kernel<__half, MB, true, false, false, CONFIG, false>) == cudaSuccess
               ? static_cast<int>(attr.sharedSizeBytes)
               : 0;
  }();
  return bytes;
}

#endif  // AWQ_HOST_EMULATION

}  // namespace

int stream_smem_bytes(int M, StreamConfig config) {
  if (!config_takes(M, config)) return -1;
  return with_instantiation(config, mb_for(M, config), [](auto mb, auto cfg) {
    constexpr int MB = decltype(mb)::value, CONFIG = decltype(cfg)::value;
#ifdef AWQ_HOST_EMULATION  // no compiled kernel to ask: the static part's bound (the static_asserts')
    return StreamCfg<MB, CONFIG>::kSmemBytes + kStaticSmemAllowance;
#else
    return StreamCfg<MB, CONFIG>::kSmemBytes + stream_static_smem_bytes<MB, CONFIG>();
#endif
  });
}

bool stream_wgmma_built() {
#if defined(AWQ_HOST_EMULATION) || defined(AWQ_WGMMA_BUILT)
  return true;
#else
  return false;
#endif
}

bool stream_supports(int M, int N, int K, int group_size, StreamConfig config) {
  if (!config_takes(M, config) || N % 64 || K % 16 || group_size % 32 || K % group_size)
    return false;
  const int kStageK = stage_k_for(M, config);
  if (group_size < kStageK) return kStageK % group_size == 0 && log2_exact(group_size / 16) >= 0;
  return group_size % kStageK == 0 || group_size == K;
}

namespace {

// The rows of the first launch of M rows, in passes of the most rows `config` takes, that it cannot
// run on this device (the full pass, else the last one), or 0 when it runs them all.
int64_t failing_pass(int64_t M, int N, int K, int group_size, StreamConfig config, int smem_limit) {
  const int pass = config_max_m(config);
  const auto runs = [&](int64_t rows) {
    if (!stream_supports(static_cast<int>(rows), N, K, group_size, config)) return false;
    const int bytes = stream_smem_bytes(static_cast<int>(rows), config);
    return bytes > 0 && bytes <= smem_limit;
  };
  const int64_t full = std::min<int64_t>(M, pass), rest = M % pass;
  return !runs(full) ? full : M > full && rest && !runs(rest) ? rest : 0;
}

// Why `config` cannot run M rows in its passes, one clause of a refusal.
std::string why_not(int64_t M, int N, int K, int group_size, StreamConfig config, int smem_limit) {
  const int64_t bad = failing_pass(M, N, K, group_size, config, smem_limit);
  const std::string what = std::string("the ") + config_name(config) + " configuration runs passes of at most " +
                           std::to_string(config_max_m(config)) + " rows; its pass of " + std::to_string(bad) +
                           " rows ";
  const int rows = static_cast<int>(bad);
  if (config == kConfigWide && rows < kStreamWideMinM)
    return what + "is too few for it (it runs passes of " + std::to_string(kStreamWideMinM) + " rows and more)";
  if (!stream_supports(rows, N, K, group_size, config)) {
    const std::string k_tile = config_takes(rows, config) ? std::to_string(stage_k_for(rows, config)) : "?";
    return what + "does not take N = " + std::to_string(N) + ", K = " + std::to_string(K) + ", group_size " +
           std::to_string(group_size) + " (it needs N % 64 == 0, K % 16 == 0, and group_size 32, 64, 128 or 256 " +
           "dividing its k-tile of " + k_tile + " rows, a multiple of that k-tile, or K)";
  }
  return what + "needs " + std::to_string(stream_smem_bytes(rows, config)) +
         " bytes of shared memory per block (the device has " + std::to_string(smem_limit) + ")";
}

}  // namespace

StreamChoice choose_stream(int64_t M, int N, int K, int group_size, const StreamRequest& r) {
  const auto fails = [&](StreamConfig config) { return failing_pass(M, N, K, group_size, config, r.smem_limit) != 0; };
  StreamChoice c;
  StreamConfig base = r.compact ? kConfigCompact : kConfigLarge;
  c.group_sums = r.group_sums;
  // the wide slices in place of the large ones, where asked for and they run every pass -- also where
  // the large ones do not (an A100 at M 17-32; a group only their k-tile divides)
  const bool wide_runs = r.wide && !r.compact && !fails(kConfigWide);
  if (r.automatic) {
    // One launch, with group sums: at M <= 32, and at 33-64 on weights of kStreamFourTileMinWeights
    // elements and more; the large configuration where it fits (or the wide one in its place),
    // else at M <= 32 the compact one.  Every further pass streams the weights again: measured on
    // an H200 (gpu_sweep 2026-11-30), 2 and 4 passes at best tie dequantize + cuBLAS.
    const bool four_tiles_pay = M <= kStreamCompactMaxM || int64_t(N) * K >= kStreamFourTileMinWeights;
    const bool one_launch = M <= kStreamMaxM && four_tiles_pay;
    const bool large_fails = !one_launch || (fails(kConfigLarge) && !wide_runs);
    if (large_fails && (M > kStreamCompactMaxM || fails(kConfigCompact))) {
      c.kind = StreamChoice::kDequantCublas;
      return c;
    }
    base = large_fails ? kConfigCompact : kConfigLarge;
    c.group_sums = true;
  }
  // wgmma in place of the large configuration for every pass, where asked for and it runs them all
  // -- also a shape only it takes (its 128-row stages at 65-128 rows)
  if (r.wgmma && base == kConfigLarge && !fails(kConfigWgmma)) {
    c.kind = StreamChoice::kStream;
    c.config = kConfigWgmma;
    c.pass = config_max_m(kConfigWgmma);
    return c;
  }
  if (wide_runs && base == kConfigLarge) {
    c.kind = StreamChoice::kStream;
    c.config = kConfigWide;
    c.pass = config_max_m(kConfigWide);
    return c;
  }
  if (fails(base)) {
    c.refusal = "the stream kernel cannot run " + std::to_string(M) + " rows of this weight: " +
                why_not(M, N, K, group_size, base, r.smem_limit);
    if (r.wgmma && base == kConfigLarge)
      c.refusal += "; and " + why_not(M, N, K, group_size, kConfigWgmma, r.smem_limit) + " (AWQLIB_STREAM_WGMMA=1)";
    if (r.wide && base == kConfigLarge)
      c.refusal += "; and " + why_not(M, N, K, group_size, kConfigWide, r.smem_limit) + " (AWQLIB_STREAM_WIDE=1)";
    return c;
  }
  c.kind = StreamChoice::kStream;
  c.pass = config_max_m(base);
  // the deep ring in place of the large one, where asked for: one launch of <= 64 rows, not 17-32
  c.config = r.deep && base == kConfigLarge && M <= kStreamDeepMaxM && !fails(kConfigDeep) ? kConfigDeep : base;
  return c;
}

std::string stream_kernel_name(DType dt, int M, int N, int K, int group_size, StreamConfig config, bool group_sums,
                               bool narrow) {
  const StreamParams p = params_for(M, N, K, group_size, 1, 1, config);
  return with_instantiation(config, mb_for(M, config), [&](auto mb, auto cfg) {
    constexpr int MB = decltype(mb)::value, CONFIG = decltype(cfg)::value;
    const StreamFlags f = flags_for<MB, CONFIG>(p, group_sums, narrow);
    const auto b = [](bool v) { return v ? "true" : "false"; };
    return std::string("awq_stream_kernel<") + (dt == DType::kHalf ? "half" : "bf16") + ", " + std::to_string(MB) +
           ", " + b(f.exact) + ", " + b(f.fine) + ", " + b(f.sums) + ", " + config_name(config) + ", " + b(f.narrow) +
           ">";
  });
}

StreamPlan plan_stream(int M, int N, int K, int group_size, int num_sms, StreamConfig config) {
  const int per_sm = 1;  // StreamCfg::kMinBlocks of every configuration
  static_assert(StreamCfg<1, kConfigLarge>::kMinBlocks == 1 && StreamCfg<2, kConfigLarge>::kMinBlocks == 1 &&
                    StreamCfg<4, kConfigLarge>::kMinBlocks == 1 && StreamCfg<1, kConfigCompact>::kMinBlocks == 1 &&
                    StreamCfg<2, kConfigCompact>::kMinBlocks == 1 && StreamCfg<1, kConfigDeep>::kMinBlocks == 1 &&
                    StreamCfg<4, kConfigDeep>::kMinBlocks == 1 && StreamCfg<1, kConfigWgmma>::kMinBlocks == 1 &&
                    StreamCfg<2, kConfigWgmma>::kMinBlocks == 1 && StreamCfg<4, kConfigWgmma>::kMinBlocks == 1 &&
                    StreamCfg<8, kConfigWgmma>::kMinBlocks == 1 && StreamCfg<2, kConfigWide>::kMinBlocks == 1 &&
                    StreamCfg<4, kConfigWide>::kMinBlocks == 1,
                "plan_stream's persistent grid assumes one CTA per SM");
  const int slices = ceil_div(N, slice_n_for(config));
  const int units = slices * ceil_div(K, stage_k_for(M, config));
  const int grid0 = std::max(1, std::min(units, num_sms * per_sm));
  const int per = ceil_div(units, grid0);
  StreamPlan plan;
  plan.grid = ceil_div(units, per);  // no empty CTAs
  plan.per = per;
  plan.config = config;
  const StreamParams p = params_for(M, N, K, group_size, per, plan.grid, config);
  plan.slices = slices;
  plan.workspace_floats = (size_t)slices * p.max_parts * std::min(M, 16 * mb_for(M, config)) * slice_n_for(config);
  plan.counters = slices;
  return plan;
}

#ifndef AWQ_HOST_EMULATION
void launch_dequant_stream(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                           int K, int N, int group_size, cudaStream_t stream) {
  const unsigned blocks = dequant_stream_blocks(K, N);
  const auto* qw = reinterpret_cast<const uint4*>(qweight);
  const auto* qz = reinterpret_cast<const uint32_t*>(qzeros);
  if (dt == DType::kHalf)
    awq_dequant_stream_kernel<__half><<<blocks, kDequantStreamThreads, 0, stream>>>(
        qw, qz, static_cast<const __half*>(scales), static_cast<__half*>(out), K, N, group_size);
  else
    awq_dequant_stream_kernel<__nv_bfloat16><<<blocks, kDequantStreamThreads, 0, stream>>>(
        qw, qz, static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out), K, N, group_size);
}

void launch_stream(DType dt, const GemmArgs& a, const StreamPlan& plan, bool group_sums, bool pdl, bool narrow,
                   cudaStream_t stream) {
  if (dt == DType::kHalf)
    launch_described(a, describe_stream<__half>(a.M, a.N, a.K, a.group_size, plan, group_sums, pdl, narrow), stream);
  else
    launch_described(a, describe_stream<__nv_bfloat16>(a.M, a.N, a.K, a.group_size, plan, group_sums, pdl, narrow),
                     stream);
}
#endif  // AWQ_HOST_EMULATION

}  // namespace awq

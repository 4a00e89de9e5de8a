// Shared device helpers for the AWQ int4 kernels (sm_80+).
//
// Layout reminder (awqlib/packing.py): qweight int32 [K, N/8], qzeros int32 [K/g, N/8],
// scales [K/g, N].  Nibble i of an int32 holds output column 8j + AWQ_ORDER[i] with
// AWQ_ORDER = {0,2,4,6,1,3,5,7}.  So nibbles (p, p+4) hold the adjacent columns (2p, 2p+1):
// one lop3 with mask 0x000f000f on (word >> 4p) drops both into the two 16-bit halves of a
// register, and OR-ing the exponent pattern of 1024.0 (fp16 0x6400) or 128.0 (bf16 0x4300)
// makes each half equal to magic + code, exactly.  Subtracting (magic + zero) is exact too
// (small integers), and the single multiply by the scale rounds once -- the same rounding as
// the PyTorch reference ((q - z).to(dtype) * s), so dequantized weights are bit-identical.
//
// Every PTX wrapper below has its CPU twin beside it (#ifdef AWQ_HOST_EMULATION; a no-op where
// nothing is to be modelled): a host compiler then builds the kernels unchanged and
// csrc/cpu_twin.h runs them, thread by thread (tests/test_cpu_twin.py).
#pragma once

#ifdef AWQ_HOST_EMULATION
#include "cpu_twin.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

// A device function kept out of line.  Spelled as a macro because the CPU twin cannot define
// __noinline__ itself: libstdc++ uses that identifier inside __attribute__(()).
#ifdef AWQ_HOST_EMULATION
#define AWQ_NOINLINE __attribute__((noinline))
#else
#define AWQ_NOINLINE __noinline__
#endif

namespace awq {

// ---------------------------------------------------------------- element-type traits
template <typename T> struct Traits;

template <> struct Traits<__half> {
  using T2 = __half2;
  // Two fp16 1024.0 values: 1024 + n (n < 16) is exact since fp16 has 10 mantissa bits.
  static constexpr uint32_t kMagic = 0x64006400u;
  __device__ __forceinline__ static float2 to_float2(T2 v) { return __half22float2(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
};

template <> struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // Two bf16 128.0 values: 128 + n (n < 16) is exact since bf16 has 7 mantissa bits.
  static constexpr uint32_t kMagic = 0x43004300u;
  __device__ __forceinline__ static float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}
template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// (a & b) | c in one instruction: immLut 0xEA == (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef AWQ_HOST_EMULATION
  return (a & b) | c;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#endif
}

// Pair p (0..3) of a packed word as (magic + code[col 2p], magic + code[col 2p+1]).
template <typename T>
__device__ __forceinline__ typename Traits<T>::T2 biased_pair(uint32_t word, int p) {
  return as_t2<typename Traits<T>::T2>(lop3_and_or(word >> (4 * p), 0x000f000fu, Traits<T>::kMagic));
}

// Per-group constants for one packed word (8 columns): (magic + zero) and the scale, as 4 pairs
// in natural column order (pair p = columns 2p, 2p+1).
template <typename T>
struct GroupParams {
  typename Traits<T>::T2 zero[4];
  typename Traits<T>::T2 scale[4];
  __device__ __forceinline__ void load(uint32_t zword, uint4 scales8) {
#pragma unroll
    for (int p = 0; p < 4; ++p) zero[p] = biased_pair<T>(zword, p);
    scale[0] = as_t2<typename Traits<T>::T2>(scales8.x);
    scale[1] = as_t2<typename Traits<T>::T2>(scales8.y);
    scale[2] = as_t2<typename Traits<T>::T2>(scales8.z);
    scale[3] = as_t2<typename Traits<T>::T2>(scales8.w);
  }
  // Dequantize pair p of `word`: ((magic+q) - (magic+z)) * s -- exact subtract, one rounding.
  __device__ __forceinline__ typename Traits<T>::T2 dequant(uint32_t word, int p) const {
    return __hmul2(__hsub2(biased_pair<T>(word, p), zero[p]), scale[p]);
  }
};

// ---------------------------------------------------------------- cp.async (sm_80)
// 16-byte global->shared copy that bypasses L1 (.cg: weights are streamed once).  When
// `valid` is false the source size is 0, so the 16 destination bytes are zero-filled and
// nothing is read (the address must still be a legal pointer; callers pass the tensor base).
// The "memory" clobbers keep the compiler from moving shared-memory reads across the copies and
// waits (kernels that read their own lane's copies need no barrier, only this ordering).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef AWQ_HOST_EMULATION
  awq_twin::cp_async16(smem, gmem, valid);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size) : "memory");
#endif
}

// The same copy, always valid, from gmem + OFFSET bytes: the offset stays an immediate of the
// instruction instead of a 64-bit add per copy.  No L2 cache hint (an evict-first policy would
// suit weights read once): with an immediate offset, ptxas 13.0 encodes the hinted form with a
// cache-policy descriptor in uniform registers it never writes, and an H200 faults on it
// ("illegal instruction"); scripts/sass_budget.py refuses such a descriptor.
template <int OFFSET>
__device__ __forceinline__ void cp_async16_stream(void* smem, const void* gmem) {
#ifdef AWQ_HOST_EMULATION
  awq_twin::cp_async16(smem, static_cast<const uint8_t*>(gmem) + OFFSET, true);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1+%2], 16;\n" ::"r"(s), "l"(gmem), "n"(OFFSET) : "memory");
#endif
}

// Programmatic dependent launch (sm_90+; no-ops below, and when the kernel was launched without
// the attribute).  grid_dependency_wait: wait until the previous kernel in the stream has
// completed and its writes are visible -- nothing it writes may be read (or written) before.
// allow_dependent_launch: the next kernel (if launched with the attribute) may start now.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(AWQ_HOST_EMULATION)
  awq_twin::grid_dependency_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(AWQ_HOST_EMULATION)
  // the twin runs one launch at a time: no kernel depends on this one
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// An empty asm that "changes" v: from here on v must live in a register, because ptxas can no
// longer recompute it.  Inside a loop, it keeps per-thread offsets derived from threadIdx out of
// the loop body (ptxas otherwise rematerialises them from SR_TID every iteration to save
// registers the kernel does not need saved: scripts/sass_budget.py shows the cost).
#ifdef AWQ_HOST_EMULATION
__device__ __forceinline__ void keep_in_register(int&) {}
__device__ __forceinline__ void cp_async_commit() { awq_twin::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { awq_twin::cp_async_wait(N); }
#else
__device__ __forceinline__ void keep_in_register(int& v) { asm volatile("" : "+r"(v)); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

// The kernel's dynamic shared memory (what the launch's dynamicSmemBytes sized).
__device__ __forceinline__ uint8_t* dynamic_smem() {
#ifdef AWQ_HOST_EMULATION
  return awq_twin::cta().smem;
#else
  extern __shared__ __align__(16) uint8_t awq_dynamic_smem[];
  return awq_dynamic_smem;
#endif
}

// ---------------------------------------------------------------- tensor-core helpers
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; every lane receives
// one 32-bit register (two adjacent 16-bit elements) of each of the four matrices.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef AWQ_HOST_EMULATION
  awq_twin::ldmatrix_x4(r, smem_row);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

template <typename T> struct Mma;

template <> struct Mma<__half> {
  // D[16x8] += A[16x16] (row) * B[16x8] (col), fp16 inputs, fp32 accumulators.
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AWQ_HOST_EMULATION
    awq_twin::mma_m16n8k16<__half>(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AWQ_HOST_EMULATION
    awq_twin::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// ---------------------------------------------------------------- warpgroup mma (sm_90a)
// wgmma.mma_async: the four warps of a warpgroup (warps 4w..4w+3) multiply a 64 x 16 A -- 16 rows
// per warp, in registers, in mma.m16n8k16's A fragment layout -- by a 16 x N B that the tensor
// cores read from shared memory through a descriptor, into fp32 accumulators that stay in the
// warps' registers: warp w's lane 4 g + q holds d[4 t + e] = (row 16 w + g + 8 (e >> 1), column
// 8 t + 2 q + (e & 1)).  It is asynchronous: the warps go on (dequantizing the next A) while it
// runs, and only wgmma_wait makes its results (and the end of its shared-memory reads) certain.
// Needs the arch-specific target sm_90a; AWQ_WGMMA_ARCH marks the device pass that has it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AWQ_WGMMA_ARCH 1
#endif

// The shared-window address of a shared-memory pointer (what descriptors and cp.async take).
__device__ __forceinline__ uint32_t smem_address(const void* p) {
#ifdef AWQ_HOST_EMULATION
  return awq_twin::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The 128-byte swizzle: in each 1024-byte block of 8 rows x 128 bytes, 16-byte chunk c of row r
// sits at chunk c ^ r, so that the 8 rows of a chunk column lie in 8 different bank groups.  The
// hardware applies it to address bits (chunk bits 4-6 ^= row bits 7-9), so such a block must start
// on a 1024-byte boundary of the shared window.
constexpr int kSwizzleRowBytes = 128;
constexpr int kSwizzleRows = 8;
constexpr int kSwizzleBlockBytes = kSwizzleRowBytes * kSwizzleRows;  // 1024

// The descriptor of a K-major operand (each of its N rows holds 64 k of one token, 128 bytes) in
// 128-byte-swizzled blocks, starting at shared address `saddr`: N rows of 128 bytes, 8-row groups
// kSwizzleBlockBytes apart.  The k16 step s of a 64-k block starts 32 s bytes into the row.
__device__ __forceinline__ uint64_t wgmma_desc_k_major_sw128(uint32_t saddr) {
  constexpr uint64_t kAddressMask = 0x3FFFF;                 // bits 0-13: address / 16
  constexpr uint64_t kLeadingByteOffset = 1;                 // bits 16-29: unused by swizzled K-major layouts
  constexpr uint64_t kStrideByteOffset = kSwizzleBlockBytes >> 4;  // bits 32-45: 8-row groups apart / 16
  constexpr uint64_t kLayoutSwizzle128 = 1;                  // bits 62-63: 128-byte swizzle
  return ((saddr & kAddressMask) >> 4) | (kLeadingByteOffset << 16) | (kStrideByteOffset << 32) |
         (kLayoutSwizzle128 << 62);
}

// wgmma.mma_async m64nNk16 with A from registers (RS), fp32 accumulators, scale-d true (D += A B),
// no negation, B not transposed (K-major).  One asm per N (the operand numbers differ), its element
// type a string literal: AWQ_WGMMA_RS_N<N>("f16" or "bf16").
#define AWQ_F8(d, o)                                                                                             \
  "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), \
      "+f"(d[o + 7])
#define AWQ_WGMMA_IN "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
#define AWQ_WGMMA_HEAD(PRED) "{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\nwgmma.mma_async.sync.aligned."
#define AWQ_WGMMA_RS_N16(TYPE)                                                                   \
  asm volatile(AWQ_WGMMA_HEAD("%13") "m64n16k16.f32." TYPE "." TYPE                             \
               " {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n" \
               : AWQ_F8(d, 0)                                                                    \
               : AWQ_WGMMA_IN)
#define AWQ_WGMMA_RS_N32(TYPE)                                                                   \
  asm volatile(AWQ_WGMMA_HEAD("%21") "m64n32k16.f32." TYPE "." TYPE                             \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "      \
               "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                   \
               : AWQ_F8(d, 0), AWQ_F8(d, 8)                                                      \
               : AWQ_WGMMA_IN)
#define AWQ_WGMMA_RS_N64(TYPE)                                                                   \
  asm volatile(AWQ_WGMMA_HEAD("%37") "m64n64k16.f32." TYPE "." TYPE                             \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "       \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                   \
               : AWQ_F8(d, 0), AWQ_F8(d, 8), AWQ_F8(d, 16), AWQ_F8(d, 24)                        \
               : AWQ_WGMMA_IN)
#define AWQ_WGMMA_RS_N128(TYPE)                                                                   \
  asm volatile(AWQ_WGMMA_HEAD("%69") "m64n128k16.f32." TYPE "." TYPE                              \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "         \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
               "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                      \
               : AWQ_F8(d, 0), AWQ_F8(d, 8), AWQ_F8(d, 16), AWQ_F8(d, 24), AWQ_F8(d, 32), AWQ_F8(d, 40), \
                 AWQ_F8(d, 48), AWQ_F8(d, 56)                                                     \
               : AWQ_WGMMA_IN)

// D[64 x N] += A[64 x 16] (registers) * B[16 x N] (shared memory, `desc`): this warp's 16 rows.
template <typename T, int N>
struct Wgmma {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "the wgmma shapes the kernels use");
  __device__ __forceinline__ static void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {
#if defined(AWQ_HOST_EMULATION)
    awq_twin::wgmma_rs<T>(d, N, a, desc);
#elif defined(AWQ_WGMMA_ARCH)
    constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
    if constexpr (N == 16 && kBf16) AWQ_WGMMA_RS_N16("bf16");
    else if constexpr (N == 16) AWQ_WGMMA_RS_N16("f16");
    else if constexpr (N == 32 && kBf16) AWQ_WGMMA_RS_N32("bf16");
    else if constexpr (N == 32) AWQ_WGMMA_RS_N32("f16");
    else if constexpr (N == 64 && kBf16) AWQ_WGMMA_RS_N64("bf16");
    else if constexpr (N == 64) AWQ_WGMMA_RS_N64("f16");
    else if constexpr (kBf16) AWQ_WGMMA_RS_N128("bf16");
    else AWQ_WGMMA_RS_N128("f16");
#elif defined(__CUDA_ARCH__)
    __trap();  // no wgmma below sm_90a: launch_stream never runs this configuration there
#endif
  }
};

// wgmma.fence: orders this warp's register writes (the A fragments just dequantized, accumulators
// just cleared) before the wgmma that reads them.  commit: closes a group of issued wgmma.  wait<N>:
// until at most N groups are in flight.
__device__ __forceinline__ void wgmma_fence() {
#if defined(AWQ_HOST_EMULATION)
#elif defined(AWQ_WGMMA_ARCH)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(AWQ_HOST_EMULATION)
  awq_twin::wgmma_commit();
#elif defined(AWQ_WGMMA_ARCH)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(AWQ_HOST_EMULATION)
  awq_twin::wgmma_wait(N);
#elif defined(AWQ_WGMMA_ARCH)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Pins registers in place across the asynchronous window: the compiler may not move a read or
// write of v over this point (used on the accumulators around the wgmma of a stage).
__device__ __forceinline__ void fence_operand(float& v) {
#ifndef AWQ_HOST_EMULATION
  asm volatile("" : "+f"(v)::"memory");
#endif
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async one:
// each thread fences its own landed copies before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(AWQ_HOST_EMULATION)
#elif defined(AWQ_WGMMA_ARCH)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}


// ---------------------------------------------------------------- split-K arrival
// Called by every thread of a block after it has written its split's fp32 partials: true (in
// every thread) in the last block to arrive at `counter`, which then sees all other splits'
// partials (fence, then atomic; read them with __ldcg) and must reset the counter to 0 for the
// next launch.  Used by every kernel that splits K across blocks.
__device__ __forceinline__ bool arrive_last(int32_t* counter, int splits) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = (atomicAdd(counter, 1) == splits - 1);
  __syncthreads();
  const bool last = is_last;
  if (last) __threadfence();
  return last;
}

// (lo of a, lo of b) and (hi of a, hi of b): turn two column-pairs of rows k, k+1 into two
// k-pairs of columns 2p, 2p+1 -- the B-fragment order of m16n8k16.  Raw bits: fp16 and bf16 alike.
__device__ __forceinline__ uint32_t pair_lo(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint32_t pair_hi(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7632); }

// One m16n8k16 k-step over a warp's 64 output columns (awq_skinny.cu explains the column
// permutation): lane (g, q) holds word g of k-rows 2q, 2q+1, 2q+8, 2q+9 (w0, w1, w8, w9), which
// become the B fragments of n8-tiles 2p (column 2p of the word) and 2p+1; a[mt] is the A fragment
// of m16 tile mt.  The skinny kernel's inner step.
template <typename T, int MT>
__device__ __forceinline__ void mma_k16(float (&acc)[MT][8][4], const GroupParams<T>& gp, uint32_t w0, uint32_t w1,
                                        uint32_t w8, uint32_t w9, const uint32_t (&a)[MT][4]) {
  using T2 = typename Traits<T>::T2;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t d0 = as_u32<T2>(gp.dequant(w0, p));  // (W[r][2p], W[r][2p+1])
    const uint32_t d1 = as_u32<T2>(gp.dequant(w1, p));  // row r+1
    const uint32_t d8 = as_u32<T2>(gp.dequant(w8, p));  // row r+8
    const uint32_t d9 = as_u32<T2>(gp.dequant(w9, p));  // row r+9
    const uint32_t even0 = pair_lo(d0, d1), even1 = pair_lo(d8, d9);  // column 2p
    const uint32_t odd0 = pair_hi(d0, d1), odd1 = pair_hi(d8, d9);    // column 2p+1
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      Mma<T>::run(acc[mt][2 * p], a[mt], even0, even1);
      Mma<T>::run(acc[mt][2 * p + 1], a[mt], odd0, odd1);
    }
  }
}

// Row within a 32-row chunk of the j-th word lane (., q) reads: rows 2q, 2q+1, 2q+8, 2q+9 of each
// of the chunk's two k-steps -- the order of the warp-tiled layout (awqlib/packing.py TILE_ROWS).
__device__ __forceinline__ constexpr int tile_row(int j, int q) {
  return 16 * (j / 4) + 8 * ((j % 4) / 2) + 2 * q + (j % 2);
}

}  // namespace awq

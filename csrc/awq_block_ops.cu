// The decoder block's small ops on CUDA, one kernel each: awqlib::rms_norm (and add_rms_norm: the
// residual add before a norm in the same kernel), awqlib::rotary (q and k in one launch) and
// awqlib::gated_act.  Schemas and reference implementations: awqlib/blockops.py.
//
// Why.  At decode a block's linears are a few kernels moving megabytes, while transformers' code
// issues ~35 elementwise/reduction kernels around them moving kilobytes; each costs a launch and a
// round trip through memory, so on an H200 a decode-sized 8B forward spends about as long in them
// as in its int4 linears.  These kernels compute the same function as the reference with each
// rounding where the reference rounds (to the tensor dtype after every torch op whose result is a
// tensor of that dtype), so a block using them gives the reference's bits up to the last bit of a
// reduction (rms_norm's sum of squares, rsqrtf) or a transcendental (expf, tanhf):
//   rms_norm   y = x * rsqrt(mean(x^2) + eps) in fp32; then either round(w * round(y)) (Llama:
//              the product of two dtype values, computed in fp32 and rounded, is torch's fp16/bf16
//              mul) or round(y * (offset + w)) all in fp32 (Gemma).
//   rotary     out = round(round(x * cos) + round(rotate_half(x) * sin)) over the first R features,
//              the rest copied; rotate_half negates x2 before the multiply, and round-to-nearest is
//              sign-symmetric, so round(-x2 * s) = -round(x2 * s).
//   gated_act  round(round(act(gate)) * up), act in fp32 as ATen's CUDA kernels compute it.
// Every fp32 product or sum the reference rounds separately is written __fmul_rn / __fadd_rn so
// that ptxas cannot contract it into an FMA (which would round once where torch rounds twice).
//
// Cases the kernels do not take (mixed dtypes, weights of another shape or device, cos of another
// sequence length, index spaces over 2^31) run the reference expression with ATen ops
// (awq_block_ops.cpp, the host side, which also allocates the outputs): the same function in more
// kernels, never a different answer.  Nothing here allocates, synchronizes or reads back to the
// host, so the ops can be captured in CUDA graphs.  This file sees raw pointers only
// (awq_block_ops.h): no ATen headers for nvcc to parse.
//
// Each kernel lets the next one launch as soon as all of its CTAs are resident
// (allow_dependent_launch, first thing): a stream GEMM launched with programmatic dependent launch
// (AWQLIB_STREAM_PDL=1, awq_ops.cpp) -- the qkv and gate/up GEMMs after rms_norm, down after
// gated_act -- then streams its first weight stages in while the block op runs, and waits for the
// block op's output (griddepcontrol.wait) before reading it.  A kernel launched without the
// attribute is not affected.
#ifdef AWQ_HOST_EMULATION
#include "cpu_twin.h"  // the kernels alone, on the CPU (tests/cpu_twin/block_ops_twin.cpp)
#endif
#include "awq_block_ops.h"
#include "awq_common.cuh"  // allow_dependent_launch
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace {

constexpr int kWarpLanes = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kVecBytes = awq::kBlockVecBytes;
using awq::RotaryArgs;
using awq::RotaryTensor;
using awq::rotary_seq_dim;

// rms_norm: rows of at most kNormWarpMaxHidden features (q_norm / k_norm over head_dim, many rows)
// are one warp's each, kNormWarpRowsPerBlock rows per CTA; longer rows (the hidden size) get a CTA
// of kNormBlockThreads threads each, reduced through shared memory.
constexpr int kNormWarpMaxHidden = 1024;
constexpr int kNormWarpRowsPerBlock = 8;
constexpr int kNormBlockThreads = 256;
// rotary and gated_act: one thread per unit of work (a 16-byte vector, or one element), flat grid.
constexpr int kRotaryThreads = 256;
constexpr int kGatedThreads = 256;

// ---------------------------------------------------------------- element conversions
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T and back: the value a torch op of dtype T leaves in its output tensor.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

// The elements one thread handles at a time: a 16-byte vector (kVec) or a single element.
template <typename T, bool kVec>
struct Pack {
  static constexpr int kElems = kVec ? kVecBytes / static_cast<int>(sizeof(T)) : 1;
  float v[kElems];

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVec) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kElems; ++i) v[i] = to_f(e[i]);
    } else {
      v[0] = to_f(__ldg(p));
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kVec) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kElems; ++i) e[i] = from_f<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      p[0] = from_f<T>(v[0]);
    }
  }
};

// ---------------------------------------------------------------- rms_norm
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarpMask, v, offset);
  return v;
}

// The row a norm reads: x's, or with kAdd round(residual + x) -- torch's add in T, an fp32 sum
// rounded once (exact for fp32).
template <typename T, bool kVec, bool kAdd>
__device__ __forceinline__ Pack<T, kVec> norm_input(const T* xr, const T* rr, int at) {
  Pack<T, kVec> v;
  v.load(xr + at);
  if constexpr (kAdd) {
    Pack<T, kVec> r;
    r.load(rr + at);
#pragma unroll
    for (int i = 0; i < Pack<T, kVec>::kElems; ++i) v.v[i] = round_to<T>(__fadd_rn(r.v[i], v.v[i]));
  }
  return v;
}

// One row per kGroupThreads threads (a warp, or the whole CTA of kNormBlockThreads), kBlockThreads
// threads per CTA.  Pass 1 sums the squares in fp32 (kAdd: of residual + x, which it also writes
// to sum_out); pass 2 reads the row again (L1 hits: it recomputes the sum rather than read back
// what pass 1 wrote) and writes the normalized, scaled row.  residual and sum_out are read and
// written only with kAdd (add_rms_norm: a block's second residual add and its norm in one kernel).
template <typename T, int kGroupThreads, int kBlockThreads, bool kVec, bool kScaleInFp32, bool kAdd>
__global__ void __launch_bounds__(kBlockThreads)
awq_rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    T* __restrict__ out, T* __restrict__ sum_out, int64_t rows, int hidden, float eps,
                    float weight_offset) {
  static_assert(kGroupThreads == kWarpLanes || kGroupThreads == kBlockThreads, "a row is a warp's or a CTA's");
  awq::allow_dependent_launch();
  using P = Pack<T, kVec>;
  constexpr int kRowsPerBlock = kBlockThreads / kGroupThreads;
  const int tid = threadIdx.x % kGroupThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroupThreads;
  if (row >= rows) return;  // the whole group leaves: a warp (warp rows) or nothing (a CTA per row)
  const T* xr = x + row * hidden;
  const T* rr = kAdd ? residual + row * hidden : nullptr;
  T* outr = out + row * hidden;
  const int packs = hidden / P::kElems;

  float sum = 0.f;
  for (int p = tid; p < packs; p += kGroupThreads) {
    const P v = norm_input<T, kVec, kAdd>(xr, rr, p * P::kElems);
    if constexpr (kAdd) v.store(sum_out + row * hidden + p * P::kElems);
#pragma unroll
    for (int i = 0; i < P::kElems; ++i) sum = fmaf(v.v[i], v.v[i], sum);
  }
  sum = warp_sum(sum);
  if constexpr (kGroupThreads > kWarpLanes) {
    constexpr int kWarps = kGroupThreads / kWarpLanes;
    __shared__ float warp_sums[kWarps];
    __shared__ float total;
    const int warp = tid / kWarpLanes, lane = tid % kWarpLanes;
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      float s = lane < kWarps ? warp_sums[lane] : 0.f;
      s = warp_sum(s);
      if (lane == 0) total = s;
    }
    __syncthreads();
    sum = total;
  }
  // mean(x^2) + eps, then rsqrt: each an fp32 op of its own in the reference
  const float r = rsqrtf(__fadd_rn(__fdiv_rn(sum, static_cast<float>(hidden)), eps));

  for (int p = tid; p < packs; p += kGroupThreads) {
    P v = norm_input<T, kVec, kAdd>(xr, rr, p * P::kElems), w;
    w.load(weight + p * P::kElems);
#pragma unroll
    for (int i = 0; i < P::kElems; ++i) {
      const float y = __fmul_rn(v.v[i], r);
      v.v[i] = kScaleInFp32 ? __fmul_rn(y, __fadd_rn(weight_offset, w.v[i])) : __fmul_rn(w.v[i], round_to<T>(y));
    }
    v.store(outr + p * P::kElems);
  }
}

// ---------------------------------------------------------------- rotary
template <typename T, bool kVec>
__global__ void __launch_bounds__(kRotaryThreads) awq_rotary_kernel(const RotaryArgs a) {
  awq::allow_dependent_launch();
  using P = Pack<T, kVec>;
  const uint32_t idx = blockIdx.x * kRotaryThreads + threadIdx.x;
  if (idx >= a.units) return;
  uint32_t row = idx / a.units_per_row;
  const uint32_t unit = idx % a.units_per_row;
  // q's rows, then k's.  Field by field: a reference to either parameter struct would make the
  // compiler copy the parameters to local memory.
  const bool is_k = row >= a.q.rows;
  if (is_k) row -= a.q.rows;
  const uint32_t d1 = is_k ? a.k.d1 : a.q.d1, d2 = is_k ? a.k.d2 : a.q.d2;
  const uint32_t i2 = row % d2, i1 = (row / d2) % d1, i0 = row / d2 / d1;
  const T* in = static_cast<const T*>(is_k ? a.k.in : a.q.in) + i0 * (is_k ? a.k.stride0 : a.q.stride0) +
                i1 * (is_k ? a.k.stride1 : a.q.stride1) + i2 * (is_k ? a.k.stride2 : a.q.stride2);
  T* out = static_cast<T*>(is_k ? a.k.out : a.q.out) + static_cast<int64_t>(row) * a.head_dim;
  const uint32_t half = a.rot_dim / 2;
  const uint32_t pair_units = half / P::kElems;
  if (unit >= pair_units) {  // a feature past the rotary dim: copied
    const uint32_t j = a.rot_dim + (unit - pair_units) * P::kElems;
    P v;
    v.load(in + j);
    v.store(out + j);
    return;
  }
  const uint32_t s = a.seq_dim == 1 ? i1 : i2;
  const T* cos = static_cast<const T*>(a.cos) + i0 * a.cos_stride_b + s * a.cos_stride_s;
  const T* sin = static_cast<const T*>(a.sin) + i0 * a.sin_stride_b + s * a.sin_stride_s;
  const uint32_t i = unit * P::kElems;
  P x1, x2, c1, c2, s1, s2;
  x1.load(in + i);
  x2.load(in + i + half);
  c1.load(cos + i);
  c2.load(cos + i + half);
  s1.load(sin + i);
  s2.load(sin + i + half);
  P o1, o2;
#pragma unroll
  for (int e = 0; e < P::kElems; ++e) {
    o1.v[e] = __fadd_rn(round_to<T>(__fmul_rn(x1.v[e], c1.v[e])), -round_to<T>(__fmul_rn(x2.v[e], s1.v[e])));
    o2.v[e] = __fadd_rn(round_to<T>(__fmul_rn(x2.v[e], c2.v[e])), round_to<T>(__fmul_rn(x1.v[e], s2.v[e])));
  }
  o1.store(out + i);
  o2.store(out + i + half);
}

// ---------------------------------------------------------------- gated_act
// An int, not a scoped enum, as the kernels' template argument: mangled as a plain literal, which
// scripts/sass_budget.py reads.
enum Act : int { kActSilu, kActGeluTanh };

// gelu(x, approximate="tanh") as ATen's GeluCUDAKernel writes it (same expression, so nvcc
// contracts it the same way): kBeta = sqrt(2) * 2/sqrt(pi) / 2 = sqrt(2/pi).
constexpr float kGeluBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
constexpr float kGeluKappa = 0.044715f;

template <int kAct>
__device__ __forceinline__ float activation(float x) {
  if constexpr (kAct == kActSilu) {
    return x / (1.0f + expf(-x));  // ATen's silu: precise expf, IEEE division
  } else {
    const float x_cube = x * x * x;
    const float inner = kGeluBeta * (x + kGeluKappa * x_cube);
    return 0.5f * x * (1.0f + tanhf(inner));
  }
}

template <typename T, bool kVec, int kAct>
__global__ void __launch_bounds__(kGatedThreads)
awq_gated_act_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                     int64_t gate_row_stride, int64_t up_row_stride, int features, uint32_t units_per_row,
                     uint32_t units) {
  awq::allow_dependent_launch();
  using P = Pack<T, kVec>;
  const uint32_t idx = blockIdx.x * kGatedThreads + threadIdx.x;
  if (idx >= units) return;
  const uint32_t row = idx / units_per_row;
  const uint32_t i = (idx % units_per_row) * P::kElems;
  P g, u;
  g.load(gate + row * gate_row_stride + i);
  u.load(up + row * up_row_stride + i);
#pragma unroll
  for (int e = 0; e < P::kElems; ++e) g.v[e] = __fmul_rn(round_to<T>(activation<kAct>(g.v[e])), u.v[e]);
  g.store(out + static_cast<int64_t>(row) * features + i);
}

#ifndef AWQ_HOST_EMULATION
// ---------------------------------------------------------------- launchers (awq_block_ops.h)
bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Calls f(T{}) with T the CUDA element type of `e`.
template <typename F>
void with_element_type(awq::BlockElem e, F&& f) {
  if (e == awq::BlockElem::kHalf) f(__half{});
  else if (e == awq::BlockElem::kBFloat16) f(__nv_bfloat16{});
  else f(float{});
}

template <typename T, int kGroup, int kBlock, bool kVec, bool kAdd>
void launch_norm_kernel(const awq::NormCall& c) {
  constexpr int kRows = kBlock / kGroup;
  const auto blocks = static_cast<unsigned>((c.rows + kRows - 1) / kRows);
  const T* x = static_cast<const T*>(c.x);
  const T* r = static_cast<const T*>(c.residual);
  const T* w = static_cast<const T*>(c.weight);
  T* out = static_cast<T*>(c.out);
  T* sum = static_cast<T*>(c.sum_out);
  if (c.scale_in_fp32) {
    awq_rms_norm_kernel<T, kGroup, kBlock, kVec, true, kAdd>
        <<<blocks, kBlock, 0, c.stream>>>(x, r, w, out, sum, c.rows, c.hidden, c.eps, c.weight_offset);
  } else {
    awq_rms_norm_kernel<T, kGroup, kBlock, kVec, false, kAdd>
        <<<blocks, kBlock, 0, c.stream>>>(x, r, w, out, sum, c.rows, c.hidden, c.eps, c.weight_offset);
  }
}
#endif  // AWQ_HOST_EMULATION
}  // namespace

#ifndef AWQ_HOST_EMULATION
namespace awq {

// A warp per row up to kNormWarpMaxHidden features, else a CTA per row; 16-byte vectors where
// every row allows them.
void launch_rms_norm(const NormCall& c) {
  const bool add = c.residual != nullptr;
  with_element_type(c.elem, [&](auto zero) {
    using T = decltype(zero);
    const bool vec = c.hidden % (kVecBytes / static_cast<int>(sizeof(T))) == 0 && aligned(c.x) && aligned(c.weight) &&
                     aligned(c.out) && (!add || (aligned(c.residual) && aligned(c.sum_out)));
    const auto launch = [&](auto add_tag) {
      constexpr bool kAdd = decltype(add_tag)::value;
      constexpr int kWarpBlock = kWarpLanes * kNormWarpRowsPerBlock;
      if (c.hidden <= kNormWarpMaxHidden) {
        if (vec) launch_norm_kernel<T, kWarpLanes, kWarpBlock, true, kAdd>(c);
        else launch_norm_kernel<T, kWarpLanes, kWarpBlock, false, kAdd>(c);
      } else {
        if (vec) launch_norm_kernel<T, kNormBlockThreads, kNormBlockThreads, true, kAdd>(c);
        else launch_norm_kernel<T, kNormBlockThreads, kNormBlockThreads, false, kAdd>(c);
      }
    };
    if (add) launch(std::true_type{});
    else launch(std::false_type{});
  });
}

void launch_rotary(RotaryArgs a, BlockElem elem, cudaStream_t stream) {
  with_element_type(elem, [&](auto zero) {
    using T = decltype(zero);
    const int64_t elems = kVecBytes / static_cast<int64_t>(sizeof(T));
    bool vec = (a.rot_dim / 2) % elems == 0 && a.head_dim % elems == 0;
    for (const RotaryTensor* t : {&a.q, &a.k})
      vec = vec && aligned(t->in) && aligned(t->out) && t->stride0 % elems == 0 && t->stride1 % elems == 0 &&
            t->stride2 % elems == 0;
    vec = vec && aligned(a.cos) && aligned(a.sin) && a.cos_stride_b % elems == 0 && a.cos_stride_s % elems == 0 &&
          a.sin_stride_b % elems == 0 && a.sin_stride_s % elems == 0;
    const int e = vec ? static_cast<int>(elems) : 1;
    a.units_per_row = static_cast<uint32_t>(a.rot_dim / 2 / e + (a.head_dim - a.rot_dim) / e);
    a.units = (a.q.rows + a.k.rows) * a.units_per_row;
    if (a.units == 0) return;  // rot_dim 0 and head_dim 0
    const unsigned blocks = (a.units + kRotaryThreads - 1) / kRotaryThreads;
    if (vec) awq_rotary_kernel<T, true><<<blocks, kRotaryThreads, 0, stream>>>(a);
    else awq_rotary_kernel<T, false><<<blocks, kRotaryThreads, 0, stream>>>(a);
  });
}

void launch_gated_act(const GatedCall& c) {
  with_element_type(c.elem, [&](auto zero) {
    using T = decltype(zero);
    const int64_t elems = kVecBytes / static_cast<int64_t>(sizeof(T));
    const bool vec = c.features % elems == 0 && c.gate_row_stride % elems == 0 && c.up_row_stride % elems == 0 &&
                     aligned(c.gate) && aligned(c.up) && aligned(c.out);
    const int64_t e = vec ? elems : 1;
    const auto units_per_row = static_cast<uint32_t>(c.features / e);
    const auto units = static_cast<uint32_t>(c.rows) * units_per_row;
    const unsigned blocks = (units + kGatedThreads - 1) / kGatedThreads;
    const T* gp = static_cast<const T*>(c.gate);
    const T* up = static_cast<const T*>(c.up);
    T* op = static_cast<T*>(c.out);
    const auto launch = [&](auto vec_tag, auto act_tag) {
      awq_gated_act_kernel<T, decltype(vec_tag)::value, decltype(act_tag)::value><<<blocks, kGatedThreads, 0, c.stream>>>(
          gp, up, op, c.gate_row_stride, c.up_row_stride, c.features, units_per_row, units);
    };
    using Silu = std::integral_constant<int, kActSilu>;
    using GeluTanh = std::integral_constant<int, kActGeluTanh>;
    if (vec && c.silu) launch(std::true_type{}, Silu{});
    else if (vec) launch(std::true_type{}, GeluTanh{});
    else if (c.silu) launch(std::false_type{}, Silu{});
    else launch(std::false_type{}, GeluTanh{});
  });
}

}  // namespace awq
#endif  // AWQ_HOST_EMULATION

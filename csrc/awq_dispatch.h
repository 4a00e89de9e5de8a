// Which kernel serves an awq_gemm call: the whole choice as plain functions of the call's layout,
// shape and kernel id (and, for the stream layout only, the stream settings and the device's shared
// memory) -- no ATen, no CUDA runtime calls -- so that awq_ops.cpp (which reads the settings, asks the
// device and raises what this refuses) and the CPU twin (tests/cpu_twin/stream_twin.cpp: dispatch)
// run the same code and CI tests the rules (tests/test_cpu_twin.py).  Thresholds measured on an
// H200 (benchmarks/tune_kernels.py, benchmarks/gpu_sweep.py; numbers in benchmarks/RESULTS.md):
//
//   warp-tiled qweight (AWQLIB_LAYOUT=tiled, or a group size the stream kernel cannot take at one
//   token) and GEMM-layout qweight (the checkpoint layout: on CUDA only what the library does not
//   repack -- a linear offloaded to the CPU, moved in for its forward -- and direct op calls):
//     M <= kSkinnyMaxMAuto   -> awq_skinny.cu (tensor cores, weights streamed to registers)
//     larger                 -> awq_dequant.cu + cuBLAS (at::mm)
//   stream-layout qweight (the default runtime layout, packing.DEFAULT_RUNTIME_LAYOUT):
//     awq_stream.cu's choose_stream: M <= kStreamMaxM in one launch (group sums where they pay,
//     the narrow kernels at M <= 8), in the large shared-memory configuration where it fits, else
//     the compact one (M <= kStreamCompactMaxM: A100 at M 17-32, ~100 KB GPUs), or the deep one
//     where asked for (AWQLIB_STREAM_DEEP=1, M <= 16 and 33-64, H100/H200), or the warpgroup-mma
//     one where asked for (AWQLIB_STREAM_WGMMA=1, an sm_90a build on H100/H200; passes of up to
//     kStreamWgmmaMaxM rows), or the wide one where asked for (AWQLIB_STREAM_WIDE=1, 256-column
//     slices, passes of 17-64 rows); at M > 32 only for weights of kStreamFourTileMinWeights elements or
//     more; else dequantize + cuBLAS.  Forced, the stream kernel runs larger M in passes.
//   shapes the fused kernels do not cover (N % 64, K % 32, group % 32) -> dequantize + cuBLAS
#pragma once

#include <cstdint>
#include <string>

#include "awq_kernels.h"

namespace awq {

// Warp-tiled and GEMM-layout weights: the skinny kernel up to kSkinnyMaxMAuto rows, then dequantize
// (K*N*2.5 bytes of traffic) + cuBLAS.  On an H200 (benchmarks/RESULTS.md, 2026-11-27) the skinny
// kernel ran 0.67-1.01x fp16 at M = 32 and dequantize + cuBLAS 0.40-0.61x at M = 64.  (A CUDA-core
// GEMV (M = 1) and a tiled mma.sync GEMM (M = 17-47) for the GEMM layout were retired once the
// stream layout became the runtime layout: only weights the library does not repack reached them,
// and the GEMV's best case was 23 % ahead of the skinny kernel on tiled weights, 7b gate_up M = 1.)
constexpr int64_t kSkinnyMaxMAuto = 32;

// Which kernel serves a call.  kAuto picks by shape (above); the others force one, for tuning
// (torch.ops.awqlib.awq_gemm_variant, benchmarks/tune_kernels.py) and tests.  Mirrored by
// awqlib.ops.Kernel (an IntEnum; tests/test_ops.py checks that the two agree).
// Ids 1 and 3 (a CUDA-core GEMV and a tiled mma.sync GEMM) are retired, not reused: a script that
// still passes one is refused as an unknown kernel (is_kernel), not run on another.
enum Kernel : int64_t {
  kAuto = 0,
  kSkinny = 2,         // skinny tensor-core kernel, register ring 4 chunks deep, M <= 32
  kDequantCublas = 4,  // dequantize + cuBLAS, any layout and M
  kSkinnyShallow = 5,  // skinny tensor-core kernel, register ring 2 chunks deep
  kStream = 6,         // streaming mma.sync kernel, stream layout, passes of <= 64 rows (AUTO: one pass;
                       // wgmma: <= 128)
  kStreamGroupSums = 7,  // the same, scaling per-group fp32 sums where that saves instructions
  kStreamCompact = 8,    // kStream in the compact shared-memory configuration, passes of <= 32 rows
  kStreamCompactGroupSums = 9,  // kStreamGroupSums in the compact configuration
  kLastKernel = kStreamCompactGroupSums
};

// The weight comes in one of three layouts (awqlib/packing.py), told apart by qweight's shape:
//   GEMM layout (the checkpoint's)  qweight int32 [K, N/8]
//   warp-tiled (repacked at load)   qweight int32 [N/64, K/32, 256]: each warp-sized tile of
//                                   32 k-rows x 64 columns stored in the order the skinny kernel's
//                                   lanes read it, so a warp streams 1 KB contiguous per tile.
//   stream (repacked at load)       qweight int32 [N/64, K/16, 128]: 16x64 mma atoms, 16 bytes per
//                                   lane, k-pairs pre-interleaved; qzeros and scales permuted per
//                                   lane too (same shapes as the GEMM layout's).
enum class Layout { kGemm, kTiled, kStream };

inline bool is_stream_kernel(Kernel k) { return k >= kStream && k <= kStreamCompactGroupSums; }
// A kernel id awq_gemm_variant takes (the ids of enum Kernel, retired ones excluded).
inline bool is_kernel(int64_t k) {
  return k == kAuto || k == kSkinny || k == kDequantCublas || k == kSkinnyShallow ||
         (k >= kStream && k <= kLastKernel);
}

// What a stream-layout call's choice depends on beyond the call: AWQLIB_STREAM_DEEP, AWQLIB_STREAM_WIDE,
// AWQLIB_STREAM_WGMMA (on a device that runs the wgmma kernels) and the shared memory a block may have.
struct StreamSettings {
  bool deep = false;
  bool wide = false;
  bool wgmma = false;
  int smem_limit = 0;
};

// The kernel that serves a call: kAuto resolved, the stream kernels as kStream with their
// configuration, pass rows and group sums (choose_stream); or, for a forced kernel that cannot
// serve the call, the refusal awq_gemm_variant raises.
struct KernelChoice {
  Kernel kernel = kDequantCublas;  // never kAuto
  StreamChoice stream;             // kernel == kStream
  std::string refusal;             // non-empty: refused, and why
};

// `settings()` -> StreamSettings, called only for a stream-layout weight (so that a call on another
// layout neither reads the stream settings nor is refused for one of them).  K and group are
// checked by the caller (awq_ops.cpp: check_weight), which also handles M = 0 and N = 0 itself.
template <typename Settings>
KernelChoice choose_kernel(Layout layout, int64_t M, int64_t N, int64_t K, int64_t group, Kernel k,
                           Settings&& settings) {
  KernelChoice c;
  const auto refuse = [&](const std::string& why) {
    c.refusal = "awq_gemm_variant: " + why;
    return c;
  };
  if (!is_kernel(k)) return refuse("unknown kernel " + std::to_string(static_cast<int64_t>(k)));
  if (layout == Layout::kStream) {
    if (k != kAuto && k != kDequantCublas && !is_stream_kernel(k))
      return refuse("a stream-layout weight is served by the stream kernel or dequantize + cuBLAS only");
    if (k == kDequantCublas) return c;
    if (M >= (int64_t(1) << 31)) {
      if (k != kAuto) return refuse("the stream kernel takes fewer than 2^31 rows, got " + std::to_string(M));
      return c;
    }
    const StreamSettings st = settings();
    StreamRequest r;
    r.automatic = k == kAuto;
    r.compact = k == kStreamCompact || k == kStreamCompactGroupSums;
    r.group_sums = k == kStreamGroupSums || k == kStreamCompactGroupSums;
    r.deep = st.deep;
    r.wide = st.wide;
    r.wgmma = st.wgmma;
    r.smem_limit = st.smem_limit;
    c.stream = choose_stream(M, static_cast<int>(N), static_cast<int>(K), static_cast<int>(group), r);
    if (c.stream.kind == StreamChoice::kRefused) return refuse(c.stream.refusal);
    c.kernel = c.stream.kind == StreamChoice::kStream ? kStream : kDequantCublas;
    return c;
  }
  if (is_stream_kernel(k)) return refuse("the stream kernel needs the stream layout");
  // the fused kernels' shapes, and their 32-bit row and output indexing
  const bool fused_shape = N % kFusedNMultiple == 0 && K % kFusedKMultiple == 0 && group % kFusedGroupMultiple == 0;
  const bool fused_size = M < (int64_t(1) << 31) && M * N < (int64_t(1) << 31);
  const bool fused_ok = fused_shape && fused_size;
  if (k == kAuto) k = M <= kSkinnyMaxMAuto && fused_ok ? kSkinnyShallow : kDequantCublas;
  c.kernel = k;
  if (k == kDequantCublas) return c;
  if (!fused_shape)
    return refuse("the fused kernels need N % " + std::to_string(kFusedNMultiple) + " == 0, K % " +
                  std::to_string(kFusedKMultiple) + " == 0 and group_size % " + std::to_string(kFusedGroupMultiple) +
                  " == 0");
  if (!fused_size)
    return refuse("the fused kernels take fewer than 2^31 rows and outputs (M x N), got M = " + std::to_string(M) +
                  ", N = " + std::to_string(N));
  if ((k == kSkinny || k == kSkinnyShallow) && M > kSkinnyMaxM)
    return refuse("the skinny kernel takes M <= " + std::to_string(kSkinnyMaxM));
  return c;
}

// The first launch's kernel of a choice, named as scripts/sass_budget.py names it (its
// sass_budget.json key), or "dequant+cuBLAS".  narrow: the
// AWQLIB_STREAM_NARROW setting.
inline std::string kernel_name(DType dt, Layout layout, int64_t M, int64_t N, int64_t K, int64_t group,
                               const KernelChoice& c, bool narrow) {
  switch (c.kernel) {
    case kStream:
      return stream_kernel_name(dt, static_cast<int>(M < c.stream.pass ? M : c.stream.pass), static_cast<int>(N),
                                static_cast<int>(K), static_cast<int>(group), c.stream.config, c.stream.group_sums,
                                narrow);
    case kSkinny:
    case kSkinnyShallow:
      return skinny_kernel_name(dt, static_cast<int>(M), c.kernel == kSkinnyShallow ? 2 : 4, layout == Layout::kTiled);
    default:
      return "dequant+cuBLAS";
  }
}

}  // namespace awq

// CUDA implementations of the awqlib ops.  The schemas are defined in Python (awqlib/ops.py);
// this file only registers kernels for the CUDA dispatch key, checks arguments and picks a
// kernel (thresholds measured on an H200 with benchmarks/tune_kernels.py):
//
//   warp-tiled qweight (from_quantized on CUDA repacks to it):
//     M <= kSkinnyMaxMTiled  -> awq_skinny.cu (tensor cores, weights streamed to registers)
//     larger                 -> awq_dequant.cu (tiled) + cuBLAS (at::mm)
//   GEMM-layout qweight (the checkpoint layout, e.g. a model quantized in this process):
//     M <= kGemvMaxMAuto     -> awq_gemv.cu   (CUDA cores, cp.async pipeline)
//     M <= kSkinnyMaxMAuto   -> awq_skinny.cu
//     M <  kDequantCublasMinM -> awq_gemm.cu  (tiled mma.sync GEMM, cp.async pipeline)
//     larger                 -> awq_dequant.cu + cuBLAS
//   shapes the fused kernels do not cover (N % 64, K % 32, group % 32) -> dequantize + cuBLAS
//
// All kernels with split-K reduce in-kernel (the last block of a tile adds the partials in a
// fixed order).  Everything runs on the current stream with no host synchronisation; the
// temporaries (split-K workspace, dense weights) come from the caching allocator, so the ops can
// be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "awq_kernels.h"

namespace {

// GEMM-layout weights from this many rows on: dequantize once (K*N*2.5 bytes of traffic) and
// call cuBLAS.  Measured on an H200 (tune_kernels.py): at M = 64 it beat the tiled mma.sync GEMM
// on all five Llama shapes, at M = 24..32 the GEMM was as fast or faster.
constexpr int64_t kDequantCublasMinM = 48;
// GEMM-layout weights: up to kGemvMaxMAuto rows the CUDA-core GEMV, then up to kSkinnyMaxMAuto
// the skinny tensor-core kernel.  Warp-tiled weights (what from_quantized gives on CUDA): the
// skinny kernel up to kSkinnyMaxMTiled rows, then dequantize + cuBLAS.  Measured on an H200
// (benchmarks/tune_kernels.py; numbers in benchmarks/RESULTS.md).
constexpr int64_t kGemvMaxMAuto = 1;
constexpr int64_t kSkinnyMaxMAuto = 16;
constexpr int64_t kSkinnyMaxMTiled = 32;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous and 16-byte aligned (the kernels use 16-byte vector loads).  A misaligned view
// (e.g. a slice starting at an odd element) is copied.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !aligned16(c)) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

awq::DType to_dtype(at::ScalarType st) {
  return st == at::kHalf ? awq::DType::kHalf : awq::DType::kBFloat16;
}

// Integers and shapes are formatted with std::to_string, never streamed: TORCH_CHECK's message
// goes through std::ostream, and an extension built with one libstdc++'s headers but run against
// another (seen on an H200 image: torch 2.11, the system g++) crashed inside the inlined
// ostream<<(long) instead of raising.
std::string num(int64_t v) { return std::to_string(v); }
std::string shape_of(const at::Tensor& t) {
  std::string r = "[";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.size(i));
  return r + "]";
}

// The weight comes in one of two layouts (awqlib/packing.py):
//   GEMM layout (the checkpoint's)  qweight int32 [K, N/8]
//   warp-tiled (repacked at load)   qweight int32 [N/64, K/32, 256]: each warp-sized tile of
//                                   32 k-rows x 64 columns stored in the order the skinny kernel's
//                                   lanes read it, so a warp streams 1 KB contiguous per tile.
struct Shape {
  int64_t K, N, group;
  bool tiled;
};

Shape check_weight(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales, int64_t group_size,
                   const char* op) {
  TORCH_CHECK(qweight.is_cuda() && qzeros.is_cuda() && scales.is_cuda(), op, ": qweight, qzeros and scales must be CUDA tensors");
  TORCH_CHECK(qzeros.device() == qweight.device() && scales.device() == qweight.device(), op,
              ": qweight, qzeros and scales must be on the same device");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt, op,
              ": qweight and qzeros must be int32, got ", qweight.scalar_type(), " and ", qzeros.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16, op,
              ": scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK((qweight.dim() == 2 || qweight.dim() == 3) && qzeros.dim() == 2 && scales.dim() == 2, op,
              ": qweight must be 2-D (GEMM layout) or 3-D (warp-tiled), qzeros and scales 2-D");
  const bool tiled = qweight.dim() == 3;
  if (tiled) {
    TORCH_CHECK(qweight.size(2) == awq::kTileWords, op, ": a warp-tiled qweight is [N/64, K/32, ", num(awq::kTileWords),
                "], got ", shape_of(qweight));
  }
  const int64_t K = tiled ? qweight.size(1) * awq::kTileK : qweight.size(0);
  const int64_t N = tiled ? qweight.size(0) * awq::kTileN : qweight.size(1) * 8;
  TORCH_CHECK(group_size == -1 || group_size > 0, op, ": group_size must be positive or -1, got ", num(group_size));
  const int64_t g = group_size == -1 ? K : group_size;
  TORCH_CHECK(K > 0 && K % g == 0, op, ": in_features ", num(K), " is not a positive multiple of group_size ", num(g));
  TORCH_CHECK(!tiled || g % awq::kFusedGroupMultiple == 0, op, ": the warp-tiled layout needs group_size % ",
              num(awq::kFusedGroupMultiple), " == 0, got ", num(g));
  TORCH_CHECK(qzeros.size(0) == K / g && qzeros.size(1) == N / 8, op, ": qzeros has shape ", shape_of(qzeros),
              ", expected [", num(K / g), ", ", num(N / 8), "]");
  TORCH_CHECK(scales.size(0) == K / g && scales.size(1) == N, op, ": scales has shape ", shape_of(scales),
              ", expected [", num(K / g), ", ", num(N), "]");
  TORCH_CHECK(K * (N / 8) < (int64_t(1) << 31) && K < (int64_t(1) << 31), op, ": weight too large for 32-bit indexing");
  return {K, N, g, tiled};
}

at::Tensor dequantize_impl(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                           const Shape& s) {
  at::Tensor out = at::empty({s.K, s.N}, scales.options());
  if (s.N == 0) return out;
  at::Tensor qw = contiguous_aligned(qweight), qz = contiguous_aligned(qzeros), sc = contiguous_aligned(scales);
  const auto launch = s.tiled ? awq::launch_dequant_tiled : awq::launch_dequant;
  launch(to_dtype(sc.scalar_type()), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), sc.data_ptr(), out.data_ptr(),
         static_cast<int>(s.K), static_cast<int>(s.N), static_cast<int>(s.group), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor awq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                               int64_t group_size) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_dequantize");
  const c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_impl(qweight, qzeros, scales, s);
}

// Which kernel serves a call.  kAuto picks by shape (below); the others force one, for tuning
// (torch.ops.awqlib.awq_gemm_variant, benchmarks/tune_kernels.py) and tests.
enum Kernel : int64_t { kAuto = 0, kGemv = 1, kSkinny = 2, kTiled = 3, kDequantCublas = 4, kSkinnyShallow = 5 };

// Split-K arrival counters.  Every kernel's last block resets its counter to zero, so one
// zero-initialised buffer per (device, stream) serves every launch on that stream with no memset
// (a memset is a second graph node, ~1-2 us at decode sizes).  Launches on one stream run in
// order, so they never share a counter concurrently.  The map is leaked on purpose: tensors
// destroyed after the CUDA context at process exit would crash.
int32_t* counters_for(const at::Tensor& like, int64_t n, cudaStream_t stream) {
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& buf = (*buffers)[{like.get_device(), stream}];
  if (!buf.defined() || buf.numel() < n) {
    // Zeroed on this stream; under CUDA-graph capture the memset is captured too (harmless).
    buf = at::zeros({std::max<int64_t>(n, 4096)}, like.options().dtype(at::kInt));
  }
  return buf.data_ptr<int32_t>();
}

at::Tensor awq_gemm_variant_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                 const at::Tensor& scales, int64_t group_size, int64_t kernel, int64_t splits) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_gemm");
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(), "awq_gemm: x must be a CUDA tensor on the weight's device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "awq_gemm: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == s.K, "awq_gemm: x has ", num(x.size(-1)), " features, the weight expects ",
              num(s.K));
  TORCH_CHECK(kernel >= kAuto && kernel <= kSkinnyShallow, "awq_gemm_variant: unknown kernel ", num(kernel));
  TORCH_CHECK(splits >= 0 && splits < (int64_t(1) << 16), "awq_gemm_variant: splits must be in [0, 65535], got ",
              num(splits));
  const c10::cuda::CUDAGuard guard(x.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  const int64_t M = x.numel() / s.K;
  if (M == 0 || s.N == 0) return at::empty(out_shape, x.options());

  // The kernels compute in x's dtype; scales stored as fp16 are rounded to bf16 for bf16
  // activations, exactly like the reference implementation.
  const at::Tensor sc = contiguous_aligned(scales.scalar_type() == x.scalar_type() ? scales : scales.to(x.scalar_type()));
  const at::Tensor x2 = contiguous_aligned(x.reshape({M, s.K}));
  const at::Tensor qw = contiguous_aligned(qweight), qz = contiguous_aligned(qzeros);

  const bool fused_ok = s.N % awq::kFusedNMultiple == 0 && s.K % awq::kFusedKMultiple == 0 &&
                        s.group % awq::kFusedGroupMultiple == 0 && M < (int64_t(1) << 31) &&
                        M * s.N < (int64_t(1) << 31);
  Kernel k = static_cast<Kernel>(kernel);
  if (k == kAuto) {
    if (s.tiled) k = M <= kSkinnyMaxMTiled ? kSkinnyShallow : kDequantCublas;
    else k = !fused_ok ? kDequantCublas
             : M <= kGemvMaxMAuto ? kGemv
             : M <= kSkinnyMaxMAuto ? kSkinnyShallow
             : M < kDequantCublasMinM ? kTiled
             : kDequantCublas;
  }
  TORCH_CHECK(k == kDequantCublas || fused_ok, "awq_gemm_variant: the fused kernels need N % ",
              num(awq::kFusedNMultiple), " == 0, K % ", num(awq::kFusedKMultiple), " == 0 and group_size % ",
              num(awq::kFusedGroupMultiple), " == 0");
  TORCH_CHECK(!s.tiled || k == kSkinny || k == kSkinnyShallow || k == kDequantCublas,
              "awq_gemm_variant: a warp-tiled weight is served by the skinny kernels or dequantize + cuBLAS only");
  TORCH_CHECK(k != kGemv || M <= awq::kGemvMaxM, "awq_gemm_variant: the GEMV kernel takes M <= ", num(awq::kGemvMaxM));
  TORCH_CHECK((k != kSkinny && k != kSkinnyShallow) || M <= awq::kSkinnyMaxM,
              "awq_gemm_variant: the skinny kernel takes M <= ", num(awq::kSkinnyMaxM));
  if (k == kDequantCublas) {
    const at::Tensor w = dequantize_impl(qw, qz, sc, s);  // [K, N] in x's dtype
    return at::mm(x2, w).view(out_shape);
  }

  at::Tensor out = at::empty({M, s.N}, x.options());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int m = static_cast<int>(M), n = static_cast<int>(s.N), kk = static_cast<int>(s.K);
  const int so = static_cast<int>(splits);
  const int depth = k == kSkinnyShallow ? 2 : 4;  // register-ring depth of the skinny kernel
  const awq::DType dt = to_dtype(x.scalar_type());
  const awq::Plan plan = k == kGemv ? awq::plan_gemv(m, n, kk, num_sms, so)
                         : k == kTiled ? awq::plan_gemm(m, n, kk, num_sms, so)
                         : awq::plan_skinny(dt, m, n, kk, depth, s.tiled, num_sms, so);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor ws;
  awq::GemmArgs a{};
  if (plan.splits > 1) {
    ws = at::empty({plan.splits, M, s.N}, x.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
    a.counters = counters_for(x, plan.tiles, stream);
  }
  a.x = x2.data_ptr();
  a.qweight = qw.data_ptr<int32_t>();
  a.qzeros = qz.data_ptr<int32_t>();
  a.scales = sc.data_ptr();
  a.out = out.data_ptr();
  a.M = m;
  a.N = n;
  a.K = kk;
  a.group_size = static_cast<int>(s.group);
  a.splits = plan.splits;
  if (k == kGemv) awq::launch_gemv(dt, a, stream);
  else if (k == kTiled) awq::launch_gemm(dt, a, plan, stream);
  else awq::launch_skinny(dt, a, depth, s.tiled, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(out_shape);
}

at::Tensor awq_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, int64_t group_size) {
  return awq_gemm_variant_cuda(x, qweight, qzeros, scales, group_size, kAuto, 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(awqlib, CUDA, m) {
  m.impl("awq_gemm", &awq_gemm_cuda);
  m.impl("awq_dequantize", &awq_dequantize_cuda);
  m.impl("awq_gemm_variant", &awq_gemm_variant_cuda);
}

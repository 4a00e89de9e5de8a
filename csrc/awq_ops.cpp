// CUDA implementations of the awqlib ops.  The schemas are defined in Python (awqlib/ops.py);
// this file only registers kernels for the CUDA dispatch key, checks arguments and picks a
// kernel:
//
//     M (rows of x) ........ 1..kGemvMaxM        -> awq_gemv.cu  (CUDA cores, split-K)
//                            ..kDequantCublasMinM -> awq_gemm.cu  (tensor cores, split-K)
//                            larger               -> awq_dequant.cu + cuBLAS (torch::mm)
//     shapes the fused kernels do not cover (N % 64, K % 32, group % 32, misaligned pointers)
//                                                 -> awq_dequant.cu + cuBLAS
//
// Everything runs on the current stream, with no host synchronisation; temporaries (split-K
// workspace, counters, dense weights) come from the caching allocator, so the ops can be
// captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "awq_kernels.h"

namespace {

// From this many rows on, dequantizing the whole weight once (K*N*2.5 bytes of traffic) and
// calling cuBLAS beats the fused tensor-core kernel, whose mma.sync main loop reaches a fraction
// of cuBLAS' peak.  Initial guess -- tune with benchmarks/bench_kernels.py on the target GPU.
constexpr int64_t kDequantCublasMinM = 512;

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

struct Shape {
  int64_t K, N, group;
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
  TORCH_CHECK(qweight.dim() == 2 && qzeros.dim() == 2 && scales.dim() == 2, op, ": qweight, qzeros, scales must be 2-D");
  const int64_t K = qweight.size(0);
  const int64_t N = qweight.size(1) * 8;
  TORCH_CHECK(group_size == -1 || group_size > 0, op, ": group_size must be positive or -1, got ", group_size);
  const int64_t g = group_size == -1 ? K : group_size;
  TORCH_CHECK(K > 0 && K % g == 0, op, ": in_features ", K, " is not a positive multiple of group_size ", g);
  TORCH_CHECK(qzeros.size(0) == K / g && qzeros.size(1) == N / 8, op, ": qzeros has shape ", qzeros.sizes(),
              ", expected [", K / g, ", ", N / 8, "]");
  TORCH_CHECK(scales.size(0) == K / g && scales.size(1) == N, op, ": scales has shape ", scales.sizes(), ", expected [",
              K / g, ", ", N, "]");
  TORCH_CHECK(K * (N / 8) < (int64_t(1) << 31) && K < (int64_t(1) << 31), op, ": weight too large for 32-bit indexing");
  return {K, N, g};
}

at::Tensor dequantize_impl(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                           const Shape& s) {
  at::Tensor out = at::empty({s.K, s.N}, scales.options());
  if (s.N == 0) return out;
  at::Tensor qw = contiguous_aligned(qweight), qz = contiguous_aligned(qzeros), sc = contiguous_aligned(scales);
  awq::launch_dequant(to_dtype(sc.scalar_type()), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), sc.data_ptr(),
                      out.data_ptr(), static_cast<int>(s.K), static_cast<int>(s.N), static_cast<int>(s.group),
                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor awq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                               int64_t group_size) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_dequantize");
  const c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_impl(qweight, qzeros, scales, s);
}

at::Tensor awq_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, int64_t group_size) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_gemm");
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(), "awq_gemm: x must be a CUDA tensor on the weight's device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "awq_gemm: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == s.K, "awq_gemm: x has ", x.size(-1), " features, the weight expects ", s.K);
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
  if (!fused_ok || M >= kDequantCublasMinM) {
    const at::Tensor w = dequantize_impl(qw, qz, sc, s);  // [K, N] in x's dtype
    return at::mm(x2, w).view(out_shape);
  }

  at::Tensor out = at::empty({M, s.N}, x.options());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool gemv = M <= awq::kGemvMaxM;
  const awq::Plan plan = gemv ? awq::plan_gemv(static_cast<int>(M), static_cast<int>(s.N), static_cast<int>(s.K), num_sms)
                              : awq::plan_gemm(static_cast<int>(M), static_cast<int>(s.N), static_cast<int>(s.K), num_sms);
  at::Tensor ws, counters;
  if (plan.splits > 1) {
    ws = at::empty({plan.splits, M, s.N}, x.options().dtype(at::kFloat));
    counters = at::zeros({plan.tiles}, x.options().dtype(at::kInt));
  }
  awq::GemmArgs a{};
  a.x = x2.data_ptr();
  a.qweight = qw.data_ptr<int32_t>();
  a.qzeros = qz.data_ptr<int32_t>();
  a.scales = sc.data_ptr();
  a.out = out.data_ptr();
  a.workspace = plan.splits > 1 ? ws.data_ptr<float>() : nullptr;
  a.counters = plan.splits > 1 ? counters.data_ptr<int32_t>() : nullptr;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(s.N);
  a.K = static_cast<int>(s.K);
  a.group_size = static_cast<int>(s.group);
  a.splits = plan.splits;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (gemv) awq::launch_gemv(to_dtype(x.scalar_type()), a, stream);
  else awq::launch_gemm(to_dtype(x.scalar_type()), a, plan, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(awqlib, CUDA, m) {
  m.impl("awq_gemm", &awq_gemm_cuda);
  m.impl("awq_dequantize", &awq_dequantize_cuda);
}

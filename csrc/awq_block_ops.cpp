// The block ops' host side on CUDA (awqlib::rms_norm, add_rms_norm, rotary, gated_act; schemas and
// reference implementations in awqlib/blockops.py): the checks, with the Python reference's
// messages; the outputs, from the caching allocator (so the ops can be captured in CUDA graphs);
// whether a kernel takes the call (one dtype the kernels have, one device, 32-bit index spaces, the
// shapes they are written for) -- else the reference expression in ATen ops, the same function in
// more kernels -- and the launch (csrc/awq_block_ops.cu, through awq_block_ops.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "awq_block_ops.h"

namespace {

// Integers in messages go through std::to_string, never an ostream (awq_ops.cpp: num).
std::string shape_str(const at::Tensor& t) {
  std::string r = "(";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.size(i));
  return r + (t.dim() == 1 ? ",)" : ")");
}

bool kernel_dtype(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat; }

// The kernels' element type of a kernel_dtype.
awq::BlockElem block_elem(at::ScalarType st) {
  return st == at::kHalf ? awq::BlockElem::kHalf : st == at::kBFloat16 ? awq::BlockElem::kBFloat16 : awq::BlockElem::kFloat;
}

constexpr uint32_t kMaxUnits = awq::kBlockMaxUnits;

// ---- rms_norm
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset,
                              bool scale_in_fp32) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor y = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  if (scale_in_fp32) return (y * (weight.to(at::kFloat) + weight_offset)).to(x.scalar_type()).contiguous();
  return (weight * y.to(x.scalar_type())).contiguous();
}

// Whether the norm kernel takes x (and residual) with this weight: one dtype the kernels have, one
// device, a 1-D weight of x's last size, row counts and widths within 32-bit index math.
bool norm_kernel_takes(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight) {
  bool ok = x.is_cuda() && weight.is_cuda() && weight.device() == x.device() && x.dim() >= 1 &&
            kernel_dtype(x.scalar_type()) && weight.scalar_type() == x.scalar_type() && weight.dim() == 1 &&
            weight.size(0) == x.size(-1) && x.size(-1) <= kMaxUnits &&
            x.numel() / std::max<int64_t>(x.size(-1), 1) <= kMaxUnits;
  if (residual != nullptr)
    ok = ok && residual->is_cuda() && residual->device() == x.device() &&
         residual->scalar_type() == x.scalar_type() && residual->sizes() == x.sizes();
  return ok;
}

// Launches the norm kernel on contiguous x (and residual) into out (and sum_out).
void run_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, const at::Tensor& out,
              const at::Tensor* sum_out, double eps, double weight_offset, bool scale_in_fp32) {
  const int hidden = static_cast<int>(x.size(-1));
  awq::launch_rms_norm({x.data_ptr(), residual ? residual->data_ptr() : nullptr, weight.data_ptr(), out.data_ptr(),
                        sum_out ? sum_out->data_ptr() : nullptr, x.numel() / hidden, hidden, static_cast<float>(eps),
                        static_cast<float>(weight_offset), scale_in_fp32, block_elem(x.scalar_type()),
                        c10::cuda::getCurrentCUDAStream()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same check, and message, as awqlib/blockops.py's _check_rms_norm (rms_norm and add_rms_norm).
void check_rms_norm(double weight_offset, bool scale_in_fp32) {
  TORCH_CHECK_VALUE(scale_in_fp32 || weight_offset == 0.0,
                    "rms_norm: weight_offset needs scale_in_fp32=True (no model rounds first and offsets)");
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset,
                         bool scale_in_fp32) {
  check_rms_norm(weight_offset, scale_in_fp32);
  if (!norm_kernel_takes(x, nullptr, weight)) return rms_norm_reference(x, weight, eps, weight_offset, scale_in_fp32);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  run_norm(x.contiguous(), nullptr, weight.contiguous(), out, nullptr, eps, weight_offset, scale_in_fp32);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps, double weight_offset,
                                                     bool scale_in_fp32) {
  check_rms_norm(weight_offset, scale_in_fp32);
  if (!norm_kernel_takes(x, &residual, weight)) {
    const at::Tensor sum = (residual + x).contiguous();
    return {sum, rms_norm_reference(sum, weight, eps, weight_offset, scale_in_fp32)};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options()), sum = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {sum, out};
  const at::Tensor rc = residual.contiguous();
  run_norm(x.contiguous(), &rc, weight.contiguous(), out, &sum, eps, weight_offset, scale_in_fp32);
  return {sum, out};
}

// ---- rotary
// The same checks, and messages, as awqlib/blockops.py's _check_rotary.
void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t unsqueeze_dim) {
  TORCH_CHECK_VALUE(unsqueeze_dim == 1 || unsqueeze_dim == 2,
                    "rotary: unsqueeze_dim must be 1 ([batch, heads, seq, dim]) or 2 ([batch, seq, heads, dim]), got ",
                    std::to_string(unsqueeze_dim));
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes(), "rotary: q ",
                    shape_str(q), " and k ", shape_str(k), " must be 4-D and cos ", shape_str(cos), " / sin ",
                    shape_str(sin), " 3-D of one shape");
  const int64_t r = cos.size(-1), d = q.size(-1);
  TORCH_CHECK_VALUE(r % 2 == 0 && r <= d && k.size(-1) == d, "rotary: rotary dim ", std::to_string(r),
                    " must be even and <= the head dim ", std::to_string(d), " of q and k");
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

std::tuple<at::Tensor, at::Tensor> rotary_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin, int64_t unsqueeze_dim) {
  const at::Tensor c = cos.unsqueeze(unsqueeze_dim), s = sin.unsqueeze(unsqueeze_dim);
  const int64_t r = c.size(-1);
  const auto rotate = [&](const at::Tensor& x) {
    if (r == x.size(-1)) return (x * c + rotate_half(x) * s).contiguous();
    const at::Tensor x_rot = x.narrow(-1, 0, r), x_pass = x.narrow(-1, r, x.size(-1) - r);
    return at::cat({x_rot * c + rotate_half(x_rot) * s, x_pass}, -1).contiguous();
  };
  return {rotate(q), rotate(k)};
}

awq::RotaryTensor rotary_view(const at::Tensor& x, const at::Tensor& out) {
  return {x.data_ptr(), out.data_ptr(), static_cast<uint32_t>(x.numel() / x.size(3)), static_cast<uint32_t>(x.size(1)),
          static_cast<uint32_t>(x.size(2)), x.stride(0), x.stride(1), x.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> rotary_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_in,
                                               const at::Tensor& sin_in, int64_t unsqueeze_dim) {
  check_rotary(q_in, k_in, cos_in, sin_in, unsqueeze_dim);
  const int seq_dim = awq::rotary_seq_dim(unsqueeze_dim);
  const int64_t seq = q_in.size(seq_dim), batch = q_in.size(0);
  const at::ScalarType st = q_in.scalar_type();
  bool kernel_ok = q_in.is_cuda() && kernel_dtype(st) && k_in.scalar_type() == st && cos_in.scalar_type() == st &&
                   sin_in.scalar_type() == st;
  for (const at::Tensor* t : {&k_in, &cos_in, &sin_in})
    kernel_ok = kernel_ok && t->is_cuda() && t->device() == q_in.device();
  kernel_ok = kernel_ok && k_in.size(0) == batch && k_in.size(seq_dim) == seq && cos_in.size(1) == seq &&
              (cos_in.size(0) == 1 || cos_in.size(0) == batch);
  // at most one unit per element: the 32-bit index math covers every element of q and k
  kernel_ok = kernel_ok && q_in.numel() + k_in.numel() <= kMaxUnits;
  if (!kernel_ok) return rotary_reference(q_in, k_in, cos_in, sin_in, unsqueeze_dim);

  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q_out = at::empty(q_in.sizes(), q_in.options()), k_out = at::empty(k_in.sizes(), k_in.options());
  if (q_out.numel() + k_out.numel() == 0) return {q_out, k_out};
  // the last dim must be contiguous; the other strides are the kernel's to follow
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor cos = cos_in.stride(2) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sin = sin_in.stride(2) == 1 ? sin_in : sin_in.contiguous();
  awq::RotaryArgs a{};
  a.q = rotary_view(q, q_out);
  a.k = rotary_view(k, k_out);
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.cos_stride_b = cos.size(0) == 1 ? 0 : cos.stride(0);
  a.cos_stride_s = cos.stride(1);
  a.sin_stride_b = sin.size(0) == 1 ? 0 : sin.stride(0);
  a.sin_stride_s = sin.stride(1);
  a.seq_dim = seq_dim;
  a.head_dim = static_cast<int>(q.size(3));
  a.rot_dim = static_cast<int>(cos.size(2));
  awq::launch_rotary(a, block_elem(st), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q_out, k_out};
}

// ---- gated_act
constexpr const char* kActivations = "silu, gelu_tanh";  // awqlib/blockops.py: ACTIVATIONS

at::Tensor gated_act_reference(const at::Tensor& gate, const at::Tensor& up, const std::string& act) {
  const at::Tensor a = act == "silu" ? at::silu(gate) : at::gelu(gate, "tanh");
  return (a * up).contiguous();
}

// x as [rows, features] with one row stride and unit feature stride: a view where its strides
// allow (e.g. one half of a [T, 2I] GEMM output), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& x, int64_t rows, int64_t features) {
  at::Tensor r = x.reshape({rows, features});
  return r.stride(1) == 1 || features == 1 ? r : r.contiguous();
}

at::Tensor gated_act_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view act_view) {
  const std::string act(act_view);
  TORCH_CHECK_VALUE(act == "silu" || act == "gelu_tanh", "gated_act: act '", act, "' is not one of ", kActivations);
  TORCH_CHECK_VALUE(gate.sizes() == up.sizes(), "gated_act: gate ", shape_str(gate), " and up ", shape_str(up),
                    " differ in shape");
  const at::ScalarType st = gate.scalar_type();
  const int64_t features = gate.dim() == 0 ? 1 : gate.size(-1);
  const int64_t rows = features == 0 ? 0 : gate.numel() / features;
  const bool kernel_ok = gate.is_cuda() && up.is_cuda() && up.device() == gate.device() && kernel_dtype(st) &&
                         up.scalar_type() == st && rows * features <= kMaxUnits;
  if (!kernel_ok) return gated_act_reference(gate, up, act);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (out.numel() == 0) return out;
  const at::Tensor g = as_rows(gate, rows, features), u = as_rows(up, rows, features);
  awq::launch_gated_act({g.data_ptr(), u.data_ptr(), out.data_ptr(), g.stride(0), u.stride(0), rows,
                         static_cast<int>(features), act == "silu", block_elem(st), c10::cuda::getCurrentCUDAStream()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(awqlib, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rotary", &rotary_cuda);
  m.impl("gated_act", &gated_act_cuda);
}

// CUDA implementations of the awqlib ops.  The schemas are defined in Python (awqlib/ops.py);
// this file only registers kernels for the CUDA dispatch key, checks arguments, reads the settings
// and the device, and runs the kernel awq_dispatch.h chooses (its header states the rules).
//
// All kernels with split-K reduce in-kernel (the last block of a tile adds the partials in a
// fixed order).  Everything runs on the current stream with no host synchronisation (but one, when
// a device's counter arena is made); the temporaries (split-K workspace, dense weights) come from
// the caching allocator and the counters from a zeroed arena (counters_for), so the ops can be
// captured in CUDA graphs with no memset per call, and graphs replayed concurrently on different
// streams never share a counter.  The dense temporary of the large-M path is at most
// kDenseChunkBytes: wider weights are dequantized and multiplied in column chunks.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "awq_counters.h"
#include "awq_dispatch.h"
#include "awq_kernels.h"

namespace {

using awq::Kernel;
using awq::KernelChoice;
using awq::Layout;
using awq::kAuto, awq::kDequantCublas, awq::kSkinnyShallow, awq::kStream;

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

struct Shape {
  int64_t K, N, group;
  Layout layout;
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
              ": qweight must be 2-D (GEMM layout) or 3-D (warp-tiled or stream layout), qzeros and scales 2-D");
  const Layout layout = qweight.dim() == 2 ? Layout::kGemm
                        : qweight.size(2) == awq::kTileWords ? Layout::kTiled
                        : Layout::kStream;
  const bool tiled = layout == Layout::kTiled;
  if (qweight.dim() == 3) {
    TORCH_CHECK(qweight.size(2) == awq::kTileWords || qweight.size(2) == awq::kStreamAtomWords, op,
                ": a 3-D qweight is warp-tiled [N/64, K/32, ", num(awq::kTileWords), "] or stream [N/64, K/16, ",
                num(awq::kStreamAtomWords), "], got ", shape_of(qweight));
  }
  const int64_t K = qweight.dim() == 2 ? qweight.size(0)
                    : qweight.size(1) * (tiled ? awq::kTileK : awq::kStreamAtomK);
  const int64_t N = qweight.dim() == 2 ? qweight.size(1) * 8 : qweight.size(0) * awq::kTileN;
  TORCH_CHECK(group_size == -1 || group_size > 0, op, ": group_size must be positive or -1, got ", num(group_size));
  const int64_t g = group_size == -1 ? K : group_size;
  TORCH_CHECK(K > 0 && K % g == 0, op, ": in_features ", num(K), " is not a positive multiple of group_size ", num(g));
  TORCH_CHECK(layout == Layout::kGemm || g % awq::kFusedGroupMultiple == 0, op,
              ": the warp-tiled and stream layouts need group_size % ", num(awq::kFusedGroupMultiple), " == 0, got ",
              num(g));
  TORCH_CHECK(qzeros.size(0) == K / g && qzeros.size(1) == N / 8, op, ": qzeros has shape ", shape_of(qzeros),
              ", expected [", num(K / g), ", ", num(N / 8), "]");
  TORCH_CHECK(scales.size(0) == K / g && scales.size(1) == N, op, ": scales has shape ", shape_of(scales),
              ", expected [", num(K / g), ", ", num(N), "]");
  TORCH_CHECK(K * (N / 8) < (int64_t(1) << 31) && K < (int64_t(1) << 31), op, ": weight too large for 32-bit indexing");
  return {K, N, g, layout};
}

using DequantLaunch = void (*)(awq::DType, const int32_t*, const int32_t*, const void*, void*, int, int, int,
                               cudaStream_t);

DequantLaunch dequant_launcher(Layout layout) {
  return layout == Layout::kTiled ? awq::launch_dequant_tiled
         : layout == Layout::kStream ? awq::launch_dequant_stream
         : awq::launch_dequant;
}

at::Tensor dequantize_impl(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                           const Shape& s) {
  at::Tensor out = at::empty({s.K, s.N}, scales.options());
  if (s.N == 0) return out;
  at::Tensor qw = contiguous_aligned(qweight), qz = contiguous_aligned(qzeros), sc = contiguous_aligned(scales);
  dequant_launcher(s.layout)(to_dtype(sc.scalar_type()), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(),
                             sc.data_ptr(), out.data_ptr(), static_cast<int>(s.K), static_cast<int>(s.N),
                             static_cast<int>(s.group), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The large-M path: x2 [M, K] @ W^T, W^T dequantized in column chunks so that the temporaries of a
// call stay under kDenseChunkBytes (70b gate_up in one piece would be 0.94 GB per call, held in
// the graph pool under CUDA graphs).  The tiled and stream layouts slice along N for free (their
// leading dimension is 64-column blocks); the GEMM layout's column slice of qweight is copied
// ([K, width/8] int32, counted in the budget), as are the chunk's zeros and scales (small).
constexpr int64_t kDenseChunkBytes = int64_t(256) << 20;

at::Tensor dequant_matmul(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, const Shape& s) {
  const int64_t elem = scales.element_size();
  const int64_t per_column = s.K * elem + (s.layout == Layout::kGemm ? s.K / 2 : 0) + (s.K / s.group) * (elem + 1);
  int64_t width = (kDenseChunkBytes / per_column) / awq::kTileN * awq::kTileN;
  if (width <= 0 || s.N % awq::kTileN != 0) width = s.N;  // narrow K or odd N: one piece (bounded by K)
  if (width >= s.N) return at::mm(x2, dequantize_impl(qweight, qzeros, scales, s));
  at::Tensor out = at::empty({x2.size(0), s.N}, x2.options());
  for (int64_t n0 = 0; n0 < s.N; n0 += width) {
    const int64_t w = std::min(width, s.N - n0);
    const at::Tensor qw = s.layout == Layout::kGemm ? qweight.narrow(1, n0 / 8, w / 8)
                                                    : qweight.narrow(0, n0 / awq::kTileN, w / awq::kTileN);
    Shape cs = s;
    cs.N = w;
    const at::Tensor dense = dequantize_impl(qw, qzeros.narrow(1, n0 / 8, w / 8), scales.narrow(1, n0, w), cs);
    out.narrow(1, n0, w).copy_(at::mm(x2, dense));
  }
  return out;
}

at::Tensor awq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                               int64_t group_size) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_dequantize");
  const c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_impl(qweight, qzeros, scales, s);
}

// Split-K arrival counters.  Every kernel's last block resets its counter to zero, so launches
// that run one after another share counters with no memset, as long as the memory starts zeroed
// and nothing else writes it.  Each device has one arena of them (awq_counters.h): raw device
// memory, so that no allocator pool (a graph's, torch.compile's) ever owns it, zeroed once,
// outside any capture, and never freed.  Eager launches take a slice per stream; launches
// captured in a CUDA graph a slice per (capture, stream) -- so a captured graph holds no memset
// for them, and two graphs replayed concurrently on different streams never share a counter.  A
// capture on a device that has had no call outside capture yet (the arena cannot be made and
// zeroed inside one), or past the spent arena, gets counters of its own per call from the caching
// allocator (the graph's pool), which a captured memset zeroes on every replay (warned once).
// The map is leaked on purpose, like the arena: nothing may be freed after the CUDA context.
struct CaptureState {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;  // cudaStreamGetCaptureInfo's: unique per capture in the process
};

CaptureState capture_state(cudaStream_t stream) {
  CaptureState c;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &c.status, &c.id));
  return c;
}

struct DeviceCounters {
  int32_t* arena = nullptr;                    // kCaptureArenaCounters zeros
  std::unique_ptr<awq::CounterSlices> slices;  // which stream and capture use which part
};

std::mutex counters_mutex;
std::map<int, DeviceCounters>& device_counters() {
  static auto* devices = new std::map<int, DeviceCounters>();
  return *devices;
}

// The device's arena, made on the first call outside capture (under counters_mutex; `stream` is
// the current stream of the current device, which is `device`).  Every awq_gemm call outside
// capture asks, so that a graph captured after any eager call finds it -- also when those calls
// took no counters (dequantize + cuBLAS, one split).
DeviceCounters& counter_arena(int device, cudaStream_t stream, const CaptureState& capture) {
  DeviceCounters& d = device_counters()[device];
  if (d.arena != nullptr || capture.status != cudaStreamCaptureStatusNone) return d;
  const size_t bytes = static_cast<size_t>(awq::kCaptureArenaCounters) * sizeof(int32_t);
  void* p = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&p, bytes));
  // zeroed before any graph that uses it replays, on whatever stream: once per device
  cudaError_t err = cudaMemsetAsync(p, 0, bytes, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) {
    (void)cudaFree(p);
    C10_CUDA_CHECK(err);
  }
  d.slices = std::make_unique<awq::CounterSlices>(awq::kCaptureArenaCounters);
  d.arena = static_cast<int32_t*>(p);
  return d;
}

void prepare_counters(int device, cudaStream_t stream, const CaptureState& capture) {
  constexpr int kKnownDevices = 256;  // a flag per device index: no lock once its arena exists
  static std::atomic<bool> made[kKnownDevices];
  const bool known = device >= 0 && device < kKnownDevices;
  if (capture.status != cudaStreamCaptureStatusNone || (known && made[device].load(std::memory_order_acquire))) return;
  const std::lock_guard<std::mutex> lock(counters_mutex);
  if (counter_arena(device, stream, capture).arena != nullptr && known)
    made[device].store(true, std::memory_order_release);
}

int32_t* counters_for(const at::Tensor& like, int64_t n, cudaStream_t stream, const CaptureState& capture,
                      at::Tensor& per_call) {
  n = std::max<int64_t>(n, 1);
  bool had_arena = false;
  if (capture.status == cudaStreamCaptureStatusNone || capture.status == cudaStreamCaptureStatusActive) {
    const std::lock_guard<std::mutex> lock(counters_mutex);
    DeviceCounters& d = counter_arena(like.get_device(), stream, capture);
    had_arena = d.arena != nullptr;
    // eager launches: capture id 0 (cudaStreamGetCaptureInfo's id means something only during a capture)
    const unsigned long long id = capture.status == cudaStreamCaptureStatusActive ? capture.id : 0;
    const int64_t at = had_arena ? d.slices->slice(reinterpret_cast<uintptr_t>(stream), id, n) : -1;
    if (at >= 0) return d.arena + at;
  }
  if (capture.status == cudaStreamCaptureStatusActive) {
    TORCH_WARN_ONCE("awqlib: split-K launches captured in a CUDA graph zero their arrival counters per call (a memset "
                    "node each), because ",
                    had_arena ? "the device's counter arena is spent (one slice per captured stream)"
                              : "no awq_gemm call ran on this device outside capture before it "
                                "(warm up eagerly first)");
  }
  per_call = at::zeros({n}, like.options().dtype(at::kInt));
  return per_call.data_ptr<int32_t>();
}

// A switch read from the environment on every call: "0" is off, "1" on, unset or empty the
// default, anything else an error naming the variable.
bool env_flag(const char* name, bool unset = false) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return unset;  // empty like unset
  if (std::string(v) == "0") return false;
  TORCH_CHECK(std::string(v) == "1", name, " must be 0 or 1, got '", v, "'");
  return true;
}

// Programmatic dependent launch of the stream kernel (awq_stream.cu: grid_dependency_wait): its
// first stages' int4 weights stream in while the previous kernel in the stream finishes -- which
// only happens where that kernel lets it launch early (the block ops and the stream kernel do:
// allow_dependent_launch).  Opt-in with AWQLIB_STREAM_PDL=1: measured on an H200 it gained nothing
// (benchmarks/RESULTS.md, gpu_sweep and bench_generate of 2026-11-30: faster in 8 of 28 cells, the
// 8B decode step 3.90 -> 4.01 ms), in graphs where a counters memset sat before every stream launch
// and no block op let the next kernel start early; read per call, so that one process can time
// both.  sm_90+ only, and only when this call made no copy of qweight (a copy kernel would be the previous kernel, still
// writing what is prefetched); the repack that makes the stream layout synchronizes its stream
// (awqlib/packing.py: to_layout).
// Code that writes a stream-layout qweight otherwise must synchronize before the next call.
bool stream_pdl(int device, const at::Tensor& qweight_used, const at::Tensor& qweight_given) {
  return env_flag("AWQLIB_STREAM_PDL") && at::cuda::getDeviceProperties(device)->major >= 9 &&
         qweight_used.data_ptr() == qweight_given.data_ptr();
}

// The narrow stream kernels (awq_stream.cu: NARROW) at M <= 8: on unless AWQLIB_STREAM_NARROW=0.
// Measured on an H200 (benchmarks/RESULTS.md, gpu_sweep 2026-11-30) they beat the 16-row tiling
// in 7 of 8 cells at M <= 8 (geometric mean 1.07x; 2.71x fp16 against 2.40x on 70b-down at M = 1,
// with group sums) and take the 8B decode step from 3.90 to 3.66 ms; read per call, so that one
// process can time both.
bool stream_narrow() { return env_flag("AWQLIB_STREAM_NARROW", /*unset=*/true); }

// The deep configuration of the stream kernel (awq_stream.cu: kConfigDeep, a fourth stage at
// M <= 16 and 33-64) in place of the large one where the device has its 203-213 KB: opt-in with
// AWQLIB_STREAM_DEEP=1 until a GPU has timed it (benchmarks/gpu_sweep.py: stream:auto:deep).  Its
// arithmetic and partition are the large one's, so its outputs are the same bits.  Read per call.
bool stream_deep() { return env_flag("AWQLIB_STREAM_DEEP"); }

// The wide configuration of the stream kernel (awq_stream.cu: kConfigWide, 256-column slices: half
// the activation bytes per weight byte) in place of the large one where every pass has 17-64 rows
// (also where the large one does not fit: an A100 at 17-32): opt-in with
// AWQLIB_STREAM_WIDE=1 until a GPU has timed it (benchmarks/gpu_sweep.py: stream:wide).  Two
// k-warps add their partial sums instead of four, so its outputs differ from the large kernel's in
// fp32 rounding.  Read per call.
bool stream_wide() { return env_flag("AWQLIB_STREAM_WIDE"); }

// The warpgroup-mma configuration of the stream kernel (awq_stream.cu: kConfigWgmma; sm_90a) in
// place of the large and deep ones: opt-in with AWQLIB_STREAM_WGMMA=1 until a GPU has timed it
// (benchmarks/gpu_sweep.py: stream:wgmma).  Its tensor cores run asynchronously to the warps'
// dequantization (mma.sync waits for each), and it accumulates each output over the whole stage in
// one warpgroup instead of adding four k-warps' partial sums, so its outputs differ from the large
// kernel's in fp32 rounding.  Only where the build has sm_90a code and the device is sm_90 (an
// sm_90a kernel runs on nothing else: stream_wgmma_runs_on).  Read per call.
bool stream_wgmma_runs_on(int64_t major, int64_t minor) { return awq::stream_wgmma_built() && major == 9 && minor == 0; }

bool stream_wgmma(int device) {
  if (!env_flag("AWQLIB_STREAM_WGMMA")) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  return stream_wgmma_runs_on(prop->major, prop->minor);
}

// Shared memory a stream-kernel block may have: the device's opt-in maximum, or less with
// AWQLIB_STREAM_SMEM_LIMIT=<bytes> -- so that an H100/H200 can run (and test) the choice an A100
// (166912) or a 99 KB GPU (101376) makes.
int stream_smem_limit(int device) {
  const int optin = static_cast<int>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin);
  const char* v = std::getenv("AWQLIB_STREAM_SMEM_LIMIT");
  if (v == nullptr || *v == '\0') return optin;
  char* end = nullptr;
  errno = 0;
  const long limit = std::strtol(v, &end, 10);
  TORCH_CHECK(*end == '\0' && limit > 0 && errno == 0, "AWQLIB_STREAM_SMEM_LIMIT must be a positive number of bytes, got '",
              v, "'");
  return static_cast<int>(std::min<long>(limit, optin));
}

// awq_dispatch.h's choice for a call, the stream settings read (and checked) only for the stream
// layout; a forced kernel that cannot serve the call is refused here.
KernelChoice choose(const Shape& s, int64_t M, Kernel k, int device) {
  KernelChoice c = awq::choose_kernel(s.layout, M, s.N, s.K, s.group, k, [&] {
    awq::StreamSettings st;
    st.deep = stream_deep();
    st.wide = stream_wide();
    st.wgmma = stream_wgmma(device);
    st.smem_limit = stream_smem_limit(device);
    return st;
  });
  TORCH_CHECK(c.refusal.empty(), c.refusal);
  return c;
}

// The checks every awq_gemm_variant call gets, and the rows of its 2-D view.
int64_t check_call(const at::Tensor& x, const at::Tensor& qweight, const Shape& s, int64_t kernel, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(), "awq_gemm: x must be a CUDA tensor on the weight's device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "awq_gemm: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == s.K, "awq_gemm: x has ", num(x.size(-1)), " features, the weight expects ",
              num(s.K));
  TORCH_CHECK(awq::is_kernel(kernel), "awq_gemm_variant: unknown kernel ", num(kernel));
  TORCH_CHECK(splits >= 0 && splits < (int64_t(1) << 16), "awq_gemm_variant: splits must be in [0, 65535], got ",
              num(splits));
  return x.numel() / s.K;
}

// x W^T for awq_gemm_variant, plus `residual` (awq_gemm_add) where given: a tensor of the output's
// shape and dtype on its device, which the stream kernel adds in its epilogue and every other path
// adds after the GEMM (the same bits: the output rounded, then the sum rounded).
at::Tensor gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                int64_t group_size, int64_t kernel, int64_t splits, const at::Tensor* residual) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_gemm");
  const int64_t M = check_call(x, qweight, s, kernel, splits);
  const c10::cuda::CUDAGuard guard(x.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  if (M == 0 || s.N == 0)
    return residual ? residual->clone(at::MemoryFormat::Contiguous) : at::empty(out_shape, x.options());
  // off the stream kernel the residual is added after the GEMM, into its fresh contiguous output
  const auto add_residual = [&](at::Tensor out) { return residual ? out.add_(*residual) : out; };

  // The kernels compute in x's dtype; scales stored as fp16 are rounded to bf16 for bf16
  // activations, exactly like the reference implementation.
  const at::Tensor sc = contiguous_aligned(scales.scalar_type() == x.scalar_type() ? scales : scales.to(x.scalar_type()));
  const at::Tensor x2 = contiguous_aligned(x.reshape({M, s.K}));
  const at::Tensor qw = contiguous_aligned(qweight), qz = contiguous_aligned(qzeros);

  const int device = x.get_device();
  const int num_sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const KernelChoice choice = choose(s, M, static_cast<Kernel>(kernel), device);
  const Kernel k = choice.kernel;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const CaptureState capture = capture_state(stream);
  prepare_counters(device, stream, capture);
  if (k == kDequantCublas) return add_residual(dequant_matmul(x2, qw, qz, sc, s).view(out_shape));

  at::Tensor out = at::empty({M, s.N}, x.options());
  const int m = static_cast<int>(M), n = static_cast<int>(s.N), kk = static_cast<int>(s.K);
  const int so = static_cast<int>(splits);
  const int depth = k == kSkinnyShallow ? 2 : 4;  // register-ring depth of the skinny kernel
  const awq::DType dt = to_dtype(x.scalar_type());
  at::Tensor ws, per_call_counters;
  awq::GemmArgs a{};
  a.x = x2.data_ptr();
  a.qweight = qw.data_ptr<int32_t>();
  a.qzeros = qz.data_ptr<int32_t>();
  a.scales = sc.data_ptr();
  a.out = out.data_ptr();
  a.residual = nullptr;
  a.M = m;
  a.N = n;
  a.K = kk;
  a.group_size = static_cast<int>(s.group);
  if (k == kStream) {
    // Passes of `pass` rows (choose_stream), in order on this stream: they share the workspace and
    // the counters (each pass's last arrivers leave the counters zero for the next).  The partition
    // is the persistent grid's: one CTA per SM, or at most `splits` CTAs (a tuning knob: on small
    // shapes fewer CTAs split fewer slices, gpu_sweep's grid cases time it).
    const bool pdl = stream_pdl(device, qw, qweight);
    const bool narrow = stream_narrow();
    const awq::StreamConfig config = choice.stream.config;
    const bool group_sums = choice.stream.group_sums;
    const int pass = choice.stream.pass;
    const int64_t rest = M - (M - 1) / pass * pass;  // the last pass's rows
    const int ctas = so > 0 ? std::min(so, num_sms) : num_sms;
    const awq::StreamPlan full = awq::plan_stream(std::min(m, pass), n, kk, a.group_size, ctas, config);
    const awq::StreamPlan last = awq::plan_stream(static_cast<int>(rest), n, kk, a.group_size, ctas, config);
    const size_t ws_floats = std::max({full.workspace_floats, last.workspace_floats, size_t(1)});
    ws = at::empty({static_cast<int64_t>(ws_floats)}, x.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
    a.counters = counters_for(x, std::max(full.counters, last.counters), stream, capture, per_call_counters);
    // the residual as contiguous [M, N] rows, each pass's at the offset of its output rows
    const at::Tensor res = residual ? residual->reshape({M, s.N}).contiguous() : at::Tensor();
    const size_t x_pass_bytes = static_cast<size_t>(pass) * kk * x2.element_size();
    const size_t out_pass_bytes = static_cast<size_t>(pass) * n * out.element_size();
    for (int64_t r0 = 0; r0 < M; r0 += pass) {
      awq::GemmArgs p = a;
      p.M = static_cast<int>(std::min<int64_t>(pass, M - r0));
      p.x = static_cast<const char*>(a.x) + (r0 / pass) * x_pass_bytes;
      p.out = static_cast<char*>(a.out) + (r0 / pass) * out_pass_bytes;
      if (residual) p.residual = static_cast<const char*>(res.data_ptr()) + (r0 / pass) * out_pass_bytes;
      awq::launch_stream(dt, p, p.M == pass ? full : last, group_sums, pdl, narrow, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return out.view(out_shape);
  }
  const bool tiled = s.layout == Layout::kTiled;
  const awq::Plan plan = awq::plan_skinny(dt, m, n, kk, depth, tiled, num_sms, so);
  if (plan.splits > 1) {
    ws = at::empty({plan.splits, M, s.N}, x.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
    a.counters = counters_for(x, plan.tiles, stream, capture, per_call_counters);
  }
  a.splits = plan.splits;
  awq::launch_skinny(dt, a, depth, tiled, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return add_residual(out.view(out_shape));
}

at::Tensor awq_gemm_variant_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                 const at::Tensor& scales, int64_t group_size, int64_t kernel, int64_t splits) {
  return gemm(x, qweight, qzeros, scales, group_size, kernel, splits, nullptr);
}

// residual + x W^T: in the stream kernel's epilogue where the residual is a tensor of the output's
// shape and dtype on its device (a layer's residual add after its last linear), else the two ops.
at::Tensor awq_gemm_add_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                             const at::Tensor& scales, int64_t group_size, const at::Tensor& residual) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_gemm");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  if (!out_shape.empty()) out_shape.back() = s.N;
  const bool fused = residual.is_cuda() && residual.device() == x.device() &&
                     residual.scalar_type() == x.scalar_type() && residual.sizes().vec() == out_shape;
  if (!fused) return (residual + gemm(x, qweight, qzeros, scales, group_size, kAuto, 0, nullptr)).contiguous();
  return gemm(x, qweight, qzeros, scales, group_size, kAuto, 0, &residual);
}

at::Tensor awq_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, int64_t group_size) {
  return awq_gemm_variant_cuda(x, qweight, qzeros, scales, group_size, kAuto, 0);
}

// What awq_gemm_variant would launch for these arguments under the current settings, without
// launching it (awq_dispatch.h: kernel_name): the same choice and the same refusals.
std::string awq_gemm_kernel_name_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                      const at::Tensor& scales, int64_t group_size, int64_t kernel, int64_t splits) {
  const Shape s = check_weight(qweight, qzeros, scales, group_size, "awq_gemm");
  const int64_t M = check_call(x, qweight, s, kernel, splits);
  if (M == 0 || s.N == 0) return "none (empty)";
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelChoice choice = choose(s, M, static_cast<Kernel>(kernel), x.get_device());
  // the narrow setting only where a stream kernel is named (awq_gemm_variant reads it only there)
  const bool narrow = choice.kernel == awq::kStream && stream_narrow();
  return awq::kernel_name(to_dtype(x.scalar_type()), s.layout, M, s.N, s.K, s.group, choice, narrow);
}

}  // namespace

// A question about this library rather than a computation (its schema: awqlib/ops.py): whether
// AWQLIB_STREAM_WGMMA=1 runs the wgmma kernels on a GPU of this compute capability -- what
// awqlib.kernels.wgmma_available asks, so that Python does not restate the rule.  No tensor
// arguments, so no device to dispatch on: the composite key serves every call.
TORCH_LIBRARY_IMPL(awqlib, CompositeExplicitAutograd, m) {
  m.impl("stream_wgmma_runs_on", &stream_wgmma_runs_on);
}

TORCH_LIBRARY_IMPL(awqlib, CUDA, m) {
  m.impl("awq_gemm", &awq_gemm_cuda);
  m.impl("awq_dequantize", &awq_dequantize_cuda);
  m.impl("awq_gemm_variant", &awq_gemm_variant_cuda);
  m.impl("awq_gemm_add", &awq_gemm_add_cuda);
  m.impl("awq_gemm_kernel_name", &awq_gemm_kernel_name_cuda);
}

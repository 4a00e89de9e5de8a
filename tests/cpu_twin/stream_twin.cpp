// csrc/awq_stream.cu, compiled for the CPU (csrc/cpu_twin.h): its kernels run from their own
// source, with the launch plan of plan_stream/params_for and the instantiation stream_kernel_of
// picks -- what awq_ops.cpp would launch on a GPU.  Driven by tests/test_cpu_twin.py:
//
//   stream_twin gemm    DIR DTYPE M N K GROUP SMS SUMS COMPACT PDL TIMING ORDER
//   stream_twin dequant DIR DTYPE K N GROUP
//
// DIR holds the inputs as raw little-endian arrays (x.bin [M, K], qweight.bin, qzeros.bin,
// scales.bin in the stream layout) and receives out.bin ([M, N], or the dense W^T [K, N]).  DTYPE:
// fp16 | bf16; TIMING: lazy | eager (when cp.async data lands, cpu_twin.h); ORDER: forward |
// reverse (the order the CTAs run in, and the threads of a CTA between synchronisation points).  Exit status 0 and nothing on stderr, or 1 and the reason.
#include <cstdio>
#include <fstream>
#include <iterator>

#define AWQ_HOST_EMULATION 1
#include "awq_stream.cu"

namespace {

using awq_twin::Guarded;

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) awq_twin::fail("cannot read " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const uint8_t* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) awq_twin::fail("cannot write " + path);
}

// An input in guarded memory of exactly `bytes` (so reading past its end faults).
std::unique_ptr<Guarded> load(const std::string& dir, const char* name, size_t bytes) {
  const std::vector<uint8_t> v = read_file(dir + "/" + name);
  if (v.size() != bytes)
    awq_twin::fail(std::string(name) + ": " + std::to_string(v.size()) + " bytes, expected " + std::to_string(bytes));
  auto g = std::make_unique<Guarded>(bytes);
  std::memcpy(g->data(), v.data(), bytes);
  return g;
}

awq_twin::Range range(const Guarded& g) { return {g.data(), g.bytes()}; }

int to_int(const char* s) { return std::stoi(s); }

template <typename T, int MB, bool COMPACT>
void run_gemm(const std::string& dir, int M, int N, int K, int g, int sms, bool sums, bool pdl,
              awq_twin::CopyTiming timing, bool reverse) {
  using Cfg = awq::StreamCfg<MB, COMPACT>;
  const awq::StreamPlan plan = awq::plan_stream(M, N, K, g, sms, COMPACT);
  awq::StreamParams p = awq::params_for(M, N, K, g, plan.per, plan.grid, COMPACT);
  p.pdl = pdl;
  const auto kernel = awq::stream_kernel_of<T, MB, COMPACT>(p, sums);
  const size_t groups = static_cast<size_t>(K / g);
  auto x = load(dir, "x.bin", (size_t)M * K * sizeof(T));
  auto qw = load(dir, "qweight.bin", (size_t)K * N / 2);
  auto qz = load(dir, "qzeros.bin", groups * N / 2);
  auto sc = load(dir, "scales.bin", groups * N * sizeof(T));
  Guarded out((size_t)M * N * sizeof(T));
  std::memset(out.data(), 0xFF, out.bytes());  // NaN everywhere: every element must be written
  Guarded ws(std::max<size_t>(plan.workspace_floats, 1) * sizeof(float));
  std::memset(ws.data(), 0xFF, ws.bytes());
  Guarded counters(std::max(plan.counters, 1) * sizeof(int32_t));  // zero on entry, as awq_ops.cpp keeps them
  std::memset(counters.data(), 0, counters.bytes());

  awq_twin::Launch L;
  L.grid = dim3(plan.grid);
  L.block = dim3(awq::kStThreads);
  L.smem_bytes = Cfg::kSmemBytes;
  L.timing = timing;
  L.globals = {range(*x), range(*qw), range(*qz), range(*sc)};
  if (reverse) {
    for (int b = plan.grid - 1; b >= 0; --b) L.order.push_back(b);
    L.reverse_threads = true;
  }
  awq_twin::run_grid(L, [&] {
    kernel(reinterpret_cast<const T*>(x->data()), reinterpret_cast<const uint4*>(qw->data()),
           reinterpret_cast<const uint32_t*>(qz->data()), reinterpret_cast<const T*>(sc->data()),
           reinterpret_cast<T*>(out.data()), reinterpret_cast<float*>(ws.data()),
           reinterpret_cast<int32_t*>(counters.data()), p);
  });
  const auto* c = reinterpret_cast<const int32_t*>(counters.data());
  for (int i = 0; i < plan.counters; ++i)
    if (c[i] != 0) awq_twin::fail("counter " + std::to_string(i) + " is " + std::to_string(c[i]) + " after the launch");
  write_file(dir + "/out.bin", out.data(), (size_t)M * N * sizeof(T));
  std::printf("grid %d per %d slices %d max_parts %d smem %d\n", plan.grid, plan.per, plan.slices, p.max_parts,
              Cfg::kSmemBytes);
}

template <typename T>
void dispatch_gemm(const std::string& dir, int M, int N, int K, int g, int sms, bool sums, bool compact, bool pdl,
                   awq_twin::CopyTiming timing, bool reverse) {
  if (!awq::stream_supports(M, N, K, g, compact)) awq_twin::fail("stream_supports refuses this shape");
  const int mb = awq::mb_for(M);
  if (compact) {
    if (mb == 1) run_gemm<T, 1, true>(dir, M, N, K, g, sms, sums, pdl, timing, reverse);
    else run_gemm<T, 2, true>(dir, M, N, K, g, sms, sums, pdl, timing, reverse);
  } else {
    if (mb == 1) run_gemm<T, 1, false>(dir, M, N, K, g, sms, sums, pdl, timing, reverse);
    else if (mb == 2) run_gemm<T, 2, false>(dir, M, N, K, g, sms, sums, pdl, timing, reverse);
    else run_gemm<T, 4, false>(dir, M, N, K, g, sms, sums, pdl, timing, reverse);
  }
}

template <typename T>
void run_dequant(const std::string& dir, int K, int N, int g) {
  const size_t groups = static_cast<size_t>(K / g);
  auto qw = load(dir, "qweight.bin", (size_t)K * N / 2);
  auto qz = load(dir, "qzeros.bin", groups * N / 2);
  auto sc = load(dir, "scales.bin", groups * N * sizeof(T));
  Guarded out((size_t)K * N * sizeof(T));
  constexpr int kThreads = 256;  // launch_dequant_stream's block
  const size_t threads = (size_t)(N / 64) * (K / 16) * 32;
  awq_twin::Launch L;
  L.grid = dim3(static_cast<unsigned>((threads + kThreads - 1) / kThreads));
  L.block = dim3(kThreads);
  L.smem_bytes = 0;
  L.timing = awq_twin::CopyTiming::kLazy;
  L.stack_bytes = 64 * 1024;
  awq_twin::run_grid(L, [&] {
    awq::awq_dequant_stream_kernel<T>(reinterpret_cast<const uint4*>(qw->data()),
                                      reinterpret_cast<const uint32_t*>(qz->data()),
                                      reinterpret_cast<const T*>(sc->data()), reinterpret_cast<T*>(out.data()), K, N, g);
  });
  write_file(dir + "/out.bin", out.data(), out.bytes());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 3) awq_twin::fail("usage: stream_twin gemm|dequant DIR ...");
    const std::string kind = argv[1], dir = argv[2];
    if (kind == "gemm" && argc == 14) {
      const std::string dt = argv[3];
      const int M = to_int(argv[4]), N = to_int(argv[5]), K = to_int(argv[6]), g = to_int(argv[7]),
                sms = to_int(argv[8]);
      const bool sums = to_int(argv[9]), compact = to_int(argv[10]), pdl = to_int(argv[11]);
      const std::string timing = argv[12], order = argv[13];
      const auto t = timing == "eager" ? awq_twin::CopyTiming::kEager : awq_twin::CopyTiming::kLazy;
      if (dt == "fp16") dispatch_gemm<__half>(dir, M, N, K, g, sms, sums, compact, pdl, t, order == "reverse");
      else dispatch_gemm<__nv_bfloat16>(dir, M, N, K, g, sms, sums, compact, pdl, t, order == "reverse");
    } else if (kind == "dequant" && argc == 7) {
      const std::string dt = argv[3];
      const int K = to_int(argv[4]), N = to_int(argv[5]), g = to_int(argv[6]);
      if (dt == "fp16") run_dequant<__half>(dir, K, N, g);
      else run_dequant<__nv_bfloat16>(dir, K, N, g);
    } else {
      awq_twin::fail("bad arguments");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

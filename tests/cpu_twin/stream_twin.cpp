// csrc/awq_stream.cu, compiled for the CPU (csrc/cpu_twin.h): its kernels run from their own
// source, launched as launch_stream / launch_dequant_stream describe them (describe_stream:
// plan_stream's plan, params_for's parameters, the instantiation describe_mb picks, the
// geometry).  Driven by tests/test_cpu_twin.py:
//
//   stream_twin gemm    DIR DTYPE M N K GROUP SMS SUMS CONFIG PDL NARROW TIMING ORDER
//   stream_twin dequant DIR DTYPE K N GROUP
//   stream_twin choose  -   (queries on stdin, one per line, answers on stdout)
//   stream_twin dispatch -  (the same)
//   stream_twin slices CAPACITY  (the same)
//
// DIR holds the inputs as raw little-endian arrays (x.bin [M, K], qweight.bin, qzeros.bin,
// scales.bin in the stream layout; residual.bin [M, N] where the epilogue adds one) and receives out.bin ([M, N], or the dense W^T [K, N]).  DTYPE:
// fp16 | bf16; TIMING: lazy | eager (when cp.async data lands, cpu_twin.h); ORDER: forward |
// reverse (the CTAs' order, the warps' order, and which end of every buffer touches its guard
// page); CONFIG: 0 large, 1 compact, 2 deep, 3 wgmma, 4 wide (awq::StreamConfig); NARROW: 1 asks for the narrow
// kernels (M <= 8).  Prints the launch (grid, units per CTA,
// the ring refills the plan makes), the weight bytes the kernel read and the warp mmas it ran;
// exit status 0, or 1 and the reason on stderr (3 for a memory fault).
// choose: awq_ops.cpp's choice for a stream-layout weight (choose_stream: which configuration, rows
// per launch, group sums, or dequantize + cuBLAS, or the refusal), the instantiations its first and
// last launches run (stream_kernel_name) and the first launch's persistent grid (plan_stream).  A
// query: DTYPE M N K GROUP SMEM_LIMIT AUTOMATIC COMPACT SUMS DEEP WIDE WGMMA NARROW SMS (the
// StreamRequest, the narrow setting, the CTAs the grid may have); an answer: "stream CONFIG PASS
// SUMS FIRST | LAST | GRID PER", "dequant", or "refused MESSAGE".  The static shared memory is
// counted at its bound (kStaticSmemAllowance, 2 KB; the GPU's is 1040 B on sm_90), so a limit set
// within ~1 KB of a configuration's need can be refused here and run on a GPU, never the reverse.
// dispatch: the whole choice of awq_ops.cpp (awq_dispatch.h: choose_kernel) for any layout and
// kernel id, and the name of the first launch's kernel (kernel_name, what the awq_gemm_kernel_name
// op answers).  A query: DTYPE LAYOUT M N K GROUP KERNEL SMEM_LIMIT DEEP WIDE WGMMA NARROW, LAYOUT gemm |
// tiled | stream, KERNEL an awqlib.ops.Kernel id; an answer: READ and the name, or READ "refused
// MESSAGE", READ the number of times the choice asked for the stream settings (awq_ops.cpp reads
// AWQLIB_STREAM_* then, and refuses an invalid one).
// slices: which part of a device's arena of CAPACITY counters a captured launch uses
// (awq_counters.h, what awq_ops.cpp counters_for asks).  A query: STREAM CAPTURE N; an answer: the
// offset, or -1 where the arena has no room for it.
#include <cstdio>
#include <iostream>

#define AWQ_HOST_EMULATION 1
#include "awq_stream.cu"
#include "awq_counters.h"
#include "awq_dispatch.h"
#include "twin_files.h"

namespace {

using awq_twin::Guarded;
using awq_twin::Placement;

using twin_files::read_file;
using twin_files::write_file;

// An input file in guarded memory of exactly its size.
std::unique_ptr<Guarded> load(const std::string& dir, const char* name, size_t bytes, Placement at) {
  const std::vector<uint8_t> v = read_file(dir + "/" + name);
  if (v.size() != bytes)
    awq_twin::fail(std::string(name) + ": " + std::to_string(v.size()) + " bytes, expected " + std::to_string(bytes));
  auto g = std::make_unique<Guarded>(name, bytes, at);
  std::memcpy(g->data(), v.data(), bytes);
  return g;
}

int to_int(const char* s) { return std::stoi(s); }

// The quantized weight in the stream layout: qweight, qzeros, scales (T) of a K x N weight.
struct Weight {
  std::unique_ptr<Guarded> qweight, qzeros, scales;
};

template <typename T>
Weight load_weight(const std::string& dir, int K, int N, int g, Placement at) {
  const size_t groups = static_cast<size_t>(K / g);
  return {load(dir, "qweight.bin", (size_t)K * N / 2, at), load(dir, "qzeros.bin", groups * N / 2, at),
          load(dir, "scales.bin", groups * N * sizeof(T), at)};
}

template <typename T>
void run_gemm(const std::string& dir, int M, int N, int K, int g, int sms, bool sums, awq::StreamConfig config,
              bool pdl, bool narrow, bool eager, bool reverse) {
  if (!awq::stream_supports(M, N, K, g, config)) awq_twin::fail("stream_supports refuses this shape");
  const awq::StreamPlan plan = awq::plan_stream(M, N, K, g, sms, config);
  const awq::StreamLaunch<T> d = awq::describe_stream<T>(M, N, K, g, plan, sums, pdl, narrow);
  const Placement at = reverse ? Placement::kAtStart : Placement::kAtEnd;
  auto x = load(dir, "x.bin", (size_t)M * K * sizeof(T), at);
  const Weight w = load_weight<T>(dir, K, N, g, at);
  const Guarded &qw = *w.qweight, &qz = *w.qzeros, &sc = *w.scales;
  Guarded out("out", (size_t)M * N * sizeof(T), at);
  std::memset(out.data(), 0xFF, out.bytes());  // NaN everywhere: every element must be written
  // residual.bin, where given: added to the output in the epilogue (awq_gemm_add)
  const bool has_residual = std::ifstream(dir + "/residual.bin").good();
  auto residual = has_residual ? load(dir, "residual.bin", (size_t)M * N * sizeof(T), at) : nullptr;
  Guarded ws("the workspace", std::max<size_t>(plan.workspace_floats, 1) * sizeof(float), at);
  std::memset(ws.data(), 0xFF, ws.bytes());
  Guarded counters("the counters", std::max(plan.counters, 1) * sizeof(int32_t), at);
  std::memset(counters.data(), 0, counters.bytes());  // zero on entry, as awq_ops.cpp keeps them

  awq_twin::Launch L;
  L.grid = dim3(d.grid);
  L.block = dim3(d.block);
  L.smem_bytes = d.smem_bytes;
  L.eager_copies = eager;
  L.globals = {awq_twin::range(*x), awq_twin::range(qw), awq_twin::range(qz), awq_twin::range(sc)};
  L.pdl.on = d.p.pdl != 0;
  L.pdl.inputs = {awq_twin::range(*x), awq_twin::range(qz), awq_twin::range(sc)};  // not the weights
  if (has_residual) L.pdl.inputs.push_back(awq_twin::range(*residual));
  L.pdl.outputs = {awq_twin::range(out), awq_twin::range(ws), awq_twin::range(counters)};
  L.reversed = reverse;
  if (reverse)
    for (int b = d.grid - 1; b >= 0; --b) L.order.push_back(b);
  awq_twin::run_grid(L, [&] {
    d.kernel(reinterpret_cast<const T*>(x->data()), reinterpret_cast<const uint4*>(qw.data()),
             reinterpret_cast<const uint32_t*>(qz.data()), reinterpret_cast<const T*>(sc.data()),
             reinterpret_cast<T*>(out.data()), has_residual ? reinterpret_cast<const T*>(residual->data()) : nullptr,
             reinterpret_cast<float*>(ws.data()), reinterpret_cast<int32_t*>(counters.data()), d.p);
  });
  const auto* c = reinterpret_cast<const int32_t*>(counters.data());
  for (int i = 0; i < plan.counters; ++i)
    if (c[i] != 0) awq_twin::fail("counter " + std::to_string(i) + " is " + std::to_string(c[i]) + " after the launch");
  write_file(dir + "/out.bin", out.data(), out.bytes());
  // What the plan makes the kernel do beyond its prologue (planned_refills: units its CTAs stream
  // after the stages the prologue loads -- the ring's steady state), and what the kernel did read:
  // every weight byte exactly once (weight_bytes_read against K N / 2).
  const int ahead = awq::load_ahead_for(awq::mb_for(M, config), config);
  int refills = 0;
  for (int b = 0; b < d.grid; ++b) refills += std::max(0, std::min(plan.per, d.p.units - b * plan.per) - ahead);
  std::printf("grid %d per %d units %d slices %d max_parts %d smem %d planned_refills %d weight_bytes_read %zu "
              "warp_mmas %zu stage_k %d m_tiles %d\n",
              d.grid, plan.per, d.p.units, plan.slices, d.p.max_parts, d.smem_bytes, refills,
              awq_twin::g_bytes_copied_from[1], awq_twin::g_warp_mmas, awq::stage_k_for(M, config), awq::mb_for(M, config));
}

template <typename T>
void run_dequant(const std::string& dir, int K, int N, int g) {
  const Weight w = load_weight<T>(dir, K, N, g, Placement::kAtEnd);
  Guarded out("out", (size_t)K * N * sizeof(T));
  awq_twin::Launch L;
  L.grid = dim3(awq::dequant_stream_blocks(K, N));
  L.block = dim3(awq::kDequantStreamThreads);
  L.smem_bytes = 0;
  awq_twin::run_grid(L, [&] {
    awq::awq_dequant_stream_kernel<T>(reinterpret_cast<const uint4*>(w.qweight->data()),
                                      reinterpret_cast<const uint32_t*>(w.qzeros->data()),
                                      reinterpret_cast<const T*>(w.scales->data()), reinterpret_cast<T*>(out.data()),
                                      K, N, g);
  });
  write_file(dir + "/out.bin", out.data(), out.bytes());
}

void run_choose() {
  std::string dt;
  long long M;
  int N, K, g, limit, automatic, compact, sums, deep, wide, wgmma, narrow, sms;
  while (std::cin >> dt >> M >> N >> K >> g >> limit >> automatic >> compact >> sums >> deep >> wide >> wgmma >>
         narrow >> sms) {
    if (dt != "fp16" && dt != "bf16") awq_twin::fail("DTYPE is fp16|bf16");
    if (M < 1 || N < 1 || K < 1 || g < 1 || sms < 1) awq_twin::fail("choose: M, N, K, GROUP and SMS are positive");
    awq::StreamRequest r;
    r.automatic = automatic, r.compact = compact, r.group_sums = sums, r.deep = deep, r.wide = wide, r.wgmma = wgmma;
    r.smem_limit = limit;
    const awq::StreamChoice c = awq::choose_stream(M, N, K, g, r);
    if (c.kind == awq::StreamChoice::kDequantCublas) {
      std::printf("dequant\n");
    } else if (c.kind == awq::StreamChoice::kRefused) {
      std::printf("refused %s\n", c.refusal.c_str());
    } else {
      const awq::DType type = dt == "fp16" ? awq::DType::kHalf : awq::DType::kBFloat16;
      const int rows = static_cast<int>(std::min<long long>(M, c.pass));
      const int last = static_cast<int>(M - (M - 1) / c.pass * c.pass);
      const std::string first_name = awq::stream_kernel_name(type, rows, N, K, g, c.config, c.group_sums, narrow);
      const std::string last_name = awq::stream_kernel_name(type, last, N, K, g, c.config, c.group_sums, narrow);
      const awq::StreamPlan plan = awq::plan_stream(rows, N, K, g, sms, c.config);
      std::printf("stream %d %d %d %s | %s | %d %d\n", int(c.config), c.pass, int(c.group_sums), first_name.c_str(),
                  last_name.c_str(), plan.grid, plan.per);
    }
  }
  if (!std::cin.eof())
    awq_twin::fail("choose: a query is DTYPE M N K GROUP SMEM_LIMIT AUTOMATIC COMPACT SUMS DEEP WIDE WGMMA NARROW SMS");
}

void run_dispatch() {
  std::string dt, layout_name;
  long long M, N, K, g;
  int kernel, limit, deep, wide, wgmma, narrow;
  while (std::cin >> dt >> layout_name >> M >> N >> K >> g >> kernel >> limit >> deep >> wide >> wgmma >> narrow) {
    if (dt != "fp16" && dt != "bf16") awq_twin::fail("DTYPE is fp16|bf16");
    if (M < 1 || N < 1 || K < 1 || g < 1 || K % g) awq_twin::fail("dispatch: M, N, K, GROUP positive, K % GROUP == 0");
    if (kernel < 0) awq_twin::fail("dispatch: KERNEL is a non-negative id (choose_kernel refuses unknown ones)");
    if ((deep | wide | wgmma | narrow) & ~1) awq_twin::fail("dispatch: DEEP, WIDE, WGMMA and NARROW are 0 or 1");
    const awq::Layout layout = layout_name == "gemm"    ? awq::Layout::kGemm
                               : layout_name == "tiled" ? awq::Layout::kTiled
                               : layout_name == "stream"
                                   ? awq::Layout::kStream
                                   : (awq_twin::fail("LAYOUT is gemm|tiled|stream"), awq::Layout::kGemm);
    int reads = 0;
    const awq::KernelChoice c =
        awq::choose_kernel(layout, M, N, K, g, static_cast<awq::Kernel>(kernel), [&] {
          ++reads;
          awq::StreamSettings st;
          st.deep = deep, st.wide = wide, st.wgmma = wgmma, st.smem_limit = limit;
          return st;
        });
    if (!c.refusal.empty()) std::printf("%d refused %s\n", reads, c.refusal.c_str());
    else std::printf("%d %s\n", reads, awq::kernel_name(dt == "fp16" ? awq::DType::kHalf : awq::DType::kBFloat16, layout,
                                                         M, N, K, g, c, narrow).c_str());
  }
  if (!std::cin.eof())
    awq_twin::fail("dispatch: a query is DTYPE LAYOUT M N K GROUP KERNEL SMEM_LIMIT DEEP WIDE WGMMA NARROW");
}

void run_slices(long long capacity) {
  if (capacity < 0) awq_twin::fail("slices: CAPACITY is a count of counters");
  awq::CounterSlices slices(capacity);
  unsigned long long stream, capture;
  long long n;
  while (std::cin >> stream >> capture >> n) std::printf("%lld\n", static_cast<long long>(slices.slice(stream, capture, n)));
  if (!std::cin.eof()) awq_twin::fail("slices: a query is STREAM CAPTURE N");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 3) awq_twin::fail("usage: stream_twin gemm|dequant DIR ...");
    const std::string kind = argv[1], dir = argv[2];
    if (kind == "gemm" && argc == 15) {
      const std::string dt = argv[3], timing = argv[13], order = argv[14];
      const int M = to_int(argv[4]), N = to_int(argv[5]), K = to_int(argv[6]), g = to_int(argv[7]),
                sms = to_int(argv[8]);
      const bool sums = to_int(argv[9]), pdl = to_int(argv[11]), narrow = to_int(argv[12]);
      const int config_arg = to_int(argv[10]);
      if ((timing != "lazy" && timing != "eager") || (order != "forward" && order != "reverse"))
        awq_twin::fail("TIMING is lazy|eager, ORDER forward|reverse");
      if (config_arg != awq::kConfigLarge && config_arg != awq::kConfigCompact && config_arg != awq::kConfigDeep &&
          config_arg != awq::kConfigWgmma && config_arg != awq::kConfigWide)
        awq_twin::fail("CONFIG is 0 (large), 1 (compact), 2 (deep), 3 (wgmma) or 4 (wide)");
      const auto config = static_cast<awq::StreamConfig>(config_arg);
      const bool eager = timing == "eager", reverse = order == "reverse";
      if (dt == "fp16") run_gemm<__half>(dir, M, N, K, g, sms, sums, config, pdl, narrow, eager, reverse);
      else if (dt == "bf16") run_gemm<__nv_bfloat16>(dir, M, N, K, g, sms, sums, config, pdl, narrow, eager, reverse);
      else awq_twin::fail("DTYPE is fp16|bf16");
    } else if (kind == "choose" && argc == 3) {
      run_choose();
    } else if (kind == "dispatch" && argc == 3) {
      run_dispatch();
    } else if (kind == "slices" && argc == 3) {
      run_slices(std::stoll(dir));
    } else if (kind == "dequant" && argc == 7) {
      const std::string dt = argv[3];
      const int K = to_int(argv[4]), N = to_int(argv[5]), g = to_int(argv[6]);
      if (dt == "fp16") run_dequant<__half>(dir, K, N, g);
      else if (dt == "bf16") run_dequant<__nv_bfloat16>(dir, K, N, g);
      else awq_twin::fail("DTYPE is fp16|bf16");
    } else {
      awq_twin::fail("bad arguments");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

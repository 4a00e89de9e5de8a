// csrc/awq_block_ops.cu's kernels, compiled for the CPU (csrc/cpu_twin.h) and launched with the
// geometry its host code gives them.  Driven by tests/test_cpu_twin_block_ops.py:
//
//   block_ops_twin rms_norm DIR DTYPE ORDER rows= hidden= group=warp|cta vec= scale_fp32= eps= offset= add=0|1
//   block_ops_twin rotary   DIR DTYPE ORDER vec= unsqueeze_dim= head_dim= rot_dim= {q,k}_{rows,d1,d2,s0,s1,s2}=
//                           cos_sb= cos_ss= sin_sb= sin_ss=
//   block_ops_twin gated    DIR DTYPE ORDER rows= features= gate_stride= up_stride= vec= act=silu|gelu_tanh
//
// DIR holds the inputs as raw little-endian arrays, each exactly the span of memory the kernel may
// read (a strided view's first to last element): x.bin, w.bin (and with add=1 residual.bin: add_rms_norm) | q.bin, k.bin, cos.bin, sin.bin |
// gate.bin, up.bin; it receives out.bin (and with add=1 sum.bin) | q_out.bin, k_out.bin.  Strides are in elements.  DTYPE:
// fp16 | bf16 | fp32; ORDER: forward | reverse (the CTAs' and warps' order, and which end of every
// buffer touches its guard page).  Outputs start as NaN, so an element never written shows.
// Exit status 0, or 1 and the reason on stderr (3 for a memory fault).
#include <cstdio>
#include <map>

#define AWQ_HOST_EMULATION 1
#include "awq_block_ops.cu"
#include "twin_files.h"

namespace {

using awq_twin::Guarded;
using awq_twin::Placement;

using twin_files::read_file;

void write_file(const std::string& path, const Guarded& g) { twin_files::write_file(path, g.data(), g.bytes()); }

std::unique_ptr<Guarded> load(const std::string& dir, const std::string& name, Placement at) {
  const std::vector<uint8_t> v = read_file(dir + "/" + name);
  auto g = std::make_unique<Guarded>(name, std::max<size_t>(v.size(), 1), at);
  std::memcpy(g->data(), v.data(), v.size());
  return g;
}

std::unique_ptr<Guarded> output(const std::string& name, size_t bytes, Placement at) {
  auto g = std::make_unique<Guarded>(name, std::max<size_t>(bytes, 1), at);
  std::memset(g->data(), 0xff, g->bytes());  // NaN in fp16, bf16 and fp32
  return g;
}

struct Args {
  std::map<std::string, std::string> kv;
  long long num(const std::string& k) const {
    const auto it = kv.find(k);
    if (it == kv.end()) awq_twin::fail("missing argument " + k + "=");
    return std::stoll(it->second);
  }
  std::string str(const std::string& k) const {
    const auto it = kv.find(k);
    if (it == kv.end()) awq_twin::fail("missing argument " + k + "=");
    return it->second;
  }
};

void check_vec_aligned(bool vec, std::initializer_list<const Guarded*> buffers) {
  if (!vec) return;
  for (const Guarded* g : buffers)
    if (reinterpret_cast<uintptr_t>(g->data()) % kVecBytes)
      awq_twin::fail(g->name() + " is not 16-byte aligned in the guarded buffer (its size is not a multiple of 16)");
}

awq_twin::Launch launch(unsigned blocks, int threads, bool reverse) {
  awq_twin::Launch L;
  L.grid = dim3(blocks);
  L.block = dim3(threads);
  L.smem_bytes = 0;
  L.reversed = reverse;
  if (reverse)
    for (int b = static_cast<int>(blocks) - 1; b >= 0; --b) L.order.push_back(static_cast<unsigned>(b));
  return L;
}

// As rms_norm_cuda (add=0) or add_rms_norm_cuda (add=1) launches it: a warp per row
// (kNormWarpRowsPerBlock rows per CTA) or a CTA per row.
template <typename T, int kGroup, int kBlock, bool kVec, bool kAdd>
void rms_norm_case(const std::string& dir, const Args& a, bool reverse, Placement at) {
  const long long rows = a.num("rows");
  const int hidden = static_cast<int>(a.num("hidden"));
  const size_t bytes = static_cast<size_t>(rows) * hidden * sizeof(T);
  auto x = load(dir, "x.bin", at), w = load(dir, "w.bin", at);
  auto r = kAdd ? load(dir, "residual.bin", at) : nullptr;
  auto out = output("out", bytes, at);
  auto sum = kAdd ? output("sum", bytes, at) : nullptr;
  check_vec_aligned(kVec, {x.get(), w.get(), out.get()});
  if (kAdd) check_vec_aligned(kVec, {r.get(), sum.get()});
  const bool fp32 = a.num("scale_fp32") != 0;
  const float eps = std::stof(a.str("eps")), offset = std::stof(a.str("offset"));
  constexpr int kRows = kBlock / kGroup;
  const auto L = launch(static_cast<unsigned>((rows + kRows - 1) / kRows), kBlock, reverse);
  const auto* xp = reinterpret_cast<const T*>(x->data());
  const auto* rp = kAdd ? reinterpret_cast<const T*>(r->data()) : nullptr;
  const auto* wp = reinterpret_cast<const T*>(w->data());
  auto* op = reinterpret_cast<T*>(out->data());
  auto* sp = kAdd ? reinterpret_cast<T*>(sum->data()) : nullptr;
  awq_twin::run_grid(L, [&] {
    if (fp32) awq_rms_norm_kernel<T, kGroup, kBlock, kVec, true, kAdd>(xp, rp, wp, op, sp, rows, hidden, eps, offset);
    else awq_rms_norm_kernel<T, kGroup, kBlock, kVec, false, kAdd>(xp, rp, wp, op, sp, rows, hidden, eps, offset);
  });
  write_file(dir + "/out.bin", *out);
  if (kAdd) write_file(dir + "/sum.bin", *sum);
}

template <typename T, bool kAdd>
void rms_norm_as(const std::string& dir, const Args& a, bool reverse, Placement at) {
  const bool vec = a.num("vec") != 0, warp = a.str("group") == "warp";
  constexpr int kWarpBlock = kWarpLanes * kNormWarpRowsPerBlock;
  if (warp && vec) rms_norm_case<T, kWarpLanes, kWarpBlock, true, kAdd>(dir, a, reverse, at);
  else if (warp) rms_norm_case<T, kWarpLanes, kWarpBlock, false, kAdd>(dir, a, reverse, at);
  else if (vec) rms_norm_case<T, kNormBlockThreads, kNormBlockThreads, true, kAdd>(dir, a, reverse, at);
  else rms_norm_case<T, kNormBlockThreads, kNormBlockThreads, false, kAdd>(dir, a, reverse, at);
}

template <typename T>
void rms_norm(const std::string& dir, const Args& a, bool reverse, Placement at) {
  if (a.num("add") != 0) rms_norm_as<T, true>(dir, a, reverse, at);
  else rms_norm_as<T, false>(dir, a, reverse, at);
}

RotaryTensor rotary_tensor(const Args& a, const std::string& p, const Guarded& in, const Guarded& out) {
  return {in.data(), out.data(), static_cast<uint32_t>(a.num(p + "_rows")), static_cast<uint32_t>(a.num(p + "_d1")),
          static_cast<uint32_t>(a.num(p + "_d2")), a.num(p + "_s0"), a.num(p + "_s1"), a.num(p + "_s2")};
}

// As rotary_cuda fills RotaryArgs and launches.
template <typename T>
void rotary(const std::string& dir, const Args& a, bool reverse, Placement at) {
  const bool vec = a.num("vec") != 0;
  const int e = vec ? kVecBytes / static_cast<int>(sizeof(T)) : 1;
  RotaryArgs r{};
  r.seq_dim = rotary_seq_dim(a.num("unsqueeze_dim"));
  r.head_dim = static_cast<int>(a.num("head_dim"));
  r.rot_dim = static_cast<int>(a.num("rot_dim"));
  auto q = load(dir, "q.bin", at), k = load(dir, "k.bin", at);
  auto cos = load(dir, "cos.bin", at), sin = load(dir, "sin.bin", at);
  auto q_out = output("q_out", static_cast<size_t>(a.num("q_rows")) * r.head_dim * sizeof(T), at);
  auto k_out = output("k_out", static_cast<size_t>(a.num("k_rows")) * r.head_dim * sizeof(T), at);
  check_vec_aligned(vec, {q.get(), k.get(), cos.get(), sin.get(), q_out.get(), k_out.get()});
  r.q = rotary_tensor(a, "q", *q, *q_out);
  r.k = rotary_tensor(a, "k", *k, *k_out);
  r.cos = cos->data();
  r.sin = sin->data();
  r.cos_stride_b = a.num("cos_sb");
  r.cos_stride_s = a.num("cos_ss");
  r.sin_stride_b = a.num("sin_sb");
  r.sin_stride_s = a.num("sin_ss");
  r.units_per_row = static_cast<uint32_t>(r.rot_dim / 2 / e + (r.head_dim - r.rot_dim) / e);
  r.units = (r.q.rows + r.k.rows) * r.units_per_row;
  const auto L = launch((r.units + kRotaryThreads - 1) / kRotaryThreads, kRotaryThreads, reverse);
  awq_twin::run_grid(L, [&] {
    if (vec) awq_rotary_kernel<T, true>(r);
    else awq_rotary_kernel<T, false>(r);
  });
  write_file(dir + "/q_out.bin", *q_out);
  write_file(dir + "/k_out.bin", *k_out);
}

// As gated_act_cuda launches it.
template <typename T>
void gated(const std::string& dir, const Args& a, bool reverse, Placement at) {
  const bool vec = a.num("vec") != 0, silu = a.str("act") == "silu";
  const int e = vec ? kVecBytes / static_cast<int>(sizeof(T)) : 1;
  const long long rows = a.num("rows"), gs = a.num("gate_stride"), us = a.num("up_stride");
  const int features = static_cast<int>(a.num("features"));
  auto g = load(dir, "gate.bin", at), u = load(dir, "up.bin", at);
  auto out = output("out", static_cast<size_t>(rows) * features * sizeof(T), at);
  check_vec_aligned(vec, {g.get(), u.get(), out.get()});
  const auto units_per_row = static_cast<uint32_t>(features / e);
  const auto units = static_cast<uint32_t>(rows) * units_per_row;
  const auto L = launch((units + kGatedThreads - 1) / kGatedThreads, kGatedThreads, reverse);
  const auto* gp = reinterpret_cast<const T*>(g->data());
  const auto* up = reinterpret_cast<const T*>(u->data());
  auto* op = reinterpret_cast<T*>(out->data());
  awq_twin::run_grid(L, [&] {
    if (vec && silu) awq_gated_act_kernel<T, true, kActSilu>(gp, up, op, gs, us, features, units_per_row, units);
    else if (vec) awq_gated_act_kernel<T, true, kActGeluTanh>(gp, up, op, gs, us, features, units_per_row, units);
    else if (silu) awq_gated_act_kernel<T, false, kActSilu>(gp, up, op, gs, us, features, units_per_row, units);
    else awq_gated_act_kernel<T, false, kActGeluTanh>(gp, up, op, gs, us, features, units_per_row, units);
  });
  write_file(dir + "/out.bin", *out);
}

template <typename T>
void run(const std::string& op, const std::string& dir, const Args& a, bool reverse) {
  const Placement at = reverse ? Placement::kAtStart : Placement::kAtEnd;
  if (op == "rms_norm") rms_norm<T>(dir, a, reverse, at);
  else if (op == "rotary") rotary<T>(dir, a, reverse, at);
  else if (op == "gated") gated<T>(dir, a, reverse, at);
  else awq_twin::fail("unknown op " + op + " (rms_norm, rotary, gated)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 5) awq_twin::fail("usage: block_ops_twin OP DIR DTYPE ORDER key=value...");
    const std::string op = argv[1], dir = argv[2], dtype = argv[3], order = argv[4];
    if (order != "forward" && order != "reverse") awq_twin::fail("ORDER is forward or reverse, got " + order);
    Args a;
    for (int i = 5; i < argc; ++i) {
      const std::string s = argv[i];
      const size_t eq = s.find('=');
      if (eq == std::string::npos) awq_twin::fail("expected key=value, got " + s);
      a.kv[s.substr(0, eq)] = s.substr(eq + 1);
    }
    const bool reverse = order == "reverse";
    if (dtype == "fp16") run<__half>(op, dir, a, reverse);
    else if (dtype == "bf16") run<__nv_bfloat16>(op, dir, a, reverse);
    else if (dtype == "fp32") run<float>(op, dir, a, reverse);
    else awq_twin::fail("DTYPE is fp16, bf16 or fp32, got " + dtype);
    std::printf("ok\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

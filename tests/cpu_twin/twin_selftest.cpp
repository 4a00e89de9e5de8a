// Checks of csrc/cpu_twin.h itself, each a tiny kernel (tests/test_cpu_twin.py):
//
//   twin_selftest mma          ldmatrix.x4 + mma.m16n8k16 give A @ B for a known A, B (fp16 and
//                              bf16): the two fragment layouts agree with each other and the matmul
//   twin_selftest wgmma        wgmma m64nNk16 (N 16 and 128, fp16 and bf16) gives A @ B with A placed
//                              in registers and B in 128-byte-swizzled shared memory as the PTX ISA
//                              describes them (written here from the ISA, not from the kernel), read
//                              back at the ISA's accumulator positions
//   twin_selftest lazy         a cp.async lands only at the wait_group that covers it
//   twin_selftest deadlock     a barrier and a warp collective that can never complete: reported
//   twin_selftest smem_bounds  a cp.async past the dynamic shared memory: reported
//   twin_selftest global_bounds  a cp.async from outside every input: reported
//   twin_selftest race         two warps change one shared byte between the same two barriers
//   twin_selftest pdl_read     a cp.async from a dependent input before griddepcontrol.wait
//   twin_selftest pdl_write    an output written before griddepcontrol.wait
//   twin_selftest divergent    lanes of a warp at different collective instructions
//   twin_selftest underrun     a store before the start of a buffer: the fault names it (exit 3)
//
// Prints "ok" (exit 0) or the failure the twin reported (exit 1).
#include <cmath>
#include <cstdio>
#include <map>
#include <string>

#define AWQ_HOST_EMULATION 1
#include "awq_common.cuh"

namespace {

using awq_twin::Guarded;

template <typename T>
uint16_t bits_of(float v) {
  T h = awq::Traits<T>::from_float(v);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// One warp: A [16x16] row-major in shared memory through ldmatrix.x4 (matrices: rows 0-7 / 8-15 x
// k 0-7 / 8-15, in the order a0..a3 of the mma), B [16x8] given as fragments, D = A @ B.
template <typename T>
void mma_case() {
  float A[16][16], B[16][8];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) A[r][k] = static_cast<float>((r * 3 + k * 5) % 7 - 3);
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < 8; ++c) B[k][c] = static_cast<float>((k * 2 + c * 7) % 5 - 2) * 0.5f;
  float D[16][8] = {};
  Guarded in("A", 16 * 16 * 2);
  auto* a16 = reinterpret_cast<uint16_t*>(in.data());
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) a16[r * 16 + k] = bits_of<T>(A[r][k]);
  awq_twin::Launch L;
  L.grid = dim3(1);
  L.block = dim3(32);
  L.smem_bytes = 16 * 16 * 2;
  L.globals = {awq_twin::range(in)};
  awq_twin::run_grid(L, [&] {
    const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
    uint8_t* smem = awq::dynamic_smem();
    // 32 chunks of 16 bytes: lane l copies row l / 2, half l % 2
    awq::cp_async16(smem + 16 * lane, in.data() + 16 * lane, true);
    awq::cp_async_commit();
    awq::cp_async_wait<0>();
    __syncthreads();
    // matrix i = lane / 8: rows 8 (i % 2).., k 8 (i / 2)..  (a0: rows 0-7 k 0-7, a1: rows 8-15, ...)
    const int i = lane / 8, row = 8 * (i % 2) + lane % 8, kb = 8 * (i / 2);
    uint32_t a[4];
    awq::ldmatrix_x4(a, smem + (row * 16 + kb) * 2);
    auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
    const uint32_t b0 = pack(bits_of<T>(B[2 * q][g]), bits_of<T>(B[2 * q + 1][g]));
    const uint32_t b1 = pack(bits_of<T>(B[2 * q + 8][g]), bits_of<T>(B[2 * q + 9][g]));
    float d[4] = {0, 0, 0, 0};
    awq::Mma<T>::run(d, a, b0, b1);
    for (int e = 0; e < 4; ++e) D[g + 8 * (e / 2)][2 * q + e % 2] = d[e];
  });
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      float ref = 0;
      for (int k = 0; k < 16; ++k) ref += A[r][k] * B[k][c];
      if (std::fabs(D[r][c] - ref) > 1e-6f)
        awq_twin::fail("D[" + std::to_string(r) + "][" + std::to_string(c) + "] = " + std::to_string(D[r][c]) +
                       ", expected " + std::to_string(ref));
    }
}

awq_twin::Launch one_cta(int threads, size_t smem, const Guarded& in) {
  awq_twin::Launch L;
  L.grid = dim3(1);
  L.block = dim3(threads);
  L.smem_bytes = smem;
  L.globals = {awq_twin::range(in)};
  return L;
}

// One warpgroup: D[64 x N] = A[64 x 16] B[16 x N].  The PTX ISA's layouts (wgmma .m64nNk16, 16-bit
// A in registers): warp w of the warpgroup holds rows 16 w.., lane 4 g + q registers a0..a3 =
// (row g, k 2q, 2q+1), (row g + 8, same k), (row g, k 2q + 8, 2q + 9), (row g + 8, same); the fp32 D:
// d[4 t + e] = (row 16 w + g + 8 (e / 2), column 8 t + 2 q + e % 2).  B K-major with the 128-byte
// swizzle: column n's 16 k (32 bytes) at row n % 8 of the 1024-byte block n / 8, 16-byte chunk c of
// a row stored at chunk c ^ (row % 8), blocks on 1024-byte boundaries of the shared window.
template <typename T, int N>
void wgmma_case() {
  float A[64][16], B[16][N];
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 16; ++k) A[r][k] = static_cast<float>((r * 5 + k * 3) % 9 - 4);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < N; ++n) B[k][n] = static_cast<float>((k * 7 + n * 3) % 11 - 5) * 0.25f;
  constexpr int kBlocks = N / 8, kSmem = kBlocks * 1024 + 1024;  // + room to find a 1024-byte boundary
  Guarded in("B", kBlocks * 1024);
  auto* b16 = reinterpret_cast<uint16_t*>(in.data());
  std::memset(in.data(), 0xff, kBlocks * 1024);  // NaN in every byte the layout does not fill
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 16; ++k) {
      const int row = n % 8, chunk = k / 8, byte = (n / 8) * 1024 + row * 128 + ((chunk ^ row) * 16) + (k % 8) * 2;
      b16[byte / 2] = bits_of<T>(B[k][n]);
    }
  float D[64][N];
  awq_twin::run_grid(one_cta(128, kSmem, in), [&] {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    uint8_t* smem = awq::dynamic_smem();
    smem += (1024 - awq::smem_address(smem) % 1024) % 1024;
    for (int i = threadIdx.x; i < kBlocks * 64; i += 128) awq::cp_async16(smem + 16 * i, in.data() + 16 * i, true);
    awq::cp_async_commit();
    awq::cp_async_wait<0>();
    awq::fence_proxy_async_smem();
    __syncthreads();
    auto pack = [](float lo, float hi) {
      return static_cast<uint32_t>(bits_of<T>(lo)) | (static_cast<uint32_t>(bits_of<T>(hi)) << 16);
    };
    const int r = 16 * warp + g;
    const uint32_t a[4] = {pack(A[r][2 * q], A[r][2 * q + 1]), pack(A[r + 8][2 * q], A[r + 8][2 * q + 1]),
                           pack(A[r][2 * q + 8], A[r][2 * q + 9]), pack(A[r + 8][2 * q + 8], A[r + 8][2 * q + 9])};
    float d[N / 2] = {};
    awq::wgmma_fence();
    awq::Wgmma<T, N>::run(d, a, awq::wgmma_desc_k_major_sw128(awq::smem_address(smem)));
    awq::wgmma_commit();
    awq::wgmma_wait<0>();
    for (int t = 0; t < N / 8; ++t)
      for (int e = 0; e < 4; ++e) D[16 * warp + g + 8 * (e / 2)][8 * t + 2 * q + e % 2] = d[4 * t + e];
  });
  for (int r = 0; r < 64; ++r)
    for (int n = 0; n < N; ++n) {
      float ref = 0;
      for (int k = 0; k < 16; ++k) ref += A[r][k] * B[k][n];
      if (std::fabs(D[r][n] - ref) > 1e-6f)
        awq_twin::fail("wgmma N " + std::to_string(N) + ": D[" + std::to_string(r) + "][" + std::to_string(n) +
                       "] = " + std::to_string(D[r][n]) + ", expected " + std::to_string(ref));
    }
}

void lazy_case() {
  Guarded in("in", 16);
  std::memset(in.data(), 7, 16);
  uint8_t before = 0, after_commit = 0, after_wait = 0;
  awq_twin::run_grid(one_cta(32, 16, in), [&] {
    uint8_t* smem = awq::dynamic_smem();
    if (threadIdx.x == 0) {
      awq::cp_async16(smem, in.data(), true);
      before = smem[0];
      awq::cp_async_commit();
      after_commit = smem[0];
      awq::cp_async_wait<0>();
      after_wait = smem[0];
    }
  });
  if (before == 7 || after_commit == 7 || after_wait != 7)
    awq_twin::fail("cp.async landed early or never: " + std::to_string(before) + " " + std::to_string(after_commit) +
                   " " + std::to_string(after_wait));
}

void deadlock_case() {
  Guarded in("in", 16);
  awq_twin::run_grid(one_cta(64, 16, in), [&] {
    if (threadIdx.x < 32) __syncthreads();            // warp 0 waits for the whole CTA ...
    else if (threadIdx.x < 48) awq_twin::warp_sync();  // ... half of warp 1 for its other half, which exited
  });
}

void smem_bounds_case() {
  Guarded in("in", 16);
  awq_twin::run_grid(one_cta(32, 64, in), [&] { awq::cp_async16(awq::dynamic_smem() + 64, in.data(), true); });
}

void global_bounds_case() {
  Guarded in("in", 32), other("other", 16);
  awq_twin::run_grid(one_cta(32, 64, in), [&] { awq::cp_async16(awq::dynamic_smem(), other.data(), false); });
}

// Warps 0 and 1 both add to one shared word between the same two barriers: a lost update on a GPU.
void race_case() {
  Guarded in("in", 16);
  awq_twin::run_grid(one_cta(64, 16, in), [&] {
    auto* word = reinterpret_cast<int*>(awq::dynamic_smem());
    if (threadIdx.x == 0) *word = 0;
    __syncthreads();
    if (threadIdx.x % 32 == 0) *word += 1;
    __syncthreads();
  });
}

awq_twin::Launch dependent(const Guarded& in, const Guarded& out) {
  awq_twin::Launch L = one_cta(32, 16, in);
  L.pdl.on = true;
  L.pdl.inputs = {awq_twin::range(in)};
  L.pdl.outputs = {awq_twin::range(out)};
  return L;
}

void pdl_read_case() {
  Guarded in("in", 16), out("out", 16);
  awq_twin::run_grid(dependent(in, out), [&] {
    awq::cp_async16(awq::dynamic_smem(), in.data(), true);  // before the wait
    awq::grid_dependency_wait();
  });
}

void pdl_write_case() {
  Guarded in("in", 16), out("out", 16);
  awq_twin::run_grid(dependent(in, out), [&] {
    if (threadIdx.x == 0) out.data()[0] = 1;  // before the wait
    awq::grid_dependency_wait();
    awq::cp_async16(awq::dynamic_smem(), in.data(), true);
  });
}

void pdl_ok_case() {  // the order the stream kernel keeps: inputs and outputs only after the wait
  Guarded in("in", 16), out("out", 16);
  awq_twin::run_grid(dependent(in, out), [&] {
    awq::grid_dependency_wait();
    awq::cp_async16(awq::dynamic_smem(), in.data(), true);
    if (threadIdx.x == 0) out.data()[0] = 1;
  });
}

void divergent_case() {
  Guarded in("in", 16 * 16 * 2);
  awq_twin::Launch L = one_cta(32, 16 * 16 * 2, in);
  awq_twin::run_grid(L, [&] {
    uint32_t a[4] = {0, 0, 0, 0};
    float d[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) awq::ldmatrix_x4(a, awq::dynamic_smem() + 16 * (threadIdx.x % 16));
    else awq::Mma<__half>::run(d, a, 0, 0);
  });
}

void underrun_case() {
  Guarded buf("the test buffer", 64, awq_twin::Placement::kAtStart);
  awq_twin::run_grid(one_cta(32, 16, buf), [&] {
    if (threadIdx.x == 5) buf.data()[-1] = 1;
  });
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, void (*)()> checks = {
      {"mma", [] { mma_case<__half>(); mma_case<__nv_bfloat16>(); }},
      {"wgmma", [] {
         wgmma_case<__half, 16>();
         wgmma_case<__half, 128>();
         wgmma_case<__nv_bfloat16, 16>();
         wgmma_case<__nv_bfloat16, 128>();
       }},
      {"lazy", lazy_case},
      {"deadlock", deadlock_case},
      {"smem_bounds", smem_bounds_case},
      {"global_bounds", global_bounds_case},
      {"race", race_case},
      {"pdl_read", pdl_read_case},
      {"pdl_write", pdl_write_case},
      {"pdl_ok", pdl_ok_case},
      {"divergent", divergent_case},
      {"underrun", underrun_case},
  };
  try {
    const std::string what = argc > 1 ? argv[1] : "";
    const auto it = checks.find(what);
    if (it == checks.end()) awq_twin::fail("unknown check " + what);
    it->second();
  } catch (const std::exception& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  std::printf("ok\n");
  return 0;
}

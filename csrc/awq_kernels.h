// Host-side launchers of the AWQ CUDA kernels.  The .cu files only see raw pointers so that they
// compile without the (slow to parse) ATen headers; awq_ops.cpp does the tensor checks and
// allocations (through the caching allocator, so CUDA-graph safe) and runs the kernel
// awq_dispatch.h chooses.  (The block ops do the same: awq_block_ops.h, .cu and .cpp.)
#pragma once

#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
#include <string>

namespace awq {

enum class DType { kHalf, kBFloat16 };

// y[M, N] = x[M, K] @ W^T[K, N], W^T from the AWQ GEMM layout.
struct GemmArgs {
  const void* x;            // [M, K] activations (T), 16-byte aligned, contiguous
  const int32_t* qweight;   // [K, N/8]
  const int32_t* qzeros;    // [K/g, N/8]
  const void* scales;       // [K/g, N] (T)
  void* out;                // [M, N] (T)
  const void* residual;     // [M, N] (T) added to the output (awq_gemm_add), or null; the stream kernel only
  float* workspace;         // [splits, M, N] fp32 split-K partials (unused when splits == 1)
  int32_t* counters;        // one arrival counter per output tile, zero on entry and on exit (splits > 1)
  int M, N, K, group_size;
  int splits;
};

// A launch plan: how many split-K slices and how many output tiles (= counters needed).
struct Plan {
  int splits;   // split-K factor (>= 1)
  int tiles;    // number of output tiles, i.e. counters needed when splits > 1
};

// ---- Skinny tensor-core kernel: M in [1, kSkinnyMaxM], weights streamed to registers.
//      splits_override > 0 forces the split-K factor (tuning); depth is the per-warp prefetch
//      depth in 32-row chunks held in registers (2 or 4); tiled: qweight is in the warp-tiled
//      layout.
constexpr int kSkinnyMaxM = 32;
Plan plan_skinny(DType dt, int M, int N, int K, int depth, bool tiled, int num_sms, int splits_override);
void launch_skinny(DType dt, const GemmArgs& a, int depth, bool tiled, cudaStream_t stream);
// The instantiation launch_skinny runs: m16 tiles (2 above 16 rows) and ring depth (2 or 4 chunks),
// and its name as scripts/sass_budget.py names kernels.
inline int skinny_m_tiles(int M) { return M > 16 ? 2 : 1; }
inline int skinny_depth(int depth) { return depth > 2 ? 4 : 2; }
inline std::string skinny_kernel_name(DType dt, int M, int depth, bool tiled) {
  return std::string("awq_skinny_kernel<") + (dt == DType::kHalf ? "half" : "bf16") + ", " +
         std::to_string(skinny_m_tiles(M)) + ", " + std::to_string(skinny_depth(depth)) + ", " +
         (tiled ? "true" : "false") + ">";
}

// ---- Dequantize to a dense W^T [K, N] (T = scales' dtype).  Any N multiple of 8, any group
// size dividing K.
void launch_dequant(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                    int K, int N, int group_size, cudaStream_t stream);

// Same for a warp-tiled qweight [N/64, K/32, kTileWords] (awqlib/packing.py: tile_qweight):
// tile (nb, kc) holds rows 32 kc.. and words 8 nb.., lane l = 4 g + q owning 8 consecutive
// words: word 8 nb + g of rows 2q, 2q+1, 2q+8, 2q+9, 16+2q, 17+2q, 24+2q, 25+2q.
constexpr int kTileN = 64, kTileK = 32, kTileWords = 256;
void launch_dequant_tiled(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                          int K, int N, int group_size, cudaStream_t stream);

// ---- Streaming tensor-core kernel on the stream layout (awqlib/packing.py): M in [1, kStreamMaxM]
//      (kStreamWgmmaMaxM in the wgmma configuration).
//      qweight int4 atoms [N/64, K/16, 128 words], scales/qzeros permuted per lane.  Needs a
//      workspace of workspace_floats fp32 and `counters` int32 that are zero on entry (and are
//      zero again on exit, like the other split-K kernels').
constexpr int kStreamMaxM = 64;
constexpr int kStreamCompactMaxM = 32;  // the compact configuration (awq_stream.cu: StreamCfg) takes M <= 32
constexpr int kStreamDeepMaxM = 64;     // the deep configuration takes M <= 64, except 17-32 (two m16 tiles)
constexpr int kStreamNarrowMaxM = 8;    // the narrow kernels: the tokens are the mma's n8 operand
constexpr int kStreamWgmmaMaxM = 128;   // the wgmma configuration: up to 128 tokens as wgmma's N
constexpr int kStreamWideMinM = 17;     // the wide configuration takes M 17-64 (two and four m16 tiles)
constexpr int kStreamAtomK = 16, kStreamAtomWords = 128;  // an atom: 16 k-rows x 64 columns, 128 words
// The stream kernel's shared-memory configurations (awq_stream.cu: StreamCfg): how many k-rows a
// stage holds and how many stages the ring has, sized for a class of GPUs.
enum StreamConfig : int {
  kConfigLarge = 0,    // 512-row stages (256 at M > 32), 3 of them: H100/H200; an A100 at M <= 16 and 33-64
  kConfigCompact = 1,  // 256-row stages, 2-3: ~100 KB GPUs (A10, L4, L40S, RTX); an A100 at M 17-32
  kConfigDeep = 2,     // the large stages, 4 of them, at M <= 16 (213 KB per block) and 33-64 (203 KB): H100/H200
  kConfigWgmma = 3,    // stages for warpgroup mma (sm_90a: wgmma), 3-5 of them, M <= 128: H100/H200 only
  kConfigWide = 4,     // 256-column slices (half the activation bytes per weight byte), M 17-64: A100 and up
};
// Whether this build holds the wgmma kernels' code: compiled for sm_90a (toolchain.nvcc_flags
// defines AWQ_WGMMA_BUILT for such an architecture list).  A CUDA build for other GPUs compiles
// their bodies out, so kConfigWgmma may run only where this is true and the device is sm_90.
bool stream_wgmma_built();
struct StreamPlan {
  int grid;                 // CTAs (persistent: at most SMs x CTAs per SM)
  int per;                  // (slice, k-tile) units per CTA
  int slices;               // column slices (128 columns; 256 in the wide configuration)
  size_t workspace_floats;  // fp32 partials of split slices
  int counters;             // arrival counters (one per slice)
  StreamConfig config;      // the shared-memory configuration
};
// plan_stream and launch_stream take only what stream_supports accepts for the configuration.
bool stream_supports(int M, int N, int K, int group_size, StreamConfig config);  // shape and group size (not the device)
int stream_smem_bytes(int M, StreamConfig config);  // shared memory per CTA (dynamic + static); -1: no such configuration

// At M 33-64 the stream kernel runs its 4-m-tile configuration, which the math rather than the
// weight bytes bounds.  Measured on an H200 (gpu_sweep 2026-11-30, M = 64) it beats dequantize +
// cuBLAS (the tiled layout's, timed as tiled:auto) by 1.2-2.1x on weights of 117M elements and more
// (8B gate/up, 70B down and gate/up) and loses by 1.9x on 4096 x 4096 (16.8M); interpolated (no
// shape between 16.8M and 117M was timed), they cross near 2^26 elements, below which the automatic
// choice takes dequantize + cuBLAS at those M.
constexpr int64_t kStreamFourTileMinWeights = 67108864;  // 2^26

// Which stream kernel serves a call on a stream-layout weight: what the call asks for and what the
// device offers (awq_dispatch.h's choose_kernel fills this from the kernel id and the settings
// awq_ops.cpp reads, or the CPU twin gives).
struct StreamRequest {
  bool automatic = false;   // kAuto: dequantize + cuBLAS wherever the stream kernel is not chosen
  bool compact = false;     // the compact configuration (else the large one, or those in its place)
  bool group_sums = false;  // group sums where they pay (the automatic choice asks for them)
  bool deep = false;        // AWQLIB_STREAM_DEEP=1: the deep configuration in place of the large one where it fits
  bool wgmma = false;       // AWQLIB_STREAM_WGMMA=1 on a device that runs the wgmma kernels
  bool wide = false;        // AWQLIB_STREAM_WIDE=1: the wide configuration in place of the large one at M 17-64
  int smem_limit = 0;       // shared memory a block may have (bytes)
};
struct StreamChoice {
  enum Kind { kStream, kDequantCublas, kRefused } kind = kRefused;
  StreamConfig config = kConfigLarge;
  int pass = 0;             // rows per launch; the last launch takes the rest
  bool group_sums = false;  // as asked (the instantiation has them only where they pay)
  std::string refusal;      // kRefused: why no configuration runs the call, naming each one considered
};
// The automatic choice (request.automatic) never refuses: it falls back to dequantize + cuBLAS.
// A forced one (the stream kernel in the large or compact configuration, with wgmma, wide or deep in
// place of the large one where asked for) runs or is refused.
StreamChoice choose_stream(int64_t M, int N, int K, int group_size, const StreamRequest& request);
// The instantiation launch_stream runs for a launch of M rows in `config`, named as
// scripts/sass_budget.py names kernels ("awq_stream_kernel<half, 1, true, false, true, large, true>").
std::string stream_kernel_name(DType dt, int M, int N, int K, int group_size, StreamConfig config, bool group_sums,
                               bool narrow);
void launch_dequant_stream(DType dt, const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                           int K, int N, int group_size, cudaStream_t stream);
// num_sms: the CTAs the persistent grid may have (one per SM, or fewer: awq_gemm_variant's splits).
StreamPlan plan_stream(int M, int N, int K, int group_size, int num_sms, StreamConfig config);
// group_sums: scale per-group fp32 sums once per group (GroupSums in awq_stream.cu) where that
// saves instructions (M <= 32, or M <= 16 compact; group_size >= 128, or >= 64 compact);
// otherwise, and when false, every dequantized pair is scaled.  pdl: launch with programmatic
// stream serialization (sm_90): the kernel streams its first stages' weights while the previous
// kernel in the stream finishes, and waits for it before reading activations (and the residual,
// a.residual: awq_gemm_add's, added in the epilogue) -- so that previous
// kernel must not be one that writes these weights (awq_ops.cpp: stream_pdl).  narrow: at M <=
// kStreamNarrowMaxM, the kernels that put the tokens on the mma's n8 side (awq_stream.cu: NARROW;
// half the mma per weight), for each launch (a pass) of at most that many rows.
void launch_stream(DType dt, const GemmArgs& a, const StreamPlan& plan, bool group_sums, bool pdl, bool narrow,
                   cudaStream_t stream);

// Requirements of the fused kernels on the GEMM and warp-tiled layouts (the skinny kernel); other
// shapes take dequantize + cuBLAS.
constexpr int kFusedNMultiple = 64;   // one warp covers 64 columns
constexpr int kFusedKMultiple = 32;   // one chunk covers 32 rows of K
constexpr int kFusedGroupMultiple = 32;  // so a 32-row stage never straddles two groups

}  // namespace awq

// The CUDA kernels' twin on a CPU: with AWQ_HOST_EMULATION defined, a host C++ compiler builds the
// kernels of csrc/ from their own source, and this runtime runs them -- each CUDA thread a fiber,
// one CTA at a time -- so the code that a GPU would run is tested without one
// (tests/cpu_twin/, tests/test_cpu_twin.py).
//
// Why fibers.  Warp-collective instructions (ldmatrix, mma.sync) exchange registers between the 32
// lanes of a warp, and __syncthreads between all threads of a CTA.  Each thread runs on a stack of
// its own and yields at every such point; the scheduler resumes it once every thread the point
// waits for has arrived.  Deterministic, and fast enough on one core for the small shapes the
// tests use.
//
// What it checks beyond the result (each a failure with a message, not a wrong number):
//  * a barrier or warp collective some threads never reach (deadlock), and lanes of a warp at
//    different collective instructions (.aligned);
//  * cp.async: 16-byte alignment, destinations inside the CTA's dynamic shared memory, sources
//    inside the buffers the harness registered (even for zero-filled copies, whose address must
//    still be legal).  The source is read at issue (the earliest the hardware may) and the data
//    lands at the cp.async.wait_group that covers it (LAZY: a stage read before its wait is stale)
//    or at once (EAGER: a slot refilled before every warp is done reading it is overwritten);
//  * ldmatrix rows: 16-byte aligned, inside shared memory;
//  * wgmma (sm_90a): a descriptor of the one form the kernels use (K-major, 128-byte swizzle, base
//    offset 0) starting in the first row of a 1024-byte swizzle block of the shared window (the
//    dynamic shared memory starts 1040 bytes into it, as after a GPU's static part), B inside the
//    dynamic shared memory, the four warps of a warpgroup issuing the same wgmma, none left
//    unwaited at exit; B is read at issue or at the covering wait (wgmma_rs below);
//  * shared-memory races between barriers: warps run one at a time, each until it blocks at a CTA
//    barrier (index order, or reversed), so a missing barrier between one warp's write and another
//    warp's read shows in one of the two orders; and a shared byte that two warps change between
//    the same two barriers is reported (a write-write race, e.g. a non-atomic += by several warps);
//  * programmatic dependent launch: a cp.async from an input the previous kernel may still write,
//    issued before the thread's griddepcontrol.wait, and an output written before the CTA's first
//    wait, are reported;
//  * plain loads and stores out of bounds: every buffer (shared memory too) touches a guard page at
//    one end -- its end, or its start -- so running past it faults, and the fault names the buffer,
//    the CTA and the thread.
//
// What it does not model: races between CTAs (they run one after another, in an order the harness
// chooses), a read racing a write inside one barrier interval (warps never interleave there), the
// memory model (so neither wgmma.fence nor fence.proxy.async: removing them passes here; they are
// checked by reading the PTX ISA and the SASS), a wgmma's A registers rewritten before its wait
// (read here at issue; undefined on a GPU), timing, and the rounding of the tensor cores' fp32 sums (this twin sums the 16
// exact products in double, then adds them to the accumulator: its results are closer to exact
// than a GPU's, so its bit-identities say nothing about a GPU's).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the built-in macros below: it names parameters gridDim, blockDim
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Device code calls these unqualified (CUDA's device library has them in the global namespace).
using std::fmaf;
using std::max;
using std::min;

namespace awq_twin {

constexpr int kWarpLanes = 32;
// A fiber's stack: the kernel's frame (its register arrays live on the stack here) plus what
// throwing an exception from inside it takes.  An overflow faults in the guard page below.
constexpr size_t kFiberStackBytes = 128 * 1024;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

// Which end of a guarded block touches its guard page.
enum class Placement { kAtEnd, kAtStart };

class Guarded;
inline std::vector<const Guarded*>& guarded_blocks() {
  static std::vector<const Guarded*> all;
  return all;
}

// `bytes` of memory with an inaccessible page on each side, the data flush against one of them:
// an access past that end faults at its first byte (the other end has the slack of page rounding).
class Guarded {
 public:
  Guarded(std::string name, size_t bytes, Placement at = Placement::kAtEnd) : name_(std::move(name)), bytes_(bytes) {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t body = std::max<size_t>((bytes + page_ - 1) / page_ * page_, page_);
    total_ = body + 2 * page_;
    void* m = mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap failed for " + name_);
    base_ = static_cast<uint8_t*>(m);
    if (mprotect(base_ + page_, body, PROT_READ | PROT_WRITE) != 0) fail("mprotect failed for " + name_);
    data_ = at == Placement::kAtEnd ? base_ + page_ + body - bytes_ : base_ + page_;
    guarded_blocks().push_back(this);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() {
    auto& all = guarded_blocks();
    all.erase(std::remove(all.begin(), all.end(), this), all.end());
    munmap(base_, total_);
  }
  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }
  // "after" / "before" where `addr` is in this block's upper / lower guard page, else nullptr
  const char* guard_hit(uintptr_t addr) const {
    const auto b = reinterpret_cast<uintptr_t>(base_);
    if (addr >= b && addr < b + page_) return "before the start of";
    if (addr >= b + total_ - page_ && addr < b + total_) return "past the end of";
    return nullptr;
  }

 private:
  std::string name_;
  size_t bytes_, page_ = 0, total_ = 0;
  uint8_t* base_ = nullptr;
  uint8_t* data_ = nullptr;
};

// A byte range the kernel may read or write through cp.async (a registered tensor).
struct Range {
  const uint8_t* begin;
  size_t bytes;
  bool contains(const void* p, size_t n) const {
    const auto* b = static_cast<const uint8_t*>(p);
    return b >= begin && b + n <= begin + bytes;
  }
};
inline Range range(const Guarded& g) { return {g.data(), g.bytes()}; }

struct Copy {
  uint8_t* dst;
  bool zero_fill;
  uint8_t data[16];  // the source, as read at issue
};

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };
enum class Collective : int { kNone, kLdmatrix, kMmaF16, kMmaBf16, kShfl, kWgmmaF16, kWgmmaBf16 };

// An issued wgmma of one thread, not yet applied to its accumulators: the warp's 16 x 16 A (read
// at issue, as the registers are), the descriptor of B (read when applied).
struct Wgmma {
  float* d;
  int n;
  bool bf16;
  float a[16][16];
  uint64_t desc;
};

struct Thread {
  ucontext_t ctx;
  int tid = 0;
  State state = State::kRunnable;
  bool dependency_waited = false;           // passed griddepcontrol.wait (PDL)
  unsigned collectives = 0;                 // warp collectives executed: selects the exchange slot
  std::vector<Copy> pending;                // cp.async not yet committed
  std::vector<std::vector<Copy>> groups;    // committed groups, oldest first
  std::vector<Wgmma> wgmma_pending;         // wgmma issued since the last commit
  std::vector<std::vector<Wgmma>> wgmma_groups;  // committed wgmma groups, oldest first
};

// What lanes post for a warp collective: which instruction, a row address (ldmatrix) or
// fragments (mma).
struct Post {
  Collective kind;
  const uint8_t* row;
  uint32_t a[4], b[2];
  uint64_t desc;
};

// Programmatic dependent launch: what the previous kernel in the stream may still be writing
// until griddepcontrol.wait (the inputs), and what this kernel may write only after it.
struct DependentLaunch {
  bool on = false;
  std::vector<Range> inputs, outputs;
};

// What to run: the grid, and what the twin checks it against.
struct Launch {
  dim3 grid, block;
  size_t smem_bytes;
  bool eager_copies = false;
  std::vector<Range> globals;   // what cp.async may read
  DependentLaunch pdl;
  std::vector<unsigned> order;  // CTAs in this order (empty: 0, 1, ...)
  // Warps run in index order, or reversed; and shared memory (like the harness's buffers) touches
  // its guard page at its end, or at its start.
  bool reversed = false;
};

struct Cta {
  dim3 block_idx, grid_dim, block_dim;
  const Launch* launch = nullptr;
  uint8_t* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<std::vector<uint8_t>> outputs_at_start;  // PDL: the outputs when the CTA began
  bool dependency_checked = false;
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;
  bool barrier_or = false, barrier_result = false;
  bool epoch_ended = false;  // a CTA barrier completed: the running warp yields
  std::vector<int> warp_arrived;
  std::vector<Post> posts;  // [warp][2 slots][lane]
  std::vector<uint64_t> wgmma_trace;  // per warp: a running hash of its wgmma (shape, descriptor)

  uint3 cur_thread_idx() const {
    const unsigned t = static_cast<unsigned>(cur->tid);
    return make_uint3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
  }
};

inline Cta* g_cta = nullptr;

// Bytes the launch's cp.async copies read from each registered buffer (Launch::globals, in order;
// zero-filled copies read nothing): what the harness checks against what the kernel must read.
inline std::vector<size_t> g_bytes_copied_from;
// Warp-level mma instructions the launch ran (each counted once, not per lane): the work a
// tiling does, which the harness reports (the narrow kernels' half of the 16-row tiling's).
inline size_t g_warp_mmas = 0;

inline Cta& cta() { return *g_cta; }
inline Thread& self() { return *g_cta->cur; }

inline void yield() {
  Thread& t = self();
  swapcontext(&t.ctx, &cta().scheduler);
}

inline std::string where() {
  return "CTA " + std::to_string(cta().block_idx.x) + " thread " + std::to_string(self().tid);
}

// ---- barriers
// Complete when every thread that has not exited waits at a CTA barrier: release them all, and end
// the running warp's turn (the scheduler closes the barrier interval for the race check).
inline void release_barrier_if_complete() {
  Cta& c = cta();
  int waiting = 0, live = 0;
  for (const auto& t : c.threads) {
    live += t.state != State::kDone;
    waiting += t.state == State::kAtBarrier;
  }
  if (waiting == 0 || waiting < live) return;
  c.barrier_result = c.barrier_or;
  for (auto& t : c.threads)
    if (t.state == State::kAtBarrier) t.state = State::kRunnable;
  c.barrier_or = false;
  c.epoch_ended = true;
}

// bar.sync 0 (and bar.red.or): every thread of the CTA that has not exited (sm_70+ semantics).
inline bool syncthreads_or(bool vote) {
  Cta& c = cta();
  Thread& t = self();
  t.state = State::kAtBarrier;
  c.barrier_or = c.barrier_or || vote;
  release_barrier_if_complete();
  do yield();
  while (t.state == State::kAtBarrier);
  return c.barrier_result;
}

inline int lane() { return self().tid % kWarpLanes; }
inline int warp() { return self().tid / kWarpLanes; }

// The lane-0 entry of the slot this lane's next collective uses; two alternate, so a lane posting
// for the next collective never overwrites what another lane may still read for this one.
inline Post* post_slots(int w) { return &cta().posts[((size_t)w * 2 + (self().collectives & 1)) * kWarpLanes]; }

inline void warp_sync() {
  Cta& c = cta();
  Thread& t = self();
  const int w = warp();
  t.state = State::kAtWarp;
  if (++c.warp_arrived[w] == kWarpLanes) {
    c.warp_arrived[w] = 0;
    for (int l = 0; l < kWarpLanes; ++l) c.threads[(size_t)w * kWarpLanes + l].state = State::kRunnable;
  }
  while (t.state == State::kAtWarp) yield();
}

// Post, wait for the warp, and check that every lane executed the same collective (.aligned).
inline Post* exchange(const Post& mine) {
  const int w = warp();
  Post* slot = post_slots(w);
  slot[lane()] = mine;
  warp_sync();
  for (int l = 0; l < kWarpLanes; ++l)
    if (slot[l].kind != mine.kind)
      fail("lanes of warp " + std::to_string(w) + " at different warp-collective instructions at " + where());
  return slot;
}

// ---- shared and global memory checks
inline bool in_smem(const void* p, size_t n) { return Range{cta().smem, cta().smem_bytes}.contains(p, n); }

inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + " not 16-byte aligned at " + where());
}

inline bool in_any(const std::vector<Range>& ranges, const void* p, size_t n) {
  for (const auto& r : ranges)
    if (r.contains(p, n)) return true;
  return false;
}

// ---- programmatic dependent launch (griddepcontrol.wait)
inline void grid_dependency_wait() {
  Cta& c = cta();
  self().dependency_waited = true;
  if (!c.launch->pdl.on || c.dependency_checked) return;
  c.dependency_checked = true;
  for (size_t i = 0; i < c.launch->pdl.outputs.size(); ++i)
    if (std::memcmp(c.launch->pdl.outputs[i].begin, c.outputs_at_start[i].data(), c.outputs_at_start[i].size()) != 0)
      fail("an output was written before griddepcontrol.wait (the previous kernel may still read it), seen at " +
           where());
}

// ---- cp.async
inline void apply(const Copy& c) {
  if (c.zero_fill) std::memset(c.dst, 0, 16);
  else std::memcpy(c.dst, c.data, 16);
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  Cta& c = cta();
  check_aligned16(dst, "cp.async destination");
  check_aligned16(src, "cp.async source");
  if (!in_smem(dst, 16)) fail("cp.async destination outside the dynamic shared memory at " + where());
  if (!in_any(c.launch->globals, src, 16)) fail("cp.async source outside every input buffer at " + where());
  if (valid && c.launch->pdl.on && !self().dependency_waited && in_any(c.launch->pdl.inputs, src, 16))
    fail("cp.async from an input the previous kernel may still write, before griddepcontrol.wait, at " + where());
  Copy copy{static_cast<uint8_t*>(dst), !valid, {}};
  if (valid) {
    std::memcpy(copy.data, src, 16);
    for (size_t i = 0; i < c.launch->globals.size(); ++i)
      if (c.launch->globals[i].contains(src, 16)) g_bytes_copied_from[i] += 16;
  }
  if (c.launch->eager_copies) apply(copy);
  else self().pending.push_back(copy);
}

inline void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.pending));
  t.pending.clear();
}

inline void cp_async_wait(int newest_in_flight) {
  Thread& t = self();
  while ((int)t.groups.size() > newest_in_flight) {
    for (const Copy& c : t.groups.front()) apply(c);
    t.groups.erase(t.groups.begin());
  }
}

// ---- warp collectives
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ldmatrix.m8n8.x4.b16: lane 8 i + r gives row r of matrix i; lane l receives, of each matrix, the
// two elements (l % 4) of row l / 4.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  check_aligned16(row, "ldmatrix row");
  if (!in_smem(row, 16)) fail("ldmatrix row outside the dynamic shared memory at " + where());
  Post mine{};
  mine.kind = Collective::kLdmatrix;
  mine.row = static_cast<const uint8_t*>(row);
  const Post* slot = exchange(mine);
  const int l = lane();
  for (int i = 0; i < 4; ++i) r[i] = load_u32(slot[8 * i + l / 4].row + 4 * (l % 4));
  ++self().collectives;
}

template <typename T> float to_float(uint16_t bits);
template <> inline float to_float<__half>(uint16_t bits) {
  __half_raw h;
  h.x = bits;
  return __half2float(__half(h));
}
template <> inline float to_float<__nv_bfloat16>(uint16_t bits) {
  __nv_bfloat16_raw h;
  h.x = bits;
  return __bfloat162float(__nv_bfloat16(h));
}
template <typename T> float lo(uint32_t v) { return to_float<T>(static_cast<uint16_t>(v)); }
template <typename T> float hi(uint32_t v) { return to_float<T>(static_cast<uint16_t>(v >> 16)); }

// mma.m16n8k16.row.col, fp32 accumulators.  Lane l = 4 g + q holds A (a0: row g, k 2q..2q+1; a1:
// row g+8; a2: row g, k 2q+8..; a3: row g+8, k 2q+8..), B (b0: k 2q..2q+1 of column g; b1: k
// 2q+8..) and D (d0, d1: row g, columns 2q, 2q+1; d2, d3: row g+8).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Post mine{};
  mine.kind = std::is_same_v<T, __half> ? Collective::kMmaF16 : Collective::kMmaBf16;
  std::memcpy(mine.a, a, sizeof(mine.a));
  mine.b[0] = b0;
  mine.b[1] = b1;
  const Post* slot = exchange(mine);
  auto A = [&](int row, int k) {  // element (row, k) of the 16x16 A
    const Post& p = slot[4 * (row % 8) + (k % 8) / 2];
    const uint32_t v = p.a[(row / 8) + 2 * (k / 8)];
    return k % 2 ? hi<T>(v) : lo<T>(v);
  };
  auto B = [&](int k, int col) {  // element (k, col) of the 16x8 B
    const Post& p = slot[4 * col + (k % 8) / 2];
    const uint32_t v = p.b[k / 8];
    return k % 2 ? hi<T>(v) : lo<T>(v);
  };
  const int g = lane() / 4, q = lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * q + e % 2;
    double s = 0;
    for (int k = 0; k < 16; ++k) s += (double)A(row, k) * (double)B(k, col);
    d[e] = static_cast<float>(d[e] + s);
  }
  if (lane() == 0) ++g_warp_mmas;
  ++self().collectives;
}

// ---- warpgroup mma (wgmma.mma_async, sm_90a)
// The dynamic shared memory's place in the CTA's shared window: after a GPU's static shared
// memory (1040 bytes for the stream kernel on sm_90), so not on a 1024-byte boundary -- as on a GPU,
// a kernel that needs such a boundary (128-byte swizzle) must find it itself.
constexpr uint32_t kDynamicSmemWindowOffset = 1040;

inline uint32_t shared_address(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  if (b < cta().smem || b > cta().smem + cta().smem_bytes)
    fail("a shared address of a pointer outside the dynamic shared memory at " + where());
  return kDynamicSmemWindowOffset + static_cast<uint32_t>(b - cta().smem);
}

// Element (k, n) of the 16 x N B a descriptor describes: K-major, 128-byte swizzle (the only form
// the kernels use; anything else fails): row n (a token, 64 k in 128 bytes) at start + (n / 8) SBO +
// (n % 8) 128, k at 2 k bytes into it, then address bits 4-6 ^= bits 7-9 -- of the shared-window
// address, so a block must start on a 1024-byte boundary (base offset 0).
template <typename T>
float wgmma_b(uint64_t desc, int k, int n) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const unsigned base_offset = static_cast<unsigned>((desc >> 49) & 7), layout = static_cast<unsigned>(desc >> 62);
  if (layout != 1 || base_offset != 0) fail("wgmma descriptor: only the 128-byte swizzle with base offset 0 is modelled, at " + where());
  if (start % 1024 >= 128) fail("wgmma descriptor: start not in the first row of a 1024-byte swizzle block at " + where());
  const uint32_t addr = start + (n / 8) * sbo + (n % 8) * 128 + 2 * k;
  const uint32_t phys = addr ^ (((addr >> 7) & 7) << 4);
  if (phys < kDynamicSmemWindowOffset || phys + 2 > kDynamicSmemWindowOffset + cta().smem_bytes)
    fail("wgmma reads B outside the dynamic shared memory at " + where());
  uint16_t bits;
  std::memcpy(&bits, cta().smem + (phys - kDynamicSmemWindowOffset), 2);
  return to_float<T>(bits);
}

// D += A B for this thread's accumulators: each of the 16 products of an output summed exactly,
// rounded once into fp32 (as mma_m16n8k16 here).  B is read now: when the op is applied.
inline void apply(const Wgmma& op) {
  const int g = lane() / 4, q = lane() % 4;
  for (int t = 0; t < op.n / 8; ++t)
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 8 * t + 2 * q + e % 2;
      double s = 0;
      for (int k = 0; k < 16; ++k)
        s += (double)op.a[row][k] * (op.bf16 ? wgmma_b<__nv_bfloat16>(op.desc, k, col) : wgmma_b<__half>(op.desc, k, col));
      op.d[4 * t + e] = static_cast<float>(op.d[4 * t + e] + s);
    }
}

// wgmma.mma_async m64nNk16 with A in registers: per warp a collective (its 16 rows of A).  A GPU
// reads B at any time between the issue and the wait that covers it, so the twin takes the
// opposite end from its cp.async copies: with copies landing late (LAZY) it applies the wgmma at
// once, reading B at issue -- a stage not yet landed or published is stale then; with copies
// landing at once (EAGER) it applies it at the covering wgmma_wait, reading B then -- a slot
// refilled before the wait is overwritten, and results read before it are stale.
template <typename T>
void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc) {
  Post mine{};
  mine.kind = std::is_same_v<T, __half> ? Collective::kWgmmaF16 : Collective::kWgmmaBf16;
  std::memcpy(mine.a, a, sizeof(mine.a));
  mine.desc = desc;
  const Post* slot = exchange(mine);
  for (int l = 0; l < kWarpLanes; ++l)
    if (slot[l].desc != desc) fail("lanes of a warp gave wgmma different descriptors at " + where());
  Wgmma op{d, n, !std::is_same_v<T, __half>, {}, desc};
  for (int row = 0; row < 16; ++row)
    for (int k = 0; k < 16; ++k) {  // mma.m16n8k16's A fragment layout
      const uint32_t v = slot[4 * (row % 8) + (k % 8) / 2].a[(row / 8) + 2 * (k / 8)];
      op.a[row][k] = k % 2 ? hi<T>(v) : lo<T>(v);
    }
  if (lane() == 0) {
    g_warp_mmas += n / 8;  // in m16n8k16 units: this warp's 16 rows x n columns x 16 k
    uint64_t& h = cta().wgmma_trace[warp()];
    h = (h ^ (desc + 0x9E3779B97F4A7C15ull * (uint64_t)n)) * 0x100000001B3ull;
  }
  ++self().collectives;
  if (!cta().launch->eager_copies) apply(op);
  else self().wgmma_pending.push_back(op);
}

inline void wgmma_commit() {
  Thread& t = self();
  t.wgmma_groups.push_back(std::move(t.wgmma_pending));
  t.wgmma_pending.clear();
}

inline void wgmma_wait(int newest_in_flight) {
  Thread& t = self();
  if (!t.wgmma_pending.empty()) fail("wgmma_wait with wgmma not committed at " + where());
  while ((int)t.wgmma_groups.size() > newest_in_flight) {
    for (const Wgmma& op : t.wgmma_groups.front()) apply(op);
    t.wgmma_groups.erase(t.wgmma_groups.begin());
  }
}

// shfl.sync.bfly.b32 over the full warp: lane l receives lane (l ^ lane_mask)'s value.  A partial
// member mask is not modelled (it fails): the kernels reduce across whole warps.
inline uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask) {
  if (mask != 0xffffffffu) fail("shfl with a partial member mask (not modelled) at " + where());
  if (lane_mask < 0 || lane_mask >= kWarpLanes) fail("shfl lane mask out of range at " + where());
  Post mine{};
  mine.kind = Collective::kShfl;
  mine.a[0] = v;
  const Post* slot = exchange(mine);
  const uint32_t r = slot[lane() ^ lane_mask].a[0];
  ++self().collectives;
  return r;
}

// ---- faults: name the guard page and the thread
inline void report_fault(int, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  char msg[512];
  int n = std::snprintf(msg, sizeof msg, "memory fault at %#lx", static_cast<unsigned long>(addr));
  for (const Guarded* g : guarded_blocks())
    if (const char* side = g->guard_hit(addr)) {
      n += std::snprintf(msg + n, sizeof msg - n, ": %s %s", side, g->name().c_str());
      break;
    }
  if (g_cta != nullptr && g_cta->cur != nullptr)
    n += std::snprintf(msg + n, sizeof msg - n, ", in CTA %u thread %d", g_cta->block_idx.x, g_cta->cur->tid);
  n += std::snprintf(msg + n, sizeof msg - n, "\n");
  (void)!write(2, msg, static_cast<size_t>(n));
  _exit(3);
}

// The handler runs on a stack of its own: a fault may be a fiber's stack overflow.
inline void install_fault_report() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<uint8_t> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = report_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

inline void thread_entry() {
  Cta& c = cta();
  try {
    c.body();
  } catch (const std::exception& e) {
    if (c.error.empty()) c.error = e.what();
  }
  self().state = State::kDone;
  release_barrier_if_complete();  // an exited thread no longer holds a barrier back
  swapcontext(&self().ctx, &c.scheduler);
}

// Run one warp until every lane is blocked, has exited, or a CTA barrier completed.  Returns
// whether any lane ran.
inline bool run_warp(Cta& c, int w, bool reversed) {
  bool ran = false;
  for (bool again = true; again && c.error.empty() && !c.epoch_ended;) {
    again = false;
    for (int k = 0; k < kWarpLanes && c.error.empty() && !c.epoch_ended; ++k) {
      Thread& t = c.threads[(size_t)w * kWarpLanes + (reversed ? kWarpLanes - 1 - k : k)];
      if (t.state != State::kRunnable) continue;
      c.cur = &t;
      swapcontext(&c.scheduler, &t.ctx);
      ran = again = true;
    }
  }
  return ran;
}

// Run `kernel` over the grid; throws with the first failure (deadlock, bad copy, race, exception).
inline void run_grid(const Launch& L, const std::function<void()>& kernel) {
  install_fault_report();
  g_bytes_copied_from.assign(L.globals.size(), 0);
  g_warp_mmas = 0;
  const unsigned n_cta = L.grid.x * L.grid.y * L.grid.z;
  std::vector<unsigned> order = L.order;
  if (order.empty())
    for (unsigned i = 0; i < n_cta; ++i) order.push_back(i);
  const Placement at = L.reversed ? Placement::kAtStart : Placement::kAtEnd;
  Guarded smem_block("the dynamic shared memory", std::max<size_t>(L.smem_bytes, 16), at);
  std::vector<uint8_t> before(smem_block.bytes());
  std::vector<int> writer(smem_block.bytes());
  const int n = L.block.x * L.block.y * L.block.z;
  if (n % kWarpLanes) fail("block size must be a whole number of warps");
  const int warps = n / kWarpLanes;
  std::vector<std::unique_ptr<Guarded>> stacks(n);  // an overflow runs into the guard page below one
  for (auto& stack : stacks) stack = std::make_unique<Guarded>("a thread's stack", kFiberStackBytes, Placement::kAtStart);
  for (unsigned b : order) {
    Cta c;
    c.block_idx = dim3(b % L.grid.x, (b / L.grid.x) % L.grid.y, b / (L.grid.x * L.grid.y));
    c.grid_dim = L.grid;
    c.block_dim = L.block;
    c.smem = smem_block.data();
    c.smem_bytes = L.smem_bytes;
    std::memset(c.smem, 0xA5, L.smem_bytes);  // shared memory starts as garbage
    c.launch = &L;
    for (const Range& r : L.pdl.outputs) c.outputs_at_start.emplace_back(r.begin, r.begin + r.bytes);
    c.body = kernel;
    c.threads.resize(n);
    c.warp_arrived.assign(warps, 0);
    c.posts.assign((size_t)warps * 2 * kWarpLanes, Post{});
    c.wgmma_trace.assign(warps, 0);
    g_cta = &c;
    for (int i = 0; i < n; ++i) {
      Thread& t = c.threads[i];
      t.tid = i;
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = stacks[i]->data();
      t.ctx.uc_stack.ss_size = stacks[i]->bytes();
      t.ctx.uc_link = nullptr;
      makecontext(&t.ctx, thread_entry, 0);
    }
    std::fill(writer.begin(), writer.end(), -1);
    auto stop = [&](const std::string& why) {
      g_cta = nullptr;
      fail("CTA " + std::to_string(b) + ": " + why);
    };
    for (;;) {
      bool ran = false;
      for (int k = 0; k < warps; ++k) {
        const int w = L.reversed ? warps - 1 - k : k;
        std::memcpy(before.data(), c.smem, c.smem_bytes);
        ran = run_warp(c, w, L.reversed) || ran;
        if (!c.error.empty()) stop(c.error);
        for (size_t i = 0; i < c.smem_bytes; ++i) {  // this warp's shared-memory writes in this interval
          if (c.smem[i] == before[i]) continue;
          if (writer[i] >= 0 && writer[i] != w)
            stop("shared-memory byte " + std::to_string(i) + " written by warps " + std::to_string(writer[i]) +
                 " and " + std::to_string(w) + " between the same two barriers (a race)");
          writer[i] = w;
        }
        if (c.epoch_ended) {
          c.epoch_ended = false;
          std::fill(writer.begin(), writer.end(), -1);
        }
      }
      int done = 0, at_barrier = 0, at_warp = 0;
      for (const auto& t : c.threads) {
        done += t.state == State::kDone;
        at_barrier += t.state == State::kAtBarrier;
        at_warp += t.state == State::kAtWarp;
      }
      if (done == n) {
        // .aligned, warpgroup-wide: the four warps of a warpgroup issue the same wgmma sequence
        for (int w = 0; w < warps; ++w)
          if (c.wgmma_trace[w] != c.wgmma_trace[w & ~3])
            stop("warps " + std::to_string(w & ~3) + " and " + std::to_string(w) +
                 " of a warpgroup issued different wgmma (shape or descriptor)");
        for (const auto& t : c.threads)
          if (!t.wgmma_pending.empty() || !t.wgmma_groups.empty())
            stop("thread " + std::to_string(t.tid) + " exited with wgmma it never waited for");
        break;
      }
      if (!ran)
        stop("deadlocked: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
             std::to_string(at_warp) + " at a warp collective, " + std::to_string(done) + " exited");
    }
    g_cta = nullptr;
  }
}

}  // namespace awq_twin

// ---- the CUDA built-ins the kernels use.  Every system header is included above.  __shared__
// variables are CTA-wide: as statics, one per program, which is one per CTA since CTAs run one at
// a time.  __global__ and __device__ mark nothing on the host.
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::awq_twin::cta().cur_thread_idx())
#define blockIdx (::awq_twin::cta().block_idx)
#define blockDim (::awq_twin::cta().block_dim)
#define gridDim (::awq_twin::cta().grid_dim)

inline void __syncthreads() { awq_twin::syncthreads_or(false); }
inline int __syncthreads_or(int vote) { return awq_twin::syncthreads_or(vote != 0); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldg(const T* p) { return *p; }

// __byte_perm(a, b, s): byte i of the result is byte (s >> 4 i) & 7 of the 8-byte {b, a} (nvcc
// masks the selector with 0x7777 before its prmt.b32, so no sign replication).
inline uint32_t __byte_perm(uint32_t a, uint32_t b, uint32_t s) {
  const uint64_t x = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((x >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = awq_twin::shfl_xor(mask, bits, lane_mask);
  std::memcpy(&v, &bits, 4);
  return v;
}

// fp32 arithmetic with its rounding spelled out: the host compiler's own operations (the twin is
// built in ISO C++ mode, whose -ffp-contract=off fuses nothing, so each rounds once, like these).
// rsqrtf is approximate on a GPU (2 ulp); here it is the correctly rounded 1/sqrt.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// Device-only half intrinsics: one rounding of the exact result (as the hardware).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const float2 x = __half22float2(a), y = __half22float2(b), z = __half22float2(c);
  return __halves2half2(__double2half((double)x.x * y.x + z.x), __double2half((double)x.y * y.y + z.y));
}

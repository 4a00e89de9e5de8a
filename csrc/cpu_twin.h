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
//  * a barrier some threads never reach, a warp collective with missing lanes (deadlock);
//  * cp.async: 16-byte alignment, destinations inside the CTA's dynamic shared memory, sources
//    inside the buffers the harness registered (even for zero-filled copies, whose address must
//    still be legal); the data lands only at the cp.async.wait_group that covers it (LAZY) or at
//    once (EAGER): a kernel that reads a stage before waiting for it sees stale bytes in one mode;
//  * ldmatrix rows: 16-byte aligned, inside shared memory.
// Plain loads and stores are C++ accesses: the harness puts guard pages after every buffer and
// after the shared memory, so running past one ends the process.
//
// What it does not model: concurrency between CTAs (they run one after another, in an order the
// harness chooses), the memory model, timing, and the exact rounding of the tensor cores' fp32
// sums (this twin sums the 16 exact products in double, then adds them to the accumulator).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the built-in macros below: it names parameters gridDim, blockDim
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

using std::fmaf;
using std::max;
using std::min;

namespace awq_twin {

constexpr int kWarpLanes = 32;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

// `bytes` of memory between two pages no access may touch: running past either end faults.  The
// block ends where the upper guard page starts (so overruns fault at the first byte); `bytes` is
// rounded up to 16.
class Guarded {
 public:
  explicit Guarded(size_t bytes) : bytes_((bytes + 15) / 16 * 16) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t body = (bytes_ + page - 1) / page * page;
    total_ = body + 2 * page;
    void* m = mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap failed");
    base_ = static_cast<uint8_t*>(m);
    if (mprotect(base_ + page, body, PROT_READ | PROT_WRITE) != 0) fail("mprotect failed");
    data_ = base_ + page + body - bytes_;
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() { munmap(base_, total_); }
  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_, total_;
  uint8_t* base_;
  uint8_t* data_;
};


enum class CopyTiming { kLazy, kEager };

// A byte range the kernel may read or write through cp.async (a registered tensor).
struct Range {
  const uint8_t* begin;
  size_t bytes;
  bool contains(const void* p, size_t n) const {
    const auto* b = static_cast<const uint8_t*>(p);
    return b >= begin && b + n <= begin + bytes;
  }
};

struct Copy {
  uint8_t* dst;
  const uint8_t* src;  // nullptr: zero-fill
};

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<Guarded> stack;           // an overflow runs into the guard page below it
  int tid = 0;
  State state = State::kRunnable;
  bool or_vote = false;
  unsigned collectives = 0;                 // warp collectives executed: selects the exchange slot
  std::vector<Copy> pending;                // cp.async not yet committed
  std::vector<std::vector<Copy>> groups;    // committed groups, oldest first
};

// What lanes post for a warp collective: a row address (ldmatrix) or fragments (mma).
struct Post {
  const uint8_t* row;
  uint32_t a[4], b[2];
};

struct Cta {
  dim3 block_idx, grid_dim, block_dim;
  uint8_t* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Range> globals;
  CopyTiming timing = CopyTiming::kLazy;
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;
  bool barrier_or = false, barrier_result = false;
  std::vector<int> warp_arrived;
  std::vector<Post> posts;  // [warp][2 slots][lane]

  uint3 cur_thread_idx() const {
    const unsigned t = static_cast<unsigned>(cur->tid);
    return make_uint3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
  }
};

inline Cta* g_cta = nullptr;

inline Cta& cta() { return *g_cta; }
inline Thread& self() { return *g_cta->cur; }

inline void yield() {
  Thread& t = self();
  swapcontext(&t.ctx, &cta().scheduler);
}

// ---- barriers
// Complete when every thread that has not exited waits at a CTA barrier: release them all.
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
}

// bar.sync 0 (and bar.red.or): every thread of the CTA that has not exited (sm_70+ semantics).
inline bool syncthreads_or(bool vote) {
  Cta& c = cta();
  Thread& t = self();
  t.state = State::kAtBarrier;
  c.barrier_or = c.barrier_or || vote;
  release_barrier_if_complete();
  while (t.state == State::kAtBarrier) yield();
  return c.barrier_result;
}

inline int lane() { return self().tid % kWarpLanes; }
inline int warp() { return self().tid / kWarpLanes; }

// The slot this lane posts to for its next collective; two alternate, so a lane posting for the
// next collective never overwrites what another lane may still read for this one.
inline Post& post_slot(int w, int l) { return cta().posts[((size_t)w * 2 + (self().collectives & 1)) * kWarpLanes + l]; }

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

// ---- shared and global memory checks
inline bool in_smem(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  return b >= cta().smem && b + n <= cta().smem + cta().smem_bytes;
}

inline std::string where() {
  return "CTA " + std::to_string(cta().block_idx.x) + " thread " + std::to_string(self().tid);
}

inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + " not 16-byte aligned at " + where());
}

inline bool in_globals(const void* p, size_t n) {
  for (const auto& r : cta().globals)
    if (r.contains(p, n)) return true;
  return false;
}

// ---- cp.async
inline void apply(const Copy& c) {
  if (c.src) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  check_aligned16(dst, "cp.async destination");
  check_aligned16(src, "cp.async source");
  if (!in_smem(dst, 16)) fail("cp.async destination outside the dynamic shared memory at " + where());
  if (!in_globals(src, 16)) fail("cp.async source outside every input buffer at " + where());
  const Copy c{static_cast<uint8_t*>(dst), valid ? static_cast<const uint8_t*>(src) : nullptr};
  if (cta().timing == CopyTiming::kEager) apply(c);
  else self().pending.push_back(c);
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
  const int w = warp(), l = lane();
  Post* slot = &post_slot(w, 0);
  slot[l].row = static_cast<const uint8_t*>(row);
  warp_sync();
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
  const int w = warp(), l = lane();
  Post* slot = &post_slot(w, 0);
  std::memcpy(slot[l].a, a, sizeof(slot[l].a));
  slot[l].b[0] = b0;
  slot[l].b[1] = b1;
  warp_sync();
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
  const int g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * q + e % 2;
    double s = 0;
    for (int k = 0; k < 16; ++k) s += (double)A(row, k) * (double)B(k, col);
    d[e] = static_cast<float>(d[e] + s);
  }
  ++self().collectives;
}

// ---- running a grid
struct Launch {
  dim3 grid, block;
  size_t smem_bytes;
  CopyTiming timing;
  std::vector<Range> globals;
  std::vector<unsigned> order;  // CTAs in this order (empty: 0, 1, ...)
  // Warps run one at a time, each as far as it can (to a CTA barrier or its end) before the next
  // starts: lowest index first, or highest.  So a kernel missing a barrier between one warp's
  // write and another's read of shared memory reads stale or overwritten data in one of the two
  // schedules.
  bool reverse_threads = false;
  size_t stack_bytes = 128 * 1024;
};

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

// Run `kernel` over the grid; throws with the first failure (deadlock, bad copy, exception).
inline void run_grid(const Launch& L, const std::function<void()>& kernel) {
  const unsigned n_cta = L.grid.x * L.grid.y * L.grid.z;
  std::vector<unsigned> order = L.order;
  if (order.empty())
    for (unsigned i = 0; i < n_cta; ++i) order.push_back(i);
  Guarded smem_block(std::max<size_t>(L.smem_bytes, 16));
  uint8_t* smem = smem_block.data();
  for (unsigned b : order) {
    Cta c;
    c.block_idx = dim3(b % L.grid.x, (b / L.grid.x) % L.grid.y, b / (L.grid.x * L.grid.y));
    c.grid_dim = L.grid;
    c.block_dim = L.block;
    c.smem = smem;
    c.smem_bytes = L.smem_bytes;
    std::memset(smem, 0xA5, L.smem_bytes);  // shared memory starts as garbage
    c.globals = L.globals;
    c.timing = L.timing;
    c.body = kernel;
    const int n = L.block.x * L.block.y * L.block.z;
    if (n % kWarpLanes) fail("block size must be a whole number of warps");
    c.threads.resize(n);
    c.warp_arrived.assign(n / kWarpLanes, 0);
    c.posts.assign((size_t)n / kWarpLanes * 2 * kWarpLanes, Post{});
    g_cta = &c;
    for (int i = 0; i < n; ++i) {
      Thread& t = c.threads[i];
      t.tid = i;
      t.stack = std::make_unique<Guarded>(L.stack_bytes);
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = t.stack->data();
      t.ctx.uc_stack.ss_size = t.stack->bytes();
      t.ctx.uc_link = nullptr;
      makecontext(&t.ctx, thread_entry, 0);
    }
    for (;;) {
      bool ran = false;
      const int warps = n / kWarpLanes;
      for (int k = 0; k < warps && c.error.empty(); ++k) {
        const int w = L.reverse_threads ? warps - 1 - k : k;
        for (bool again = true; again && c.error.empty();) {  // this warp, until it is blocked
          again = false;
          for (int l = 0; l < kWarpLanes; ++l) {
            Thread& t = c.threads[(size_t)w * kWarpLanes + (L.reverse_threads ? kWarpLanes - 1 - l : l)];
            if (t.state != State::kRunnable) continue;
            c.cur = &t;
            swapcontext(&c.scheduler, &t.ctx);
            ran = again = true;
            if (!c.error.empty()) break;
          }
        }
      }
      if (!c.error.empty()) {
        g_cta = nullptr;
        fail("CTA " + std::to_string(b) + ": " + c.error);
      }
      int done = 0, at_barrier = 0, at_warp = 0;
      for (const auto& t : c.threads) {
        done += t.state == State::kDone;
        at_barrier += t.state == State::kAtBarrier;
        at_warp += t.state == State::kAtWarp;
      }
      if (done == n) break;
      if (!ran) {
        g_cta = nullptr;
        fail("CTA " + std::to_string(b) + " deadlocked: " + std::to_string(at_barrier) + " threads wait at " +
             "__syncthreads, " + std::to_string(at_warp) + " at a warp collective, " + std::to_string(done) +
             " exited");
      }
    }
    g_cta = nullptr;
  }
}

}  // namespace awq_twin

// ---- the CUDA built-ins the kernels use (every system header is included above: the
// attribute spellings below would break one that uses __attribute__((__noinline__)))
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
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

// prmt.b32 (no sign replication): byte i of the result is byte s_i of the 8-byte {b, a}.
inline uint32_t __byte_perm(uint32_t a, uint32_t b, uint32_t s) {
  const uint64_t x = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((x >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

// Device-only half intrinsics: one rounding of the exact result (as the hardware).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const float2 x = __half22float2(a), y = __half22float2(b), z = __half22float2(c);
  return __halves2half2(__double2half((double)x.x * y.x + z.x), __double2half((double)x.y * y.y + z.y));
}

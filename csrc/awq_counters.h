// Where a split-K launch finds its arrival counters (awq_ops.cpp: counters_for), eagerly and
// captured in a CUDA graph.  Plain host code: the CUDA build and the CPU twin
// (tests/cpu_twin/stream_twin.cpp) compile the same rule.
//
// Why.  Every split-K kernel's last arriver resets its counter to zero, so launches that run one
// after another can share counters with no memset between them -- provided the memory starts
// zeroed and nothing else ever writes it.  Captured launches need memory that outlives the capture
// (a graph replays long after), so they cannot take the caching allocator's (the graph's pool
// hands a freed block to a later allocation of the same capture, whose data the next replay would
// read as counts); giving each captured call a block of its own costs a memset node per call on
// every replay (a kernel, ~1-2 us at decode, where a whole int4 GEMM takes 5-50).  Instead each
// device has one arena, zeroed once outside any capture and never freed; eager launches take a
// slice of it per stream (capture id 0), captured ones a slice per stream and capture:
//  * the launches of one capture on one stream share a slice: a graph replays them in capture
//    order, as a stream runs eager launches (which share theirs);
//  * every other (stream, capture) pair gets a slice of its own: two graphs replayed at the same
//    time on two streams, or one graph's branches captured on different streams, never meet;
//  * a launch needing more counters than its slice holds gets a fresh, larger slice, which the
//    later launches of its capture and stream then share (the earlier ones keep theirs);
//  * slices are never handed out twice (no one can tell when a graph is destroyed), so the arena
//    is spent after ~kCaptureArenaCounters / kCaptureSliceCounters captured streams; after that a
//    launch falls back to counters of its own per call, zeroed by a (captured) memset -- correct,
//    one node more per call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <utility>

namespace awq {

// A slice's least size: enough for every launch of a model's layers (the stream kernel takes one
// counter per 128-column slice: N up to 128 K in one slice), so one slice serves a whole capture.
constexpr int64_t kCaptureSliceCounters = 1024;
// The arena per device: 4 MB of int32, 1024 minimal slices -- a serving engine captures ~35-70
// graphs (one per batch size), on one stream each.
constexpr int64_t kCaptureArenaCounters = int64_t(1) << 20;

class CounterSlices {
 public:
  explicit CounterSlices(int64_t capacity) : capacity_(capacity) {}

  // The offset into the arena of at least n counters for a launch on `stream` captured in
  // `capture` (cudaStreamGetCaptureInfo's id; 0: an eager launch), or -1 when the arena has no
  // room left for it.
  int64_t slice(uintptr_t stream, unsigned long long capture, int64_t n) {
    const std::pair<uintptr_t, unsigned long long> key{stream, capture};
    const auto it = current_.find(key);
    if (it != current_.end() && it->second.size >= n) return it->second.offset;
    const int64_t size = std::max(n, kCaptureSliceCounters);
    if (n < 1 || size > capacity_ - used_) return -1;
    const Slice s{used_, size};
    used_ += size;
    current_[key] = s;
    return s.offset;
  }

  int64_t used() const { return used_; }

 private:
  struct Slice {
    int64_t offset, size;
  };
  const int64_t capacity_;
  int64_t used_ = 0;
  std::map<std::pair<uintptr_t, unsigned long long>, Slice> current_;  // each pair's latest slice
};

}  // namespace awq

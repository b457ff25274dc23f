// qsengine core: deterministic block-parallel execution on std::thread.
//
// Work is cut into numbered blocks. Each block is computed independently (its
// random stream is keyed by the block number, never by the thread), and the
// per-block results are merged into the accumulator strictly in block order.
// Hence the result is bit-identical for any thread count, and memory stays
// bounded: at most `window` finished-but-unmerged blocks are held at once.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

namespace qs {

// Thrown by a computation that observed a cancellation request.
class Cancelled : public std::runtime_error {
 public:
  Cancelled() : std::runtime_error("qsengine: computation cancelled") {}
};

// Shared flag polled by workers; set from another thread (e.g. on SIGINT).
class CancelToken {
 public:
  void cancel() noexcept { flag_.store(true, std::memory_order_relaxed); }
  bool cancelled() const noexcept { return flag_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> flag_{false};
};

// Number of worker threads for a request: <= 0 means all hardware threads.
inline unsigned resolve_threads(int requested) {
  if (requested > 0) return static_cast<unsigned>(requested);
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1u : hw;
}

// Compute `compute(block)` for every block in [0, n_blocks) on `threads`
// threads and fold each result into `acc` with `merge(acc, std::move(r))`,
// in increasing block order. `compute` must be thread-safe and depend only
// on its block number; `merge` runs under a lock, one at a time.
// Throws Cancelled if `cancel` is set; rethrows the exception of the
// lowest-numbered failing block otherwise.
template <class Result, class Acc, class Compute, class Merge>
void ordered_block_reduce(std::uint64_t n_blocks, unsigned threads, Acc& acc, Compute compute,
                          Merge merge, const CancelToken* cancel = nullptr) {
  if (n_blocks == 0) return;
  threads = std::max(1u, threads);
  if (static_cast<std::uint64_t>(threads) > n_blocks) threads = static_cast<unsigned>(n_blocks);

  if (threads == 1) {
    for (std::uint64_t b = 0; b < n_blocks; ++b) {
      if (cancel && cancel->cancelled()) throw Cancelled();
      Result r = compute(b);
      merge(acc, std::move(r));
    }
    if (cancel && cancel->cancelled()) throw Cancelled();
    return;
  }

  const std::uint64_t window = 4ull * threads;
  std::mutex mu;
  std::condition_variable cv;
  std::uint64_t next_claim = 0;  // next block to hand out
  std::uint64_t next_merge = 0;  // next block to fold into acc
  bool stop = false;
  std::uint64_t error_block = n_blocks;
  std::exception_ptr error;
  std::map<std::uint64_t, Result> pending;

  auto worker = [&]() {
    for (;;) {
      std::uint64_t b;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || next_claim >= n_blocks || next_claim < next_merge + window; });
        if (stop || next_claim >= n_blocks) return;
        b = next_claim++;
      }
      if (cancel && cancel->cancelled()) {
        std::lock_guard<std::mutex> lock(mu);
        stop = true;
        cv.notify_all();
        return;
      }
      try {
        Result r = compute(b);
        std::lock_guard<std::mutex> lock(mu);
        if (stop) return;
        pending.emplace(b, std::move(r));
        while (!pending.empty() && pending.begin()->first == next_merge) {
          merge(acc, std::move(pending.begin()->second));
          pending.erase(pending.begin());
          ++next_merge;
        }
        cv.notify_all();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (b < error_block) {
          error_block = b;
          error = std::current_exception();
        }
        stop = true;
        cv.notify_all();
        return;
      }
    }
  };

  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  if (cancel && cancel->cancelled()) throw Cancelled();
}

}  // namespace qs

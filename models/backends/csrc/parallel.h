// Tasks shared between the calling thread and XLA's intra-op thread pool, for the FFI kernels in this folder.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace sparkler {

// Runs `task(0)` ... `task(n - 1)` and returns when all are done. The calling thread takes tasks from an atomic
// counter; with `share`, so do up to `pool.num_threads() - 1` helpers from XLA's pool, so no thread is started per
// call and a task nobody else picks up runs on the caller. The pool has a thread per core and the caller is
// usually not one of them (XLA runs a program on the PjRt client's thread): a helper per pool thread put one
// thread more than cores, the last one woke to find no task and took a core from those working (`bench/
// cpu_matmul.py` at one to four rows on two cores: 1.2-1.9x slower than with one helper; docs/PERFORMANCE.md,
// session 46). A helper that starts late finds no task left: it only touches the counters, which it co-owns. The
// caller spins for tasks still running on a helper (no pause: one thread per core, and the waits are short).
template <typename Task>
void RunTasks(xla::ffi::ThreadPool& pool, int64_t n, bool share, Task task) {
  struct State {
    State(Task t, int64_t n) : task(std::move(t)), n(n) {}
    Task task;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>(std::move(task), n);
  auto work = [](State& s) {
    for (int64_t t; (t = s.next.fetch_add(1)) < s.n;) {
      s.task(t);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = share ? std::min<int64_t>(pool.num_threads() - 1, n - 1) : 0;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->done.load(std::memory_order_acquire) < n) {
  }
}

}  // namespace sparkler

// Binding layer: run a core computation with the GIL released, stay responsive
// to Ctrl-C. The computation runs on a helper std::thread; the calling thread
// waits in short slices and, between slices, re-acquires the GIL to let Python
// run its signal handlers. A pending KeyboardInterrupt cancels the core (via
// its CancelToken), joins it, and propagates to Python. Inputs must already be
// converted to plain C++ values before calling this (GIL rules).
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#ifdef __GLIBCXX__
#include <cxxabi.h>  // abi::__forced_unwind
#endif
#include <future>
#include <thread>
#include <type_traits>
#include <utility>

#include "core/parallel.h"

namespace qs_py {

namespace py = pybind11;

template <class F>
auto run_interruptible(F&& f) -> std::invoke_result_t<F&, qs::CancelToken&> {
  using R = std::invoke_result_t<F&, qs::CancelToken&>;
  qs::CancelToken token;
  std::packaged_task<R()> task([&]() -> R { return f(token); });
  std::future<R> result = task.get_future();
  bool interrupted = false;
  {
    py::gil_scoped_release release;
    std::thread runner(std::move(task));
    // Stops and joins the runner on every way out of this scope; destroying a
    // joinable std::thread would call std::terminate.
    struct JoinOnExit {
      std::thread& t;
      qs::CancelToken& token;
      ~JoinOnExit() {
        if (t.joinable()) {
          token.cancel();
          t.join();
        }
      }
    } join_on_exit{runner, token};
#ifdef __GLIBCXX__
    try {
#endif
      while (result.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready) {
        py::gil_scoped_acquire acquire;
        if (PyErr_CheckSignals() != 0) {
          interrupted = true;
          token.cancel();
          break;
        }
      }
#ifdef __GLIBCXX__
    } catch (abi::__forced_unwind&) {
      // At interpreter shutdown Python ends a daemon thread that asks for the
      // GIL with a forced unwind (pthread_exit) out of gil_scoped_acquire. The
      // thread must then never ask for the GIL again: ~gil_scoped_release would,
      // and a second forced unwind inside a destructor calls std::terminate
      // ("terminate called without an active exception"). Stop the core, join
      // it, and let the unwind go on (pybind11 rethrows it too).
      token.cancel();
      runner.join();
      release.disarm();
      throw;
    }
#endif
    runner.join();
  }
  if (interrupted) {
    // The Python error (usually KeyboardInterrupt) is still set: raise it.
    throw py::error_already_set();
  }
  try {
    return result.get();
  } catch (const qs::Cancelled&) {
    throw py::error_already_set();
  }
}

}  // namespace qs_py

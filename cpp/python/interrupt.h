// Binding layer: run core computations with the GIL released.
//
// run_interruptible runs the computation on a helper std::thread; the calling
// thread waits in short slices and, between slices, re-acquires the GIL to let
// Python run its signal handlers. A pending KeyboardInterrupt cancels the core
// (via its CancelToken), joins it, and propagates to Python. without_gil runs a
// short pure kernel on the calling thread with the GIL released. Inputs must
// already be converted to plain C++ values (GIL rules).
//
// Both re-acquire the GIL in ordinary code, never in a destructor (so not with
// py::gil_scoped_release). At interpreter shutdown CPython ends a daemon thread
// that asks for the GIL with a forced unwind (pthread_exit out of
// PyEval_RestoreThread). Out of ordinary code that unwind passes up through
// pybind11 and ends the thread quietly; out of a destructor (implicitly
// noexcept) it calls std::terminate: "terminate called without an active
// exception", seen when Ctrl-C ended a study while Dask worker threads were in
// the core.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <exception>
#include <future>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>

#include "core/parallel.h"

namespace qs_py {

namespace py = pybind11;

// f() with the GIL released on the calling thread; the GIL is held again on
// every way out (an exception from f is rethrown after re-acquiring it).
template <class F>
auto without_gil(F&& f) -> std::invoke_result_t<F&> {
  using R = std::invoke_result_t<F&>;
  std::exception_ptr error;
  PyThreadState* ts = PyEval_SaveThread();
  if constexpr (std::is_void_v<R>) {
    try {
      f();
    } catch (...) {
      error = std::current_exception();
    }
    PyEval_RestoreThread(ts);  // may end this thread at shutdown: ordinary code, fine
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<R> out;
    try {
      out.emplace(f());
    } catch (...) {
      error = std::current_exception();
    }
    PyEval_RestoreThread(ts);
    if (error) std::rethrow_exception(error);
    return std::move(*out);
  }
}

template <class F>
auto run_interruptible(F&& f) -> std::invoke_result_t<F&, qs::CancelToken&> {
  using R = std::invoke_result_t<F&, qs::CancelToken&>;
  qs::CancelToken token;
  std::packaged_task<R()> task([&]() -> R { return f(token); });
  std::future<R> result = task.get_future();
  std::thread runner(std::move(task));  // started under the GIL: a failure to start is an ordinary exception
  bool interrupted = false;
  PyThreadState* ts = PyEval_SaveThread();
  try {
    while (result.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready) {
      PyEval_RestoreThread(ts);
      const int signalled = PyErr_CheckSignals();
      ts = PyEval_SaveThread();
      if (signalled != 0) {
        interrupted = true;
        token.cancel();
        break;
      }
    }
  } catch (...) {
    // Only the shutdown forced unwind (abi::__forced_unwind) out of
    // PyEval_RestoreThread gets here. This thread holds no GIL and must never
    // ask for it again: stop the core, join it (destroying a joinable
    // std::thread calls std::terminate) and let the unwind go on.
    token.cancel();
    runner.join();
    throw;
  }
  runner.join();
  PyEval_RestoreThread(ts);  // may end this thread at shutdown: ordinary code, the runner is joined
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

// Minimal check macros shared by the core's *.test.cc executables (ctest).
#pragma once

#include <cstdio>
#include <string>

#include "core/errors.h"

namespace qs::test {

inline int failures = 0;

// True if f() throws qs::InvalidArgument whose message contains needle.
template <class F>
bool throws_invalid(F f, const char* needle) {
  try {
    f();
  } catch (const qs::InvalidArgument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

// Exit status of a test executable: prints the failure count.
inline int report(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}

}  // namespace qs::test

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
      ++qs::test::failures;                                                             \
    }                                                                                   \
  } while (0)

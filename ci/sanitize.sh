#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ core and the
# Python extension (docs/reliability.md, "Sanitizers").
#
#   1. the standalone core (cmake -DQSENGINE_SANITIZE=ON -DQSENGINE_BUILD_TESTS=ON)
#      and its ctest executables;
#   2. the extension built with -Ccmake.define.QSENGINE_SANITIZE=ON into its own
#      venv, and the whole pytest suite run there with the sanitizer runtimes
#      preloaded into CPython.
#
# Leak detection is off (CPython keeps objects alive until exit by design); any
# ASan error or UBSan finding aborts the process and fails the run. Runtime on
# 2 cores: about 4.5 minutes from scratch, both builds included (docs/reliability.md).
#
# Usage: ci/sanitize.sh [PYTHON]   (PYTHON: the interpreter that makes the
# sanitizer venv; default python3). Needs the network (or a pip cache) for
# the test dependencies, like .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
BUILD=${QSENGINE_SANITIZE_BUILD:-build/sanitize}
CXX=${CXX:-g++}
start=$SECONDS

libasan=$("$CXX" -print-file-name=libasan.so)
libubsan=$("$CXX" -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
  if [ ! -e "$lib" ]; then
    echo "sanitize: $lib not found (install the compiler's sanitizer runtimes, e.g. libasan/libubsan)" >&2
    exit 1
  fi
done
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)

echo "== sanitize: C++ core + ctest (ASan+UBSan)"
cmake -S . -B "$BUILD/core" "${gen[@]}" -DQSENGINE_BUILD_TESTS=ON -DQSENGINE_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD/core" --parallel 2
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  ctest --test-dir "$BUILD/core" --output-on-failure

echo "== sanitize: Python extension (ASan+UBSan) in its own venv $BUILD/venv"
# A separate environment, not PYTHONPATH: an editable install's import hook
# would shadow a sanitized module put on the path.
rm -rf "$BUILD/venv"
"$PY" -m venv "$BUILD/venv"
VPY="$BUILD/venv/bin/python"
"$VPY" -m pip install -q ".[test]" \
  -Ccmake.define.QSENGINE_SANITIZE=ON -Ccmake.build-type=RelWithDebInfo -Cbuild-dir="$BUILD/py"

export LD_PRELOAD="$libasan:$libubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export QSENGINE_SANITIZED=1   # tests with minutes of pure compute skip themselves (see docs/reliability.md)
# The fuzz suite runs a quarter of its CI budget here: ASan makes it ~5x slower,
# and the normal run already covers the Python-level outcomes.
export QSENGINE_FUZZ_SCALE=${QSENGINE_FUZZ_SCALE:-0.25}
# The sanitized module must be the one imported.
"$VPY" -c 'import qsengine._core as c, sys; p = c.__file__; print("sanitize: using", p); sys.exit(0 if "/sanitize/venv/" in p else 1)'
"$VPY" -c 'import qsengine._core as c, sys; sys.exit(0 if "__asan_init" in open(c.__file__, "rb").read().decode("latin-1") else 1)' \
  || { echo "sanitize: the installed module is not instrumented" >&2; exit 1; }
# test_cpp_core.py builds an unsanitized core with cmake/g++; the sanitized
# ctest above replaces it (and running the compiler under LD_PRELOAD is slow).
"$VPY" -m pytest -q -p no:cacheprovider tests --deselect tests/test_cpp_core.py::test_core_builds_alone_and_passes_ctest
echo "== sanitize: passed in $((SECONDS - start)) s"

// qsengine core: the calibrated kernels' soft maximum (x^p + y^p)^(1/p) over
// many values at once (docs/model.md, "Calibrated kernels"). Its two powers are
// most of the step model's arithmetic; on x86-64 with glibc's vector math
// library (libmvec, glibc >= 2.22) and an AVX2 CPU they run four at a time
// (_ZGVdN4vv_pow, glibc's documented vector ABI: at most 1 ulp from pow),
// else one at a time with std::pow. Every value takes the same path whatever
// the values beside it, so a lane's result does not depend on its block.
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/step.h"

#if defined(QS_HAVE_LIBMVEC)
#include <immintrin.h>
extern "C" __m256d _ZGVdN4vv_pow(__m256d x, __m256d y);  // glibc libmvec
#endif

namespace qs {
namespace step {
namespace {

#if defined(QS_HAVE_LIBMVEC)
__attribute__((target("avx2,fma"))) void pow_avx2(std::int64_t n, const double* x, const double* y, double* out) {
  for (std::int64_t i = 0; i < n; i += 4) {
    _mm256_storeu_pd(out + i, _ZGVdN4vv_pow(_mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i)));
  }
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// out[i] = x[i]^y[i] for i < n (n a multiple of 4).
void pow_lanes(std::int64_t n, const double* x, const double* y, double* out) {
#if defined(QS_HAVE_LIBMVEC)
  if (cpu_has_avx2()) {
    pow_avx2(n, x, y, out);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) out[i] = std::pow(x[i], y[i]);
}

}  // namespace

bool soft_max_is_vectorised() {
#if defined(QS_HAVE_LIBMVEC)
  return cpu_has_avx2();
#else
  return false;
#endif
}

void soft_max_block(std::int64_t n, const double* x, const double* y, const double* p, double* out) {
  if (n <= 0) return;
  const std::int64_t n4 = (n + 3) / 4 * 4;  // padded with r = 0, p = 1 (finite, unused)
  thread_local std::vector<double> buffers[6];
  std::vector<double>(&buf)[6] = buffers;  // the thread's buffers, looked up once per call
  for (auto& a : buf) {
    if (a.size() < static_cast<std::size_t>(n4)) a.resize(static_cast<std::size_t>(n4));
  }
  std::vector<double>&hi = buf[0], &r = buf[1], &pw = buf[2], &u = buf[3], &inv = buf[4], &v = buf[5];
  for (std::int64_t i = 0; i < n; ++i) {
    // numpy's maximum/minimum (a NaN gives NaN), then r = lo/hi (0 where hi <= 0)
    const double a = x[i], b = y[i];
    const double h = std::isnan(a) ? a : std::isnan(b) ? b : (a >= b ? a : b);
    const double l = std::isnan(a) ? a : std::isnan(b) ? b : (a <= b ? a : b);
    hi[i] = h;
    r[i] = h > 0 ? l / h : 0.0;
    pw[i] = p[i];
  }
  for (std::int64_t i = n; i < n4; ++i) {
    r[i] = 0.0;
    pw[i] = 1.0;
  }
  pow_lanes(n4, r.data(), pw.data(), u.data());
  for (std::int64_t i = 0; i < n4; ++i) {
    u[i] = 1.0 + u[i];
    inv[i] = 1.0 / pw[i];
  }
  pow_lanes(n4, u.data(), inv.data(), v.data());
  for (std::int64_t i = 0; i < n; ++i) out[i] = hi[i] * v[i];
}

}  // namespace step
}  // namespace qs

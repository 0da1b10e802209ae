#include "vec.h"

#include <cmath>

#if defined(PROSPARSE_X86) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define PS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PS_CLONES
#endif

namespace ps {

PS_CLONES void vec_axpy(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

PS_CLONES void vec_scale(float* y, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

PS_CLONES void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps) {
    double ss = 0.0;  // double: the mean of squares over thousands of elements
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
    const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

}  // namespace ps

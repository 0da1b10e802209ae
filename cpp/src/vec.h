// Small f32 vector routines used outside the weight kernels (residual adds, scales, norms).
// Each is compiled for several instruction sets with GCC's target_clones and picked at load
// time, so the baseline build still runs them with AVX-512 where the CPU has it.
#pragma once

#include <cstdint>

namespace ps {

void vec_axpy(float* y, float a, const float* x, int64_t n);  // y += a * x (BLAS's order)
void vec_scale(float* y, float a, int64_t n);                 // y *= a
// y = x / sqrt(mean(x^2) + eps) * w   (RMSNorm, as LLaMA and transformers compute it)
void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps);

}  // namespace ps

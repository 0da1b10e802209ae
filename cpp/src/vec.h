// Small f32 vector routines used outside the weight kernels (residual adds, scales, norms), run by
// the active kernel set (cpu/kernels.h), so PROSPARSE_ISA picks them with the rest.
#pragma once

#include <cstdint>

namespace ps {

void vec_axpy(float* y, float a, const float* x, int64_t n);  // y = fma(a, x, y), element by element
void vec_scale(float* y, float a, int64_t n);                 // y *= a
// y = x / sqrt(mean(x^2) + eps) * w   (RMSNorm, as LLaMA and transformers compute it)
void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps);

}  // namespace ps

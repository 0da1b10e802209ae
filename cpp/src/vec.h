// Small f32 vector routines used outside the weight kernels (norms, attention, RoPE).
// Each is compiled for several instruction sets with GCC's target_clones and picked at load
// time, so the baseline build still runs them with AVX-512 where the CPU has it.
#pragma once

#include <cstdint>

namespace ps {

float vec_dot(const float* a, const float* b, int64_t n);
void vec_axpy(float* y, float a, const float* x, int64_t n);  // y += a * x (BLAS's order)
void vec_scale(float* y, float a, int64_t n);                 // y *= a
// y = x / sqrt(mean(x^2) + eps) * w   (RMSNorm, as LLaMA and transformers compute it)
void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps);
// x = softmax(x) in place; returns nothing. Max-subtracted for stability.
void softmax(float* x, int64_t n);

}  // namespace ps

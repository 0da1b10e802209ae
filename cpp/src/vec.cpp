// The residual-stream vector routines run through the kernel set chosen once for the CPU
// (cpu/dispatch.cpp, PROSPARSE_ISA), whose sets give the same bits in every instruction set.
#include "vec.h"

#include "cpu/kernels.h"

namespace ps {

void vec_axpy(float* y, float a, const float* x, int64_t n) { cpu::kernels().vec_axpy(y, a, x, n); }

void vec_scale(float* y, float a, int64_t n) { cpu::kernels().vec_scale(y, a, n); }

void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps) {
    cpu::kernels().rms_norm(y, x, w, n, eps);
}

}  // namespace ps

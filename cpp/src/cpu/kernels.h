// The compute kernels, one set per instruction set, behind a single dispatch point.
// kernels_scalar.cpp is the reference; kernels_avx2.cpp and kernels_avx512.cpp are compiled
// with their instruction sets and only ever called after a run-time CPU check (dispatch.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant.h"

namespace ps::cpu {

// The format activations are converted to before they meet weights of type `w`:
// F32 for F32/F16/BF16 weights, Q8_0 for Q8_0/Q4_0, our Q8_1 for Q4_1.
size_t act_row_bytes(GgmlType w, int64_t k);

struct KernelSet {
    const char* isa;  // "scalar", "avx2", "avx512"

    // Convert one activation row of k floats to the format weights of type w multiply with.
    void (*quantize_act)(GgmlType w, const float* x, void* xa, int64_t k);

    // Y[c * ldy + r] = dot(row r of W, activation row c), for r < nr and c < nc.
    // Rows of W are w_stride bytes apart, activation rows x_stride bytes apart. k is a multiple
    // of the block size of w.
    void (*gemm)(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr,
                 const void* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy);
};

// The best set this CPU supports, chosen once. PROSPARSE_ISA=scalar|avx2|avx512 forces one.
const KernelSet& kernels();
// A named set if this build has it and this CPU supports it, else nullptr (tests use this).
const KernelSet* kernels_for(const char* isa);

// Per instruction set (defined in the kernels_*.cpp files).
extern const KernelSet kScalarKernels;
#if defined(PROSPARSE_X86)
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif

}  // namespace ps::cpu

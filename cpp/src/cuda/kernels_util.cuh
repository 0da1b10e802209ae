// What the kernel files share: launch checking, argument checks and the weight-type dispatch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "block_math.h"
#include "common.h"
#include "cuda/device.h"
#include "cuda/kernels.h"

namespace ps::cuda::detail {

inline cudaStream_t stream(Stream s) { return static_cast<cudaStream_t>(s); }

// Throws CudaError naming the kernel if its launch failed (bad configuration, no image for this
// device, an earlier asynchronous error).
inline void check_launch(const char* kernel) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        throw CudaError(strfmt("CUDA: launching %s failed: %s (error %d: %s)", kernel, cudaGetErrorName(e), int(e),
                               cudaGetErrorString(e)));
}

inline void require(bool ok, const char* fn, const char* what) {
    if (!ok) fail(strfmt("cuda::%s: %s", fn, what));
}

inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Alignment a weight row of type w needs (kernels.h).
inline size_t row_align(GgmlType w) { return w == GgmlType::F32 || w == GgmlType::Q4_1 ? 4 : 2; }

inline bool is_float(GgmlType w) { return w == GgmlType::F32 || w == GgmlType::F16 || w == GgmlType::BF16; }

// Elements per block of w (1 for the float types).
inline int64_t block_size(GgmlType w) { return bm::block_elems(w); }

// Checks a weight matrix argument: a supported type, k a whole number of blocks, aligned rows at
// least as long as the row's bytes.
inline void check_weights(const char* fn, GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr) {
    if (!kernel_type_supported(w)) fail(strfmt("cuda::%s: no kernel for weight type %s", fn, type_name(w)));
    if (k <= 0 || k % block_size(w) != 0)
        fail(strfmt("cuda::%s: a row of %lld %s weights is not a whole number of blocks", fn, (long long)k, type_name(w)));
    if (nr < 0) fail(strfmt("cuda::%s: negative row count", fn));
    if (nr > 0 && !W) fail(strfmt("cuda::%s: null weight pointer", fn));
    if (!aligned(W, row_align(w)) || w_stride % row_align(w) != 0)
        fail(strfmt("cuda::%s: %s rows must start on %zu-byte boundaries", fn, type_name(w), row_align(w)));
    if (w_stride < row_bytes(w, k)) fail(strfmt("cuda::%s: row stride %zu is shorter than a row (%zu bytes)", fn, w_stride, row_bytes(w, k)));
}

template <GgmlType T>
using TypeC = std::integral_constant<GgmlType, T>;

// f(TypeC<w>{}) for a supported weight type (the caller has checked it).
template <class F>
void with_type(GgmlType w, F&& f) {
    switch (w) {
        case GgmlType::F32: f(TypeC<GgmlType::F32>{}); return;
        case GgmlType::F16: f(TypeC<GgmlType::F16>{}); return;
        case GgmlType::BF16: f(TypeC<GgmlType::BF16>{}); return;
        case GgmlType::Q8_0: f(TypeC<GgmlType::Q8_0>{}); return;
        case GgmlType::Q4_0: f(TypeC<GgmlType::Q4_0>{}); return;
        case GgmlType::Q4_1: f(TypeC<GgmlType::Q4_1>{}); return;
        case GgmlType::Q5_0: f(TypeC<GgmlType::Q5_0>{}); return;
        case GgmlType::Q5_1: f(TypeC<GgmlType::Q5_1>{}); return;
        case GgmlType::IQ4_NL: f(TypeC<GgmlType::IQ4_NL>{}); return;
        case GgmlType::Q2_K: f(TypeC<GgmlType::Q2_K>{}); return;
        case GgmlType::Q3_K: f(TypeC<GgmlType::Q3_K>{}); return;
        case GgmlType::Q4_K: f(TypeC<GgmlType::Q4_K>{}); return;
        case GgmlType::Q5_K: f(TypeC<GgmlType::Q5_K>{}); return;
        case GgmlType::Q6_K: f(TypeC<GgmlType::Q6_K>{}); return;
        default: fail(strfmt("no CUDA kernel for weight type %s", type_name(w)));
    }
}

inline unsigned blocks_for(int64_t n, int per_block) { return unsigned((n + per_block - 1) / per_block); }

}  // namespace ps::cuda::detail

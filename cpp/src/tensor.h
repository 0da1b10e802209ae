// A view of one weight tensor: inside the memory-mapped GGUF file, or a buffer made at load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "quant.h"

namespace ps {

// How a 2-D tensor's rows lie in memory. PLAIN is the file's layout (GGUF rows one after another).
// INTERLEAVED8 is ours, made at load for weights that matmul always reads whole (cpu/kernels.h,
// "Interleaved rows"): only matmul reads it; gathered rows and the axpy need PLAIN.
enum class RowLayout { PLAIN, INTERLEAVED8 };

struct Tensor {
    std::string name;
    GgmlType type = GgmlType::F32;
    RowLayout layout = RowLayout::PLAIN;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the fastest (row length)
    const uint8_t* data = nullptr;  // points into the mapping or a buffer the model owns; never owned here
    size_t nbytes = 0;

    int64_t nrows() const { return ne[1] * ne[2] * ne[3]; }
    size_t row_stride() const { return row_bytes(type, ne[0]); }
    const uint8_t* row(int64_t r) const { return data + size_t(r) * row_stride(); }
};

}  // namespace ps

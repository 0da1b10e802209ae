// A view of one weight tensor inside the memory-mapped GGUF file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "quant.h"

namespace ps {

struct Tensor {
    std::string name;
    GgmlType type = GgmlType::F32;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the fastest (row length)
    const uint8_t* data = nullptr;  // points into the mapping; never owned
    size_t nbytes = 0;

    int64_t nrows() const { return ne[1] * ne[2] * ne[3]; }
    size_t row_stride() const { return row_bytes(type, ne[0]); }
    const uint8_t* row(int64_t r) const { return data + size_t(r) * row_stride(); }
};

}  // namespace ps

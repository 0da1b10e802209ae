// Whole-tensor operations built on the kernels and the thread pool.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor.h"
#include "threadpool.h"

namespace ps {

// Y[t * n_out + r] = dot(row r of W, X[t * k ...]) for every row r of the 2-D weight W
// ({k, n_out} in ggml order) and every token t < n_tokens. X is f32, row-major [n_tokens][k].
// `scratch` holds the converted activations; it grows as needed and is reused across calls.
// Work is split into fixed row chunks, so results do not depend on the thread count.
void matmul(ThreadPool& pool, const Tensor& W, const float* X, int64_t n_tokens, float* Y,
            std::vector<uint8_t>& scratch);

}  // namespace ps

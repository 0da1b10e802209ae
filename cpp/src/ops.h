// Whole-tensor operations built on the kernels and the thread pool.
// Every one splits its work into pieces whose size depends only on the shapes, never on the
// thread count, and fixes the order of every sum: results are bitwise the same for any number of
// threads and on every run (docs/design.md "Determinism").
#pragma once

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
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

// Sparse gate/up: like matmul, over the listed rows only:
// Y[t * n + i] = dot(row rows[i] of W, X[t]) for i < n. Throws if a row index is out of range.
void matmul_rows(ThreadPool& pool, const Tensor& W, const int32_t* rows, int64_t n,
                 const float* X, int64_t n_tokens, float* Y, std::vector<uint8_t>& scratch);

// Sparse down projection from the neuron-major ffn_down_t W ({n_embd, n_ff}: one row of n_embd
// weights per neuron): Y[t * n_embd + j] += sum_i C[t * n + i] * W[rows[i]][j], summed in the
// kernels' fixed neuron groups after what Y holds (cpu/kernels.h, axpy_rows), so a token's result
// depends only on its own coefficients, not on the batch or the thread count. rows (ascending)
// == nullptr means rows 0..n-1 (the dense case; a row range of W starts at a group boundary).
void axpy_rows(ThreadPool& pool, const Tensor& W, const int32_t* rows, int64_t n, const float* C,
               int64_t n_tokens, float* Y);

// Rows [begin, end) of the 2-D weight W as a tensor of their own (a view of the same memory).
// An interleaved W splits only at multiples of its 8-row groups.
Tensor row_range(const Tensor& W, int64_t begin, int64_t end);

// Interleaved copies (cpu/kernels.h, "Interleaved rows") of weights that matmul always reads
// whole, made at load, all in one block of memory that this owns.
struct InterleavedSet {
    std::deque<Tensor> tensors;  // stable addresses: the layer weights point at them
    std::unique_ptr<uint8_t, void (*)(void*)> buf{nullptr, std::free};
};
bool can_interleave(const Tensor& W);
// Copies of ws (each must pass can_interleave, else this throws), in order. Throws if memory runs out.
std::unique_ptr<InterleavedSet> interleave(ThreadPool& pool, const std::vector<const Tensor*>& ws);

// Reads buf[0, n) once with the pool's threads (a contiguous slice each, several independent sums,
// software prefetch 8 KiB ahead as the kernels do): one pass of the host read-bandwidth measurement
// (_core._testing.read_bandwidth, bench/). Here rather than in the bindings, which nanobind builds
// with -Os. Returns a checksum, so that the sums are live.
uint64_t read_sweep(ThreadPool& pool, const uint64_t* buf, size_t n);

}  // namespace ps

// llama.cpp's block layouts (ggml-common.h) and our activation blocks: plain structs that host
// and device code share (the CUDA kernels include this header as the CPU kernels do), so a layout
// is written once. Arithmetic on the blocks that both sides run lives beside it in headers marked
// PS_HD, never in a .cpp or .cu of one side only.
#pragma once

#include <cstdint>

// Functions both the CPU and a CUDA kernel call: __host__ __device__ under nvcc, plain inline
// otherwise.
#if defined(__CUDACC__)
#define PS_HD __host__ __device__ __forceinline__
#else
#define PS_HD inline
#endif

namespace ps {

constexpr int QK = 32;  // weights per block for Q4_0, Q4_1, Q8_0 (and our Q8_1 activations)

#pragma pack(push, 1)
struct block_q8_0 { uint16_t d; int8_t qs[QK]; };            // x = d * q
struct block_q4_0 { uint16_t d; uint8_t qs[QK / 2]; };       // x = d * (q - 8); low nibble j, high j+16
struct block_q4_1 { uint16_t d; uint16_t m; uint8_t qs[QK / 2]; };  // x = d * q + m
// Activation format used against Q4_1 weights (internal, never in a file): s = d * sum(qs).
struct block_q8_1 { float d; float s; int8_t qs[QK]; };
#pragma pack(pop)
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 layout");

}  // namespace ps

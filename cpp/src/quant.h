// Weight types (llama.cpp's block layouts are in blocks.h), plus reference (scalar)
// conversion routines. The SIMD kernels live in cpu/; these are the definitions they are
// tested against.
#pragma once

#include <cstddef>
#include <cstdint>

#include "blocks.h"

namespace ps {

// ggml's type ids as stored in GGUF. Only some are supported; the rest are named so that a
// refusal can say which type a file used.
enum class GgmlType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
    IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
    TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

// The block layouts (block_q8_0, block_q4_0, block_q4_1, block_q8_1, QK) are in blocks.h.

struct TypeInfo {
    const char* name;      // llama.cpp's name: "f32", "q4_0", ...
    int64_t block_size;    // elements per block (1 for float types); 0 if unknown layout
    size_t block_bytes;    // bytes per block; 0 if unknown layout
    bool supported;        // can we compute with it
};

// nullptr for an id that ggml never defined.
const TypeInfo* type_info(uint32_t type_id);
// "q4_k", or "unknown(77)" for ids ggml never defined.
const char* type_name(uint32_t type_id);
inline const char* type_name(GgmlType t) { return type_name(uint32_t(t)); }
bool type_supported(GgmlType t);
// Bytes of n elements of type t; n must be a multiple of the block size (checked by callers).
size_t row_bytes(GgmlType t, int64_t n);

float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);   // round to nearest even, like F16C / numpy
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);   // round to nearest even; NaN stays NaN

// Reference conversions, bit-compatible with llama.cpp's (ggml-quants.c *_ref functions).
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);
void quantize_row(GgmlType t, const float* src, void* dst, int64_t n);
// Our Q8_1 activation format (see block_q8_1).
void quantize_row_q8_1(const float* src, block_q8_1* dst, int64_t n);

}  // namespace ps

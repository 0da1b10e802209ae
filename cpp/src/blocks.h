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

// ---- Q5_0, Q5_1, IQ4_NL (32 weights) and the K-quants (256-weight super-blocks) -------------------
// Field order and sizes as ggml-common.h. Nibbles: byte j holds element j (low) and j + 16 (high)
// of a 32-block, as Q4_0. The K-quants' 6-bit scales (Q4_K, Q5_K) and Q3_K's packed scales are
// unpacked by the helpers below.
constexpr int QK_K = 256;  // weights per K-quant super-block
constexpr int K_SCALE_SIZE = 12;

#pragma pack(push, 1)
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };            // x = d * (q - 16); bit j of qh: element j's fifth bit
struct block_q5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[QK / 2]; };  // x = d * q + m
struct block_iq4_nl { uint16_t d; uint8_t qs[QK / 2]; };                           // x = d * kvalues_iq4nl[q]
struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; uint16_t d; uint16_t dmin; };
struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; uint16_t d; };
struct block_q4_K { uint16_t d; uint16_t dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };
struct block_q5_K { uint16_t d; uint16_t dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
// Activation format used against the K-quants (as ggml's; internal, never in a file):
// x = d * q, bsums[i] = sum of qs[16 i .. 16 i + 15].
struct block_q8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };
#pragma pack(pop)
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 layout");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 layout");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl layout");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K layout");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K layout");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");

// IQ4_NL's 16 levels (ggml-common.h kvalues_iq4nl).
constexpr int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Q4_K / Q5_K: scale and min of sub-block j (< 8) from the 12 packed bytes (ggml's get_scale_min_k4).
PS_HD void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Q3_K: the 16 signed 6-bit scales (-32..31) from the 12 packed bytes.
PS_HD void unpack_q3_k_scales(const uint8_t* s, int8_t out[16]) {
    for (int j = 0; j < 16; ++j) {
        const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
        const int hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
        out[j] = int8_t((lo | (hi << 4)) - 32);
    }
}

}  // namespace ps

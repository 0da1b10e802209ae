// Weight-type table and the reference (scalar) conversions.
//
// The quantizers follow ggml-quants.c's quantize_row_*_ref operation for operation, so that a
// file we write is byte-identical to one written by llama.cpp or by the gguf package (whose numpy
// quantizers make the same promise); tests/test_quant.py checks that against gguf.quants.
#include "quant.h"

#include <cmath>
#include <cstring>

#include "block_math.h"
#include "common.h"
#include "cpu/kernels.h"

// Bit-exactness needs every product rounded before the following add: a fused multiply-add
// (which GCC would otherwise form on targets that have one, e.g. aarch64) rounds once and gives
// different low bits than llama.cpp's x86 build and numpy.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace ps {

namespace {

// Indexed by ggml type id. Layouts from ggml-common.h (sizeof each block_*); names as the gguf
// package spells them, lower-cased (llama.cpp prints the K-quants as "q4_K"). Ids that ggml
// defined and later removed keep their name with no layout, so a refusal can still say what
// the file holds.
constexpr TypeInfo kTypes[] = {
    /*  0 */ {"f32", 1, 4, true},
    /*  1 */ {"f16", 1, 2, true},
    /*  2 */ {"q4_0", 32, 18, true},
    /*  3 */ {"q4_1", 32, 20, true},
    /*  4 */ {"q4_2", 0, 0, false},  // removed from ggml in 2023
    /*  5 */ {"q4_3", 0, 0, false},  // removed from ggml in 2023
    /*  6 */ {"q5_0", 32, 22, true},
    /*  7 */ {"q5_1", 32, 24, true},
    /*  8 */ {"q8_0", 32, 34, true},
    /*  9 */ {"q8_1", 32, 36, false},  // ggml's: fp16 d and s (our in-memory block_q8_1 differs)
    /* 10 */ {"q2_k", 256, 84, true},
    /* 11 */ {"q3_k", 256, 110, true},
    /* 12 */ {"q4_k", 256, 144, true},
    /* 13 */ {"q5_k", 256, 176, true},
    /* 14 */ {"q6_k", 256, 210, true},
    /* 15 */ {"q8_k", 256, 292, false},
    /* 16 */ {"iq2_xxs", 256, 66, false},
    /* 17 */ {"iq2_xs", 256, 74, false},
    /* 18 */ {"iq3_xxs", 256, 98, false},
    /* 19 */ {"iq1_s", 256, 50, false},
    /* 20 */ {"iq4_nl", 32, 18, true},
    /* 21 */ {"iq3_s", 256, 110, false},
    /* 22 */ {"iq2_s", 256, 82, false},
    /* 23 */ {"iq4_xs", 256, 136, false},
    /* 24 */ {"i8", 1, 1, false},
    /* 25 */ {"i16", 1, 2, false},
    /* 26 */ {"i32", 1, 4, false},
    /* 27 */ {"i64", 1, 8, false},
    /* 28 */ {"f64", 1, 8, false},
    /* 29 */ {"iq1_m", 256, 56, false},
    /* 30 */ {"bf16", 1, 2, true},
    /* 31 */ {"q4_0_4_4", 0, 0, false},  // repacked layouts, removed from files in 2024
    /* 32 */ {"q4_0_4_8", 0, 0, false},
    /* 33 */ {"q4_0_8_8", 0, 0, false},
    /* 34 */ {"tq1_0", 256, 54, false},
    /* 35 */ {"tq2_0", 256, 66, false},
    /* 36 */ {"iq4_nl_4_4", 0, 0, false},
    /* 37 */ {"iq4_nl_4_8", 0, 0, false},
    /* 38 */ {"iq4_nl_8_8", 0, 0, false},
    /* 39 */ {"mxfp4", 32, 17, false},
    /* 40 */ {"nvfp4", 64, 36, false},
    /* 41 */ {"q1_0", 128, 18, false},
};
constexpr uint32_t kNumTypes = sizeof(kTypes) / sizeof(kTypes[0]);

// One name buffer per thread for "unknown(N)", so the returned pointer stays valid until the
// same thread asks again (callers format it into a message immediately).
thread_local char tl_unknown_name[32];

inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// llama.cpp converts with plain C casts, which are undefined behaviour for NaN or out-of-range
// values (those only arise from non-finite input). These agree with the cast for every value the
// cast defines and give 0 / the nearest bound otherwise.
inline int trunc_to_int(float v, int lo, int hi) {
    if (!(v == v)) return 0;
    if (v <= float(lo)) return lo;
    if (v >= float(hi)) return hi;
    return int(v);
}
inline int8_t round_to_i8(float v) {  // roundf: half away from zero, like ggml's and np_roundf
    return int8_t(trunc_to_int(std::roundf(v), -128, 127));
}

void check_blocks(GgmlType t, int64_t n, int64_t qk) {
    if (n < 0 || n % qk != 0)
        fail(strfmt("%s row of %lld elements is not a whole number of %lld-element blocks",
                    type_name(t), (long long)n, (long long)qk));
}

// ---- Q8_0: d = amax / 127, q = round(x / d) ------------------------------------------------
void quantize_q8_0(const float* x, block_q8_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK; ++j) y[i].qs[j] = round_to_i8(x[j] * id);
    }
}

// ---- Q4_0: d = m / -8 where m is the element of largest magnitude (sign kept), so m maps to
// q = 0 exactly and the other end of the range gets the extra level. -------------------------
void quantize_q4_0(const float* x, block_q4_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; ++j) {
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
        }
        const float d = max / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK / 2; ++j) {
            const int q0 = trunc_to_int(x[j] * id + 8.5f, 0, 15);
            const int q1 = trunc_to_int(x[j + QK / 2] * id + 8.5f, 0, 15);
            y[i].qs[j] = uint8_t(q0 | (q1 << 4));
        }
    }
}

// ---- Q4_1: d = (max - min) / 15, m = min -----------------------------------------------------
void quantize_q4_1(const float* x, block_q4_1* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float min = 3.402823466e+38f, max = -3.402823466e+38f;  // FLT_MAX, as ggml starts
        for (int j = 0; j < QK; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / ((1 << 4) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(min);
        for (int j = 0; j < QK / 2; ++j) {
            const int q0 = trunc_to_int((x[j] - min) * id + 0.5f, 0, 15);
            const int q1 = trunc_to_int((x[j + QK / 2] - min) * id + 0.5f, 0, 15);
            y[i].qs[j] = uint8_t(q0 | (q1 << 4));
        }
    }
}

void dequantize_q8_0(const block_q8_0* x, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK; ++j) y[j] = float(x[i].qs[j]) * d;
    }
}

void dequantize_q4_0(const block_q4_0* x, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK / 2; ++j) {
            y[j] = float((x[i].qs[j] & 0x0F) - 8) * d;
            y[j + QK / 2] = float((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

void dequantize_q4_1(const block_q4_1* x, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = fp16_to_fp32(x[i].d);
        const float m = fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK / 2; ++j) {
            y[j] = float(x[i].qs[j] & 0x0F) * d + m;
            y[j + QK / 2] = float(x[i].qs[j] >> 4) * d + m;
        }
    }
}

}  // namespace

const TypeInfo* type_info(uint32_t type_id) {
    return type_id < kNumTypes ? &kTypes[type_id] : nullptr;
}

const char* type_name(uint32_t type_id) {
    if (type_id < kNumTypes) return kTypes[type_id].name;
    std::snprintf(tl_unknown_name, sizeof tl_unknown_name, "unknown(%u)", type_id);
    return tl_unknown_name;
}

bool type_supported(GgmlType t) {
    const TypeInfo* ti = type_info(uint32_t(t));
    return ti != nullptr && ti->supported;
}

size_t row_bytes(GgmlType t, int64_t n) {
    const TypeInfo* ti = type_info(uint32_t(t));
    if (ti == nullptr || ti->block_size == 0 || n < 0) return 0;
    return size_t(n / ti->block_size) * ti->block_bytes;
}

// ---- IEEE half <-> single: block_math.h's integer arithmetic (the host branch), which the CUDA
// kernels share, so neither the FPU's rounding mode nor flush-to-zero can change the result. ----
float fp16_to_fp32(uint16_t h) { return bm::fp16_to_fp32(h); }
uint16_t fp32_to_fp16(float f) { return bm::fp32_to_fp16(f); }
float bf16_to_fp32(uint16_t h) { return bm::bf16_to_fp32(h); }

uint16_t fp32_to_bf16(float f) {
    // ggml_compute_fp32_to_bf16 / gguf-py's BF16 quantizer: NaN keeps sign and upper payload
    // with the quiet bit set; everything else rounds to nearest even (overflow becomes inf).
    const uint32_t u = bm::f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 64u);
    return uint16_t((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16);
}

void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(src);
    switch (t) {
        case GgmlType::F32:
            if (n > 0) std::memcpy(dst, src, size_t(n) * 4);
            return;
        case GgmlType::F16:
            for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(load_u16(p + 2 * i));
            return;
        case GgmlType::BF16:
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(load_u16(p + 2 * i));
            return;
        case GgmlType::Q8_0:
            check_blocks(t, n, QK);
            dequantize_q8_0(static_cast<const block_q8_0*>(src), dst, n / QK);
            return;
        case GgmlType::Q4_0:
            check_blocks(t, n, QK);
            dequantize_q4_0(static_cast<const block_q4_0*>(src), dst, n / QK);
            return;
        case GgmlType::Q4_1:
            check_blocks(t, n, QK);
            dequantize_q4_1(static_cast<const block_q4_1*>(src), dst, n / QK);
            return;
        case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::IQ4_NL: case GgmlType::Q2_K:
        case GgmlType::Q3_K: case GgmlType::Q4_K: case GgmlType::Q5_K: case GgmlType::Q6_K:
            // The scalar kernels' dequantization: the gguf package's numpy formulas, operation for
            // operation (tests/test_quant_types.py checks the bits).
            check_blocks(t, n, type_info(uint32_t(t))->block_size);
            cpu::scalar_kernels().dequant_row(t, src, dst, n);
            return;
        default:
            fail(strfmt("cannot dequantize type %s: prosparse-rt does not support it", type_name(t)));
    }
}

void quantize_row(GgmlType t, const float* src, void* dst, int64_t n) {
    uint8_t* p = static_cast<uint8_t*>(dst);
    switch (t) {
        case GgmlType::F32:
            if (n > 0) std::memcpy(dst, src, size_t(n) * 4);
            return;
        case GgmlType::F16:  // the KV cache's rows: block_math's conversion inlined, not a call per value
            for (int64_t i = 0; i < n; ++i) store_u16(p + 2 * i, bm::fp32_to_fp16(src[i]));
            return;
        case GgmlType::BF16:
            for (int64_t i = 0; i < n; ++i) store_u16(p + 2 * i, fp32_to_bf16(src[i]));
            return;
        case GgmlType::Q8_0:
            check_blocks(t, n, QK);
            quantize_q8_0(src, static_cast<block_q8_0*>(dst), n / QK);
            return;
        case GgmlType::Q4_0:
            check_blocks(t, n, QK);
            quantize_q4_0(src, static_cast<block_q4_0*>(dst), n / QK);
            return;
        case GgmlType::Q4_1:
            check_blocks(t, n, QK);
            quantize_q4_1(src, static_cast<block_q4_1*>(dst), n / QK);
            return;
        default:
            fail(strfmt("cannot quantize to type %s: prosparse-rt does not support it", type_name(t)));
    }
}

void quantize_row_q8_1(const float* x, block_q8_1* y, int64_t n) {
    // ggml's quantize_row_q8_1_ref, except that d and s stay fp32 (this block never goes to a
    // file, and an fp32 s makes the Q4_1 dot product's min term exact for the qs we stored).
    if (n < 0 || n % QK != 0)
        fail(strfmt("q8_1 row of %lld elements is not a whole number of %d-element blocks",
                    (long long)n, QK));
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            y[i].qs[j] = round_to_i8(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = d;
        y[i].s = float(sum) * d;
    }
}

}  // namespace ps

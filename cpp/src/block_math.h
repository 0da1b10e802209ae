// The block arithmetic the CPU and the GPU share (docs/design.md, "GPU kernels"): fp16/bf16
// conversion, the Q8 activation quantizer, the per-block integer dots, the per-block fma chain of
// the batch-invariance rule (cpu/kernels.h), the dequantization of one weight, the FFN activation,
// the neuron-group fold and the RoPE rotation of one pair. Every function is PS_HD (blocks.h): the
// CUDA kernels call these, and tests/test_block_math.py runs them on the CPU (through
// python_cuda_hooks.cpp) against the CPU kernels, bit for bit.
//
// Each function states the operations it performs; products and sums that must be rounded
// separately go through mul_rn/add_rn, fused ones through fma_rn, so that no compiler contracts
// them differently on either side (nvcc fuses a * b + c by default; host code including this
// header must not be compiled with FMA contraction enabled on a target that has FMA).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "arch.h"  // Activation
#include "blocks.h"
#include "quant.h"  // GgmlType

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace ps::bm {

// Neurons per group of the down projection's sums (cpu::kNeuronGroup; checked where both are seen).
constexpr int kNeuronGroup = 64;

// ---- Rounding-explicit float operations ----------------------------------------------------------

PS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
PS_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
PS_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
PS_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
PS_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

PS_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}
PS_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

// ---- Loads of unaligned words ----------------------------------------------------------------------

PS_HD uint16_t load_u16(const uint8_t* p) {  // p 2-byte aligned on the device
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const uint16_t*>(p);
#else
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
#endif
}
// Four bytes from a 2-byte aligned address (the codes of Q4_0 and Q8_0 blocks start at offset 2).
PS_HD uint32_t load_u32_a2(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return uint32_t(h[0]) | uint32_t(h[1]) << 16;
#else
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
#endif
}
// Four bytes from a 4-byte aligned address.
PS_HD uint32_t load_u32_a4(const void* p) {
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const uint32_t*>(p);
#else
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
#endif
}

// ---- fp16 / bf16 ---------------------------------------------------------------------------------

// Exact for every non-NaN half (every half is a float); on the host this is quant.cpp's
// fp16_to_fp32. The device uses the hardware conversion, which may quiet a signalling NaN's payload
// (as F16C does).
PS_HD float fp16_to_fp32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    if (exp == 0x1F) return f32_from_bits(sign | 0x7F800000u | (mant << 13));  // inf, NaN (payload kept)
    if (exp != 0) return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
    if (mant == 0) return f32_from_bits(sign);  // +-0
    // Subnormal half: mant * 2^-24. Shift the leading 1 up to the implicit position.
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
    }
    return f32_from_bits(sign | (e << 23) | ((mant & 0x3FFu) << 13));
#endif
}

// Round to nearest even in integer arithmetic (NaN keeps its upper payload, made quiet): quant.cpp's
// fp32_to_fp16 on the host too, so the device's KV cache and activation scales are the host's bits
// whatever the rounding mode.
PS_HD uint16_t fp32_to_fp16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));  // NaN, made quiet
    if (ax >= 0x47800000u) return uint16_t(sign | 0x7C00u);  // >= 2^16 (and inf): infinity
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    if (e >= 113) {
        // Normal half. Rounding may carry into the exponent; from 65520 up that yields 0x7C00, inf.
        uint32_t h = ((e - 112) << 10) | ((ax >> 13) & 0x3FFu);
        const uint32_t rem = ax & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
        return uint16_t(sign | h);
    }
    if (ax <= 0x33000000u) return sign;  // <= 2^-25: half of the smallest subnormal ties to 0
    // Subnormal half: the value is m * 2^(e-150), in units of 2^-24 that is m >> (126 - e).
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return uint16_t(sign | h);
}

PS_HD float bf16_to_fp32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// ---- Q8 quantization of one block of 32 floats (llama.cpp's reference) ----------------------------

// roundf(v) as an int8: half away from zero, clamped; NaN gives 0 (quant.cpp's round_to_i8).
PS_HD int8_t round_to_i8(float v) {
    const float r = roundf(v);
    if (!(r == r)) return 0;
    if (r <= -128.0f) return -128;
    if (r >= 127.0f) return 127;
    return int8_t(int(r));
}

// d = amax / 127, q = roundf(x / d) (as x * (1 / d)), sum = sum of q; returns d unrounded. The
// activation quantizer of every CPU kernel set and quant.cpp's quantize_q8_0 (which stores d as
// fp16) perform these operations; they differ only on NaN input, which no path here produces from
// finite weights.
PS_HD float q8_block(const float* x, int8_t* qs, int* sum) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) {
        const float a = fabsf(x[j]);
        amax = amax < a ? a : amax;  // std::max(amax, a)
    }
    const float d = div_rn(amax, 127.0f);
    const float id = d != 0.0f ? div_rn(1.0f, d) : 0.0f;
    int s = 0;
    for (int j = 0; j < QK; ++j) {
        qs[j] = round_to_i8(mul_rn(x[j], id));
        s += qs[j];
    }
    *sum = s;
    return d;
}

// The scale a Q8_0 activation block keeps: d rounded to fp16 (as Q8_0 stores it), as a float.
PS_HD float q8_0_act_scale(float d) { return fp16_to_fp32(fp32_to_fp16(d)); }
// The Q8_1 block's s: d * sum(q).
PS_HD float q8_1_act_sum(float d, int sum) { return mul_rn(d, float(sum)); }

// ---- Weight types: block size, bytes, activation format -------------------------------------------
// cpu/kernels.h's per-type table, the part the GPU needs, as constexpr functions both sides call.

enum class ActFmt { F32, Q8S, Q8_1, Q8K };  // cpu::Act: f32 values, Q8Act, block_q8_1, block_q8_K

PS_HD constexpr ActFmt act_fmt(GgmlType w) {
    switch (w) {
        case GgmlType::Q8_0: case GgmlType::Q4_0: case GgmlType::Q5_0: case GgmlType::IQ4_NL: return ActFmt::Q8S;
        case GgmlType::Q4_1: case GgmlType::Q5_1: return ActFmt::Q8_1;
        case GgmlType::Q2_K: case GgmlType::Q3_K: case GgmlType::Q4_K: case GgmlType::Q5_K: case GgmlType::Q6_K:
            return ActFmt::Q8K;
        default: return ActFmt::F32;
    }
}
PS_HD constexpr bool is_quantized(GgmlType w) { return act_fmt(w) != ActFmt::F32; }
// Weights per block: 1 for the float types, 32, or 256 for the K-quants.
PS_HD constexpr int64_t block_elems(GgmlType w) {
    return act_fmt(w) == ActFmt::Q8K ? QK_K : act_fmt(w) == ActFmt::F32 ? 1 : QK;
}
PS_HD constexpr int64_t block_bytes(GgmlType w) {
    switch (w) {
        case GgmlType::Q8_0: return sizeof(block_q8_0);
        case GgmlType::Q4_0: return sizeof(block_q4_0);
        case GgmlType::Q4_1: return sizeof(block_q4_1);
        case GgmlType::Q5_0: return sizeof(block_q5_0);
        case GgmlType::Q5_1: return sizeof(block_q5_1);
        case GgmlType::IQ4_NL: return sizeof(block_iq4_nl);
        case GgmlType::Q2_K: return sizeof(block_q2_K);
        case GgmlType::Q3_K: return sizeof(block_q3_K);
        case GgmlType::Q4_K: return sizeof(block_q4_K);
        case GgmlType::Q5_K: return sizeof(block_q5_K);
        case GgmlType::Q6_K: return sizeof(block_q6_K);
        case GgmlType::F32: return 4;
        default: return 2;  // F16, BF16
    }
}
// The types whose chain has a second fma per block for the min (cpu/kernels_scalar.cpp, dot).
PS_HD constexpr bool has_min_term(GgmlType w) {
    return w == GgmlType::Q4_1 || w == GgmlType::Q5_1 || w == GgmlType::Q4_K || w == GgmlType::Q5_K ||
           w == GgmlType::Q2_K;
}

// ---- Per-block integer dots against activation codes ---------------------------------------------

// sum over 4 byte lanes of a[i] * b[i] (signed bytes) plus c: dp4a on the device.
PS_HD int dot4(uint32_t a, uint32_t b, int c) {
#if defined(__CUDA_ARCH__)
    return __dp4a(int(a), int(b), c);
#else
    for (int i = 0; i < 4; ++i) c += int(int8_t(uint8_t(a >> (8 * i)))) * int(int8_t(uint8_t(b >> (8 * i))));
    return c;
#endif
}

// A weight block's codes as words (4 codes a word, in element order for Q8_0; for Q4 word i holds
// bytes 4i..4i+3 of the nibbles: low nibbles are elements 4i.., high nibbles 16 + 4i..) and scales.
// The other quantized types keep a pointer to the block and read its fields where the term needs them.
template <GgmlType W> struct WBlock { const uint8_t* p; };
template <> struct WBlock<GgmlType::Q4_0> { uint32_t qs[4]; uint16_t d; };
template <> struct WBlock<GgmlType::Q4_1> { uint32_t qs[4]; uint16_t d, m; };
template <> struct WBlock<GgmlType::Q8_0> { uint32_t qs[8]; uint16_t d; };

// An activation block: 32 codes as words, the scale, and the code sum (Q8_0/Q4_0's Q8Act) or
// s = d * sum (Q4_1's block_q8_1).
struct XBlock {
    uint32_t qs[8];
    float d;
    int sum;
    float s;
};
// A block_q8_K activation block (the K-quants), read in place: d at 0, codes at 4, bsums at 260.
struct XBlockK { const uint8_t* p; };

// Block b of a weight row (row 2-byte aligned; 4-byte for Q4_1).
template <GgmlType W>
PS_HD WBlock<W> load_wblock(const uint8_t* row, int64_t b) {
    WBlock<W> w;
    if constexpr (W == GgmlType::Q4_1) {
        const uint8_t* p = row + b * int64_t(sizeof(block_q4_1));
        w.d = load_u16(p);
        w.m = load_u16(p + 2);
        for (int i = 0; i < 4; ++i) w.qs[i] = load_u32_a4(p + 4 + 4 * i);
    } else if constexpr (W == GgmlType::Q4_0) {
        const uint8_t* p = row + b * int64_t(sizeof(block_q4_0));
        w.d = load_u16(p);
        for (int i = 0; i < 4; ++i) w.qs[i] = load_u32_a2(p + 2 + 4 * i);
    } else if constexpr (W == GgmlType::Q8_0) {
        const uint8_t* p = row + b * int64_t(sizeof(block_q8_0));
        w.d = load_u16(p);
        for (int i = 0; i < 8; ++i) w.qs[i] = load_u32_a2(p + 2 + 4 * i);
    } else {
        w.p = row + b * int64_t(block_bytes(W));
    }
    return w;
}

// The exact integer dot of a block's codes with an activation block's codes: Q4_0
// sum_j (q_j - 8) x_j computed as sum_j q_j x_j - 8 sum_j x_j; Q4_1 sum_j q_j x_j (the min enters
// through the chain); Q8_0 sum_j q_j x_j.
template <GgmlType W>
PS_HD int block_dot(const WBlock<W>& w, const XBlock& x) {
    int s = 0;
    if constexpr (W == GgmlType::Q8_0) {
        for (int i = 0; i < 8; ++i) s = dot4(w.qs[i], x.qs[i], s);
    } else {
        for (int i = 0; i < 4; ++i) {
            s = dot4(w.qs[i] & 0x0F0F0F0Fu, x.qs[i], s);
            s = dot4((w.qs[i] >> 4) & 0x0F0F0F0Fu, x.qs[4 + i], s);
        }
        if constexpr (W == GgmlType::Q4_0) s -= 8 * x.sum;
    }
    return s;
}

// ---- Codes of the other quantized types (cpu/kernels_scalar.cpp reads the layouts the same way) ------
// Element e of a block as the small integer that multiplies its (sub-block) scale.

PS_HD int q4_code(const uint8_t* qs, int j) { return j < QK / 2 ? (qs[j] & 0x0F) : (qs[j - QK / 2] >> 4); }
PS_HD int code_q5(const uint8_t* qh, const uint8_t* qs, int j) {  // 0..31 (Q5_0, Q5_1)
    return q4_code(qs, j) | ((qh[j / 8] >> (j % 8)) & 1) << 4;
}
// IQ4_NL's level for a nibble (blocks.h, kvalues_iq4nl; a local copy so the device can index it).
PS_HD int iq4nl_level(int q) {
    const int8_t v[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    return v[q];
}
PS_HD int code_q2_k(const uint8_t* qs, int e) { return (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3; }
PS_HD int code_q3_k(const uint8_t* hmask, const uint8_t* qs, int e) {  // -4..3: a set hmask bit means no -4
    return code_q2_k(qs, e) - (((hmask[e % 32] >> (e / 32)) & 1) ? 0 : 4);
}
PS_HD int code_q4_k(const uint8_t* qs, int e) { return (qs[(e / 64) * 32 + e % 32] >> (4 * ((e % 64) / 32))) & 0x0F; }
PS_HD int code_q5_k(const uint8_t* qh, const uint8_t* qs, int e) {  // 0..31
    return code_q4_k(qs, e) | ((qh[e % 32] >> (e / 32)) & 1) << 4;
}
PS_HD int code_q6_k(const uint8_t* ql, const uint8_t* qh, int e) {  // -32..31
    const int lo = (ql[(e / 128) * 64 + e % 64] >> (4 * ((e % 128) / 64))) & 0x0F;
    const int hi = (qh[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    return (lo | (hi << 4)) - 32;
}
// Q3_K's signed scale of sub-block j (< 16): blocks.h's unpack_q3_k_scales for one entry.
PS_HD int q3_k_scale(const uint8_t* s, int j) {
    const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
    const int hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

// The exact integer dot of n (a multiple of 4) codes code(e0 ..) with the activation codes xq
// (4-byte aligned): the codes packed four to a word (each fits a signed byte), then dot4.
template <class Code>
PS_HD int dot_codes(const Code& code, int e0, int n, const uint8_t* xq) {
    int s = 0;
    for (int i = 0; i < n; i += 4) {
        uint32_t w = 0;
        for (int l = 0; l < 4; ++l) w |= uint32_t(uint8_t(int8_t(code(e0 + i + l)))) << (8 * l);
        s = dot4(w, load_u32_a4(xq + i), s);
    }
    return s;
}

// ---- The per-row chain over blocks (cpu/kernels.h, the batch-invariance rule) ----------------------
// acc = 0; for each block b in order: acc = chain(acc, sumi_b, block_scale(d_b, dx_b)) and, for Q4_1,
// acc = fma(m_b, s_b, acc) (apply_term below).

PS_HD float block_scale(uint16_t dw, float dx) { return mul_rn(fp16_to_fp32(dw), dx); }
PS_HD float chain(float acc, int sumi, float scale) { return fma_rn(float(sumi), scale, acc); }

// ---- Float-weight dot order on the GPU -------------------------------------------------------------
// Lane l of 32 keeps s_l = fma chain over j = l, l + 32, ... of w_j * x_j; then, for off = 16, 8, 4,
// 2, 1: s_l = s_l + s_{l + off} (a butterfly, the same value in every lane); the dot is s_0. One fixed
// order for any batch (the CPU's float order depends on its instruction set, so float-weight
// products agree with it within rounding only).
constexpr int kFloatLanes = 32;

// ---- One weight, dequantized -------------------------------------------------------------------------

// Element j (< 32) of a block as the kernels dequantize it (cpu::KernelSet::dequant_row, the axpy):
// Q8_0 d * q, Q4_0 d * (q - 8), Q4_1 fma(q, d, m).
PS_HD float w_q8_0(const block_q8_0* b, int j) { return mul_rn(fp16_to_fp32(load_u16(reinterpret_cast<const uint8_t*>(&b->d))), float(b->qs[j])); }
PS_HD float w_q4_0(const block_q4_0* b, int j) {
    return mul_rn(fp16_to_fp32(load_u16(reinterpret_cast<const uint8_t*>(&b->d))), float(q4_code(b->qs, j) - 8));
}
PS_HD float w_q4_1(const block_q4_1* b, int j) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(b);
    return fma_rn(float(q4_code(b->qs, j)), fp16_to_fp32(load_u16(p)), fp16_to_fp32(load_u16(p + 2)));
}
// quant.cpp's reference dequantizer differs for Q4_1 only: q * d + m, rounded twice (the embedding
// rows and the CPU's dequantize_row).
PS_HD float w_q4_1_ref(const block_q4_1* b, int j) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(b);
    return add_rn(mul_rn(float(q4_code(b->qs, j)), fp16_to_fp32(load_u16(p))), fp16_to_fp32(load_u16(p + 2)));
}

// Element e of a block at p of the other quantized types, as the CPU's scalar dequantization (the
// gguf package's numpy formulas, each product and difference rounded): Q5_0 d * (q - 16); Q5_1
// d * q + m; IQ4_NL d * level(q); Q4_K, Q5_K, Q2_K (d * sc) * q - dmin * m; Q3_K, Q6_K (d * sc) * q.
// quant.cpp's dequantize_row is the same for these types (it calls the scalar kernels).
PS_HD float h16(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }
template <GgmlType W>
PS_HD float w_other(const uint8_t* p, int e) {
    if constexpr (W == GgmlType::Q5_0) {
        const block_q5_0* b = reinterpret_cast<const block_q5_0*>(p);
        return mul_rn(h16(p), float(code_q5(b->qh, b->qs, e) - 16));
    } else if constexpr (W == GgmlType::Q5_1) {
        const block_q5_1* b = reinterpret_cast<const block_q5_1*>(p);
        return add_rn(mul_rn(h16(p), float(code_q5(b->qh, b->qs, e))), h16(p + 2));
    } else if constexpr (W == GgmlType::IQ4_NL) {
        const block_iq4_nl* b = reinterpret_cast<const block_iq4_nl*>(p);
        return mul_rn(h16(p), float(iq4nl_level(q4_code(b->qs, e))));
    } else if constexpr (W == GgmlType::Q4_K || W == GgmlType::Q5_K) {
        const block_q4_K* b = reinterpret_cast<const block_q4_K*>(p);  // Q5_K: the same head
        uint8_t sc, m;
        get_scale_min_k4(e / 32, b->scales, &sc, &m);
        int q;
        if constexpr (W == GgmlType::Q4_K) {
            q = code_q4_k(b->qs, e);
        } else {
            const block_q5_K* b5 = reinterpret_cast<const block_q5_K*>(p);
            q = code_q5_k(b5->qh, b5->qs, e);
        }
        return sub_rn(mul_rn(mul_rn(h16(p), float(sc)), float(q)), mul_rn(h16(p + 2), float(m)));
    } else if constexpr (W == GgmlType::Q2_K) {
        const block_q2_K* b = reinterpret_cast<const block_q2_K*>(p);
        const int sc = b->scales[e / 16];
        const uint8_t* d = p + offsetof(block_q2_K, d);
        return sub_rn(mul_rn(mul_rn(h16(d), float(sc & 0xF)), float(code_q2_k(b->qs, e))),
                      mul_rn(h16(d + 2), float(sc >> 4)));
    } else if constexpr (W == GgmlType::Q3_K) {
        const block_q3_K* b = reinterpret_cast<const block_q3_K*>(p);
        const float dl = mul_rn(h16(p + offsetof(block_q3_K, d)), float(q3_k_scale(b->scales, e / 16)));
        return mul_rn(dl, float(code_q3_k(b->hmask, b->qs, e)));
    } else {
        static_assert(W == GgmlType::Q6_K, "a quantized weight type");
        const block_q6_K* b = reinterpret_cast<const block_q6_K*>(p);
        const float dl = mul_rn(h16(p + offsetof(block_q6_K, d)), float(b->scales[e / 16]));
        return mul_rn(dl, float(code_q6_k(b->ql, b->qh, e)));
    }
}

// ---- The FFN activation (ffn.h, ffn_activation) --------------------------------------------------------
// SiLU with the CATS threshold, ReLU, FATReLU; NaN passes through. ReLU and FATReLU are the CPU's bits;
// SiLU's exp is the platform's (glibc on the host, CUDA's expf within 2 ulp on the device).
PS_HD float ffn_act(Activation a, float g, float t) {
    if (g != g) return g;
    switch (a) {
        case Activation::SILU: {
            const float s = div_rn(g, add_rn(1.0f, expf(-g)));
            return fabsf(s) < t ? 0.0f : s;
        }
        case Activation::RELU: return g > 0.0f ? g : 0.0f;
        case Activation::FATRELU: return g >= t ? g : 0.0f;
    }
    return g;
}

// The coefficient of a neuron for a token: act(gate) * up.
PS_HD float ffn_coef(float act, float up) { return mul_rn(act, up); }

// ---- The down projection's sums (cpu/kernels.h, axpy_rows) ----------------------------------------------
// P_g = 0; for the listed rows r of group g = r / kNeuronGroup in index order: P_g = axpy_step(P_g, w, c).
// Then y = fold(y, P_g) for the groups in index order, after whatever y held.
PS_HD float axpy_step(float p, float w, float c) { return fma_rn(w, c, p); }
PS_HD float fold(float y, float p) { return add_rn(y, p); }

// ---- RoPE on one pair (attention.cpp, rope) ----------------------------------------------------------------
PS_HD void rope_pair(float* p0, float* p1, float c, float s) {
    const float a = *p0, b = *p1;
    *p0 = sub_rn(mul_rn(a, c), mul_rn(b, s));
    *p1 = add_rn(mul_rn(a, s), mul_rn(b, c));
}

// ---- Rows: what a kernel does with one block or one element of a row -------------------------------

// A converted activation row for Q8_0/Q4_0 weights (cpu::Q8Act's layout): codes [nb][32], then nb
// float scales, then nb int32 code sums.
PS_HD const int8_t* q8act_qs(const uint8_t* row, int64_t b) { return reinterpret_cast<const int8_t*>(row) + b * QK; }
PS_HD float q8act_d(const uint8_t* row, int64_t nb, int64_t b) {
    return f32_from_bits(load_u32_a4(row + nb * QK + 4 * b));
}
PS_HD int q8act_sum(const uint8_t* row, int64_t nb, int64_t b) {
    return int(load_u32_a4(row + nb * (QK + 4) + 4 * b));
}
// Bytes of a converted row in the CPU's layout (cpu::act_row_bytes).
PS_HD int64_t act_row_bytes(GgmlType w, int64_t k) {
    switch (act_fmt(w)) {
        case ActFmt::Q8S: return (k / QK) * (QK + 8);
        case ActFmt::Q8_1: return (k / QK) * int64_t(sizeof(block_q8_1));
        case ActFmt::Q8K: return (k / QK_K) * int64_t(sizeof(block_q8_K));
        default: return k * 4;
    }
}

// ggml's quantize_row_q8_K_ref on one 256-block as cpu/kernels_scalar.cpp's quantize_q8k: the element
// of largest magnitude (the first such) m maps to -127, q = nearest_int(x * (-127 / m)) (half to
// even) capped to [-128, 127], bsums of 16 codes, d = 1 / (-127 / m); a block whose largest
// magnitude is 0 or not finite is all zero. y: a block_q8_K, 4-byte aligned.
PS_HD void q8k_block(const float* x, uint8_t* y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK_K; ++j)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    if (!(amax > 0.0f) || !(amax <= 3.40282347e+38f)) {
        for (size_t i = 0; i < sizeof(block_q8_K); ++i) y[i] = 0;
        return;
    }
    const float iscale = div_rn(-127.0f, max);
    int8_t* qs = reinterpret_cast<int8_t*>(y + 4);
    for (int j = 0; j < QK_K; ++j) {
        const float v = rintf(mul_rn(iscale, x[j]));
        qs[j] = int8_t(v >= 127.0f ? 127 : v <= -128.0f ? -128 : int(v));
    }
    for (int j = 0; j < QK_K / 16; ++j) {
        int s = 0;
        for (int l = 0; l < 16; ++l) s += qs[16 * j + l];
        const uint16_t u = uint16_t(int16_t(s));
        y[260 + 2 * j] = uint8_t(u);
        y[261 + 2 * j] = uint8_t(u >> 8);
    }
    const uint32_t db = f32_bits(div_rn(1.0f, iscale));
    for (int i = 0; i < 4; ++i) y[i] = uint8_t(db >> (8 * i));
}

// Block b of activation row x (k = nb * block_elems(w) floats) converted for weights of type w into
// `row`: the CPU's quantize_act, one block at a time (F32/F16/BF16 weights: 32 floats copied; a
// float row's tail past the last whole block is copied by the caller).
PS_HD void quantize_act_block(GgmlType w, const float* x, uint8_t* row, int64_t nb, int64_t b) {
    if (act_fmt(w) == ActFmt::Q8K) {
        q8k_block(x + b * QK_K, row + b * int64_t(sizeof(block_q8_K)));
        return;
    }
    const float* xb = x + b * QK;
    if (act_fmt(w) == ActFmt::Q8S) {
        int8_t* qs = reinterpret_cast<int8_t*>(row) + b * QK;
        int sum = 0;
        const float d = q8_0_act_scale(q8_block(xb, qs, &sum));
        const uint32_t db = f32_bits(d), sb = uint32_t(sum);
        uint8_t* dp = row + nb * QK + 4 * b;
        uint8_t* sp = row + nb * (QK + 4) + 4 * b;
        for (int i = 0; i < 4; ++i) {
            dp[i] = uint8_t(db >> (8 * i));
            sp[i] = uint8_t(sb >> (8 * i));
        }
    } else if (act_fmt(w) == ActFmt::Q8_1) {
        block_q8_1* y = reinterpret_cast<block_q8_1*>(row) + b;
        int sum = 0;
        const float d = q8_block(xb, y->qs, &sum);
        y->d = d;
        y->s = q8_1_act_sum(d, sum);
    } else {
        float* y = reinterpret_cast<float*>(row) + b * QK;
        for (int j = 0; j < QK; ++j) y[j] = xb[j];
    }
}

// One block's term of a quantized row product: the exact integer dot and the scales of the chain.
struct BlockTerm {
    int sumi = 0;
    float scale = 0.0f;  // weight scale * activation scale
    float m = 0.0f;      // Q4_1, Q5_1: the weight block's min; Q4_K, Q5_K, Q2_K: -(integer min sum) ...
    float xs = 0.0f;     // ... and the activation block's s; K-quants: dmin * activation scale
};

// Block b of a 32-block activation row xr of nb blocks (Q8Act or block_q8_1; the row 16-byte
// aligned on the device).
template <ActFmt A>
PS_HD XBlock load_xblock32(const uint8_t* xr, int64_t nb, int64_t b) {
    XBlock x;
    if constexpr (A == ActFmt::Q8_1) {
        const uint8_t* p = xr + b * int64_t(sizeof(block_q8_1));
        x.d = f32_from_bits(load_u32_a4(p));
        x.s = f32_from_bits(load_u32_a4(p + 4));
        x.sum = 0;
        for (int i = 0; i < 8; ++i) x.qs[i] = load_u32_a4(p + 8 + 4 * i);
    } else {
        static_assert(A == ActFmt::Q8S, "a quantized activation format");
        const uint8_t* p = xr + b * QK;
#if defined(__CUDA_ARCH__)
        const uint4 lo = *reinterpret_cast<const uint4*>(p), hi = *reinterpret_cast<const uint4*>(p + 16);
        x.qs[0] = lo.x; x.qs[1] = lo.y; x.qs[2] = lo.z; x.qs[3] = lo.w;
        x.qs[4] = hi.x; x.qs[5] = hi.y; x.qs[6] = hi.z; x.qs[7] = hi.w;
#else
        for (int i = 0; i < 8; ++i) x.qs[i] = load_u32_a4(p + 4 * i);
#endif
        x.d = q8act_d(xr, nb, b);
        x.sum = q8act_sum(xr, nb, b);
        x.s = 0.0f;
    }
    return x;
}

// Block b of a converted activation row xr of nb blocks for weights of type W: an XBlock, or for
// the K-quants an XBlockK.
template <GgmlType W>
PS_HD auto load_xblock(const uint8_t* xr, int64_t nb, int64_t b) {
    if constexpr (act_fmt(W) == ActFmt::Q8K) return XBlockK{xr + b * int64_t(sizeof(block_q8_K))};
    else return load_xblock32<act_fmt(W)>(xr, nb, b);
}

// The term of a Q5_0, Q5_1 or IQ4_NL block (at p) against a 32-block of activations: as the CPU's
// scalar dot, sumi = sum of code * x (Q5_0 codes q - 16, IQ4_NL the levels, Q5_1 q with its min
// through the second fma), scale = d * dx.
template <GgmlType W>
PS_HD BlockTerm term_32(const uint8_t* p, const XBlock& x) {
    BlockTerm t;
    const uint8_t* xq = reinterpret_cast<const uint8_t*>(x.qs);
    if constexpr (W == GgmlType::Q5_0) {
        const block_q5_0* b = reinterpret_cast<const block_q5_0*>(p);
        t.sumi = dot_codes([&](int e) { return code_q5(b->qh, b->qs, e) - 16; }, 0, QK, xq);
    } else if constexpr (W == GgmlType::Q5_1) {
        const block_q5_1* b = reinterpret_cast<const block_q5_1*>(p);
        t.sumi = dot_codes([&](int e) { return code_q5(b->qh, b->qs, e); }, 0, QK, xq);
        t.m = h16(p + 2);
        t.xs = x.s;
    } else {
        static_assert(W == GgmlType::IQ4_NL, "a 32-weight block type");
        const block_iq4_nl* b = reinterpret_cast<const block_iq4_nl*>(p);
        t.sumi = dot_codes([&](int e) { return iq4nl_level(q4_code(b->qs, e)); }, 0, QK, xq);
    }
    t.scale = mul_rn(h16(p), x.d);
    return t;
}

// The term of a K-quant super-block (at p) against a block_q8_K: as the CPU's scalar dot, sumi =
// sum over sub-blocks of (integer scale) * (sub-block dot), scale = d * dx; Q4_K, Q5_K and Q2_K also
// summ = sum over sub-blocks of (integer min) * (activation code sums), entering the chain as
// fma(-summ, dmin * dx, acc).
template <GgmlType W>
PS_HD BlockTerm term_k(const uint8_t* p, const XBlockK& x) {
    BlockTerm t;
    const float dx = f32_from_bits(load_u32_a4(x.p));
    const uint8_t* xq = x.p + 4;
    auto bsum = [&](int j) { return int(int16_t(load_u16(x.p + 260 + 2 * j))); };
    int sumi = 0, summ = 0;
    float d, dmin = 0.0f;
    if constexpr (W == GgmlType::Q4_K || W == GgmlType::Q5_K) {
        const block_q4_K* b = reinterpret_cast<const block_q4_K*>(p);
        const block_q5_K* b5 = reinterpret_cast<const block_q5_K*>(p);
        for (int j = 0; j < 8; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(j, b->scales, &sc, &m);
            int s;
            if constexpr (W == GgmlType::Q4_K) s = dot_codes([&](int e) { return code_q4_k(b->qs, e); }, 32 * j, 32, xq + 32 * j);
            else s = dot_codes([&](int e) { return code_q5_k(b5->qh, b5->qs, e); }, 32 * j, 32, xq + 32 * j);
            sumi += sc * s;
            summ += m * (bsum(2 * j) + bsum(2 * j + 1));
        }
        d = h16(p);
        dmin = h16(p + 2);
    } else if constexpr (W == GgmlType::Q2_K) {
        const block_q2_K* b = reinterpret_cast<const block_q2_K*>(p);
        for (int j = 0; j < 16; ++j) {
            sumi += (b->scales[j] & 0xF) * dot_codes([&](int e) { return code_q2_k(b->qs, e); }, 16 * j, 16, xq + 16 * j);
            summ += (b->scales[j] >> 4) * bsum(j);
        }
        d = h16(p + offsetof(block_q2_K, d));
        dmin = h16(p + offsetof(block_q2_K, dmin));
    } else if constexpr (W == GgmlType::Q3_K) {
        const block_q3_K* b = reinterpret_cast<const block_q3_K*>(p);
        for (int j = 0; j < 16; ++j)
            sumi += q3_k_scale(b->scales, j) *
                    dot_codes([&](int e) { return code_q3_k(b->hmask, b->qs, e); }, 16 * j, 16, xq + 16 * j);
        d = h16(p + offsetof(block_q3_K, d));
    } else {
        static_assert(W == GgmlType::Q6_K, "a K-quant type");
        const block_q6_K* b = reinterpret_cast<const block_q6_K*>(p);
        for (int j = 0; j < 16; ++j)
            sumi += b->scales[j] * dot_codes([&](int e) { return code_q6_k(b->ql, b->qh, e); }, 16 * j, 16, xq + 16 * j);
        d = h16(p + offsetof(block_q6_K, d));
    }
    t.sumi = sumi;
    t.scale = mul_rn(d, dx);
    if constexpr (has_min_term(W)) {
        t.m = -float(summ);
        t.xs = mul_rn(dmin, dx);
    }
    return t;
}

// A block's term of a row product.
template <GgmlType W, class X>
PS_HD BlockTerm term(const WBlock<W>& w, const X& x) {
    if constexpr (act_fmt(W) == ActFmt::Q8K) {
        return term_k<W>(w.p, x);
    } else if constexpr (W == GgmlType::Q5_0 || W == GgmlType::Q5_1 || W == GgmlType::IQ4_NL) {
        return term_32<W>(w.p, x);
    } else {
        BlockTerm t;
        t.sumi = block_dot<W>(w, x);
        t.scale = block_scale(w.d, x.d);
        if constexpr (W == GgmlType::Q4_1) {
            t.m = fp16_to_fp32(w.m);
            t.xs = x.s;
        }
        return t;
    }
}

// Block b of weight row wr against converted activation row xr (nb blocks).
template <GgmlType W>
PS_HD BlockTerm block_term(const uint8_t* wr, const uint8_t* xr, int64_t nb, int64_t b) {
    return term<W>(load_wblock<W>(wr, b), load_xblock<W>(xr, nb, b));
}

// The chain's step for one block: one fma, and a second for the min where the type has one.
template <GgmlType W>
PS_HD float apply_term(float acc, const BlockTerm& t) {
    acc = chain(acc, t.sumi, t.scale);
    if constexpr (has_min_term(W)) acc = fma_rn(t.m, t.xs, acc);
    return acc;
}

// ---- The tiled product's fragments (cuda/kernels_mma.cu) --------------------------------------------
// mma.sync.m16n8k32 s8.s8.s32 (PTX ISA, "Matrix fragments for mma.m16n8k32"), K = one 32-block: lane
// l = 4 g + t holds A (16 weight rows) as words {row g codes 4t..4t+3, row g+8 codes 4t..4t+3, row g
// codes 16+4t..16+4t+3, row g+8 codes 16+4t..}, B (8 tokens) as words {token g codes 4t..4t+3, token
// g codes 16+4t..}, and gets D = {(row g, token 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}, each the
// exact integer dot of a row's codes with a token's codes. The chain then takes the same term as
// the row kernels (mma_term): the bits of the row path for any tile.

// Code words t and 4 + t (codes 4t.. and 16+4t..) of block b of a weight row, as s8 (Q4: the
// nibbles 0..15, low nibbles being codes 0..15 and high nibbles 16..31).
template <GgmlType W>
PS_HD void mma_a_words(const uint8_t* row, int64_t b, int t, uint32_t* lo, uint32_t* hi) {
    if constexpr (W == GgmlType::Q8_0) {
        const uint8_t* p = row + b * int64_t(sizeof(block_q8_0)) + 2;
        *lo = load_u32_a2(p + 4 * t);
        *hi = load_u32_a2(p + 16 + 4 * t);
    } else {
        static_assert(W == GgmlType::Q4_0 || W == GgmlType::Q4_1, "quantized weight types only");
        const uint32_t q = W == GgmlType::Q4_1 ? load_u32_a4(row + b * int64_t(sizeof(block_q4_1)) + 4 + 4 * t)
                                               : load_u32_a2(row + b * int64_t(sizeof(block_q4_0)) + 2 + 4 * t);
        *lo = q & 0x0F0F0F0Fu;
        *hi = (q >> 4) & 0x0F0F0F0Fu;
    }
}

// Code words t and 4 + t of block b of a converted activation row (16-byte aligned on the device).
template <GgmlType W>
PS_HD void mma_b_words(const uint8_t* xr, int64_t b, int t, uint32_t* lo, uint32_t* hi) {
    const uint8_t* p = W == GgmlType::Q4_1 ? xr + b * int64_t(sizeof(block_q8_1)) + 8 : xr + b * QK;
    *lo = load_u32_a4(p + 4 * t);
    *hi = load_u32_a4(p + 16 + 4 * t);
}

// A weight block's scales (m: Q4_1's min) and an activation block's (as load_xblock reads them).
struct WScales {
    uint16_t d = 0, m = 0;
};
struct XScales {
    float d = 0.0f;
    int sum = 0;
    float s = 0.0f;
};
template <GgmlType W>
PS_HD WScales load_wscales(const uint8_t* row, int64_t b) {
    WScales w;
    if constexpr (W == GgmlType::Q4_1) {
        const uint8_t* p = row + b * int64_t(sizeof(block_q4_1));
        w.d = load_u16(p);
        w.m = load_u16(p + 2);
    } else {
        w.d = load_u16(row + b * int64_t(W == GgmlType::Q8_0 ? sizeof(block_q8_0) : sizeof(block_q4_0)));
    }
    return w;
}
template <GgmlType W>
PS_HD XScales load_xscales(const uint8_t* xr, int64_t nb, int64_t b) {
    XScales x;
    if constexpr (W == GgmlType::Q4_1) {
        const uint8_t* p = xr + b * int64_t(sizeof(block_q8_1));
        x.d = f32_from_bits(load_u32_a4(p));
        x.s = f32_from_bits(load_u32_a4(p + 4));
    } else {
        x.d = q8act_d(xr, nb, b);
        x.sum = q8act_sum(xr, nb, b);
    }
    return x;
}

// The term of a block whose codes' integer dot is `dot`: block_dot's integer (Q4_0's offset of 8
// applied through the code sum, exactly) and term's scales.
template <GgmlType W>
PS_HD BlockTerm mma_term(int dot, const WScales& w, const XScales& x) {
    BlockTerm t;
    t.sumi = W == GgmlType::Q4_0 ? dot - 8 * x.sum : dot;
    t.scale = block_scale(w.d, x.d);
    if constexpr (W == GgmlType::Q4_1) {
        t.m = fp16_to_fp32(w.m);
        t.xs = x.s;
    }
    return t;
}

// Element j of a row of type W, as the kernels dequantize it (Ref: as quant.cpp's dequantize_row,
// which differs from the kernels' for Q4_1 only).
template <GgmlType W, bool Ref = false>
PS_HD float weight_at(const uint8_t* row, int64_t j) {
    if constexpr (W == GgmlType::F32) {
        return f32_from_bits(load_u32_a4(row + 4 * j));
    } else if constexpr (W == GgmlType::F16) {
        return fp16_to_fp32(load_u16(row + 2 * j));
    } else if constexpr (W == GgmlType::BF16) {
        return bf16_to_fp32(load_u16(row + 2 * j));
    } else if constexpr (W == GgmlType::Q8_0) {
        return w_q8_0(reinterpret_cast<const block_q8_0*>(row) + j / QK, int(j % QK));
    } else if constexpr (W == GgmlType::Q4_0) {
        return w_q4_0(reinterpret_cast<const block_q4_0*>(row) + j / QK, int(j % QK));
    } else if constexpr (W == GgmlType::Q4_1) {
        const block_q4_1* b = reinterpret_cast<const block_q4_1*>(row) + j / QK;
        return Ref ? w_q4_1_ref(b, int(j % QK)) : w_q4_1(b, int(j % QK));
    } else {
        constexpr int64_t be = block_elems(W);
        return w_other<W>(row + (j / be) * block_bytes(W), int(j % be));
    }
}

}  // namespace ps::bm

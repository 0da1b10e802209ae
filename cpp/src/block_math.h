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

// Exact for every non-NaN half (every half is a float); quant.cpp's fp16_to_fp32 on the host. The
// device uses the hardware conversion, which may quiet a signalling NaN's payload (as F16C does).
PS_HD float fp16_to_fp32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    if (exp == 0x1F) return f32_from_bits(sign | 0x7F800000u | (mant << 13));
    if (exp != 0) return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
    if (mant == 0) return f32_from_bits(sign);
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
    }
    return f32_from_bits(sign | (e << 23) | ((mant & 0x3FFu) << 13));
#endif
}

// Round to nearest even in integer arithmetic: quant.cpp's fp32_to_fp16 operation for operation
// (NaN keeps its upper payload, made quiet), so the device's KV cache and activation scales are
// the host's bits whatever the rounding mode.
PS_HD uint16_t fp32_to_fp16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    if (ax >= 0x47800000u) return uint16_t(sign | 0x7C00u);
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    if (e >= 113) {
        uint32_t h = ((e - 112) << 10) | ((ax >> 13) & 0x3FFu);
        const uint32_t rem = ax & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
        return uint16_t(sign | h);
    }
    if (ax <= 0x33000000u) return sign;
    const uint32_t shift = 126 - e;
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
template <GgmlType W> struct WBlock;
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
    } else {
        static_assert(W == GgmlType::Q8_0, "quantized weight types only");
        const uint8_t* p = row + b * int64_t(sizeof(block_q8_0));
        w.d = load_u16(p);
        for (int i = 0; i < 8; ++i) w.qs[i] = load_u32_a2(p + 2 + 4 * i);
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
PS_HD int q4_code(const uint8_t* qs, int j) { return j < QK / 2 ? (qs[j] & 0x0F) : (qs[j - QK / 2] >> 4); }
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
    switch (w) {
        case GgmlType::Q8_0: case GgmlType::Q4_0: return (k / QK) * (QK + 8);
        case GgmlType::Q4_1: return (k / QK) * int64_t(sizeof(block_q8_1));
        default: return k * 4;
    }
}

// Block b of activation row x (k = nb * 32 floats) converted for weights of type w into `row`: the
// CPU's quantize_act, one block at a time (F32/F16/BF16 weights: the 32 floats copied; a float row's
// tail past the last whole block is copied by the caller).
PS_HD void quantize_act_block(GgmlType w, const float* x, uint8_t* row, int64_t nb, int64_t b) {
    const float* xb = x + b * QK;
    if (w == GgmlType::Q8_0 || w == GgmlType::Q4_0) {
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
    } else if (w == GgmlType::Q4_1) {
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
    float m = 0.0f;      // Q4_1: the weight block's min ...
    float xs = 0.0f;     // ... and the activation block's s
};

// Block b of a converted activation row xr of nb blocks for weights of type W (the row 16-byte
// aligned on the device).
template <GgmlType W>
PS_HD XBlock load_xblock(const uint8_t* xr, int64_t nb, int64_t b) {
    XBlock x;
    if constexpr (W == GgmlType::Q4_1) {
        const uint8_t* p = xr + b * int64_t(sizeof(block_q8_1));
        x.d = f32_from_bits(load_u32_a4(p));
        x.s = f32_from_bits(load_u32_a4(p + 4));
        x.sum = 0;
        for (int i = 0; i < 8; ++i) x.qs[i] = load_u32_a4(p + 8 + 4 * i);
    } else {
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

// A block's term of a row product.
template <GgmlType W>
PS_HD BlockTerm term(const WBlock<W>& w, const XBlock& x) {
    BlockTerm t;
    t.sumi = block_dot<W>(w, x);
    t.scale = block_scale(w.d, x.d);
    if constexpr (W == GgmlType::Q4_1) {
        t.m = fp16_to_fp32(w.m);
        t.xs = x.s;
    }
    return t;
}

// Block b of weight row wr against converted activation row xr (nb blocks).
template <GgmlType W>
PS_HD BlockTerm block_term(const uint8_t* wr, const uint8_t* xr, int64_t nb, int64_t b) {
    return term<W>(load_wblock<W>(wr, b), load_xblock<W>(xr, nb, b));
}

// The chain's step for one block: one fma, Q4_1 a second for the min.
template <GgmlType W>
PS_HD float apply_term(float acc, const BlockTerm& t) {
    acc = chain(acc, t.sumi, t.scale);
    if constexpr (W == GgmlType::Q4_1) acc = fma_rn(t.m, t.xs, acc);
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

// Element j of a row of type W, as the kernels dequantize it (Ref: as quant.cpp's dequantize_row).
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
    } else {
        static_assert(W == GgmlType::Q4_1, "a weight type the kernels support");
        const block_q4_1* b = reinterpret_cast<const block_q4_1*>(row) + j / QK;
        return Ref ? w_q4_1_ref(b, int(j % QK)) : w_q4_1(b, int(j % QK));
    }
}

}  // namespace ps::bm

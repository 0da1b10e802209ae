// The reference kernels: plain C++, one dot product or one row update at a time, written to be
// obviously correct, for every weight type the kernels run. The SIMD sets are tested against these (tests/test_kernels.py), and they
// are the fallback on CPUs (or architectures) without AVX2.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {

namespace {

// Local half/bfloat16 decoders so that the kernels do not depend on quant.cpp's conversion
// routines (the SIMD files use F16C instead).
float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
            bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FFu) << 13;
        }
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, like F16C and numpy
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u) return uint16_t(sign | 0x7E00u);  // NaN
    if (x >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to inf
    if (x < 0x38800000u) {  // subnormal half (or zero): scale by 2^24 and round as integer
        float a;
        std::memcpy(&a, &x, 4);
        return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
    }
    const uint32_t lsb = (x >> 13) & 1u;
    x += 0xFFFu + lsb;  // round to nearest even on the 13 dropped bits
    return uint16_t(sign | ((x - (112u << 23)) >> 13));
}

float bf16_to_float(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// ---- activation formats (kernels.h, Act) ----------------------------------------------------------

void quantize_f32(const float* x, void* xa, int64_t k) { std::memcpy(xa, x, size_t(k) * sizeof(float)); }

// llama.cpp's reference quantizer for activations: d = amax / 127, q = roundf(x / d) with
// roundf's half-away-from-zero rounding. Q8S keeps d as Q8_0 stores it (fp16) and sum(q);
// Q8_1 keeps d as a float and s = d * sum(q).
void quantize_q8s(const float* x, void* xa, int64_t k) {
    const Q8Act<uint8_t> y(static_cast<uint8_t*>(xa), k / QK);
    for (int64_t b = 0; b < k / QK; ++b) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[b * QK + j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            y.qs[b * QK + j] = int8_t(std::roundf(x[b * QK + j] * id));
            sum += y.qs[b * QK + j];
        }
        y.d[b] = half_to_float(float_to_half(d));
        y.sum[b] = sum;
    }
}

void quantize_q8_1(const float* x, void* xa, int64_t k) {
    auto* y = static_cast<block_q8_1*>(xa);
    for (int64_t b = 0; b < k / QK; ++b) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[b * QK + j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            y[b].qs[j] = int8_t(std::roundf(x[b * QK + j] * id));
            sum += y[b].qs[j];
        }
        y[b].d = d;
        y[b].s = d * float(sum);
    }
}

// ggml's quantize_row_q8_K_ref: the element of largest magnitude m (sign kept) maps to -127,
// q = nearest_int(x * (-127 / m)) (round half to even), capped at 127; d = 1 / (-127 / m).
void quantize_q8k(const float* x, void* xa, int64_t k) {
    auto* y = static_cast<block_q8_K*>(xa);
    for (int64_t b = 0; b < k / QK_K; ++b, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; ++j)
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        if (!(amax > 0.0f) || !std::isfinite(amax)) {  // all zero (or not finite): an all-zero block
            std::memset(&y[b], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; ++j) {
            const float v = std::nearbyint(iscale * x[j]);
            y[b].qs[j] = int8_t(v >= 127.0f ? 127 : v <= -128.0f ? -128 : int(v));
        }
        for (int j = 0; j < QK_K / 16; ++j) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += y[b].qs[16 * j + l];
            y[b].bsums[j] = int16_t(s);
        }
        y[b].d = 1.0f / iscale;
    }
}

// ---- the codes of one block as small integers ------------------------------------------------------
// q[e] is the integer that multiplies element e's (sub-block) scale, for each element of a block,
// as the gguf package's numpy dequantization reads the layouts.

inline void nibbles(const uint8_t* qs, int q[QK]) {  // Q4_0 / IQ4_NL / Q5 low bits: j low, j + 16 high
    for (int j = 0; j < QK / 2; ++j) {
        q[j] = qs[j] & 0x0F;
        q[j + QK / 2] = qs[j] >> 4;
    }
}
inline void q5_codes(const uint8_t* qh4, const uint8_t* qs, int q[QK]) {  // 0..31
    uint32_t qh;
    std::memcpy(&qh, qh4, 4);
    nibbles(qs, q);
    for (int j = 0; j < QK; ++j) q[j] |= int((qh >> j) & 1u) << 4;
}
inline void q2_k_codes(const block_q2_K& b, int q[QK_K]) {  // 0..3
    for (int e = 0; e < QK_K; ++e) q[e] = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}
inline void q3_k_codes(const block_q3_K& b, int q[QK_K]) {  // -4..3 (a set hmask bit means no -4)
    for (int e = 0; e < QK_K; ++e) {
        const int lo = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        const int hi = (b.hmask[e % 32] >> (e / 32)) & 1;
        q[e] = lo - (hi ? 0 : 4);
    }
}
inline void q4_k_codes(const uint8_t* qs, int q[QK_K]) {  // 0..15: 64 elements per 32 bytes
    for (int e = 0; e < QK_K; ++e) q[e] = (qs[(e / 64) * 32 + e % 32] >> (4 * ((e % 64) / 32))) & 0x0F;
}
inline void q5_k_codes(const block_q5_K& b, int q[QK_K]) {  // 0..31
    q4_k_codes(b.qs, q);
    for (int e = 0; e < QK_K; ++e) q[e] |= ((b.qh[e % 32] >> (e / 32)) & 1) << 4;
}
inline void q6_k_codes(const block_q6_K& b, int q[QK_K]) {  // -32..31
    for (int e = 0; e < QK_K; ++e) {
        const int lo = (b.ql[(e / 128) * 64 + e % 64] >> (4 * ((e % 128) / 64))) & 0x0F;
        const int hi = (b.qh[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        q[e] = (lo | (hi << 4)) - 32;
    }
}

template <GgmlType T> struct Blk;
template <> struct Blk<GgmlType::Q8_0> { using type = block_q8_0; };
template <> struct Blk<GgmlType::Q4_0> { using type = block_q4_0; };
template <> struct Blk<GgmlType::Q4_1> { using type = block_q4_1; };
template <> struct Blk<GgmlType::Q5_0> { using type = block_q5_0; };
template <> struct Blk<GgmlType::Q5_1> { using type = block_q5_1; };
template <> struct Blk<GgmlType::IQ4_NL> { using type = block_iq4_nl; };
template <> struct Blk<GgmlType::Q2_K> { using type = block_q2_K; };
template <> struct Blk<GgmlType::Q3_K> { using type = block_q3_K; };
template <> struct Blk<GgmlType::Q4_K> { using type = block_q4_K; };
template <> struct Blk<GgmlType::Q5_K> { using type = block_q5_K; };
template <> struct Blk<GgmlType::Q6_K> { using type = block_q6_K; };

constexpr bool is_float(GgmlType w) { return w == GgmlType::F32 || w == GgmlType::F16 || w == GgmlType::BF16; }

inline float float_weight(GgmlType w, const uint8_t* row, int64_t j) {
    if (w == GgmlType::F32) {
        float f;
        std::memcpy(&f, row + 4 * j, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, row + 2 * j, 2);
    return w == GgmlType::F16 ? half_to_float(h) : bf16_to_float(h);
}

// ---- dot products ------------------------------------------------------------------------------
// One weight row against one converted activation row. The quantized types' arithmetic is the
// batch-invariance rule's (kernels.h): exact integer dots per block (the K-quants: the sub-block
// dots times their integer scales, summed over the super-block, and the integer min term), then
// one fma per block into a single accumulator in block order (Q4_1/Q5_1 and Q4_K/Q5_K/Q2_K a
// second for the min).

template <GgmlType T>
float dot(int64_t k, const uint8_t* wr, const uint8_t* xr) {
    float acc = 0.0f;
    if constexpr (is_float(T)) {
        const float* x = reinterpret_cast<const float*>(xr);
        for (int64_t j = 0; j < k; ++j) acc += float_weight(T, wr, j) * x[j];
    } else if constexpr (traits(T).act == Act::Q8S) {
        const auto* a = reinterpret_cast<const typename Blk<T>::type*>(wr);
        const Q8Act<const uint8_t> x(xr, k / QK);
        for (int64_t b = 0; b < k / QK; ++b) {
            const int8_t* xq = x.qs + b * QK;
            int q[QK];
            if constexpr (T == GgmlType::Q8_0) {
                for (int j = 0; j < QK; ++j) q[j] = a[b].qs[j];
            } else if constexpr (T == GgmlType::Q4_0) {
                nibbles(a[b].qs, q);
                for (int j = 0; j < QK; ++j) q[j] -= 8;
            } else if constexpr (T == GgmlType::Q5_0) {
                q5_codes(a[b].qh, a[b].qs, q);
                for (int j = 0; j < QK; ++j) q[j] -= 16;
            } else {  // IQ4_NL
                nibbles(a[b].qs, q);
                for (int j = 0; j < QK; ++j) q[j] = kvalues_iq4nl[q[j]];
            }
            int sumi = 0;
            for (int j = 0; j < QK; ++j) sumi += q[j] * xq[j];
            acc = std::fma(float(sumi), half_to_float(a[b].d) * x.d[b], acc);
        }
    } else if constexpr (traits(T).act == Act::Q8_1) {
        const auto* a = reinterpret_cast<const typename Blk<T>::type*>(wr);
        const auto* x = reinterpret_cast<const block_q8_1*>(xr);
        for (int64_t b = 0; b < k / QK; ++b) {
            int q[QK];
            if constexpr (T == GgmlType::Q4_1) nibbles(a[b].qs, q);
            else q5_codes(a[b].qh, a[b].qs, q);
            int sumi = 0;
            for (int j = 0; j < QK; ++j) sumi += q[j] * x[b].qs[j];
            acc = std::fma(float(sumi), half_to_float(a[b].d) * x[b].d, acc);
            acc = std::fma(half_to_float(a[b].m), x[b].s, acc);
        }
    } else {  // K-quants against Q8_K
        const auto* a = reinterpret_cast<const typename Blk<T>::type*>(wr);
        const auto* x = reinterpret_cast<const block_q8_K*>(xr);
        for (int64_t b = 0; b < k / QK_K; ++b) {
            const auto& w = a[b];
            int q[QK_K];
            int sumi = 0, summ = 0;
            // sub-block dots of `len` elements times integer scales
            auto sub = [&](int j, int len) {
                int s = 0;
                for (int l = 0; l < len; ++l) s += q[j * len + l] * x[b].qs[j * len + l];
                return s;
            };
            if constexpr (T == GgmlType::Q4_K || T == GgmlType::Q5_K) {
                if constexpr (T == GgmlType::Q4_K) q4_k_codes(w.qs, q);
                else q5_k_codes(w, q);
                for (int j = 0; j < 8; ++j) {
                    uint8_t sc, m;
                    get_scale_min_k4(j, w.scales, &sc, &m);
                    sumi += sc * sub(j, 32);
                    summ += m * (x[b].bsums[2 * j] + x[b].bsums[2 * j + 1]);
                }
            } else if constexpr (T == GgmlType::Q2_K) {
                q2_k_codes(w, q);
                for (int j = 0; j < 16; ++j) {
                    sumi += (w.scales[j] & 0xF) * sub(j, 16);
                    summ += (w.scales[j] >> 4) * x[b].bsums[j];
                }
            } else if constexpr (T == GgmlType::Q3_K) {
                q3_k_codes(w, q);
                int8_t sc[16];
                unpack_q3_k_scales(w.scales, sc);
                for (int j = 0; j < 16; ++j) sumi += sc[j] * sub(j, 16);
            } else {  // Q6_K
                q6_k_codes(w, q);
                for (int j = 0; j < 16; ++j) sumi += w.scales[j] * sub(j, 16);
            }
            acc = std::fma(float(sumi), half_to_float(w.d) * x[b].d, acc);
            if constexpr (T == GgmlType::Q4_K || T == GgmlType::Q5_K || T == GgmlType::Q2_K)
                acc = std::fma(-float(summ), half_to_float(w.dmin) * x[b].d, acc);
        }
    }
    return acc;
}

template <GgmlType T>
void gemm_rows_t(int64_t k, const uint8_t* wb, size_t w_stride, const int32_t* rows, int64_t n,
                 const uint8_t* xb, size_t x_stride, int64_t nc, float* Y, int64_t ldy) {
    for (int64_t c = 0; c < nc; ++c)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t r = rows ? rows[i] : i;
            Y[c * ldy + i] = dot<T>(k, wb + size_t(r) * w_stride, xb + size_t(c) * x_stride);
        }
}

// ---- dequantization: the gguf package's numpy formulas, operation for operation -----------------
// (d * q; Q5_1 d * q + m; the K-quants (d * sc) * q - (dmin * m)), except Q4_1, whose kernels have
// always used fma(q, d, m).
template <GgmlType T>
void dequant_t(const uint8_t* wr, float* out, int64_t k) {
    if constexpr (is_float(T)) {
        if constexpr (T == GgmlType::F32) std::memcpy(out, wr, size_t(k) * 4);
        else for (int64_t j = 0; j < k; ++j) out[j] = float_weight(T, wr, j);
    } else if constexpr (traits(T).block == QK) {
        const auto* a = reinterpret_cast<const typename Blk<T>::type*>(wr);
        for (int64_t b = 0; b < k / QK; ++b, out += QK) {
            const float d = half_to_float(a[b].d);
            int q[QK];
            if constexpr (T == GgmlType::Q8_0) {
                for (int j = 0; j < QK; ++j) out[j] = d * float(a[b].qs[j]);
            } else if constexpr (T == GgmlType::Q4_0) {
                nibbles(a[b].qs, q);
                for (int j = 0; j < QK; ++j) out[j] = d * float(q[j] - 8);
            } else if constexpr (T == GgmlType::Q4_1) {
                nibbles(a[b].qs, q);
                for (int j = 0; j < QK; ++j) out[j] = std::fma(float(q[j]), d, half_to_float(a[b].m));
            } else if constexpr (T == GgmlType::Q5_0) {
                q5_codes(a[b].qh, a[b].qs, q);
                for (int j = 0; j < QK; ++j) out[j] = d * float(q[j] - 16);
            } else if constexpr (T == GgmlType::Q5_1) {
                q5_codes(a[b].qh, a[b].qs, q);
                const float m = half_to_float(a[b].m);
                for (int j = 0; j < QK; ++j) out[j] = d * float(q[j]) + m;
            } else {  // IQ4_NL
                nibbles(a[b].qs, q);
                for (int j = 0; j < QK; ++j) out[j] = d * float(kvalues_iq4nl[q[j]]);
            }
        }
    } else {
        const auto* a = reinterpret_cast<const typename Blk<T>::type*>(wr);
        for (int64_t b = 0; b < k / QK_K; ++b, out += QK_K) {
            const auto& w = a[b];
            const float d = half_to_float(w.d);
            int q[QK_K];
            if constexpr (T == GgmlType::Q4_K || T == GgmlType::Q5_K) {
                if constexpr (T == GgmlType::Q4_K) q4_k_codes(w.qs, q);
                else q5_k_codes(w, q);
                const float dmin = half_to_float(w.dmin);
                for (int j = 0; j < 8; ++j) {
                    uint8_t sc, m;
                    get_scale_min_k4(j, w.scales, &sc, &m);
                    const float d1 = d * float(sc), m1 = dmin * float(m);
                    for (int l = 0; l < 32; ++l) out[32 * j + l] = d1 * float(q[32 * j + l]) - m1;
                }
            } else if constexpr (T == GgmlType::Q2_K) {
                q2_k_codes(w, q);
                const float dmin = half_to_float(w.dmin);
                for (int j = 0; j < 16; ++j) {
                    const float dl = d * float(w.scales[j] & 0xF), ml = dmin * float(w.scales[j] >> 4);
                    for (int l = 0; l < 16; ++l) out[16 * j + l] = dl * float(q[16 * j + l]) - ml;
                }
            } else {  // Q3_K, Q6_K: (d * sc) * q
                int8_t sc[16];
                if constexpr (T == GgmlType::Q3_K) {
                    q3_k_codes(w, q);
                    unpack_q3_k_scales(w.scales, sc);
                } else {
                    q6_k_codes(w, q);
                    std::memcpy(sc, w.scales, 16);
                }
                for (int j = 0; j < 16; ++j) {
                    const float dl = d * float(sc[j]);
                    for (int l = 0; l < 16; ++l) out[16 * j + l] = dl * float(q[16 * j + l]);
                }
            }
        }
    }
}

// ---- axpy over listed rows -----------------------------------------------------------------------

// One neuron group's listed rows [i0, i1) for every token: P = 0, P = fma(w, c, P) row after row,
// then Y += P (kernels.h, axpy_rows).
template <GgmlType T>
void axpy_group(int64_t k, const uint8_t* wb, size_t w_stride, const int32_t* rows, int64_t i0, int64_t i1,
                const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy) {
    // The dequantized rows a piece of columns at a time, on the stack: any k works without
    // allocation, and columns are independent, so a piece at a time gives the same sums.
    constexpr int64_t kPiece = 256;  // a multiple of every block size
    float buf[kPiece], part[kPiece];
    for (int64_t j0 = 0; j0 < k; j0 += kPiece) {
        const int64_t len = std::min(kPiece, k - j0);
        const size_t off = weight_bytes(T, j0);
        for (int64_t c = 0; c < nc; ++c) {
            std::fill(part, part + len, 0.0f);
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t r = rows ? rows[i] : i;
                dequant_t<T>(wb + size_t(r) * w_stride + off, buf, len);
                const float coef = C[c * ldc + i];
                for (int64_t j = 0; j < len; ++j) part[j] = std::fma(buf[j], coef, part[j]);
            }
            float* y = Y + c * ldy + j0;
            for (int64_t j = 0; j < len; ++j) y[j] += part[j];
        }
    }
}

template <GgmlType T>
void axpy_rows_t(int64_t k, const uint8_t* wb, size_t w_stride, const int32_t* rows, int64_t n, const float* C,
                 int64_t ldc, int64_t nc, float* Y, int64_t ldy) {
    for (int64_t i0 = 0; i0 < n;) {
        const int64_t g = (rows ? rows[i0] : i0) / kNeuronGroup;
        int64_t i1 = i0 + 1;
        while (i1 < n && i1 - i0 < kNeuronGroup && (rows ? rows[i1] : i1) / kNeuronGroup == g) ++i1;
        axpy_group<T>(k, wb, w_stride, rows, i0, i1, C, ldc, nc, Y, ldy);
        i0 = i1;
    }
}

// ---- interleaved rows -----------------------------------------------------------------------------

// The reference for every instruction set: per row and block, the integer dot of codes and
// activation codes (Q4_0's -8 offset as -8 * sum(x)), times (row scale * activation scale),
// fma-accumulated over blocks; Q4_1 then adds min * (activation scale * sum(x)) by a second fma.
template <GgmlType T>
void interleaved_group(int64_t nb, const uint8_t* G, const uint8_t* xr, int i, float* out) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        if constexpr (T == GgmlType::Q4_1) {
            const auto& blk = reinterpret_cast<const block_q4_1x8*>(G)[b];
            const auto& x = reinterpret_cast<const block_q8_1*>(xr)[b];
            int s = 0;
            for (int m = 0; m < 4; ++m)
                for (int j = 0; j < 4; ++j) {
                    const uint8_t q = blk.qs[m * 32 + i * 4 + j];
                    s += (q & 0x0F) * x.qs[4 * m + j] + (q >> 4) * x.qs[QK / 2 + 4 * m + j];
                }
            acc = std::fma(float(s), half_to_float(blk.d[i]) * x.d, acc);
            acc = std::fma(half_to_float(blk.m[i]), x.s, acc);
        } else {
            const Q8Act<const uint8_t> x(xr, nb);
            const int8_t* xq = x.qs + b * QK;
            int s = 0;
            uint16_t d;
            if constexpr (T == GgmlType::Q4_0) {
                const auto& blk = reinterpret_cast<const block_q4_0x8*>(G)[b];
                s = -8 * x.sum[b];
                for (int m = 0; m < 4; ++m)
                    for (int j = 0; j < 4; ++j) {
                        const uint8_t q = blk.qs[m * 32 + i * 4 + j];
                        s += (q & 0x0F) * xq[4 * m + j] + (q >> 4) * xq[QK / 2 + 4 * m + j];
                    }
                d = blk.d[i];
            } else {
                const auto& blk = reinterpret_cast<const block_q8_0x8*>(G)[b];
                for (int m = 0; m < 8; ++m)
                    for (int j = 0; j < 4; ++j) s += blk.qs[m * 32 + i * 4 + j] * xq[4 * m + j];
                d = blk.d[i];
            }
            acc = std::fma(float(s), half_to_float(d) * x.d[b], acc);
        }
    }
    *out = acc;
}

// The later x8 types (Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): each group back into 8 plain rows,
// then the plain dot, so an interleaved row is the plain row by construction.
template <GgmlType T>
void gemm_interleaved_t(int64_t k, const uint8_t* W, int64_t n_groups, const uint8_t* X, size_t x_stride,
                        int64_t nc, float* Y, int64_t ldy) {
    if constexpr (T != GgmlType::Q4_0 && T != GgmlType::Q4_1 && T != GgmlType::Q8_0) {
        const size_t stride = weight_bytes(T, k);
        std::vector<uint8_t> rows(stride * kGroupRows);
        for (int64_t g = 0; g < n_groups; ++g) {
            deinterleave_group(T, k, W + size_t(g) * group_bytes(T, k), rows.data(), stride);
            for (int64_t c = 0; c < nc; ++c)
                for (int i = 0; i < kGroupRows; ++i)
                    Y[c * ldy + g * kGroupRows + i] = dot<T>(k, rows.data() + size_t(i) * stride, X + size_t(c) * x_stride);
        }
    } else {
        const int64_t nb = k / QK;
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t* G = W + size_t(g) * group_bytes(T, k);
            for (int64_t c = 0; c < nc; ++c)
                for (int i = 0; i < kGroupRows; ++i)
                    interleaved_group<T>(nb, G, X + size_t(c) * x_stride, i, Y + c * ldy + g * kGroupRows + i);
        }
    }
}

// ---- the type-independent kernels ---------------------------------------------------------------

inline float kv_value(float v) { return v; }
inline float kv_value(uint16_t h) { return half_to_float(h); }

template <class E>  // the cache's element: float, or an f16 cache's uint16_t halves
void attn_tile_t(const float* q, const E* K, const E* V, int n, int hd, float scale, float* part) {
    float e[kAttnTileMax];
    float m = -INFINITY;
    for (int p = 0; p < n; ++p) {
        float s = 0.0f;
        for (int d = 0; d < hd; ++d) s = std::fma(q[d], kv_value(K[p * hd + d]), s);
        e[p] = s * scale;
        m = std::max(m, e[p]);
    }
    float l = 0.0f;
    for (int p = 0; p < n; ++p) {
        e[p] = std::exp(e[p] - m);
        l += e[p];
    }
    for (int d = 0; d < hd; ++d) {
        float o = 0.0f;
        for (int p = 0; p < n; ++p) o = std::fma(e[p], kv_value(V[p * hd + d]), o);
        part[2 + d] = o;
    }
    part[0] = m;
    part[1] = l;
}


void vec_axpy(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

void vec_scale(float* y, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

void rms_norm(float* y, const float* x, const float* w, int64_t n, float eps) {
    double ss = 0.0;  // double: the mean of squares over thousands of elements
    for (int64_t i = 0; i < n; ++i) ss = std::fma(double(x[i]), double(x[i]), ss);
    const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

template <GgmlType T>
TypeKernels entry() {
    TypeKernels e{gemm_rows_t<T>, axpy_rows_t<T>, dequant_t<T>, nullptr};
    if constexpr (traits(T).x8) e.gemm_interleaved = gemm_interleaved_t<T>;
    return e;
}

template <GgmlType... Ts>
void add_types(KernelSet& ks) {
    ((ks.types[size_t(Ts)] = entry<Ts>()), ...);
}

KernelSet build() {
    KernelSet ks;
    ks.isa = "scalar";
    ks.quantize[int(Act::F32)] = quantize_f32;
    ks.quantize[int(Act::Q8S)] = quantize_q8s;
    ks.quantize[int(Act::Q8_1)] = quantize_q8_1;
    ks.quantize[int(Act::Q8K)] = quantize_q8k;
    add_types<GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1,
              GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::IQ4_NL, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,
              GgmlType::Q5_K, GgmlType::Q6_K>(ks);
    ks.attn_tile = attn_tile_t<float>;
    ks.attn_tile_f16 = attn_tile_t<uint16_t>;
    ks.vec_axpy = vec_axpy;
    ks.vec_scale = vec_scale;
    ks.rms_norm = rms_norm;
    return ks;
}

}  // namespace

const KernelSet& scalar_kernels() {
    static const KernelSet ks = build();  // thread-safe one-time initialisation
    return ks;
}

}  // namespace ps::cpu

// The reference kernels: plain C++, one dot product or one row update at a time, written to be
// obviously correct. The SIMD sets are tested against these (tests/test_kernels.py), and they
// are the fallback on CPUs (or architectures) without AVX2.
#include <algorithm>
#include <cmath>
#include <cstring>

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

// llama.cpp's reference quantizer for activations: d = amax / 127, q = roundf(x / d) with
// roundf's half-away-from-zero rounding. Q8_0s keeps d as Q8_0 stores it (fp16) and sum(q);
// Q8_1 keeps d as a float and s = d * sum(q).
void quantize_q8_0s(const float* x, uint8_t* row, int64_t k) {
    const Q8Act<uint8_t> y(row, k / QK);
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

void quantize_q8_1(const float* x, block_q8_1* y, int64_t k) {
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

void quantize_act(GgmlType w, const float* x, void* xa, int64_t k) {
    switch (w) {
        case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16:
            std::memcpy(xa, x, size_t(k) * sizeof(float));
            return;
        case GgmlType::Q8_0: case GgmlType::Q4_0:
            quantize_q8_0s(x, static_cast<uint8_t*>(xa), k);
            return;
        case GgmlType::Q4_1:
            quantize_q8_1(x, static_cast<block_q8_1*>(xa), k);
            return;
        default:
            fail(strfmt("no kernel for weight type %s", type_name(w)));
    }
}

// One dot product of a weight row with a converted activation row. Quantized types accumulate
// per block as the interleaved reference below does (one fma of the block's integer dot, Q4_1 a
// second for the min), so a row gives the same bits in either layout.
float dot(GgmlType w, int64_t k, const uint8_t* wr, const uint8_t* xr) {
    float acc = 0.0f;
    switch (w) {
        case GgmlType::F32: {
            const float* a = reinterpret_cast<const float*>(wr);
            const float* x = reinterpret_cast<const float*>(xr);
            for (int64_t j = 0; j < k; ++j) acc += a[j] * x[j];
            return acc;
        }
        case GgmlType::F16: case GgmlType::BF16: {
            const float* x = reinterpret_cast<const float*>(xr);
            for (int64_t j = 0; j < k; ++j) {
                uint16_t h;
                std::memcpy(&h, wr + 2 * j, 2);
                acc += (w == GgmlType::F16 ? half_to_float(h) : bf16_to_float(h)) * x[j];
            }
            return acc;
        }
        case GgmlType::Q8_0: {
            const auto* a = reinterpret_cast<const block_q8_0*>(wr);
            const Q8Act<const uint8_t> x(xr, k / QK);
            for (int64_t b = 0; b < k / QK; ++b) {
                int sumi = 0;
                for (int j = 0; j < QK; ++j) sumi += a[b].qs[j] * x.qs[b * QK + j];
                acc = std::fma(float(sumi), half_to_float(a[b].d) * x.d[b], acc);
            }
            return acc;
        }
        case GgmlType::Q4_0: {
            const auto* a = reinterpret_cast<const block_q4_0*>(wr);
            const Q8Act<const uint8_t> x(xr, k / QK);
            for (int64_t b = 0; b < k / QK; ++b) {
                const int8_t* xq = x.qs + b * QK;
                int sumi = 0;
                for (int j = 0; j < QK / 2; ++j) {
                    sumi += ((a[b].qs[j] & 0x0F) - 8) * xq[j];
                    sumi += ((a[b].qs[j] >> 4) - 8) * xq[j + QK / 2];
                }
                acc = std::fma(float(sumi), half_to_float(a[b].d) * x.d[b], acc);
            }
            return acc;
        }
        case GgmlType::Q4_1: {
            const auto* a = reinterpret_cast<const block_q4_1*>(wr);
            const auto* x = reinterpret_cast<const block_q8_1*>(xr);
            for (int64_t b = 0; b < k / QK; ++b) {
                int sumi = 0;
                for (int j = 0; j < QK / 2; ++j) {
                    sumi += (a[b].qs[j] & 0x0F) * x[b].qs[j];
                    sumi += (a[b].qs[j] >> 4) * x[b].qs[j + QK / 2];
                }
                acc = std::fma(float(sumi), half_to_float(a[b].d) * x[b].d, acc);
                acc = std::fma(half_to_float(a[b].m), x[b].s, acc);
            }
            return acc;
        }
        default:
            fail(strfmt("no kernel for weight type %s", type_name(w)));
    }
}

void gemm_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows,
               int64_t n, const void* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy) {
    const auto* wb = static_cast<const uint8_t*>(W);
    const auto* xb = static_cast<const uint8_t*>(X);
    for (int64_t c = 0; c < nc; ++c)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t r = rows ? rows[i] : i;
            Y[c * ldy + i] = dot(w, k, wb + size_t(r) * w_stride, xb + size_t(c) * x_stride);
        }
}

void gemm(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* X,
          size_t x_stride, int64_t nc, float* Y, int64_t ldy) {
    gemm_rows(w, k, W, w_stride, nullptr, nr, X, x_stride, nc, Y, ldy);
}

// Dequantizes one weight row (k elements) into out.
void dequant(GgmlType w, const uint8_t* wr, float* out, int64_t k) {
    switch (w) {
        case GgmlType::F32:
            std::memcpy(out, wr, size_t(k) * 4);
            return;
        case GgmlType::F16: case GgmlType::BF16:
            for (int64_t j = 0; j < k; ++j) {
                uint16_t h;
                std::memcpy(&h, wr + 2 * j, 2);
                out[j] = w == GgmlType::F16 ? half_to_float(h) : bf16_to_float(h);
            }
            return;
        case GgmlType::Q8_0: {
            const auto* a = reinterpret_cast<const block_q8_0*>(wr);
            for (int64_t b = 0; b < k / QK; ++b)
                for (int j = 0; j < QK; ++j) out[b * QK + j] = half_to_float(a[b].d) * a[b].qs[j];
            return;
        }
        case GgmlType::Q4_0: {
            const auto* a = reinterpret_cast<const block_q4_0*>(wr);
            for (int64_t b = 0; b < k / QK; ++b) {
                const float d = half_to_float(a[b].d);
                for (int j = 0; j < QK / 2; ++j) {
                    out[b * QK + j] = d * ((a[b].qs[j] & 0x0F) - 8);
                    out[b * QK + j + QK / 2] = d * ((a[b].qs[j] >> 4) - 8);
                }
            }
            return;
        }
        case GgmlType::Q4_1: {
            const auto* a = reinterpret_cast<const block_q4_1*>(wr);
            for (int64_t b = 0; b < k / QK; ++b) {
                const float d = half_to_float(a[b].d), m = half_to_float(a[b].m);
                for (int j = 0; j < QK / 2; ++j) {
                    out[b * QK + j] = std::fma(float(a[b].qs[j] & 0x0F), d, m);
                    out[b * QK + j + QK / 2] = std::fma(float(a[b].qs[j] >> 4), d, m);
                }
            }
            return;
        }
        default:
            fail(strfmt("no kernel for weight type %s", type_name(w)));
    }
}

// One neuron group's listed rows [i0, i1) for every token: P = 0, P = fma(w, c, P) row after row,
// then Y += P (kernels.h, axpy_rows).
void axpy_group(GgmlType w, int64_t k, const uint8_t* wb, size_t w_stride, const int32_t* rows, int64_t i0,
                int64_t i1, const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy) {
    // The dequantized rows a piece of columns at a time, on the stack: any k works without
    // allocation, and columns are independent, so a piece at a time gives the same sums.
    constexpr int64_t kPiece = 256;  // a multiple of every block size
    float buf[kPiece], part[kPiece];
    for (int64_t j0 = 0; j0 < k; j0 += kPiece) {
        const int64_t len = std::min(kPiece, k - j0);
        const size_t off = weight_bytes(w, j0);
        for (int64_t c = 0; c < nc; ++c) {
            std::fill(part, part + len, 0.0f);
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t r = rows ? rows[i] : i;
                dequant(w, wb + size_t(r) * w_stride + off, buf, len);
                const float coef = C[c * ldc + i];
                for (int64_t j = 0; j < len; ++j) part[j] = std::fma(buf[j], coef, part[j]);
            }
            float* y = Y + c * ldy + j0;
            for (int64_t j = 0; j < len; ++j) y[j] += part[j];
        }
    }
}

void axpy_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows,
               int64_t n, const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy) {
    const auto* wb = static_cast<const uint8_t*>(W);
    for (int64_t i0 = 0; i0 < n;) {
        const int64_t g = (rows ? rows[i0] : i0) / kNeuronGroup;
        int64_t i1 = i0 + 1;
        while (i1 < n && i1 - i0 < kNeuronGroup && (rows ? rows[i1] : i1) / kNeuronGroup == g) ++i1;
        axpy_group(w, k, wb, w_stride, rows, i0, i1, C, ldc, nc, Y, ldy);
        i0 = i1;
    }
}

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

void gemm_interleaved(GgmlType w, int64_t k, const void* W, int64_t n_groups, const void* X,
                      size_t x_stride, int64_t nc, float* Y, int64_t ldy) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < n_groups; ++g) {
        const uint8_t* G = static_cast<const uint8_t*>(W) + size_t(g) * group_bytes(w, k);
        for (int64_t c = 0; c < nc; ++c) {
            const uint8_t* xr = static_cast<const uint8_t*>(X) + size_t(c) * x_stride;
            for (int i = 0; i < kGroupRows; ++i) {
                float* out = Y + c * ldy + g * kGroupRows + i;
                switch (w) {
                    case GgmlType::Q4_0: interleaved_group<GgmlType::Q4_0>(nb, G, xr, i, out); break;
                    case GgmlType::Q4_1: interleaved_group<GgmlType::Q4_1>(nb, G, xr, i, out); break;
                    case GgmlType::Q8_0: interleaved_group<GgmlType::Q8_0>(nb, G, xr, i, out); break;
                    default: fail(strfmt("no interleaved kernel for weight type %s", type_name(w)));
                }
            }
        }
    }
}

void dequant_row(GgmlType w, const void* src, float* dst, int64_t n) {
    dequant(w, static_cast<const uint8_t*>(src), dst, n);
}

void attn_tile(const float* q, const float* K, const float* V, int n, int hd, float scale, float* part) {
    float e[kAttnTileMax];
    float m = -INFINITY;
    for (int p = 0; p < n; ++p) {
        float s = 0.0f;
        for (int d = 0; d < hd; ++d) s = std::fma(q[d], K[p * hd + d], s);
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
        for (int p = 0; p < n; ++p) o = std::fma(e[p], V[p * hd + d], o);
        part[2 + d] = o;
    }
    part[0] = m;
    part[1] = l;
}

}  // namespace

size_t act_row_bytes(GgmlType w, int64_t k) {
    switch (w) {
        case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16:
            return size_t(k) * sizeof(float);
        case GgmlType::Q8_0: case GgmlType::Q4_0:
            return size_t(k / QK) * kQ8ActBlockBytes;
        case GgmlType::Q4_1:
            return size_t(k / QK) * sizeof(block_q8_1);
        default:
            fail(strfmt("no kernel for weight type %s", type_name(w)));
    }
}

const KernelSet kScalarKernels = {"scalar", quantize_act, gemm, gemm_rows, axpy_rows, attn_tile, dequant_row,
                                  gemm_interleaved};

}  // namespace ps::cpu

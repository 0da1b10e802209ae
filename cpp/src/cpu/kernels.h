// The compute kernels, one set per instruction set, behind a single dispatch point.
// kernels_scalar.cpp is the reference; kernels_avx2.cpp and kernels_avx512.cpp are compiled
// with their instruction sets and only ever called after a run-time CPU check (dispatch.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "quant.h"

namespace ps::cpu {

// ---- Per-type traits (the same for every instruction set) ------------------------------------
// Each weight type the kernels run is one row of kTraits: its block, the activation format its
// rows multiply with, and whether it has an interleaved form. Chunk sizes (ops.cpp) follow from
// the block size, so a new type is a row here plus its entries in the kernel sets below.
enum class Act : uint8_t {
    F32,   // activations stay f32 (F32, F16, BF16 weights)
    Q8S,   // Q8Act below: llama.cpp's Q8_0 values by field (Q8_0, Q4_0, Q5_0, IQ4_NL)
    Q8_1,  // our block_q8_1 (Q4_1, Q5_1)
    Q8K,   // llama.cpp's block_q8_K, 256 values (the K-quants)
};
constexpr int kActFormats = 4;

struct TypeTraits {
    int64_t block = 0;       // weights per block (1 for float types); 0: no kernels for the type
    size_t block_bytes = 0;  // bytes per block
    Act act = Act::F32;
    bool x8 = false;         // has an interleaved 8-row form ("Interleaved rows" below)
};
constexpr int kTypeSlots = 31;  // ggml type ids 0..30: every type with kernels has an id below
inline constexpr TypeTraits kTraits[kTypeSlots] = {
    /*  0 f32 */ {1, 4, Act::F32, false},
    /*  1 f16 */ {1, 2, Act::F32, false},
    /*  2 q4_0 */ {QK, sizeof(block_q4_0), Act::Q8S, true},
    /*  3 q4_1 */ {QK, sizeof(block_q4_1), Act::Q8_1, true},
    {}, {},
    /*  6 q5_0 */ {QK, sizeof(block_q5_0), Act::Q8S, true},
    /*  7 q5_1 */ {QK, sizeof(block_q5_1), Act::Q8_1, true},
    /*  8 q8_0 */ {QK, sizeof(block_q8_0), Act::Q8S, true},
    {},
    /* 10 q2_k */ {QK_K, sizeof(block_q2_K), Act::Q8K, true},
    /* 11 q3_k */ {QK_K, sizeof(block_q3_K), Act::Q8K, true},
    /* 12 q4_k */ {QK_K, sizeof(block_q4_K), Act::Q8K, true},
    /* 13 q5_k */ {QK_K, sizeof(block_q5_K), Act::Q8K, true},
    /* 14 q6_k */ {QK_K, sizeof(block_q6_K), Act::Q8K, true},
    {}, {}, {}, {}, {},
    /* 20 iq4_nl */ {QK, sizeof(block_iq4_nl), Act::Q8S, true},
    {}, {}, {}, {}, {}, {}, {}, {}, {},
    /* 30 bf16 */ {1, 2, Act::F32, false},
};
inline constexpr TypeTraits kNoTraits{};
constexpr const TypeTraits& traits(GgmlType w) {
    return uint32_t(w) < uint32_t(kTypeSlots) ? kTraits[uint32_t(w)] : kNoTraits;
}
constexpr bool has_kernels(GgmlType w) { return traits(w).block != 0; }

// Bytes of n weights of a type the kernels support (n a multiple of the block size), 0 for any
// other type. The kernels' own copy of quant.h's row_bytes, inline so the hot loops can use it.
constexpr size_t weight_bytes(GgmlType w, int64_t n) {
    const TypeTraits& t = traits(w);
    return t.block ? size_t(n / t.block) * t.block_bytes : 0;
}

// Bytes of one converted activation row of k values for weights of type w (0 if w has no kernels).
size_t act_row_bytes(GgmlType w, int64_t k);

// The activation row that meets Q8_0 and Q4_0 weights: llama.cpp's Q8_0 values laid out by field,
// the codes of all nb blocks, then their scales as floats (rounded to fp16, as Q8_0 stores them),
// then each block's integer sum of codes. The codes stay 32-byte aligned when the row is, and the
// kernels neither convert a scale nor recompute a sum for every weight row that meets a block.
constexpr size_t kQ8ActBlockBytes = QK + sizeof(float) + sizeof(int32_t);
template <class Byte>  // uint8_t to write a row, const uint8_t to read one
struct Q8Act {
    using I8 = std::conditional_t<std::is_const_v<Byte>, const int8_t, int8_t>;
    using F = std::conditional_t<std::is_const_v<Byte>, const float, float>;
    using I32 = std::conditional_t<std::is_const_v<Byte>, const int32_t, int32_t>;
    I8* qs;  // [nb][QK]
    F* d;    // [nb]
    I32* sum;  // [nb]
    Q8Act(Byte* row, int64_t nb)
        : qs(reinterpret_cast<I8*>(row)),
          d(reinterpret_cast<F*>(row + nb * QK)),
          sum(reinterpret_cast<I32*>(row + nb * (QK + sizeof(float)))) {}
};

// ---- Interleaved rows ---------------------------------------------------------------------------
// Quantized weights (every quantized type with kernels: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL, Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K) that matmul always reads whole (attention, output, the dense FFN, the
// predictor) are re-laid out at load in groups of 8 rows, as llama.cpp repacks
// Q4_0 into Q4_0x8 (the layout here is our own). With plain rows every weight row redoes the
// activation-side work of a block and converts its own fp16 scale, which made decode
// compute-bound on one core (15 GB/s on Zen 4). A group of 8 rows is nb blocks (super-blocks for
// the K-quants) of the type's x8 block, the same bytes as 8 plain rows, by one rule:
//   fp16 fields (d, m, dmin):  an array of 8, row i's at [i];
//   byte fields (qs, qh, ql, scales, hmask): cut into 4-byte chunks, row i's chunk m at [m * 32 + 4i].
// Q4_0/Q4_1: chunk m of qs holds columns 4m..4m+3 (low nibbles) and 16+4m..16+4m+3 (high);
// Q8_0: chunk m columns 4m..4m+3; Q5_0/Q5_1: qh[4i..4i+3] is row i's qh; Q4_K/Q5_K: chunk 8j + m of qs
// holds columns 64j + 4m.. (low nibbles, sub-block 2j) and 64j + 32 + 4m.. (high, 2j + 1), and
// scales chunk t row i's scales[4t..4t+3], Q5_K's qh chunk m row i's qh[4m..4m+3]; Q6_K likewise
// chunk by chunk of ql, qh and scales; Q2_K/Q3_K: chunk 8h + m of qs holds columns 128h + 32s + 4m..
// (bits 2s, s < 4), Q2_K's scales chunk t row i's scales[4t..4t+3] (sub-blocks 4t..4t+3), Q3_K's
// scales chunk t row i's packed scales[4t..4t+3] and hmask chunk m row i's hmask[4m..4m+3] (bit s:
// the third bit of column 32s + 4m..).
// One 32-byte chunk then holds 8 rows' codes for the same activation values (one vpdpbusd with a
// broadcast activation word serves 8 rows), one load converts 8 scales, and a group is a single
// sequential stream (scales and codes together, as the prefetcher wants).
#pragma pack(push, 1)
struct block_q4_0x8 { uint16_t d[8]; uint8_t qs[128]; };
struct block_q4_1x8 { uint16_t d[8]; uint16_t m[8]; uint8_t qs[128]; };
struct block_q8_0x8 { uint16_t d[8]; int8_t qs[256]; };
struct block_q5_0x8 { uint16_t d[8]; uint8_t qh[32]; uint8_t qs[128]; };
struct block_q4_Kx8 { uint16_t d[8]; uint16_t dmin[8]; uint8_t scales[96]; uint8_t qs[1024]; };
struct block_q6_Kx8 { uint16_t d[8]; int8_t scales[128]; uint8_t ql[1024]; uint8_t qh[512]; };
struct block_q5_1x8 { uint16_t d[8]; uint16_t m[8]; uint8_t qh[32]; uint8_t qs[128]; };
struct block_iq4_nlx8 { uint16_t d[8]; uint8_t qs[128]; };
struct block_q5_Kx8 { uint16_t d[8]; uint16_t dmin[8]; uint8_t scales[96]; uint8_t qh[256]; uint8_t qs[1024]; };
struct block_q2_Kx8 { uint16_t d[8]; uint16_t dmin[8]; uint8_t scales[128]; uint8_t qs[512]; };
struct block_q3_Kx8 { uint16_t d[8]; uint8_t scales[96]; uint8_t hmask[256]; uint8_t qs[512]; };
#pragma pack(pop)
static_assert(sizeof(block_q4_0x8) == 8 * sizeof(block_q4_0), "block_q4_0x8 layout");
static_assert(sizeof(block_q4_1x8) == 8 * sizeof(block_q4_1), "block_q4_1x8 layout");
static_assert(sizeof(block_q8_0x8) == 8 * sizeof(block_q8_0), "block_q8_0x8 layout");
static_assert(sizeof(block_q5_0x8) == 8 * sizeof(block_q5_0), "block_q5_0x8 layout");
static_assert(sizeof(block_q4_Kx8) == 8 * sizeof(block_q4_K), "block_q4_Kx8 layout");
static_assert(sizeof(block_q6_Kx8) == 8 * sizeof(block_q6_K), "block_q6_Kx8 layout");
static_assert(sizeof(block_q5_1x8) == 8 * sizeof(block_q5_1), "block_q5_1x8 layout");
static_assert(sizeof(block_iq4_nlx8) == 8 * sizeof(block_iq4_nl), "block_iq4_nlx8 layout");
static_assert(sizeof(block_q5_Kx8) == 8 * sizeof(block_q5_K), "block_q5_Kx8 layout");
static_assert(sizeof(block_q2_Kx8) == 8 * sizeof(block_q2_K), "block_q2_Kx8 layout");
static_assert(sizeof(block_q3_Kx8) == 8 * sizeof(block_q3_K), "block_q3_Kx8 layout");
constexpr int kGroupRows = 8;

// Each type's block fields for the rule above, one table that the load-time copies
// (interleave.cpp) and the on-the-fly transposition of gathered rows (kernels_x86_rows.inc) both
// read: offset and size in the plain block and in the x8 block; half: an fp16 (an array of 8 in
// the x8 block), else bytes in 4-byte chunks.
struct X8Field {
    uint16_t plain, x8, bytes;
    bool half;
};
template <GgmlType T> struct X8Layout;
#define PS_X8_HALF(f) X8Field{uint16_t(offsetof(Plain, f)), uint16_t(offsetof(X8, f)), 2, true}
#define PS_X8_BYTES(f) X8Field{uint16_t(offsetof(Plain, f)), uint16_t(offsetof(X8, f)), uint16_t(sizeof(Plain::f)), false}
#define PS_X8_LAYOUT(T, P, X, ...)                  \
    template <> struct X8Layout<GgmlType::T> {       \
        using Plain = P;                             \
        using X8 = X;                                \
        static constexpr X8Field f[] = {__VA_ARGS__}; \
    };
PS_X8_LAYOUT(Q4_0, block_q4_0, block_q4_0x8, PS_X8_HALF(d), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q4_1, block_q4_1, block_q4_1x8, PS_X8_HALF(d), PS_X8_HALF(m), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q8_0, block_q8_0, block_q8_0x8, PS_X8_HALF(d), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q5_0, block_q5_0, block_q5_0x8, PS_X8_HALF(d), PS_X8_BYTES(qh), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q5_1, block_q5_1, block_q5_1x8, PS_X8_HALF(d), PS_X8_HALF(m), PS_X8_BYTES(qh), PS_X8_BYTES(qs))
PS_X8_LAYOUT(IQ4_NL, block_iq4_nl, block_iq4_nlx8, PS_X8_HALF(d), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q4_K, block_q4_K, block_q4_Kx8, PS_X8_HALF(d), PS_X8_HALF(dmin), PS_X8_BYTES(scales), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q5_K, block_q5_K, block_q5_Kx8, PS_X8_HALF(d), PS_X8_HALF(dmin), PS_X8_BYTES(scales), PS_X8_BYTES(qh),
             PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q6_K, block_q6_K, block_q6_Kx8, PS_X8_HALF(d), PS_X8_BYTES(scales), PS_X8_BYTES(ql), PS_X8_BYTES(qh))
PS_X8_LAYOUT(Q2_K, block_q2_K, block_q2_Kx8, PS_X8_HALF(d), PS_X8_HALF(dmin), PS_X8_BYTES(scales), PS_X8_BYTES(qs))
PS_X8_LAYOUT(Q3_K, block_q3_K, block_q3_Kx8, PS_X8_HALF(d), PS_X8_BYTES(scales), PS_X8_BYTES(hmask), PS_X8_BYTES(qs))
#undef PS_X8_LAYOUT
#undef PS_X8_BYTES
#undef PS_X8_HALF

inline bool can_interleave(GgmlType w, int64_t k, int64_t n_rows) {
    return traits(w).x8 && k > 0 && k % traits(w).block == 0 && n_rows % kGroupRows == 0 && n_rows > 0;
}
// Bytes of one group of 8 interleaved rows of k weights (of a type can_interleave accepts).
inline size_t group_bytes(GgmlType w, int64_t k) { return weight_bytes(w, k) * kGroupRows; }
// Interleaves n_groups groups of 8 plain rows (k weights, src_stride bytes apart) into dst.
void interleave_rows(GgmlType w, int64_t k, const uint8_t* src, size_t src_stride, int64_t n_groups,
                     uint8_t* dst);
// The inverse: one interleaved group (group_bytes(w, k) bytes) back into 8 plain rows of k weights,
// dst_stride bytes apart (the scalar reference of the newer x8 types reads rows this way).
void deinterleave_group(GgmlType w, int64_t k, const uint8_t* src, uint8_t* dst, size_t dst_stride);

// The batch-invariance rule (docs/design.md, "Determinism"): a (weight row, token) product is the
// same sequence of operations whatever the batch, the thread count or the list of rows. For the
// quantized types that sequence is the interleaved reference's (kernels_scalar.cpp): per 32-block
// an exact integer dot, then one fma per block into a single accumulator in block order (Q4_1: a
// second fma for the min). Sums over neurons (axpy_rows) go through fixed groups of
// kNeuronGroup neurons by absolute index, the groups added in index order: a token's sum then
// depends only on its own rows, and a hot/cold split at a group boundary continues the chain.
constexpr int kNeuronGroup = 64;
constexpr int kAttnTileMax = 128;  // positions per attention tile (attention.h)

// The kernels of one weight type in one instruction set (the arguments as KernelSet's wrappers
// below describe them). gemm_interleaved is nullptr for types without an interleaved form.
using QuantizeActFn = void (*)(const float* x, void* xa, int64_t k);
using GemmRowsFn = void (*)(int64_t k, const uint8_t* W, size_t w_stride, const int32_t* rows, int64_t n,
                            const uint8_t* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy);
using AxpyRowsFn = void (*)(int64_t k, const uint8_t* W, size_t w_stride, const int32_t* rows, int64_t n,
                            const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy);
using DequantFn = void (*)(const uint8_t* src, float* dst, int64_t n);
using GemmX8Fn = void (*)(int64_t k, const uint8_t* W, int64_t n_groups, const uint8_t* X, size_t x_stride,
                          int64_t nc, float* Y, int64_t ldy);
struct TypeKernels {
    GemmRowsFn gemm_rows = nullptr;  // nullptr: no kernels for this type
    AxpyRowsFn axpy_rows = nullptr;
    DequantFn dequant_row = nullptr;
    GemmX8Fn gemm_interleaved = nullptr;
};

// One instruction set's kernels: a table of per-type entries (by ggml type id) and the per-format
// activation converters, plus the type-independent kernels. The SIMD sets start as copies of the
// scalar set and replace the entries they implement, so a type without a SIMD kernel runs the
// scalar reference (which the batch-invariance rule makes bitwise the same anyway).
struct KernelSet {
    const char* isa = "";  // "scalar", "avx2", "avx512"
    QuantizeActFn quantize[kActFormats] = {};
    TypeKernels types[kTypeSlots] = {};

    // One tile of attention for one query head (attention.cpp): s_p = (q . k_p) * scale for the n
    // (<= kAttnTileMax) keys of the tile (K[p * hd + d], V likewise); m = max s_p,
    // e_p = exp(s_p - m), l = sum of e_p, o = sum of e_p v_p as an fma chain in position order.
    // Writes part = (m, l, o[0..hd)). The exp, l's summation order (scalar: position order; x86:
    // per-lane sums, then across the lanes) and a dot's lane order are fixed per instruction set
    // (as for float weights), so results are the same for any batch and thread count.
    void (*attn_tile)(const float* q, const float* K, const float* V, int n, int hd, float scale, float* part) = nullptr;
    // The same on an f16 cache's rows read in place (IEEE halves): the bits attn_tile gives on their
    // float values (the conversion is exact), without converting the tile into a float buffer first.
    void (*attn_tile_f16)(const float* q, const uint16_t* K, const uint16_t* V, int n, int hd, float scale,
                          float* part) = nullptr;

    // Residual-stream vector routines (vec.h), the same bits in every set: y[i] = fma(a, x[i], y[i]);
    // y[i] *= a; RMSNorm with the sum of squares in double, fma-accumulated in index order, then
    // y[i] = (x[i] * inv) * w[i].
    void (*vec_axpy)(float* y, float a, const float* x, int64_t n) = nullptr;
    void (*vec_scale)(float* y, float a, int64_t n) = nullptr;
    void (*rms_norm)(float* y, const float* x, const float* w, int64_t n, float eps) = nullptr;

    // The entry of weight type w; throws naming the type if this set has none.
    const TypeKernels& of(GgmlType w) const {
        const TypeKernels* t = uint32_t(w) < uint32_t(kTypeSlots) ? &types[uint32_t(w)] : nullptr;
        if (!t || !t->gemm_rows) no_kernel(w);
        return *t;
    }

    // Convert one activation row of k floats to the format weights of type w multiply with.
    // Q8_0/Q8_1 rounding follows llama.cpp's reference quantizer bit for bit (round half away
    // from zero), Q8_K its quantize_row_q8_K_ref (round half to even), in every instruction set,
    // so activations never depend on the ISA.
    void quantize_act(GgmlType w, const float* x, void* xa, int64_t k) const {
        of(w);
        quantize[int(traits(w).act)](x, xa, k);
    }

    // Y[c * ldy + i] = dot(row rows[i] of W, activation row c), for i < n and c < nc (rows ==
    // nullptr: rows 0..n-1). Rows of W are w_stride bytes apart, activation rows x_stride bytes
    // apart. k is a multiple of the block size of w. The caller guarantees 0 <= rows[i] < rows of
    // W. Quantized rows give the same bits as gemm_interleaved would.
    void gemm_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows, int64_t n,
                   const void* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy) const {
        of(w).gemm_rows(k, static_cast<const uint8_t*>(W), w_stride, rows, n, static_cast<const uint8_t*>(X),
                        x_stride, nc, Y, ldy);
    }
    void gemm(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* X, size_t x_stride,
              int64_t nc, float* Y, int64_t ldy) const {
        gemm_rows(w, k, W, w_stride, nullptr, nr, X, x_stride, nc, Y, ldy);
    }

    // Sparse down projection over the neuron-major ffn_down_t, in neuron groups (kNeuronGroup):
    // Y[c * ldy + j] += sum over groups g, in group order, of P_g[c][j], where
    // P_g[c][j] = sum over the listed rows i in group g, in list order, of C[c * ldc + i] * W[rows[i]][j],
    // starting from zero; each term is fma(w, C, P) with w the weight as dequant_row gives it.
    // A row's group is rows[i] / kNeuronGroup (rows == nullptr: rows 0..n-1, row i in group
    // i / kNeuronGroup). rows must be ascending. Columns are independent, so callers may split them
    // (at block boundaries, offsetting W by weight_bytes(w, j0)) freely.
    void axpy_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows, int64_t n,
                   const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy) const {
        of(w).axpy_rows(k, static_cast<const uint8_t*>(W), w_stride, rows, n, C, ldc, nc, Y, ldy);
    }

    // dst[0..n) = a row of n values of type w as floats, exactly as the gguf package's numpy
    // dequantization gives them (Q4_1: fma(q, d, m)); n a multiple of the block size.
    void dequant_row(GgmlType w, const void* src, float* dst, int64_t n) const {
        of(w).dequant_row(static_cast<const uint8_t*>(src), dst, n);
    }

    // gemm over interleaved rows (n_groups groups of 8, see above):
    // Y[c * ldy + 8g + i] = dot(row i of group g, activation row c). Per row, the same operations
    // in every instruction set (bitwise the same results).
    void gemm_interleaved(GgmlType w, int64_t k, const void* W, int64_t n_groups, const void* X,
                          size_t x_stride, int64_t nc, float* Y, int64_t ldy) const {
        const GemmX8Fn f = of(w).gemm_interleaved;
        if (!f) no_kernel(w);
        f(k, static_cast<const uint8_t*>(W), n_groups, static_cast<const uint8_t*>(X), x_stride, nc, Y, ldy);
    }

    [[noreturn]] static void no_kernel(GgmlType w);
};

// The best set this CPU supports, chosen once. PROSPARSE_ISA=scalar|avx2|avx512 forces one.
const KernelSet& kernels();
// A named set if this build has it and this CPU supports it, else nullptr (tests use this).
const KernelSet* kernels_for(const char* isa);

// Per instruction set (defined in the kernels_*.cpp files), built on first use.
const KernelSet& scalar_kernels();
#if defined(PROSPARSE_X86)
const KernelSet& avx2_kernels();
const KernelSet& avx512_kernels();
#endif

}  // namespace ps::cpu

// The compute kernels, one set per instruction set, behind a single dispatch point.
// kernels_scalar.cpp is the reference; kernels_avx2.cpp and kernels_avx512.cpp are compiled
// with their instruction sets and only ever called after a run-time CPU check (dispatch.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "quant.h"

namespace ps::cpu {

// The format activations are converted to before they meet weights of type `w`:
// F32 for F32/F16/BF16 weights, Q8_0 values (Q8Act below) for Q8_0/Q4_0, our Q8_1 for Q4_1.
size_t act_row_bytes(GgmlType w, int64_t k);

// Bytes of n weights of a type the kernels support (n a multiple of the block size), 0 for any
// other type. The kernels' own copy of quant.h's row_bytes, inline so the hot loops can use it.
inline size_t weight_bytes(GgmlType w, int64_t n) {
    switch (w) {
        case GgmlType::F32: return size_t(n) * 4;
        case GgmlType::F16: case GgmlType::BF16: return size_t(n) * 2;
        case GgmlType::Q8_0: return size_t(n / QK) * sizeof(block_q8_0);
        case GgmlType::Q4_0: return size_t(n / QK) * sizeof(block_q4_0);
        case GgmlType::Q4_1: return size_t(n / QK) * sizeof(block_q4_1);
        default: return 0;
    }
}

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
// Q4_0, Q4_1 and Q8_0 weights that matmul always reads whole (attention, output, the dense FFN,
// the predictor) are re-laid out at load in groups of 8 rows, as llama.cpp repacks Q4_0 into
// Q4_0x8 (the layout here is our own). With plain rows every weight row redoes the
// activation-side work of a block and converts its own fp16 scale, which made decode
// compute-bound on one core (15 GB/s on Zen 4). A group of 8 rows is nb blocks of the type's
// x8 block, the same bytes as 8 plain rows:
//   d[i] (and m[i]):   row i's fp16 scale (and min) of the block;
//   qs[m * 32 + 4i]:   Q4_0/Q4_1: bytes 4m..4m+3 (m < 4) of row i's 16 nibble bytes, that is
//                      columns 4m..4m+3 (low nibbles) and 16+4m..16+4m+3 (high nibbles);
//                      Q8_0: bytes 4m..4m+3 (m < 8) of row i's codes, columns 4m..4m+3.
// One 32-byte chunk then holds 8 rows' codes for the same activation values (one vpdpbusd with a
// broadcast activation word serves 8 rows), one load converts 8 scales, and a group is a single
// sequential stream (scales and codes together, as the prefetcher wants).
#pragma pack(push, 1)
struct block_q4_0x8 { uint16_t d[8]; uint8_t qs[128]; };
struct block_q4_1x8 { uint16_t d[8]; uint16_t m[8]; uint8_t qs[128]; };
struct block_q8_0x8 { uint16_t d[8]; int8_t qs[256]; };
#pragma pack(pop)
static_assert(sizeof(block_q4_0x8) == 8 * sizeof(block_q4_0), "block_q4_0x8 layout");
static_assert(sizeof(block_q4_1x8) == 8 * sizeof(block_q4_1), "block_q4_1x8 layout");
static_assert(sizeof(block_q8_0x8) == 8 * sizeof(block_q8_0), "block_q8_0x8 layout");
constexpr int kGroupRows = 8;
inline bool can_interleave(GgmlType w, int64_t k, int64_t n_rows) {
    const bool type_ok = w == GgmlType::Q4_0 || w == GgmlType::Q4_1 || w == GgmlType::Q8_0;
    return type_ok && k > 0 && k % QK == 0 && n_rows % kGroupRows == 0 && n_rows > 0;
}
// Bytes of one group of 8 interleaved rows of k weights (of a type can_interleave accepts).
inline size_t group_bytes(GgmlType w, int64_t k) { return weight_bytes(w, k) * kGroupRows; }
// Interleaves n_groups groups of 8 plain rows (k weights, src_stride bytes apart) into dst.
void interleave_rows(GgmlType w, int64_t k, const uint8_t* src, size_t src_stride, int64_t n_groups,
                     uint8_t* dst);

// The batch-invariance rule (docs/design.md, "Determinism"): a (weight row, token) product is the
// same sequence of operations whatever the batch, the thread count or the list of rows. For the
// quantized types that sequence is the interleaved reference's (kernels_scalar.cpp): per 32-block
// an exact integer dot, then one fma per block into a single accumulator in block order (Q4_1: a
// second fma for the min). Sums over neurons (axpy_rows) go through fixed groups of
// kNeuronGroup neurons by absolute index, the groups added in index order: a token's sum then
// depends only on its own rows, and a hot/cold split at a group boundary continues the chain.
constexpr int kNeuronGroup = 64;
constexpr int kAttnTileMax = 128;  // positions per attention tile (attention.h)

struct KernelSet {
    const char* isa;  // "scalar", "avx2", "avx512"

    // Convert one activation row of k floats to the format weights of type w multiply with.
    // Q8_0/Q8_1 rounding follows llama.cpp's reference quantizer bit for bit (round half away
    // from zero), in every instruction set, so activations never depend on the ISA.
    void (*quantize_act)(GgmlType w, const float* x, void* xa, int64_t k);

    // Y[c * ldy + r] = dot(row r of W, activation row c), for r < nr and c < nc.
    // Rows of W are w_stride bytes apart, activation rows x_stride bytes apart. k is a multiple
    // of the block size of w. Quantized rows give the same bits as gemm_interleaved would.
    void (*gemm)(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr,
                 const void* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy);

    // Sparse gate/up (docs/design.md "The FFN strategies"): gemm over listed rows only,
    // Y[c * ldy + i] = dot(row rows[i] of W, activation row c), for i < n and c < nc.
    // The caller guarantees 0 <= rows[i] < rows of W.
    void (*gemm_rows)(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows,
                      int64_t n, const void* X, size_t x_stride, int64_t nc, float* Y, int64_t ldy);

    // Sparse down projection over the neuron-major ffn_down_t, in neuron groups (kNeuronGroup):
    // Y[c * ldy + j] += sum over groups g, in group order, of P_g[c][j], where
    // P_g[c][j] = sum over the listed rows i in group g, in list order, of C[c * ldc + i] * W[rows[i]][j],
    // starting from zero; each term is fma(w, C, P) with w the weight as dequantize gives it
    // (d * q, Q4_1 fma(q, d, m)). A row's group is rows[i] / kNeuronGroup (rows == nullptr: rows
    // 0..n-1, row i in group i / kNeuronGroup). rows must be ascending. Columns are independent,
    // so callers may split them (at block boundaries, offsetting W by weight_bytes(w, j0)) freely.
    void (*axpy_rows)(GgmlType w, int64_t k, const void* W, size_t w_stride, const int32_t* rows,
                      int64_t n, const float* C, int64_t ldc, int64_t nc, float* Y, int64_t ldy);

    // One tile of attention for one query head (attention.cpp): s_p = (q . k_p) * scale for the n
    // (<= kAttnTileMax) keys of the tile (K[p * hd + d], V likewise); m = max s_p,
    // e_p = exp(s_p - m), l = sum of e_p in position order, o = sum of e_p v_p as an fma chain in
    // position order. Writes part = (m, l, o[0..hd)). A dot's lane order is fixed per instruction
    // set (as for float weights), so results are the same for any batch and thread count.
    void (*attn_tile)(const float* q, const float* K, const float* V, int n, int hd, float scale, float* part);

    // dst[0..n) = a row of n values of type w as floats, exactly as dequantize gives them (d * q;
    // Q4_1 fma(q, d, m)); n a multiple of the block size for the quantized types.
    void (*dequant_row)(GgmlType w, const void* src, float* dst, int64_t n);

    // gemm over interleaved rows (n_groups groups of 8, see above):
    // Y[c * ldy + 8g + i] = dot(row i of group g, activation row c). Per row, the same operations
    // in every instruction set (bitwise the same results).
    void (*gemm_interleaved)(GgmlType w, int64_t k, const void* W, int64_t n_groups, const void* X,
                             size_t x_stride, int64_t nc, float* Y, int64_t ldy);
};

// The best set this CPU supports, chosen once. PROSPARSE_ISA=scalar|avx2|avx512 forces one.
const KernelSet& kernels();
// A named set if this build has it and this CPU supports it, else nullptr (tests use this).
const KernelSet* kernels_for(const char* isa);

// Per instruction set (defined in the kernels_*.cpp files).
extern const KernelSet kScalarKernels;
#if defined(PROSPARSE_X86)
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif

}  // namespace ps::cpu

// The CUDA kernels as the runtime sees them: plain C++ declarations, no CUDA types, so the GPU
// executor's host code and the tests compile against them like any other header. Implemented in
// kernels*.cu (compiled only in a CUDA build; nothing outside cpp/src/cuda/ calls these in a build
// without CUDA).
//
// Conventions for every function here:
//   - Pointers are device pointers of the current device unless a comment says otherwise; nothing
//     is copied between host and device.
//   - Work is launched asynchronously on `s` (a cudaStream_t; nullptr is the legacy default
//     stream). The function returns once the launch is queued.
//   - Arguments are validated on the host before launching: a shape, type or alignment the kernels
//     cannot take throws ps::Error naming it; a failed launch throws CudaError (cuda/device.h).
//     Kernels check nothing the host could have checked; values the host cannot see (token ids,
//     positions on the device) are bounds-checked in the kernel and never read out of range.
//   - Weight rows are the GGUF row layout (blocks.h), `w_stride` bytes apart. Row starts must be
//     aligned to 4 bytes for F32 and Q4_1, 2 bytes for every other type. Converted
//     activations (xa) start 16-byte aligned (any cudaMalloc'd buffer is), float arrays 4-byte.
//
// The arithmetic is the CPU's (docs/design.md, "GPU kernels"): the block math lives in
// block_math.h, which the CPU tests run. Quantized products give the same bits as the CPU's
// KernelSet (per block an exact integer dot (K-quants: per 256-weight super-block, the sub-block
// dots times their integer scales), one fma per block into one accumulator in block order, a
// second for the min of Q4_1, Q5_1, Q4_K, Q5_K and Q2_K), the down projection the same bits as cpu::KernelSet::axpy_rows for every weight type.
// Float-weight products use a fixed order of their own (the same for any batch), within float
// rounding of the CPU's. Norms and attention agree with the CPU within float rounding.
#pragma once

#include <cstddef>
#include <cstdint>

#include "arch.h"      // Activation
#include "ffn.h"       // FfnStrategy
#include "kv_cache.h"  // KvType
#include "quant.h"     // GgmlType

namespace ps::cuda {

using Stream = void*;  // cudaStream_t

// The weight types the kernels compute with: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL,
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (every type the CPU kernels run).
bool kernel_type_supported(GgmlType w);

// ---- Activations and matrix products -----------------------------------------------------------

// Bytes of one converted activation row of k values for weights of type w, a multiple of 16 so
// consecutive rows stay aligned. Layout within the row: as the CPU's (cpu/kernels.h): f32 values
// for F32/F16/BF16 weights; Q8Act (codes [nb][32], then nb float scales, then nb int32 code sums)
// for Q8_0/Q4_0/Q5_0/IQ4_NL; nb block_q8_1 for Q4_1/Q5_1; k / 256 block_q8_K for the K-quants; zero
// padding after.
size_t act_bytes(GgmlType w, int64_t k);

// xa row c (act_bytes(w, k) bytes apart) = activation row c of x (rows ldx floats apart), c < nt,
// converted for weights of type w: bit for bit what cpu::KernelSet::quantize_act writes (llama.cpp's
// reference rounding). k a multiple of the block size of w.
void quantize_act(GgmlType w, int64_t k, const float* x, int64_t ldx, int nt, void* xa, Stream s);

// Y[c * ldy + r] = dot(weight row r, activation row c) for r < nr, c < nt; xa as quantize_act wrote
// it. Rows of W are w_stride bytes apart. Quantized types: the CPU's bits. Several tokens share
// each weight read (small batches and prompts alike); the result of a (row, token) never depends on
// nt or on the other rows.
// Picks the tiled kernel below for Q8_0/Q4_0/Q4_1 weights and nt >= 16 on sm_80+ (unless the
// environment has PROSPARSE_CUDA_MMA=0, read once per process), else the row kernels; both give
// the same bits.
void gemm(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
          int64_t ldy, Stream s);
// gemm by the row kernels: a warp takes 2 rows and 8 tokens per pass (every supported type).
void gemm_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
               int64_t ldy, Stream s);
// gemm by int8 tensor cores (mma.m16n8k32, kernels_mma.cu): 64 rows x 32 tokens per block, each
// (row, token) the row kernels' chain over exact integer block dots. Throws ps::Error where
// gemm_tiled_available is false.
bool gemm_tiled_available(GgmlType w);  // Q8_0, Q4_0 or Q4_1 weights on a current device of sm_80+
void gemm_tiled(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
                int64_t ldy, Stream s);

// ---- The sparse FFN on the hot prefix [0, n_hot) (ffn.h, FfnExecutor) ---------------------------

struct FfnHotArgs {
    // DENSE: gate and up of every row. EXACT: gate of every row, up only of rows some token
    // activates. PREDICT: rows no token's predictor logit exceeds pred_thr are skipped whole; a
    // token's activation of a row its logit does not select is 0 (as the CPU's predict).
    FfnStrategy strategy = FfnStrategy::DENSE;
    Activation act = Activation::SILU;  // with act_t: exactly ffn_activation (ffn.h)
    float act_t = 0.0f;
    int64_t n_embd = 0;  // k of the gate and up rows
    int64_t n_hot = 0;   // rows [0, n_hot) of gate, up and the coefficients
    int nt = 0;          // tokens
    GgmlType gate_type = GgmlType::F32, up_type = GgmlType::F32;
    const void* gate = nullptr;
    size_t gate_stride = 0;
    const void* up = nullptr;
    size_t up_stride = 0;
    // the ffn_norm output h converted by quantize_act for gate_type and for up_type (the same
    // buffer when the types are equal), nt rows act_bytes(type, n_embd) apart
    const void* xa_gate = nullptr;
    const void* xa_up = nullptr;
    const float* pred_logit = nullptr;  // PREDICT: [nt][ld_logit], neuron r at column r
    int64_t ld_logit = 0;
    float pred_thr = 0.0f;
    int64_t pred_always_on = 0;  // PREDICT: rows [0, pred_always_on) selected for every token (the CPU's prefix)
    // Out: coef[c * ldc + r] = act(gate) * up for rows whose up was read, 0 elsewhere (r < n_hot);
    // active[r] = 1 where the row's up was read (so its down row must be read), else 0.
    float* coef = nullptr;
    int64_t ldc = 0;
    uint8_t* active = nullptr;
    // Optional ([4], added to, not zeroed): (token, row) pairs with a non-zero activation; rows
    // whose up was read; (token, row) pairs the predictor selected (PREDICT); rows whose gate
    // was read.
    int32_t* counts = nullptr;
};

// The coefficients of the down projection for the hot rows: one fused kernel (predictor check,
// gate, activation with its threshold, up only for rows with an active token). The CPU's
// coefficients bit for bit for quantized gate/up (NaN propagates as in ffn_activation).
void ffn_hot_coef(const FfnHotArgs& a, Stream s);

// Scratch that ffn_hot_down needs for rows [0, n_hot) of n_embd columns (any nt).
size_t ffn_down_scratch_bytes(int64_t n_embd, int64_t n_hot);

// The down projection over the neuron-major ffn_down_t rows [0, n_hot) (W, w_stride bytes apart,
// n_embd weights of type w each), for the rows with active[r] != 0:
//   Y[c * ldy + j] += P_0 + P_1 + ... (added in group order, left to right), where
//   P_g[c][j] = fma chain over the active rows r of group g = r / kNeuronGroup, in index order,
//               starting from 0: P = fma(w[r][j], coef[c * ldc + r], P), w as the CPU dequantizes it.
// The bits of cpu::KernelSet::axpy_rows over the same rows, for every weight type, so a hybrid
// split continues the CPU's chain of group sums exactly. No atomics: each group's partial goes to
// `scratch` (ffn_down_scratch_bytes), then one pass folds them in order.
void ffn_hot_down(GgmlType w, int64_t n_embd, const void* W, size_t w_stride, int64_t n_hot, const float* coef,
                  int64_t ldc, const uint8_t* active, int nt, float* Y, int64_t ldy, void* scratch, Stream s);

// ---- The rest of a layer --------------------------------------------------------------------------

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for nt rows of n (the sum of squares in double, as
// vec.cpp). y may be x.
void rms_norm(const float* x, const float* w, int nt, int64_t n, float eps, float* y, Stream s);

// llama.cpp's "normal" RoPE (attention.h) on nt rows of n_heads heads of head_dim (rows ldx floats
// apart), in place: pairs (2i, 2i+1), i < n_rot / 2, rotated by cs[t * n_rot + 2i] (cos) and
// cs[t * n_rot + 2i + 1] (sin): the table rope_table computes on the host, so the angles are the
// CPU's. The same bits as rope() (separately rounded products).
void rope(float* x, int nt, int64_t ldx, int n_heads, int head_dim, int n_rot, const float* cs, Stream s);

// y[i] = fma(a, x[i], y[i]) for i < n (the residual add; exact when a == 1).
void add_scaled(float* y, float a, const float* x, int64_t n, Stream s);
// y[i] *= a.
void scale(float* y, float a, int64_t n, Stream s);
// y[i] = max(0, y[i]) (the predictor's hidden layer; NaN becomes 0, as std::max(0.0f, NaN)).
void relu(float* y, int64_t n, Stream s);

// x[t] = row tokens[t] of the embedding table (n_vocab rows of n_embd values of type t, row_stride
// bytes apart) as quant.h's dequantize_row gives it, times scale when scale != 1. A token id
// outside [0, n_vocab) (the host checks them before upload) gives a row of NaN, never a stray read.
void embed(GgmlType t, const void* table, size_t row_stride, int64_t n_vocab, int64_t n_embd, const int32_t* tokens,
           int nt, float scale, float* x, Stream s);

// The device KV cache of one layer: kc and vc each [n_seq][n_head_kv][n_ctx] rows of head_dim
// values of type t (KvCache's layout and row format, one layer of it). Stores token t's keys and
// values (k[t * ld + h * head_dim + d], likewise v) at (seq[t], pos[t]), rounded as
// KvCache::store does (quant.h's quantize_row: the same bits). seq and pos are device arrays of nt;
// a slot out of range is skipped (the host validates them first).
void kv_store(KvType t, int n_head_kv, int head_dim, int n_ctx, int n_seq, const float* k, const float* v, int64_t ld,
              int nt, const int32_t* seq, const int32_t* pos, uint8_t* kc, uint8_t* vc, Stream s);

// Causal attention over that layer cache: out[t * n_head * head_dim + h * head_dim + d] =
// softmax_p(q_h . k_p * scale) v_p over positions p = 0..pos[t] of sequence seq[t], query head h
// using KV head h / (n_head / n_head_kv); q rows are n_head * head_dim floats, one per token. Split
// over positions (flash-decoding): each tile of kAttnTile positions (attention.h, the CPU's tiles)
// gets its own block and online-softmax partial in `scratch`, and a second kernel merges a (token,
// head)'s partials in tile order, as attention.cpp does; no atomics, and a (token, head) gets the
// same bits in any batch. Results within float rounding of attention.cpp. head_dim <= 256 (and a
// multiple of 32 for a Q8_0 cache); scratch holds attention_scratch_bytes(n_head, head_dim, n_ctx,
// nt_max) bytes for some nt_max >= nt (4-byte aligned).
size_t attention_scratch_bytes(int n_head, int head_dim, int n_ctx, int nt_max);
void attention(KvType t, int n_head, int n_head_kv, int head_dim, int n_ctx, int n_seq, const float* q, int nt,
               const int32_t* seq, const int32_t* pos, const uint8_t* kc, const uint8_t* vc, float scale, float* out,
               void* scratch, Stream s);

}  // namespace ps::cuda

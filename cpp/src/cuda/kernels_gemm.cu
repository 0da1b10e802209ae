// Activation conversion, matrix products and the sparse FFN's kernels (cuda/kernels.h).
//
// A row product is the CPU's sequence of operations (block_math.h): per block (32 weights, or a
// K-quant's 256) an exact integer dot, then one fma per block (two with a min) into one accumulator
// in block order. A warp takes kRows weight rows and up to kTok tokens: its 32 lanes compute the
// block terms of 32 consecutive blocks (coalesced loads; Q8_0/Q4_0/Q4_1 blocks loaded once for all
// the tokens, the other types read in place per term), park them in shared memory, and then
// one lane per (row, token) runs the fma chain over those 32 blocks in order. The result of a
// (row, token) is the same whichever rows and tokens share its warp.
#include "cuda/kernels_util.cuh"

namespace ps::cuda {

namespace {

using namespace detail;

constexpr int kLanes = 32;
constexpr int kWarps = 4;  // warps per block of the row kernels
constexpr int kRows = 2;   // weight rows per warp
constexpr int kTok = 8;    // tokens per pass over a row (kRows * kTok <= kLanes chain lanes)
static_assert(kRows * kTok <= kLanes, "one chain lane per (row, token)");
constexpr unsigned kFull = 0xFFFFFFFFu;

__host__ __device__ constexpr bool quantized(GgmlType w) { return bm::is_quantized(w); }

// Block terms parked between the lanes that compute them and the lanes that chain them; one more
// column than lanes so the chain lanes' reads fall in different banks.
using TermTile = bm::BlockTerm[kRows][kTok][kLanes + 1];

// The products of rows[r] (r in row_mask) with activation rows xa + c * xs (c < ntk) for a warp;
// lane r * kTok + c returns (row r, token c), other lanes 0. Quantized weights: the chain above;
// float weights: block_math.h's lane order (32 lane chains, then the butterfly).
template <GgmlType W>
__device__ float rows_dot(const uint8_t* const* rows, unsigned row_mask, const uint8_t* xa, size_t xs, int ntk,
                          int64_t k, TermTile* tiles) {
    const int lane = threadIdx.x % kLanes;
    if (row_mask == 0) return 0.0f;  // warp-uniform: no row of this warp is read
    if constexpr (quantized(W)) {
        TermTile& sh = tiles[threadIdx.x / kLanes];
        const int64_t nb = k / bm::block_elems(W);
        const int my_r = lane / kTok, my_c = lane % kTok;
        const bool chain_lane = lane < kRows * kTok && (row_mask >> my_r & 1u) && my_c < ntk;
        float acc = 0.0f;
        for (int64_t b0 = 0; b0 < nb; b0 += kLanes) {
            const int64_t b = b0 + lane;
            if (b < nb) {
                bm::WBlock<W> w[kRows];
#pragma unroll
                for (int r = 0; r < kRows; ++r)
                    if (row_mask >> r & 1u) w[r] = bm::load_wblock<W>(rows[r], b);
#pragma unroll
                for (int c = 0; c < kTok; ++c) {
                    if (c >= ntk) break;
                    const auto x = bm::load_xblock<W>(xa + size_t(c) * xs, nb, b);
#pragma unroll
                    for (int r = 0; r < kRows; ++r)
                        if (row_mask >> r & 1u) sh[r][c][lane] = bm::term<W>(w[r], x);
                }
            }
            __syncwarp();
            if (chain_lane) {
                const int n = int(nb - b0 < kLanes ? nb - b0 : kLanes);
#pragma unroll 8
                for (int i = 0; i < n; ++i) acc = bm::apply_term<W>(acc, sh[my_r][my_c][i]);
            }
            __syncwarp();
        }
        return acc;
    } else {
        float s[kRows][kTok];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int c = 0; c < kTok; ++c) s[r][c] = 0.0f;
        for (int64_t j = lane; j < k; j += kLanes) {
            float x[kTok];
#pragma unroll
            for (int c = 0; c < kTok; ++c) x[c] = c < ntk ? reinterpret_cast<const float*>(xa + size_t(c) * xs)[j] : 0.0f;
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                if (!(row_mask >> r & 1u)) continue;
                const float w = bm::weight_at<W>(rows[r], j);
#pragma unroll
                for (int c = 0; c < kTok; ++c)
                    if (c < ntk) s[r][c] = bm::fma_rn(w, x[c], s[r][c]);
            }
        }
        float out = 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int c = 0; c < kTok; ++c) {
                float v = s[r][c];
#pragma unroll
                for (int off = kLanes / 2; off > 0; off /= 2) v = bm::add_rn(v, __shfl_xor_sync(kFull, v, off));
                if (lane == r * kTok + c) out = v;
            }
        return out;
    }
}

// ---- quantize_act ----

__global__ void quantize_kernel(GgmlType w, int64_t k, const float* x, int64_t ldx, int nt, uint8_t* xa, size_t xs) {
    const int64_t nb = quantized(w) ? k / bm::block_elems(w) : k / QK;
    const int64_t per_row = quantized(w) ? nb : k;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= per_row * nt) return;
    const int64_t c = i / per_row, e = i % per_row;
    if (quantized(w))
        bm::quantize_act_block(w, x + c * ldx, xa + size_t(c) * xs, nb, e);
    else
        reinterpret_cast<float*>(xa + size_t(c) * xs)[e] = x[c * ldx + e];
}

// ---- gemm ----

template <GgmlType W>
__global__ void __launch_bounds__(kWarps * kLanes)
gemm_kernel(int64_t k, const uint8_t* Wt, size_t w_stride, int64_t nr, const uint8_t* xa, size_t xs, int nt, float* Y,
            int64_t ldy) {
    __shared__ TermTile tiles[quantized(W) ? kWarps : 1];
    const int lane = threadIdx.x % kLanes;
    const int64_t row0 = (int64_t(blockIdx.x) * kWarps + threadIdx.x / kLanes) * kRows;
    if (row0 >= nr) return;  // warp-uniform; the warps never synchronise with each other
    const uint8_t* rows[kRows];
    unsigned mask = 0;
    for (int r = 0; r < kRows; ++r) {
        rows[r] = Wt + size_t(row0 + r) * w_stride;
        if (row0 + r < nr) mask |= 1u << r;
    }
    for (int t0 = 0; t0 < nt; t0 += kTok) {
        const int ntk = nt - t0 < kTok ? nt - t0 : kTok;
        const float v = rows_dot<W>(rows, mask, xa + size_t(t0) * xs, xs, ntk, k, tiles);
        const int r = lane / kTok, c = lane % kTok;
        if (lane < kRows * kTok && (mask >> r & 1u) && c < ntk) Y[(t0 + c) * ldy + row0 + r] = v;
    }
}

// ---- ffn_hot_coef ----

constexpr int kPhaseGate = 1, kPhaseUp = 2;

struct CoefArgs {
    FfnStrategy strategy;
    Activation act;
    float act_t;
    int64_t k, n_hot;
    int nt;
    const uint8_t *gate, *up;
    size_t gate_stride, up_stride;
    const uint8_t *xa_gate, *xa_up;
    size_t xs_gate, xs_up;
    const float* logit;
    int64_t ld_logit;
    float thr;
    int64_t always_on;  // rows [0, always_on) are selected whatever the logits
    float* coef;
    int64_t ldc;
    uint8_t* active;
    int32_t* counts;
};

// predict: whether token c's predictor selects row `row` (the always-on prefix always is, as on
// the CPU, whose logits there are +inf).
__device__ bool selects(const CoefArgs& a, int c, int64_t row) {
    return row < a.always_on || a.logit[c * a.ld_logit + row] > a.thr;
}

__device__ void count(int32_t* counts, int i, int v) {
    if (counts && v && threadIdx.x % kLanes == 0) atomicAdd(counts + i, v);
}

__device__ int warp_isum(int v) {
    for (int off = kLanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
    return v;
}

// Writes 0 to the coefficients of row `row` for every token (the warp's lanes over the tokens).
__device__ void zero_coef(const CoefArgs& a, int64_t row) {
    for (int c = threadIdx.x % kLanes; c < a.nt; c += kLanes) a.coef[c * a.ldc + row] = 0.0f;
}

// One warp per kRows rows. Gate phase: which rows a token selects (predict), the gate products of
// those, the activation (0 for a token that does not select the row) into coef, and the rows whose
// up must be read into `active`. Up phase: coef = act * up for those rows, 0 for the others. One
// launch runs both when gate and up share a type; otherwise one launch of each, in order.
template <GgmlType W>
__global__ void __launch_bounds__(kWarps * kLanes) ffn_coef_kernel(CoefArgs a, int phases) {
    __shared__ TermTile tiles[quantized(W) ? kWarps : 1];
    const int lane = threadIdx.x % kLanes;
    const int64_t row0 = (int64_t(blockIdx.x) * kWarps + threadIdx.x / kLanes) * kRows;
    if (row0 >= a.n_hot) return;
    unsigned valid = 0;
    for (int r = 0; r < kRows; ++r)
        if (row0 + r < a.n_hot) valid |= 1u << r;
    const int my_r = lane / kTok, my_c = lane % kTok;
    const bool predict = a.strategy == FfnStrategy::PREDICT;
    unsigned need_up = 0;
    if (phases & kPhaseGate) {
        unsigned gate_rows = 0;
        for (int r = 0; r < kRows; ++r) {
            if (!(valid >> r & 1u)) continue;
            bool any = !predict;
            if (predict) {
                int n = 0;
                for (int c = lane; c < a.nt; c += kLanes) n += selects(a, c, row0 + r);
                n = warp_isum(n);
                count(a.counts, 2, n);
                any = n > 0;
            }
            if (any) gate_rows |= 1u << r;
            else zero_coef(a, row0 + r);
        }
        const uint8_t* rows[kRows];
        for (int r = 0; r < kRows; ++r) rows[r] = a.gate + size_t(row0 + r) * a.gate_stride;
        unsigned act_rows = 0;
        for (int t0 = 0; t0 < a.nt; t0 += kTok) {
            const int ntk = a.nt - t0 < kTok ? a.nt - t0 : kTok;
            const float g = rows_dot<W>(rows, gate_rows, a.xa_gate + size_t(t0) * a.xs_gate, a.xs_gate, ntk, a.k, tiles);
            const bool mine = lane < kRows * kTok && (gate_rows >> my_r & 1u) && my_c < ntk;
            bool nz = false;
            if (mine) {
                const int64_t row = row0 + my_r, c = t0 + my_c;
                const bool selected = !predict || selects(a, int(c), row);
                const float act = selected ? bm::ffn_act(a.act, g, a.act_t) : 0.0f;
                a.coef[c * a.ldc + row] = act;
                nz = act != 0.0f;
            }
            const unsigned ballot = __ballot_sync(kFull, nz);
            for (int r = 0; r < kRows; ++r)
                if (ballot >> (r * kTok) & ((1u << kTok) - 1)) act_rows |= 1u << r;
            count(a.counts, 0, __popc(ballot));
        }
        count(a.counts, 3, __popc(gate_rows));
        need_up = a.strategy == FfnStrategy::DENSE ? gate_rows : act_rows;
        if (lane < kRows && (valid >> lane & 1u)) a.active[row0 + lane] = uint8_t(need_up >> lane & 1u);
    } else {
        for (int r = 0; r < kRows; ++r)
            if ((valid >> r & 1u) && a.active[row0 + r]) need_up |= 1u << r;
    }
    if (phases & kPhaseUp) {
        const uint8_t* rows[kRows];
        for (int r = 0; r < kRows; ++r) rows[r] = a.up + size_t(row0 + r) * a.up_stride;
        for (int t0 = 0; t0 < a.nt; t0 += kTok) {
            const int ntk = a.nt - t0 < kTok ? a.nt - t0 : kTok;
            const float u = rows_dot<W>(rows, need_up, a.xa_up + size_t(t0) * a.xs_up, a.xs_up, ntk, a.k, tiles);
            if (lane < kRows * kTok && (need_up >> my_r & 1u) && my_c < ntk) {
                float* p = a.coef + (t0 + my_c) * a.ldc + row0 + my_r;
                *p = bm::ffn_coef(*p, u);  // the activation this lane stored in the gate phase
            }
        }
        for (int r = 0; r < kRows; ++r)
            if ((valid >> r & 1u) && !(need_up >> r & 1u)) zero_coef(a, row0 + r);
        count(a.counts, 1, __popc(need_up));
    }
}

// ---- ffn_hot_down ----

constexpr int kDownThreads = 128;
constexpr int kDownCols = 4;  // consecutive columns per thread (a quarter of a Q4 block's byte run)
constexpr int kDownTok = 8;   // tokens per pass (the scratch holds a partial per group for these)
constexpr int kGroup = bm::kNeuronGroup;

// One (column range, group) per block: the group's active rows listed in index order, then per
// thread kDownCols columns of P_g for up to kDownTok tokens, each an fma chain over the list.
template <GgmlType W>
__global__ void __launch_bounds__(kDownThreads)
down_kernel(int64_t n, const uint8_t* Wt, size_t w_stride, int64_t n_rows, const float* coef, int64_t ldc,
            const uint8_t* active, int ntk, float* P) {
    __shared__ int list[kGroup];
    __shared__ unsigned masks[kGroup / kLanes];
    __shared__ float cs[kDownTok][kGroup];
    const int64_t g = blockIdx.y, r0 = g * kGroup;
    const int tid = threadIdx.x;
    if (tid < kGroup) {
        const bool on = r0 + tid < n_rows && active[r0 + tid];
        const unsigned m = __ballot_sync(kFull, on);
        if (tid % kLanes == 0) masks[tid / kLanes] = m;
    }
    __syncthreads();
    int total = 0;
    for (int i = 0; i < kGroup / kLanes; ++i) total += __popc(masks[i]);
    if (tid < kGroup) {
        const unsigned m = masks[tid / kLanes];
        if (m >> (tid % kLanes) & 1u) {
            int pos = __popc(m & ((1u << (tid % kLanes)) - 1u));
            for (int i = 0; i < tid / kLanes; ++i) pos += __popc(masks[i]);
            list[pos] = int(r0 + tid);
        }
    }
    __syncthreads();
    for (int i = tid; i < total * ntk; i += kDownThreads) {
        const int c = i / total, li = i % total;
        cs[c][li] = coef[c * ldc + list[li]];
    }
    __syncthreads();
    const int64_t j0 = (int64_t(blockIdx.x) * kDownThreads + tid) * kDownCols;
    if (j0 >= n) return;
    float p[kDownTok][kDownCols];
#pragma unroll
    for (int c = 0; c < kDownTok; ++c)
#pragma unroll
        for (int e = 0; e < kDownCols; ++e) p[c][e] = 0.0f;
    for (int li = 0; li < total; ++li) {
        const uint8_t* row = Wt + size_t(list[li]) * w_stride;
        float w[kDownCols];
#pragma unroll
        for (int e = 0; e < kDownCols; ++e) w[e] = j0 + e < n ? bm::weight_at<W>(row, j0 + e) : 0.0f;
#pragma unroll
        for (int c = 0; c < kDownTok; ++c) {
            if (c >= ntk) break;
            const float cf = cs[c][li];
#pragma unroll
            for (int e = 0; e < kDownCols; ++e) p[c][e] = bm::axpy_step(p[c][e], w[e], cf);
        }
    }
    for (int c = 0; c < ntk; ++c)
#pragma unroll
        for (int e = 0; e < kDownCols; ++e)
            if (j0 + e < n) P[(size_t(g) * kDownTok + c) * size_t(n) + size_t(j0 + e)] = p[c][e];
}

// Y[c][j] = fold over the groups in order of P_g[c][j], after what Y holds.
__global__ void fold_kernel(const float* P, int64_t n_groups, int64_t n, int ntk, float* Y, int64_t ldy) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n * ntk) return;
    const int64_t c = i / n, j = i % n;
    float y = Y[c * ldy + j];
    for (int64_t g = 0; g < n_groups; ++g) y = bm::fold(y, P[(size_t(g) * kDownTok + size_t(c)) * size_t(n) + size_t(j)]);
    Y[c * ldy + j] = y;
}

void check_tokens(const char* fn, int nt) { require(nt >= 0, fn, "negative token count"); }

}  // namespace

bool kernel_type_supported(GgmlType w) {
    switch (w) {
        case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16:
        case GgmlType::Q8_0: case GgmlType::Q4_0: case GgmlType::Q4_1:
        case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::IQ4_NL:
        case GgmlType::Q2_K: case GgmlType::Q3_K: case GgmlType::Q4_K: case GgmlType::Q5_K: case GgmlType::Q6_K:
            return true;
        default: return false;
    }
}

size_t act_bytes(GgmlType w, int64_t k) {
    if (!kernel_type_supported(w)) fail(strfmt("cuda::act_bytes: no kernel for weight type %s", type_name(w)));
    if (k < 0 || k % block_size(w) != 0) fail(strfmt("cuda::act_bytes: %lld is not a whole number of blocks", (long long)k));
    return (size_t(bm::act_row_bytes(w, k)) + 15) / 16 * 16;
}

void quantize_act(GgmlType w, int64_t k, const float* x, int64_t ldx, int nt, void* xa, Stream s) {
    const size_t xs = act_bytes(w, k);
    check_tokens("quantize_act", nt);
    require(ldx >= k, "quantize_act", "activation rows overlap (ldx < k)");
    require(aligned(x, 4) && aligned(xa, 16), "quantize_act", "x must be 4-byte and xa 16-byte aligned");
    const int64_t per_row = is_float(w) ? k : k / block_size(w);
    if (nt == 0 || per_row == 0) return;
    require(x && xa, "quantize_act", "null pointer");
    constexpr int kThreads = 256;
    quantize_kernel<<<blocks_for(per_row * nt, kThreads), kThreads, 0, stream(s)>>>(w, k, x, ldx, nt,
                                                                                   static_cast<uint8_t*>(xa), xs);
    check_launch("quantize_act");
}

void gemm_rows(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
               int64_t ldy, Stream s) {
    check_weights("gemm", w, k, W, w_stride, nr);
    check_tokens("gemm", nt);
    require(ldy >= nr, "gemm", "output rows overlap (ldy < nr)");
    require(aligned(xa, 16) && aligned(Y, 4), "gemm", "xa must be 16-byte and Y 4-byte aligned");
    if (nr == 0 || nt == 0) return;
    require(xa && Y, "gemm", "null pointer");
    const size_t xs = act_bytes(w, k);
    const unsigned grid = blocks_for(nr, kWarps * kRows);
    with_type(w, [&](auto T) {
        gemm_kernel<decltype(T)::value><<<grid, kWarps * kLanes, 0, stream(s)>>>(
            k, static_cast<const uint8_t*>(W), w_stride, nr, static_cast<const uint8_t*>(xa), xs, nt, Y, ldy);
    });
    check_launch("gemm");
}

void ffn_hot_coef(const FfnHotArgs& a, Stream s) {
    const char* fn = "ffn_hot_coef";
    check_weights(fn, a.gate_type, a.n_embd, a.gate, a.gate_stride, a.n_hot);
    check_weights(fn, a.up_type, a.n_embd, a.up, a.up_stride, a.n_hot);
    check_tokens(fn, a.nt);
    if (a.n_hot == 0 || a.nt == 0) return;
    require(a.coef && a.active && a.xa_gate && a.xa_up, fn, "null pointer");
    require(aligned(a.xa_gate, 16) && aligned(a.xa_up, 16) && aligned(a.coef, 4), fn, "misaligned activations or coefficients");
    require(a.ldc >= a.n_hot, fn, "coefficient rows overlap (ldc < n_hot)");
    require(int64_t(a.nt) * a.n_hot < (int64_t(1) << 31), fn, "too many (token, row) pairs for the counters");
    if (a.strategy == FfnStrategy::PREDICT)
        require(a.pred_logit && a.ld_logit >= a.n_hot, fn, "predict needs logits with ld_logit >= n_hot");
    CoefArgs k;
    k.strategy = a.strategy; k.act = a.act; k.act_t = a.act_t;
    k.k = a.n_embd; k.n_hot = a.n_hot; k.nt = a.nt;
    k.gate = static_cast<const uint8_t*>(a.gate); k.up = static_cast<const uint8_t*>(a.up);
    k.gate_stride = a.gate_stride; k.up_stride = a.up_stride;
    k.xa_gate = static_cast<const uint8_t*>(a.xa_gate); k.xa_up = static_cast<const uint8_t*>(a.xa_up);
    k.xs_gate = act_bytes(a.gate_type, a.n_embd); k.xs_up = act_bytes(a.up_type, a.n_embd);
    k.logit = a.pred_logit; k.ld_logit = a.ld_logit; k.thr = a.pred_thr; k.always_on = a.pred_always_on;
    k.coef = a.coef; k.ldc = a.ldc; k.active = a.active; k.counts = a.counts;
    const unsigned grid = blocks_for(a.n_hot, kWarps * kRows);
    auto launch = [&](GgmlType w, int phases) {
        with_type(w, [&](auto T) {
            ffn_coef_kernel<decltype(T)::value><<<grid, kWarps * kLanes, 0, stream(s)>>>(k, phases);
        });
        check_launch("ffn_hot_coef");
    };
    if (a.gate_type == a.up_type) {
        launch(a.gate_type, kPhaseGate | kPhaseUp);
    } else {
        launch(a.gate_type, kPhaseGate);
        launch(a.up_type, kPhaseUp);
    }
}

size_t ffn_down_scratch_bytes(int64_t n_embd, int64_t n_hot) {
    const int64_t n_groups = (n_hot + kGroup - 1) / kGroup;
    return size_t(n_groups) * kDownTok * size_t(n_embd) * sizeof(float);
}

void ffn_hot_down(GgmlType w, int64_t n_embd, const void* W, size_t w_stride, int64_t n_hot, const float* coef,
                  int64_t ldc, const uint8_t* active, int nt, float* Y, int64_t ldy, void* scratch, Stream s) {
    const char* fn = "ffn_hot_down";
    check_weights(fn, w, n_embd, W, w_stride, n_hot);
    check_tokens(fn, nt);
    if (n_hot == 0 || nt == 0) return;
    require(coef && active && Y && scratch, fn, "null pointer");
    require(aligned(coef, 4) && aligned(Y, 4) && aligned(scratch, 4), fn, "misaligned pointer");
    require(ldc >= n_hot && ldy >= n_embd, fn, "rows overlap (ldc < n_hot or ldy < n_embd)");
    const int64_t n_groups = (n_hot + kGroup - 1) / kGroup;
    require(n_groups <= 65535, fn, "more than 65535 neuron groups");
    float* P = static_cast<float*>(scratch);
    const dim3 grid(blocks_for(n_embd, kDownThreads * kDownCols), unsigned(n_groups));
    for (int t0 = 0; t0 < nt; t0 += kDownTok) {
        const int ntk = nt - t0 < kDownTok ? nt - t0 : kDownTok;
        with_type(w, [&](auto T) {
            down_kernel<decltype(T)::value><<<grid, kDownThreads, 0, stream(s)>>>(
                n_embd, static_cast<const uint8_t*>(W), w_stride, n_hot, coef + t0 * ldc, ldc, active, ntk, P);
        });
        check_launch("ffn_hot_down");
        constexpr int kThreads = 256;
        fold_kernel<<<blocks_for(n_embd * ntk, kThreads), kThreads, 0, stream(s)>>>(P, n_groups, n_embd, ntk,
                                                                                   Y + t0 * ldy, ldy);
        check_launch("ffn_hot_down (fold)");
    }
}

}  // namespace ps::cuda

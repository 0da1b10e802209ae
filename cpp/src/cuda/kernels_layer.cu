// The rest of a layer on the GPU (cuda/kernels.h): norms, RoPE, residual adds, the embedding, the
// KV cache and attention.
#include <algorithm>
#include <cmath>

#include "attention.h"  // kAttnTile
#include "cuda/kernels_util.cuh"

namespace ps::cuda {

namespace {

using namespace detail;

constexpr int kLanes = 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

// ---- rms_norm: one block per row; the sum of squares in double, as vec.cpp ----

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const float* x, const float* w, int64_t n, float eps, float* y) {
    __shared__ double part[kNormThreads / kLanes];
    const float* xr = x + blockIdx.x * n;
    float* yr = y + blockIdx.x * n;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kNormThreads) ss += double(xr[i]) * double(xr[i]);  // exact products
    for (int off = kLanes / 2; off > 0; off /= 2) ss += __shfl_xor_sync(kFull, ss, off);
    if (threadIdx.x % kLanes == 0) part[threadIdx.x / kLanes] = ss;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < kNormThreads / kLanes; ++i) total += part[i];
    const float inv = float(1.0 / sqrt(total / double(n) + double(eps)));
    for (int64_t i = threadIdx.x; i < n; i += kNormThreads) yr[i] = bm::mul_rn(bm::mul_rn(xr[i], inv), w[i]);
}

// ---- element-wise ----

__global__ void rope_kernel(float* x, int nt, int64_t ldx, int n_heads, int head_dim, int n_rot, const float* cs) {
    const int64_t per_tok = int64_t(n_heads) * (n_rot / 2);
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= per_tok * nt) return;
    const int64_t t = i / per_tok, h = (i % per_tok) / (n_rot / 2), p = i % (n_rot / 2);
    float* q = x + t * ldx + h * head_dim + 2 * p;
    bm::rope_pair(q, q + 1, cs[t * n_rot + 2 * p], cs[t * n_rot + 2 * p + 1]);
}

__global__ void add_scaled_kernel(float* y, float a, const float* x, int64_t n) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bm::fma_rn(a, x[i], y[i]);
}

__global__ void scale_kernel(float* y, float a, int64_t n) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bm::mul_rn(y[i], a);
}

__global__ void relu_kernel(float* y, int64_t n) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 0.0f < y[i] ? y[i] : 0.0f;  // std::max(0.0f, y): NaN gives 0
}

template <GgmlType T>
__global__ void embed_kernel(const uint8_t* table, size_t row_stride, int64_t n_vocab, int64_t n_embd,
                             const int32_t* tokens, int nt, float scale, float* x) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n_embd * nt) return;
    const int64_t t = i / n_embd, j = i % n_embd;
    const int32_t tok = tokens[t];
    float v;
    if (tok < 0 || tok >= n_vocab) {
        v = __int_as_float(0x7FC00000);  // NaN: the host should have refused this token
    } else {
        v = bm::weight_at<T, true>(table + size_t(tok) * row_stride, j);
        if (scale != 1.0f) v = bm::mul_rn(v, scale);
    }
    x[t * n_embd + j] = v;
}

// ---- KV cache ----

struct KvShape {
    KvType type;
    int n_head_kv, head_dim, n_ctx, n_seq;
    size_t row_bytes;
    // Byte offset of (seq, head, pos)'s row in one layer's K or V cache; false if out of range.
    __device__ bool offset(int seq, int head, int pos, size_t* off) const {
        if (seq < 0 || seq >= n_seq || pos < 0 || pos >= n_ctx) return false;
        *off = ((size_t(seq) * n_head_kv + size_t(head)) * n_ctx + size_t(pos)) * row_bytes;
        return true;
    }
};

// One thread per (token, head, unit): a value (f32, f16) or a block of 32 (q8_0), of K and of V.
__global__ void kv_store_kernel(KvShape sh, const float* k, const float* v, int64_t ld, int nt, const int32_t* seq,
                                const int32_t* pos, uint8_t* kc, uint8_t* vc) {
    const int units = sh.type == KvType::Q8_0 ? sh.head_dim / QK : sh.head_dim;
    const int64_t per_tok = int64_t(sh.n_head_kv) * units;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= per_tok * nt) return;
    const int64_t t = i / per_tok;
    const int h = int((i % per_tok) / units), u = int(i % units);
    size_t off;
    if (!sh.offset(seq[t], h, pos[t], &off)) return;
    for (int which = 0; which < 2; ++which) {
        const float* src = (which == 0 ? k : v) + t * ld + size_t(h) * sh.head_dim;
        uint8_t* dst = (which == 0 ? kc : vc) + off;
        switch (sh.type) {
            case KvType::F32: reinterpret_cast<float*>(dst)[u] = src[u]; break;
            case KvType::F16: reinterpret_cast<uint16_t*>(dst)[u] = bm::fp32_to_fp16(src[u]); break;
            case KvType::Q8_0: {
                // quant.cpp's quantize_q8_0: d = amax / 127 stored as fp16, q = roundf(x / d)
                block_q8_0* b = reinterpret_cast<block_q8_0*>(dst) + u;
                int8_t qs[QK];
                int sum;
                const float d = bm::q8_block(src + u * QK, qs, &sum);
                reinterpret_cast<uint16_t*>(b)[0] = bm::fp32_to_fp16(d);  // blocks are 2-byte aligned
                for (int j = 0; j < QK; ++j) b->qs[j] = qs[j];
                break;
            }
        }
    }
}

// ---- attention ----
// Flash-decoding over the CPU's tiles (attention.h): one block per (token, KV head, chunk of its
// query heads, tile of kAttnTile positions) computes that tile's softmax partial (max, sum, weighted
// values) into scratch; a second kernel folds a (token, head)'s partials in tile order (as
// attention.cpp's merge) and normalises. Within its tile a block visits the keys in sub-tiles of
// kv_tile positions converted to f32 in shared memory: scores (a warp per (head, position)), then
// per head (a warp each) the running max and sum (online softmax), then o = o * alpha + sum of
// e_p v_p per (head, dim) as an fma chain in position order. Every step depends only on the
// token's query, its position and the cache, so a (token, head) gets the same bits in any batch.

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / kLanes;
constexpr size_t kAttnScratchCap = size_t(64) << 20;  // bytes of partials per launch pair at most

template <KvType T>
__device__ float kv_value(const uint8_t* row, int d) {
    if constexpr (T == KvType::F32) return bm::weight_at<GgmlType::F32>(row, d);
    else if constexpr (T == KvType::F16) return bm::weight_at<GgmlType::F16>(row, d);
    else return bm::weight_at<GgmlType::Q8_0>(row, d);
}

__host__ __device__ inline int attn_tiles(int n_keys) { return (n_keys + kAttnTile - 1) / kAttnTile; }

// The partials of the tokens t < nt: part[((t * n_head + h) * n_tiles + j) * (HD + 2) + i], i = 0
// the max, 1 the sum, 2.. the weighted values (not normalised).
template <KvType T>
__global__ void __launch_bounds__(kAttnThreads)
attention_kernel(KvShape sh, int n_head, int gq, int heads_per_block, int kv_tile, int n_tiles, const float* q,
                 const int32_t* seq, const int32_t* pos, const uint8_t* kc, const uint8_t* vc, float scale, float* part) {
    extern __shared__ float smem[];
    const int HD = sh.head_dim, t = blockIdx.x, chunks = (gq + heads_per_block - 1) / heads_per_block;
    const int kvh = blockIdx.y / chunks, j = blockIdx.z;
    const int h0 = kvh * gq + (blockIdx.y % chunks) * heads_per_block;  // first query head of this block
    const int G = min(heads_per_block, kvh * gq + gq - h0);
    float* qs = smem;                           // [G][HD]
    float* o = qs + heads_per_block * HD;       // [G][HD]
    float* K = o + heads_per_block * HD;        // [kv_tile][HD]
    float* V = K + kv_tile * HD;                // [kv_tile][HD]
    float* e = V + kv_tile * HD;                // [G][kv_tile]: scores, then exp(score - max)
    float* m = e + heads_per_block * kv_tile;   // [G] running max
    float* l = m + heads_per_block;             // [G] running sum
    float* alpha = l + heads_per_block;         // [G] this sub-tile's rescaling of the old state
    const int tid = threadIdx.x, lane = tid % kLanes, warp = tid / kLanes;
    const int64_t H = int64_t(n_head) * HD;
    size_t base, last;
    // an invalid slot (the host validates positions) or a tile past the token's keys: nothing to do
    if (!sh.offset(seq[t], kvh, pos[t], &last) || !sh.offset(seq[t], kvh, 0, &base)) return;
    const int n_keys = pos[t] + 1, p_begin = j * kAttnTile, p_end = min(n_keys, p_begin + kAttnTile);
    if (p_begin >= n_keys) return;
    for (int i = tid; i < G * HD; i += kAttnThreads) {
        qs[i] = q[t * H + int64_t(h0) * HD + i];
        o[i] = 0.0f;
    }
    if (tid < G) {
        m[tid] = -INFINITY;
        l[tid] = 0.0f;
    }
    for (int p0 = p_begin; p0 < p_end; p0 += kv_tile) {
        const int n = min(kv_tile, p_end - p0);
        __syncthreads();  // the previous sub-tile's K, V and e are no longer read
        for (int i = tid; i < n * HD; i += kAttnThreads) {
            const int p = i / HD, d = i % HD;
            const size_t off = base + size_t(p0 + p) * sh.row_bytes;
            K[i] = kv_value<T>(kc + off, d);
            V[i] = kv_value<T>(vc + off, d);
        }
        __syncthreads();
        for (int i = warp; i < G * n; i += kAttnWarps) {
            const int g = i / n, p = i % n;
            float s = 0.0f;
            for (int d = lane; d < HD; d += kLanes) s = fmaf(qs[g * HD + d], K[p * HD + d], s);
            for (int off = kLanes / 2; off > 0; off /= 2) s += __shfl_xor_sync(kFull, s, off);
            if (lane == 0) e[g * kv_tile + p] = s * scale;
        }
        __syncthreads();
        for (int g = warp; g < G; g += kAttnWarps) {  // a warp per head: the sub-tile's max and sum
            float* eg = e + g * kv_tile;
            const float m_old = m[g];
            float mx = -INFINITY;
            for (int p = lane; p < n; p += kLanes) mx = fmaxf(mx, eg[p]);
            for (int off = kLanes / 2; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
            mx = fmaxf(mx, m_old);
            float sum = 0.0f;
            for (int p = lane; p < n; p += kLanes) {
                const float ep = expf(eg[p] - mx);
                eg[p] = ep;
                sum += ep;
            }
            for (int off = kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(kFull, sum, off);
            if (lane == 0) {
                const float a = expf(m_old - mx);  // 0 on the first sub-tile (m = -inf)
                l[g] = l[g] * a + sum;
                m[g] = mx;
                alpha[g] = a;
            }
        }
        __syncthreads();
        for (int i = tid; i < G * HD; i += kAttnThreads) {
            const int g = i / HD, d = i % HD;
            float acc = o[i] * alpha[g];
            for (int p = 0; p < n; ++p) acc = fmaf(e[g * kv_tile + p], V[p * HD + d], acc);
            o[i] = acc;
        }
    }
    __syncthreads();
    const size_t ps = size_t(HD) + 2;
    for (int i = tid; i < G * HD; i += kAttnThreads) {
        const int g = i / HD, d = i % HD;
        float* pp = part + ((size_t(t) * n_head + size_t(h0 + g)) * n_tiles + size_t(j)) * ps;
        if (d == 0) {
            pp[0] = m[g];
            pp[1] = l[g];
        }
        pp[2 + d] = o[i];
    }
}

// One block per (token, head): out = the partials folded in tile order, normalised. Every thread
// recomputes the same rescaling factors for the dimensions it owns.
__global__ void __launch_bounds__(kAttnThreads)
attention_merge_kernel(KvShape sh, int n_head, int n_tiles, const int32_t* seq, const int32_t* pos, const float* part,
                       float* out) {
    const int t = blockIdx.x, h = blockIdx.y, HD = sh.head_dim;
    float* o = out + (int64_t(t) * n_head + h) * HD;
    size_t off;
    if (!sh.offset(seq[t], 0, pos[t], &off)) {  // as the partial kernel: never read an unwritten partial
        for (int d = threadIdx.x; d < HD; d += kAttnThreads) o[d] = __int_as_float(0x7FC00000);
        return;
    }
    const int nj = attn_tiles(pos[t] + 1);
    const size_t ps = size_t(HD) + 2;
    const float* p0 = part + (size_t(t) * n_head + size_t(h)) * n_tiles * ps;
    for (int d = threadIdx.x; d < HD; d += kAttnThreads) {
        float m = p0[0], l = p0[1], v = p0[2 + d];
        for (int j = 1; j < nj; ++j) {
            const float* pj = p0 + size_t(j) * ps;
            const float mx = fmaxf(m, pj[0]);
            const float a = expf(m - mx), b = expf(pj[0] - mx);
            l = __fadd_rn(__fmul_rn(l, a), __fmul_rn(pj[1], b));
            v = __fadd_rn(__fmul_rn(v, a), __fmul_rn(pj[2 + d], b));
            m = mx;
        }
        o[d] = v / l;
    }
}

// Tokens per (partials, merge) launch pair: all of them unless their partials exceed the cap.
int attn_chunk(int n_head, int head_dim, int n_ctx, int nt) {
    const size_t per_token = size_t(n_head) * size_t(attn_tiles(n_ctx)) * (size_t(head_dim) + 2) * sizeof(float);
    const size_t fit = std::max<size_t>(1, kAttnScratchCap / per_token);
    return int(std::min<size_t>(size_t(std::max(nt, 0)), fit));
}

constexpr int kThreads = 256;

}  // namespace

void rms_norm(const float* x, const float* w, int nt, int64_t n, float eps, float* y, Stream s) {
    require(nt >= 0 && n > 0, "rms_norm", "needs n > 0 and nt >= 0");
    if (nt == 0) return;
    require(x && w && y, "rms_norm", "null pointer");
    rms_norm_kernel<<<unsigned(nt), kNormThreads, 0, stream(s)>>>(x, w, n, eps, y);
    check_launch("rms_norm");
}

void rope(float* x, int nt, int64_t ldx, int n_heads, int head_dim, int n_rot, const float* cs, Stream s) {
    require(nt >= 0 && n_heads > 0 && head_dim > 0, "rope", "bad shape");
    require(n_rot >= 0 && n_rot % 2 == 0 && n_rot <= head_dim, "rope", "n_rot must be even and at most head_dim");
    require(ldx >= int64_t(n_heads) * head_dim, "rope", "rows overlap (ldx < n_heads * head_dim)");
    const int64_t n = int64_t(nt) * n_heads * (n_rot / 2);
    if (n == 0) return;
    require(x && cs, "rope", "null pointer");
    rope_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream(s)>>>(x, nt, ldx, n_heads, head_dim, n_rot, cs);
    check_launch("rope");
}

void add_scaled(float* y, float a, const float* x, int64_t n, Stream s) {
    require(n >= 0, "add_scaled", "negative length");
    if (n == 0) return;
    require(x && y, "add_scaled", "null pointer");
    add_scaled_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream(s)>>>(y, a, x, n);
    check_launch("add_scaled");
}

void scale(float* y, float a, int64_t n, Stream s) {
    require(n >= 0, "scale", "negative length");
    if (n == 0) return;
    require(y, "scale", "null pointer");
    scale_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream(s)>>>(y, a, n);
    check_launch("scale");
}

void relu(float* y, int64_t n, Stream s) {
    require(n >= 0, "relu", "negative length");
    if (n == 0) return;
    require(y, "relu", "null pointer");
    relu_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream(s)>>>(y, n);
    check_launch("relu");
}

void embed(GgmlType t, const void* table, size_t row_stride, int64_t n_vocab, int64_t n_embd, const int32_t* tokens,
           int nt, float scale, float* x, Stream s) {
    check_weights("embed", t, n_embd, table, row_stride, n_vocab);
    require(nt >= 0, "embed", "negative token count");
    if (nt == 0) return;
    require(tokens && x, "embed", "null pointer");
    with_type(t, [&](auto T) {
        embed_kernel<decltype(T)::value><<<blocks_for(n_embd * nt, kThreads), kThreads, 0, stream(s)>>>(
            static_cast<const uint8_t*>(table), row_stride, n_vocab, n_embd, tokens, nt, scale, x);
    });
    check_launch("embed");
}

namespace {

KvShape kv_shape(const char* fn, KvType t, int n_head_kv, int head_dim, int n_ctx, int n_seq) {
    require(n_head_kv > 0 && head_dim > 0 && n_ctx > 0 && n_seq > 0, fn, "bad cache shape");
    require(t != KvType::Q8_0 || head_dim % QK == 0, fn, "a q8_0 cache needs head_dim a multiple of 32");
    KvShape sh;
    sh.type = t;
    sh.n_head_kv = n_head_kv;
    sh.head_dim = head_dim;
    sh.n_ctx = n_ctx;
    sh.n_seq = n_seq;
    sh.row_bytes = row_bytes(kv_ggml_type(t), head_dim);
    return sh;
}

}  // namespace

void kv_store(KvType t, int n_head_kv, int head_dim, int n_ctx, int n_seq, const float* k, const float* v, int64_t ld,
              int nt, const int32_t* seq, const int32_t* pos, uint8_t* kc, uint8_t* vc, Stream s) {
    const KvShape sh = kv_shape("kv_store", t, n_head_kv, head_dim, n_ctx, n_seq);
    require(nt >= 0, "kv_store", "negative token count");
    require(ld >= int64_t(n_head_kv) * head_dim, "kv_store", "rows overlap (ld < n_head_kv * head_dim)");
    if (nt == 0) return;
    require(k && v && seq && pos && kc && vc, "kv_store", "null pointer");
    require(aligned(kc, 4) && aligned(vc, 4), "kv_store", "misaligned cache");
    const int units = t == KvType::Q8_0 ? head_dim / QK : head_dim;
    kv_store_kernel<<<blocks_for(int64_t(nt) * n_head_kv * units, kThreads), kThreads, 0, stream(s)>>>(sh, k, v, ld, nt, seq,
                                                                                                     pos, kc, vc);
    check_launch("kv_store");
}

size_t attention_scratch_bytes(int n_head, int head_dim, int n_ctx, int nt) {
    require(n_head > 0 && head_dim > 0 && n_ctx > 0 && nt >= 0, "attention_scratch_bytes", "bad shape");
    return size_t(std::max(attn_chunk(n_head, head_dim, n_ctx, nt), 1)) * size_t(n_head) * size_t(attn_tiles(n_ctx)) *
           (size_t(head_dim) + 2) * sizeof(float);
}

void attention(KvType t, int n_head, int n_head_kv, int head_dim, int n_ctx, int n_seq, const float* q, int nt,
               const int32_t* seq, const int32_t* pos, const uint8_t* kc, const uint8_t* vc, float scale, float* out,
               void* scratch, Stream s) {
    const KvShape sh = kv_shape("attention", t, n_head_kv, head_dim, n_ctx, n_seq);
    require(n_head > 0 && n_head % n_head_kv == 0, "attention", "n_head must be a multiple of n_head_kv");
    require(head_dim <= 256, "attention", "head_dim above 256");
    require(nt >= 0, "attention", "negative token count");
    if (nt == 0) return;
    require(q && seq && pos && kc && vc && out && scratch, "attention", "null pointer");
    require(aligned(scratch, 4), "attention", "misaligned scratch");
    const int gq = n_head / n_head_kv;
    // shared memory stays under 48 KiB: 32-position sub-tiles and up to 8 query heads per block for
    // head_dim <= 128, 16 positions and 4 heads above
    const int kv_tile = head_dim <= 128 ? 32 : 16;
    static_assert(kAttnTile % 32 == 0, "sub-tiles divide the tile");
    const int hpb = std::min(gq, head_dim <= 128 ? 8 : 4);
    const size_t smem = sizeof(float) * (size_t(2) * hpb * head_dim + size_t(2) * kv_tile * head_dim +
                                         size_t(hpb) * kv_tile + 3 * size_t(hpb));
    const int n_tiles = attn_tiles(n_ctx), chunk = attn_chunk(n_head, head_dim, n_ctx, nt);
    require(n_tiles <= 65535, "attention", "n_ctx above 65535 tiles");
    float* part = static_cast<float*>(scratch);
    for (int t0 = 0; t0 < nt; t0 += chunk) {
        const int n = std::min(chunk, nt - t0);
        const int64_t H = int64_t(n_head) * head_dim;
        const dim3 grid(unsigned(n), unsigned(n_head_kv * ((gq + hpb - 1) / hpb)), unsigned(n_tiles));
        auto launch = [&](auto kernel) {
            kernel<<<grid, kAttnThreads, smem, stream(s)>>>(sh, n_head, gq, hpb, kv_tile, n_tiles, q + t0 * H, seq + t0,
                                                            pos + t0, kc, vc, scale, part);
        };
        switch (t) {
            case KvType::F32: launch(attention_kernel<KvType::F32>); break;
            case KvType::F16: launch(attention_kernel<KvType::F16>); break;
            case KvType::Q8_0: launch(attention_kernel<KvType::Q8_0>); break;
        }
        check_launch("attention");
        attention_merge_kernel<<<dim3(unsigned(n), unsigned(n_head)), kAttnThreads, 0, stream(s)>>>(
            sh, n_head, n_tiles, seq + t0, pos + t0, part, out + t0 * H);
        check_launch("attention (merge)");
    }
}

}  // namespace ps::cuda

// The FFN strategies. For one token with normalised input h:
//   dense:  g = W_gate h, u = W_up h, a = act(g) * u, out = W_down a
// The down projection is read either from llama.cpp's ffn_down ({n_ff, n_embd}: one row per
// output) or from our neuron-major ffn_down_t ({n_embd, n_ff}: one row per neuron), in which
// case out = sum_i a_i * ffn_down_t[i], the same kernel the sparse strategies use.
#include "ffn.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "ops.h"
#include "vec.h"

namespace ps {

float ffn_activation(Activation a, float g, float t) {
    switch (a) {
        case Activation::SILU: return g / (1.0f + std::exp(-g));
        case Activation::RELU: return g > 0.0f ? g : 0.0f;
        case Activation::FATRELU: return g >= t ? g : 0.0f;  // ProSparse: keep x where x >= t
    }
    return g;
}

namespace {

// out[t] = sum_i a[t][i] * D[i] over all neurons i, D = ffn_down_t. Threads own disjoint
// column ranges of the output, so every output element is summed in neuron order by one
// thread: the result does not depend on the thread count.
void down_t_dense(ThreadPool& pool, const Tensor& D, const float* a, int n_tokens, int64_t n_ff,
                  float* out, FfnScratch& s) {
    const int64_t n_embd = D.ne[0];
    const int64_t bs = type_info(uint32_t(D.type))->block_size;
    const int64_t chunk = std::max<int64_t>(bs, ((256 + bs - 1) / bs) * bs);  // columns per task
    const int64_t n_chunks = (n_embd + chunk - 1) / chunk;
    const size_t blk_bytes = type_info(uint32_t(D.type))->block_bytes;
    std::fill(out, out + size_t(n_tokens) * size_t(n_embd), 0.0f);
    if (s.down_rows.size() < size_t(pool.size()) * size_t(chunk)) s.down_rows.resize(size_t(pool.size()) * size_t(chunk));
    pool.parallel_for(n_chunks, [&](int64_t c, int thread) {
        const int64_t j0 = c * chunk, j1 = std::min(n_embd, j0 + chunk), w = j1 - j0;
        float* row = s.down_rows.data() + size_t(thread) * size_t(chunk);
        for (int64_t i = 0; i < n_ff; ++i) {
            // skip neurons that are zero for every token in the batch (exact, not approximate)
            bool any = false;
            for (int t = 0; t < n_tokens && !any; ++t) any = a[size_t(t) * n_ff + i] != 0.0f;
            if (!any) continue;
            dequantize_row(D.type, D.row(i) + size_t(j0 / bs) * blk_bytes, row, w);
            for (int t = 0; t < n_tokens; ++t) {
                const float ai = a[size_t(t) * n_ff + i];
                if (ai != 0.0f) vec_axpy(out + size_t(t) * n_embd + j0, ai, row, w);
            }
        }
    });
}

}  // namespace

void ffn_dense(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const float* h,
               int n_tokens, float* out, FfnScratch& s) {
    const int64_t n_ff = hp.n_ff;
    const size_t n = size_t(n_tokens) * size_t(n_ff);
    if (s.gate.size() < n) s.gate.resize(n);
    if (s.up.size() < n) s.up.resize(n);
    matmul(pool, *L.ffn_gate, h, n_tokens, s.gate.data(), s.act_buf);
    matmul(pool, *L.ffn_up, h, n_tokens, s.up.data(), s.act_buf);
    for (size_t i = 0; i < n; ++i) s.gate[i] = ffn_activation(hp.act, s.gate[i], hp.act_threshold) * s.up[i];
    if (L.ffn_down) {
        matmul(pool, *L.ffn_down, s.gate.data(), n_tokens, out, s.act_buf);
    } else {
        down_t_dense(pool, *L.ffn_down_t, s.gate.data(), n_tokens, n_ff, out, s);
    }
}

}  // namespace ps

#include "attention.h"

#include <algorithm>
#include <cmath>

#include "vec.h"

namespace ps {

void rope_table(float* cs, int n_rot, int pos, float theta, float freq_scale) {
    for (int i = 0; i < n_rot / 2; ++i) {
        const double inv_freq = std::pow(double(theta), -2.0 * i / n_rot);
        const double ang = double(pos) * double(freq_scale) * inv_freq;
        cs[2 * i] = float(std::cos(ang));
        cs[2 * i + 1] = float(std::sin(ang));
    }
}

void rope(float* x, int n_heads, int head_dim, int n_rot, const float* cs) {
    for (int i = 0; i < n_rot / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        for (int h = 0; h < n_heads; ++h) {
            float* p = x + size_t(h) * head_dim + 2 * i;
            const float a = p[0], b = p[1];
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

void attention(ThreadPool& pool, const HParams& hp, const KvCache& kv, int layer, const TokenBatch& batch,
               const float* q, float* out, std::vector<float>& scores) {
    const int HD = hp.head_dim, NH = hp.n_head, NKV = hp.n_head_kv, H = NH * HD;
    const float scale = 1.0f / std::sqrt(float(HD));
    const size_t per_thread = size_t(kv.n_ctx());
    if (scores.size() < per_thread * size_t(pool.size())) scores.resize(per_thread * size_t(pool.size()));
    // one task per (token, head): causal softmax(q k / sqrt(d)) v over the cache
    pool.parallel_for(int64_t(batch.n) * NH, [&](int64_t task, int thread) {
        const int t = int(task / NH), h = int(task % NH), kvh = h / (NH / NKV);
        const int n_keys = batch.pos[t] + 1;
        const float* qh = q + size_t(t) * H + size_t(h) * HD;
        float* sc = scores.data() + size_t(thread) * per_thread;
        const float* kh = kv.keys(layer, batch.seq[t], kvh);
        const float* vh = kv.values(layer, batch.seq[t], kvh);
        for (int p = 0; p < n_keys; ++p) sc[p] = vec_dot(qh, kh + size_t(p) * HD, HD) * scale;
        softmax(sc, n_keys);
        float* o = out + size_t(t) * H + size_t(h) * HD;
        std::fill(o, o + HD, 0.0f);
        for (int p = 0; p < n_keys; ++p) vec_axpy(o, sc[p], vh + size_t(p) * HD, HD);
    });
}

}  // namespace ps

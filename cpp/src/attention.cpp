#include "attention.h"

#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"
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

namespace {

// One tile's keys and values as f32 rows: the cache's own rows for an f32 cache, else converted
// into buf ([2][kAttnTile][head_dim]).
struct TileRows {
    const float* k;
    const float* v;
};

TileRows tile_rows(const KvCache& kv, int layer, int seq, int kvh, int p0, int n, float* buf) {
    const int HD = kv.head_dim();
    const size_t rb = kv.row_bytes();
    const uint8_t* k = kv.keys(layer, seq, kvh) + size_t(p0) * rb;
    const uint8_t* v = kv.values(layer, seq, kvh) + size_t(p0) * rb;
    if (kv.type() == KvType::F32) return {reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v)};
    const cpu::KernelSet& ks = cpu::kernels();
    const GgmlType t = kv_ggml_type(kv.type());
    float* kb = buf;
    float* vb = buf + size_t(kAttnTile) * HD;
    for (int p = 0; p < n; ++p) {
        ks.dequant_row(t, k + size_t(p) * rb, kb + size_t(p) * HD, HD);
        ks.dequant_row(t, v + size_t(p) * rb, vb + size_t(p) * HD, HD);
    }
    return {kb, vb};
}

// The softmax partial of one tile for one query head: (max m of the scores s, sum l of
// exp(s - m), o = sum of exp(s - m) v in position order), stored as [head_dim + 2] = (m, l, o...).
void tile_partial(const float* q, const TileRows& rows, int n, int HD, float scale, float* part) {
    float sc[kAttnTile];
    float m = -INFINITY;
    for (int p = 0; p < n; ++p) {
        sc[p] = vec_dot(q, rows.k + size_t(p) * HD, HD) * scale;
        m = std::max(m, sc[p]);
    }
    float* o = part + 2;
    std::fill(o, o + HD, 0.0f);
    float l = 0.0f;
    for (int p = 0; p < n; ++p) {
        const float e = std::exp(sc[p] - m);
        l += e;
        vec_axpy(o, e, rows.v + size_t(p) * HD, HD);
    }
    part[0] = m;
    part[1] = l;
}

// state = merge(state, partial) for one head ([head_dim + 2] each); first: state = partial.
void merge(float* state, const float* part, int HD, bool first) {
    if (first) {
        std::copy(part, part + HD + 2, state);
        return;
    }
    const float m = std::max(state[0], part[0]);
    const float a = std::exp(state[0] - m), b = std::exp(part[0] - m);
    state[0] = m;
    state[1] = state[1] * a + part[1] * b;
    for (int i = 0; i < HD; ++i) state[2 + i] = state[2 + i] * a + part[2 + i] * b;
}

void finish(const float* state, int HD, float* out) {
    for (int i = 0; i < HD; ++i) out[i] = state[2 + i] / state[1];
}

}  // namespace

void attention(ThreadPool& pool, const HParams& hp, const KvCache& kv, int layer, const TokenBatch& batch,
               const float* q, float* out, AttnScratch& s) {
    const int HD = hp.head_dim, NH = hp.n_head, NKV = hp.n_head_kv, G = NH / NKV, H = NH * HD;
    const float scale = 1.0f / std::sqrt(float(HD));
    const size_t tile_floats = size_t(2) * kAttnTile * HD;
    if (s.tiles.size() < tile_floats * size_t(pool.size())) s.tiles.resize(tile_floats * size_t(pool.size()));
    const size_t ps = size_t(HD) + 2;  // one head's partial or state

    if (batch.n == 1) {
        // decode: every (KV head, tile) is a task; the partials are merged per head in tile order
        const int n_keys = batch.pos[0] + 1, n_tiles = (n_keys + kAttnTile - 1) / kAttnTile, seq = batch.seq[0];
        if (s.partials.size() < size_t(NH) * n_tiles * ps) s.partials.resize(size_t(NH) * n_tiles * ps);
        pool.parallel_for(int64_t(NKV) * n_tiles, [&](int64_t task, int thread) {
            const int kvh = int(task / n_tiles), j = int(task % n_tiles);
            const int p0 = j * kAttnTile, n = std::min(kAttnTile, n_keys - p0);
            const TileRows rows = tile_rows(kv, layer, seq, kvh, p0, n, s.tiles.data() + size_t(thread) * tile_floats);
            for (int h = kvh * G; h < (kvh + 1) * G; ++h)
                tile_partial(q + size_t(h) * HD, rows, n, HD, scale, s.partials.data() + (size_t(h) * n_tiles + j) * ps);
        });
        pool.parallel_for(NH, [&](int64_t h, int) {
            float* parts = s.partials.data() + size_t(h) * n_tiles * ps;  // merged into tile 0's slot
            for (int j = 1; j < n_tiles; ++j) merge(parts, parts + size_t(j) * ps, HD, false);
            finish(parts, HD, out + size_t(h) * HD);
        });
        return;
    }

    // a batch: one task per (token, KV head), through its tiles in order
    pool.parallel_for(int64_t(batch.n) * NKV, [&](int64_t task, int thread) {
        const int t = int(task / NKV), kvh = int(task % NKV);
        const int n_keys = batch.pos[t] + 1, n_tiles = (n_keys + kAttnTile - 1) / kAttnTile;
        thread_local std::vector<float> part, state;  // per thread: no allocation once warm
        part.resize(ps);
        state.resize(size_t(G) * ps);
        for (int j = 0; j < n_tiles; ++j) {
            const int p0 = j * kAttnTile, n = std::min(kAttnTile, n_keys - p0);
            const TileRows rows =
                tile_rows(kv, layer, batch.seq[t], kvh, p0, n, s.tiles.data() + size_t(thread) * tile_floats);
            for (int g = 0; g < G; ++g) {
                tile_partial(q + size_t(t) * H + size_t(kvh * G + g) * HD, rows, n, HD, scale, part.data());
                merge(state.data() + size_t(g) * ps, part.data(), HD, j == 0);
            }
        }
        for (int g = 0; g < G; ++g)
            finish(state.data() + size_t(g) * ps, HD, out + size_t(t) * H + size_t((kvh * G + g)) * HD);
    });
}

}  // namespace ps

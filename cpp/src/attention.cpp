#include "attention.h"

#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"

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

// One tile's keys and values ([n][head_dim] each): the cache's own rows for an f32 or f16 cache
// (attn_tile / attn_tile_f16 read them in place), else converted (KernelSet::dequant_row) into
// tile (2 * kAttnTile * head_dim floats).
struct TileRows {
    const float* k;
    const float* v;
    const uint16_t* kh = nullptr;  // an f16 cache's rows: k and v unset
    const uint16_t* vh = nullptr;
    // one query head's tile of n keys into part (kernels.h, attn_tile)
    void attend(const cpu::KernelSet& ks, const float* q, int n, int hd, float scale, float* part) const {
        if (kh) ks.attn_tile_f16(q, kh, vh, n, hd, scale, part);
        else ks.attn_tile(q, k, v, n, hd, scale, part);
    }
};

TileRows tile_rows(const KvCache& kv, int layer, int seq, int kvh, int p0, int n, float* tile) {
    const int HD = kv.head_dim();
    const size_t rb = kv.row_bytes();
    const uint8_t* k = kv.keys(layer, seq, kvh) + size_t(p0) * rb;
    const uint8_t* v = kv.values(layer, seq, kvh) + size_t(p0) * rb;
    if (kv.type() == KvType::F32) return {reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v)};
    if (kv.type() == KvType::F16)  // rows of HD halves, back to back
        return {nullptr, nullptr, reinterpret_cast<const uint16_t*>(k), reinterpret_cast<const uint16_t*>(v)};
    const cpu::KernelSet& ks = cpu::kernels();
    const GgmlType t = kv_ggml_type(kv.type());
    float* kb = tile;
    float* vb = tile + size_t(kAttnTile) * HD;
    for (int p = 0; p < n; ++p) {
        ks.dequant_row(t, k + size_t(p) * rb, kb + size_t(p) * HD, HD);
        ks.dequant_row(t, v + size_t(p) * rb, vb + size_t(p) * HD, HD);
    }
    return {kb, vb};
}

// state = merge(state, partial) for one head ([head_dim + 2] each: max, sum, weighted values).
void merge(float* state, const float* part, int HD) {
    const float m = std::max(state[0], part[0]);
    const float a = std::exp(state[0] - m), b = std::exp(part[0] - m);
    state[0] = m;
    state[1] = state[1] * a + part[1] * b;
    for (int i = 0; i < HD; ++i) state[2 + i] = state[2 + i] * a + part[2 + i] * b;
}

void finish(const float* state, int HD, float* out) {
    for (int i = 0; i < HD; ++i) out[i] = state[2 + i] / state[1];
}

constexpr int kQueryBlock = 16;  // a prompt's tokens of one sequence that share one conversion of a tile

}  // namespace

void attention(ThreadPool& pool, const HParams& hp, const KvCache& kv, int layer, const TokenBatch& batch,
               const float* q, float* out, AttnScratch& s) {
    static_assert(kAttnTile == cpu::kAttnTileMax, "the kernel's tile");
    const int HD = hp.head_dim, NH = hp.n_head, NKV = hp.n_head_kv, G = NH / NKV, H = NH * HD;
    const float scale = 1.0f / std::sqrt(float(HD));
    const size_t tile_floats = size_t(2) * kAttnTile * HD;
    if (s.tiles.size() < tile_floats * size_t(pool.size())) s.tiles.resize(tile_floats * size_t(pool.size()));
    const size_t ps = size_t(HD) + 2;  // one head's partial or state
    const cpu::KernelSet& ks = cpu::kernels();

    if (batch.n == 1) {
        // decode: every (KV head, tile) is a task; the partials are merged per head in tile order
        const int n_keys = batch.pos[0] + 1, n_tiles = (n_keys + kAttnTile - 1) / kAttnTile, seq = batch.seq[0];
        if (s.partials.size() < size_t(NH) * n_tiles * ps) s.partials.resize(size_t(NH) * n_tiles * ps);
        pool.parallel_for(int64_t(NKV) * n_tiles, [&](int64_t task, int thread) {
            const int kvh = int(task / n_tiles), j = int(task % n_tiles);
            const int p0 = j * kAttnTile, n = std::min(kAttnTile, n_keys - p0);
            const TileRows rows = tile_rows(kv, layer, seq, kvh, p0, n, s.tiles.data() + size_t(thread) * tile_floats);
            for (int h = kvh * G; h < (kvh + 1) * G; ++h)
                rows.attend(ks, q + size_t(h) * HD, n, HD, scale, s.partials.data() + (size_t(h) * n_tiles + j) * ps);
        });
        pool.parallel_for(NH, [&](int64_t h, int) {
            float* parts = s.partials.data() + size_t(h) * n_tiles * ps;  // merged into tile 0's slot
            for (int j = 1; j < n_tiles; ++j) merge(parts, parts + size_t(j) * ps, HD);
            finish(parts, HD, out + size_t(h) * HD);
        });
        return;
    }

    // a batch: runs of up to kQueryBlock consecutive tokens of one sequence; a task per (run, KV
    // head) converts each tile once and runs every token of the run that reaches it through it, in
    // tile order, into that token's running state
    std::vector<int>& runs = s.runs;
    runs.clear();
    for (int t = 0; t < batch.n; ++t)
        if (t == 0 || batch.seq[t] != batch.seq[t - 1] || t - runs.back() == kQueryBlock) runs.push_back(t);
    const int n_runs = int(runs.size());
    pool.parallel_for(int64_t(n_runs) * NKV, [&](int64_t task, int thread) {
        const int r = int(task / NKV), kvh = int(task % NKV);
        const int t0 = runs[size_t(r)], t1 = r + 1 < n_runs ? runs[size_t(r) + 1] : batch.n;
        int max_keys = 0;
        for (int t = t0; t < t1; ++t) max_keys = std::max(max_keys, batch.pos[t] + 1);
        thread_local std::vector<float> part, state;  // per thread: no allocation once warm
        part.resize(ps);
        state.resize(size_t(kQueryBlock) * G * ps);
        for (int j = 0; j * kAttnTile < max_keys; ++j) {
            const int p0 = j * kAttnTile;
            const TileRows rows = tile_rows(kv, layer, batch.seq[t0], kvh, p0, std::min(kAttnTile, max_keys - p0),
                                            s.tiles.data() + size_t(thread) * tile_floats);
            for (int t = t0; t < t1; ++t) {
                const int n = std::min(kAttnTile, batch.pos[t] + 1 - p0);
                if (n <= 0) continue;  // this token's keys ended in an earlier tile
                for (int g = 0; g < G; ++g) {
                    float* st = state.data() + (size_t(t - t0) * G + g) * ps;
                    rows.attend(ks, q + size_t(t) * H + size_t(kvh * G + g) * HD, n, HD, scale, j == 0 ? st : part.data());
                    if (j > 0) merge(st, part.data(), HD);
                }
            }
        }
        for (int t = t0; t < t1; ++t)
            for (int g = 0; g < G; ++g)
                finish(state.data() + (size_t(t - t0) * G + g) * ps, HD, out + size_t(t) * H + size_t(kvh * G + g) * HD);
    });
}

}  // namespace ps

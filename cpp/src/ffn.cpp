#include "ffn.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "ops.h"

namespace ps {

const char* strategy_name(FfnStrategy s) {
    switch (s) {
        case FfnStrategy::DENSE: return "dense";
        case FfnStrategy::EXACT: return "exact";
        case FfnStrategy::PREDICT: return "predict";
    }
    return "?";
}

float ffn_activation(Activation a, float g, float t) {
    switch (a) {
        case Activation::SILU: {
            // t > 0: training-free sparsity (CATS): |SiLU(g)| below the layer's threshold is zero
            const float a = g / (1.0f + std::exp(-g));
            return std::fabs(a) < t ? 0.0f : a;
        }
        case Activation::RELU: return g > 0.0f ? g : 0.0f;
        case Activation::FATRELU: return g >= t ? g : 0.0f;  // ProSparse: keep x where x >= t
    }
    return g;
}

namespace {

template <class T>
void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
}

double rows_bytes(const Tensor& W, int64_t n_rows) { return double(W.row_stride()) * double(n_rows); }

// The down projection of coefficients C [n_tokens][n] over the listed neurons (rows == nullptr:
// every neuron), from ffn_down_t when the file has it, else through llama.cpp's ffn_down.
void down_proj(ThreadPool& pool, const LayerWeights& L, const int32_t* rows, int64_t n,
               const float* C, int n_tokens, float* out, FfnScratch& s, FfnLayerStats& st) {
    if (L.ffn_down_t) {
        axpy_rows(pool, *L.ffn_down_t, rows, n, C, n_tokens, out);
        st.bytes += rows_bytes(*L.ffn_down_t, n);
    } else {
        matmul(pool, *L.ffn_down, C, n_tokens, out, s.act_buf);
        st.bytes += double(L.ffn_down->nbytes);
    }
}

// Sorted union over tokens of the neurons whose flag is set in a [n_tokens][n_ff] predicate.
template <class Pred>
void union_rows(int n_tokens, int64_t n_ff, Pred pred, FfnScratch& s, std::vector<int32_t>& rows) {
    grow(s.mark, size_t(n_ff));
    std::fill(s.mark.begin(), s.mark.begin() + n_ff, uint8_t(0));
    for (int t = 0; t < n_tokens; ++t)
        for (int64_t i = 0; i < n_ff; ++i)
            if (pred(t, i)) s.mark[size_t(i)] = 1;
    rows.clear();
    for (int64_t i = 0; i < n_ff; ++i)
        if (s.mark[size_t(i)]) rows.push_back(int32_t(i));
}

void ffn_dense(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const float* h,
               int n_tokens, float* out, FfnScratch& s, FfnLayerStats& st) {
    const int64_t n_ff = hp.n_ff;
    const size_t n = size_t(n_tokens) * size_t(n_ff);
    grow(s.gate, n);
    grow(s.up, n);
    matmul(pool, *L.ffn_gate, h, n_tokens, s.gate.data(), s.act_buf);
    matmul(pool, *L.ffn_up, h, n_tokens, s.up.data(), s.act_buf);
    st.bytes += double(L.ffn_gate->nbytes) + double(L.ffn_up->nbytes);
    int64_t active = 0;
    for (size_t i = 0; i < n; ++i) {
        const float a = ffn_activation(hp.act, s.gate[i], L.act_t);
        active += a != 0.0f;
        s.gate[i] = a * s.up[i];
    }
    st.active += double(active);
    st.active_known += n_tokens;
    down_proj(pool, L, nullptr, n_ff, s.gate.data(), n_tokens, out, s, st);
}

// Up and down over the listed neurons, given each token's activation act(g) in a [n_tokens][ld]
// array indexed by neuron (ld = n_ff) — the tail both sparse strategies share.
void sparse_up_down(ThreadPool& pool, const LayerWeights& L, const std::vector<int32_t>& rows,
                    const float* act, int64_t ld, const float* h, int n_tokens, float* out,
                    FfnScratch& s, FfnLayerStats& st) {
    const int64_t m = int64_t(rows.size());
    if (m == 0) {
        std::fill(out, out + size_t(n_tokens) * size_t(L.ffn_gate->ne[0]), 0.0f);
        return;
    }
    grow(s.up, size_t(n_tokens) * size_t(m));
    grow(s.coef, size_t(n_tokens) * size_t(m));
    matmul_rows(pool, *L.ffn_up, rows.data(), m, h, n_tokens, s.up.data(), s.act_buf);
    st.bytes += rows_bytes(*L.ffn_up, m);
    for (int t = 0; t < n_tokens; ++t)
        for (int64_t i = 0; i < m; ++i)
            s.coef[size_t(t) * m + i] = act[size_t(t) * ld + rows[size_t(i)]] * s.up[size_t(t) * m + i];
    down_proj(pool, L, rows.data(), m, s.coef.data(), n_tokens, out, s, st);
}

void ffn_exact(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
               const float* h, int n_tokens, float* out, FfnScratch& s, FfnLayerStats& st) {
    const int64_t n_ff = hp.n_ff;
    const size_t n = size_t(n_tokens) * size_t(n_ff);
    grow(s.gate, n);
    matmul(pool, *L.ffn_gate, h, n_tokens, s.gate.data(), s.act_buf);
    st.bytes += double(L.ffn_gate->nbytes);
    int64_t active = 0;
    for (size_t i = 0; i < n; ++i) {
        s.gate[i] = ffn_activation(hp.act, s.gate[i], L.act_t);
        active += s.gate[i] != 0.0f;
    }
    st.active += double(active);
    st.active_known += n_tokens;
    const float* act = s.gate.data();
    union_rows(n_tokens, n_ff, [&](int t, int64_t i) { return act[size_t(t) * n_ff + i] != 0.0f; }, s, s.rows);
    if (n_tokens > 1 && double(s.rows.size()) > opt.dense_fallback * double(n_ff)) {
        // a prompt batch whose union is mostly active: plain matrix-matrix work is faster
        grow(s.up, n);
        matmul(pool, *L.ffn_up, h, n_tokens, s.up.data(), s.act_buf);
        st.bytes += double(L.ffn_up->nbytes);
        for (size_t i = 0; i < n; ++i) s.gate[i] *= s.up[i];
        down_proj(pool, L, nullptr, n_ff, s.gate.data(), n_tokens, out, s, st);
        return;
    }
    sparse_up_down(pool, L, s.rows, act, n_ff, h, n_tokens, out, s, st);
}

void ffn_predict(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
                 const float* x, const float* h, int n_tokens, float* out, FfnScratch& s,
                 FfnLayerStats& st) {
    const int64_t n_ff = hp.n_ff, R = L.fc1->ne[1];
    const size_t n = size_t(n_tokens) * size_t(n_ff);
    // predictor: logits = fc2 · relu(fc1 · x), x the residual stream before ffn_norm
    grow(s.pred_hidden, size_t(n_tokens) * size_t(R));
    grow(s.coef, n);
    matmul(pool, *L.fc1, x, n_tokens, s.pred_hidden.data(), s.act_buf);
    for (size_t i = 0; i < size_t(n_tokens) * size_t(R); ++i) s.pred_hidden[i] = std::max(0.0f, s.pred_hidden[i]);
    matmul(pool, *L.fc2, s.pred_hidden.data(), n_tokens, s.coef.data(), s.act_buf);
    st.bytes += double(L.fc1->nbytes) + double(L.fc2->nbytes);
    const float* logit = s.coef.data();
    const float thr = opt.pred_threshold;
    int64_t predicted = 0;
    for (size_t i = 0; i < n; ++i) predicted += logit[i] > thr;
    st.predicted += double(predicted);
    union_rows(n_tokens, n_ff, [&](int t, int64_t i) { return logit[size_t(t) * n_ff + i] > thr; }, s, s.rows2);

    // gate on the predicted rows only, scattered into a [n_tokens][n_ff] activation array whose
    // unpredicted entries are zero: a missed neuron is dropped (the approximation)
    grow(s.gate, n);
    grow(s.up, size_t(n_tokens) * s.rows2.size());
    const int64_t m = int64_t(s.rows2.size());
    if (m) matmul_rows(pool, *L.ffn_gate, s.rows2.data(), m, h, n_tokens, s.up.data(), s.act_buf);
    st.bytes += rows_bytes(*L.ffn_gate, m);
    std::fill(s.gate.begin(), s.gate.begin() + std::ptrdiff_t(n), 0.0f);
    for (int t = 0; t < n_tokens; ++t)
        for (int64_t i = 0; i < m; ++i) {
            const int32_t r = s.rows2[size_t(i)];
            if (logit[size_t(t) * n_ff + r] > thr)
                s.gate[size_t(t) * n_ff + r] = ffn_activation(hp.act, s.up[size_t(t) * m + i], L.act_t);
        }

    if (opt.diag_recall) {
        // the full gate, only to count which active neurons the predictor caught
        grow(s.diag_gate, n);
        const float* full = s.diag_gate.data();
        matmul(pool, *L.ffn_gate, h, n_tokens, s.diag_gate.data(), s.act_buf);
        int64_t active = 0, hit = 0;
        for (size_t i = 0; i < n; ++i) {
            if (ffn_activation(hp.act, full[i], L.act_t) == 0.0f) continue;
            active += 1;
            hit += logit[i] > thr;
        }
        st.recall_total += double(active);
        st.recall_hit += double(hit);
        st.active += double(active);  // counted over the same tokens
        st.active_known += n_tokens;
    }

    const float* act = s.gate.data();
    union_rows(n_tokens, n_ff, [&](int t, int64_t i) { return act[size_t(t) * n_ff + i] != 0.0f; }, s, s.rows);
    sparse_up_down(pool, L, s.rows, act, n_ff, h, n_tokens, out, s, st);
}

}  // namespace

void ffn_forward(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
                 const float* x, const float* h, int n_tokens, float* out, FfnScratch& s,
                 FfnLayerStats& st) {
    st.tokens += n_tokens;
    switch (opt.strategy) {
        case FfnStrategy::DENSE: return ffn_dense(pool, hp, L, h, n_tokens, out, s, st);
        case FfnStrategy::EXACT: return ffn_exact(pool, hp, L, opt, h, n_tokens, out, s, st);
        case FfnStrategy::PREDICT: return ffn_predict(pool, hp, L, opt, x, h, n_tokens, out, s, st);
    }
}

}  // namespace ps

#include "ffn.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "cpu/kernels.h"
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
    if (std::isnan(g)) return g;  // damaged weights: let the NaN reach the logits' check, not vanish as 0
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

// The per-element passes over a batch's [n_tokens][neurons] arrays (activation, union, coefficients)
// run on the pool too: serial, they were a few ms per layer of a 64-token prompt on the 7B shape,
// the other threads idle. Each element is computed alone, so the split never changes a value.
// A single token, or fewer than kPoolMin elements, runs on the caller: the hand-off to the pool
// would cost more than the pass (the test models' prompts, 40 x 320, take the pool).
constexpr int64_t kNeuronChunk = 256;  // neurons per task of a union
constexpr int64_t kPoolMin = 4096;     // elements

// fn(t) for every token t < n_tokens of a [n_tokens][m] pass, on the pool when it is large.
template <class Fn>
void for_tokens(ThreadPool& pool, int64_t n_tokens, int64_t m, Fn fn) {
    if (n_tokens == 1 || n_tokens * m < kPoolMin) {
        for (int64_t t = 0; t < n_tokens; ++t) fn(t);
        return;
    }
    pool.parallel_for(n_tokens, [&](int64_t t, int) { fn(t); });
}

// Sorted union over tokens of the neurons of r (absolute indices) whose flag pred(t, j) is set,
// j counted from r.begin.
template <class Pred>
void union_rows(ThreadPool& pool, int n_tokens, FfnRange r, Pred pred, std::vector<uint8_t>& mark,
                std::vector<int32_t>& rows) {
    const int64_t m = r.end - r.begin;
    grow(mark, size_t(m));
    const int64_t chunk = n_tokens == 1 || int64_t(n_tokens) * m < kPoolMin ? m : kNeuronChunk;
    auto mark_chunk = [&](int64_t ch, int) {
        const int64_t j0 = ch * chunk, j1 = std::min(m, j0 + chunk);
        std::fill(mark.begin() + j0, mark.begin() + j1, uint8_t(0));
        for (int t = 0; t < n_tokens; ++t)
            for (int64_t j = j0; j < j1; ++j)
                if (pred(t, j)) mark[size_t(j)] = 1;
    };
    if (chunk >= m)
        mark_chunk(0, 0);
    else
        pool.parallel_for((m + chunk - 1) / chunk, mark_chunk);
    rows.clear();
    for (int64_t j = 0; j < m; ++j)
        if (mark[size_t(j)]) rows.push_back(int32_t(r.begin + j));
}

}  // namespace

void CpuFfnExecutor::prepare(const FfnCall& call, FfnRange r) {
    call_ = call;
    range_ = r;
    const HParams& hp = *call.hp;
    const LayerWeights& L = *call.L;
    FfnLayerStats& st = *call.stats;
    const int nt = call.n_tokens;
    const int64_t m = r.end - r.begin;
    const size_t n = size_t(nt) * size_t(m);
    listed_ = true;
    s_.rows.clear();
    if (m <= 0) return;
    if (!L.ffn_down_t && (r.begin != 0 || r.end != hp.n_ff))
        fail(strfmt("neurons [%lld, %lld) of %d: only a file with ffn_down_t splits its FFN", (long long)r.begin,
                    (long long)r.end, hp.n_ff));

    // the range's rows of a matrix read whole, into a [nt][m] array
    auto whole = [&](const Tensor* W, std::vector<float>& dst) {
        grow(dst, n);
        const Tensor v = row_range(*W, r.begin, r.end);
        matmul(pool_, v, call.h, nt, dst.data(), s_.act_buf);
        st.bytes += double(v.nbytes);
    };
    // coefficients act * up for every neuron of the range (act in s_.gate)
    auto coef_all = [&] {
        whole(L.ffn_up, s_.up);
        grow(s_.coef, n);
        for_tokens(pool_, nt, m, [&](int64_t t) {
            for (size_t i = size_t(t) * size_t(m), e = i + size_t(m); i < e; ++i) s_.coef[i] = s_.gate[i] * s_.up[i];
        });
        listed_ = false;
    };
    // coefficients for the listed neurons s_.rows only, act from the [nt][m] array in s_.gate
    auto coef_listed = [&] {
        const int64_t k2 = int64_t(s_.rows.size());
        if (k2 == 0) return;
        grow(s_.up, size_t(nt) * size_t(k2));
        grow(s_.coef, size_t(nt) * size_t(k2));
        matmul_rows(pool_, *L.ffn_up, s_.rows.data(), k2, call.h, nt, s_.up.data(), s_.act_buf);
        st.bytes += rows_bytes(*L.ffn_up, k2);
        for_tokens(pool_, nt, m, [&](int64_t t) {
            for (int64_t i = 0; i < k2; ++i)
                s_.coef[size_t(t) * k2 + i] =
                    s_.gate[size_t(t) * m + (s_.rows[size_t(i)] - r.begin)] * s_.up[size_t(t) * k2 + i];
        });
    };
    auto activate = [&] {  // s_.gate = act(gate), counting the non-zero ones
        std::vector<int64_t> active(size_t(nt), 0);
        for_tokens(pool_, nt, m, [&](int64_t t) {
            int64_t a = 0;
            for (size_t i = size_t(t) * size_t(m), e = i + size_t(m); i < e; ++i) {
                s_.gate[i] = ffn_activation(hp.act, s_.gate[i], L.act_t);
                a += s_.gate[i] != 0.0f;
            }
            active[size_t(t)] = a;
        });
        for (int64_t a : active) st.active += double(a);
    };

    switch (call.opt->strategy) {
        case FfnStrategy::DENSE:
            whole(L.ffn_gate, s_.gate);
            activate();
            coef_all();
            return;
        case FfnStrategy::EXACT: {
            whole(L.ffn_gate, s_.gate);
            activate();
            const float* act = s_.gate.data();
            union_rows(pool_, nt, r, [&](int t, int64_t j) { return act[size_t(t) * m + j] != 0.0f; }, s_.mark, s_.rows);
            // Even a prompt whose union is nearly every neuron runs on the list: matmul_rows and
            // axpy_rows run the whole-matrix kernels row for row (the same cost per row, measured),
            // so reading every row instead would only add the inactive ones.
            st.add_union(nt, double(s_.rows.size()), 0);
            coef_listed();
            return;
        }
        case FfnStrategy::PREDICT: {
            const float* logit = call.pred_logit;
            const int64_t n_ff = hp.n_ff;
            const float thr = L.pred_threshold;
            auto predicted = [&](int t, int64_t j) { return logit[size_t(t) * n_ff + r.begin + j] > thr; };
            union_rows(pool_, nt, r, predicted, s_.mark, s_.rows2);
            // gate on the predicted rows only, scattered into a [nt][m] activation array whose
            // unpredicted entries are zero: a missed neuron is dropped (the approximation)
            const int64_t m2 = int64_t(s_.rows2.size());
            grow(s_.gate, n);
            grow(s_.up, size_t(nt) * size_t(m2));
            if (m2) matmul_rows(pool_, *L.ffn_gate, s_.rows2.data(), m2, call.h, nt, s_.up.data(), s_.act_buf);
            st.bytes += rows_bytes(*L.ffn_gate, m2);
            for_tokens(pool_, nt, m, [&](int64_t t) {
                std::fill_n(s_.gate.begin() + std::ptrdiff_t(size_t(t) * size_t(m)), m, 0.0f);
                for (int64_t i = 0; i < m2; ++i) {
                    const int64_t j = s_.rows2[size_t(i)] - r.begin;
                    if (predicted(int(t), j))
                        s_.gate[size_t(t) * m + j] = ffn_activation(hp.act, s_.up[size_t(t) * m2 + i], L.act_t);
                }
            });
            if (call.opt->diag_recall) {
                // the range's full gate, only to count which active neurons the predictor caught
                grow(s_.diag_gate, n);
                const Tensor g = row_range(*L.ffn_gate, r.begin, r.end);
                matmul(pool_, g, call.h, nt, s_.diag_gate.data(), s_.act_buf);
                int64_t active = 0, hit = 0;
                for (int t = 0; t < nt; ++t)
                    for (int64_t j = 0; j < m; ++j) {
                        if (ffn_activation(hp.act, s_.diag_gate[size_t(t) * m + j], L.act_t) == 0.0f) continue;
                        active += 1;
                        hit += predicted(t, j);
                    }
                st.recall_total += double(active);
                st.recall_hit += double(hit);
                st.active += double(active);  // counted over the same tokens
            }
            const float* act = s_.gate.data();
            union_rows(pool_, nt, r, [&](int t, int64_t j) { return act[size_t(t) * m + j] != 0.0f; }, s_.mark, s_.rows);
            st.add_union(nt, double(s_.rows.size()), 0);
            coef_listed();
            return;
        }
    }
}

void CpuFfnExecutor::accumulate(float* out) {
    const LayerWeights& L = *call_.L;
    FfnLayerStats& st = *call_.stats;
    const int nt = call_.n_tokens;
    const int64_t m = range_.end - range_.begin;
    if (listed_) {
        const int64_t k2 = int64_t(s_.rows.size());
        if (k2 == 0) return;
        axpy_rows(pool_, *L.ffn_down_t, s_.rows.data(), k2, s_.coef.data(), nt, out);
        st.bytes += rows_bytes(*L.ffn_down_t, k2);
    } else if (L.ffn_down_t) {
        const Tensor d = row_range(*L.ffn_down_t, range_.begin, range_.end);
        axpy_rows(pool_, d, nullptr, m, s_.coef.data(), nt, out);
        st.bytes += double(d.nbytes);
    } else {
        // llama.cpp's ffn_down over the whole range (prepare refuses a part of it)
        const size_t ne = size_t(nt) * size_t(call_.hp->n_embd);
        grow(s_.gate, ne);
        matmul(pool_, *L.ffn_down, s_.coef.data(), nt, s_.gate.data(), s_.act_buf);
        for (size_t i = 0; i < ne; ++i) out[i] += s_.gate[i];
        st.bytes += double(L.ffn_down->nbytes);
    }
}

void ffn_forward(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
                 const float* x, const float* h, int n_tokens, float* out, FfnExecutor& cold,
                 FfnExecutor* hot, int64_t n_hot, FfnScratch& s, FfnLayerStats& st) {
    const int64_t n_ff = hp.n_ff;
    if (n_hot < 0 || n_hot > n_ff || (n_hot > 0 && !hot) || (n_hot % cpu::kNeuronGroup && n_hot != n_ff))
        fail(strfmt("invalid hot neuron count %lld for %lld neurons (a multiple of %d)", (long long)n_hot,
                    (long long)n_ff, cpu::kNeuronGroup));
    st.tokens += n_tokens;
    FfnCall call;
    call.hp = &hp;
    call.L = &L;
    call.opt = &opt;
    call.h = h;
    call.n_tokens = n_tokens;
    call.stats = &st;
    if (opt.strategy == FfnStrategy::PREDICT) {
        // predictor: logits = fc2 · relu(fc1 · x), x the residual stream before ffn_norm
        const int64_t R = L.fc1->ne[1];
        const size_t n = size_t(n_tokens) * size_t(n_ff);
        grow(s.pred_hidden, size_t(n_tokens) * size_t(R));
        grow(s.coef, n);
        matmul(pool, *L.fc1, x, n_tokens, s.pred_hidden.data(), s.act_buf);
        for (size_t i = 0; i < size_t(n_tokens) * size_t(R); ++i) s.pred_hidden[i] = std::max(0.0f, s.pred_hidden[i]);
        matmul(pool, *L.fc2, s.pred_hidden.data(), n_tokens, s.coef.data(), s.act_buf);
        st.bytes += double(L.fc1->nbytes) + double(L.fc2->nbytes);
        // the always-on prefix: a logit of +inf passes every executor's test (logit > cut-off)
        std::vector<int64_t> predicted(size_t(n_tokens), 0);
        for_tokens(pool, n_tokens, n_ff, [&](int64_t t) {
            float* logit = s.coef.data() + size_t(t) * size_t(n_ff);
            std::fill_n(logit, L.pred_always_on, INFINITY);
            int64_t p = 0;
            for (int64_t j = 0; j < n_ff; ++j) p += logit[j] > L.pred_threshold;
            predicted[size_t(t)] = p;
        });
        for (int64_t p : predicted) st.predicted += double(p);
        call.pred_logit = s.coef.data();
    }
    if (opt.strategy != FfnStrategy::PREDICT || opt.diag_recall) st.active_known += n_tokens;
    if (opt.strategy != FfnStrategy::DENSE) st.add_union(n_tokens, 0.0, 1);  // the executors add the rows

    std::fill(out, out + size_t(n_tokens) * size_t(hp.n_embd), 0.0f);
    // hot first: an asynchronous executor works while the CPU prepares the cold range; the cold
    // range's groups then continue the chain from the hot range's sum
    if (n_hot > 0) hot->prepare(call, {0, n_hot});
    if (n_hot < n_ff) cold.prepare(call, {n_hot, n_ff});
    if (n_hot > 0) hot->accumulate(out);
    if (n_hot < n_ff) cold.accumulate(out);
}

}  // namespace ps

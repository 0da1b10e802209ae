// The FFN strategies (docs/design.md "The FFN strategies"). They share one interface and live
// together so that a reader can compare them side by side; they differ only in which neurons
// they skip and in summation order.
//   dense:   every neuron.
//   exact:   gate in full; up and down only for neurons whose activation is non-zero.
//   predict: a per-layer predictor guesses the active set; gate, up and down only on it.
#pragma once

#include <cstdint>
#include <vector>

#include "arch.h"
#include "model.h"
#include "threadpool.h"

namespace ps {

enum class FfnStrategy { DENSE, EXACT, PREDICT };
const char* strategy_name(FfnStrategy s);

// Scratch shared by all layers, grown on demand and reused (no allocation per token once warm).
struct FfnScratch {
    std::vector<float> gate, up, coef;   // [n_tokens][n_ff] (or [n_tokens][n_listed])
    std::vector<float> pred_hidden;      // predictor's hidden layer [n_tokens][R]
    std::vector<int32_t> rows, rows2;    // active / predicted neuron index lists
    std::vector<uint8_t> mark;           // [n_ff] per-neuron flags for union / recall
    std::vector<uint8_t> act_buf;        // converted activations for matmul
    std::vector<float> down_buf;         // partial sums of the down projection
    std::vector<float> diag_gate;        // predict's recall diagnostic: the full gate
};

struct FfnOptions {
    FfnStrategy strategy = FfnStrategy::DENSE;
    float pred_threshold = 0.0f;   // predictor logit cut-off
    bool diag_recall = false;      // predict: also compute the full gate to measure recall
    double dense_fallback = 0.5;   // batches whose active union exceeds this fraction run dense
};

// out[t] = FFN(h[t]) for n_tokens rows of n_embd. h is the ffn_norm output; x the residual
// stream before ffn_norm (the predictor's input).
void ffn_forward(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
                 const float* x, const float* h, int n_tokens, float* out, FfnScratch& s,
                 FfnLayerStats& st);

// act(g) for the configured activation: SiLU (zeroed where |SiLU(g)| < t, the CATS-style
// layer threshold; t = 0 is plain SiLU), ReLU, or FATReLU (keep g where g >= t).
float ffn_activation(Activation a, float g, float t);

}  // namespace ps

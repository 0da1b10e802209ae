// A model's hyper-parameters and one layer's weights: what the forward pass's pieces (attention,
// the FFN strategies, the executors) need to know of the model, without the model itself.
#pragma once

#include <cstdint>
#include <vector>

#include "arch.h"
#include "tensor.h"

namespace ps {

struct HParams {
    Arch arch = Arch::LLAMA;
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, n_ff = 0;
    int head_dim = 0, n_rot = 0, n_ctx_train = 0;
    float rms_eps = 1e-5f, rope_theta = 10000.0f, rope_freq_scale = 1.0f;
    Activation act = Activation::SILU;
    float act_threshold = 0.0f;
    float embedding_scale = 1.0f, residual_scale = 1.0f, logit_scale = 1.0f;
    std::vector<float> layer_thresholds;  // prosparse.layer_thresholds (SiLU models), may be empty
};

struct LayerWeights {
    const Tensor *attn_norm = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    const Tensor *ffn_norm = nullptr, *ffn_gate = nullptr, *ffn_up = nullptr;
    const Tensor *ffn_down = nullptr, *ffn_down_t = nullptr;  // one of the two
    const Tensor *fc1 = nullptr, *fc2 = nullptr, *act_freq = nullptr;  // optional
    float act_t = 0.0f;  // this layer's activation threshold (FATReLU t, or the SiLU layer threshold)
    float pred_threshold = 0.0f;  // predict: this layer's predictor logit cut-off
    int64_t pred_always_on = 0;   // predict: neurons [0, pred_always_on) run whatever the predictor says
};

// Per-layer counters, summed over tokens (divide by `tokens` for fractions).
struct FfnLayerStats {
    int64_t tokens = 0;
    double active = 0;        // neurons with a non-zero activation (where the strategy knows it)
    int64_t active_known = 0; // tokens for which `active` was counted
    double predicted = 0;     // neurons the predictor selected (predict only)
    double recall_hit = 0, recall_total = 0;  // predicted ∩ active, active (diagnostic)
    double bytes = 0;         // weight bytes read
    // The union over a step's tokens of their active rows (exact, predict: the rows whose
    // ffn_down_t is read), by the step's token count n: union_rows[n] rows summed over
    // union_steps[n] steps. Batched sequences read this union once; its sparsity against n is what
    // a batch keeps of a token's. Each executor adds its own range's union.
    std::vector<double> union_rows;
    std::vector<int64_t> union_steps;
    void add_union(int n_tokens, double rows, int64_t steps) {
        if (union_rows.size() <= size_t(n_tokens)) {
            union_rows.resize(size_t(n_tokens) + 1, 0.0);
            union_steps.resize(size_t(n_tokens) + 1, 0);
        }
        union_rows[size_t(n_tokens)] += rows;
        union_steps[size_t(n_tokens)] += steps;
    }
};

}  // namespace ps

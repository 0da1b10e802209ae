// The FFN strategies (docs/design.md, "The FFN strategies") and the executors that run them on a
// range of neurons. The strategies share one interface and live together so that a reader can
// compare them side by side; they differ only in which neurons they skip.
//   dense:   every neuron.
//   exact:   gate in full; up and down only for neurons whose activation is non-zero.
//   predict: a per-layer predictor guesses the active set; gate, up and down only on it.
//
// A layer's neurons split into ranges: [0, n_hot) on one executor (the hot prefix of a file in
// frequency order: a GPU's, or a second CPU executor in the tests) and [n_hot, n_ff) on the CPU.
// Each executor prepares its range's down-projection coefficients, then adds its range's neuron
// groups to the output, continuing the chain of group sums where the previous range stopped
// (cpu/kernels.h, kNeuronGroup): split or not, a token's FFN output is the same bits.
#pragma once

#include <cstdint>
#include <vector>

#include "hparams.h"
#include "threadpool.h"

namespace ps {

enum class FfnStrategy { DENSE, EXACT, PREDICT };
const char* strategy_name(FfnStrategy s);

struct FfnOptions {
    FfnStrategy strategy = FfnStrategy::DENSE;
    bool diag_recall = false;      // predict: also compute the full gate to measure recall
};

// One layer's FFN for a batch: what every executor of the layer reads.
struct FfnCall {
    const HParams* hp = nullptr;
    const LayerWeights* L = nullptr;
    const FfnOptions* opt = nullptr;
    const float* h = nullptr;           // ffn_norm output, [n_tokens][n_embd]
    const float* pred_logit = nullptr;  // predict: the predictor's logits, [n_tokens][n_ff]
    int n_tokens = 0;
    FfnLayerStats* stats = nullptr;
};

struct FfnRange {
    int64_t begin = 0, end = 0;
};

class FfnExecutor {
public:
    virtual ~FfnExecutor() = default;
    // Gate, activation and up over the neurons of r: the down projection's coefficients. An
    // executor may start this asynchronously; it holds the call's pointers until accumulate.
    virtual void prepare(const FfnCall& call, FfnRange r) = 0;
    // out[t] += the prepared range's down projection (n_embd per token), its neuron groups added
    // in index order after whatever out holds. Waits for the work prepare started.
    virtual void accumulate(float* out) = 0;
};

// Scratch grown on demand and reused (no allocation per token once warm).
struct FfnScratch {
    std::vector<float> gate, up, coef;   // [n_tokens][range] (or [n_tokens][n_listed])
    std::vector<float> pred_hidden;      // predictor's hidden layer [n_tokens][R]
    std::vector<int32_t> rows, rows2;    // active / predicted neuron index lists (absolute)
    std::vector<uint8_t> mark;           // per-neuron flags for unions
    std::vector<uint8_t> act_buf;        // converted activations for matmul
    std::vector<float> diag_gate;        // predict's recall diagnostic: the full gate
};

// The CPU executor: the strategy's kernels (ops.h) on a thread pool.
class CpuFfnExecutor final : public FfnExecutor {
public:
    explicit CpuFfnExecutor(ThreadPool& pool) : pool_(pool) {}
    void prepare(const FfnCall& call, FfnRange r) override;
    void accumulate(float* out) override;

private:
    ThreadPool& pool_;
    FfnScratch s_;
    FfnCall call_;
    FfnRange range_;
    bool listed_ = false;  // coefficients for s_.rows (absolute); else for every neuron of the range
};

// out[t] = FFN(h[t]) for n_tokens rows of n_embd: the predictor (predict), then [0, n_hot) on hot
// and [n_hot, n_ff) on cold. n_hot is 0 (hot may be null), n_ff, or a multiple of kNeuronGroup
// where the file has ffn_down_t. h is the ffn_norm output; x the residual stream before ffn_norm
// (the predictor's input). s holds the predictor's scratch.
void ffn_forward(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const FfnOptions& opt,
                 const float* x, const float* h, int n_tokens, float* out, FfnExecutor& cold,
                 FfnExecutor* hot, int64_t n_hot, FfnScratch& s, FfnLayerStats& st);

// act(g) for the configured activation: SiLU (zeroed where |SiLU(g)| < t, the CATS-style
// layer threshold; t = 0 is plain SiLU), ReLU, or FATReLU (keep g where g >= t).
float ffn_activation(Activation a, float g, float t);

}  // namespace ps

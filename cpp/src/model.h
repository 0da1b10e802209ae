// A loaded model: hyper-parameters, weights (views into the GGUF mapping), tokenizer, the KV
// cache and the per-token scratch buffers, and the forward pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "batch.h"
#include "gguf.h"
#include "hparams.h"
#include "placement.h"
#include "threadpool.h"
#include "tokenizer.h"

namespace ps {

struct ModelParams {
    int n_ctx = 0;            // 0: the model's training context
    int n_threads = 0;        // 0: all cores
    int n_batch = 256;        // prompt tokens processed per forward
    std::string sparsity = "auto";  // dense | exact | predict | auto
    float act_threshold = NAN;      // overrides prosparse.activation_threshold when not NaN
    float pred_threshold = NAN;     // overrides the file's predictor cut-off when not NaN
    bool diag_recall = false;       // predict: also compute the full gate to report recall
    std::string kv_type = "f16";    // the KV cache's type: f16, f32, q8_0 (kv_cache.h)
    int n_seq = 1;                  // sequences the KV cache holds, n_ctx positions each
    std::string device = "cpu";     // auto | cpu | cuda | cuda:N
    double vram_budget_gib = -1.0;  // GPU memory to place weights in; < 0: free memory less a margin
    // Per-layer |SiLU(gate)| thresholds that replace the file's prosparse.layer_thresholds (SiLU
    // models; empty: keep the file's). A file without ffn_down_t then gets one built at load.
    std::vector<float> layer_thresholds;
    // Tests of the hybrid's split: every layer's neurons [0, n) on a second CPU executor, the
    // rest on the first (ffn.h). -1: no split.
    int64_t test_split_hot = -1;
};

struct ModelStats {
    int64_t n_prompt_tokens = 0, n_decode_tokens = 0;
    double prompt_seconds = 0.0, decode_seconds = 0.0;
    double weight_bytes_per_token = 0.0;  // bytes of weights the last decode step read
    int64_t n_interleaved = 0;            // weight matrices stored interleaved (cpu/kernels.h)
    int64_t n_down_t_built = 0;           // layers whose ffn_down_t was built at load from ffn_down
    double kv_cache_bytes = 0.0;          // the KV cache's size
    double kv_bytes_per_token = 0.0;      // bytes of the cache the last decode step read
    // Decode steps (every token of the step a sequence's next token) by their token count n:
    // step_weight_bytes[n] weight bytes read over step_count[n] steps. A batched step reads the
    // union of its tokens' rows once (the serving bench's GB/s).
    std::vector<double> step_weight_bytes;
    std::vector<int64_t> step_count;
    std::string kv_type;                  // its type
    std::vector<FfnLayerStats> layers;    // FFN counters per layer since load
    // Where the weights are (docs/design.md, "The CPU/GPU hybrid"): the device asked for as
    // resolved, the placement from its budget (everything on the CPU for "cpu"), and whether the
    // GPU runs its part (the placed weights uploaded, cuda/gpu_model.h).
    std::string device = "cpu";
    std::string device_note;              // why the GPU is not used, where it is not
    double vram_budget_bytes = 0.0;
    Placement placement;
    bool gpu_active = false;
    double gpu_resident_bytes = 0.0;      // device memory the GPU side holds (weights, KV cache, scratch)
    // Overlap (since load): GPU time of the work the CPU queued (uploads, kernels, downloads), and
    // the time the CPU spent blocked waiting for it. eval time less gpu_busy is the GPU idle; the
    // CPU's own work is eval time less cpu_wait.
    double gpu_busy_seconds = 0.0, cpu_wait_seconds = 0.0;
    double gpu_bytes_per_token = 0.0;     // of weight_bytes_per_token, the bytes the GPU read
};

class Model {
public:
    struct Impl;  // the weights, cache, scratch and executors (model.cpp)

    Model(const std::string& path, const ModelParams& params);
    ~Model();

    const HParams& hparams() const { return hp_; }
    const Tokenizer& tokenizer() const { return *tok_; }
    const GGUFFile& file() const { return *file_; }
    int n_ctx() const { return n_ctx_; }
    int n_past() const { return seq_len_[0]; }
    int n_seq() const { return int(seq_len_.size()); }
    int seq_len(int seq) const;
    int n_threads() const;
    const std::string& strategy() const { return strategy_; }
    const ModelStats& stats() const { return stats_; }

    // Drops the cached positions from n onwards (n <= n_past), so that the next eval continues
    // from position n. This is how a new prompt reuses the prefix it shares with the last one.
    void rewind(int n) { rewind(0, n); }
    void rewind(int seq, int n);  // the same for one sequence

    // Runs n tokens at positions n_past .. n_past+n-1 and appends them to the KV cache.
    // Writes n_vocab logits for the last token, or for every token when all_logits, to `logits`
    // (sized n_vocab or n * n_vocab). Throws if the context would overflow or an id is invalid,
    // and NumericError, naming the first layer that went non-finite, if the logits hold NaN or
    // Inf. An eval that throws leaves every sequence as it was.
    void eval(const int32_t* tokens, int n, bool all_logits, float* logits);

    // Runs a batch of tokens of several sequences in one forward pass: token t at position
    // batch.pos[t] of sequence batch.seq[t], where each sequence's tokens come in order and start at
    // its length so far (seq_len); appends them to the cache. Writes n_vocab logits for every token
    // (all_logits), or for the last token of each sequence in the batch, in the order of those last
    // tokens. A token's logits are the same bits as if its sequence ran alone (docs/design.md,
    // "Determinism"). Throws, leaving every sequence as it was, on a bad id, sequence or position.
    void eval(const TokenBatch& batch, bool all_logits, float* logits);

    // Calibration: while on, every eval records per layer the residual stream entering the FFN
    // ([n][n_embd], the predictor's input) and the raw gate pre-activations ([n][n_ff], computed
    // in full whatever the strategy). Read them after the eval; the next eval replaces them.
    void set_capture(bool on);
    const std::vector<float>& captured_x(int layer) const;
    const std::vector<float>& captured_gate(int layer) const;

    // Calibration: replaces a SiLU model's per-layer thresholds (prosparse.layer_thresholds) in
    // memory, so that threshold sets can be evaluated without writing a file; empty = none. The
    // strategy chosen at load stays (dense applies the thresholds too, so it measures quality).
    void set_layer_thresholds(const std::vector<float>& t);

private:
    void choose_strategy(const ModelParams& params);
    void build_down_t(int64_t reserved);  // reserved: bytes of available memory already promised
    void place_weights(const ModelParams& params, size_t kv_bytes);
    void start_gpu(const ModelParams& params);  // uploads what place_weights put on the GPU
    std::vector<const Tensor*> gpu_only_weights() const;
    void interleave_weights(int64_t avail);  // avail: bytes the copies may take from, -1 unknown

    std::unique_ptr<GGUFFile> file_;
    std::unique_ptr<Tokenizer> tok_;
    HParams hp_;
    int n_ctx_ = 0;
    std::vector<int> seq_len_;  // positions cached per sequence
    std::string strategy_;
    ModelStats stats_;
    std::unique_ptr<Impl> impl_;
};

}  // namespace ps

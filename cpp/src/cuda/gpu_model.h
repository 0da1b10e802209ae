// The GPU half of the CPU/GPU hybrid (docs/design.md, "The CPU/GPU hybrid"): device copies of the
// weights the placement put on the GPU, the device KV cache of the layers whose attention runs
// there, and the two kinds of GPU work a layer can get:
//   attention(): the residual stream goes up, the attention branch comes down (the CPU adds it,
//                as in the CPU-only forward);
//   ffn():       the FfnExecutor (ffn.h) of the hot neurons [0, n_hot): prepare() uploads h (and
//                the predictor's logits, which the CPU computes) through pinned memory and queues
//                the coefficient and down-projection kernels on the GPU's stream; the CPU prepares
//                the cold range meanwhile; accumulate() waits on an event (blocking sync, no
//                spinning core) and adds the downloaded sum, which continues the neuron groups'
//                chain exactly as a CPU executor would.
// Plain C++ over cuda/device.h and cuda/kernels.h: compiled only in a build with CUDA
// (gpu_model_none.cpp otherwise, whose constructor throws).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "batch.h"
#include "ffn.h"
#include "hparams.h"
#include "kv_cache.h"
#include "placement.h"
#include "tensor.h"
#include "threadpool.h"

namespace ps {

class GGUFFile;

// Time and traffic of the GPU side since load.
struct GpuStats {
    double cpu_wait_seconds = 0;  // the host blocked on the GPU's events (the CPU waiting)
    double gpu_busy_seconds = 0;  // GPU time between each piece of work's first and last event
    double bytes_read = 0;        // weight bytes the GPU's kernels read (FFN rows as the CPU counts them)
    double resident_bytes = 0;    // device memory held: weights, KV cache, scratch
};

struct GpuModelConfig {
    int device = 0;
    const GGUFFile* file = nullptr;  // the plain (file-layout) rows of interleaved weights
    const HParams* hp = nullptr;
    const std::vector<LayerWeights>* layers = nullptr;
    const std::vector<std::vector<float>>* attn_norm = nullptr;  // f32 norms per layer
    const std::vector<std::vector<float>>* ffn_norm = nullptr;
    const Tensor* output = nullptr;
    const std::vector<float>* output_norm = nullptr;
    const Placement* placement = nullptr;
    const FfnOptions* ffn_opt = nullptr;
    ThreadPool* pool = nullptr;  // predict's recall diagnostic on the hot rows runs on the CPU
    bool allow_resident = true;  // false: every layer's residual stream goes through the host
    KvType kv_type = KvType::F16;
    int n_ctx = 0, n_seq = 1, n_batch = 1;
};

class GpuModel {
public:
    // Uploads the placed weights and allocates the device KV cache and scratch. Throws CudaError
    // (out of device memory, a CUDA failure) or ps::Error (a weight type the GPU kernels lack).
    explicit GpuModel(const GpuModelConfig& cfg);
    ~GpuModel();
    GpuModel(const GpuModel&) = delete;
    GpuModel& operator=(const GpuModel&) = delete;

    // Everything on the GPU (every layer's attention and FFN, and the output), and the strategy's
    // diagnostics need nothing of the CPU: the residual stream then stays on the device through all
    // the layers (forward_layers), and the predictor runs there too.
    bool resident() const;
    bool attention_on_gpu(int layer) const;
    int64_t n_hot(int layer) const;
    bool output_on_gpu() const;

    // Once per batch, before its layers: the positions, sequences and RoPE table ([n][n_rot]
    // (cos, sin) pairs, the CPU's rope_table bits) go to the device.
    void begin_batch(const TokenBatch& batch, const float* rope_cs);
    // branch[t] = the attention block's output for the residual stream x[t] (n_embd each), the
    // layer's keys and values stored in the device cache at the batch's positions.
    void attention(int layer, const TokenBatch& batch, const float* x, float* branch);
    // resident(): every layer for the batch on the device. x ([n][n_embd], the embedded tokens) goes
    // up once and comes back as the residual stream after the last layer; the CPU only queues
    // work and waits once. Adds the layers' FFN counters to st (n_layer of them).
    void forward_layers(const TokenBatch& batch, float* x, FfnLayerStats* st);
    // logits[r] (n_vocab) = output(output_norm(x[r])) for n rows of x; the caller scales them.
    void output(const float* x, int n, float* logits);
    // The hot range's executor, for every layer (it finds the layer from FfnCall::L).
    FfnExecutor& ffn();

    const GpuStats& stats() const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
    std::unique_ptr<FfnExecutor> ffn_;  // declared after impl_: destroyed first, it refers to it
};

}  // namespace ps

// The FFN strategies (DESIGN.md "The FFN strategies"). They share one interface so that a reader
// can compare them side by side; they differ only in which neurons they skip.
#pragma once

#include <cstdint>
#include <vector>

#include "arch.h"
#include "model.h"
#include "threadpool.h"

namespace ps {

// Scratch shared by all layers, sized once for the largest batch.
struct FfnScratch {
    std::vector<float> gate, up;      // [n_tokens][n_ff]
    std::vector<uint8_t> act_buf;     // converted activations for matmul
    std::vector<float> down_rows;     // per-thread dequantized slices of ffn_down_t rows
};

// out[t] = FFN(h[t]) for n_tokens rows of n_embd; h is the ffn_norm output.
void ffn_dense(ThreadPool& pool, const HParams& hp, const LayerWeights& L, const float* h,
               int n_tokens, float* out, FfnScratch& s);

// act(g) for the configured activation: SiLU, ReLU, or FATReLU (keep g where g >= t).
float ffn_activation(Activation a, float g, float t);

}  // namespace ps

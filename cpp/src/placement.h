// Which weights go to the GPU, given a VRAM budget (docs/design.md, "The CPU/GPU hybrid"). A pure
// function of byte sizes and read probabilities: no CUDA, no model.
//
// Every placeable block has a probability of being read per token: 1 for a layer's attention
// (wq/wk/wv/wo and norms), its KV cache and its predictor, for the output matrix and final norm,
// and for the rows the FFN strategy reads every token (gate rows under `exact`); a neuron's
// firing frequency for the rows read only when it fires (up and ffn_down_t rows, and the gate
// rows under `predict`). Blocks are placed highest expected bytes read per byte first, across all
// layers, so the GPU holds what is read most for the memory it has.
#pragma once

#include <cstdint>
#include <vector>

namespace ps {

struct PlacementLayer {
    // One unit, all on the GPU or all on the CPU: attention runs where its KV cache is, and the
    // predictor beside it. Read every token.
    uint64_t attention_bytes = 0;  // wq, wk, wv, wo, attention and FFN norms
    uint64_t kv_bytes = 0;         // this layer's KV cache at the context length
    uint64_t predictor_bytes = 0;  // fc1 + fc2 (0 without predictor)
    // The FFN, neuron by neuron in file order. Every neuron has the same row sizes.
    uint64_t neuron_bytes_always = 0;  // per neuron, rows read every token
    uint64_t neuron_bytes_fired = 0;   // per neuron, rows read only when it fires
    std::vector<float> freq;           // n_ff firing (or predicted) frequencies in [0, 1]
    bool whole_ffn = false;  // the FFN moves as one block (n_hot 0 or n_ff): a layer without ffn_down_t
};

struct PlacementInput {
    std::vector<PlacementLayer> layers;
    uint64_t output_bytes = 0;  // output matrix and final norm, read every token
    int group = 64;             // n_hot is a multiple of this (the executor's neuron group)
};

struct LayerPlacement {
    bool attention_on_gpu = false;  // attention, KV cache and predictor
    int n_hot = 0;                  // neurons [0, n_hot) on the GPU
};

struct Placement {
    std::vector<LayerPlacement> layers;
    bool output_on_gpu = false;
    uint64_t gpu_bytes = 0, cpu_bytes = 0;          // resident on each device
    double gpu_bytes_per_token = 0, cpu_bytes_per_token = 0;  // expected reads on each device
};

// True when freq is non-increasing (the file's neurons are in frequency order, hottest first).
bool is_frequency_ordered(const std::vector<float>& freq);

// Places blocks in order of expected bytes read per byte, highest first (ties: output matrix,
// then attention by layer, then neurons by layer and index), and stops at the first block that
// does not fit in the budget. Stopping rather than skipping makes every placement a prefix of one
// order: a larger budget places a superset, and the budget left unused is less than the next
// block (one layer's attention + KV cache + predictor, or one group of neurons).
// A layer's FFN is placed in groups of `group` neurons from neuron 0, so its hot set is a prefix
// and n_hot is a multiple of `group` (or n_ff, whose last group may be short). That needs the
// frequencies to be non-increasing: a layer that is not (is_frequency_ordered false) is an error
// (ps::Error); a caller with such a file either places a frequency-ordered copy of its rows (sorting
// freq first and permuting the rows the same way) or asks for
// `prosparse-calibrate --neuron-order frequency`.
// Throws ps::Error on frequencies outside [0, 1] or NaN, group < 1, or sizes whose sum overflows.
Placement place(const PlacementInput& in, uint64_t budget_bytes);

}  // namespace ps

// Causal self-attention over the KV cache, and RoPE.
#pragma once

#include <vector>

#include "batch.h"
#include "hparams.h"
#include "kv_cache.h"
#include "threadpool.h"

namespace ps {

// llama.cpp's "normal" RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/n_rot).
// The converter permutes Q/K rows so that this equals Hugging Face's rotate_half convention.
// rope_table writes (cos, sin) for one position, n_rot/2 pairs, shared by Q, K and all layers.
void rope_table(float* cs, int n_rot, int pos, float theta, float freq_scale);
void rope(float* x, int n_heads, int head_dim, int n_rot, const float* cs);

// Positions per attention tile: keys are taken in fixed tiles of absolute positions
// [j * kAttnTile, (j + 1) * kAttnTile), each tile's softmax partial (max, sum, weighted values)
// merged into the running result in tile order, in a prompt and in decode alike.
constexpr int kAttnTile = 128;

// Scratch for attention, grown as needed and reused.
struct AttnScratch {
    std::vector<float> partials;  // decode: [head][tile][head_dim + 2]
    std::vector<float> tiles;     // [thread][2][kAttnTile][head_dim]: a tile's keys and values as f32
    std::vector<int> runs;        // a batch's runs of one sequence's consecutive tokens
};

// out[t] (n_head * head_dim) = softmax(q[t] k / sqrt(d)) v over positions 0..pos[t] of token t's
// sequence in the cache, for every token of the batch and every head. A task reads one KV head's
// tile once for all the query heads that share it (grouped-query attention); one token splits its
// tiles over the threads; a batch gives a task to each (run of up to 16 consecutive tokens of one
// sequence, KV head), which converts each tile once for the run's tokens and runs them through the
// tiles in order, with scratch independent of the context length. Either way a (token, head) gets the
// same bits (docs/design.md, "Determinism").
void attention(ThreadPool& pool, const HParams& hp, const KvCache& kv, int layer, const TokenBatch& batch,
               const float* q, float* out, AttnScratch& scratch);

}  // namespace ps

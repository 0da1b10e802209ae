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

// out[t] (n_head * head_dim) = softmax(q[t] k / sqrt(d)) v over positions 0..pos[t] of token t's
// sequence in the cache, for every token of the batch and every head. Each (token, head) reads
// only the cache, in position order, so its result does not depend on the batch or the thread
// count (docs/design.md, "Determinism"). scores: scratch, grown as needed.
void attention(ThreadPool& pool, const HParams& hp, const KvCache& kv, int layer, const TokenBatch& batch,
               const float* q, float* out, std::vector<float>& scores);

}  // namespace ps

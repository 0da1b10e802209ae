// The tokens one forward pass computes: each with its position and the sequence (KV cache region)
// it belongs to, so that sequences of different lengths can advance in one pass.
#pragma once

#include <cstdint>

namespace ps {

struct TokenBatch {
    const int32_t* token = nullptr;
    const int32_t* pos = nullptr;  // the token's position in its sequence
    const int32_t* seq = nullptr;  // the token's sequence, 0 <= seq < KvCache::n_seq()
    int n = 0;
};

}  // namespace ps

// Token sampling, llama.cpp's chain in llama-cpp-python's default order:
// repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw. temperature 0 is argmax.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace ps {

struct SamplerParams {
    float temperature = 0.8f;
    int top_k = 40;            // 0: off
    float top_p = 0.95f;       // 1: off
    float min_p = 0.05f;       // 0: off
    float repeat_penalty = 1.0f;  // 1: off
    int repeat_last_n = 64;
    uint64_t seed = 0;
};

class Sampler {
public:
    explicit Sampler(const SamplerParams& p);
    // Picks the next token from n_vocab logits; `history` is the ids seen so far (prompt and
    // generated), used by the repeat penalty. Deterministic for a given seed and inputs.
    int32_t sample(const float* logits, int n_vocab, const std::vector<int32_t>& history);

private:
    SamplerParams p_;
    std::mt19937_64 rng_;
    std::vector<std::pair<float, int32_t>> cand_;  // reused candidate buffer
};

}  // namespace ps

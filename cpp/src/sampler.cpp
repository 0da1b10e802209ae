// llama.cpp's sampler chain as llama-cpp-python configures it by default:
// repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "common.h"

namespace ps {

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) {
    if (!(p.temperature >= 0.0f)) fail("temperature must be >= 0");
    if (p.top_k < 0) fail("top_k must be >= 0");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) fail("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) fail("min_p must be in [0, 1]");
    if (!(p.repeat_penalty > 0.0f)) fail("repeat_penalty must be > 0");
    if (p.repeat_last_n < 0) fail("repeat_last_n must be >= 0");
}

namespace {

// softmax over candidate logits (sorted descending), into probabilities in .first
void softmax_sorted(std::vector<std::pair<float, int32_t>>& c, std::vector<double>& prob) {
    prob.resize(c.size());
    const double mx = c.front().first;
    double sum = 0.0;
    for (size_t i = 0; i < c.size(); ++i) sum += (prob[i] = std::exp(double(c[i].first) - mx));
    for (double& q : prob) q /= sum;
}

}  // namespace

int32_t Sampler::sample(const float* logits, int n_vocab, const std::vector<int32_t>& history) {
    if (n_vocab <= 0) fail("empty logits");
    cand_.resize(size_t(n_vocab));
    for (int i = 0; i < n_vocab; ++i) cand_[size_t(i)] = {logits[i], int32_t(i)};

    if (p_.repeat_penalty != 1.0f && p_.repeat_last_n > 0) {
        // llama.cpp's rule: divide positive logits, multiply negative ones, once per distinct token
        std::unordered_set<int32_t> seen;
        const size_t start = history.size() > size_t(p_.repeat_last_n) ? history.size() - size_t(p_.repeat_last_n) : 0;
        for (size_t i = start; i < history.size(); ++i) {
            const int32_t id = history[i];
            if (id < 0 || id >= n_vocab || !seen.insert(id).second) continue;
            float& l = cand_[size_t(id)].first;
            l = l > 0.0f ? l / p_.repeat_penalty : l * p_.repeat_penalty;
        }
    }

    auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    if (p_.temperature == 0.0f) {  // greedy: exactly argmax, lowest id on ties
        return std::min_element(cand_.begin(), cand_.end(), by_logit)->second;
    }

    size_t k = cand_.size();
    if (p_.top_k > 0 && size_t(p_.top_k) < k) k = size_t(p_.top_k);
    std::partial_sort(cand_.begin(), cand_.begin() + std::ptrdiff_t(k), cand_.end(), by_logit);
    cand_.resize(k);

    std::vector<double> prob;
    if (p_.top_p < 1.0f) {
        softmax_sorted(cand_, prob);
        double cum = 0.0;
        size_t keep = cand_.size();
        for (size_t i = 0; i < prob.size(); ++i) {
            cum += prob[i];
            if (cum >= p_.top_p) { keep = i + 1; break; }
        }
        cand_.resize(keep);
    }
    if (p_.min_p > 0.0f && cand_.size() > 1) {
        // keep tokens whose probability is at least min_p times the top one's
        const float cut = cand_.front().first + std::log(p_.min_p);
        size_t keep = 1;
        while (keep < cand_.size() && cand_[keep].first >= cut) ++keep;
        cand_.resize(keep);
    }
    for (auto& c : cand_) c.first /= p_.temperature;
    softmax_sorted(cand_, prob);
    const double r = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    double cum = 0.0;
    for (size_t i = 0; i < prob.size(); ++i) {
        cum += prob[i];
        if (r < cum) return cand_[i].second;
    }
    return cand_.back().second;
}

}  // namespace ps

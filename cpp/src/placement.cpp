// Placement from a VRAM budget: a greedy by expected bytes read per byte (placement.h).
#include "placement.h"

#include <algorithm>
#include <cmath>

#include "common.h"

namespace ps {

bool is_frequency_ordered(const std::vector<float>& freq) {
    for (size_t i = 1; i < freq.size(); ++i)
        if (!(freq[i] <= freq[i - 1])) return false;  // NaN counts as out of order
    return true;
}

namespace {

enum Kind { kOutput = 0, kAttention = 1, kNeurons = 2 };

struct Block {
    double density;   // expected bytes read per token / bytes
    int kind;
    int layer;        // -1 for the output
    int group;        // group index within the layer's FFN
    uint64_t bytes;
    double expected;  // expected bytes read per token
};

uint64_t add(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) fail("placement: the weight sizes add up past 2^64 bytes");
    return r;
}

uint64_t mul(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) fail("placement: the weight sizes add up past 2^64 bytes");
    return r;
}

}  // namespace

Placement place(const PlacementInput& in, uint64_t budget_bytes) {
    if (in.group < 1) fail(strfmt("placement: the neuron group size must be >= 1, got %d", in.group));
    const uint64_t G = uint64_t(in.group);
    std::vector<Block> blocks;
    uint64_t total = in.output_bytes;
    blocks.push_back({1.0, kOutput, -1, 0, in.output_bytes, double(in.output_bytes)});
    for (size_t l = 0; l < in.layers.size(); ++l) {
        const PlacementLayer& L = in.layers[l];
        const uint64_t attn = add(add(L.attention_bytes, L.kv_bytes), L.predictor_bytes);
        total = add(total, attn);
        blocks.push_back({1.0, kAttention, int(l), 0, attn, double(attn)});
        const uint64_t n_ff = L.freq.size();
        if (n_ff > uint64_t(INT32_MAX)) fail(strfmt("placement: layer %zu has too many neurons", l));
        for (uint64_t i = 0; i < n_ff; ++i) {
            const float f = L.freq[i];
            if (!(f >= 0.0f && f <= 1.0f))
                fail(strfmt("placement: layer %zu neuron %llu has frequency %g, outside [0, 1]", l,
                            (unsigned long long)i, double(f)));
        }
        if (!is_frequency_ordered(L.freq))
            fail(strfmt("placement: layer %zu's neurons are not in frequency order (hottest first), "
                        "so its hot set is not a prefix; reorder the file with "
                        "`prosparse-calibrate --neuron-order frequency`", l));
        const uint64_t per_neuron = add(L.neuron_bytes_always, L.neuron_bytes_fired);
        total = add(total, mul(per_neuron, n_ff));
        double prev_density = 1.0;
        const uint64_t Gl = L.whole_ffn ? std::max<uint64_t>(n_ff, 1) : G;
        for (uint64_t g0 = 0, g = 0; g0 < n_ff; g0 += Gl, ++g) {
            const uint64_t n = std::min(Gl, n_ff - g0);
            double fired = 0;  // expected number of firing neurons in the group
            for (uint64_t i = g0; i < g0 + n; ++i) fired += L.freq[i];
            const uint64_t bytes = n * per_neuron;
            const double expected = double(n * L.neuron_bytes_always) + fired * double(L.neuron_bytes_fired);
            // Ordered frequencies give non-increasing densities up to rounding; the running
            // minimum removes that rounding, so the sort below keeps each layer's groups in order.
            double density = bytes ? std::min(expected / double(bytes), prev_density) : prev_density;
            prev_density = density;
            blocks.push_back({density, kNeurons, int(l), int(g), bytes, expected});
        }
    }

    std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) {
        if (a.density != b.density) return a.density > b.density;
        if (a.kind != b.kind) return a.kind < b.kind;
        if (a.layer != b.layer) return a.layer < b.layer;
        return a.group < b.group;
    });

    Placement p;
    p.layers.resize(in.layers.size());
    std::vector<uint64_t> hot_groups(in.layers.size(), 0);
    uint64_t left = budget_bytes;
    size_t k = 0;
    for (; k < blocks.size() && blocks[k].bytes <= left; ++k) {
        const Block& b = blocks[k];
        left -= b.bytes;
        p.gpu_bytes += b.bytes;
        p.gpu_bytes_per_token += b.expected;
        if (b.kind == kOutput) p.output_on_gpu = true;
        else if (b.kind == kAttention) p.layers[size_t(b.layer)].attention_on_gpu = true;
        else ++hot_groups[size_t(b.layer)];
    }
    for (; k < blocks.size(); ++k) p.cpu_bytes_per_token += blocks[k].expected;
    p.cpu_bytes = total - p.gpu_bytes;
    for (size_t l = 0; l < in.layers.size(); ++l) {
        const uint64_t n_ff = in.layers[l].freq.size();
        const uint64_t Gl = in.layers[l].whole_ffn ? std::max<uint64_t>(n_ff, 1) : G;
        p.layers[l].n_hot = int(std::min(hot_groups[l] * Gl, n_ff));
    }
    return p;
}

}  // namespace ps

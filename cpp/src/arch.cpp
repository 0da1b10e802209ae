// GGUF strings for architectures, metadata keys and tensors, in one place (llama.cpp's
// llama-arch.cpp names; prosparse.* and powerinfer.* are ours and PowerInfer's).
#include "arch.h"

#include <cstring>

#include "common.h"

namespace ps {

namespace {

// One table row: an enum value and its GGUF string. Every table below is a list of these, so
// one pair of lookups serves them all.
template <class E>
struct Row {
    E value;
    const char* name;
};

constexpr Row<Arch> kArchs[] = {
    {Arch::LLAMA, "llama"},
    {Arch::MINICPM, "minicpm"},
};

constexpr Row<Activation> kActs[] = {
    {Activation::SILU, "silu"},
    {Activation::RELU, "relu"},
    {Activation::FATRELU, "fatrelu"},
};

// "%s" is replaced by the architecture name; keys without it are global.
constexpr Row<Key> kKeys[] = {
    {Key::GENERAL_ARCHITECTURE, "general.architecture"},
    {Key::GENERAL_NAME, "general.name"},
    {Key::CONTEXT_LENGTH, "%s.context_length"},
    {Key::EMBEDDING_LENGTH, "%s.embedding_length"},
    {Key::BLOCK_COUNT, "%s.block_count"},
    {Key::FEED_FORWARD_LENGTH, "%s.feed_forward_length"},
    {Key::HEAD_COUNT, "%s.attention.head_count"},
    {Key::HEAD_COUNT_KV, "%s.attention.head_count_kv"},
    {Key::RMS_EPS, "%s.attention.layer_norm_rms_epsilon"},
    {Key::ROPE_FREQ_BASE, "%s.rope.freq_base"},
    {Key::ROPE_DIMENSION_COUNT, "%s.rope.dimension_count"},
    {Key::ROPE_SCALING_TYPE, "%s.rope.scaling.type"},
    {Key::ROPE_SCALING_FACTOR, "%s.rope.scaling.factor"},
    {Key::VOCAB_SIZE, "%s.vocab_size"},
    {Key::EMBEDDING_SCALE, "%s.embedding_scale"},
    {Key::RESIDUAL_SCALE, "%s.residual_scale"},
    {Key::LOGIT_SCALE, "%s.logit_scale"},
    {Key::PS_ACTIVATION, "prosparse.activation"},
    {Key::PS_ACTIVATION_THRESHOLD, "prosparse.activation_threshold"},
    {Key::PS_LAYER_THRESHOLDS, "prosparse.layer_thresholds"},
    {Key::PS_NEURON_ORDER, "prosparse.neuron_order"},
    {Key::PS_PREDICTOR_THRESHOLD, "prosparse.predictor.threshold"},
    {Key::PS_PREDICTOR_LAYER_THRESHOLDS, "prosparse.predictor.layer_thresholds"},
    {Key::PS_PREDICTOR_ALWAYS_ON, "prosparse.predictor.always_on"},
    {Key::PWI_SPARSE_THRESHOLD, "powerinfer.sparse_threshold"},
    {Key::CHAT_TEMPLATE, "tokenizer.chat_template"},
};

// "%d" is the layer index for per-layer tensors.
constexpr Row<TensorName> kTensors[] = {
    {TensorName::TOKEN_EMBD, "token_embd.weight"},
    {TensorName::OUTPUT_NORM, "output_norm.weight"},
    {TensorName::OUTPUT, "output.weight"},
    {TensorName::ATTN_NORM, "blk.%d.attn_norm.weight"},
    {TensorName::ATTN_Q, "blk.%d.attn_q.weight"},
    {TensorName::ATTN_K, "blk.%d.attn_k.weight"},
    {TensorName::ATTN_V, "blk.%d.attn_v.weight"},
    {TensorName::ATTN_OUT, "blk.%d.attn_output.weight"},
    {TensorName::FFN_NORM, "blk.%d.ffn_norm.weight"},
    {TensorName::FFN_GATE, "blk.%d.ffn_gate.weight"},
    {TensorName::FFN_UP, "blk.%d.ffn_up.weight"},
    {TensorName::FFN_DOWN, "blk.%d.ffn_down.weight"},
    {TensorName::FFN_DOWN_T, "blk.%d.ffn_down_t.weight"},
    {TensorName::FC1, "blk.%d.fc1.weight"},
    {TensorName::FC2, "blk.%d.fc2.weight"},
    {TensorName::FFN_ACT_FREQ, "blk.%d.ffn_act_freq"},
};

// The string of value in table, nullptr if the table lacks it.
template <class E, size_t N>
const char* name_in(const Row<E> (&table)[N], E value) {
    for (const auto& r : table)
        if (r.value == value) return r.name;
    return nullptr;
}

// The value whose string is s, if the table has one.
template <class E, size_t N>
bool value_in(const Row<E> (&table)[N], const std::string& s, E* out) {
    for (const auto& r : table)
        if (s == r.name) { *out = r.value; return true; }
    return false;
}

// fmt with its placeholder (e.g. "%s") replaced by value, if it has one.
std::string fill(const char* fmt, const char* placeholder, const std::string& value) {
    std::string s = fmt;
    const auto pos = s.find(placeholder);
    if (pos != std::string::npos) s.replace(pos, std::strlen(placeholder), value);
    return s;
}

}  // namespace

const char* arch_name(Arch a) {
    const char* n = name_in(kArchs, a);
    return n ? n : "unknown";
}

bool arch_from_name(const std::string& s, Arch* out) { return value_in(kArchs, s, out); }

const char* activation_name(Activation a) {
    const char* n = name_in(kActs, a);
    return n ? n : "unknown";
}

bool activation_from_name(const std::string& s, Activation* out) { return value_in(kActs, s, out); }

std::string key(Arch a, Key k) {
    const char* fmt = name_in(kKeys, k);
    if (!fmt) fail("internal error: metadata key missing from the table");
    return fill(fmt, "%s", arch_name(a));
}

std::string tensor_name(TensorName t, int layer) {
    const char* fmt = name_in(kTensors, t);
    if (!fmt) fail("internal error: tensor name missing from the table");
    return fill(fmt, "%d", std::to_string(layer));
}

}  // namespace ps

// GGUF strings for architectures, metadata keys and tensors, in one place (llama.cpp's
// llama-arch.cpp names; prosparse.* and powerinfer.* are ours and PowerInfer's).
#include "arch.h"

#include <cstring>

#include "common.h"

namespace ps {

namespace {

struct ArchRow { Arch arch; const char* name; };
constexpr ArchRow kArchs[] = {
    {Arch::LLAMA, "llama"},
    {Arch::MINICPM, "minicpm"},
};

struct ActRow { Activation act; const char* name; };
constexpr ActRow kActs[] = {
    {Activation::SILU, "silu"},
    {Activation::RELU, "relu"},
    {Activation::FATRELU, "fatrelu"},
};

// "%s" is replaced by the architecture name; keys without it are global.
struct KeyRow { Key key; const char* fmt; };
constexpr KeyRow kKeys[] = {
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
    {Key::PWI_SPARSE_THRESHOLD, "powerinfer.sparse_threshold"},
    {Key::CHAT_TEMPLATE, "tokenizer.chat_template"},
};

// "%d" is the layer index for per-layer tensors.
struct TensorRow { TensorName t; const char* fmt; };
constexpr TensorRow kTensors[] = {
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

}  // namespace

const char* arch_name(Arch a) {
    for (const auto& r : kArchs)
        if (r.arch == a) return r.name;
    return "unknown";
}

bool arch_from_name(const std::string& s, Arch* out) {
    for (const auto& r : kArchs)
        if (s == r.name) { *out = r.arch; return true; }
    return false;
}

const char* activation_name(Activation a) {
    for (const auto& r : kActs)
        if (r.act == a) return r.name;
    return "unknown";
}

bool activation_from_name(const std::string& s, Activation* out) {
    for (const auto& r : kActs)
        if (s == r.name) { *out = r.act; return true; }
    return false;
}

std::string key(Arch a, Key k) {
    for (const auto& r : kKeys) {
        if (r.key != k) continue;
        std::string fmt = r.fmt;
        auto pos = fmt.find("%s");
        if (pos != std::string::npos) fmt.replace(pos, 2, arch_name(a));
        return fmt;
    }
    fail("internal error: metadata key missing from the table");
}

std::string tensor_name(TensorName t, int layer) {
    for (const auto& r : kTensors) {
        if (r.t != t) continue;
        std::string fmt = r.fmt;
        auto pos = fmt.find("%d");
        if (pos != std::string::npos) fmt.replace(pos, 2, std::to_string(layer));
        return fmt;
    }
    fail("internal error: tensor name missing from the table");
}

}  // namespace ps

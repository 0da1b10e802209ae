// The tables that map architectures, metadata keys and tensor names to their GGUF strings
// (llama.cpp's llama-arch.cpp, plus our prosparse.* namespace). Nothing else spells a key.
#pragma once

#include <string>

namespace ps {

enum class Arch { LLAMA, MINICPM };
enum class Activation { SILU, RELU, FATRELU };

enum class Key {
    GENERAL_ARCHITECTURE, GENERAL_NAME,
    CONTEXT_LENGTH, EMBEDDING_LENGTH, BLOCK_COUNT, FEED_FORWARD_LENGTH,
    HEAD_COUNT, HEAD_COUNT_KV, RMS_EPS, ROPE_FREQ_BASE, ROPE_DIMENSION_COUNT,
    ROPE_SCALING_TYPE, ROPE_SCALING_FACTOR, VOCAB_SIZE,
    EMBEDDING_SCALE, RESIDUAL_SCALE, LOGIT_SCALE,              // minicpm.*
    PS_ACTIVATION, PS_ACTIVATION_THRESHOLD, PS_LAYER_THRESHOLDS, PS_NEURON_ORDER,
    PS_PREDICTOR_THRESHOLD, PS_PREDICTOR_LAYER_THRESHOLDS, PS_PREDICTOR_ALWAYS_ON,  // prosparse.*
    PWI_SPARSE_THRESHOLD,                                       // powerinfer.*
    CHAT_TEMPLATE,
};

enum class TensorName {
    TOKEN_EMBD, OUTPUT_NORM, OUTPUT,
    ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT,
    FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, FFN_DOWN_T, FC1, FC2, FFN_ACT_FREQ,
};

const char* arch_name(Arch a);
bool arch_from_name(const std::string& s, Arch* out);
const char* activation_name(Activation a);
bool activation_from_name(const std::string& s, Activation* out);

// The full key, e.g. key(Arch::LLAMA, Key::BLOCK_COUNT) == "llama.block_count".
std::string key(Arch a, Key k);
// The full tensor name, e.g. tensor_name(TensorName::ATTN_Q, 3) == "blk.3.attn_q.weight".
std::string tensor_name(TensorName t, int layer = -1);

}  // namespace ps

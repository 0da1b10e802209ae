#include "kv_cache.h"

#include <cstdlib>
#include <cstring>

#include "common.h"

namespace ps {

const char* kv_type_name(KvType t) {
    switch (t) {
        case KvType::F32: return "f32";
        case KvType::F16: return "f16";
        case KvType::Q8_0: return "q8_0";
    }
    return "?";
}

bool kv_type_from_name(const std::string& name, KvType* out) {
    for (KvType t : {KvType::F32, KvType::F16, KvType::Q8_0})
        if (name == kv_type_name(t)) {
            *out = t;
            return true;
        }
    return false;
}

GgmlType kv_ggml_type(KvType t) {
    switch (t) {
        case KvType::F32: return GgmlType::F32;
        case KvType::F16: return GgmlType::F16;
        case KvType::Q8_0: return GgmlType::Q8_0;
    }
    return GgmlType::F32;
}

size_t kv_cache_bytes(KvType t, int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq) {
    return 2 * size_t(n_layer) * size_t(n_seq) * size_t(n_head_kv) * size_t(n_ctx) *
           row_bytes(kv_ggml_type(t), head_dim);
}

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq, KvType type)
    : n_layer_(n_layer), n_head_kv_(n_head_kv), head_dim_(head_dim), n_ctx_(n_ctx), n_seq_(n_seq), type_(type),
      row_bytes_(0), head_bytes_(0), k_(nullptr, std::free), v_(nullptr, std::free) {
    if (n_layer < 1 || n_head_kv < 1 || head_dim < 1 || n_ctx < 1 || n_seq < 1)
        fail(strfmt("invalid KV cache shape: %d layers, %d heads of %d, %d positions, %d sequences", n_layer,
                    n_head_kv, head_dim, n_ctx, n_seq));
    if (type == KvType::Q8_0 && head_dim % QK != 0)
        fail(strfmt("a q8_0 KV cache needs a head size that is a multiple of %d, this model's is %d", QK, head_dim));
    row_bytes_ = ps::row_bytes(kv_ggml_type(type), head_dim);
    head_bytes_ = size_t(n_ctx) * row_bytes_;
    const size_t half = bytes() / 2;
    for (auto* buf : {&k_, &v_}) {
        buf->reset(static_cast<uint8_t*>(std::malloc(half)));
        if (!*buf) fail(strfmt("out of memory allocating the KV cache (%zu MB)", bytes() >> 20));
    }
}

KvCache::~KvCache() = default;

size_t KvCache::bytes() const {
    return kv_cache_bytes(type_, n_layer_, n_head_kv_, head_dim_, n_ctx_, n_seq_);
}

void KvCache::store(int layer, int seq, int pos, const float* k, const float* v) {
    if (layer < 0 || layer >= n_layer_ || seq < 0 || seq >= n_seq_ || pos < 0 || pos >= n_ctx_)
        fail(strfmt("KV cache slot (layer %d, sequence %d, position %d) is out of range", layer, seq, pos));
    const GgmlType t = kv_ggml_type(type_);
    for (int h = 0; h < n_head_kv_; ++h) {
        const size_t dst = offset(layer, seq, h) + size_t(pos) * row_bytes_;
        quantize_row(t, k + size_t(h) * head_dim_, k_.get() + dst, head_dim_);
        quantize_row(t, v + size_t(h) * head_dim_, v_.get() + dst, head_dim_);
    }
}

}  // namespace ps

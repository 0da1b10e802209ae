#include "kv_cache.h"

#include <cstdlib>
#include <cstring>

#include "common.h"

namespace ps {

const char* kv_type_name(KvType t) {
    switch (t) {
        case KvType::F32: return "f32";
    }
    return "?";
}

namespace {

float* alloc_floats(size_t n) {
    if (n == 0) return nullptr;
    auto* p = static_cast<float*>(std::malloc(n * sizeof(float)));
    if (!p) fail(strfmt("out of memory allocating the KV cache (%zu MB)", n * sizeof(float) >> 20));
    return p;
}

}  // namespace

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq, KvType type)
    : n_layer_(n_layer), n_head_kv_(n_head_kv), head_dim_(head_dim), n_ctx_(n_ctx), n_seq_(n_seq), type_(type),
      head_stride_(size_t(n_ctx) * size_t(head_dim)), k_(nullptr, std::free), v_(nullptr, std::free) {
    if (n_layer < 1 || n_head_kv < 1 || head_dim < 1 || n_ctx < 1 || n_seq < 1)
        fail(strfmt("invalid KV cache shape: %d layers, %d heads of %d, %d positions, %d sequences", n_layer,
                    n_head_kv, head_dim, n_ctx, n_seq));
    const size_t n = size_t(n_layer) * size_t(n_seq) * size_t(n_head_kv) * head_stride_;
    k_.reset(alloc_floats(n));
    v_.reset(alloc_floats(n));
}

KvCache::~KvCache() = default;

size_t KvCache::bytes() const {
    return 2 * size_t(n_layer_) * size_t(n_seq_) * size_t(n_head_kv_) * head_stride_ * sizeof(float);
}

void KvCache::store(int layer, int seq, int pos, const float* k, const float* v) {
    if (layer < 0 || layer >= n_layer_ || seq < 0 || seq >= n_seq_ || pos < 0 || pos >= n_ctx_)
        fail(strfmt("KV cache slot (layer %d, sequence %d, position %d) is out of range", layer, seq, pos));
    for (int h = 0; h < n_head_kv_; ++h) {
        const size_t dst = offset(layer, seq, h) + size_t(pos) * size_t(head_dim_);
        std::memcpy(k_.get() + dst, k + size_t(h) * head_dim_, sizeof(float) * size_t(head_dim_));
        std::memcpy(v_.get() + dst, v + size_t(h) * head_dim_, sizeof(float) * size_t(head_dim_));
    }
}

}  // namespace ps

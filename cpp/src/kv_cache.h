// The KV cache: for every layer, sequence and KV head, the keys and values of n_ctx positions,
// [layer][seq][kv head][pos][head_dim]. One head's history is contiguous over positions:
// attention streams it, where a [pos][head] order put consecutive positions of a head 4 KB+ apart.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace ps {

enum class KvType { F32 };
const char* kv_type_name(KvType t);

class KvCache {
public:
    KvCache(int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq, KvType type);
    ~KvCache();
    KvCache(const KvCache&) = delete;
    KvCache& operator=(const KvCache&) = delete;

    KvType type() const { return type_; }
    int n_ctx() const { return n_ctx_; }
    int n_seq() const { return n_seq_; }
    size_t bytes() const;

    // Stores one token's keys and values ([n_head_kv][head_dim] each) at (layer, seq, pos).
    void store(int layer, int seq, int pos, const float* k, const float* v);
    // One head's [pos][head_dim] history.
    const float* keys(int layer, int seq, int kv_head) const { return k_.get() + offset(layer, seq, kv_head); }
    const float* values(int layer, int seq, int kv_head) const { return v_.get() + offset(layer, seq, kv_head); }

private:
    size_t offset(int layer, int seq, int kv_head) const {
        return ((size_t(layer) * n_seq_ + size_t(seq)) * n_head_kv_ + size_t(kv_head)) * head_stride_;
    }
    int n_layer_, n_head_kv_, head_dim_, n_ctx_, n_seq_;
    KvType type_;
    size_t head_stride_;  // n_ctx * head_dim
    // Uninitialised storage: the cache may be gigabytes, and untouched pages cost nothing.
    std::unique_ptr<float, void (*)(void*)> k_, v_;
};

}  // namespace ps

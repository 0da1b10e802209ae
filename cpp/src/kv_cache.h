// The KV cache: for every layer, sequence and KV head, the keys and values of n_ctx positions,
// [layer][seq][kv head][pos][head_dim], each position's head_dim values one row of the cache's
// type (f32, f16, or q8_0 blocks of 32, as llama.cpp's -ctk/-ctv). One head's history is
// contiguous over positions: attention streams it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "quant.h"

namespace ps {

enum class KvType { F32, F16, Q8_0 };
const char* kv_type_name(KvType t);
bool kv_type_from_name(const std::string& name, KvType* out);
GgmlType kv_ggml_type(KvType t);
// Bytes of a KV cache of this shape, without allocating it.
size_t kv_cache_bytes(KvType t, int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq);

class KvCache {
public:
    KvCache(int n_layer, int n_head_kv, int head_dim, int n_ctx, int n_seq, KvType type);
    ~KvCache();
    KvCache(const KvCache&) = delete;
    KvCache& operator=(const KvCache&) = delete;

    KvType type() const { return type_; }
    int n_ctx() const { return n_ctx_; }
    int n_seq() const { return n_seq_; }
    int head_dim() const { return head_dim_; }
    size_t bytes() const;
    size_t row_bytes() const { return row_bytes_; }  // one position of one head

    // Stores one token's keys and values ([n_head_kv][head_dim] f32 each) at (layer, seq, pos),
    // rounded to the cache's type.
    void store(int layer, int seq, int pos, const float* k, const float* v);
    // One head's history: position p's row at keys(...) + p * row_bytes().
    const uint8_t* keys(int layer, int seq, int kv_head) const { return k_.get() + offset(layer, seq, kv_head); }
    const uint8_t* values(int layer, int seq, int kv_head) const { return v_.get() + offset(layer, seq, kv_head); }

private:
    size_t offset(int layer, int seq, int kv_head) const {
        return ((size_t(layer) * n_seq_ + size_t(seq)) * n_head_kv_ + size_t(kv_head)) * head_bytes_;
    }
    int n_layer_, n_head_kv_, head_dim_, n_ctx_, n_seq_;
    KvType type_;
    size_t row_bytes_;   // head_dim values of the type
    size_t head_bytes_;  // n_ctx rows
    // Uninitialised storage: the cache may be gigabytes, and untouched pages cost nothing.
    std::unique_ptr<uint8_t, void (*)(void*)> k_, v_;
};

}  // namespace ps

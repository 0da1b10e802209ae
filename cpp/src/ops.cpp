// matmul and the sparse row operations: activations converted once, then fixed-size pieces of
// work handed to the pool. Each piece writes only its own outputs (or its own partial-sum buffer).
#include "ops.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "cpu/kernels.h"

namespace ps {

namespace {

constexpr int64_t kRowChunk = 32;      // weight rows per matmul task, at least ...
constexpr int64_t kChunkBytes = 128 << 10;  // ... and about this many weight bytes: one task streams
                                            // a long contiguous run (short rows, e.g. SmolLM2's 360 B,
                                            // made 11 KB tasks: +17% decode at 128 KB); a matrix
                                            // under it is one task, run by the caller alone

void check_weight(const Tensor& W, const char* op) {
    if (W.n_dims > 2 || W.ne[2] != 1 || W.ne[3] != 1)
        fail(strfmt("%s: tensor '%s' is not 2-D", op, W.name.c_str()));
    if (!cpu::has_kernels(W.type))
        fail(strfmt("%s: tensor '%s' has type %s, which has no kernel", op, W.name.c_str(), type_name(W.type)));
    const int64_t block = cpu::traits(W.type).block;
    if (W.ne[0] % block != 0)
        fail(strfmt("%s: tensor '%s' has rows of %lld, not a multiple of %lld", op, W.name.c_str(),
                    (long long)W.ne[0], (long long)block));
}

// Every listed row in range; with `ascending`, also strictly ascending (the axpy's neuron groups).
void check_rows(const Tensor& W, const int32_t* rows, int64_t n, const char* op, bool ascending = false) {
    if (n < 0) fail(strfmt("%s: negative row count %lld", op, (long long)n));
    if (!rows) {
        if (n > W.ne[1])
            fail(strfmt("%s: %lld rows requested from '%s', which has %lld", op, (long long)n,
                        W.name.c_str(), (long long)W.ne[1]));
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        if (rows[i] < 0 || rows[i] >= W.ne[1])
            fail(strfmt("%s: row index %d out of range [0, %lld) for '%s'", op, rows[i],
                        (long long)W.ne[1], W.name.c_str()));
        if (ascending && i > 0 && rows[i] <= rows[i - 1])
            fail(strfmt("%s: row indices for '%s' are not ascending", op, W.name.c_str()));
    }
}

// Converts every token's activation row once into scratch; returns the converted row stride.
size_t convert_acts(ThreadPool& pool, const cpu::KernelSet& ks, GgmlType type, int64_t k,
                    const float* X, int64_t n_tokens, std::vector<uint8_t>& scratch) {
    const size_t xs = cpu::act_row_bytes(type, k);
    if (scratch.size() < xs * size_t(n_tokens)) scratch.resize(xs * size_t(n_tokens));
    uint8_t* xa = scratch.data();
    pool.parallel_for(n_tokens, [&](int64_t t, int) { ks.quantize_act(type, X + t * k, xa + size_t(t) * xs, k); });
    return xs;
}

void gemm_chunks(ThreadPool& pool, const Tensor& W, const int32_t* rows, int64_t n, const float* X,
                 int64_t n_tokens, float* Y, std::vector<uint8_t>& scratch) {
    if (n == 0 || n_tokens <= 0) return;
    const bool interleaved = W.layout == RowLayout::INTERLEAVED8;
    if (interleaved && (rows || n != W.ne[1]))
        fail(strfmt("tensor '%s' is stored interleaved: only whole-matrix products can read it", W.name.c_str()));
    const cpu::KernelSet& ks = cpu::kernels();
    const int64_t k = W.ne[0];
    const size_t xs = convert_acts(pool, ks, W.type, k, X, n_tokens, scratch);
    const uint8_t* xa = scratch.data();
    const size_t stride = W.row_stride();
    // Each row's result comes from one tile whatever the chunk, so this choice never changes
    // results; chunks hold whole tiles (4 rows) and whole pairs of interleaved groups (16: the
    // AVX-512 batch tiles take two groups at once, and a 7B row of 2304 bytes made 7-group
    // chunks, one group in seven through the narrower tile).
    const int64_t rc = std::max<int64_t>(kRowChunk, (kChunkBytes / int64_t(stride) + 15) / 16 * 16);
    const int64_t n_chunks = (n + rc - 1) / rc;
    pool.parallel_for(n_chunks, [&](int64_t ch, int) {
        const int64_t i0 = ch * rc, cnt = std::min(rc, n - i0);
        if (interleaved)
            ks.gemm_interleaved(W.type, k, W.data + size_t(i0) * stride, cnt / cpu::kGroupRows, xa, xs,
                                n_tokens, Y + i0, n);
        else if (rows)
            ks.gemm_rows(W.type, k, W.data, stride, rows + i0, cnt, xa, xs, n_tokens, Y + i0, n);
        else
            ks.gemm(W.type, k, W.data + size_t(i0) * stride, stride, cnt, xa, xs, n_tokens, Y + i0, n);
    });
}

}  // namespace

void matmul(ThreadPool& pool, const Tensor& W, const float* X, int64_t n_tokens, float* Y,
            std::vector<uint8_t>& scratch) {
    check_weight(W, "matmul");
    gemm_chunks(pool, W, nullptr, W.ne[1], X, n_tokens, Y, scratch);
}

void matmul_rows(ThreadPool& pool, const Tensor& W, const int32_t* rows, int64_t n,
                 const float* X, int64_t n_tokens, float* Y, std::vector<uint8_t>& scratch) {
    check_weight(W, "matmul_rows");
    check_rows(W, rows, n, "matmul_rows");
    gemm_chunks(pool, W, rows, n, X, n_tokens, Y, scratch);
}

void axpy_rows(ThreadPool& pool, const Tensor& W, const int32_t* rows, int64_t n, const float* C,
               int64_t n_tokens, float* Y) {
    check_weight(W, "axpy_rows");
    if (W.layout != RowLayout::PLAIN)
        fail(strfmt("axpy_rows: tensor '%s' is stored interleaved", W.name.c_str()));
    check_rows(W, rows, n, "axpy_rows", true);
    if (n_tokens <= 0) return;
    const cpu::KernelSet& ks = cpu::kernels();
    const int64_t k = W.ne[0];
    // Columns are independent and every column's sum has the kernel's fixed grouping, so each
    // task owns a slice of the output columns for every token: no partial buffers, no reduction,
    // and the slicing never changes a result. One slice per thread: each row's part then streams
    // in one long run, and a batch's per-panel work (coefficient lists, prefetches) is done once
    // per thread. Batches had 128-column slices; one per thread measured faster (Intel host, 2
    // threads, alternating runs: the 7B 4-sequence predict step 194-195 ms against 199-230, its
    // ffn_down_t share 22% -> 13%; 64-token ffn_down_t products of Q4_0/Q8_0 19-42% faster).
    // Slices start at block boundaries (32 weights, 256 for the K-quants; float types use 32).
    const int64_t block = std::max<int64_t>(QK, cpu::traits(W.type).block);
    auto round_up = [&](int64_t v) { return (v + block - 1) / block * block; };
    const int64_t col_chunk = std::max(block, round_up((k + pool.size() - 1) / pool.size()));
    const int64_t n_col_chunks = (k + col_chunk - 1) / col_chunk;
    if (n == 0) return;
    pool.parallel_for(n_col_chunks, [&](int64_t ch, int) {
        const int64_t j0 = ch * col_chunk, len = std::min(col_chunk, k - j0);
        ks.axpy_rows(W.type, len, W.data + cpu::weight_bytes(W.type, j0), W.row_stride(), rows, n, C, n,
                     n_tokens, Y + j0, k);
    });
}

Tensor row_range(const Tensor& W, int64_t begin, int64_t end) {
    if (W.n_dims > 2 || begin < 0 || end < begin || end > W.ne[1])
        fail(strfmt("rows [%lld, %lld) of '%s' are out of range", (long long)begin, (long long)end, W.name.c_str()));
    Tensor v = W;
    v.ne[1] = end - begin;
    if (W.layout == RowLayout::INTERLEAVED8) {
        if (begin % cpu::kGroupRows || (end % cpu::kGroupRows && end != W.ne[1]))
            fail(strfmt("rows [%lld, %lld) of the interleaved '%s' split one of its 8-row groups", (long long)begin,
                        (long long)end, W.name.c_str()));
        const size_t gb = cpu::group_bytes(W.type, W.ne[0]);
        v.data = W.data + size_t(begin / cpu::kGroupRows) * gb;
        v.nbytes = size_t((end - begin) / cpu::kGroupRows) * gb;
    } else {
        v.data = W.data + size_t(begin) * W.row_stride();
        v.nbytes = size_t(end - begin) * W.row_stride();
    }
    return v;
}

bool can_interleave(const Tensor& W) {
    return W.layout == RowLayout::PLAIN && W.n_dims == 2 && cpu::can_interleave(W.type, W.ne[0], W.ne[1]);
}

std::unique_ptr<InterleavedSet> interleave(ThreadPool& pool, const std::vector<const Tensor*>& ws) {
    // One block for all: a model has hundreds of matrices (SmolLM2: 211), and a 2 MiB-aligned
    // block each would hold a huge page for every small one (600 MB resident for a 100 MB model).
    constexpr size_t kAlign = 64;
    std::vector<size_t> offset;
    size_t total = 0;
    for (const Tensor* W : ws) {
        if (!can_interleave(*W)) fail(strfmt("tensor '%s' cannot be interleaved", W->name.c_str()));
        offset.push_back(total);
        const size_t bytes = size_t(W->ne[1] / cpu::kGroupRows) * cpu::group_bytes(W->type, W->ne[0]);
        total += (bytes + kAlign - 1) / kAlign * kAlign;
    }
    auto out = std::make_unique<InterleavedSet>();
    if (ws.empty()) return out;
    // 2 MiB alignment and MADV_HUGEPAGE: fewer page faults while copying, fewer TLB misses after.
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t alloc = (total + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, alloc);
    if (!p) fail(strfmt("out of memory for the interleaved weights (%zu MB)", total >> 20));
    out->buf = {static_cast<uint8_t*>(p), std::free};
#if defined(MADV_HUGEPAGE)
    ::madvise(p, alloc, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    constexpr int64_t kGroupsPerTask = 16;
    for (size_t i = 0; i < ws.size(); ++i) {
        const Tensor& W = *ws[i];
        const int64_t k = W.ne[0], n_groups = W.ne[1] / cpu::kGroupRows;
        const size_t stride = W.row_stride(), gb = cpu::group_bytes(W.type, k);
        uint8_t* dst = out->buf.get() + offset[i];
        pool.parallel_for((n_groups + kGroupsPerTask - 1) / kGroupsPerTask, [&](int64_t task, int) {
            const int64_t g0 = task * kGroupsPerTask, cnt = std::min(kGroupsPerTask, n_groups - g0);
            cpu::interleave_rows(W.type, k, W.data + size_t(g0) * cpu::kGroupRows * stride, stride, cnt,
                                 dst + size_t(g0) * gb);
        });
        Tensor t = W;
        t.layout = RowLayout::INTERLEAVED8;
        t.data = dst;
        t.nbytes = size_t(n_groups) * gb;
        out->tensors.push_back(std::move(t));
    }
    return out;
}

uint64_t read_sweep(ThreadPool& pool, const uint64_t* buf, size_t n) {
    const int T = pool.size();
    std::vector<uint64_t> sums(size_t(T), 0);
    pool.parallel_for(T, [&](int64_t task, int) {
        const size_t b = n * size_t(task) / size_t(T) / 8 * 8, e = n * size_t(task + 1) / size_t(T) / 8 * 8;
        uint64_t a[8] = {};
        for (size_t i = b; i < e; i += 8) {
            __builtin_prefetch(buf + std::min(i + 1024, n - 1));
            for (int j = 0; j < 8; ++j) a[j] += buf[i + size_t(j)];
        }
        uint64_t s = 0;
        for (int j = 0; j < 8; ++j) s += a[j];
        sums[size_t(task)] = s;
    });
    uint64_t s = 0;
    for (uint64_t x : sums) s += x;
    return s;
}

}  // namespace ps

// The GPU half of the hybrid (gpu_model.h): device copies of the placed weights, the device KV
// cache, and the host side of the GPU's work (staging through pinned memory, one stream, events).
#include "cuda/gpu_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "common.h"
#include "cuda/device.h"
#include "cuda/kernels.h"
#include "gguf.h"
#include "ops.h"

namespace ps {

using cuda::CudaEvent;
using cuda::CudaStream;
using cuda::DeviceBuffer;
using cuda::PinnedBuffer;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// One weight matrix's rows [0, nr) on the device, in the file's row layout.
struct DevMatrix {
    DeviceBuffer buf;
    GgmlType type = GgmlType::F32;
    int64_t k = 0, nr = 0;  // row length, rows
    size_t stride = 0;      // bytes per row
    const void* data() const { return buf.data(); }
};

float* f32(const DeviceBuffer& b) { return static_cast<float*>(b.data()); }

template <class T>
T* as(const DeviceBuffer& b) { return static_cast<T*>(b.data()); }

}  // namespace

struct GpuModel::Impl {
    GpuModelConfig cfg;
    const HParams& hp;
    int dev;
    CudaStream stream;
    CudaEvent start, done;  // around each piece of queued work: GPU time, and what the host waits on
    GpuStats stats;

    struct Layer {
        bool attention = false;
        int64_t n_hot = 0;
        DevMatrix wq, wk, wv, wo, gate, up, down_t, fc1, fc2;  // fc1/fc2: resident with predict
        DeviceBuffer attn_norm, ffn_norm, kc, vc;
    };
    std::vector<Layer> layers;
    bool output_placed = false;
    bool resident = false;
    // PROSPARSE_CUDA_GRAPHS=1: a resident model's decode step runs as one CUDA graph
    bool use_graphs = false;
    cuda::CudaGraph decode_graph;
    std::vector<float> graph_act_t;  // the layers' activation thresholds the graph was recorded with
    DevMatrix output;

    // Scratch for n_batch tokens, on the device and pinned on the host.
    int nb = 0;
    int64_t max_hot = 0;
    DeviceBuffer x, xn, q, k, v, attn, branch, xa_a, xa_b, coef, active, counts, down_scratch, attn_scratch, y, logit, rope_cs,
        pos, seq, logits, hid;
    PinnedBuffer h_in, h_logit, h_out, h_pos, h_seq, h_rope, h_counts;

    // The FFN call prepare() queued, for accumulate().
    struct Pending {
        bool queued = false;
        FfnCall call;
        int layer = -1;
        int64_t n_hot = 0;
    } pending;
    // Work queued that no wait has covered yet, so its pinned buffers may still be read or
    // written by a copy: busy for the per-call buffers, batch_busy for begin_batch's. Every piece
    // of work ends in a wait that covers everything queued before it, so these only matter after
    // an exception left work unwaited (between prepare and accumulate, say).
    bool busy = false, batch_busy = false;

    // Before the host writes a per-call pinned buffer.
    void drain() {
        if (!busy) return;
        stream.synchronize();
        busy = batch_busy = false;
        pending.queued = false;
    }
    void waited() { busy = batch_busy = false; }

    explicit Impl(const GpuModelConfig& c)
        : cfg(c), hp(*c.hp), dev(c.device), stream(c.device), start(c.device), done(c.device) {
        const char* env = std::getenv("PROSPARSE_CUDA_GRAPHS");
        use_graphs = env && std::string(env) == "1";
    }

    int layer_of(const LayerWeights* L) const {
        const auto& ls = *cfg.layers;
        for (size_t i = 0; i < ls.size(); ++i)
            if (&ls[i] == L) return int(i);
        fail("GPU executor: a layer this model does not have");
    }

    // The file-layout tensor behind a weight (an interleaved copy has the file's name).
    const Tensor& plain(const Tensor* t) const {
        if (t->layout == RowLayout::PLAIN) return *t;
        const Tensor* f = cfg.file->tensor(t->name);
        if (!f || f->layout != RowLayout::PLAIN || f->type != t->type || f->ne[0] != t->ne[0] || f->ne[1] != t->ne[1])
            fail(strfmt("GPU: no file-layout copy of tensor '%s' to upload", t->name.c_str()));
        return *f;
    }

    DevMatrix upload(const Tensor* t, int64_t rows) {
        const Tensor& p = plain(t);
        if (!cuda::kernel_type_supported(p.type))
            fail(strfmt("GPU: tensor '%s' has type %s, which the GPU kernels do not compute with", p.name.c_str(),
                        type_name(p.type)));
        if (rows < 0 || rows > p.nrows()) fail(strfmt("GPU: %lld rows of tensor '%s'", (long long)rows, p.name.c_str()));
        DevMatrix m;
        m.type = p.type;
        m.k = p.ne[0];
        m.nr = rows;
        m.stride = p.row_stride();
        m.buf = DeviceBuffer(dev, m.stride * size_t(rows));
        m.buf.upload(p.data, m.stride * size_t(rows));
        stats.resident_bytes += double(m.stride * size_t(rows));
        return m;
    }

    DeviceBuffer upload_floats(const std::vector<float>& v) {
        DeviceBuffer b(dev, v.size() * sizeof(float));
        b.upload(v.data(), v.size() * sizeof(float));
        stats.resident_bytes += double(b.size());
        return b;
    }

    DeviceBuffer alloc(size_t bytes) {
        DeviceBuffer b(dev, std::max<size_t>(bytes, 16));
        stats.resident_bytes += double(b.size());
        return b;
    }

    void load();
    void alloc_scratch();
    // xa := x (nt rows of k, ldx apart) converted for weights of type w
    void quantize(GgmlType w, int64_t k, const float* x, int64_t ldx, int nt, void* xa) {
        cuda::quantize_act(w, k, x, ldx, nt, xa, stream.handle());
    }
    // Y (ldy) = W . x for the nt rows of x (k = W.k floats each): quantizes into xa first
    void matmul(const DevMatrix& W, const float* x, int nt, float* Y, int64_t ldy, void* xa) {
        quantize(W.type, W.k, x, W.k, nt, xa);
        cuda::gemm(W.type, W.k, W.data(), W.stride, W.nr, xa, nt, Y, ldy, stream.handle());
    }
    // Queued work is finished: the host waits (blocking), and the GPU's time is counted.
    void finish() {
        done.record(stream);
        const auto t0 = Clock::now();
        done.wait();
        waited();
        stats.cpu_wait_seconds += since(t0);
        stats.gpu_busy_seconds += done.seconds_since(start);
    }
    void queue_attention(int il, int nt);
    double attention_bytes(int il) const;
    void queue_resident(int nt);
    void launch_decode_graph();
    void queue_ffn_kernels(int il, int nt, const float* pred_logit, int64_t ld_logit);
    void count_ffn(int il, FfnLayerStats& st, bool predictor_here);
    void queue_ffn(const FfnCall& call, int il, int64_t n_hot);
    void recall_on_cpu(const FfnCall& call, int64_t n_hot);
    void take_ffn(float* out);
};

void GpuModel::Impl::load() {
    const Placement& pl = *cfg.placement;
    const auto& L = *cfg.layers;
    if (pl.layers.size() != L.size()) fail("GPU: the placement does not match the model's layers");
    cuda::ScopedDevice on(dev);
    layers.resize(L.size());
    for (size_t il = 0; il < L.size(); ++il) {
        const LayerWeights& w = L[il];
        Layer& d = layers[il];
        d.attention = pl.layers[il].attention_on_gpu;
        d.n_hot = pl.layers[il].n_hot;
        max_hot = std::max(max_hot, d.n_hot);
        if (d.attention) {
            d.wq = upload(w.wq, w.wq->ne[1]);
            d.wk = upload(w.wk, w.wk->ne[1]);
            d.wv = upload(w.wv, w.wv->ne[1]);
            d.wo = upload(w.wo, w.wo->ne[1]);
            d.attn_norm = upload_floats((*cfg.attn_norm)[il]);
            const size_t kv_half = kv_cache_bytes(cfg.kv_type, 1, hp.n_head_kv, hp.head_dim, cfg.n_ctx, cfg.n_seq) / 2;
            d.kc = alloc(kv_half);
            d.vc = alloc(kv_half);
        }
        if (d.n_hot > 0) {
            if (!w.ffn_down_t)
                fail(strfmt("GPU: layer %zu's FFN has no ffn_down_t, which the GPU's down projection needs", il));
            d.gate = upload(w.ffn_gate, d.n_hot);
            d.up = upload(w.ffn_up, d.n_hot);
            d.down_t = upload(w.ffn_down_t, d.n_hot);
        }
    }
    output_placed = pl.output_on_gpu;
    if (output_placed) output = upload(cfg.output, cfg.output->ne[1]);
    const bool predict = cfg.ffn_opt->strategy == FfnStrategy::PREDICT;
    resident = cfg.allow_resident && output_placed && !(predict && cfg.ffn_opt->diag_recall);
    for (size_t il = 0; il < L.size(); ++il)
        resident = resident && layers[il].attention && layers[il].n_hot == hp.n_ff && (!predict || L[il].fc1);
    if (resident)
        for (size_t il = 0; il < L.size(); ++il) {
            layers[il].ffn_norm = upload_floats((*cfg.ffn_norm)[il]);
            if (predict) {
                layers[il].fc1 = upload(L[il].fc1, L[il].fc1->ne[1]);
                layers[il].fc2 = upload(L[il].fc2, L[il].fc2->ne[1]);
            }
        }
    alloc_scratch();
}

void GpuModel::Impl::alloc_scratch() {
    nb = cfg.n_batch;
    const size_t n = size_t(nb);
    const int64_t E = hp.n_embd, H = int64_t(hp.n_head) * hp.head_dim, KV = int64_t(hp.n_head_kv) * hp.head_dim;
    size_t act = 0;  // the largest converted activation row any upload needs
    auto need = [&](const DevMatrix& m) {
        if (m.nr) act = std::max(act, cuda::act_bytes(m.type, m.k));
    };
    for (const Layer& d : layers)
        for (const DevMatrix* m : {&d.wq, &d.wk, &d.wv, &d.wo, &d.gate, &d.up, &d.fc1, &d.fc2}) need(*m);
    int64_t R = 0;  // the predictor's rank
    for (const Layer& d : layers) R = std::max(R, d.fc1.nr);
    need(output);
    x = alloc(n * E * 4); xn = alloc(n * E * 4); branch = alloc(n * E * 4); y = alloc(n * E * 4);
    q = alloc(n * H * 4); attn = alloc(n * H * 4); k = alloc(n * KV * 4); v = alloc(n * KV * 4);
    xa_a = alloc(n * act); xa_b = alloc(n * act);
    coef = alloc(n * size_t(max_hot) * 4); logit = alloc(n * size_t(max_hot) * 4);
    active = alloc(size_t(max_hot));
    counts = alloc(layers.size() * 4 * sizeof(int32_t));
    hid = alloc(n * size_t(R) * 4);
    down_scratch = alloc(max_hot ? cuda::ffn_down_scratch_bytes(E, max_hot) : 0);
    bool any_attention = false;
    for (const Layer& d : layers) any_attention = any_attention || d.attention;
    attn_scratch = alloc(any_attention ? cuda::attention_scratch_bytes(hp.n_head, hp.head_dim, cfg.n_ctx, nb) : 0);
    rope_cs = alloc(n * size_t(hp.n_rot) * 4);
    pos = alloc(n * 4); seq = alloc(n * 4);
    if (output_placed) logits = alloc(n * size_t(hp.n_vocab) * 4);
    const size_t in = n * size_t(std::max<int64_t>(E, 1)) * 4;
    h_in = PinnedBuffer(in);
    h_logit = PinnedBuffer(std::max<size_t>(n * size_t(max_hot) * 4, 16));
    h_out = PinnedBuffer(n * size_t(std::max<int64_t>(E, output_placed ? hp.n_vocab : 0)) * 4);
    h_pos = PinnedBuffer(n * 4); h_seq = PinnedBuffer(n * 4);
    h_rope = PinnedBuffer(std::max<size_t>(n * size_t(hp.n_rot) * 4, 16));
    h_counts = PinnedBuffer(layers.size() * 4 * sizeof(int32_t));
}

GpuModel::GpuModel(const GpuModelConfig& cfg) : impl_(std::make_unique<Impl>(cfg)) { impl_->load(); }
GpuModel::~GpuModel() {
    // nothing queued may outlive the buffers it reads (cudaFree would wait, the pinned memory not)
    try {
        if (impl_ && (impl_->busy || impl_->batch_busy)) impl_->stream.synchronize();
    } catch (...) {
    }
}

bool GpuModel::resident() const { return impl_->resident; }
bool GpuModel::attention_on_gpu(int layer) const { return impl_->layers.at(size_t(layer)).attention; }
int64_t GpuModel::n_hot(int layer) const { return impl_->layers.at(size_t(layer)).n_hot; }
bool GpuModel::output_on_gpu() const { return impl_->output_placed; }
const GpuStats& GpuModel::stats() const { return impl_->stats; }

void GpuModel::begin_batch(const TokenBatch& batch, const float* rope_cs) {
    Impl& g = *impl_;
    if (batch.n < 1 || batch.n > g.nb) fail(strfmt("GPU: a batch of %d tokens (at most %d)", batch.n, g.nb));
    for (int t = 0; t < batch.n; ++t)
        if (batch.seq[t] < 0 || batch.seq[t] >= g.cfg.n_seq || batch.pos[t] < 0 || batch.pos[t] >= g.cfg.n_ctx)
            fail(strfmt("GPU: token %d at (sequence %d, position %d) is outside the cache", t, batch.seq[t], batch.pos[t]));
    cuda::ScopedDevice on(g.dev);
    if (g.batch_busy || g.busy) {
        g.stream.synchronize();
        g.waited();
        g.pending.queued = false;
    }
    g.batch_busy = true;
    const size_t n = size_t(batch.n);
    std::memcpy(g.h_pos.data(), batch.pos, n * 4);
    std::memcpy(g.h_seq.data(), batch.seq, n * 4);
    std::memcpy(g.h_rope.data(), rope_cs, n * size_t(g.hp.n_rot) * 4);
    cuda::copy_to_device(g.pos.data(), g.h_pos.data(), n * 4, g.stream);
    cuda::copy_to_device(g.seq.data(), g.h_seq.data(), n * 4, g.stream);
    cuda::copy_to_device(g.rope_cs.data(), g.h_rope.data(), n * size_t(g.hp.n_rot) * 4, g.stream);
    // the next work's wait orders these copies before the pinned buffers are written again
}

// ---- queued work (on the stream; the callers stage the inputs and wait) -----------------------------

// g.branch = the attention block of layer il for the residual stream in g.x (nt rows).
void GpuModel::Impl::queue_attention(int il, int nt) {
    const Layer& d = layers[size_t(il)];
    const int E = hp.n_embd, HD = hp.head_dim, NH = hp.n_head, NKV = hp.n_head_kv;
    const int64_t H = int64_t(NH) * HD, KV = int64_t(NKV) * HD;
    void* s = stream.handle();
    cuda::rms_norm(f32(x), f32(d.attn_norm), nt, E, hp.rms_eps, f32(xn), s);
    // q, k, v from one conversion of xn where their types agree (they do in every file we write)
    matmul(d.wq, f32(xn), nt, f32(q), H, xa_a.data());
    for (const auto& [W, Y, ld] : {std::tuple{&d.wk, f32(k), KV}, std::tuple{&d.wv, f32(v), KV}}) {
        if (W->type == d.wq.type)
            cuda::gemm(W->type, W->k, W->data(), W->stride, W->nr, xa_a.data(), nt, Y, ld, s);
        else
            matmul(*W, f32(xn), nt, Y, ld, xa_b.data());
    }
    cuda::rope(f32(q), nt, H, NH, HD, hp.n_rot, f32(rope_cs), s);
    cuda::rope(f32(k), nt, KV, NKV, HD, hp.n_rot, f32(rope_cs), s);
    cuda::kv_store(cfg.kv_type, NKV, HD, cfg.n_ctx, cfg.n_seq, f32(k), f32(v), KV, nt, as<int32_t>(seq),
                   as<int32_t>(pos), as<uint8_t>(d.kc), as<uint8_t>(d.vc), s);
    cuda::attention(cfg.kv_type, NH, NKV, HD, cfg.n_ctx, cfg.n_seq, f32(q), nt, as<int32_t>(seq), as<int32_t>(pos),
                    as<uint8_t>(d.kc), as<uint8_t>(d.vc), 1.0f / std::sqrt(float(HD)), f32(attn), attn_scratch.data(), s);
    matmul(d.wo, f32(attn), nt, f32(branch), E, xa_a.data());
}

double GpuModel::Impl::attention_bytes(int il) const {
    const Layer& d = layers[size_t(il)];
    double b = 0;
    for (const DevMatrix* m : {&d.wq, &d.wk, &d.wv, &d.wo}) b += double(m->stride) * double(m->nr);
    return b;
}

// g.y = the down projection of layer il's hot rows [0, n_hot) for the ffn_norm output in g.xn,
// the coefficients from the fused kernel; the layer's counters into counts[il].
void GpuModel::Impl::queue_ffn_kernels(int il, int nt, const float* pred_logit, int64_t ld_logit) {
    const Layer& d = layers[size_t(il)];
    const LayerWeights& L = (*cfg.layers)[size_t(il)];
    const int64_t E = hp.n_embd, n_hot = d.n_hot;
    void* s = stream.handle();
    cuda::fill_zero(y.data(), size_t(nt) * size_t(E) * 4, stream);
    cuda::FfnHotArgs a;
    a.strategy = cfg.ffn_opt->strategy;
    a.act = hp.act;
    a.act_t = L.act_t;
    a.n_embd = E;
    a.n_hot = n_hot;
    a.nt = nt;
    a.gate_type = d.gate.type;
    a.up_type = d.up.type;
    a.gate = d.gate.data();
    a.gate_stride = d.gate.stride;
    a.up = d.up.data();
    a.up_stride = d.up.stride;
    quantize(d.gate.type, E, f32(xn), E, nt, xa_a.data());
    a.xa_gate = xa_a.data();
    a.xa_up = xa_a.data();
    if (d.up.type != d.gate.type) {
        quantize(d.up.type, E, f32(xn), E, nt, xa_b.data());
        a.xa_up = xa_b.data();
    }
    if (a.strategy == FfnStrategy::PREDICT) {
        a.pred_logit = pred_logit;
        a.ld_logit = ld_logit;
        a.pred_thr = L.pred_threshold;
        a.pred_always_on = L.pred_always_on;
    }
    a.coef = f32(coef);
    a.ldc = n_hot;
    a.active = as<uint8_t>(active);
    a.counts = as<int32_t>(counts) + 4 * il;
    cuda::ffn_hot_coef(a, s);
    cuda::ffn_hot_down(d.down_t.type, E, d.down_t.data(), d.down_t.stride, n_hot, f32(coef), n_hot,
                       as<uint8_t>(active), nt, f32(y), E, down_scratch.data(), s);
}

// Layer il's FFN counters after its kernels ran, from counts[il] (ffn_hot_coef's): active (token,
// neuron) pairs where the strategy computes every activation, predicted pairs, and the weight
// bytes read, as the CPU executor counts them (FfnLayerStats).
void GpuModel::Impl::count_ffn(int il, FfnLayerStats& st, bool predictor_here) {
    const Layer& d = layers[size_t(il)];
    int32_t c[4];
    std::memcpy(c, static_cast<const int32_t*>(h_counts.data()) + 4 * il, sizeof c);
    const double rows = double(d.n_hot);
    double bytes = double(c[1]) * double(d.up.stride + d.down_t.stride);
    const FfnStrategy strat = cfg.ffn_opt->strategy;
    switch (strat) {
        case FfnStrategy::DENSE: bytes = rows * double(d.gate.stride + d.up.stride + d.down_t.stride); break;
        case FfnStrategy::EXACT: bytes += rows * double(d.gate.stride); break;
        case FfnStrategy::PREDICT: bytes += double(c[3]) * double(d.gate.stride); break;
    }
    if (strat != FfnStrategy::PREDICT) st.active += double(c[0]);
    if (predictor_here) {
        st.predicted += double(c[2]);
        bytes += double(d.fc1.stride) * double(d.fc1.nr) + double(d.fc2.stride) * double(d.fc2.nr);
    }
    st.bytes += bytes;
    stats.bytes_read += bytes;
}

// ---- the hybrid's pieces: one layer's attention, the hot FFN range, the output -------------------

void GpuModel::attention(int il, const TokenBatch& batch, const float* x, float* branch) {
    Impl& g = *impl_;
    if (!g.layers.at(size_t(il)).attention) fail(strfmt("GPU: layer %d's attention is on the CPU", il));
    const int nt = batch.n;
    if (nt < 1 || nt > g.nb) fail(strfmt("GPU: a batch of %d tokens (at most %d)", nt, g.nb));
    cuda::ScopedDevice on(g.dev);
    g.drain();
    g.busy = true;
    const size_t bytes = size_t(nt) * size_t(g.hp.n_embd) * 4;
    std::memcpy(g.h_in.data(), x, bytes);
    g.start.record(g.stream);
    cuda::copy_to_device(g.x.data(), g.h_in.data(), bytes, g.stream);
    g.queue_attention(il, nt);
    cuda::copy_to_host(g.h_out.data(), g.branch.data(), bytes, g.stream);
    g.finish();
    std::memcpy(branch, g.h_out.data(), bytes);
    g.stats.bytes_read += g.attention_bytes(il);
}

void GpuModel::output(const float* xn, int n, float* logits) {
    Impl& g = *impl_;
    if (!g.output_placed) fail("GPU: the output matrix is on the CPU");
    if (n < 1 || n > g.nb) fail(strfmt("GPU: %d output rows (at most %d)", n, g.nb));
    cuda::ScopedDevice on(g.dev);
    g.drain();
    g.busy = true;
    const size_t in = size_t(n) * size_t(g.hp.n_embd) * 4, out = size_t(n) * size_t(g.hp.n_vocab) * 4;
    std::memcpy(g.h_in.data(), xn, in);
    g.start.record(g.stream);
    cuda::copy_to_device(g.xn.data(), g.h_in.data(), in, g.stream);
    g.matmul(g.output, f32(g.xn), n, f32(g.logits), g.hp.n_vocab, g.xa_a.data());
    cuda::copy_to_host(g.h_out.data(), g.logits.data(), out, g.stream);
    g.finish();
    std::memcpy(logits, g.h_out.data(), out);
    g.stats.bytes_read += double(g.output.stride) * double(g.output.nr);
}

void GpuModel::Impl::queue_ffn(const FfnCall& call, int il, int64_t n_hot) {
    const Layer& d = layers[size_t(il)];
    const int nt = call.n_tokens;
    const int64_t E = hp.n_embd;
    if (nt < 1 || nt > nb) fail(strfmt("GPU: an FFN call of %d tokens (at most %d)", nt, nb));
    if (n_hot != d.n_hot || n_hot <= 0)
        fail(strfmt("GPU: layer %d has neurons [0, %lld) on the GPU, not [0, %lld)", il, (long long)d.n_hot,
                    (long long)n_hot));
    const bool predict = cfg.ffn_opt->strategy == FfnStrategy::PREDICT;
    cuda::ScopedDevice on(dev);
    drain();
    busy = true;
    const size_t hb = size_t(nt) * size_t(E) * 4;
    std::memcpy(h_in.data(), call.h, hb);
    if (predict) {  // the hot columns of the CPU's predictor logits, packed
        float* dst = static_cast<float*>(h_logit.data());
        for (int t = 0; t < nt; ++t)
            std::memcpy(dst + size_t(t) * size_t(n_hot), call.pred_logit + size_t(t) * size_t(hp.n_ff),
                        size_t(n_hot) * 4);
    }
    start.record(stream);
    cuda::copy_to_device(xn.data(), h_in.data(), hb, stream);
    if (predict) cuda::copy_to_device(logit.data(), h_logit.data(), size_t(nt) * size_t(n_hot) * 4, stream);
    int32_t* c = as<int32_t>(counts) + 4 * il;
    cuda::fill_zero(c, 4 * sizeof(int32_t), stream);
    queue_ffn_kernels(il, nt, f32(logit), n_hot);
    cuda::copy_to_host(h_out.data(), y.data(), hb, stream);
    cuda::copy_to_host(static_cast<int32_t*>(h_counts.data()) + 4 * il, c, 4 * sizeof(int32_t), stream);
    done.record(stream);
    pending.queued = true;
    pending.call = call;
    pending.layer = il;
    pending.n_hot = n_hot;
    if (predict && call.opt->diag_recall) recall_on_cpu(call, n_hot);  // while the GPU works
}

// predict's recall diagnostic over the hot rows, on the CPU: which active neurons (from the full
// gate) the predictor caught, counted as the CPU executor counts them.
void GpuModel::Impl::recall_on_cpu(const FfnCall& call, int64_t n_hot) {
    const LayerWeights& L = *call.L;
    const int nt = call.n_tokens;
    std::vector<float> gate(size_t(nt) * size_t(n_hot));
    std::vector<uint8_t> scratch;
    ps::matmul(*cfg.pool, row_range(*L.ffn_gate, 0, n_hot), call.h, nt, gate.data(), scratch);
    int64_t act = 0, hit = 0;
    for (int t = 0; t < nt; ++t)
        for (int64_t j = 0; j < n_hot; ++j) {
            if (ffn_activation(hp.act, gate[size_t(t) * size_t(n_hot) + size_t(j)], L.act_t) == 0.0f) continue;
            act += 1;
            hit += call.pred_logit[size_t(t) * size_t(hp.n_ff) + size_t(j)] > L.pred_threshold;  // +inf on the always-on prefix
        }
    call.stats->recall_total += double(act);
    call.stats->recall_hit += double(hit);
    call.stats->active += double(act);
}

void GpuModel::Impl::take_ffn(float* out) {
    if (!pending.queued) fail("GPU: accumulate without prepare");
    cuda::ScopedDevice on(dev);
    const auto t0 = Clock::now();
    done.wait();
    waited();
    pending.queued = false;
    stats.cpu_wait_seconds += since(t0);
    stats.gpu_busy_seconds += done.seconds_since(start);
    const FfnCall& call = pending.call;
    const size_t n = size_t(call.n_tokens) * size_t(hp.n_embd);
    const float* yv = static_cast<const float*>(h_out.data());
    for (size_t i = 0; i < n; ++i) out[i] += yv[i];
    count_ffn(pending.layer, *call.stats, false);
}

// ---- everything on the GPU ----------------------------------------------------------------------

// Every layer for nt tokens whose residual stream is in x: queued, not waited on.
void GpuModel::Impl::queue_resident(int nt) {
    const int64_t ne = int64_t(nt) * hp.n_embd;
    const bool predict = cfg.ffn_opt->strategy == FfnStrategy::PREDICT;
    void* s = stream.handle();
    const size_t bytes = size_t(ne) * 4;
    cuda::copy_to_device(x.data(), h_in.data(), bytes, stream);
    cuda::fill_zero(counts.data(), layers.size() * 4 * sizeof(int32_t), stream);
    for (int il = 0; il < hp.n_layer; ++il) {
        const Layer& d = layers[size_t(il)];
        queue_attention(il, nt);
        cuda::add_scaled(f32(x), hp.residual_scale, f32(branch), ne, s);
        cuda::rms_norm(f32(x), f32(d.ffn_norm), nt, hp.n_embd, hp.rms_eps, f32(xn), s);
        if (predict) {  // logits = fc2 . relu(fc1 . x), x the residual stream before ffn_norm
            const int64_t R = d.fc1.nr;
            matmul(d.fc1, f32(x), nt, f32(hid), R, xa_a.data());
            cuda::relu(f32(hid), int64_t(nt) * R, s);
            matmul(d.fc2, f32(hid), nt, f32(logit), hp.n_ff, xa_b.data());
        }
        queue_ffn_kernels(il, nt, f32(logit), hp.n_ff);
        cuda::add_scaled(f32(x), hp.residual_scale, f32(y), ne, s);
    }
    cuda::copy_to_host(h_out.data(), x.data(), bytes, stream);
    cuda::copy_to_host(h_counts.data(), counts.data(), layers.size() * 4 * sizeof(int32_t), stream);
}

// The decode step (one token) as a CUDA graph, recorded on first use and again when a layer's
// activation threshold changed (set_layer_thresholds): every pointer and shape in it is fixed for
// the model's life, and the token's inputs (x, positions, RoPE table) are copies from the pinned
// buffers the graph reads when it runs.
void GpuModel::Impl::launch_decode_graph() {
    std::vector<float> act_t;
    for (const LayerWeights& L : *cfg.layers) act_t.push_back(L.act_t);
    if (!decode_graph.ready() || act_t != graph_act_t) {
        decode_graph.begin_capture(stream);
        try {
            queue_resident(1);
        } catch (...) {
            decode_graph.abort_capture(stream);
            throw;
        }
        decode_graph.end_capture(stream);
        graph_act_t = act_t;
    }
    decode_graph.launch(stream);
}

void GpuModel::forward_layers(const TokenBatch& batch, float* xh, FfnLayerStats* st) {
    Impl& g = *impl_;
    if (!g.resident) fail("GPU: forward_layers needs every layer and the output on the GPU");
    const int nt = batch.n;
    if (nt < 1 || nt > g.nb) fail(strfmt("GPU: a batch of %d tokens (at most %d)", nt, g.nb));
    const HParams& hp = g.hp;
    const bool predict = g.cfg.ffn_opt->strategy == FfnStrategy::PREDICT;
    cuda::ScopedDevice on(g.dev);
    g.drain();
    g.busy = true;
    const size_t bytes = size_t(nt) * size_t(hp.n_embd) * 4;
    std::memcpy(g.h_in.data(), xh, bytes);
    g.start.record(g.stream);
    if (nt == 1 && g.use_graphs)
        g.launch_decode_graph();
    else
        g.queue_resident(nt);
    g.finish();
    std::memcpy(xh, g.h_out.data(), bytes);
    for (int il = 0; il < hp.n_layer; ++il) {
        FfnLayerStats& ls = st[il];
        ls.tokens += nt;
        if (!predict) ls.active_known += nt;
        g.count_ffn(il, ls, predict);
        g.stats.bytes_read += g.attention_bytes(il);
    }
}

namespace {

// The FfnExecutor face of the GPU (ffn.h): [0, n_hot) of whichever layer the call names.
class GpuFfnExecutor final : public FfnExecutor {
public:
    explicit GpuFfnExecutor(GpuModel::Impl& g) : g_(g) {}
    void prepare(const FfnCall& call, FfnRange r) override {
        if (r.begin != 0) fail("GPU: the hot range starts at neuron 0");
        g_.queue_ffn(call, g_.layer_of(call.L), r.end);
    }
    void accumulate(float* out) override { g_.take_ffn(out); }

private:
    GpuModel::Impl& g_;
};

}  // namespace

FfnExecutor& GpuModel::ffn() {
    if (!ffn_) ffn_ = std::make_unique<GpuFfnExecutor>(*impl_);
    return *ffn_;
}

}  // namespace ps

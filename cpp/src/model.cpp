// Loading (hyper-parameters and tensors per architecture) and the forward pass.
// The forward reads as the maths: embed -> for each layer (RMSNorm, attention with RoPE and the
// KV cache, residual; RMSNorm, FFN, residual) -> final norm -> output head. MiniCPM differs only
// by three scales (embedding, residual branch, logits).
#include "model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>

#include "common.h"
#include "ffn.h"
#include "ops.h"
#include "vec.h"

namespace ps {

namespace {

// Whether n floats are all finite. Tests the exponent bits rather than calling std::isfinite, so
// the loop has no branch and vectorises: it runs over every row of logits an eval returns.
bool all_finite(const float* x, size_t n) {
    uint32_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, x + i, sizeof bits);
        bad |= uint32_t((bits & 0x7F800000u) == 0x7F800000u);
    }
    return bad == 0;
}

// f32 copy of a 1-D tensor (norm weights), whatever its stored type. A NaN or Inf here is a damaged
// file (one in a norm turns every logit into NaN), so it is refused at load, naming the tensor.
std::vector<float> to_f32(const GGUFFile& f, const Tensor& t) {
    std::vector<float> v(size_t(t.ne[0]) * size_t(t.nrows()));
    for (int64_t r = 0; r < t.nrows(); ++r)
        dequantize_row(t.type, t.row(r), v.data() + size_t(r) * size_t(t.ne[0]), t.ne[0]);
    for (size_t i = 0; i < v.size(); ++i)
        if (!std::isfinite(v[i]))
            fail(strfmt("%s: tensor '%s' holds a non-finite value (%g at element %zu): the file is "
                        "damaged", f.path().c_str(), t.name.c_str(), double(v[i]), i));
    return v;
}

// Leaves the cached positions as they were when an eval exits by an exception, so that a failed
// eval leaves no half-written (possibly NaN) positions for the next one to attend to.
class RestorePastOnThrow {
public:
    explicit RestorePastOnThrow(int& n_past)
        : n_past_(n_past), saved_(n_past), exceptions_(std::uncaught_exceptions()) {}
    ~RestorePastOnThrow() {
        if (std::uncaught_exceptions() > exceptions_) n_past_ = saved_;
    }
    void rewind() const { n_past_ = saved_; }  // to run the same eval again
    RestorePastOnThrow(const RestorePastOnThrow&) = delete;
    RestorePastOnThrow& operator=(const RestorePastOnThrow&) = delete;

private:
    int& n_past_;
    int saved_;
    int exceptions_;
};

// Uninitialised float storage: the KV cache may be gigabytes, and untouched pages cost nothing.
struct FloatBuf {
    float* p = nullptr;
    explicit FloatBuf(size_t n = 0) { reset(n); }
    ~FloatBuf() { std::free(p); }
    FloatBuf(const FloatBuf&) = delete;
    FloatBuf& operator=(const FloatBuf&) = delete;
    void reset(size_t n) {
        std::free(p);
        p = n ? static_cast<float*>(std::malloc(n * sizeof(float))) : nullptr;
        if (n && !p) fail(strfmt("out of memory allocating %zu MB", n * sizeof(float) >> 20));
    }
};

}  // namespace

struct Model::Impl {
    std::unique_ptr<ThreadPool> pool;
    const Tensor* tok_embd = nullptr;
    const Tensor* output = nullptr;  // token_embd when tied
    std::vector<float> output_norm;
    std::vector<LayerWeights> layers;
    std::vector<std::vector<float>> attn_norm, ffn_norm;

    // KV cache: [layer][kv head][pos][head_dim], f32 so that f32 models match references. One
    // head's keys (and values) are contiguous over positions: attention streams them, where the
    // [pos][head] order put consecutive positions of a head 4 KB+ apart (one page each).
    FloatBuf k_cache, v_cache;
    size_t kv_layer_stride = 0;

    // Scratch for one batch (llama2.c's RunState): allocated once, reused every token.
    int n_batch = 0;
    std::vector<float> x, xn, q, k, v, attn, branch, logits_rows;
    std::vector<float> rope_cs;  // [n_batch][n_rot]: (cos, sin) pairs per position of the batch
    std::vector<float> scores;  // [thread][n_ctx]
    std::vector<uint8_t> act_buf;
    FfnScratch ffn;
    std::unique_ptr<InterleavedSet> interleaved;  // copies the layer pointers view
    FfnOptions ffn_opt;
    double fixed_bytes_per_token = 0;
    // Calibration capture (Model::set_capture): per layer, the FFN's input residual stream and
    // its raw gate pre-activations for every token of the last eval.
    bool capture = false;
    std::vector<std::vector<float>> cap_x, cap_gate;  // attention, norms, output head, one embedding row
    bool trace_non_finite = false;  // re-running an eval to locate non-finite logits
};

namespace {

const Tensor* require(const GGUFFile& f, const std::string& name) {
    const Tensor* t = f.tensor(name);
    if (!t) fail(strfmt("%s: tensor '%s' is missing", f.path().c_str(), name.c_str()));
    return t;
}

void check_shape(const GGUFFile& f, const Tensor* t, int64_t ne0, int64_t ne1) {
    const bool ok = t->ne[0] == ne0 && t->ne[1] == ne1 && t->ne[2] == 1 && t->ne[3] == 1;
    if (!ok)
        fail(strfmt("%s: tensor '%s' has shape {%lld, %lld}, expected {%lld, %lld}", f.path().c_str(),
                    t->name.c_str(), (long long)t->ne[0], (long long)t->ne[1], (long long)ne0,
                    (long long)ne1));
}

HParams read_hparams(const GGUFFile& f) {
    HParams hp;
    const std::string arch = f.get_str_opt("general.architecture").value_or("");
    if (!arch_from_name(arch, &hp.arch))
        fail(strfmt("%s: unknown architecture '%s' (supported: llama, minicpm)", f.path().c_str(), arch.c_str()));
    const Arch a = hp.arch;
    auto geti = [&](Key k) { return f.get_int(key(a, k)); };
    auto pos_int = [&](Key k, int64_t v) {
        if (v <= 0 || v > (int64_t(1) << 30))
            fail(strfmt("%s: %s = %lld is out of range", f.path().c_str(), key(a, k).c_str(), (long long)v));
        return int(v);
    };
    hp.n_embd = pos_int(Key::EMBEDDING_LENGTH, geti(Key::EMBEDDING_LENGTH));
    hp.n_layer = pos_int(Key::BLOCK_COUNT, geti(Key::BLOCK_COUNT));
    hp.n_ff = pos_int(Key::FEED_FORWARD_LENGTH, geti(Key::FEED_FORWARD_LENGTH));
    hp.n_head = pos_int(Key::HEAD_COUNT, geti(Key::HEAD_COUNT));
    hp.n_head_kv = pos_int(Key::HEAD_COUNT_KV, f.get_int(key(a, Key::HEAD_COUNT_KV), hp.n_head));
    hp.n_ctx_train = pos_int(Key::CONTEXT_LENGTH, f.get_int(key(a, Key::CONTEXT_LENGTH), 2048));
    if (hp.n_embd % hp.n_head != 0)
        fail(strfmt("%s: embedding length %d is not a multiple of the head count %d", f.path().c_str(), hp.n_embd, hp.n_head));
    if (hp.n_head % hp.n_head_kv != 0)
        fail(strfmt("%s: head count %d is not a multiple of the KV head count %d", f.path().c_str(), hp.n_head, hp.n_head_kv));
    hp.head_dim = hp.n_embd / hp.n_head;
    hp.n_rot = int(f.get_int(key(a, Key::ROPE_DIMENSION_COUNT), hp.head_dim));
    if (hp.n_rot <= 0 || hp.n_rot > hp.head_dim || hp.n_rot % 2)
        fail(strfmt("%s: rope dimension count %d is invalid for head size %d", f.path().c_str(), hp.n_rot, hp.head_dim));
    hp.rms_eps = float(f.get_float(key(a, Key::RMS_EPS), 1e-5));
    hp.rope_theta = float(f.get_float(key(a, Key::ROPE_FREQ_BASE), 10000.0));
    if (!(hp.rms_eps >= 0.0f) || !(hp.rope_theta > 0.0f))
        fail(strfmt("%s: invalid RMS epsilon or RoPE base", f.path().c_str()));
    const std::string scaling = f.get_str_opt(key(a, Key::ROPE_SCALING_TYPE)).value_or("none");
    if (scaling == "linear") {
        const double factor = f.get_float(key(a, Key::ROPE_SCALING_FACTOR), 1.0);
        if (!(factor > 0.0)) fail(strfmt("%s: invalid rope scaling factor", f.path().c_str()));
        hp.rope_freq_scale = float(1.0 / factor);
    } else if (scaling != "none") {
        fail(strfmt("%s: rope scaling '%s' is not supported (only none and linear)", f.path().c_str(), scaling.c_str()));
    }
    if (a == Arch::MINICPM) {
        hp.embedding_scale = float(f.get_float(key(a, Key::EMBEDDING_SCALE), 1.0));
        hp.residual_scale = float(f.get_float(key(a, Key::RESIDUAL_SCALE), 1.0));
        hp.logit_scale = float(f.get_float(key(a, Key::LOGIT_SCALE), 1.0));
        if (!(hp.logit_scale != 0.0f) || !std::isfinite(hp.logit_scale))
            fail(strfmt("%s: invalid logit scale", f.path().c_str()));
        if (!std::isfinite(hp.embedding_scale) || !std::isfinite(hp.residual_scale))
            fail(strfmt("%s: the embedding and residual scales must be finite", f.path().c_str()));
    }
    // Activation: ours from prosparse.*; a PowerInfer file is ReLU; a plain llama.cpp file SiLU.
    if (auto act = f.get_str_opt(key(a, Key::PS_ACTIVATION))) {
        if (!activation_from_name(*act, &hp.act))
            fail(strfmt("%s: unknown activation '%s' (supported: silu, relu, fatrelu)", f.path().c_str(), act->c_str()));
        hp.act_threshold = float(f.get_float(key(a, Key::PS_ACTIVATION_THRESHOLD), 0.0));
        if (!std::isfinite(hp.act_threshold))
            fail(strfmt("%s: %s must be finite", f.path().c_str(), key(a, Key::PS_ACTIVATION_THRESHOLD).c_str()));
    } else if (f.is_powerinfer()) {
        hp.act = Activation::RELU;
    }
    hp.layer_thresholds = f.get_float_array(key(a, Key::PS_LAYER_THRESHOLDS));
    if (!hp.layer_thresholds.empty()) {
        if (hp.layer_thresholds.size() != size_t(hp.n_layer))
            fail(strfmt("%s: prosparse.layer_thresholds has %zu entries for %d layers", f.path().c_str(),
                        hp.layer_thresholds.size(), hp.n_layer));
        for (float t : hp.layer_thresholds)
            if (!(t >= 0.0f) || !std::isfinite(t))
                fail(strfmt("%s: prosparse.layer_thresholds must be finite and >= 0", f.path().c_str()));
        if (hp.act != Activation::SILU)
            fail(strfmt("%s: prosparse.layer_thresholds is for SiLU models, this one is %s", f.path().c_str(),
                        activation_name(hp.act)));
    }
    return hp;
}

}  // namespace

Model::Model(const std::string& path, const ModelParams& params)
    : file_(std::make_unique<GGUFFile>(path)), impl_(std::make_unique<Impl>()) {
    const GGUFFile& f = *file_;
    hp_ = read_hparams(f);
    if (!std::isnan(params.act_threshold)) {
        if (!std::isfinite(params.act_threshold)) fail("activation threshold must be finite");
        if (hp_.act == Activation::SILU)
            fail(strfmt("%s: an activation threshold applies to relu/fatrelu models, this one is silu", path.c_str()));
        hp_.act_threshold = params.act_threshold;
        if (hp_.act == Activation::RELU && params.act_threshold != 0.0f) hp_.act = Activation::FATRELU;
    }
    tok_ = Tokenizer::from_gguf(f);
    Impl& m = *impl_;

    const int E = hp_.n_embd, H = hp_.n_head * hp_.head_dim, KV = hp_.n_head_kv * hp_.head_dim;
    m.tok_embd = require(f, tensor_name(TensorName::TOKEN_EMBD));
    if (m.tok_embd->ne[0] != E || m.tok_embd->n_dims != 2)
        fail(strfmt("%s: token_embd.weight has row length %lld, expected %d", path.c_str(), (long long)m.tok_embd->ne[0], E));
    hp_.n_vocab = int(m.tok_embd->ne[1]);
    if (hp_.n_vocab != tok_->n_vocab())
        fail(strfmt("%s: the embedding has %d rows but the vocabulary %d tokens", path.c_str(), hp_.n_vocab, tok_->n_vocab()));
    m.output = f.tensor(tensor_name(TensorName::OUTPUT));
    if (!m.output) m.output = m.tok_embd;  // tied embeddings
    check_shape(f, m.output, E, hp_.n_vocab);
    const Tensor* onorm = require(f, tensor_name(TensorName::OUTPUT_NORM));
    check_shape(f, onorm, E, 1);
    m.output_norm = to_f32(f, *onorm);

    m.layers.resize(size_t(hp_.n_layer));
    for (int il = 0; il < hp_.n_layer; ++il) {
        LayerWeights& L = m.layers[size_t(il)];
        auto req = [&](TensorName t) { return require(f, tensor_name(t, il)); };
        L.attn_norm = req(TensorName::ATTN_NORM); check_shape(f, L.attn_norm, E, 1);
        L.wq = req(TensorName::ATTN_Q); check_shape(f, L.wq, E, H);
        L.wk = req(TensorName::ATTN_K); check_shape(f, L.wk, E, KV);
        L.wv = req(TensorName::ATTN_V); check_shape(f, L.wv, E, KV);
        L.wo = req(TensorName::ATTN_OUT); check_shape(f, L.wo, H, E);
        L.ffn_norm = req(TensorName::FFN_NORM); check_shape(f, L.ffn_norm, E, 1);
        L.ffn_gate = req(TensorName::FFN_GATE); check_shape(f, L.ffn_gate, E, hp_.n_ff);
        L.ffn_up = req(TensorName::FFN_UP); check_shape(f, L.ffn_up, E, hp_.n_ff);
        L.ffn_down_t = f.tensor(tensor_name(TensorName::FFN_DOWN_T, il));
        if (L.ffn_down_t) {
            check_shape(f, L.ffn_down_t, E, hp_.n_ff);
        } else {
            L.ffn_down = req(TensorName::FFN_DOWN);
            check_shape(f, L.ffn_down, hp_.n_ff, E);
        }
        L.fc1 = f.tensor(tensor_name(TensorName::FC1, il));
        L.fc2 = f.tensor(tensor_name(TensorName::FC2, il));
        L.act_freq = f.tensor(tensor_name(TensorName::FFN_ACT_FREQ, il));
        L.act_t = hp_.act == Activation::SILU
                      ? (hp_.layer_thresholds.empty() ? 0.0f : hp_.layer_thresholds[size_t(il)])
                      : hp_.act_threshold;
        m.attn_norm.push_back(to_f32(f, *L.attn_norm));
        m.ffn_norm.push_back(to_f32(f, *L.ffn_norm));
    }

    if (params.n_ctx < 0) fail(strfmt("n_ctx must be >= 0, got %d", params.n_ctx));
    n_ctx_ = params.n_ctx == 0 ? hp_.n_ctx_train : params.n_ctx;
    int nt = params.n_threads;
    if (nt < 0) fail(strfmt("n_threads must be >= 0, got %d", nt));
    if (nt == 0) nt = std::max(1u, std::thread::hardware_concurrency());
    if (params.n_batch < 1) fail(strfmt("n_batch must be >= 1, got %d", params.n_batch));
    m.n_batch = std::min(params.n_batch, n_ctx_);
    m.pool = std::make_unique<ThreadPool>(nt);

    choose_strategy(params);
    interleave_weights();
    for (const LayerWeights& L : m.layers)
        for (const Tensor* t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.ffn_norm})
            m.fixed_bytes_per_token += double(t->nbytes);
    m.fixed_bytes_per_token += double(m.output->nbytes) + double(onorm->nbytes) +
                               double(m.tok_embd->row_stride());
    stats_.layers.resize(size_t(hp_.n_layer));

    m.kv_layer_stride = size_t(n_ctx_) * size_t(KV);
    m.k_cache.reset(m.kv_layer_stride * size_t(hp_.n_layer));
    m.v_cache.reset(m.kv_layer_stride * size_t(hp_.n_layer));

    const size_t nb = size_t(m.n_batch);
    m.x.resize(nb * E); m.xn.resize(nb * E); m.attn.resize(nb * H); m.branch.resize(nb * E);
    m.q.resize(nb * H); m.k.resize(nb * KV); m.v.resize(nb * KV);
    m.rope_cs.resize(nb * size_t(hp_.n_rot));
    m.scores.resize(size_t(nt) * size_t(n_ctx_));
}

Model::~Model() = default;

// DESIGN.md: auto = exact where the activation is sparse (ReLU/FATReLU with the neuron-major
// down projection), else dense; predict is approximate and only runs when asked for.
void Model::choose_strategy(const ModelParams& params) {
    Impl& m = *impl_;
    const GGUFFile& f = *file_;
    // SiLU is sparse only with calibrated layer thresholds (prosparse-calibrate --target-sparsity)
    const bool sparse_act = hp_.act != Activation::SILU || !hp_.layer_thresholds.empty();
    bool has_down_t = true, has_pred = true;
    for (int il = 0; il < hp_.n_layer; ++il) {
        const LayerWeights& L = m.layers[size_t(il)];
        has_down_t = has_down_t && L.ffn_down_t;
        has_pred = has_pred && L.fc1 && L.fc2;
        if (L.fc1 || L.fc2) {
            if (!L.fc1 || !L.fc2)
                fail(strfmt("%s: layer %d has only one of fc1/fc2", f.path().c_str(), il));
            const int64_t R = L.fc1->ne[1];
            check_shape(f, L.fc1, hp_.n_embd, R);
            check_shape(f, L.fc2, R, hp_.n_ff);
        }
        if (L.act_freq) check_shape(f, L.act_freq, hp_.n_ff, 1);
    }
    const std::string& want = params.sparsity;
    FfnStrategy s;
    if (want == "auto") {
        s = sparse_act && has_down_t ? FfnStrategy::EXACT : FfnStrategy::DENSE;
    } else if (want == "dense") {
        s = FfnStrategy::DENSE;
    } else if (want == "exact" || want == "predict") {
        if (!sparse_act)
            fail(strfmt("sparsity '%s' needs a sparse activation (relu/fatrelu, or SiLU with "
                        "prosparse.layer_thresholds); %s is %s", want.c_str(),
                        f.path().c_str(), activation_name(hp_.act)));
        if (!has_down_t)
            fail(strfmt("sparsity '%s' needs the neuron-major ffn_down_t tensors, which %s lacks "
                        "(convert it with prosparse-convert)", want.c_str(), f.path().c_str()));
        if (want == "predict" && !has_pred)
            fail(strfmt("sparsity 'predict' needs predictor tensors (blk.N.fc1/fc2), which %s lacks",
                        f.path().c_str()));
        s = want == "exact" ? FfnStrategy::EXACT : FfnStrategy::PREDICT;
    } else {
        fail(strfmt("unknown sparsity '%s' (auto, dense, exact, predict)", want.c_str()));
    }
    m.ffn_opt.strategy = s;
    m.ffn_opt.diag_recall = params.diag_recall;
    double thr = f.get_float(key(hp_.arch, Key::PS_PREDICTOR_THRESHOLD),
                             f.get_float(key(hp_.arch, Key::PWI_SPARSE_THRESHOLD), 0.0));
    if (!std::isnan(params.pred_threshold)) thr = params.pred_threshold;
    if (!std::isfinite(thr)) fail("predictor threshold must be finite");
    m.ffn_opt.pred_threshold = float(thr);
    strategy_ = strategy_name(s);
}

namespace {

// MemAvailable from /proc/meminfo in bytes, or -1 where there is none (not Linux).
int64_t available_memory_bytes() {
    std::FILE* f = std::fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    std::fclose(f);
    return kb < 0 ? -1 : int64_t(kb) * 1024;
}

}  // namespace

// Weights that matmul always reads whole under the chosen strategy get an interleaved copy
// (cpu/kernels.h, "Interleaved rows"): attention, output, predictor, and the FFN matrices the
// strategy does not gather (gate for dense and exact; up for dense, only where the activation
// is dense). The file's mapping is kept for the rest. PROSPARSE_INTERLEAVE=0 turns this off
// (same results up to float rounding).
//
// Up stays plain on sparse models even for dense: exact gathers its rows, and a row's dot is the
// same bits gathered or not only in the same layout. Dense and exact then compute the same model
// bit for bit, which their tests (and calibration, which measures with dense) rely on: a rounding
// difference in up flips neurons that sit at a threshold.
void Model::interleave_weights() {
    Impl& m = *impl_;
    const char* env = std::getenv("PROSPARSE_INTERLEAVE");
    if (env && std::string(env) == "0") return;
    std::vector<const Tensor**> slots;  // the pointers to redirect to the copies
    auto want = [&](const Tensor*& t) {
        if (t && can_interleave(*t)) slots.push_back(&t);
    };
    const FfnStrategy s = m.ffn_opt.strategy;
    const bool sparse_act = hp_.act != Activation::SILU || !hp_.layer_thresholds.empty();
    for (LayerWeights& L : m.layers) {
        for (const Tensor** t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.fc1, &L.fc2, &L.ffn_down}) want(*t);
        if (s != FfnStrategy::PREDICT) want(L.ffn_gate);
        if (s == FfnStrategy::DENSE && !sparse_act) want(L.ffn_up);
    }
    want(m.output);  // a tied output gets its own copy; the embedding rows stay in the file
    std::vector<const Tensor*> src;
    size_t bytes = 0;
    for (const Tensor** t : slots) {
        src.push_back(*t);
        bytes += (*t)->nbytes;
    }
    // The copy is anonymous memory: if it would not fit in what the kernel reports available
    // (page cache included, so the file's own pages count), keep the mapped file's layout rather
    // than risk the OOM killer halfway through a generation.
    const int64_t avail = available_memory_bytes();
    if (avail >= 0 && double(bytes) > 0.8 * double(avail)) return;
    m.interleaved = interleave(*m.pool, src);
    for (size_t i = 0; i < slots.size(); ++i) *slots[i] = &m.interleaved->tensors[i];
    stats_.n_interleaved = int64_t(slots.size());
}

int Model::n_threads() const { return impl_->pool->size(); }

void Model::set_capture(bool on) {
    impl_->capture = on;
    if (!on) {
        impl_->cap_x.clear();
        impl_->cap_gate.clear();
    }
}

const std::vector<float>& Model::captured_x(int layer) const { return impl_->cap_x.at(size_t(layer)); }
const std::vector<float>& Model::captured_gate(int layer) const { return impl_->cap_gate.at(size_t(layer)); }

void Model::set_layer_thresholds(const std::vector<float>& t) {
    if (hp_.act != Activation::SILU)
        fail(strfmt("layer thresholds are for SiLU models, this one is %s", activation_name(hp_.act)));
    if (!t.empty() && t.size() != size_t(hp_.n_layer))
        fail(strfmt("%zu layer thresholds for %d layers", t.size(), hp_.n_layer));
    for (float v : t)
        if (!(v >= 0.0f) || !std::isfinite(v)) fail("layer thresholds must be finite and >= 0");
    hp_.layer_thresholds = t;
    for (size_t il = 0; il < impl_->layers.size(); ++il) impl_->layers[il].act_t = t.empty() ? 0.0f : t[il];
}

void Model::rewind(int n) {
    if (n < 0 || n > n_past_) fail(strfmt("cannot rewind to %d: %d positions are cached", n, n_past_));
    n_past_ = n;
}

namespace {

// llama.cpp's "normal" RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/n_rot).
// The converter permutes Q/K rows so that this equals Hugging Face's rotate_half convention.
// cs holds (cos, sin) for one position, n_rot/2 pairs (rope_table), shared by Q, K and all layers.
void rope_table(float* cs, int n_rot, int pos, float theta, float freq_scale) {
    for (int i = 0; i < n_rot / 2; ++i) {
        const double inv_freq = std::pow(double(theta), -2.0 * i / n_rot);
        const double ang = double(pos) * double(freq_scale) * inv_freq;
        cs[2 * i] = float(std::cos(ang));
        cs[2 * i + 1] = float(std::sin(ang));
    }
}

void rope(float* x, int n_heads, int head_dim, int n_rot, const float* cs) {
    for (int i = 0; i < n_rot / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        for (int h = 0; h < n_heads; ++h) {
            float* p = x + size_t(h) * head_dim + 2 * i;
            const float a = p[0], b = p[1];
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

// The steps of the forward after which the residual stream is checked while an eval is traced.
enum class Step { EMBEDDING, ATTENTION, FFN };

// While an eval is traced (fail_non_finite_logits): throws, naming the step and the tensors it
// read, if the residual stream x (n floats) holds NaN or Inf after that step.
void check_step(bool tracing, const float* x, size_t n, Step step, int layer) {
    if (!tracing || all_finite(x, n)) return;
    switch (step) {
        case Step::EMBEDDING:
            throw NumericError("the token embedding (token_embd.weight) gives non-finite values (NaN or "
                               "Inf) for these tokens: the file is damaged");
        case Step::ATTENTION:
            throw NumericError(strfmt("layer %d's attention output is non-finite (NaN or Inf): its weights "
                                      "(blk.%d.attn_*) are damaged or its activations overflow", layer, layer));
        case Step::FFN:
            throw NumericError(strfmt("layer %d's feed-forward output is non-finite (NaN or Inf): its weights "
                                      "(blk.%d.ffn_*) are damaged or its activations overflow", layer, layer));
    }
}

// Called when an eval's logits hold NaN or Inf, which no caller can use (greedy decoding would
// return the first id, sampling garbage). Re-runs the eval traced, so that check_step names the
// first step whose output went non-finite; untraced, those checks cost one branch a step. The
// forward is deterministic, so the re-run computes the same numbers. The error names the file.
[[noreturn]] void fail_non_finite_logits(bool& tracing, const GGUFFile& f,
                                         const std::function<void()>& rerun) {
    if (tracing)  // within the re-run, after every layer came out finite
        throw NumericError("the output head (output_norm.weight, output.weight) gives non-finite logits "
                           "(NaN or Inf) from finite hidden states: the file is damaged");
    tracing = true;
    try {
        rerun();
    } catch (const NumericError& e) {
        tracing = false;
        throw NumericError(f.path() + ": " + e.what());
    } catch (...) {
        tracing = false;
        throw;
    }
    tracing = false;
    throw NumericError(f.path() + ": the logits are non-finite (NaN or Inf), and re-running the tokens "
                       "did not show where");
}

}  // namespace

void Model::eval(const int32_t* tokens, int n, bool all_logits, float* logits) {
    if (n <= 0) fail("eval needs at least one token");
    if (int64_t(n_past_) + n > n_ctx_)
        fail(strfmt("context overflow: %d cached + %d new tokens exceed n_ctx = %d", n_past_, n, n_ctx_));
    for (int i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= hp_.n_vocab)
            fail(strfmt("token id %d is out of range [0, %d)", tokens[i], hp_.n_vocab));

    Impl& m = *impl_;
    ThreadPool& pool = *m.pool;
    const RestorePastOnThrow restore_past(n_past_);
    const auto t0 = std::chrono::steady_clock::now();
    if (m.capture) {
        m.cap_x.assign(size_t(hp_.n_layer), {});
        m.cap_gate.assign(size_t(hp_.n_layer), {});
    }
    double ffn_bytes0 = 0;
    for (const auto& ls : stats_.layers) ffn_bytes0 += ls.bytes;
    const int E = hp_.n_embd, HD = hp_.head_dim, NH = hp_.n_head, NKV = hp_.n_head_kv;
    const int H = NH * HD, KV = NKV * HD, V = hp_.n_vocab;
    const float attn_scale = 1.0f / std::sqrt(float(HD));

    for (int b0 = 0; b0 < n; b0 += m.n_batch) {
        const int nb = std::min(m.n_batch, n - b0);
        const int p0 = n_past_;

        for (int t = 0; t < nb; ++t) {
            float* xt = m.x.data() + size_t(t) * E;
            dequantize_row(m.tok_embd->type, m.tok_embd->row(tokens[b0 + t]), xt, E);
            if (hp_.embedding_scale != 1.0f) vec_scale(xt, hp_.embedding_scale, E);
        }
        check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::EMBEDDING, -1);

        for (int t = 0; t < nb; ++t)  // the positions' rotations, once for every layer
            rope_table(m.rope_cs.data() + size_t(t) * size_t(hp_.n_rot), hp_.n_rot, p0 + t, hp_.rope_theta,
                       hp_.rope_freq_scale);
        for (int il = 0; il < hp_.n_layer; ++il) {
            const LayerWeights& L = m.layers[size_t(il)];
            float* kc = m.k_cache.p + size_t(il) * m.kv_layer_stride;
            float* vc = m.v_cache.p + size_t(il) * m.kv_layer_stride;

            // attention
            for (int t = 0; t < nb; ++t)
                rms_norm(m.xn.data() + size_t(t) * E, m.x.data() + size_t(t) * E, m.attn_norm[size_t(il)].data(), E, hp_.rms_eps);
            matmul(pool, *L.wq, m.xn.data(), nb, m.q.data(), m.act_buf);
            matmul(pool, *L.wk, m.xn.data(), nb, m.k.data(), m.act_buf);
            matmul(pool, *L.wv, m.xn.data(), nb, m.v.data(), m.act_buf);
            for (int t = 0; t < nb; ++t) {
                const float* cs = m.rope_cs.data() + size_t(t) * size_t(hp_.n_rot);
                rope(m.q.data() + size_t(t) * H, NH, HD, hp_.n_rot, cs);
                rope(m.k.data() + size_t(t) * KV, NKV, HD, hp_.n_rot, cs);
            }
            const size_t head_stride = size_t(n_ctx_) * size_t(HD);  // one KV head's [pos][head_dim]
            for (int t = 0; t < nb; ++t)
                for (int kvh = 0; kvh < NKV; ++kvh) {
                    const size_t dst = size_t(kvh) * head_stride + size_t(p0 + t) * size_t(HD);
                    const size_t src = size_t(t) * KV + size_t(kvh) * HD;
                    std::memcpy(kc + dst, m.k.data() + src, sizeof(float) * size_t(HD));
                    std::memcpy(vc + dst, m.v.data() + src, sizeof(float) * size_t(HD));
                }

            // one task per (token, head): causal softmax(q k / sqrt(d)) v over the cache
            pool.parallel_for(int64_t(nb) * NH, [&](int64_t task, int thread) {
                const int t = int(task / NH), h = int(task % NH), kvh = h / (NH / NKV);
                const int n_keys = p0 + t + 1;
                const float* qh = m.q.data() + size_t(t) * H + size_t(h) * HD;
                float* sc = m.scores.data() + size_t(thread) * size_t(n_ctx_);
                const float* kh = kc + size_t(kvh) * head_stride;
                const float* vh = vc + size_t(kvh) * head_stride;
                for (int p = 0; p < n_keys; ++p) sc[p] = vec_dot(qh, kh + size_t(p) * HD, HD) * attn_scale;
                softmax(sc, n_keys);
                float* out = m.attn.data() + size_t(t) * H + size_t(h) * HD;
                std::fill(out, out + HD, 0.0f);
                for (int p = 0; p < n_keys; ++p) vec_axpy(out, sc[p], vh + size_t(p) * HD, HD);
            });
            matmul(pool, *L.wo, m.attn.data(), nb, m.branch.data(), m.act_buf);
            vec_axpy(m.x.data(), hp_.residual_scale, m.branch.data(), int64_t(nb) * E);
            check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::ATTENTION, il);

            // feed-forward
            for (int t = 0; t < nb; ++t)
                rms_norm(m.xn.data() + size_t(t) * E, m.x.data() + size_t(t) * E, m.ffn_norm[size_t(il)].data(), E, hp_.rms_eps);
            if (m.capture) {
                auto& cx = m.cap_x[size_t(il)];
                auto& cg = m.cap_gate[size_t(il)];
                cx.insert(cx.end(), m.x.begin(), m.x.begin() + std::ptrdiff_t(size_t(nb) * E));
                const size_t off = cg.size();
                cg.resize(off + size_t(nb) * size_t(hp_.n_ff));
                matmul(pool, *L.ffn_gate, m.xn.data(), nb, cg.data() + off, m.act_buf);
            }
            ffn_forward(pool, hp_, L, m.ffn_opt, m.x.data(), m.xn.data(), nb, m.branch.data(), m.ffn,
                        stats_.layers[size_t(il)]);
            vec_axpy(m.x.data(), hp_.residual_scale, m.branch.data(), int64_t(nb) * E);
            check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::FFN, il);
        }
        n_past_ += nb;

        // output head, only for the rows the caller wants
        const int first = all_logits ? 0 : (b0 + nb == n ? nb - 1 : nb);
        const int n_out = nb - first;
        if (n_out > 0) {
            for (int t = first; t < nb; ++t)
                rms_norm(m.xn.data() + size_t(t - first) * E, m.x.data() + size_t(t) * E, m.output_norm.data(), E, hp_.rms_eps);
            float* dst = logits + (all_logits ? size_t(b0) * V : 0);
            matmul(pool, *m.output, m.xn.data(), n_out, dst, m.act_buf);
            if (hp_.logit_scale != 1.0f) vec_scale(dst, 1.0f / hp_.logit_scale, int64_t(n_out) * V);
            if (!all_finite(dst, size_t(n_out) * V))
                fail_non_finite_logits(m.trace_non_finite, *file_,
                                       [&] { restore_past.rewind(); eval(tokens, n, all_logits, logits); });
        }
    }

    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (n == 1) {
        double ffn_bytes = -ffn_bytes0;
        for (const auto& ls : stats_.layers) ffn_bytes += ls.bytes;
        stats_.weight_bytes_per_token = m.fixed_bytes_per_token + ffn_bytes;
        stats_.n_decode_tokens += 1;
        stats_.decode_seconds += secs;
    } else {
        stats_.n_prompt_tokens += n;
        stats_.prompt_seconds += secs;
    }
}

}  // namespace ps

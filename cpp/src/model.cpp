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

#include "attention.h"
#include "common.h"
#include "cuda/device.h"
#include "cuda/gpu_model.h"
#include "ffn.h"
#include "kv_cache.h"
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
    explicit RestorePastOnThrow(std::vector<int>& seq_len)
        : seq_len_(seq_len), saved_(seq_len), exceptions_(std::uncaught_exceptions()) {}
    ~RestorePastOnThrow() {
        if (std::uncaught_exceptions() > exceptions_) seq_len_ = saved_;
    }
    void rewind() const { seq_len_ = saved_; }  // to run the same eval again
    RestorePastOnThrow(const RestorePastOnThrow&) = delete;
    RestorePastOnThrow& operator=(const RestorePastOnThrow&) = delete;

private:
    std::vector<int>& seq_len_;
    std::vector<int> saved_;
    int exceptions_;
};

}  // namespace

struct Model::Impl {
    std::unique_ptr<ThreadPool> pool;
    const Tensor* tok_embd = nullptr;
    const Tensor* output = nullptr;  // token_embd when tied
    std::vector<float> output_norm;
    std::vector<LayerWeights> layers;
    std::vector<std::vector<float>> attn_norm, ffn_norm;
    std::unique_ptr<KvCache> kv;

    // Scratch for one batch (llama2.c's RunState): allocated once, reused every token.
    int n_batch = 0;
    std::vector<float> x, xn, q, k, v, attn, branch, logits_rows;
    std::vector<float> rope_cs;  // [n_batch][n_rot]: (cos, sin) pairs per position of the batch
    AttnScratch attn_scratch;
    std::vector<uint8_t> act_buf;
    FfnScratch ffn;
    // The FFN's executors (ffn.h): every layer's neurons [n_hot[l], n_ff) on the CPU, [0, n_hot[l])
    // on hot_ffn. Only the tests set n_hot today (a second CPU executor as the hot side).
    std::unique_ptr<CpuFfnExecutor> cpu_ffn;
    std::unique_ptr<FfnExecutor> hot_ffn;
    std::vector<int64_t> n_hot;
    FfnExecutor* hot = nullptr;  // hot_ffn, or the GPU's executor
    // The GPU half (cuda/gpu_model.h) when the placement put anything on a GPU: the placed weights
    // and the device KV cache of its attention layers; null when everything runs on the CPU.
    std::unique_ptr<GpuModel> gpu;
    int gpu_index = -1;  // the GPU place_weights chose
    PlacementInput placement_in;  // what it placed (for the CPU-only placement if the GPU fails)
    std::unique_ptr<InterleavedSet> interleaved;  // copies the layer pointers view
    std::unique_ptr<uint16_t[]> down_t_data;      // ffn_down_t built at load (Model::build_down_t)
    std::vector<Tensor> down_t;                   // its per-layer views, which the layers point to
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

// Per-layer SiLU thresholds, from the file or given at load; `what` names them in errors.
void check_layer_thresholds(const std::vector<float>& t, const HParams& hp, const std::string& what) {
    if (t.size() != size_t(hp.n_layer))
        fail(strfmt("%s has %zu entries for %d layers", what.c_str(), t.size(), hp.n_layer));
    for (float v : t)
        if (!(v >= 0.0f) || !std::isfinite(v)) fail(strfmt("%s must be finite and >= 0", what.c_str()));
    if (hp.act != Activation::SILU)
        fail(strfmt("%s is for SiLU models, this one is %s", what.c_str(), activation_name(hp.act)));
}

// Per-layer predictor cut-offs (prosparse.predictor.layer_thresholds, else the single threshold
// `thr`) and always-on prefixes (prosparse.predictor.always_on), bounds-checked.
// `from_file`: false when the caller's pred_threshold (then `thr`) overrides every layer's cut-off.
void set_predictor_cutoffs(const GGUFFile& f, const HParams& hp, bool from_file, std::vector<LayerWeights>& layers,
                           float thr) {
    const std::string kt = key(hp.arch, Key::PS_PREDICTOR_LAYER_THRESHOLDS);
    const std::string ka = key(hp.arch, Key::PS_PREDICTOR_ALWAYS_ON);
    const std::vector<float> lt = f.get_float_array(kt);
    const std::vector<int64_t> on = f.get_int_array(ka);
    const size_t nl = size_t(hp.n_layer);
    if (f.find(kt) && lt.size() != nl)
        fail(strfmt("%s: %s has %zu entries for %d layers", f.path().c_str(), kt.c_str(), lt.size(), hp.n_layer));
    if (f.find(ka) && on.size() != nl)
        fail(strfmt("%s: %s has %zu entries for %d layers", f.path().c_str(), ka.c_str(), on.size(), hp.n_layer));
    for (size_t il = 0; il < nl; ++il) {
        LayerWeights& L = layers[il];
        L.pred_threshold = from_file && !lt.empty() ? lt[il] : thr;
        if (!std::isfinite(L.pred_threshold))
            fail(strfmt("%s: %s[%zu] is not finite", f.path().c_str(), kt.c_str(), il));
        L.pred_always_on = on.empty() ? 0 : on[il];
        if (L.pred_always_on < 0 || L.pred_always_on > hp.n_ff)
            fail(strfmt("%s: %s[%zu] = %lld is outside [0, %d] (n_ff)", f.path().c_str(), ka.c_str(), il,
                        (long long)L.pred_always_on, hp.n_ff));
    }
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
    if (!hp.layer_thresholds.empty())
        check_layer_thresholds(hp.layer_thresholds, hp, f.path() + ": prosparse.layer_thresholds");
    return hp;
}

}  // namespace

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
    if (!params.layer_thresholds.empty()) {
        check_layer_thresholds(params.layer_thresholds, hp_, "layer_thresholds");
        hp_.layer_thresholds = params.layer_thresholds;
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

    // The cache is allocated untouched, so the kernel's MemAvailable does not see it: check it
    // against what is available first, and keep it out of what the interleaved copies may take.
    KvType kv_type;
    if (!kv_type_from_name(params.kv_type, &kv_type))
        fail(strfmt("unknown KV cache type '%s' (f16, f32, q8_0)", params.kv_type.c_str()));
    if (params.n_seq < 1 || params.n_seq > 4096) fail(strfmt("n_seq must be in [1, 4096], got %d", params.n_seq));
    seq_len_.assign(size_t(params.n_seq), 0);
    const size_t kv_bytes = kv_cache_bytes(kv_type, hp_.n_layer, hp_.n_head_kv, hp_.head_dim, n_ctx_, params.n_seq);
    const int64_t avail = available_memory_bytes();
    if (avail >= 0 && double(kv_bytes) > 0.9 * double(avail)) {
        const size_t per_pos = kv_cache_bytes(kv_type, hp_.n_layer, hp_.n_head_kv, hp_.head_dim, 1, params.n_seq);
        fail(strfmt("n_ctx = %d needs a %s KV cache of %zu MB, more than 90%% of the %lld MB available; the "
                    "largest n_ctx that fits is %lld", n_ctx_, kv_type_name(kv_type), kv_bytes >> 20,
                    (long long)(avail >> 20), (long long)(0.9 * double(avail) / double(per_pos))));
    }

    choose_strategy(params);
    build_down_t(int64_t(kv_bytes));
    for (const LayerWeights& L : m.layers)
        for (const Tensor* t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.ffn_norm})
            m.fixed_bytes_per_token += double(t->nbytes);
    m.fixed_bytes_per_token += double(m.output->nbytes) + double(onorm->nbytes) +
                               double(m.tok_embd->row_stride());
    stats_.layers.resize(size_t(hp_.n_layer));

    m.kv = std::make_unique<KvCache>(hp_.n_layer, hp_.n_head_kv, hp_.head_dim, n_ctx_, params.n_seq, kv_type);
    stats_.kv_cache_bytes = double(m.kv->bytes());
    place_weights(params, m.kv->bytes());
    stats_.kv_type = kv_type_name(kv_type);
    m.cpu_ffn = std::make_unique<CpuFfnExecutor>(*m.pool);
    m.n_hot.assign(size_t(hp_.n_layer), 0);
    if (params.test_split_hot >= 0) {
        // the hybrid's split with a second CPU executor as the hot side (tests)
        m.hot_ffn = std::make_unique<CpuFfnExecutor>(*m.pool);
        m.n_hot.assign(size_t(hp_.n_layer), std::min<int64_t>(params.test_split_hot, hp_.n_ff));
        m.hot = m.hot_ffn.get();
    }
    start_gpu(params);
    // after the GPU took its weights: the CPU copies only what it reads
    const int64_t avail_now = available_memory_bytes();  // the built copies are resident now
    interleave_weights(avail_now >= 0 ? avail_now - int64_t(kv_bytes) : -1);

    const size_t nb = size_t(m.n_batch);
    m.x.resize(nb * E); m.xn.resize(nb * E); m.attn.resize(nb * H); m.branch.resize(nb * E);
    m.q.resize(nb * H); m.k.resize(nb * KV); m.v.resize(nb * KV);
    m.rope_cs.resize(nb * size_t(hp_.n_rot));
}

Model::~Model() = default;

// docs/design.md, "The FFN strategies": auto = exact where the activation is sparse, else dense;
// predict is approximate and only runs when asked for. A ReLU/FATReLU file without the
// neuron-major down projection stays dense under auto (exact would need an F16 copy of ffn_down
// several times its quantized size); a SiLU model with layer thresholds always has one
// (build_down_t).
void Model::choose_strategy(const ModelParams& params) {
    Impl& m = *impl_;
    const GGUFFile& f = *file_;
    // SiLU is sparse only with calibrated layer thresholds (prosparse-calibrate --target-sparsity)
    const bool silu_thresholds = hp_.act == Activation::SILU && !hp_.layer_thresholds.empty();
    const bool sparse_act = hp_.act != Activation::SILU || silu_thresholds;
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
        s = sparse_act && (has_down_t || silu_thresholds) ? FfnStrategy::EXACT : FfnStrategy::DENSE;
    } else if (want == "dense") {
        s = FfnStrategy::DENSE;
    } else if (want == "exact" || want == "predict") {
        if (!sparse_act)
            fail(strfmt("sparsity '%s' needs a sparse activation (relu/fatrelu, or SiLU with "
                        "prosparse.layer_thresholds); %s is %s", want.c_str(),
                        f.path().c_str(), activation_name(hp_.act)));
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
    set_predictor_cutoffs(f, hp_, std::isnan(params.pred_threshold), m.layers, float(thr));
    strategy_ = strategy_name(s);
}


// The neuron-major down projection for files that only have llama.cpp's ffn_down: built when the
// strategy gathers neurons (exact, predict) and for every strategy of a SiLU model with layer
// thresholds, so that dense and exact compute the same thresholded model, the one prosparse-calibrate
// writes to a file (docs/design.md, "The down projection": giving a plain file a sparse layout
// writes ffn_down_t from the dequantized weights). F16, as calibration writes it for the shipped presets: ffn_down_t's axpy takes
// the coefficients as floats, so the only change from the file's weights is F16 rounding, where
// ffn_down's matmul quantizes the activations to 8 bits. Rounding is to nearest even, as numpy's
// astype(float16) in the calibrate tool, so the copy equals the tool's bit for bit.
void Model::build_down_t(int64_t reserved) {
    Impl& m = *impl_;
    const bool silu_thresholds = hp_.act == Activation::SILU && !hp_.layer_thresholds.empty();
    if (!silu_thresholds && m.ffn_opt.strategy == FfnStrategy::DENSE) return;
    std::vector<int> todo;  // layers without ffn_down_t
    for (int il = 0; il < hp_.n_layer; ++il)
        if (!m.layers[size_t(il)].ffn_down_t) todo.push_back(il);
    if (todo.empty()) return;
    const int64_t E = hp_.n_embd, F = hp_.n_ff;
    const size_t per_layer = size_t(E) * size_t(F);
    const size_t bytes = per_layer * todo.size() * sizeof(uint16_t);
    const int64_t avail = available_memory_bytes() - reserved;
    if (avail >= -reserved && double(bytes) > 0.8 * double(avail))
        fail(strfmt("%s: building the ffn_down_t that the %s strategy needs (the file has only ffn_down) takes "
                    "%zu MB, more than the %lld MB available", file_->path().c_str(),
                    silu_thresholds ? "thresholded" : strategy_.c_str(), bytes >> 20, (long long)(avail >> 20)));
    m.down_t_data.reset(new uint16_t[per_layer * todo.size()]);
    m.down_t.resize(todo.size());
    // One task per row of ffn_down (an output dimension across all neurons), scattered into column
    // `r` of the [n_ff][n_embd] copy: every task writes its own elements.
    std::vector<std::vector<float>> row_buf(size_t(m.pool->size()), std::vector<float>(size_t(F)));
    m.pool->parallel_for(int64_t(todo.size()) * E, [&](int64_t task, int thread) {
        const size_t l = size_t(task / E);
        const int64_t r = task % E;
        const Tensor& down = *m.layers[size_t(todo[l])].ffn_down;
        float* row = row_buf[size_t(thread)].data();
        dequantize_row(down.type, down.row(r), row, F);
        uint16_t* dst = m.down_t_data.get() + l * per_layer + size_t(r);
        for (int64_t i = 0; i < F; ++i) dst[size_t(i) * size_t(E)] = fp32_to_fp16(row[i]);
    });
    for (size_t l = 0; l < todo.size(); ++l) {
        Tensor& t = m.down_t[l];
        LayerWeights& L = m.layers[size_t(todo[l])];
        t.name = tensor_name(TensorName::FFN_DOWN_T, todo[l]);
        t.type = GgmlType::F16;
        t.n_dims = 2;
        t.ne[0] = E;
        t.ne[1] = F;
        t.data = reinterpret_cast<const uint8_t*>(m.down_t_data.get() + l * per_layer);
        t.nbytes = per_layer * sizeof(uint16_t);
        L.ffn_down_t = &t;
        L.ffn_down = nullptr;  // one of the two (LayerWeights): the FFN reads ffn_down_t
    }
    stats_.n_down_t_built = int64_t(todo.size());
}

// Weights that matmul always reads whole under the chosen strategy get an interleaved copy
// (cpu/kernels.h, "Interleaved rows"): attention, output, predictor, and the FFN matrices the
// strategy does not gather (gate for dense and exact; up for dense). The file's mapping is kept for
// the rest. A row gives the same bits in either layout (cpu/kernels.h), so PROSPARSE_INTERLEAVE=0,
// which turns this off, changes the speed and not the results.
void Model::interleave_weights(int64_t avail) {
    Impl& m = *impl_;
    const char* env = std::getenv("PROSPARSE_INTERLEAVE");
    if (env && std::string(env) == "0") return;
    std::vector<const Tensor**> slots;  // the pointers to redirect to the copies
    const std::vector<const Tensor*> on_gpu = gpu_only_weights();
    auto want = [&](const Tensor*& t) {
        if (t && can_interleave(*t) && std::find(on_gpu.begin(), on_gpu.end(), t) == on_gpu.end())
            slots.push_back(&t);
    };
    const FfnStrategy s = m.ffn_opt.strategy;
    for (LayerWeights& L : m.layers) {
        for (const Tensor** t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.fc1, &L.fc2, &L.ffn_down}) want(*t);
        if (s != FfnStrategy::PREDICT) want(L.ffn_gate);
        if (s == FfnStrategy::DENSE) want(L.ffn_up);
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
    if (avail >= 0 && double(bytes) > 0.8 * double(avail)) return;
    m.interleaved = interleave(*m.pool, src);
    for (size_t i = 0; i < slots.size(); ++i) *slots[i] = &m.interleaved->tensors[i];
    stats_.n_interleaved = int64_t(slots.size());
}

namespace {

// The placement's view of one layer under the strategy: which rows it reads every token and which
// only when a neuron fires (placement.h), and the neurons' firing frequencies (ffn_act_freq; 1
// where the file has none, which places them as rows read every token).
PlacementLayer placement_layer(const LayerWeights& L, FfnStrategy s, int64_t n_ff, uint64_t kv_bytes) {
    PlacementLayer pl;
    for (const Tensor* t : {L.wq, L.wk, L.wv, L.wo, L.attn_norm, L.ffn_norm}) pl.attention_bytes += t->nbytes;
    pl.kv_bytes = kv_bytes;
    const uint64_t gate = L.ffn_gate->nbytes / uint64_t(n_ff), up = L.ffn_up->nbytes / uint64_t(n_ff);
    const uint64_t down = (L.ffn_down_t ? L.ffn_down_t->nbytes : L.ffn_down->nbytes) / uint64_t(n_ff);
    switch (s) {
        case FfnStrategy::DENSE: pl.neuron_bytes_always = gate + up + down; break;
        case FfnStrategy::EXACT: pl.neuron_bytes_always = gate; pl.neuron_bytes_fired = up + down; break;
        case FfnStrategy::PREDICT:
            pl.neuron_bytes_fired = gate + up + down;
            pl.predictor_bytes = L.fc1->nbytes + L.fc2->nbytes;
            break;
    }
    pl.whole_ffn = L.ffn_down_t == nullptr;  // ffn.h: only ffn_down_t splits a layer's FFN
    pl.freq.assign(size_t(n_ff), 1.0f);
    if (L.act_freq && s != FfnStrategy::DENSE)
        for (int64_t i = 0; i < n_ff; ++i) {
            float f;
            dequantize_row(L.act_freq->type, L.act_freq->data + row_bytes(L.act_freq->type, i), &f, 1);
            pl.freq[size_t(i)] = std::min(1.0f, std::max(0.0f, f));
        }
    return pl;
}

}  // namespace

// device: "cpu", or a GPU ("auto" where there is one, "cuda", "cuda:N"), whose budget places the
// weights read most per byte (placement.h); start_gpu then uploads them.
void Model::place_weights(const ModelParams& params, size_t kv_bytes) {
    Impl& m = *impl_;
    const std::string& want = params.device;
    if (!(params.vram_budget_gib < 0.0) && !std::isfinite(params.vram_budget_gib))
        fail("vram_budget must be a finite number of GiB");
    int asked = -1;  // a device ordinal asked for by "cuda:N"
    if (want.rfind("cuda:", 0) == 0) {
        const std::string n = want.substr(5);
        if (n.empty() || n.size() > 4 || n.find_first_not_of("0123456789") != std::string::npos)
            fail(strfmt("unknown device '%s' (auto, cpu, cuda, cuda:N)", want.c_str()));
        asked = std::stoi(n);
    } else if (want != "auto" && want != "cpu" && want != "cuda") {
        fail(strfmt("unknown device '%s' (auto, cpu, cuda, cuda:N)", want.c_str()));
    }
    PlacementInput in;
    const uint64_t kv_layer = uint64_t(kv_bytes) / uint64_t(hp_.n_layer);
    for (const LayerWeights& L : m.layers) in.layers.push_back(placement_layer(L, m.ffn_opt.strategy, hp_.n_ff, kv_layer));
    const Tensor* onorm = file_->tensor(tensor_name(TensorName::OUTPUT_NORM));
    in.output_bytes = m.output->nbytes + (onorm ? onorm->nbytes : 0);
    bool ordered = true;
    for (const PlacementLayer& pl : in.layers) ordered = ordered && is_frequency_ordered(pl.freq);

    const cuda::DeviceInfo* gpu = nullptr;
    cuda::Status st;
    if (want != "cpu") {
        st = cuda::status();
        for (const cuda::DeviceInfo& d : st.devices)
            if (asked < 0 || d.index == asked) {
                gpu = &d;
                break;
            }
        if (!gpu && want != "auto") {
            if (st.devices.empty()) fail(strfmt("device '%s': no usable GPU: %s", want.c_str(), st.reason.c_str()));
            fail(strfmt("device '%s': there is no such GPU (%zu usable)", want.c_str(), st.devices.size()));
        }
        if (!gpu) stats_.device_note = "no usable GPU: " + st.reason;
        if (gpu && !ordered) {
            const std::string why = "the file's neurons are not in frequency order, so no layer has a hot prefix: "
                                    "rewrite it with prosparse-calibrate --neuron-order frequency";
            if (want != "auto") fail(strfmt("device '%s': %s", want.c_str(), why.c_str()));
            stats_.device_note = why;
            gpu = nullptr;
        }
    }
    if (!gpu) {
        // everything on the CPU; the accounting does not depend on the neurons' order
        for (PlacementLayer& pl : in.layers) std::sort(pl.freq.begin(), pl.freq.end(), std::greater<float>());
        stats_.placement = place(in, 0);
        return;
    }
    const double margin = 0.1 * double(gpu->free_memory) + double(size_t(512) << 20);  // scratch, CUDA context
    const double budget = params.vram_budget_gib >= 0.0 ? params.vram_budget_gib * double(size_t(1) << 30)
                                                         : std::max(0.0, double(gpu->free_memory) - margin);
    stats_.placement = place(in, uint64_t(budget));
    m.placement_in = in;
    stats_.device = strfmt("cuda:%d", gpu->index);
    stats_.vram_budget_bytes = budget;
    m.gpu_index = gpu->index;
}

// Uploads what the placement put on the GPU and routes those layers' work there. The predictor
// runs on the CPU (ffn_forward computes it before the executors; the GPU gets the hot columns of
// its logits), so its bytes move to the CPU's side of the placement's accounting. A GPU that
// cannot take the placement (out of memory, a weight type without GPU kernels) is an error for
// device="cuda"; "auto" then runs on the CPU and says why.
void Model::start_gpu(const ModelParams& params) {
    Impl& m = *impl_;
    if (m.gpu_index < 0) return;
    Placement& pl = stats_.placement;
    if (params.test_split_hot >= 0) fail("test_split_hot is for CPU-only models (device='cpu')");
    // A layer without ffn_down_t keeps its FFN on the CPU (the GPU's down projection reads
    // ffn_down_t rows); its bytes go back to the CPU's side.
    for (size_t il = 0; il < m.layers.size(); ++il) {
        LayerPlacement& lp = pl.layers[il];
        if (m.layers[il].ffn_down_t || lp.n_hot == 0) continue;
        const PlacementLayer& in = m.placement_in.layers[il];
        const double per = double(in.neuron_bytes_always + in.neuron_bytes_fired), n = double(lp.n_hot);
        double expected = 0;
        for (int64_t i = 0; i < lp.n_hot; ++i)
            expected += double(in.neuron_bytes_always) + double(in.freq[size_t(i)]) * double(in.neuron_bytes_fired);
        pl.gpu_bytes -= uint64_t(per * n); pl.cpu_bytes += uint64_t(per * n);
        pl.gpu_bytes_per_token -= expected; pl.cpu_bytes_per_token += expected;
        lp.n_hot = 0;
    }
    GpuModelConfig c;
    c.device = m.gpu_index;
    c.file = file_.get();
    c.hp = &hp_;
    c.layers = &m.layers;
    c.attn_norm = &m.attn_norm;
    c.ffn_norm = &m.ffn_norm;
    c.output = m.output;
    c.output_norm = &m.output_norm;
    c.placement = &pl;
    c.ffn_opt = &m.ffn_opt;
    c.pool = m.pool.get();
    c.kv_type = m.kv->type();
    c.n_ctx = n_ctx_;
    c.n_seq = n_seq();
    c.n_batch = m.n_batch;
    c.allow_resident = true;
    try {
        m.gpu = std::make_unique<GpuModel>(c);
    } catch (const std::exception& e) {
        if (params.device != "auto") throw;
        stats_.device_note = std::string("the GPU could not take the placement, so everything runs on the CPU: ") + e.what();
        stats_.device = "cpu";
        pl = place(m.placement_in, 0);  // everything on the CPU
        stats_.vram_budget_bytes = 0;
        m.gpu_index = -1;
        return;
    }
    if (!m.gpu->resident() && m.ffn_opt.strategy == FfnStrategy::PREDICT)
        for (size_t il = 0; il < m.layers.size(); ++il) {
            const LayerWeights& L = m.layers[il];
            if (!pl.layers[il].attention_on_gpu || !L.fc1) continue;
            const double pred = double(L.fc1->nbytes + L.fc2->nbytes);
            pl.gpu_bytes -= uint64_t(pred); pl.cpu_bytes += uint64_t(pred);
            pl.gpu_bytes_per_token -= pred; pl.cpu_bytes_per_token += pred;
        }
    for (size_t il = 0; il < m.layers.size(); ++il) m.n_hot[il] = m.gpu->n_hot(int(il));
    m.hot = &m.gpu->ffn();
    stats_.gpu_active = true;
    stats_.gpu_resident_bytes = m.gpu->stats().resident_bytes;
}

// The weights only the GPU reads (the CPU then needs no interleaved copy of them): a GPU layer's
// attention matrices, the FFN's gate and up of a layer whose neurons are all on the GPU, the
// predictor where the GPU runs it (everything on the GPU), the output matrix if placed.
std::vector<const Tensor*> Model::gpu_only_weights() const {
    const Impl& m = *impl_;
    std::vector<const Tensor*> out;
    if (!m.gpu) return out;
    for (size_t il = 0; il < m.layers.size(); ++il) {
        const LayerWeights& L = m.layers[il];
        if (m.gpu->attention_on_gpu(int(il))) out.insert(out.end(), {L.wq, L.wk, L.wv, L.wo});
        if (m.gpu->n_hot(int(il)) == hp_.n_ff) out.insert(out.end(), {L.ffn_gate, L.ffn_up});
        if (m.gpu->resident() && L.fc1) out.insert(out.end(), {L.fc1, L.fc2});
    }
    if (m.gpu->output_on_gpu()) out.push_back(m.output);  // (tied: the embedding rows stay in the file)
    return out;
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

int Model::seq_len(int seq) const {
    if (seq < 0 || seq >= n_seq()) fail(strfmt("sequence %d is out of range [0, %d)", seq, n_seq()));
    return seq_len_[size_t(seq)];
}

void Model::rewind(int seq, int n) {
    const int len = seq_len(seq);
    if (n < 0 || n > len)
        fail(strfmt("cannot rewind sequence %d to %d: %d positions are cached", seq, n, len));
    seq_len_[size_t(seq)] = n;
}

namespace {

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

// The attention block on the CPU: RMSNorm, q/k/v, RoPE, the cache, softmax, wo into m.branch.
void attention_block(Model::Impl& m, const HParams& hp, int il, const TokenBatch& batch) {
    ThreadPool& pool = *m.pool;
    const LayerWeights& L = m.layers[size_t(il)];
    const int nb = batch.n, E = hp.n_embd, HD = hp.head_dim, NH = hp.n_head, NKV = hp.n_head_kv;
    const int H = NH * HD, KV = NKV * HD;
    for (int t = 0; t < nb; ++t)
        rms_norm(m.xn.data() + size_t(t) * E, m.x.data() + size_t(t) * E, m.attn_norm[size_t(il)].data(), E, hp.rms_eps);
    matmul(pool, *L.wq, m.xn.data(), nb, m.q.data(), m.act_buf);
    matmul(pool, *L.wk, m.xn.data(), nb, m.k.data(), m.act_buf);
    matmul(pool, *L.wv, m.xn.data(), nb, m.v.data(), m.act_buf);
    for (int t = 0; t < nb; ++t) {
        const float* cs = m.rope_cs.data() + size_t(t) * size_t(hp.n_rot);
        rope(m.q.data() + size_t(t) * H, NH, HD, hp.n_rot, cs);
        rope(m.k.data() + size_t(t) * KV, NKV, HD, hp.n_rot, cs);
        m.kv->store(il, batch.seq[t], batch.pos[t], m.k.data() + size_t(t) * KV, m.v.data() + size_t(t) * KV);
    }
    attention(pool, hp, *m.kv, il, batch, m.q.data(), m.attn.data(), m.attn_scratch);
    matmul(pool, *L.wo, m.attn.data(), nb, m.branch.data(), m.act_buf);
}

// The FFN block: RMSNorm, the strategy on its executors (the hot range on m.hot), the residual.
void ffn_block(Model::Impl& m, const HParams& hp, int il, int nb, FfnLayerStats& st) {
    ThreadPool& pool = *m.pool;
    const LayerWeights& L = m.layers[size_t(il)];
    const int E = hp.n_embd;
    for (int t = 0; t < nb; ++t)
        rms_norm(m.xn.data() + size_t(t) * E, m.x.data() + size_t(t) * E, m.ffn_norm[size_t(il)].data(), E, hp.rms_eps);
    if (m.capture) {
        auto& cx = m.cap_x[size_t(il)];
        auto& cg = m.cap_gate[size_t(il)];
        cx.insert(cx.end(), m.x.begin(), m.x.begin() + std::ptrdiff_t(size_t(nb) * E));
        const size_t off = cg.size();
        cg.resize(off + size_t(nb) * size_t(hp.n_ff));
        matmul(pool, *L.ffn_gate, m.xn.data(), nb, cg.data() + off, m.act_buf);
    }
    ffn_forward(pool, hp, L, m.ffn_opt, m.x.data(), m.xn.data(), nb, m.branch.data(), *m.cpu_ffn, m.hot,
                m.n_hot[size_t(il)], m.ffn, st);
    vec_axpy(m.x.data(), hp.residual_scale, m.branch.data(), int64_t(nb) * E);
    check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::FFN, il);
}

// One layer for the batch in m.x: attention (on the GPU where the placement put it) and the FFN
// (its hot range on m.hot), each added to the residual stream.
void layer_forward(Model::Impl& m, const HParams& hp, int il, const TokenBatch& batch, FfnLayerStats& st) {
    const int nb = batch.n, E = hp.n_embd;
    if (m.gpu && m.gpu->attention_on_gpu(il)) {
        m.gpu->attention(il, batch, m.x.data(), m.branch.data());  // the residual up, the branch down
    } else {
        attention_block(m, hp, il, batch);
    }
    vec_axpy(m.x.data(), hp.residual_scale, m.branch.data(), int64_t(nb) * E);
    check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::ATTENTION, il);
    ffn_block(m, hp, il, nb, st);
}

}  // namespace

void Model::eval(const int32_t* tokens, int n, bool all_logits, float* logits) {
    if (n <= 0) fail("eval needs at least one token");
    if (int64_t(seq_len_[0]) + n > n_ctx_)
        fail(strfmt("context overflow: %d cached + %d new tokens exceed n_ctx = %d", seq_len_[0], n, n_ctx_));
    std::vector<int32_t> pos(static_cast<size_t>(n)), seq(static_cast<size_t>(n), 0);
    for (int i = 0; i < n; ++i) pos[size_t(i)] = seq_len_[0] + i;
    TokenBatch batch;
    batch.token = tokens;
    batch.pos = pos.data();
    batch.seq = seq.data();
    batch.n = n;
    eval(batch, all_logits, logits);
}

void Model::eval(const TokenBatch& in, bool all_logits, float* logits) {
    const int n = in.n;
    if (n <= 0) fail("eval needs at least one token");
    // each sequence's tokens in order, from its length so far; which token is its last here
    std::vector<int> next(seq_len_);
    std::vector<int> last(seq_len_.size(), -1);
    for (int i = 0; i < n; ++i) {
        if (in.token[i] < 0 || in.token[i] >= hp_.n_vocab)
            fail(strfmt("token id %d is out of range [0, %d)", in.token[i], hp_.n_vocab));
        const int s = in.seq[i];
        if (s < 0 || s >= n_seq()) fail(strfmt("sequence %d is out of range [0, %d)", s, n_seq()));
        if (in.pos[i] != next[size_t(s)])
            fail(strfmt("token %d of the batch is at position %d of sequence %d, which holds %d: a sequence's "
                        "tokens come in order, after what it holds", i, in.pos[i], s, next[size_t(s)]));
        if (in.pos[i] >= n_ctx_)
            fail(strfmt("context overflow: sequence %d would need position %d, n_ctx = %d", s, in.pos[i], n_ctx_));
        next[size_t(s)] += 1;
        last[size_t(s)] = i;
    }
    // A sequence with one token in this call takes a decode step (what a generating sequence feeds);
    // a sequence with several runs prompt. A step of several generating sequences is thus that many
    // decode tokens (counted once it has run, below).
    int64_t n_dec = 0;
    for (size_t s = 0; s < next.size(); ++s)
        if (next[s] - seq_len_[s] == 1) n_dec += 1;
    std::vector<uint8_t> wanted(size_t(n), all_logits ? 1 : 0);
    for (int i : last)
        if (i >= 0) wanted[size_t(i)] = 1;

    Impl& m = *impl_;
    const RestorePastOnThrow restore_past(seq_len_);
    const auto t0 = std::chrono::steady_clock::now();
    if (m.capture) {
        m.cap_x.assign(size_t(hp_.n_layer), {});
        m.cap_gate.assign(size_t(hp_.n_layer), {});
    }
    double ffn_bytes0 = 0;
    for (const auto& ls : stats_.layers) ffn_bytes0 += ls.bytes;
    const GpuStats gpu0 = m.gpu ? m.gpu->stats() : GpuStats{};
    const int E = hp_.n_embd, V = hp_.n_vocab;

    float* dst = logits;  // the next logits row to write
    for (int b0 = 0; b0 < n; b0 += m.n_batch) {
        const int nb = std::min(m.n_batch, n - b0);
        TokenBatch batch;
        batch.token = in.token + b0;
        batch.pos = in.pos + b0;
        batch.seq = in.seq + b0;
        batch.n = nb;
        for (int t = 0; t < nb; ++t) {
            float* xt = m.x.data() + size_t(t) * E;
            dequantize_row(m.tok_embd->type, m.tok_embd->row(batch.token[t]), xt, E);
            if (hp_.embedding_scale != 1.0f) vec_scale(xt, hp_.embedding_scale, E);
            // the position's rotations, once for every layer
            rope_table(m.rope_cs.data() + size_t(t) * size_t(hp_.n_rot), hp_.n_rot, batch.pos[t], hp_.rope_theta,
                       hp_.rope_freq_scale);
        }
        check_step(m.trace_non_finite, m.x.data(), size_t(nb) * E, Step::EMBEDDING, -1);
        if (m.gpu) m.gpu->begin_batch(batch, m.rope_cs.data());
        if (m.gpu && m.gpu->resident() && !m.capture && !m.trace_non_finite)
            m.gpu->forward_layers(batch, m.x.data(), stats_.layers.data());  // the residual stays on the GPU
        else
            for (int il = 0; il < hp_.n_layer; ++il) layer_forward(m, hp_, il, batch, stats_.layers[size_t(il)]);
        for (int t = 0; t < nb; ++t) seq_len_[size_t(batch.seq[t])] = batch.pos[t] + 1;

        // output head, only for the rows the caller wants
        int n_out = 0;
        for (int t = 0; t < nb; ++t)
            if (wanted[size_t(b0 + t)])
                rms_norm(m.xn.data() + size_t(n_out++) * E, m.x.data() + size_t(t) * E, m.output_norm.data(), E,
                         hp_.rms_eps);
        if (n_out > 0) {
            if (m.gpu && m.gpu->output_on_gpu())
                m.gpu->output(m.xn.data(), n_out, dst);
            else
                matmul(*m.pool, *m.output, m.xn.data(), n_out, dst, m.act_buf);
            if (hp_.logit_scale != 1.0f) vec_scale(dst, 1.0f / hp_.logit_scale, int64_t(n_out) * V);
            if (!all_finite(dst, size_t(n_out) * V))
                fail_non_finite_logits(m.trace_non_finite, *file_,
                                       [&] { restore_past.rewind(); eval(in, all_logits, logits); });
            dst += size_t(n_out) * V;
        }
    }

    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (m.gpu) {
        const GpuStats& g = m.gpu->stats();
        stats_.gpu_busy_seconds += g.gpu_busy_seconds - gpu0.gpu_busy_seconds;
        stats_.cpu_wait_seconds += g.cpu_wait_seconds - gpu0.cpu_wait_seconds;
        if (n == 1) stats_.gpu_bytes_per_token = g.bytes_read - gpu0.bytes_read;
    }
    double ffn_bytes = -ffn_bytes0;
    for (const auto& ls : stats_.layers) ffn_bytes += ls.bytes;
    if (n_dec == n) {
        if (stats_.step_count.size() <= size_t(n)) {
            stats_.step_count.resize(size_t(n) + 1, 0);
            stats_.step_weight_bytes.resize(size_t(n) + 1, 0.0);
        }
        stats_.step_count[size_t(n)] += 1;
        stats_.step_weight_bytes[size_t(n)] += m.fixed_bytes_per_token + ffn_bytes;
    }
    if (n == 1) {
        stats_.weight_bytes_per_token = m.fixed_bytes_per_token + ffn_bytes;
        stats_.kv_bytes_per_token =
            2.0 * hp_.n_layer * hp_.n_head_kv * double(seq_len_[size_t(in.seq[0])]) * double(m.kv->row_bytes());
    }
    // a step mixing decode and prompt tokens splits its time between them in proportion to the tokens
    stats_.n_decode_tokens += n_dec;
    stats_.n_prompt_tokens += n - n_dec;
    stats_.decode_seconds += secs * double(n_dec) / double(n);
    stats_.prompt_seconds += secs * double(n - n_dec) / double(n);
}

}  // namespace ps

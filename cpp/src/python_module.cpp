// The nanobind module prosparse_rt._core: the only file that knows about Python.
// It translates types and errors and releases the GIL around long work; the friendly API,
// argument checking and docstrings live in python/prosparse_rt.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "common.h"
#include "cpu/kernels.h"
#include "cuda/device.h"
#include "gguf.h"
#include "model.h"
#include "python_bindings.h"
#include "quant.h"
#include "sampler.h"
#include "tokenizer.h"

namespace nb = nanobind;
using namespace nb::literals;
using ps::py::owned_array;
using ps::py::PyTokenizer;
using ps::py::to_bytes;
using ps::py::utf8_str;

namespace {

// Raises type with msg. Messages may quote bytes from a file (a token's text) that are not
// UTF-8; PyErr_SetString would then raise a UnicodeDecodeError instead of the error itself.
void set_error(PyObject* type, const char* msg) {
    PyObject* s = PyUnicode_DecodeUTF8(msg, Py_ssize_t(std::strlen(msg)), "backslashreplace");
    if (!s) return;  // the decoding error is set instead
    PyErr_SetObject(type, s);
    Py_DECREF(s);
}

nb::object gguf_value_to_py(const ps::GGUFValue& v) {
    using T = ps::GGUFType;
    switch (v.type) {
        case T::UINT8: case T::UINT16: case T::UINT32: case T::UINT64:
            return nb::int_(v.u);
        case T::INT8: case T::INT16: case T::INT32: case T::INT64:
            return nb::int_(v.i);
        case T::FLOAT32: case T::FLOAT64: return nb::float_(v.f);
        case T::BOOL: return nb::bool_(v.u != 0);
        case T::STRING: return utf8_str(v.str);
        case T::ARRAY: {
            // Large arrays (vocabularies) are left out of the summary dict: callers that need
            // them read the GGUF with the gguf package.
            if (v.arr_n > 1024) return nb::none();
            nb::list out;
            if (v.arr_type == T::STRING) {
                for (auto s : v.arr_strings) out.append(utf8_str(s));
                return out;
            }
            ps::GGUFValue e;
            e.type = v.arr_type;
            size_t esz = 0;
            switch (v.arr_type) {
                case T::UINT8: case T::INT8: case T::BOOL: esz = 1; break;
                case T::UINT16: case T::INT16: esz = 2; break;
                case T::UINT32: case T::INT32: case T::FLOAT32: esz = 4; break;
                case T::UINT64: case T::INT64: case T::FLOAT64: esz = 8; break;
                default: return nb::none();
            }
            for (uint64_t i = 0; i < v.arr_n; ++i) {
                const uint8_t* p = v.arr_data + i * esz;
                switch (v.arr_type) {
                    case T::UINT8: out.append(nb::int_(p[0])); break;
                    case T::INT8: out.append(nb::int_(int8_t(p[0]))); break;
                    case T::BOOL: out.append(nb::bool_(p[0] != 0)); break;
                    case T::UINT16: { uint16_t x; std::memcpy(&x, p, 2); out.append(nb::int_(x)); break; }
                    case T::INT16: { int16_t x; std::memcpy(&x, p, 2); out.append(nb::int_(x)); break; }
                    case T::UINT32: { uint32_t x; std::memcpy(&x, p, 4); out.append(nb::int_(x)); break; }
                    case T::INT32: { int32_t x; std::memcpy(&x, p, 4); out.append(nb::int_(x)); break; }
                    case T::FLOAT32: { float x; std::memcpy(&x, p, 4); out.append(nb::float_(x)); break; }
                    case T::UINT64: { uint64_t x; std::memcpy(&x, p, 8); out.append(nb::int_(x)); break; }
                    case T::INT64: { int64_t x; std::memcpy(&x, p, 8); out.append(nb::int_(x)); break; }
                    case T::FLOAT64: { double x; std::memcpy(&x, p, 8); out.append(nb::float_(x)); break; }
                    default: break;
                }
            }
            return out;
        }
    }
    return nb::none();
}

nb::dict metadata_dict(const ps::GGUFFile& f) {
    nb::dict d;
    for (const auto& [k, v] : f.metadata()) d[nb::str(k.data(), k.size())] = gguf_value_to_py(v);
    return d;
}


std::vector<int32_t> checked_ids(const std::vector<int32_t>& ids, int n_vocab) {
    for (int32_t id : ids)
        if (id < 0 || id >= n_vocab)
            throw ps::Error(ps::strfmt("token id %d is out of range [0, %d)", id, n_vocab));
    return ids;
}

nb::dict hparams_dict(const ps::HParams& hp) {
    nb::dict d;
    d["arch"] = ps::arch_name(hp.arch);
    d["n_vocab"] = hp.n_vocab; d["n_embd"] = hp.n_embd; d["n_layer"] = hp.n_layer;
    d["n_head"] = hp.n_head; d["n_head_kv"] = hp.n_head_kv; d["n_ff"] = hp.n_ff;
    d["head_dim"] = hp.head_dim; d["n_ctx_train"] = hp.n_ctx_train;
    d["rms_eps"] = hp.rms_eps; d["rope_theta"] = hp.rope_theta;
    d["activation"] = ps::activation_name(hp.act); d["activation_threshold"] = hp.act_threshold;
    d["embedding_scale"] = hp.embedding_scale; d["residual_scale"] = hp.residual_scale;
    d["logit_scale"] = hp.logit_scale;
    return d;
}

}  // namespace

void bind_placement(nb::module_& m);  // python_placement.cpp

NB_MODULE(_core, m) {
    m.doc() = "prosparse-rt native core (use prosparse_rt.Model instead)";
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const ps::NumericError& e) {
            set_error(PyExc_RuntimeError, e.what());
        } catch (const ps::Error& e) {
            set_error(PyExc_ValueError, e.what());
        }
    });

    nb::class_<PyTokenizer>(m, "Tokenizer")
        .def("__init__", [](PyTokenizer* self, const std::string& path) {
            nb::gil_scoped_release r;
            new (self) PyTokenizer(path);
        }, "path"_a)
        .def("encode", [](const PyTokenizer& t, const std::string& text, bool add_bos, bool special) {
            nb::gil_scoped_release r;
            return t.tok->encode(text, add_bos, special);
        }, "text"_a, "add_bos"_a, "special"_a)
        .def("decode", [](const PyTokenizer& t, const std::vector<int32_t>& ids, bool special) {
            return to_bytes(t.tok->decode(checked_ids(ids, t.tok->n_vocab()), special));
        }, "ids"_a, "render_special"_a = false)
        .def("token_to_piece", [](const PyTokenizer& t, int32_t id, bool special) {
            checked_ids({id}, t.tok->n_vocab());
            return to_bytes(t.tok->token_to_piece(id, special));
        }, "id"_a, "render_special"_a = false)
        .def_prop_ro("n_vocab", [](const PyTokenizer& t) { return t.tok->n_vocab(); })
        .def_prop_ro("bos", [](const PyTokenizer& t) { return t.tok->bos(); })
        .def_prop_ro("eos", [](const PyTokenizer& t) { return t.tok->eos(); })
        .def_prop_ro("add_bos_default", [](const PyTokenizer& t) { return t.tok->add_bos_default(); })
        .def("is_eog", [](const PyTokenizer& t, int32_t id) { return t.tok->is_eog(id); });

    nb::class_<ps::Sampler>(m, "Sampler")
        .def("__init__", [](ps::Sampler* self, float temperature, int top_k, float top_p, float min_p,
                            float repeat_penalty, int repeat_last_n, uint64_t seed) {
            ps::SamplerParams p;
            p.temperature = temperature; p.top_k = top_k; p.top_p = top_p; p.min_p = min_p;
            p.repeat_penalty = repeat_penalty; p.repeat_last_n = repeat_last_n; p.seed = seed;
            new (self) ps::Sampler(p);
        }, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "repeat_penalty"_a,
           "repeat_last_n"_a, "seed"_a)
        .def("sample", [](ps::Sampler& s, nb::ndarray<const float, nb::ndim<1>, nb::c_contig> logits,
                          const std::vector<int32_t>& history) {
            return s.sample(logits.data(), int(logits.shape(0)), history);
        }, "logits"_a, "history"_a);

    nb::class_<ps::Model>(m, "Model")
        .def("__init__", [](ps::Model* self, const std::string& path, int n_ctx, int n_threads,
                            int n_batch, const std::string& sparsity, float act_threshold,
                            float pred_threshold, bool diag_recall, std::vector<float> layer_thresholds,
                            const std::string& kv_type, int n_seq, const std::string& device, double vram_budget,
                            int64_t test_split_hot) {
            ps::ModelParams p;
            p.n_ctx = n_ctx; p.n_threads = n_threads; p.n_batch = n_batch;
            p.sparsity = sparsity; p.act_threshold = act_threshold;
            p.pred_threshold = pred_threshold; p.diag_recall = diag_recall;
            p.layer_thresholds = std::move(layer_thresholds);
            p.kv_type = kv_type;
            p.n_seq = n_seq;
            p.device = device;
            p.vram_budget_gib = vram_budget;
            p.test_split_hot = test_split_hot;
            nb::gil_scoped_release r;
            new (self) ps::Model(path, p);
        }, "path"_a, "n_ctx"_a = 0, "n_threads"_a = 0, "n_batch"_a = 256,
           "sparsity"_a = "auto", "act_threshold"_a = NAN, "pred_threshold"_a = NAN,
           "diag_recall"_a = false, "layer_thresholds"_a = std::vector<float>(), "kv_type"_a = "f16",
           "n_seq"_a = 1, "device"_a = "cpu", "vram_budget"_a = -1.0, "test_split_hot"_a = -1,
           "layer_thresholds: per-layer SiLU thresholds replacing the file's ([] = the file's). kv_type: the "
           "KV cache's type (f16, f32, q8_0). n_seq: sequences the KV cache holds. device: auto, cpu, cuda, cuda:N. vram_budget: GiB to place "
           "weights in on the GPU (< 0: its free memory less a margin). test_split_hot: tests only, every layer's neurons [0, n) on a "
           "second CPU executor (-1: none).")
        .def("eval", [](ps::Model& mdl, const std::vector<int32_t>& tokens, bool all_logits) {
            const int n_vocab = mdl.hparams().n_vocab;
            auto ids = checked_ids(tokens, n_vocab);
            std::vector<float> out(size_t(all_logits ? ids.size() : 1) * size_t(n_vocab));
            {
                nb::gil_scoped_release r;
                mdl.eval(ids.data(), int(ids.size()), all_logits, out.data());
            }
            if (all_logits) return owned_array(std::move(out), {ids.size(), size_t(n_vocab)});
            return owned_array(std::move(out), {size_t(n_vocab)});
        }, "tokens"_a, "all_logits"_a = false,
           "Run tokens after the cached ones; returns the last token's logits (or all rows).")
        .def("eval_batch", [](ps::Model& mdl, const std::vector<int32_t>& tokens, const std::vector<int32_t>& pos,
                              const std::vector<int32_t>& seq, bool all_logits) {
            const int n_vocab = mdl.hparams().n_vocab;
            auto ids = checked_ids(tokens, n_vocab);
            if (pos.size() != ids.size() || seq.size() != ids.size())
                throw ps::Error(ps::strfmt("eval_batch: %zu tokens, %zu positions and %zu sequences", ids.size(),
                                           pos.size(), seq.size()));
            size_t rows = ids.size();
            if (!all_logits) {  // the last token of each sequence in the batch
                std::vector<int32_t> seen;
                for (int32_t s : seq)
                    if (std::find(seen.begin(), seen.end(), s) == seen.end()) seen.push_back(s);
                rows = seen.size();
            }
            std::vector<float> out(rows * size_t(n_vocab));
            ps::TokenBatch b;
            b.token = ids.data();
            b.pos = pos.data();
            b.seq = seq.data();
            b.n = int(ids.size());
            {
                nb::gil_scoped_release r;
                mdl.eval(b, all_logits, out.data());
            }
            return owned_array(std::move(out), {rows, size_t(n_vocab)});
        }, "tokens"_a, "pos"_a, "seq"_a, "all_logits"_a = false,
           "Run a batch of several sequences' tokens (each at its sequence's next position); returns the "
           "logits of every token (all_logits) or of each sequence's last token in the batch, in that order.")
        .def("rewind", [](ps::Model& mdl, int n, int seq) { mdl.rewind(seq, n); }, "n"_a, "seq"_a = 0)
        .def("seq_len", &ps::Model::seq_len, "seq"_a)
        .def("set_capture", &ps::Model::set_capture, "on"_a)
        .def("set_layer_thresholds", &ps::Model::set_layer_thresholds, "thresholds"_a,
             "Calibration: replace a SiLU model's per-layer thresholds in memory ([] = none).")
        .def("captured", [](const ps::Model& mdl, int layer) {
            // (x [n, n_embd], gate [n, n_ff]) recorded by the last eval with capture on
            if (layer < 0 || layer >= mdl.hparams().n_layer) throw ps::Error("layer out of range");
            std::vector<float> x = mdl.captured_x(layer), g = mdl.captured_gate(layer);
            const size_t E = size_t(mdl.hparams().n_embd), F = size_t(mdl.hparams().n_ff);
            const size_t n = x.size() / E;
            return nb::make_tuple(owned_array(std::move(x), {n, E}), owned_array(std::move(g), {n, F}));
        }, "layer"_a)
        .def_prop_ro("n_past", &ps::Model::n_past)
        .def_prop_ro("n_ctx", &ps::Model::n_ctx)
        .def_prop_ro("n_threads", &ps::Model::n_threads)
        .def_prop_ro("strategy", &ps::Model::strategy)
        .def_prop_ro("n_vocab", [](const ps::Model& mdl) { return mdl.hparams().n_vocab; })
        .def_prop_ro("hparams", [](const ps::Model& mdl) { return hparams_dict(mdl.hparams()); })
        .def_prop_ro("metadata", [](const ps::Model& mdl) { return metadata_dict(mdl.file()); })
        .def("tokenize", [](const ps::Model& mdl, const std::string& text, bool add_bos, bool special) {
            nb::gil_scoped_release r;
            return mdl.tokenizer().encode(text, add_bos, special);
        }, "text"_a, "add_bos"_a, "special"_a)
        .def("detokenize", [](const ps::Model& mdl, const std::vector<int32_t>& ids, bool special) {
            return to_bytes(mdl.tokenizer().decode(checked_ids(ids, mdl.tokenizer().n_vocab()), special));
        }, "ids"_a, "render_special"_a = false)
        .def("token_to_piece", [](const ps::Model& mdl, int32_t id, bool special) {
            checked_ids({id}, mdl.tokenizer().n_vocab());
            return to_bytes(mdl.tokenizer().token_to_piece(id, special));
        }, "id"_a, "render_special"_a = false)
        .def("is_eog", [](const ps::Model& mdl, int32_t id) { return mdl.tokenizer().is_eog(id); })
        .def_prop_ro("bos", [](const ps::Model& mdl) { return mdl.tokenizer().bos(); })
        .def_prop_ro("eos", [](const ps::Model& mdl) { return mdl.tokenizer().eos(); })
        .def_prop_ro("add_bos_default", [](const ps::Model& mdl) { return mdl.tokenizer().add_bos_default(); })
        .def("stats", [](const ps::Model& mdl) {
            const auto& s = mdl.stats();
            nb::dict d;
            d["n_prompt_tokens"] = s.n_prompt_tokens; d["n_decode_tokens"] = s.n_decode_tokens;
            d["prompt_seconds"] = s.prompt_seconds; d["decode_seconds"] = s.decode_seconds;
            d["weight_bytes_per_token"] = s.weight_bytes_per_token;
            d["n_interleaved"] = s.n_interleaved;
            d["n_down_t_built"] = s.n_down_t_built;
            {
                // where the weights are, and what each device reads and spends per token
                nb::dict pd;
                nb::list layers;
                for (const auto& l : s.placement.layers) {
                    nb::dict x;
                    x["attention_on_gpu"] = l.attention_on_gpu;
                    x["n_hot"] = l.n_hot;
                    layers.append(x);
                }
                pd["device"] = s.device;
                pd["gpu_active"] = s.gpu_active;
                pd["note"] = s.device_note;
                pd["vram_budget_bytes"] = s.vram_budget_bytes;
                pd["layers"] = layers;
                pd["output_on_gpu"] = s.placement.output_on_gpu;
                pd["bytes"] = nb::dict();
                pd["bytes"]["gpu"] = s.placement.gpu_bytes;
                pd["bytes"]["cpu"] = s.placement.cpu_bytes;
                pd["bytes_read_per_token"] = nb::dict();
                pd["bytes_read_per_token"]["gpu"] = s.placement.gpu_bytes_per_token;
                pd["bytes_read_per_token"]["cpu"] = s.placement.cpu_bytes_per_token;
                // measured: the weight bytes each device read for the last decoded token
                pd["measured_bytes_per_token"] = nb::dict();
                pd["measured_bytes_per_token"]["gpu"] = s.gpu_bytes_per_token;
                pd["measured_bytes_per_token"]["cpu"] = s.weight_bytes_per_token - s.gpu_bytes_per_token;
                pd["gpu_resident_bytes"] = s.gpu_resident_bytes;
                // time per device since load: the GPU's busy time (its queued work, transfers
                // included) and the CPU's own work (eval time less the time it waited on the GPU);
                // how long the CPU sat waiting and the GPU sat idle, which a placement should keep small
                const double total = s.prompt_seconds + s.decode_seconds;
                pd["seconds"] = nb::dict();
                pd["seconds"]["gpu"] = s.gpu_busy_seconds;
                pd["seconds"]["cpu"] = total - s.cpu_wait_seconds;
                pd["cpu_wait_seconds"] = s.cpu_wait_seconds;
                pd["gpu_busy_seconds"] = s.gpu_busy_seconds;
                pd["gpu_idle_seconds"] = s.gpu_active ? std::max(0.0, total - s.gpu_busy_seconds) : 0.0;
                d["placement"] = pd;
            }
            d["kv_type"] = s.kv_type;
            d["kv_cache_bytes"] = s.kv_cache_bytes;
            d["kv_bytes_per_token"] = s.kv_bytes_per_token;
            // per layer, averaged over the tokens seen (NaN where the strategy cannot know)
            nb::list active, predicted, recall, ffn_bytes;
            const bool predicts = mdl.strategy() == "predict";
            for (const auto& l : s.layers) {
                active.append(l.active_known ? l.active / double(l.active_known) / mdl.hparams().n_ff : NAN);
                predicted.append(predicts && l.tokens ? l.predicted / double(l.tokens) / mdl.hparams().n_ff : NAN);
                recall.append(l.recall_total > 0 ? l.recall_hit / l.recall_total : NAN);
                ffn_bytes.append(l.tokens ? l.bytes / double(l.tokens) : 0.0);
            }
            d["active_fraction"] = active; d["predicted_fraction"] = predicted;
            d["recall"] = recall; d["ffn_bytes_per_token"] = ffn_bytes;
            // the union of the active rows over a step's tokens, as a fraction of n_ff, averaged over
            // layers and steps, by the step's token count (exact, predict)
            nb::dict union_by_n;
            const size_t n_max = s.layers.empty() ? 0 : s.layers[0].union_steps.size();
            for (size_t n = 1; n < n_max; ++n) {
                double sum = 0.0;
                int64_t steps = 0;
                for (const auto& l : s.layers) {
                    if (n >= l.union_steps.size() || l.union_steps[n] == 0) continue;
                    sum += l.union_rows[n] / double(l.union_steps[n]);
                    steps = std::max(steps, l.union_steps[n]);
                }
                if (steps > 0)
                    union_by_n[nb::int_(n)] = sum / double(s.layers.size()) / mdl.hparams().n_ff;
            }
            d["union_fraction_by_batch"] = union_by_n;
            // weight bytes one decode step of n tokens read, averaged over such steps
            nb::dict step_bytes;
            for (size_t n = 1; n < s.step_count.size(); ++n)
                if (s.step_count[n] > 0) step_bytes[nb::int_(n)] = s.step_weight_bytes[n] / double(s.step_count[n]);
            d["weight_bytes_per_step_by_batch"] = step_bytes;
            return d;
        });

    m.def("gguf_summary", [](const std::string& path) {
        std::unique_ptr<ps::GGUFFile> f;
        {
            nb::gil_scoped_release r;
            f = std::make_unique<ps::GGUFFile>(path);
        }
        nb::dict d;
        d["version"] = f->version();
        d["powerinfer"] = f->is_powerinfer();
        d["metadata"] = metadata_dict(*f);
        nb::list ts;
        for (const auto& tn : f->tensors()) {
            nb::list shape;
            for (int i = 0; i < tn.n_dims; ++i) shape.append(tn.ne[i]);
            ts.append(nb::make_tuple(tn.name, ps::type_name(tn.type), shape, tn.nbytes));
        }
        d["tensors"] = ts;
        return d;
    }, "path"_a,
          "A GGUF file as the native loader reads and validates it: version, PWRI magic, metadata, "
          "tensors (name, type, shape, bytes). Fast: no weights are read.");

    m.def("active_isa", []() { return std::string(ps::cpu::kernels().isa); },
          "The instruction set whose kernels run: scalar, avx2 or avx512 (chosen at start-up from the CPU).");

    ps::py::register_test_hooks(m);
    ps::py::register_cuda_hooks(m);
    ps::py::register_quant_search(m);

    auto cuda_status = []() {
        ps::cuda::Status st;
        {
            nb::gil_scoped_release r;  // the first query initialises the driver: can take seconds
            st = ps::cuda::status();
        }
        nb::list devs;
        for (const auto& d : st.devices) {
            nb::dict x;
            x["index"] = d.index; x["name"] = d.name;
            x["compute_capability"] = ps::strfmt("%d.%d", d.cc_major, d.cc_minor);
            x["total_memory"] = d.total_memory; x["free_memory"] = d.free_memory;
            devs.append(x);
        }
        nb::dict r;
        r["compiled"] = st.compiled; r["devices"] = devs; r["reason"] = st.reason;
        return r;
    };
    m.def("cuda_status", cuda_status,
          "{'compiled': this build has CUDA, 'devices': the usable GPUs, 'reason': why there is no "
          "usable GPU (no driver, no device, too old, built without CUDA), or '' when all are usable}");
    m.def("cuda_devices", [cuda_status]() { return nb::borrow<nb::list>(cuda_status()["devices"]); },
          "The usable GPUs: [{'index', 'name', 'compute_capability' ('8.9'), 'total_memory', "
          "'free_memory' (bytes)}]; [] without a driver or device (cuda_status()['reason'] says why).");
    bind_placement(m);
}

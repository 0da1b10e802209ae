// The nanobind module prosparse_rt._core: the only file that knows about Python.
// It translates types and errors and releases the GIL around long work; the friendly API,
// argument checking and docstrings live in python/prosparse_rt.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <memory>
#include <mutex>

#include "common.h"
#include "cpu/kernels.h"
#include "cuda/device.h"
#include "gguf.h"
#include "model.h"
#include "ops.h"
#include "quant.h"
#include "sampler.h"
#include "threadpool.h"
#include "tokenizer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using F32Array = nb::ndarray<nb::numpy, float>;

// A numpy array that owns a heap copy of its data (never a view into a reused buffer).
F32Array owned_array(std::vector<float>&& v, std::initializer_list<size_t> shape) {
    auto* heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return F32Array(heap->data(), shape.size(), shape.begin(), owner);
}

nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

// GGUF strings should be UTF-8, but a few real vocabularies hold invalid sequences: decode with
// U+FFFD replacements instead of failing the whole metadata dict.
nb::str utf8_str(std::string_view s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "replace");
    if (!o) throw nb::python_error();
    return nb::steal<nb::str>(o);
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

// A tokenizer loaded on its own from a GGUF (tests and tools that need no weights).
struct PyTokenizer {
    std::unique_ptr<ps::GGUFFile> file;
    std::unique_ptr<ps::Tokenizer> tok;
    explicit PyTokenizer(const std::string& path)
        : file(std::make_unique<ps::GGUFFile>(path)), tok(ps::Tokenizer::from_gguf(*file)) {}
};

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
        } catch (const ps::Error& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
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
                            float pred_threshold, bool diag_recall) {
            ps::ModelParams p;
            p.n_ctx = n_ctx; p.n_threads = n_threads; p.n_batch = n_batch;
            p.sparsity = sparsity; p.act_threshold = act_threshold;
            p.pred_threshold = pred_threshold; p.diag_recall = diag_recall;
            nb::gil_scoped_release r;
            new (self) ps::Model(path, p);
        }, "path"_a, "n_ctx"_a = 0, "n_threads"_a = 0, "n_batch"_a = 256,
           "sparsity"_a = "auto", "act_threshold"_a = NAN, "pred_threshold"_a = NAN,
           "diag_recall"_a = false)
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
        .def("rewind", &ps::Model::rewind, "n"_a)
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
            // per layer, averaged over the tokens seen (NaN where the strategy cannot know)
            nb::list active, predicted, recall, ffn_bytes;
            for (const auto& l : s.layers) {
                active.append(l.active_known ? l.active / double(l.active_known) / mdl.hparams().n_ff : NAN);
                predicted.append(l.tokens && l.predicted > 0 ? l.predicted / double(l.tokens) / mdl.hparams().n_ff : NAN);
                recall.append(l.recall_total > 0 ? l.recall_hit / l.recall_total : NAN);
                ffn_bytes.append(l.tokens ? l.bytes / double(l.tokens) : 0.0);
            }
            d["active_fraction"] = active; d["predicted_fraction"] = predicted;
            d["recall"] = recall; d["ffn_bytes_per_token"] = ffn_bytes;
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

    // Low-level hooks for the tests, which compare our kernels and loader against the gguf
    // package and numpy. Not part of the API.
    nb::module_ t = m.def_submodule("_testing", "internal test hooks");
    t.def("isas", []() {
        std::vector<std::string> out;
        for (const char* n : {"scalar", "avx2", "avx512"})
            if (ps::cpu::kernels_for(n)) out.emplace_back(n);
        return out;
    });
    t.def("active_isa", []() { return std::string(ps::cpu::kernels().isa); });
    t.def("type_name", [](uint32_t type) { return std::string(ps::type_name(type)); });
    // Tokenizes arbitrary bytes (invalid UTF-8 included), which a Python str cannot carry.
    t.def("encode_bytes", [](const PyTokenizer& tok, nb::bytes data, bool add_bos, bool special) {
        return tok.tok->encode(std::string_view(data.c_str(), data.size()), add_bos, special);
    }, "tokenizer"_a, "data"_a, "add_bos"_a, "special"_a);
    t.def("dequantize", [](uint32_t type, nb::bytes data, int64_t n) {
        auto ty = ps::GgmlType(type);
        if (!ps::type_supported(ty)) throw ps::Error("unsupported type");
        if (n < 0 || n % ps::type_info(type)->block_size != 0 || size_t(data.size()) != ps::row_bytes(ty, n))
            throw ps::Error("size mismatch");
        std::vector<float> out(static_cast<size_t>(n));
        ps::dequantize_row(ty, data.c_str(), out.data(), n);
        return owned_array(std::move(out), {size_t(n)});
    }, "type"_a, "data"_a, "n"_a);
    t.def("quantize", [](uint32_t type, nb::ndarray<const float, nb::ndim<1>, nb::c_contig> x) {
        auto ty = ps::GgmlType(type);
        int64_t n = int64_t(x.shape(0));
        if (!ps::type_supported(ty) || n % ps::type_info(type)->block_size != 0)
            throw ps::Error("unsupported type or size");
        std::string out(ps::row_bytes(ty, n), '\0');
        ps::quantize_row(ty, x.data(), &out[0], n);
        return to_bytes(out);
    }, "type"_a, "x"_a);
    t.def("gemm", [](const std::string& isa, uint32_t type, nb::bytes W, int64_t nr, int64_t k,
                     nb::ndarray<const float, nb::ndim<2>, nb::c_contig> X, bool interleaved) {
        const ps::cpu::KernelSet* ks = ps::cpu::kernels_for(isa.c_str());
        if (!ks) throw ps::Error("isa not available: " + isa);
        auto ty = ps::GgmlType(type);
        if (!ps::type_supported(ty) || k % ps::type_info(type)->block_size != 0 ||
            size_t(W.size()) != size_t(nr) * ps::row_bytes(ty, k) || int64_t(X.shape(1)) != k)
            throw ps::Error("shape mismatch");
        const int64_t nc = int64_t(X.shape(0));
        const size_t xs = ps::cpu::act_row_bytes(ty, k);
        std::vector<uint8_t> xa(xs * size_t(nc));
        for (int64_t c = 0; c < nc; ++c) ks->quantize_act(ty, X.data() + c * k, xa.data() + c * xs, k);
        std::vector<float> Y(size_t(nc * nr));
        if (interleaved) {  // the kernel on the model's interleaved copy (cpu/kernels.h, "Interleaved rows")
            ps::Tensor w;
            w.name = "w"; w.type = ty; w.n_dims = 2; w.ne[0] = k; w.ne[1] = nr;
            w.data = reinterpret_cast<const uint8_t*>(W.c_str()); w.nbytes = W.size();
            ps::ThreadPool pool(1);
            const auto il = ps::interleave(pool, {&w});  // throws if the type/shape cannot be
            ks->gemm_interleaved(ty, k, il->tensors[0].data, nr / ps::cpu::kGroupRows, xa.data(), xs, nc,
                                 Y.data(), nr);
        } else {
            ks->gemm(ty, k, W.c_str(), ps::row_bytes(ty, k), nr, xa.data(), xs, nc, Y.data(), nr);
        }
        return owned_array(std::move(Y), {size_t(nc), size_t(nr)});
    }, "isa"_a, "type"_a, "W"_a, "nr"_a, "k"_a, "X"_a, "interleaved"_a = false);
    t.def("matmul", [](uint32_t type, nb::bytes W, int64_t nr, int64_t k,
                       nb::ndarray<const float, nb::ndim<2>, nb::c_contig> X, int n_threads, bool interleaved) {
        ps::Tensor w;
        w.name = "w"; w.type = ps::GgmlType(type); w.n_dims = 2; w.ne[0] = k; w.ne[1] = nr;
        if (!ps::type_supported(w.type) || k % ps::type_info(type)->block_size != 0 ||
            size_t(W.size()) != size_t(nr) * ps::row_bytes(w.type, k) || int64_t(X.shape(1)) != k)
            throw ps::Error("shape mismatch");
        w.data = reinterpret_cast<const uint8_t*>(W.c_str()); w.nbytes = W.size();
        const int64_t nt = int64_t(X.shape(0));
        std::vector<float> Y(size_t(nt * nr));
        std::vector<uint8_t> scratch;
        ps::ThreadPool pool(n_threads);
        std::unique_ptr<ps::InterleavedSet> il;  // the model's interleaved copy, when asked for
        if (interleaved) il = ps::interleave(pool, {&w});
        ps::matmul(pool, il ? il->tensors[0] : w, X.data(), nt, Y.data(), scratch);
        return owned_array(std::move(Y), {size_t(nt), size_t(nr)});
    }, "type"_a, "W"_a, "nr"_a, "k"_a, "X"_a, "n_threads"_a, "interleaved"_a = false);
    t.attr("gguf_summary") = m.attr("gguf_summary");
    // Loader/weight-type hooks for tests/test_gguf.py and tests/test_quant.py.
    t.def("gguf_tensor_bytes", [](const std::string& path, const std::string& name) {
        ps::GGUFFile f(path);
        const ps::Tensor* tn = f.tensor(name);
        if (!tn) throw ps::Error("no tensor named " + name);
        return nb::bytes(reinterpret_cast<const char*>(tn->data), tn->nbytes);
    }, "path"_a, "name"_a);
    t.def("gguf_get", [](const std::string& path, const std::string& key,
                         const std::string& kind) -> nb::object {
        ps::GGUFFile f(path);
        if (kind == "str") return utf8_str(f.get_str(key));
        if (kind == "int") return nb::int_(f.get_int(key));
        if (kind == "float") return nb::float_(f.get_float(key));
        if (kind == "bool") return nb::bool_(f.get_bool(key, false));
        if (kind == "str_array") {
            nb::list out;
            for (auto s : f.get_str_array(key)) out.append(utf8_str(s));
            return out;
        }
        if (kind == "float_array") return nb::cast(f.get_float_array(key));
        if (kind == "int_array") return nb::cast(f.get_int_array(key));
        throw ps::Error("unknown kind " + kind);
    }, "path"_a, "key"_a, "kind"_a);
    t.def("type_layout", [](uint32_t type) -> nb::object {
        const ps::TypeInfo* ti = ps::type_info(type);
        if (!ti) return nb::none();
        return nb::make_tuple(ti->name, ti->block_size, ti->block_bytes, ti->supported);
    }, "type"_a);
    t.def("quantize_q8_1", [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig> x) {
        const int64_t n = int64_t(x.shape(0));
        std::vector<ps::block_q8_1> out(size_t(n / ps::QK));
        ps::quantize_row_q8_1(x.data(), out.data(), n);
        return nb::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(ps::block_q8_1));
    }, "x"_a);
    // ---- BEGIN kernel test/bench hooks (tests/test_kernels.py, bench/bench_kernels.py) ----
    // Weights are a raw bytes buffer of nr rows of k weights of `type`; the isa argument picks a
    // kernel set directly (kernels_for), the *_op hooks go through ops.cpp and the active set.
    struct KWeight {
        ps::Tensor t;
        explicit KWeight(uint32_t type, const nb::bytes& W, int64_t nr, int64_t k) {
            t.name = "w"; t.type = ps::GgmlType(type); t.n_dims = 2; t.ne[0] = k; t.ne[1] = nr;
            const ps::TypeInfo* ti = ps::type_info(type);
            if (!ti || !ti->supported || nr < 0 || k <= 0 || k % ti->block_size != 0 ||
                ps::cpu::weight_bytes(t.type, k) == 0 || size_t(W.size()) != size_t(nr) * ps::row_bytes(t.type, k))
                throw ps::Error("weight type/shape does not match the buffer");
            t.data = reinterpret_cast<const uint8_t*>(W.c_str()); t.nbytes = W.size();
        }
    };
    auto kset = [](const std::string& isa) {
        const ps::cpu::KernelSet* ks = ps::cpu::kernels_for(isa.c_str());
        if (!ks) throw ps::Error("isa not available: " + isa);
        return ks;
    };
    auto check_rows = [](const std::vector<int32_t>& rows, int64_t nr) {
        for (int32_t r : rows)
            if (r < 0 || r >= nr) throw ps::Error("row index out of range");
    };
    t.def("quantize_act", [kset](const std::string& isa, uint32_t type,
                                 nb::ndarray<const float, nb::ndim<1>, nb::c_contig> x) {
        const ps::cpu::KernelSet* ks = kset(isa);
        const int64_t k = int64_t(x.shape(0));
        if (ps::cpu::weight_bytes(ps::GgmlType(type), k) == 0 || k % ps::QK != 0)
            throw ps::Error("unsupported type or size");
        std::string out(ps::cpu::act_row_bytes(ps::GgmlType(type), k), '\0');
        ks->quantize_act(ps::GgmlType(type), x.data(), &out[0], k);
        return to_bytes(out);
    }, "isa"_a, "type"_a, "x"_a);
    t.def("gemm_rows", [kset, check_rows](const std::string& isa, uint32_t type, nb::bytes W, int64_t nr,
                                          int64_t k, const std::vector<int32_t>& rows,
                                          nb::ndarray<const float, nb::ndim<2>, nb::c_contig> X) {
        const ps::cpu::KernelSet* ks = kset(isa);
        KWeight w(type, W, nr, k);
        check_rows(rows, nr);
        if (int64_t(X.shape(1)) != k) throw ps::Error("shape mismatch");
        const int64_t nc = int64_t(X.shape(0)), n = int64_t(rows.size());
        const size_t xs = ps::cpu::act_row_bytes(w.t.type, k);
        std::vector<uint8_t> xa(xs * size_t(nc));
        for (int64_t c = 0; c < nc; ++c) ks->quantize_act(w.t.type, X.data() + c * k, xa.data() + c * xs, k);
        std::vector<float> Y(size_t(nc * n));
        ks->gemm_rows(w.t.type, k, w.t.data, w.t.row_stride(), rows.data(), n, xa.data(), xs, nc, Y.data(), n);
        return owned_array(std::move(Y), {size_t(nc), size_t(n)});
    }, "isa"_a, "type"_a, "W"_a, "nr"_a, "k"_a, "rows"_a, "X"_a);
    t.def("axpy_rows", [kset, check_rows](const std::string& isa, uint32_t type, nb::bytes W, int64_t nr,
                                          int64_t k, std::optional<std::vector<int32_t>> rows,
                                          nb::ndarray<const float, nb::ndim<2>, nb::c_contig> C,
                                          nb::ndarray<const float, nb::ndim<2>, nb::c_contig> Y0) {
        const ps::cpu::KernelSet* ks = kset(isa);
        KWeight w(type, W, nr, k);
        const int64_t n = rows ? int64_t(rows->size()) : nr;
        if (rows) check_rows(*rows, nr);
        const int64_t nc = int64_t(C.shape(0));
        if (int64_t(C.shape(1)) != n || int64_t(Y0.shape(0)) != nc || int64_t(Y0.shape(1)) != k)
            throw ps::Error("shape mismatch");
        std::vector<float> Y(Y0.data(), Y0.data() + size_t(nc * k));
        ks->axpy_rows(w.t.type, k, w.t.data, w.t.row_stride(), rows ? rows->data() : nullptr, n,
                      C.data(), n, nc, Y.data(), k);
        return owned_array(std::move(Y), {size_t(nc), size_t(k)});
    }, "isa"_a, "type"_a, "W"_a, "nr"_a, "k"_a, "rows"_a, "C"_a, "Y0"_a);
    t.def("matmul_rows", [](uint32_t type, nb::bytes W, int64_t nr, int64_t k, const std::vector<int32_t>& rows,
                            nb::ndarray<const float, nb::ndim<2>, nb::c_contig> X, int n_threads) {
        KWeight w(type, W, nr, k);
        if (int64_t(X.shape(1)) != k) throw ps::Error("shape mismatch");
        const int64_t nt = int64_t(X.shape(0)), n = int64_t(rows.size());
        std::vector<float> Y(size_t(nt * n));
        std::vector<uint8_t> scratch;
        {
            nb::gil_scoped_release r;
            ps::ThreadPool pool(n_threads);
            ps::matmul_rows(pool, w.t, rows.data(), n, X.data(), nt, Y.data(), scratch);
        }
        return owned_array(std::move(Y), {size_t(nt), size_t(n)});
    }, "type"_a, "W"_a, "nr"_a, "k"_a, "rows"_a, "X"_a, "n_threads"_a);
    t.def("axpy_rows_op", [](uint32_t type, nb::bytes W, int64_t nr, int64_t k,
                             std::optional<std::vector<int32_t>> rows,
                             nb::ndarray<const float, nb::ndim<2>, nb::c_contig> C, int n_threads) {
        KWeight w(type, W, nr, k);
        const int64_t n = rows ? int64_t(rows->size()) : nr;
        const int64_t nt = int64_t(C.shape(0));
        if (int64_t(C.shape(1)) != n) throw ps::Error("shape mismatch");
        std::vector<float> Y(size_t(nt * k));
        {
            nb::gil_scoped_release r;
            ps::ThreadPool pool(n_threads);
            ps::axpy_rows(pool, w.t, rows ? rows->data() : nullptr, n, C.data(), nt, Y.data());
        }
        return owned_array(std::move(Y), {size_t(nt), size_t(k)});
    }, "type"_a, "W"_a, "nr"_a, "k"_a, "rows"_a, "C"_a, "n_threads"_a);
    t.def("parallel_for_raises", [](int n_threads, int64_t n_tasks, int64_t bad_task) {
        // Runs n_tasks tasks of which bad_task throws; returns how many ran (for the pool tests).
        std::atomic<int64_t> ran{0};
        nb::gil_scoped_release r;
        ps::ThreadPool pool(n_threads);
        pool.parallel_for(n_tasks, [&](int64_t t, int) {
            ran.fetch_add(1);
            if (t == bad_task) throw ps::Error(ps::strfmt("task %lld failed", (long long)t));
        });
        return ran.load();
    }, "n_threads"_a, "n_tasks"_a, "bad_task"_a);
    t.def("pool_runs_after_error", [](int n_threads, int64_t n_tasks) {
        // A job that throws, then a clean one on the same pool: returns the clean job's task count.
        nb::gil_scoped_release r;
        ps::ThreadPool pool(n_threads);
        try {
            pool.parallel_for(n_tasks, [](int64_t t, int) { if (t == 0) throw ps::Error("first job fails"); });
        } catch (const ps::Error&) {
        }
        std::atomic<int64_t> ran{0};
        pool.parallel_for(n_tasks, [&](int64_t, int) { ran.fetch_add(1); });
        return ran.load();
    }, "n_threads"_a, "n_tasks"_a);
    t.def("bench_op", [](const std::string& op, uint32_t type, nb::bytes W, int64_t nr, int64_t k,
                         int64_t n_copies, int64_t n_tokens, int64_t n_active, int n_threads,
                         double min_seconds) {
        // Seconds of each call of matmul / matmul_rows / axpy_rows on the active kernel set,
        // one persistent pool (as in the model), repeated for at least min_seconds. W holds
        // n_copies matrices of nr x k, used in turn, so that a working set larger than the L3
        // cache measures DRAM bandwidth as a model's many layers do.
        if (n_copies < 1 || nr < 1 || size_t(W.size()) % size_t(n_copies) != 0)
            throw ps::Error("bad copies");
        const size_t per = size_t(W.size()) / size_t(n_copies);
        nb::bytes first(W.c_str(), per);
        KWeight probe(type, first, nr, k);  // validates type and shape
        std::vector<ps::Tensor> mats(size_t(n_copies), probe.t);
        for (int64_t i = 0; i < n_copies; ++i)
            mats[size_t(i)].data = reinterpret_cast<const uint8_t*>(W.c_str()) + size_t(i) * per;
        if (n_tokens < 1 || n_active < 0 || n_active > nr) throw ps::Error("bad sizes");
        nb::gil_scoped_release r;
        ps::ThreadPool pool(n_threads);
        std::unique_ptr<ps::InterleavedSet> owned;  // "matmul_interleaved": the model's layout
        if (op == "matmul_interleaved") {
            std::vector<const ps::Tensor*> src;
            for (const ps::Tensor& m : mats) src.push_back(&m);
            owned = ps::interleave(pool, src);
            for (size_t i = 0; i < mats.size(); ++i) mats[i] = owned->tensors[i];
        }
        const bool axpy = op == "axpy_rows";
        std::vector<float> X(size_t(n_tokens * (axpy ? n_active : k)));
        for (size_t i = 0; i < X.size(); ++i) X[i] = float(int(i * 2654435761u % 1000) - 500) * 1e-3f;
        const bool whole = op == "matmul" || op == "matmul_interleaved";
        std::vector<float> Y(size_t(n_tokens * (axpy ? k : (whole ? nr : n_active))));
        std::vector<int32_t> rows(static_cast<size_t>(n_active));
        for (int64_t i = 0; i < n_active; ++i) rows[size_t(i)] = int32_t(i * nr / std::max<int64_t>(n_active, 1));
        std::vector<uint8_t> scratch;
        int64_t iters = 0;
        auto once = [&] {
            const ps::Tensor& w = mats[size_t(iters % n_copies)];
            if (whole) ps::matmul(pool, w, X.data(), n_tokens, Y.data(), scratch);
            else if (op == "matmul_rows") ps::matmul_rows(pool, w, rows.data(), n_active, X.data(), n_tokens, Y.data(), scratch);
            else if (axpy) ps::axpy_rows(pool, w, rows.data(), n_active, X.data(), n_tokens, Y.data());
            else throw ps::Error("unknown op " + op);
        };
        for (int64_t i = 0; i < n_copies; ++i, ++iters) once();  // page in every copy
        iters = 0;
        std::vector<double> times;  // every call's seconds: callers report median and best
        const auto t0 = std::chrono::steady_clock::now();
        auto last = t0;
        do {
            once();
            ++iters;
            const auto t = std::chrono::steady_clock::now();
            times.push_back(std::chrono::duration<double>(t - last).count());
            last = t;
        } while (std::chrono::duration<double>(last - t0).count() < min_seconds);
        return times;
    }, "op"_a, "type"_a, "W"_a, "nr"_a, "k"_a, "n_copies"_a, "n_tokens"_a, "n_active"_a,
       "n_threads"_a, "min_seconds"_a);
    // ---- END kernel test/bench hooks ----
}

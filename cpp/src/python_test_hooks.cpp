// prosparse_rt._core._testing: low-level hooks through which the tests compare our kernels and
// loader against the gguf package and numpy, and the kernel benchmark times them. Not part of the
// API; registered by python_module.cpp.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "gguf.h"
#include "ops.h"
#include "python_bindings.h"
#include "quant.h"
#include "threadpool.h"
#include "tokenizer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace ps::py {

void register_test_hooks(nb::module_& m) {
    nb::module_ t = m.def_submodule("_testing", "internal test hooks");
    t.def("isas", []() {
        std::vector<std::string> out;
        for (const char* n : {"scalar", "avx2", "avx512"})
            if (ps::cpu::kernels_for(n)) out.emplace_back(n);
        return out;
    });
    t.attr("active_isa") = m.attr("active_isa");
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
        if (!ps::cpu::has_kernels(ps::GgmlType(type)) || k <= 0 || k % ps::cpu::traits(ps::GgmlType(type)).block != 0)
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
    // one attention tile through tile (attn_tile, or attn_tile_f16 with K and V as IEEE halves:
    // numpy float16 viewed as uint16): K and V [n][hd] as the cache holds them; returns (m, l, o[hd])
    auto attn_hook = [kset](auto tile, const std::string& isa, nb::ndarray<const float, nb::ndim<1>, nb::c_contig> q,
                            auto K, auto V, float scale) {
        const ps::cpu::KernelSet* ks = kset(isa);
        const int n = int(K.shape(0)), hd = int(K.shape(1));
        if (n < 1 || n > ps::cpu::kAttnTileMax || int(q.shape(0)) != hd || int(V.shape(0)) != n ||
            int(V.shape(1)) != hd)
            throw ps::Error("shape mismatch");
        std::vector<float> part(size_t(hd) + 2);
        (ks->*tile)(q.data(), K.data(), V.data(), n, hd, scale, part.data());
        return owned_array(std::move(part), {size_t(hd) + 2});
    };
    using F32Rows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig>;
    using F16Rows = nb::ndarray<const uint16_t, nb::ndim<2>, nb::c_contig>;
    t.def("attn_tile", [attn_hook](const std::string& isa, nb::ndarray<const float, nb::ndim<1>, nb::c_contig> q,
                                   F32Rows K, F32Rows V, float scale) {
        return attn_hook(&ps::cpu::KernelSet::attn_tile, isa, q, K, V, scale);
    }, "isa"_a, "q"_a, "K"_a, "V"_a, "scale"_a);
    t.def("attn_tile_f16", [attn_hook](const std::string& isa, nb::ndarray<const float, nb::ndim<1>, nb::c_contig> q,
                                       F16Rows K, F16Rows V, float scale) {
        return attn_hook(&ps::cpu::KernelSet::attn_tile_f16, isa, q, K, V, scale);
    }, "isa"_a, "q"_a, "K"_a, "V"_a, "scale"_a);
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
    t.def("read_bandwidth", [](double mb, int n_threads, double min_seconds) {
        // Seconds of each pass reading a buffer of `mb` MiB with n_threads (contiguous slices, one
        // per thread, several independent sums): the host's read bandwidth from DRAM, measured in
        // the same run as the decode speeds it bounds (prosparse-bench, bench_kernels.py).
        if (!(mb >= 1.0 && mb <= 65536.0) || n_threads < 1 || n_threads > 256 || !(min_seconds >= 0.0))
            throw ps::Error("read_bandwidth: mb in [1, 65536], n_threads in [1, 256], min_seconds >= 0");
        const size_t n = size_t(mb * 1048576.0) / sizeof(uint64_t) / 64 * 64;
        std::vector<uint64_t> buf(n);
        for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;  // pages in every page
        nb::gil_scoped_release r;
        ps::ThreadPool pool(n_threads);
        uint64_t sink = 0;
        auto pass = [&] { sink += ps::read_sweep(pool, buf.data(), n); };
        pass();  // warm-up
        std::vector<double> times;
        const auto t0 = std::chrono::steady_clock::now();
        auto last = t0;
        do {
            pass();
            const auto t = std::chrono::steady_clock::now();
            times.push_back(std::chrono::duration<double>(t - last).count());
            last = t;
        } while (std::chrono::duration<double>(last - t0).count() < min_seconds || times.size() < 3);
        // the checksum is returned so that the sums are live
        return std::make_tuple(double(n * sizeof(uint64_t)), times, sink);
    }, "mb"_a, "n_threads"_a, "min_seconds"_a);
    // ---- END kernel test/bench hooks ----
}

}  // namespace ps::py

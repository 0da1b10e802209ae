// What the binding's two files share: prosparse_rt._core (python_module.cpp) and its test and
// benchmark hooks, the _core._testing submodule (python_test_hooks.cpp).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gguf.h"
#include "tokenizer.h"

namespace ps::py {

namespace nb = nanobind;

using F32Array = nb::ndarray<nb::numpy, float>;

// A numpy array that owns a heap copy of its data (never a view into a reused buffer).
inline F32Array owned_array(std::vector<float>&& v, std::initializer_list<size_t> shape) {
    auto* heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return F32Array(heap->data(), shape.size(), shape.begin(), owner);
}

inline nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

// GGUF strings should be UTF-8, but a few real vocabularies hold invalid sequences: decode with
// U+FFFD replacements instead of failing the whole metadata dict.
inline nb::str utf8_str(std::string_view s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "replace");
    if (!o) throw nb::python_error();
    return nb::steal<nb::str>(o);
}

// A tokenizer loaded on its own from a GGUF (tests and tools that need no weights).
struct PyTokenizer {
    std::unique_ptr<ps::GGUFFile> file;
    std::unique_ptr<ps::Tokenizer> tok;
    explicit PyTokenizer(const std::string& path)
        : file(std::make_unique<ps::GGUFFile>(path)), tok(ps::Tokenizer::from_gguf(*file)) {}
};

// Registers the _testing submodule of `m` (python_test_hooks.cpp).
void register_test_hooks(nb::module_& m);
// Registers the _testing_cuda submodule of `m` (python_cuda_hooks.cpp).
void register_cuda_hooks(nb::module_& m);

// _core._quant_search: the converter's K-quant scale searches (python_quant_search.cpp).
void register_quant_search(nb::module_& m);

}  // namespace ps::py

// Binding of the placement function (placement.h) for the tests and the README's table:
// _core.placement(layers, output_bytes, budget_bytes, group=64). Not part of the package's API;
// the model computes its own placement from the file.
#include <algorithm>
#include <iterator>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "common.h"
#include "placement.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// A byte count from Python: an int (not a float, which would silently round) in [0, 2^63).
uint64_t nonneg(nb::handle v, const char* what) {
    if (!PyLong_Check(v.ptr()))
        throw ps::Error(ps::strfmt("placement: %s must be an int (bytes), got %s", what,
                                   nb::type_name(v.type()).c_str()));
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow > 0) throw ps::Error(ps::strfmt("placement: %s is too large", what));
    if (overflow < 0 || x < 0) throw ps::Error(ps::strfmt("placement: %s must be >= 0", what));
    return uint64_t(x);
}

ps::PlacementLayer layer_from(nb::handle h, size_t l) {
    if (!nb::isinstance<nb::dict>(h)) throw ps::Error(ps::strfmt("placement: layer %zu is not a dict", l));
    nb::dict d = nb::borrow<nb::dict>(h);
    static const char* const keys[] = {"attention_bytes", "kv_bytes", "predictor_bytes",
                                       "neuron_bytes_always", "neuron_bytes_fired", "freq", "whole_ffn"};
    for (auto k : d) {
        const std::string key = nb::cast<std::string>(k.first);
        if (std::find(std::begin(keys), std::end(keys), key) == std::end(keys))
            throw ps::Error(ps::strfmt("placement: layer %zu has an unknown key '%s'", l, key.c_str()));
    }
    auto get = [&](const char* key) -> uint64_t {
        return d.contains(key) ? nonneg(d[key], key) : 0;
    };
    ps::PlacementLayer L;
    L.attention_bytes = get("attention_bytes");
    L.kv_bytes = get("kv_bytes");
    L.predictor_bytes = get("predictor_bytes");
    L.neuron_bytes_always = get("neuron_bytes_always");
    L.neuron_bytes_fired = get("neuron_bytes_fired");
    L.whole_ffn = d.contains("whole_ffn") && nb::cast<bool>(d["whole_ffn"]);
    if (d.contains("freq")) {
        // any sequence of numbers: numpy converts it (a float32 C-contiguous array is not copied)
        nb::object a = nb::module_::import_("numpy").attr("ascontiguousarray")(d["freq"], "dtype"_a = "float32");
        nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> f;
        if (!nb::try_cast(a, f))
            throw ps::Error(ps::strfmt("placement: layer %zu's freq must be one-dimensional", l));
        L.freq.assign(f.data(), f.data() + f.shape(0));
    }
    return L;
}

}  // namespace

void bind_placement(nb::module_& m) {
    m.def("placement", [](nb::list layers, nb::handle output_bytes, nb::handle budget_bytes, int group) {
        ps::PlacementInput in;
        in.group = group;
        in.output_bytes = nonneg(output_bytes, "output_bytes");
        const uint64_t budget = nonneg(budget_bytes, "budget_bytes");
        for (size_t l = 0; l < layers.size(); ++l) in.layers.push_back(layer_from(layers[l], l));
        const ps::Placement p = ps::place(in, budget);
        nb::list ls;
        for (const auto& lp : p.layers) {
            nb::dict d;
            d["attention_on_gpu"] = lp.attention_on_gpu;
            d["n_hot"] = lp.n_hot;
            ls.append(d);
        }
        nb::dict r;
        r["layers"] = ls;
        r["output_on_gpu"] = p.output_on_gpu;
        r["gpu_bytes"] = p.gpu_bytes;
        r["cpu_bytes"] = p.cpu_bytes;
        r["gpu_bytes_per_token"] = p.gpu_bytes_per_token;
        r["cpu_bytes_per_token"] = p.cpu_bytes_per_token;
        return r;
    }, "layers"_a, "output_bytes"_a, "budget_bytes"_a, "group"_a = 64,
       "Which blocks go to the GPU under a budget in bytes (placement.h). layers: dicts with "
       "attention_bytes, kv_bytes, predictor_bytes, neuron_bytes_always, neuron_bytes_fired "
       "(per neuron) and freq (float32 array, hottest first).");
    m.def("is_frequency_ordered", [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> f) {
        return ps::is_frequency_ordered(std::vector<float>(f.data(), f.data() + f.shape(0)));
    }, "freq"_a, "True when the frequencies are non-increasing (neurons hottest first).");
}

// prosparse_rt._core._quant_search: the scale searches of the converter's K-quant quantizer
// (quant_search.h) for prosparse_convert/kquants.py, which falls back to its numpy version
// without them. Checks shapes and lengths; the loops run without the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "python_bindings.h"
#include "quant_search.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace ps::py {
namespace {

using In2 = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using In1 = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Flags = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Out1 = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Codes = nb::ndarray<int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void check_blocks(const In2& x, int64_t& nb_, int& k) {
    nb_ = int64_t(x.shape(0));
    if (x.shape(1) != 16 && x.shape(1) != 32) throw ps::Error("blocks of 16 or 32 weights expected");
    k = int(x.shape(1));
}

template <class A>
void check_len(const A& a, int64_t n, const char* what) {
    if (int64_t(a.shape(0)) != n) throw ps::Error(std::string(what) + ": one value per block expected");
}

}  // namespace

void register_quant_search(nb::module_& m) {
    nb::module_ q = m.def_submodule("_quant_search", "the converter's K-quant scale searches");
    q.def("qkx2", [](In2 x, In2 w, In1 mn, In1 span, Flags flat, int nmax, float rmin, float rdelta, int nstep,
                     bool use_mad, Out1 scale, Out1 the_min, Codes codes) {
        int64_t n;
        int k;
        check_blocks(x, n, k);
        if (int64_t(w.shape(0)) != n || int(w.shape(1)) != k || int64_t(codes.shape(0)) != n ||
            int(codes.shape(1)) != k)
            throw ps::Error("qkx2: x, w and codes must have the same shape");
        check_len(mn, n, "mn");
        check_len(span, n, "span");
        check_len(flat, n, "flat");
        check_len(scale, n, "scale");
        check_len(the_min, n, "the_min");
        if (nmax < 1 || nmax > 255 || nstep < 0 || nstep > 1000) throw ps::Error("qkx2: nmax or nstep out of range");
        nb::gil_scoped_release r;
        ps::qkx2_search(x.data(), w.data(), mn.data(), span.data(), flat.data(), n, k, nmax, rmin, rdelta, nstep,
                        use_mad, scale.data(), the_min.data(), codes.data());
    }, "x"_a, "w"_a, "mn"_a, "span"_a, "flat"_a, "nmax"_a, "rmin"_a, "rdelta"_a, "nstep"_a, "use_mad"_a,
       "scale"_a.noconvert(), "the_min"_a.noconvert(), "codes"_a.noconvert());
    q.def("qx", [](In2 x, In1 mxs, Flags zero, int nmax, Out1 scale, Codes codes) {
        int64_t n;
        int k;
        check_blocks(x, n, k);
        if (int64_t(codes.shape(0)) != n || int(codes.shape(1)) != k)
            throw ps::Error("qx: x and codes must have the same shape");
        check_len(mxs, n, "mxs");
        check_len(zero, n, "zero");
        check_len(scale, n, "scale");
        if (nmax < 1 || nmax > 127) throw ps::Error("qx: nmax out of range");
        nb::gil_scoped_release r;
        ps::qx_search(x.data(), mxs.data(), zero.data(), n, k, nmax, scale.data(), codes.data());
    }, "x"_a, "mxs"_a, "zero"_a, "nmax"_a, "scale"_a.noconvert(), "codes"_a.noconvert());
}

}  // namespace ps::py

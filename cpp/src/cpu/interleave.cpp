// Re-lays out plain rows into groups of 8 interleaved rows and back (the layout is described in
// cpu/kernels.h, "Interleaved rows"). Plain byte moves: the values are not touched.
#include <cstddef>
#include <cstring>
#include <iterator>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {

namespace {

// A type's block fields (kernels.h's X8Layout table) as a value the byte moves below loop over.
struct Layout {
    size_t plain_bytes = 0;
    int n = 0;
    X8Field f[5] = {};
};

template <GgmlType T>
Layout layout_from() {
    using L8 = X8Layout<T>;
    static_assert(std::size(L8::f) <= 5, "Layout holds 5 fields");
    Layout L;
    L.plain_bytes = sizeof(typename L8::Plain);
    for (const X8Field& f : L8::f) L.f[L.n++] = f;
    return L;
}

Layout layout_of(GgmlType w) {
    switch (w) {
        case GgmlType::Q4_0: return layout_from<GgmlType::Q4_0>();
        case GgmlType::Q4_1: return layout_from<GgmlType::Q4_1>();
        case GgmlType::Q8_0: return layout_from<GgmlType::Q8_0>();
        case GgmlType::Q5_0: return layout_from<GgmlType::Q5_0>();
        case GgmlType::Q5_1: return layout_from<GgmlType::Q5_1>();
        case GgmlType::IQ4_NL: return layout_from<GgmlType::IQ4_NL>();
        case GgmlType::Q4_K: return layout_from<GgmlType::Q4_K>();
        case GgmlType::Q5_K: return layout_from<GgmlType::Q5_K>();
        case GgmlType::Q6_K: return layout_from<GgmlType::Q6_K>();
        case GgmlType::Q2_K: return layout_from<GgmlType::Q2_K>();
        case GgmlType::Q3_K: return layout_from<GgmlType::Q3_K>();
        default:
            fail(strfmt("cannot interleave rows of type %s", type_name(w)));
    }
}

// Row i's block between its plain form and its place in an x8 block: to_x8 copies from (a plain
// block) to (an x8 block), else from (an x8 block) to (row i's plain block).
void move_block(const Layout& L, int i, const uint8_t* from, uint8_t* to, bool to_x8) {
    for (int n = 0; n < L.n; ++n) {
        const X8Field& f = L.f[n];
        const size_t chunks = f.half ? 1 : f.bytes / 4, len = f.half ? 2 : 4;
        for (size_t m = 0; m < chunks; ++m) {
            const size_t p = f.plain + 4 * m, x = f.x8 + (f.half ? 2 * size_t(i) : m * 32 + 4 * size_t(i));
            std::memcpy(to + (to_x8 ? x : p), from + (to_x8 ? p : x), len);
        }
    }
}

}  // namespace

void interleave_rows(GgmlType w, int64_t k, const uint8_t* src, size_t src_stride, int64_t n_groups, uint8_t* dst) {
    const Layout L = layout_of(w);
    const int64_t nb = k / traits(w).block;
    const size_t x8_bytes = L.plain_bytes * kGroupRows;
    for (int64_t g = 0; g < n_groups; ++g) {
        const uint8_t* in = src + size_t(g * kGroupRows) * src_stride;
        uint8_t* out = dst + size_t(g) * group_bytes(w, k);
        for (int i = 0; i < kGroupRows; ++i)
            for (int64_t b = 0; b < nb; ++b)
                move_block(L, i, in + size_t(i) * src_stride + size_t(b) * L.plain_bytes, out + size_t(b) * x8_bytes, true);
    }
}

void deinterleave_group(GgmlType w, int64_t k, const uint8_t* src, uint8_t* dst, size_t dst_stride) {
    const Layout L = layout_of(w);
    const int64_t nb = k / traits(w).block;
    const size_t x8_bytes = L.plain_bytes * kGroupRows;
    for (int i = 0; i < kGroupRows; ++i)
        for (int64_t b = 0; b < nb; ++b)
            move_block(L, i, src + size_t(b) * x8_bytes, dst + size_t(i) * dst_stride + size_t(b) * L.plain_bytes, false);
}

}  // namespace ps::cpu

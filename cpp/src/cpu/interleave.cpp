// Re-lays out plain rows into groups of 8 interleaved rows (the layout is described in
// cpu/kernels.h, "Interleaved rows"). Plain byte moves: the values are not touched.
#include <cstring>
#include <type_traits>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {

namespace {

// Row i's block b goes to out[b]: its scale (and min) to slot i, its code bytes in 4-byte chunks
// to qs[m * 32 + 4i].
template <class Plain, class X8>
void interleave_group(const uint8_t* src, size_t src_stride, int64_t nb, X8* out) {
    constexpr int kChunks = sizeof(Plain::qs) / 4;
    for (int i = 0; i < kGroupRows; ++i) {
        const auto* row = reinterpret_cast<const Plain*>(src + size_t(i) * src_stride);
        for (int64_t b = 0; b < nb; ++b) {
            out[b].d[i] = row[b].d;
            if constexpr (std::is_same_v<Plain, block_q4_1>) out[b].m[i] = row[b].m;
            for (int m = 0; m < kChunks; ++m) std::memcpy(out[b].qs + m * 32 + i * 4, row[b].qs + 4 * m, 4);
        }
    }
}

}  // namespace

void interleave_rows(GgmlType w, int64_t k, const uint8_t* src, size_t src_stride, int64_t n_groups, uint8_t* dst) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < n_groups; ++g) {
        const uint8_t* in = src + size_t(g * kGroupRows) * src_stride;
        uint8_t* out = dst + size_t(g) * group_bytes(w, k);
        if (w == GgmlType::Q4_0) interleave_group<block_q4_0>(in, src_stride, nb, reinterpret_cast<block_q4_0x8*>(out));
        else if (w == GgmlType::Q4_1) interleave_group<block_q4_1>(in, src_stride, nb, reinterpret_cast<block_q4_1x8*>(out));
        else if (w == GgmlType::Q8_0) interleave_group<block_q8_0>(in, src_stride, nb, reinterpret_cast<block_q8_0x8*>(out));
        else fail(strfmt("cannot interleave rows of type %s", type_name(w)));
    }
}

}  // namespace ps::cpu

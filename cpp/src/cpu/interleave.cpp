// Re-lays out plain Q4_0 rows into groups of 8 interleaved rows (the layout is described in
// cpu/kernels.h, "Interleaved rows"). Plain byte moves: the values are not touched.
#include <cstring>

#include "cpu/kernels.h"

namespace ps::cpu {

void interleave_rows(int64_t k, const uint8_t* src, size_t src_stride, int64_t n_groups, uint8_t* dst) {
    const int64_t nb = k / QK;
    for (int64_t g = 0; g < n_groups; ++g) {
        auto* out = reinterpret_cast<block_q4_0x8*>(dst + size_t(g) * group_bytes(k));
        for (int i = 0; i < kGroupRows; ++i) {
            const auto* row = reinterpret_cast<const block_q4_0*>(src + size_t(g * kGroupRows + i) * src_stride);
            for (int64_t b = 0; b < nb; ++b) {
                out[b].d[i] = row[b].d;
                for (int m = 0; m < 4; ++m) std::memcpy(out[b].qs + m * 32 + i * 4, row[b].qs + 4 * m, 4);
            }
        }
    }
}

}  // namespace ps::cpu

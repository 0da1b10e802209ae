// Re-lays out plain rows into groups of 8 interleaved rows and back (the layout is described in
// cpu/kernels.h, "Interleaved rows"). Plain byte moves: the values are not touched.
#include <cstddef>
#include <cstring>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {

namespace {

// One field of a block: its offset and size in the plain block and in the x8 block; half: an
// fp16 (2 bytes, an array of 8 in the x8 block), else bytes in 4-byte chunks.
struct Field {
    size_t plain, x8, bytes;
    bool half;
};
#define PS_HALF(P, X, f) Field{offsetof(P, f), offsetof(X, f), 2, true}
#define PS_BYTES(P, X, f) Field{offsetof(P, f), offsetof(X, f), sizeof(P::f), false}

struct Layout {
    size_t plain_bytes = 0;
    int n = 0;
    Field f[5] = {};
};

Layout layout_of(GgmlType w) {
    switch (w) {
        case GgmlType::Q4_0:
            return {sizeof(block_q4_0), 2, {PS_HALF(block_q4_0, block_q4_0x8, d), PS_BYTES(block_q4_0, block_q4_0x8, qs)}};
        case GgmlType::Q4_1:
            return {sizeof(block_q4_1), 3,
                    {PS_HALF(block_q4_1, block_q4_1x8, d), PS_HALF(block_q4_1, block_q4_1x8, m),
                     PS_BYTES(block_q4_1, block_q4_1x8, qs)}};
        case GgmlType::Q8_0:
            return {sizeof(block_q8_0), 2, {PS_HALF(block_q8_0, block_q8_0x8, d), PS_BYTES(block_q8_0, block_q8_0x8, qs)}};
        case GgmlType::Q5_0:
            return {sizeof(block_q5_0), 3,
                    {PS_HALF(block_q5_0, block_q5_0x8, d), PS_BYTES(block_q5_0, block_q5_0x8, qh),
                     PS_BYTES(block_q5_0, block_q5_0x8, qs)}};
        case GgmlType::Q4_K:
            return {sizeof(block_q4_K), 4,
                    {PS_HALF(block_q4_K, block_q4_Kx8, d), PS_HALF(block_q4_K, block_q4_Kx8, dmin),
                     PS_BYTES(block_q4_K, block_q4_Kx8, scales), PS_BYTES(block_q4_K, block_q4_Kx8, qs)}};
        case GgmlType::Q6_K:
            return {sizeof(block_q6_K), 4,
                    {PS_HALF(block_q6_K, block_q6_Kx8, d), PS_BYTES(block_q6_K, block_q6_Kx8, scales),
                     PS_BYTES(block_q6_K, block_q6_Kx8, ql), PS_BYTES(block_q6_K, block_q6_Kx8, qh)}};
        case GgmlType::Q5_1:
            return {sizeof(block_q5_1), 4,
                    {PS_HALF(block_q5_1, block_q5_1x8, d), PS_HALF(block_q5_1, block_q5_1x8, m),
                     PS_BYTES(block_q5_1, block_q5_1x8, qh), PS_BYTES(block_q5_1, block_q5_1x8, qs)}};
        case GgmlType::IQ4_NL:
            return {sizeof(block_iq4_nl), 2,
                    {PS_HALF(block_iq4_nl, block_iq4_nlx8, d), PS_BYTES(block_iq4_nl, block_iq4_nlx8, qs)}};
        case GgmlType::Q5_K:
            return {sizeof(block_q5_K), 5,
                    {PS_HALF(block_q5_K, block_q5_Kx8, d), PS_HALF(block_q5_K, block_q5_Kx8, dmin),
                     PS_BYTES(block_q5_K, block_q5_Kx8, scales), PS_BYTES(block_q5_K, block_q5_Kx8, qh),
                     PS_BYTES(block_q5_K, block_q5_Kx8, qs)}};
        case GgmlType::Q2_K:
            return {sizeof(block_q2_K), 4,
                    {PS_HALF(block_q2_K, block_q2_Kx8, d), PS_HALF(block_q2_K, block_q2_Kx8, dmin),
                     PS_BYTES(block_q2_K, block_q2_Kx8, scales), PS_BYTES(block_q2_K, block_q2_Kx8, qs)}};
        case GgmlType::Q3_K:
            return {sizeof(block_q3_K), 4,
                    {PS_HALF(block_q3_K, block_q3_Kx8, d), PS_BYTES(block_q3_K, block_q3_Kx8, scales),
                     PS_BYTES(block_q3_K, block_q3_Kx8, hmask), PS_BYTES(block_q3_K, block_q3_Kx8, qs)}};
        default:
            fail(strfmt("cannot interleave rows of type %s", type_name(w)));
    }
}
#undef PS_HALF
#undef PS_BYTES

// Row i's block between its plain form and its place in an x8 block: to_x8 copies from (a plain
// block) to (an x8 block), else from (an x8 block) to (row i's plain block).
void move_block(const Layout& L, int i, const uint8_t* from, uint8_t* to, bool to_x8) {
    for (int n = 0; n < L.n; ++n) {
        const Field& f = L.f[n];
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

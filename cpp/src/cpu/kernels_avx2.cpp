// AVX2 + FMA + F16C kernels (Haswell / Zen 1 and later). Compiled with those instruction sets
// only for this file; dispatch.cpp calls them after checking the CPU.
#if defined(PROSPARSE_X86)
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {
namespace {

using VF = __m256;
constexpr int kVW = 8;
constexpr bool kVnni = false;
constexpr int kTileC = 2;  // 16 ymm registers: 4 x 2 accumulators plus operands
constexpr int kAxpyNB = 1;

inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float f) { return _mm256_set1_ps(f); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF vfnma(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
inline VF vround(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }  // to nearest, ties to even
// 2^n for integral n in [-127, 127] (n = -127 gives 0)
inline VF vpow2(VF n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float vhsum(VF v);

inline void i8x32_to_f(__m256i q, VF* out) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

inline void q4_to_f(const uint8_t* qs, bool minus8, VF* out);

inline VF wload(ps::GgmlType w, const uint8_t* row, int64_t j) {
    if (w == ps::GgmlType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j));
    if (w == ps::GgmlType::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16
}

// maddubs saturates pairs at int16; every caller keeps |u * s| pairs under 32767.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// acc + a[2i] * b[2i] + a[2i + 1] * b[2i + 1] per int32 lane (int16 operands; exact)
inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }

#include "cpu/kernels_x86.inc"

inline float vhsum(VF v) { return hsum8(v); }

inline void q4_to_f(const uint8_t* qs, bool minus8, VF* out) {
    const __m256i q = unpack_nibbles(qs);
    i8x32_to_f(minus8 ? _mm256_sub_epi8(q, _mm256_set1_epi8(8)) : q, out);
}

}  // namespace

const KernelSet& avx2_kernels() {
    static const KernelSet ks = build_set("avx2");  // thread-safe one-time initialisation
    return ks;
}

}  // namespace ps::cpu
#endif

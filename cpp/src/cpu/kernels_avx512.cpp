// AVX-512 kernels (F, BW, VL, VNNI; Ice Lake / Zen 4 and later). Integer dot products use VNNI's
// vpdpbusd on 256-bit vectors (one instruction where AVX2 needs three, and no int16 saturation);
// float work uses 512-bit vectors. Called only after dispatch.cpp has checked the CPU.
#if defined(PROSPARSE_X86)
// GCC 12's AVX-512 headers build their "undefined" vectors as `__m512i __Y = __Y;`, which
// -Wmaybe-uninitialized reports at every inlined use: a header false positive, not ours.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
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

using VF = __m512;
constexpr int kVW = 16;
constexpr bool kVnni = true;
constexpr int kTileC = 4;  // 32 registers: 4 x 4 accumulators plus operands
constexpr int kAxpyNB = 4;

inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float f) { return _mm512_set1_ps(f); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF vfnma(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline VF vround(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }  // to nearest, ties to even
// 2^n for integral n in [-127, 127] (n = -127 gives 0)
inline VF vpow2(VF n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float vhsum(VF v) { return _mm512_reduce_add_ps(v); }

inline void i8x32_to_f(__m256i q, VF* out) {
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
}

// Nibbles to floats by table lookup: vpermps reads only the low 4 bits of each index, so the
// zero-extended bytes index the low nibbles directly and, shifted by 4, the high ones. This
// replaces the int-to-float conversions, the bottleneck of the down projection on Zen 4.
inline void q4_to_f(const uint8_t* qs, bool minus8, VF* out) {
    const __m512 table = minus8 ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
                                : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    out[0] = _mm512_permutexvar_ps(idx, table);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
}

inline VF wload(ps::GgmlType w, const uint8_t* row, int64_t j) {
    if (w == ps::GgmlType::F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + j);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * j));
    if (w == ps::GgmlType::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16
}

inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }

#include "cpu/kernels_x86.inc"

}  // namespace

const KernelSet& avx512_kernels() {
    static const KernelSet ks = build_set("avx512");  // thread-safe one-time initialisation
    return ks;
}

}  // namespace ps::cpu
#endif

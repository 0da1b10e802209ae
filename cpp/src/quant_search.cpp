// See quant_search.h. Compiled with -ffp-contract=off: every product and sum rounds on its own,
// as in numpy.
#include "quant_search.h"

#include <cmath>
#include <cstdint>

namespace ps {
namespace {

constexpr int kMaxK = 32;

// np.clip(np.rint(t).astype(np.int32), lo, hi) as float, without branches so that the loops
// vectorise. Below 2^22 the rounding (half to even) adds and takes off 1.5 * 2^23: the sum lands
// where the float32 spacing is 1, so the addition rounds to an integer and the rest is exact (the
// compiler keeps it as written: no -ffast-math). From 2^22 on t is an integer already: hi up to
// int32's range; beyond it, and for NaN and for t <= -2^22, numpy's cast gives INT32_MIN (or a
// value below lo), clamped to lo.
inline float code(float t, float lo, float hi) {
    float r = (t + 12582912.0f) - 12582912.0f;
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    const float big = (t >= 4194304.0f && t < 2147483648.0f) ? hi : lo;
    return std::fabs(t) < 4194304.0f ? r : big;
}

}  // namespace

namespace {

// G blocks at once, one per lane: every loop below runs over the lanes innermost, so the compiler
// vectorises it across blocks (the arithmetic of each block stays exactly its own).
constexpr int G = 16;

// Sums over i of a[i][lane] in numpy's pairwise order (pw_sum), for each lane.
inline void pw_lanes(const float (*a)[G], int k, float* out) {
    float r[8][G];
    for (int j = 0; j < 8; ++j)
        for (int g = 0; g < G; ++g) r[j][g] = a[j][g] + a[j + 8][g];
    for (int i = 16; i < k; i += 8)
        for (int j = 0; j < 8; ++j)
            for (int g = 0; g < G; ++g) r[j][g] += a[i + j][g];
    for (int g = 0; g < G; ++g) {
        const float s = ((r[0][g] + r[1][g]) + (r[2][g] + r[3][g])) + ((r[4][g] + r[5][g]) + (r[6][g] + r[7][g]));
        out[g] = s + 0.0f;
    }
}

// Blocks b0 .. b0 + G - 1 (those past nb repeat the last one) gathered lane-wise.
inline void gather(const float* src, int64_t nb, int64_t b0, int k, float (*dst)[G]) {
    for (int g = 0; g < G; ++g) {
        const int64_t b = b0 + g < nb ? b0 + g : nb - 1;
        for (int i = 0; i < k; ++i) dst[i][g] = src[b * k + i];
    }
}

inline void gather1(const float* src, int64_t nb, int64_t b0, float* dst) {
    for (int g = 0; g < G; ++g) dst[g] = src[b0 + g < nb ? b0 + g : nb - 1];
}

}  // namespace

// Cloned for AVX2 and AVX-512 where the CPU has them (wider lanes, the same IEEE steps: no FMA).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PS_SEARCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PS_SEARCH_CLONES
#endif

PS_SEARCH_CLONES
void qkx2_search(const float* x, const float* w, const float* mn0, const float* span, const uint8_t* flat,
                 int64_t nb, int k, int nmax, float rmin, float rdelta, int nstep, bool use_mad,
                 float* scale_out, float* min_out, int32_t* codes_out) {
    float X[kMaxK][G], W[kMaxK][G], T[kMaxK][G], La[kMaxK][G], S1[kMaxK][G], S2[kMaxK][G];
    float sum_w[G], sum_x[G], mn[G], sp[G], iscale[G], scale[G], best[G], best_is[G], best_mn[G];
    float sum_l[G], sum_xl[G], sum_l2[G], this_scale[G], this_min[G], cur[G];
    const float hi = float(nmax);
    for (int64_t b0 = 0; b0 < nb; b0 += G) {
        gather(x, nb, b0, k, X);
        gather(w, nb, b0, k, W);
        gather1(mn0, nb, b0, mn);
        gather1(span, nb, b0, sp);
        for (int i = 0; i < k; ++i)
            for (int g = 0; g < G; ++g) T[i][g] = W[i][g] * X[i][g];
        pw_lanes(W, k, sum_w);
        pw_lanes(T, k, sum_x);
        auto codes = [&](const float* is, const float* m) {
            for (int i = 0; i < k; ++i)
                for (int g = 0; g < G; ++g) La[i][g] = code(is[g] * (X[i][g] - m[g]), 0.0f, hi);
        };
        auto err = [&](const float* sc, const float* m, float* out) {
            for (int i = 0; i < k; ++i)
                for (int g = 0; g < G; ++g) {
                    float d = sc[g] * La[i][g];
                    d = d + m[g];
                    d = d - X[i][g];
                    d = use_mad ? std::fabs(d) : d * d;
                    T[i][g] = d * W[i][g];
                }
            pw_lanes(T, k, out);
        };
        for (int g = 0; g < G; ++g) {
            iscale[g] = hi / sp[g];
            scale[g] = 1.0f / iscale[g];
            best_is[g] = iscale[g];
            best_mn[g] = mn[g];
        }
        codes(iscale, mn);
        err(scale, mn, best);
        for (int step = 0; step <= nstep; ++step) {
            const float num = rmin + rdelta * float(step) + hi;
            for (int g = 0; g < G; ++g) iscale[g] = num / sp[g];
            codes(iscale, mn);
            for (int i = 0; i < k; ++i)
                for (int g = 0; g < G; ++g) {
                    const float wl = W[i][g] * La[i][g];
                    T[i][g] = wl;
                    S1[i][g] = wl * X[i][g];
                    S2[i][g] = wl * La[i][g];
                }
            pw_lanes(T, k, sum_l);
            pw_lanes(S1, k, sum_xl);
            pw_lanes(S2, k, sum_l2);
            bool ok[G];
            for (int g = 0; g < G; ++g) {
                const float D = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
                ok[g] = D > 0;
                const float Ds = ok[g] ? D : 1.0f;
                float ts = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / Ds;
                float tm = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / Ds;
                const bool pos = tm > 0;
                const float alt = sum_xl[g] / (sum_l2[g] == 0 ? 1.0f : sum_l2[g]);
                this_min[g] = pos ? 0.0f : tm;
                this_scale[g] = pos ? alt : ts;
            }
            err(this_scale, this_min, cur);
            for (int g = 0; g < G; ++g) {
                const bool better = ok[g] && cur[g] < best[g];
                best_is[g] = better ? iscale[g] : best_is[g];
                best_mn[g] = better ? mn[g] : best_mn[g];
                best[g] = better ? cur[g] : best[g];
                scale[g] = better ? this_scale[g] : scale[g];
                mn[g] = better ? this_min[g] : mn[g];
            }
        }
        codes(best_is, best_mn);
        for (int g = 0; g < G && b0 + g < nb; ++g) {
            const int64_t b = b0 + g;
            const bool f = flat[b] != 0;
            for (int i = 0; i < k; ++i) codes_out[b * k + i] = f ? 0 : int32_t(La[i][g]);
            scale_out[b] = f ? 0.0f : scale[g];
            min_out[b] = -mn[g];
        }
    }
}

PS_SEARCH_CLONES
void qx_search(const float* x, const float* mxs, const uint8_t* zero, int64_t nb, int k, int nmax,
               float* scale_out, int32_t* codes_out) {
    float X[kMaxK][G], Wt[kMaxK][G], WX[kMaxK][G], A[kMaxK][G], C[kMaxK][G], Lf[kMaxK][G];
    float m[G], iscale[G], best_is[G], scale[G], best[G], slx[G], sl2[G];
    const float flo = float(-nmax), fhi = float(nmax - 1);
    for (int64_t b0 = 0; b0 < nb; b0 += G) {
        gather(x, nb, b0, k, X);
        gather1(mxs, nb, b0, m);
        for (int i = 0; i < k; ++i)
            for (int g = 0; g < G; ++g) {
                Wt[i][g] = X[i][g] * X[i][g];
                WX[i][g] = Wt[i][g] * X[i][g];
            }
        auto sums = [&](const float* is) {
            for (int i = 0; i < k; ++i)
                for (int g = 0; g < G; ++g) {
                    const float L = code(is[g] * X[i][g], flo, fhi);
                    A[i][g] = WX[i][g] * L;
                    C[i][g] = (Wt[i][g] * L) * L;
                }
            pw_lanes(A, k, slx);
            pw_lanes(C, k, sl2);
        };
        for (int g = 0; g < G; ++g) {
            iscale[g] = flo / m[g];
            best_is[g] = iscale[g];
        }
        sums(iscale);
        for (int g = 0; g < G; ++g) {
            scale[g] = sl2[g] != 0 ? slx[g] / (sl2[g] != 0 ? sl2[g] : 1.0f) : 0.0f;
            best[g] = scale[g] * slx[g];
        }
        for (int step = -9; step <= 9; ++step) {
            if (step == 0) continue;
            const float num = -(float(nmax) + 0.1f * float(step));
            for (int g = 0; g < G; ++g) iscale[g] = num / m[g];
            sums(iscale);
            for (int g = 0; g < G; ++g) {
                const bool better = sl2[g] > 0 && slx[g] * slx[g] > best[g] * sl2[g];
                const float ns = slx[g] / (sl2[g] > 0 ? sl2[g] : 1.0f);
                best_is[g] = better ? iscale[g] : best_is[g];
                scale[g] = better ? ns : scale[g];
                best[g] = better ? ns * slx[g] : best[g];
            }
        }
        for (int i = 0; i < k; ++i)
            for (int g = 0; g < G; ++g) Lf[i][g] = code(best_is[g] * X[i][g], flo, fhi);
        for (int g = 0; g < G && b0 + g < nb; ++g) {
            const int64_t b = b0 + g;
            const bool z = zero[b] != 0;
            for (int i = 0; i < k; ++i) codes_out[b * k + i] = (z ? 0 : int32_t(Lf[i][g])) + nmax;
            scale_out[b] = z ? 0.0f : scale[g];
        }
    }
}

}  // namespace ps

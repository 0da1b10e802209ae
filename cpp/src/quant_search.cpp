// See quant_search.h. Compiled with -ffp-contract=off: every product and sum rounds on its own,
// as in numpy.
#include "quant_search.h"

#include <cmath>
#include <cstdint>

namespace ps {
namespace {

constexpr int kMaxK = 32;

// numpy's float32 row sum (pairwise_sum for n = 16 or 32, added to the reduction's initial 0).
inline float pw_sum(const float* a, int k) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j] + a[j + 8];
    for (int i = 16; i < k; i += 8)
        for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    return s + 0.0f;
}

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

void qkx2_search(const float* x, const float* w, const float* mn0, const float* span, const uint8_t* flat,
                 int64_t nb, int k, int nmax, float rmin, float rdelta, int nstep, bool use_mad,
                 float* scale_out, float* min_out, int32_t* codes_out) {
    float t[kMaxK], La[kMaxK];
    const float hi = float(nmax);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * k;
        const float* wb = w + b * k;
        for (int i = 0; i < k; ++i) t[i] = wb[i] * xb[i];
        const float sum_w = pw_sum(wb, k);
        const float sum_x = pw_sum(t, k);
        float mn = mn0[b];
        const float sp = span[b];
        auto err = [&](float sc, float m, const float* L) {
            for (int i = 0; i < k; ++i) {
                float d = sc * L[i];
                d = d + m;
                d = d - xb[i];
                d = use_mad ? std::fabs(d) : d * d;
                t[i] = d * wb[i];
            }
            return pw_sum(t, k);
        };
        float iscale = float(nmax) / sp;
        float scale = 1.0f / iscale;
        for (int i = 0; i < k; ++i) La[i] = code(iscale * (xb[i] - mn), 0.0f, hi);
        float best = err(scale, mn, La);
        float best_is = iscale, best_mn = mn;
        for (int step = 0; step <= nstep; ++step) {
            iscale = (rmin + rdelta * float(step) + float(nmax)) / sp;
            float s_l[kMaxK], s_xl[kMaxK], s_l2[kMaxK];
            for (int i = 0; i < k; ++i) {
                La[i] = code(iscale * (xb[i] - mn), 0.0f, hi);
                const float wl = wb[i] * La[i];
                s_l[i] = wl;
                s_xl[i] = wl * xb[i];
                s_l2[i] = wl * La[i];
            }
            const float sum_l = pw_sum(s_l, k), sum_xl = pw_sum(s_xl, k), sum_l2 = pw_sum(s_l2, k);
            const float D = sum_w * sum_l2 - sum_l * sum_l;
            const bool ok = D > 0;
            const float Ds = ok ? D : 1.0f;
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds;
            if (this_min > 0) {
                this_min = 0.0f;
                this_scale = sum_xl / (sum_l2 == 0 ? 1.0f : sum_l2);
            }
            const float cur = err(this_scale, this_min, La);
            if (ok && cur < best) {
                best_is = iscale;
                best_mn = mn;
                best = cur;
                scale = this_scale;
                mn = this_min;
            }
        }
        const bool f = flat[b] != 0;
        int32_t* Lb = codes_out + b * k;
        for (int i = 0; i < k; ++i) Lb[i] = f ? 0 : int32_t(code(best_is * (xb[i] - best_mn), 0.0f, hi));
        scale_out[b] = f ? 0.0f : scale;
        min_out[b] = -mn;
    }
}

void qx_search(const float* x, const float* mxs, const uint8_t* zero, int64_t nb, int k, int nmax,
               float* scale_out, int32_t* codes_out) {
    float w[kMaxK], wx[kMaxK], a[kMaxK], c[kMaxK];
    const float flo = float(-nmax), fhi = float(nmax - 1);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * k;
        const float m = mxs[b];
        for (int i = 0; i < k; ++i) {
            w[i] = xb[i] * xb[i];
            wx[i] = w[i] * xb[i];
        }
        auto sums = [&](float iscale, float& slx, float& sl2) {
            for (int i = 0; i < k; ++i) {
                const float L = code(iscale * xb[i], flo, fhi);
                a[i] = wx[i] * L;
                c[i] = (w[i] * L) * L;
            }
            slx = pw_sum(a, k);
            sl2 = pw_sum(c, k);
        };
        float iscale = float(-nmax) / m;
        float best_is = iscale;
        float sumlx, suml2;
        sums(iscale, sumlx, suml2);
        float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
        float best = scale * sumlx;
        for (int step = -9; step <= 9; ++step) {
            if (step == 0) continue;
            iscale = -(float(nmax) + 0.1f * float(step)) / m;
            float slx, sl2;
            sums(iscale, slx, sl2);
            if (sl2 > 0 && slx * slx > best * sl2) {
                best_is = iscale;
                scale = slx / sl2;
                best = scale * slx;
            }
        }
        const bool z = zero[b] != 0;
        int32_t* Lb = codes_out + b * k;
        for (int i = 0; i < k; ++i) Lb[i] = (z ? 0 : int32_t(code(best_is * xb[i], flo, fhi))) + nmax;
        scale_out[b] = z ? 0.0f : scale;
    }
}

}  // namespace ps

// The scale searches of the converter's K-quant quantizer (prosparse_convert/kquants.py), the
// part that takes its time, for whole arrays of blocks. Bit for bit what the numpy code computes
// (tests/test_quant_fast.py checks it against the numpy version and its oracle): float32 steps
// in the same order, nearest_int as round-half-even, a float beyond int32 (or NaN) converted to
// INT32_MIN as numpy's cast does on x86, and every sum over a block in numpy's pairwise order
// (eight accumulators r[j] = a[j] + a[j + 8] + ..., ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 +
// r7)), then + 0.0f).
#pragma once

#include <cstdint>

namespace ps {

// make_qkx2_quants as kquants._make_qkx2: blocks of k = 16 or 32 weights (x, w row-major, nb x k),
// with the numpy side's mn = min(min(x), 0), span (max - mn, 1 where flat) and flat flags.
// Writes the scale, the min (-mn) and the codes 0..nmax of each block.
void qkx2_search(const float* x, const float* w, const float* mn0, const float* span, const uint8_t* flat,
                 int64_t nb, int k, int nmax, float rmin, float rdelta, int nstep, bool use_mad,
                 float* scale_out, float* min_out, int32_t* codes_out);

// make_qx_quants (rmse_type 1) as kquants._make_qx: blocks of k = 16 or 32, with the numpy side's
// signed largest-magnitude element mxs (1 where the block is zero) and zero flags. Writes the
// scale and the codes 0..2 nmax - 1 (L + nmax).
void qx_search(const float* x, const float* mxs, const uint8_t* zero, int64_t nb, int k, int nmax,
               float* scale_out, int32_t* codes_out);

}  // namespace ps

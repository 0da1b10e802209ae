// Tiled quantized products on int8 tensor cores (sm_80+), and gemm's choice between them and the
// row kernels (cuda/kernels.h).
//
// llama.cpp's MMQ idea with the batch-invariance rule kept: a block of kMmaWarps warps takes
// kMmaWarps * 16 weight rows and kMmaTok tokens; per 32-block each warp issues one
// mma.m16n8k32 s8.s8.s32 per 8 tokens, which yields the exact integer dot of every (row, token)
// pair's codes (block_math.h, "The tiled product's fragments"), and the lane that holds a pair's
// dot runs that pair's fma chain (mma_term + apply_term, the row kernels' term), block after block
// in order, from 0. So each (row, token) gets the row path's bits, whichever rows and tokens share
// its tile; padding rows and tokens are read as zeros and never stored.
#include <cstdlib>
#include <cstring>

#include "cuda/kernels_util.cuh"

namespace ps::cuda {

namespace {

using namespace detail;

constexpr int kLanes = 32;
constexpr int kMmaWarps = 4;                   // warps per block, stacked over rows
constexpr int kMmaRows = 16;                   // rows per warp (the fragment's M)
constexpr int kMmaFrags = 4;                   // 8-token fragments per warp
constexpr int kMmaTok = 8 * kMmaFrags;         // tokens per block
constexpr int kMmaMinTokens = 16;              // below this the row kernels' 8-token passes win
constexpr int kMmaBlockRows = kMmaWarps * kMmaRows;

template <GgmlType W>
__global__ void __launch_bounds__(kMmaWarps * kLanes)
gemm_mma_kernel(int64_t k, const uint8_t* Wt, size_t w_stride, int64_t nr, const uint8_t* xa, size_t xs, int nt,
                float* Y, int64_t ldy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const int lane = threadIdx.x % kLanes, g = lane / 4, t = lane % 4;
    const int64_t row0 = int64_t(blockIdx.x) * kMmaBlockRows + int64_t(threadIdx.x / kLanes) * kMmaRows;
    if (row0 >= nr) return;  // warp-uniform; no block-wide synchronisation follows
    const int tok0 = int(blockIdx.y) * kMmaTok;
    const int64_t nb = k / QK;
    const int64_t ra = row0 + g, rb = row0 + g + 8;  // this lane's A rows and D rows
    const bool va = ra < nr, vb = rb < nr;
    const uint8_t* wa = Wt + size_t(va ? ra : row0) * w_stride;
    const uint8_t* wb = Wt + size_t(vb ? rb : row0) * w_stride;
    // per fragment: the token whose B words this lane loads, and the two tokens of its D values
    int bt[kMmaFrags], dt0[kMmaFrags];
    for (int f = 0; f < kMmaFrags; ++f) {
        bt[f] = tok0 + f * 8 + g;
        dt0[f] = tok0 + f * 8 + 2 * t;
    }
    float acc[kMmaFrags][4];
#pragma unroll
    for (int f = 0; f < kMmaFrags; ++f)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][i] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        uint32_t a[4] = {0u, 0u, 0u, 0u};
        if (va) bm::mma_a_words<W>(wa, b, t, &a[0], &a[2]);
        if (vb) bm::mma_a_words<W>(wb, b, t, &a[1], &a[3]);
        const bm::WScales sa = bm::load_wscales<W>(wa, b), sb = bm::load_wscales<W>(wb, b);
#pragma unroll
        for (int f = 0; f < kMmaFrags; ++f) {
            if (tok0 + f * 8 >= nt) break;  // warp-uniform: the fragment has no token
            uint32_t x[2] = {0u, 0u};
            if (bt[f] < nt) bm::mma_b_words<W>(xa + size_t(bt[f]) * xs, b, t, &x[0], &x[1]);
            int d[4] = {0, 0, 0, 0};
            asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                         "{%0,%1,%2,%3};\n"
                         : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(x[0]), "r"(x[1]));
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int c = dt0[f] + j;
                if (c >= nt) continue;  // a padding token: its values are never stored
                const bm::XScales sx = bm::load_xscales<W>(xa + size_t(c) * xs, nb, b);
                acc[f][j] = bm::apply_term<W>(acc[f][j], bm::mma_term<W>(d[j], sa, sx));
                acc[f][2 + j] = bm::apply_term<W>(acc[f][2 + j], bm::mma_term<W>(d[2 + j], sb, sx));
            }
        }
    }
#pragma unroll
    for (int f = 0; f < kMmaFrags; ++f)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int64_t c = dt0[f] + j;
            if (c >= nt) continue;
            if (va) Y[c * ldy + ra] = acc[f][j];
            if (vb) Y[c * ldy + rb] = acc[f][2 + j];
        }
#else
    __trap();  // the host launches this only on sm_80 and above
#endif
}

// PROSPARSE_CUDA_MMA=0 turns the tiled path off (read once per process).
bool mma_switched_on() {
    static const bool on = [] {
        const char* e = std::getenv("PROSPARSE_CUDA_MMA");
        return !(e && std::strcmp(e, "0") == 0);
    }();
    return on;
}

}  // namespace

bool gemm_tiled_available(GgmlType w) {
    if (w != GgmlType::Q8_0 && w != GgmlType::Q4_0 && w != GgmlType::Q4_1) return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
        (void)cudaGetLastError();  // leave no sticky error for the next launch check
        return false;
    }
    return major >= 8;
}

void gemm_tiled(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
                int64_t ldy, Stream s) {
    check_weights("gemm_tiled", w, k, W, w_stride, nr);
    require(nt >= 0, "gemm_tiled", "negative token count");
    require(ldy >= nr, "gemm_tiled", "output rows overlap (ldy < nr)");
    require(aligned(xa, 16) && aligned(Y, 4), "gemm_tiled", "xa must be 16-byte and Y 4-byte aligned");
    if (!gemm_tiled_available(w))
        fail(strfmt("cuda::gemm_tiled: no tiled kernel for %s weights on this device (needs Q8_0, Q4_0 or Q4_1 and sm_80+)",
                    type_name(w)));
    if (nr == 0 || nt == 0) return;
    require(xa && Y, "gemm_tiled", "null pointer");
    const size_t xs = act_bytes(w, k);
    const int64_t row_blocks = (nr + kMmaBlockRows - 1) / kMmaBlockRows;
    require(row_blocks <= 0x7FFFFFFF, "gemm_tiled", "too many rows");
    const dim3 grid(unsigned(row_blocks), blocks_for(nt, kMmaTok));
    require(grid.y <= 65535, "gemm_tiled", "too many tokens for one launch");
    auto launch = [&](auto kernel) {
        kernel<<<grid, kMmaWarps * kLanes, 0, stream(s)>>>(k, static_cast<const uint8_t*>(W), w_stride, nr,
                                                           static_cast<const uint8_t*>(xa), xs, nt, Y, ldy);
    };
    switch (w) {
        case GgmlType::Q8_0: launch(gemm_mma_kernel<GgmlType::Q8_0>); break;
        case GgmlType::Q4_0: launch(gemm_mma_kernel<GgmlType::Q4_0>); break;
        default: launch(gemm_mma_kernel<GgmlType::Q4_1>); break;
    }
    check_launch("gemm_tiled");
}

void gemm(GgmlType w, int64_t k, const void* W, size_t w_stride, int64_t nr, const void* xa, int nt, float* Y,
          int64_t ldy, Stream s) {
    if (nt >= kMmaMinTokens && mma_switched_on() && gemm_tiled_available(w))
        gemm_tiled(w, k, W, w_stride, nr, xa, nt, Y, ldy, s);
    else
        gemm_rows(w, k, W, w_stride, nr, xa, nt, Y, ldy, s);
}

}  // namespace ps::cuda

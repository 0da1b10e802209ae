// prosparse_rt._core._testing_cuda: test hooks for the GPU side (tests/test_block_math.py,
// tests/test_gpu_kernels.py). Not part of the API.
//   bm_*:  the GPU kernels' arithmetic written as host loops over block_math.h's functions (the
//          code the kernels run, in the kernels' order), compared on any machine with the CPU
//          kernels, bit for bit.
//   cpu_*: CPU functions no other hook exposes (the FFN executor on a neuron range, RoPE, the
//          activation), the references for the above.
//   gpu_*: one kernel of cuda/kernels.h on device 0, inputs uploaded and results downloaded
//          (CUDA builds only; elsewhere they raise).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "block_math.h"
#include "common.h"
#include "cpu/kernels.h"
#include "ffn.h"
#include "kv_cache.h"
#include "python_bindings.h"
#include "quant.h"
#include "threadpool.h"
#if defined(PROSPARSE_HAVE_CUDA)
#include <cuda_runtime.h>

#include <chrono>

#include "cuda/device.h"
#include "cuda/kernels.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace ps::py {

namespace {

static_assert(bm::kNeuronGroup == cpu::kNeuronGroup, "block_math.h's neuron group is the CPU's");

using F32In2 = nb::ndarray<const float, nb::ndim<2>, nb::c_contig>;
using F32In1 = nb::ndarray<const float, nb::ndim<1>, nb::c_contig>;

template <GgmlType T>
using TypeC = std::integral_constant<GgmlType, T>;

// Calls f(TypeC<w>{}) for a weight type the kernels support.
template <class F>
decltype(auto) with_type(GgmlType w, F&& f) {
    switch (w) {
        case GgmlType::F32: return f(TypeC<GgmlType::F32>{});
        case GgmlType::F16: return f(TypeC<GgmlType::F16>{});
        case GgmlType::BF16: return f(TypeC<GgmlType::BF16>{});
        case GgmlType::Q8_0: return f(TypeC<GgmlType::Q8_0>{});
        case GgmlType::Q4_0: return f(TypeC<GgmlType::Q4_0>{});
        case GgmlType::Q4_1: return f(TypeC<GgmlType::Q4_1>{});
        case GgmlType::Q5_0: return f(TypeC<GgmlType::Q5_0>{});
        case GgmlType::Q5_1: return f(TypeC<GgmlType::Q5_1>{});
        case GgmlType::IQ4_NL: return f(TypeC<GgmlType::IQ4_NL>{});
        case GgmlType::Q2_K: return f(TypeC<GgmlType::Q2_K>{});
        case GgmlType::Q3_K: return f(TypeC<GgmlType::Q3_K>{});
        case GgmlType::Q4_K: return f(TypeC<GgmlType::Q4_K>{});
        case GgmlType::Q5_K: return f(TypeC<GgmlType::Q5_K>{});
        case GgmlType::Q6_K: return f(TypeC<GgmlType::Q6_K>{});
        default: fail(strfmt("no kernel for weight type %s", type_name(w)));
    }
}

constexpr bool is_float_type(GgmlType w) {
    return w == GgmlType::F32 || w == GgmlType::F16 || w == GgmlType::BF16;
}

// nr rows of k weights of `type` in a bytes buffer: checked, returned as a Tensor view.
Tensor weight_view(uint32_t type, const nb::bytes& W, int64_t nr, int64_t k, const char* what) {
    Tensor t;
    t.name = what; t.type = GgmlType(type); t.n_dims = 2; t.ne[0] = k; t.ne[1] = nr;
    const TypeInfo* ti = type_info(type);
    if (!ti || !ti->supported || nr < 0 || k <= 0 || k % ti->block_size != 0 ||
        size_t(W.size()) != size_t(nr) * row_bytes(t.type, k))
        fail(strfmt("%s: type %s with %lld rows of %lld does not match %zu bytes", what, type_name(type),
                    (long long)nr, (long long)k, size_t(W.size())));
    t.data = reinterpret_cast<const uint8_t*>(W.c_str());
    t.nbytes = W.size();
    return t;
}

// ---- The GPU's arithmetic as host loops ------------------------------------------------------------

// nt activation rows of k floats converted for weights of type w, in the CPU's layout, one block at a
// time as the quantize kernel does (a float row's tail past the last whole block copied as is).
std::vector<uint8_t> bm_quantize_rows(GgmlType w, const float* x, int nt, int64_t k) {
    const int64_t rb = bm::act_row_bytes(w, k), nb = k / (is_float_type(w) ? QK : bm::block_elems(w));
    std::vector<uint8_t> out(size_t(rb) * size_t(nt));
    for (int c = 0; c < nt; ++c) {
        uint8_t* row = out.data() + size_t(c) * size_t(rb);
        for (int64_t b = 0; b < nb; ++b) bm::quantize_act_block(w, x + c * k, row, nb, b);
        if (is_float_type(w)) std::memcpy(row + nb * QK * 4, x + c * k + nb * QK, size_t(k - nb * QK) * 4);
    }
    return out;
}

// One (row, token) product in the GPU's order: for quantized rows the block terms (which the
// kernel's lanes compute in parallel) chained in block order; for float rows 32 lane chains and the
// butterfly (block_math.h, "Float-weight dot order").
template <GgmlType W>
float bm_row_dot(const uint8_t* wr, const uint8_t* xr, int64_t k) {
    if constexpr (is_float_type(W)) {
        float s[bm::kFloatLanes] = {};
        const float* x = reinterpret_cast<const float*>(xr);
        for (int64_t j = 0; j < k; ++j) s[j % bm::kFloatLanes] = bm::fma_rn(bm::weight_at<W>(wr, j), x[j], s[j % bm::kFloatLanes]);
        for (int off = bm::kFloatLanes / 2; off > 0; off /= 2)
            for (int l = 0; l < off; ++l) s[l] = bm::add_rn(s[l], s[l + off]);
        return s[0];
    } else {
        const int64_t nb = k / bm::block_elems(W);
        std::vector<bm::BlockTerm> terms(static_cast<size_t>(nb));  // the lanes' work, then the chain
        for (int64_t b = 0; b < nb; ++b) terms[size_t(b)] = bm::block_term<W>(wr, xr, nb, b);
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; ++b) acc = bm::apply_term<W>(acc, terms[size_t(b)]);
        return acc;
    }
}

float bm_dot(GgmlType w, const uint8_t* wr, const uint8_t* xr, int64_t k) {
    return with_type(w, [&](auto T) { return bm_row_dot<decltype(T)::value>(wr, xr, k); });
}

// mma.m16n8k32 s8.s8.s32 on 32 lanes' registers, written from the PTX ISA's fragment tables (not
// from block_math.h): A[16][32] from a, B[32][8] from b, d[lane] = D at the lane's four places.
void emulate_mma_m16n8k32(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], int (&d)[32][4]) {
    int A[16][32], B[32][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 16; ++i) {
            const int row = g + (((i >= 4 && i < 8) || i >= 12) ? 8 : 0), col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
            A[row][col] = int(int8_t(uint8_t(a[lane][i / 4] >> (8 * (i & 3)))));
        }
        for (int i = 0; i < 8; ++i) B[4 * t + (i & 3) + (i >= 4 ? 16 : 0)][g] = int(int8_t(uint8_t(b[lane][i / 4] >> (8 * (i & 3)))));
    }
    for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
            const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i & 1);
            int s = 0;
            for (int kk = 0; kk < 32; ++kk) s += A[row][kk] * B[kk][col];
            d[lane][i] = s;
        }
}

// The tiled kernel's arithmetic (cuda/kernels_mma.cu) as host loops: per 16-row x 8-token tile and
// 32-block, the lanes' fragment words (block_math.h's mma_*_words), the emulated mma, and each D
// value chained into its (row, token) through mma_term. Rows and tokens past the end are zeros.
template <GgmlType W>
std::vector<float> bm_gemm_tiled_t(const Tensor& w, int64_t nr, const uint8_t* xa, size_t xs, int nt, int64_t k) {
    const int64_t nb = k / QK;
    std::vector<float> Y(size_t(nt) * size_t(nr));
    for (int64_t r0 = 0; r0 < nr; r0 += 16)
        for (int c0 = 0; c0 < nt; c0 += 8) {
            float acc[16][8] = {};
            for (int64_t b = 0; b < nb; ++b) {
                uint32_t a[32][4] = {}, x[32][2] = {};
                int d[32][4];
                for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane / 4, t = lane % 4;
                    if (r0 + g < nr) bm::mma_a_words<W>(w.row(r0 + g), b, t, &a[lane][0], &a[lane][2]);
                    if (r0 + g + 8 < nr) bm::mma_a_words<W>(w.row(r0 + g + 8), b, t, &a[lane][1], &a[lane][3]);
                    if (c0 + g < nt) bm::mma_b_words<W>(xa + size_t(c0 + g) * xs, b, t, &x[lane][0], &x[lane][1]);
                }
                emulate_mma_m16n8k32(a, x, d);
                for (int lane = 0; lane < 32; ++lane)
                    for (int i = 0; i < 4; ++i) {
                        const int rr = lane / 4 + (i >= 2 ? 8 : 0), cc = 2 * (lane % 4) + (i & 1);
                        if (r0 + rr >= nr || c0 + cc >= nt) continue;
                        const bm::WScales sw = bm::load_wscales<W>(w.row(r0 + rr), b);
                        const bm::XScales sx = bm::load_xscales<W>(xa + size_t(c0 + cc) * xs, nb, b);
                        acc[rr][cc] = bm::apply_term<W>(acc[rr][cc], bm::mma_term<W>(d[lane][i], sw, sx));
                    }
            }
            for (int rr = 0; rr < 16 && r0 + rr < nr; ++rr)
                for (int cc = 0; cc < 8 && c0 + cc < nt; ++cc) Y[size_t(c0 + cc) * size_t(nr) + size_t(r0 + rr)] = acc[rr][cc];
        }
    return Y;
}

struct FfnIn {
    FfnStrategy strategy;
    Activation act;
    float act_t, pred_thr;
    Tensor gate, up, down_t;
    const float* h;
    const float* logit;  // [nt][n_ff] or null
    int nt;
    int64_t n_hot;
};

FfnStrategy strategy_from(const std::string& s) {
    if (s == "dense") return FfnStrategy::DENSE;
    if (s == "exact") return FfnStrategy::EXACT;
    if (s == "predict") return FfnStrategy::PREDICT;
    fail("unknown strategy " + s);
}

// The coefficient kernel's work per row r < n_hot (kernels.h, ffn_hot_coef).
void bm_ffn_coef(const FfnIn& f, std::vector<float>& coef, std::vector<uint8_t>& active) {
    const int64_t k = f.gate.ne[0], n_ff = f.gate.ne[1];
    const std::vector<uint8_t> xg = bm_quantize_rows(f.gate.type, f.h, f.nt, k);
    const std::vector<uint8_t> xu = bm_quantize_rows(f.up.type, f.h, f.nt, k);
    const size_t rg = size_t(bm::act_row_bytes(f.gate.type, k)), ru = size_t(bm::act_row_bytes(f.up.type, k));
    coef.assign(size_t(f.nt) * size_t(f.n_hot), 0.0f);
    active.assign(size_t(f.n_hot), 0);
    std::vector<float> a(size_t(f.nt));
    std::vector<uint8_t> pred(size_t(f.nt));
    for (int64_t r = 0; r < f.n_hot; ++r) {
        bool any_pred = false, any_active = false;
        for (int c = 0; c < f.nt; ++c) {
            pred[size_t(c)] = f.strategy != FfnStrategy::PREDICT || f.logit[size_t(c) * n_ff + r] > f.pred_thr;
            any_pred |= pred[size_t(c)] != 0;
        }
        if (!any_pred) continue;
        for (int c = 0; c < f.nt; ++c) {
            const float g = bm_dot(f.gate.type, f.gate.row(r), xg.data() + size_t(c) * rg, k);
            a[size_t(c)] = pred[size_t(c)] ? bm::ffn_act(f.act, g, f.act_t) : 0.0f;
            any_active |= a[size_t(c)] != 0.0f;
        }
        if (f.strategy != FfnStrategy::DENSE && !any_active) continue;
        for (int c = 0; c < f.nt; ++c) {
            const float u = bm_dot(f.up.type, f.up.row(r), xu.data() + size_t(c) * ru, k);
            coef[size_t(c) * size_t(f.n_hot) + size_t(r)] = bm::ffn_coef(a[size_t(c)], u);
        }
        active[size_t(r)] = 1;
    }
}

// The down kernel's work (kernels.h, ffn_hot_down): a partial per (group, token, column), each an
// fma chain over the group's active rows, then the fold in group order after what Y holds.
template <GgmlType W>
void bm_down_t(const Tensor& D, int64_t n_rows, const uint8_t* active, const float* C, int64_t ldc, int nt,
               float* Y, int64_t ldy) {
    const int64_t n = D.ne[0], n_groups = (n_rows + bm::kNeuronGroup - 1) / bm::kNeuronGroup;
    std::vector<float> P(size_t(n_groups) * size_t(nt) * size_t(n), 0.0f);
    for (int64_t g = 0; g < n_groups; ++g)
        for (int c = 0; c < nt; ++c)
            for (int64_t j = 0; j < n; ++j) {
                float p = 0.0f;
                for (int64_t r = g * bm::kNeuronGroup; r < std::min(n_rows, (g + 1) * bm::kNeuronGroup); ++r)
                    if (active[r]) p = bm::axpy_step(p, bm::weight_at<W>(D.row(r), j), C[c * ldc + r]);
                P[(size_t(g) * nt + size_t(c)) * size_t(n) + size_t(j)] = p;
            }
    for (int c = 0; c < nt; ++c)
        for (int64_t j = 0; j < n; ++j) {
            float y = Y[c * ldy + j];
            for (int64_t g = 0; g < n_groups; ++g) y = bm::fold(y, P[(size_t(g) * nt + size_t(c)) * size_t(n) + size_t(j)]);
            Y[c * ldy + j] = y;
        }
}

void bm_down(const Tensor& D, int64_t n_rows, const uint8_t* active, const float* C, int64_t ldc, int nt, float* Y,
             int64_t ldy) {
    with_type(D.type, [&](auto T) { bm_down_t<decltype(T)::value>(D, n_rows, active, C, ldc, nt, Y, ldy); });
}

// The CPU's FFN executor on neurons [begin, end) of the layer: out += that range's down projection.
void cpu_ffn_range(const FfnIn& f, int64_t begin, int64_t end, int n_threads, float* out) {
    HParams hp;
    hp.n_embd = int(f.gate.ne[0]);
    hp.n_ff = int(f.gate.ne[1]);
    hp.act = f.act;
    LayerWeights L;
    L.ffn_gate = &f.gate;
    L.ffn_up = &f.up;
    L.ffn_down_t = &f.down_t;
    L.act_t = f.act_t;
    FfnOptions opt;
    opt.strategy = f.strategy;
    L.pred_threshold = f.pred_thr;
    FfnLayerStats st;
    FfnCall call;
    call.hp = &hp;
    call.L = &L;
    call.opt = &opt;
    call.h = f.h;
    call.pred_logit = f.logit;
    call.n_tokens = f.nt;
    call.stats = &st;
    ThreadPool pool(n_threads);
    CpuFfnExecutor ex(pool);
    ex.prepare(call, {begin, end});
    ex.accumulate(out);
}

FfnIn ffn_in(const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type, const nb::bytes& gate,
             uint32_t up_type, const nb::bytes& up, uint32_t down_type, const nb::bytes& down_t, int64_t n_ff,
             const F32In2& h, const std::optional<F32In2>& logit, float pred_thr, int64_t n_hot) {
    FfnIn f;
    f.strategy = strategy_from(strategy);
    if (!activation_from_name(act, &f.act)) fail("unknown activation " + act);
    f.act_t = act_t;
    f.pred_thr = pred_thr;
    const int64_t k = int64_t(h.shape(1));
    f.gate = weight_view(gate_type, gate, n_ff, k, "gate");
    f.up = weight_view(up_type, up, n_ff, k, "up");
    f.down_t = weight_view(down_type, down_t, n_ff, k, "down_t");
    f.h = h.data();
    f.nt = int(h.shape(0));
    f.logit = nullptr;
    if (f.strategy == FfnStrategy::PREDICT) {
        if (!logit || int64_t(logit->shape(0)) != f.nt || int64_t(logit->shape(1)) != n_ff)
            fail("predict needs logits of shape [n_tokens, n_ff]");
        f.logit = logit->data();
    }
    if (n_hot < 0 || n_hot > n_ff) fail("n_hot out of range");
    f.n_hot = n_hot;
    return f;
}

#if defined(PROSPARSE_HAVE_CUDA)
// A device copy of a host buffer (device 0; at least one byte so empty inputs still have an address).
cuda::DeviceBuffer to_device(const void* p, size_t n) {
    cuda::DeviceBuffer b(0, n ? n : 1);
    if (n) b.upload(p, n);
    return b;
}
std::vector<float> floats_of(const cuda::DeviceBuffer& b, size_t n) {
    std::vector<float> v(n);
    if (n) b.download(v.data(), n * sizeof(float));
    return v;
}
std::vector<uint8_t> bytes_of(const cuda::DeviceBuffer& b, size_t n) {
    std::vector<uint8_t> v(n);
    if (n) b.download(v.data(), n);
    return v;
}
void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw cuda::CudaError(strfmt("CUDA: %s failed: %s", what, cudaGetErrorString(e)));
}
nb::bytes as_bytes(const std::vector<uint8_t>& v) { return nb::bytes(reinterpret_cast<const char*>(v.data()), v.size()); }

// nt activation rows converted on the device (rows cuda::act_bytes apart).
cuda::DeviceBuffer device_acts(GgmlType w, const float* x, int nt, int64_t k) {
    cuda::DeviceBuffer dx = to_device(x, size_t(nt) * size_t(k) * 4);
    cuda::DeviceBuffer xa(0, cuda::act_bytes(w, k) * size_t(nt ? nt : 1));
    cuda::quantize_act(w, k, static_cast<const float*>(dx.data()), k, nt, xa.data(), nullptr);
    return xa;
}

// The hot range [0, f.n_hot) on the GPU: the coefficient kernel, then the down projection into out.
void gpu_hot(const FfnIn& f, float* out, std::vector<float>* coef_out, std::vector<uint8_t>* active_out,
             std::vector<int32_t>* counts_out) {
    const int64_t E = f.gate.ne[0], n_ff = f.gate.ne[1];
    cuda::DeviceBuffer dg = to_device(f.gate.data, f.gate.nbytes), du = to_device(f.up.data, f.up.nbytes);
    cuda::DeviceBuffer dd = to_device(f.down_t.data, f.down_t.nbytes);
    cuda::DeviceBuffer xg = device_acts(f.gate.type, f.h, f.nt, E), xu = device_acts(f.up.type, f.h, f.nt, E);
    cuda::DeviceBuffer dl = to_device(f.logit, f.logit ? size_t(f.nt) * size_t(n_ff) * 4 : 0);
    const size_t n_coef = size_t(f.nt) * size_t(f.n_hot);
    cuda::DeviceBuffer dc(0, n_coef * 4 + 4), da(0, size_t(f.n_hot) + 1);
    const std::vector<int32_t> zero(4, 0);
    cuda::DeviceBuffer dn = to_device(zero.data(), 16);
    cuda::FfnHotArgs a;
    a.strategy = f.strategy; a.act = f.act; a.act_t = f.act_t;
    a.n_embd = E; a.n_hot = f.n_hot; a.nt = f.nt;
    a.gate_type = f.gate.type; a.up_type = f.up.type;
    a.gate = dg.data(); a.gate_stride = f.gate.row_stride();
    a.up = du.data(); a.up_stride = f.up.row_stride();
    a.xa_gate = xg.data(); a.xa_up = xu.data();
    a.pred_logit = f.logit ? static_cast<const float*>(dl.data()) : nullptr;
    a.ld_logit = n_ff; a.pred_thr = f.pred_thr;
    a.coef = static_cast<float*>(dc.data()); a.ldc = f.n_hot;
    a.active = static_cast<uint8_t*>(da.data());
    a.counts = static_cast<int32_t*>(dn.data());
    cuda::ffn_hot_coef(a, nullptr);
    cuda::DeviceBuffer dy = to_device(out, size_t(f.nt) * size_t(E) * 4);
    cuda::DeviceBuffer scratch(0, cuda::ffn_down_scratch_bytes(E, f.n_hot) + 4);
    cuda::ffn_hot_down(f.down_t.type, E, dd.data(), f.down_t.row_stride(), f.n_hot, a.coef, a.ldc, a.active, f.nt,
                       static_cast<float*>(dy.data()), E, scratch.data(), nullptr);
    const std::vector<float> y = floats_of(dy, size_t(f.nt) * size_t(E));
    std::copy(y.begin(), y.end(), out);
    if (coef_out) *coef_out = floats_of(dc, n_coef);
    if (active_out) *active_out = bytes_of(da, size_t(f.n_hot));
    if (counts_out) {
        counts_out->resize(4);
        dn.download(counts_out->data(), 16);
    }
}

// Seconds per call of one kernel on device 0 (bench/bench_gpu_kernels.py), repeated for at least
// min_seconds. W holds n_copies matrices of nr x k used in turn, so that the working set exceeds
// the GPU's L2 as a model's layers do. op: "gemm" (nr x k against n_tokens activations; "gemm_rows" and
// "gemm_tiled" force a path), "coef"
// (ffn_hot_coef, exact, ReLU: gate of every row, up of the rows with a positive gate; W used as
// both), "down" (ffn_hot_down over nr rows of k, a `frac` of them active).
double gpu_bench(const std::string& op, uint32_t type, const nb::bytes& W, int64_t nr, int64_t k, int64_t n_copies,
                 int nt, double frac, double min_seconds) {
    if (n_copies < 1 || size_t(W.size()) % size_t(n_copies) != 0 || nt < 1 || !(frac >= 0 && frac <= 1))
        fail("bad bench arguments");
    const size_t per = size_t(W.size()) / size_t(n_copies);
    const Tensor w = weight_view(type, nb::bytes(W.c_str(), per), nr, k, "W");
    const cuda::DeviceBuffer dw = to_device(W.c_str(), W.size());
    std::vector<float> x(size_t(nt) * size_t(k));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 2654435761u % 1000) - 500) * 1e-3f;
    const cuda::DeviceBuffer xa = device_acts(w.type, x.data(), nt, k);
    std::vector<uint8_t> active(static_cast<size_t>(nr));
    for (size_t i = 0; i < active.size(); ++i) active[i] = double(i * 2654435761u % 1000) < frac * 1000.0;
    const cuda::DeviceBuffer da = to_device(active.data(), active.size());
    std::vector<float> coef(size_t(nt) * size_t(nr), 0.5f);
    cuda::DeviceBuffer dc = to_device(coef.data(), coef.size() * 4);
    cuda::DeviceBuffer dy(0, size_t(nt) * size_t(std::max(nr, k)) * 4);
    cuda::DeviceBuffer scratch(0, cuda::ffn_down_scratch_bytes(k, nr) + 4);
    const uint8_t* base = static_cast<const uint8_t*>(dw.data());
    auto call = [&](int64_t i) {
        const uint8_t* m = base + size_t(i % n_copies) * per;
        if (op == "gemm" || op == "gemm_rows" || op == "gemm_tiled") {
            auto* fn = op == "gemm" ? &cuda::gemm : op == "gemm_rows" ? &cuda::gemm_rows : &cuda::gemm_tiled;
            fn(w.type, k, m, w.row_stride(), nr, xa.data(), nt, static_cast<float*>(dy.data()), nr, nullptr);
        } else if (op == "coef") {
            cuda::FfnHotArgs a;
            a.strategy = FfnStrategy::EXACT; a.act = Activation::RELU;
            a.n_embd = k; a.n_hot = nr; a.nt = nt;
            a.gate_type = a.up_type = w.type;
            a.gate = a.up = m; a.gate_stride = a.up_stride = w.row_stride();
            a.xa_gate = a.xa_up = xa.data();
            a.coef = static_cast<float*>(dc.data()); a.ldc = nr;
            a.active = static_cast<uint8_t*>(da.data());
            cuda::ffn_hot_coef(a, nullptr);
        } else if (op == "down") {
            cuda::ffn_hot_down(w.type, k, m, w.row_stride(), nr, static_cast<const float*>(dc.data()), nr,
                               static_cast<const uint8_t*>(da.data()), nt, static_cast<float*>(dy.data()), k,
                               scratch.data(), nullptr);
        } else {
            fail("unknown op " + op);
        }
    };
    nb::gil_scoped_release r;
    call(0);  // warm up (and fail early on a bad op)
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    int64_t n = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double secs = 0;
    do {
        for (int j = 0; j < 16; ++j) call(n++);
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (secs < min_seconds);
    return secs / double(n);
}

void register_gpu_hooks(nb::module_& t) {
    t.def("gpu_bench", &gpu_bench, "op"_a, "type"_a, "W"_a, "nr"_a, "k"_a, "n_copies"_a, "n_tokens"_a, "frac"_a,
          "min_seconds"_a);
    t.def("gpu_quantize_act", [](uint32_t type, F32In2 X) {
        const GgmlType w = GgmlType(type);
        const int64_t k = int64_t(X.shape(1));
        const int nt = int(X.shape(0));
        const cuda::DeviceBuffer xa = device_acts(w, X.data(), nt, k);
        const size_t xs = cuda::act_bytes(w, k), rb = size_t(bm::act_row_bytes(w, k));
        const std::vector<uint8_t> all = bytes_of(xa, xs * size_t(nt));
        std::vector<uint8_t> out;
        for (int c = 0; c < nt; ++c) out.insert(out.end(), all.begin() + std::ptrdiff_t(c * xs), all.begin() + std::ptrdiff_t(c * xs + rb));
        return as_bytes(out);
    }, "type"_a, "X"_a);
    // path: "auto" (gemm's choice), "rows" (gemm_rows) or "tiled" (gemm_tiled)
    t.def("gpu_gemm", [](uint32_t type, nb::bytes W, int64_t nr, F32In2 X, const std::string& path) {
        const int64_t k = int64_t(X.shape(1));
        const int nt = int(X.shape(0));
        const Tensor w = weight_view(type, W, nr, k, "W");
        const cuda::DeviceBuffer dw = to_device(w.data, w.nbytes);
        const cuda::DeviceBuffer xa = device_acts(w.type, X.data(), nt, k);
        cuda::DeviceBuffer dy(0, size_t(nt) * size_t(nr) * 4 + 4);
        auto* fn = path == "auto" ? &cuda::gemm : path == "rows" ? &cuda::gemm_rows : path == "tiled" ? &cuda::gemm_tiled : nullptr;
        if (!fn) fail("unknown gemm path " + path);
        fn(w.type, k, dw.data(), w.row_stride(), nr, xa.data(), nt, static_cast<float*>(dy.data()), nr, nullptr);
        return owned_array(floats_of(dy, size_t(nt) * size_t(nr)), {size_t(nt), size_t(nr)});
    }, "type"_a, "W"_a, "nr"_a, "X"_a, "path"_a = "auto");
    t.def("gpu_gemm_tiled_available", [](uint32_t type) { return cuda::gemm_tiled_available(GgmlType(type)); }, "type"_a);
    t.def("gpu_axpy", [](uint32_t type, nb::bytes W, int64_t nr, int64_t k, std::vector<uint8_t> active, F32In2 Cf,
                         F32In2 Y0) {
        const Tensor w = weight_view(type, W, nr, k, "W");
        const int nt = int(Cf.shape(0));
        if (int64_t(active.size()) != nr || int64_t(Cf.shape(1)) != nr || int(Y0.shape(0)) != nt ||
            int64_t(Y0.shape(1)) != k)
            fail("shape mismatch");
        const cuda::DeviceBuffer dw = to_device(w.data, w.nbytes), da = to_device(active.data(), active.size());
        const cuda::DeviceBuffer dc = to_device(Cf.data(), size_t(nt) * size_t(nr) * 4);
        cuda::DeviceBuffer dy = to_device(Y0.data(), size_t(nt) * size_t(k) * 4);
        cuda::DeviceBuffer scratch(0, cuda::ffn_down_scratch_bytes(k, nr) + 4);
        cuda::ffn_hot_down(w.type, k, dw.data(), w.row_stride(), nr, static_cast<const float*>(dc.data()), nr,
                           static_cast<const uint8_t*>(da.data()), nt, static_cast<float*>(dy.data()), k, scratch.data(),
                           nullptr);
        return owned_array(floats_of(dy, size_t(nt) * size_t(k)), {size_t(nt), size_t(k)});
    }, "type"_a, "W"_a, "nr"_a, "k"_a, "active"_a, "C"_a, "Y0"_a);
    t.def("gpu_ffn_coef", [](const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type,
                             nb::bytes gate, uint32_t up_type, nb::bytes up, int64_t n_ff, F32In2 h,
                             std::optional<F32In2> logit, float pred_thr, int64_t n_hot) {
        const FfnIn f = ffn_in(strategy, act, act_t, gate_type, gate, up_type, up, gate_type, gate, n_ff, h, logit,
                               pred_thr, n_hot);
        std::vector<float> out(size_t(f.nt) * size_t(f.gate.ne[0]), 0.0f), coef;
        std::vector<uint8_t> active;
        std::vector<int32_t> counts;
        gpu_hot(f, out.data(), &coef, &active, &counts);
        return nb::make_tuple(owned_array(std::move(coef), {size_t(f.nt), size_t(n_hot)}), as_bytes(active), counts);
    }, "strategy"_a, "act"_a, "act_t"_a, "gate_type"_a, "gate"_a, "up_type"_a, "up"_a, "n_ff"_a, "h"_a,
       "logit"_a.none(), "pred_thr"_a, "n_hot"_a);
    t.def("gpu_ffn", [](const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type,
                        nb::bytes gate, uint32_t up_type, nb::bytes up, uint32_t down_type, nb::bytes down_t, int64_t n_ff,
                        F32In2 h, std::optional<F32In2> logit, float pred_thr, int64_t n_hot, bool cold) {
        const FfnIn f = ffn_in(strategy, act, act_t, gate_type, gate, up_type, up, down_type, down_t, n_ff, h, logit,
                               pred_thr, n_hot);
        const int64_t E = f.gate.ne[0];
        std::vector<float> out(size_t(f.nt) * size_t(E), 0.0f);
        if (n_hot > 0) gpu_hot(f, out.data(), nullptr, nullptr, nullptr);
        if (cold && n_hot < n_ff) cpu_ffn_range(f, n_hot, n_ff, 1, out.data());
        return owned_array(std::move(out), {size_t(f.nt), size_t(E)});
    }, "strategy"_a, "act"_a, "act_t"_a, "gate_type"_a, "gate"_a, "up_type"_a, "up"_a, "down_type"_a, "down_t"_a,
       "n_ff"_a, "h"_a, "logit"_a.none(), "pred_thr"_a, "n_hot"_a, "cold"_a);
    t.def("gpu_rms_norm", [](F32In2 x, F32In1 w, float eps) {
        const size_t nt = x.shape(0), n = x.shape(1);
        if (w.shape(0) != n) fail("shape mismatch");
        const cuda::DeviceBuffer dx = to_device(x.data(), nt * n * 4), dw = to_device(w.data(), n * 4);
        cuda::DeviceBuffer dy(0, nt * n * 4 + 4);
        cuda::rms_norm(static_cast<const float*>(dx.data()), static_cast<const float*>(dw.data()), int(nt), int64_t(n), eps,
                       static_cast<float*>(dy.data()), nullptr);
        return owned_array(floats_of(dy, nt * n), {nt, n});
    }, "x"_a, "w"_a, "eps"_a);
    t.def("gpu_rope", [](F32In2 x, int n_heads, int head_dim, int n_rot, F32In2 cs) {
        const size_t nt = x.shape(0), ld = x.shape(1);
        if (cs.shape(0) != nt || int(cs.shape(1)) != n_rot) fail("shape mismatch");
        cuda::DeviceBuffer dx = to_device(x.data(), nt * ld * 4);
        const cuda::DeviceBuffer dc = to_device(cs.data(), nt * size_t(n_rot) * 4);
        cuda::rope(static_cast<float*>(dx.data()), int(nt), int64_t(ld), n_heads, head_dim, n_rot,
                   static_cast<const float*>(dc.data()), nullptr);
        return owned_array(floats_of(dx, nt * ld), {nt, ld});
    }, "x"_a, "n_heads"_a, "head_dim"_a, "n_rot"_a, "cs"_a);
    // op: "add_scaled" (y += a * x), "scale" (y *= a) or "relu" (y = max(0, y)).
    t.def("gpu_elementwise", [](const std::string& op, F32In1 y, float a, std::optional<F32In1> x) {
        const size_t n = y.shape(0);
        cuda::DeviceBuffer dy = to_device(y.data(), n * 4);
        float* py = static_cast<float*>(dy.data());
        if (op == "add_scaled") {
            if (!x || x->shape(0) != n) fail("add_scaled needs x of y's length");
            const cuda::DeviceBuffer dx = to_device(x->data(), n * 4);
            cuda::add_scaled(py, a, static_cast<const float*>(dx.data()), int64_t(n), nullptr);
            return owned_array(floats_of(dy, n), {n});
        }
        if (op == "scale") cuda::scale(py, a, int64_t(n), nullptr);
        else if (op == "relu") cuda::relu(py, int64_t(n), nullptr);
        else fail("unknown op " + op);
        return owned_array(floats_of(dy, n), {n});
    }, "op"_a, "y"_a, "a"_a, "x"_a.none());
    t.def("gpu_embed", [](uint32_t type, nb::bytes table, int64_t n_vocab, int64_t n_embd, std::vector<int32_t> tokens,
                          float scale) {
        const Tensor w = weight_view(type, table, n_vocab, n_embd, "table");
        const cuda::DeviceBuffer dt = to_device(w.data, w.nbytes);
        const cuda::DeviceBuffer dk = to_device(tokens.data(), tokens.size() * 4);
        cuda::DeviceBuffer dx(0, tokens.size() * size_t(n_embd) * 4 + 4);
        cuda::embed(w.type, dt.data(), w.row_stride(), n_vocab, n_embd, static_cast<const int32_t*>(dk.data()),
                    int(tokens.size()), scale, static_cast<float*>(dx.data()), nullptr);
        return owned_array(floats_of(dx, tokens.size() * size_t(n_embd)), {tokens.size(), size_t(n_embd)});
    }, "type"_a, "table"_a, "n_vocab"_a, "n_embd"_a, "tokens"_a, "scale"_a);
    // Stores nt tokens' keys and values into a layer cache given as bytes (kc, vc), returns both.
    t.def("gpu_kv_store", [](const std::string& type, int n_head_kv, int head_dim, int n_ctx, int n_seq, F32In2 k, F32In2 v,
                             std::vector<int32_t> seq, std::vector<int32_t> pos, nb::bytes kc, nb::bytes vc) {
        KvType kt;
        if (!kv_type_from_name(type, &kt)) fail("unknown cache type " + type);
        const size_t nt = k.shape(0), ld = k.shape(1);
        if (v.shape(0) != nt || v.shape(1) != ld || seq.size() != nt || pos.size() != nt || kc.size() != vc.size())
            fail("shape mismatch");
        const size_t cb = size_t(kc.size());
        const cuda::DeviceBuffer dk = to_device(k.data(), nt * ld * 4), dv = to_device(v.data(), nt * ld * 4);
        const cuda::DeviceBuffer ds = to_device(seq.data(), nt * 4), dp = to_device(pos.data(), nt * 4);
        cuda::DeviceBuffer dkc = to_device(kc.c_str(), cb), dvc = to_device(vc.c_str(), cb);
        if (cb != size_t(n_seq) * n_head_kv * n_ctx * row_bytes(kv_ggml_type(kt), head_dim)) fail("cache size mismatch");
        cuda::kv_store(kt, n_head_kv, head_dim, n_ctx, n_seq, static_cast<const float*>(dk.data()),
                       static_cast<const float*>(dv.data()), int64_t(ld), int(nt), static_cast<const int32_t*>(ds.data()),
                       static_cast<const int32_t*>(dp.data()), static_cast<uint8_t*>(dkc.data()),
                       static_cast<uint8_t*>(dvc.data()), nullptr);
        return nb::make_tuple(as_bytes(bytes_of(dkc, cb)), as_bytes(bytes_of(dvc, cb)));
    }, "type"_a, "n_head_kv"_a, "head_dim"_a, "n_ctx"_a, "n_seq"_a, "k"_a, "v"_a, "seq"_a, "pos"_a, "kc"_a, "vc"_a);
    t.def("gpu_attention", [](const std::string& type, int n_head, int n_head_kv, int head_dim, int n_ctx, int n_seq,
                              F32In2 q, std::vector<int32_t> seq, std::vector<int32_t> pos, nb::bytes kc, nb::bytes vc,
                              float scale) {
        KvType kt;
        if (!kv_type_from_name(type, &kt)) fail("unknown cache type " + type);
        const size_t nt = q.shape(0), H = size_t(n_head) * size_t(head_dim);
        if (q.shape(1) != H || seq.size() != nt || pos.size() != nt || kc.size() != vc.size() ||
            size_t(kc.size()) != size_t(n_seq) * n_head_kv * n_ctx * row_bytes(kv_ggml_type(kt), head_dim))
            fail("shape mismatch");
        const cuda::DeviceBuffer dq = to_device(q.data(), nt * H * 4);
        const cuda::DeviceBuffer ds = to_device(seq.data(), nt * 4), dp = to_device(pos.data(), nt * 4);
        const cuda::DeviceBuffer dkc = to_device(kc.c_str(), kc.size()), dvc = to_device(vc.c_str(), vc.size());
        cuda::DeviceBuffer dout(0, nt * H * 4 + 4);
        cuda::DeviceBuffer dscratch(0, cuda::attention_scratch_bytes(n_head, head_dim, n_ctx, int(nt)));
        cuda::attention(kt, n_head, n_head_kv, head_dim, n_ctx, n_seq, static_cast<const float*>(dq.data()), int(nt),
                        static_cast<const int32_t*>(ds.data()), static_cast<const int32_t*>(dp.data()),
                        static_cast<const uint8_t*>(dkc.data()), static_cast<const uint8_t*>(dvc.data()), scale,
                        static_cast<float*>(dout.data()), dscratch.data(), nullptr);
        return owned_array(floats_of(dout, nt * H), {nt, H});
    }, "type"_a, "n_head"_a, "n_head_kv"_a, "head_dim"_a, "n_ctx"_a, "n_seq"_a, "q"_a, "seq"_a, "pos"_a, "kc"_a, "vc"_a,
       "scale"_a);
}
#endif

}  // namespace

void register_cuda_hooks(nb::module_& m) {
    nb::module_ t = m.def_submodule("_testing_cuda", "internal test hooks of the GPU kernels");

    // ---- bm_*: block_math.h on the host ----
    t.def("bm_quantize_act", [](uint32_t type, F32In2 X) {
        const GgmlType w = GgmlType(type);
        const int64_t k = int64_t(X.shape(1));
        if (cpu::weight_bytes(w, k) == 0 || (!is_float_type(w) && k % bm::block_elems(w) != 0))
            fail("unsupported type or size");
        const std::vector<uint8_t> out = bm_quantize_rows(w, X.data(), int(X.shape(0)), k);
        return nb::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    }, "type"_a, "X"_a);
    t.def("bm_gemm", [](uint32_t type, nb::bytes W, int64_t nr, F32In2 X) {
        const int64_t k = int64_t(X.shape(1)), nt = int64_t(X.shape(0));
        const Tensor w = weight_view(type, W, nr, k, "W");
        const std::vector<uint8_t> xa = bm_quantize_rows(w.type, X.data(), int(nt), k);
        const size_t rb = size_t(bm::act_row_bytes(w.type, k));
        std::vector<float> Y(size_t(nt * nr));
        for (int64_t c = 0; c < nt; ++c)
            for (int64_t r = 0; r < nr; ++r) Y[size_t(c * nr + r)] = bm_dot(w.type, w.row(r), xa.data() + c * rb, k);
        return owned_array(std::move(Y), {size_t(nt), size_t(nr)});
    }, "type"_a, "W"_a, "nr"_a, "X"_a);
    t.def("bm_gemm_tiled", [](uint32_t type, nb::bytes W, int64_t nr, F32In2 X) {
        const int64_t k = int64_t(X.shape(1));
        const int nt = int(X.shape(0));
        const Tensor w = weight_view(type, W, nr, k, "W");
        const std::vector<uint8_t> xa = bm_quantize_rows(w.type, X.data(), nt, k);
        const size_t xs = size_t(bm::act_row_bytes(w.type, k));
        std::vector<float> Y;
        switch (w.type) {
            case GgmlType::Q8_0: Y = bm_gemm_tiled_t<GgmlType::Q8_0>(w, nr, xa.data(), xs, nt, k); break;
            case GgmlType::Q4_0: Y = bm_gemm_tiled_t<GgmlType::Q4_0>(w, nr, xa.data(), xs, nt, k); break;
            case GgmlType::Q4_1: Y = bm_gemm_tiled_t<GgmlType::Q4_1>(w, nr, xa.data(), xs, nt, k); break;
            default: fail(strfmt("no tiled kernel for %s weights", type_name(w.type)));
        }
        return owned_array(std::move(Y), {size_t(nt), size_t(nr)});
    }, "type"_a, "W"_a, "nr"_a, "X"_a);
    t.def("bm_axpy", [](uint32_t type, nb::bytes W, int64_t nr, int64_t k, std::vector<uint8_t> active, F32In2 C,
                        F32In2 Y0) {
        const Tensor w = weight_view(type, W, nr, k, "W");
        const int64_t nt = int64_t(C.shape(0));
        if (int64_t(active.size()) != nr || int64_t(C.shape(1)) != nr || int64_t(Y0.shape(0)) != nt ||
            int64_t(Y0.shape(1)) != k)
            fail("shape mismatch");
        std::vector<float> Y(Y0.data(), Y0.data() + size_t(nt * k));
        bm_down(w, nr, active.data(), C.data(), nr, int(nt), Y.data(), k);
        return owned_array(std::move(Y), {size_t(nt), size_t(k)});
    }, "type"_a, "W"_a, "nr"_a, "k"_a, "active"_a, "C"_a, "Y0"_a);
    // The hot range's coefficients and active rows, as the fused kernel computes them.
    t.def("bm_ffn_coef", [](const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type,
                            nb::bytes gate, uint32_t up_type, nb::bytes up, int64_t n_ff, F32In2 h,
                            std::optional<F32In2> logit, float pred_thr, int64_t n_hot) {
        const FfnIn f = ffn_in(strategy, act, act_t, gate_type, gate, up_type, up, gate_type, gate, n_ff, h, logit,
                               pred_thr, n_hot);
        std::vector<float> coef;
        std::vector<uint8_t> active;
        bm_ffn_coef(f, coef, active);
        return nb::make_tuple(owned_array(std::move(coef), {size_t(f.nt), size_t(n_hot)}),
                              nb::bytes(reinterpret_cast<const char*>(active.data()), active.size()));
    }, "strategy"_a, "act"_a, "act_t"_a, "gate_type"_a, "gate"_a, "up_type"_a, "up"_a, "n_ff"_a, "h"_a,
       "logit"_a.none(), "pred_thr"_a, "n_hot"_a);
    // out0 + the FFN of neurons [0, n_hot) through the GPU's arithmetic (coefficients, then the down
    // projection over ffn_down_t), then, when cold, + [n_hot, n_ff) on the CPU executor: the hybrid.
    t.def("bm_ffn", [](const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type,
                       nb::bytes gate, uint32_t up_type, nb::bytes up, uint32_t down_type, nb::bytes down_t, int64_t n_ff,
                       F32In2 h, std::optional<F32In2> logit, float pred_thr, int64_t n_hot, bool cold) {
        const FfnIn f = ffn_in(strategy, act, act_t, gate_type, gate, up_type, up, down_type, down_t, n_ff, h, logit,
                               pred_thr, n_hot);
        const int64_t E = f.gate.ne[0];
        std::vector<float> out(size_t(f.nt) * size_t(E), 0.0f);
        std::vector<float> coef;
        std::vector<uint8_t> active;
        bm_ffn_coef(f, coef, active);
        bm_down(f.down_t, n_hot, active.data(), coef.data(), n_hot, f.nt, out.data(), E);
        if (cold && n_hot < n_ff) {
            nb::gil_scoped_release r;
            cpu_ffn_range(f, n_hot, n_ff, 1, out.data());
        }
        return owned_array(std::move(out), {size_t(f.nt), size_t(E)});
    }, "strategy"_a, "act"_a, "act_t"_a, "gate_type"_a, "gate"_a, "up_type"_a, "up"_a, "down_type"_a, "down_t"_a,
       "n_ff"_a, "h"_a, "logit"_a.none(), "pred_thr"_a, "n_hot"_a, "cold"_a);
    t.def("bm_fp16", [](F32In1 x) {  // block_math.h's fp32 -> fp16 -> fp32 of each value, and the halves
        std::vector<uint16_t> hs(x.shape(0));
        for (size_t i = 0; i < hs.size(); ++i) hs[i] = bm::fp32_to_fp16(x.data()[i]);
        return nb::bytes(reinterpret_cast<const char*>(hs.data()), hs.size() * 2);
    }, "x"_a);
    t.def("bm_half_to_float", [](nb::bytes h) {
        const size_t n = h.size() / 2;
        std::vector<float> out(n);
        for (size_t i = 0; i < n; ++i) out[i] = bm::fp16_to_fp32(bm::load_u16(reinterpret_cast<const uint8_t*>(h.c_str()) + 2 * i));
        return owned_array(std::move(out), {n});
    }, "h"_a);
    // A row of type `type` dequantized element by element (ref: quant.cpp's dequantize_row, else
    // the kernels' dequant_row).
    t.def("bm_dequant", [](uint32_t type, nb::bytes data, int64_t n, bool ref) {
        const Tensor w = weight_view(type, data, 1, n, "row");
        std::vector<float> out(static_cast<size_t>(n));
        with_type(w.type, [&](auto T) {
            constexpr GgmlType W = decltype(T)::value;
            for (int64_t j = 0; j < n; ++j) out[size_t(j)] = ref ? bm::weight_at<W, true>(w.data, j) : bm::weight_at<W>(w.data, j);
        });
        return owned_array(std::move(out), {size_t(n)});
    }, "type"_a, "data"_a, "n"_a, "ref"_a);
    t.def("bm_q8_0_row", [](F32In1 x) {  // quant.cpp's quantize_q8_0 (the q8_0 KV cache's rounding)
        const int64_t n = int64_t(x.shape(0));
        if (n % QK) fail("a whole number of blocks");
        std::vector<block_q8_0> out(static_cast<size_t>(n / QK));
        for (int64_t b = 0; b < n / QK; ++b) {
            int sum = 0;
            const float d = bm::q8_block(x.data() + b * QK, out[size_t(b)].qs, &sum);
            out[size_t(b)].d = bm::fp32_to_fp16(d);
        }
        return nb::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(block_q8_0));
    }, "x"_a);
    t.def("bm_activation", [](const std::string& act, F32In1 g, float t_) {
        Activation a;
        if (!activation_from_name(act, &a)) fail("unknown activation " + act);
        std::vector<float> out(g.shape(0));
        for (size_t i = 0; i < out.size(); ++i) out[i] = bm::ffn_act(a, g.data()[i], t_);
        return owned_array(std::move(out), {out.size()});
    }, "act"_a, "g"_a, "t"_a);
    t.def("bm_rope", [](F32In2 x, int n_heads, int head_dim, int n_rot, F32In2 cs) {
        const size_t nt = x.shape(0), ld = x.shape(1);
        std::vector<float> y(x.data(), x.data() + nt * ld);
        for (size_t t = 0; t < nt; ++t)
            for (int h = 0; h < n_heads; ++h)
                for (int i = 0; i < n_rot / 2; ++i) {
                    float* p = y.data() + t * ld + size_t(h) * head_dim + 2 * i;
                    bm::rope_pair(p, p + 1, cs.data()[t * size_t(n_rot) + 2 * i], cs.data()[t * size_t(n_rot) + 2 * i + 1]);
                }
        return owned_array(std::move(y), {nt, ld});
    }, "x"_a, "n_heads"_a, "head_dim"_a, "n_rot"_a, "cs"_a);

    // ---- cpu_*: references ----
    t.def("cpu_ffn", [](const std::string& strategy, const std::string& act, float act_t, uint32_t gate_type,
                        nb::bytes gate, uint32_t up_type, nb::bytes up, uint32_t down_type, nb::bytes down_t,
                        int64_t n_ff, F32In2 h, std::optional<F32In2> logit, float pred_thr, int64_t begin, int64_t end,
                        int n_threads) {
        const FfnIn f = ffn_in(strategy, act, act_t, gate_type, gate, up_type, up, down_type, down_t, n_ff, h, logit,
                               pred_thr, 0);
        if (begin < 0 || begin > end || end > n_ff) fail("range out of bounds");
        std::vector<float> out(size_t(f.nt) * size_t(f.gate.ne[0]), 0.0f);
        {
            nb::gil_scoped_release r;
            cpu_ffn_range(f, begin, end, n_threads, out.data());
        }
        return owned_array(std::move(out), {size_t(f.nt), size_t(f.gate.ne[0])});
    }, "strategy"_a, "act"_a, "act_t"_a, "gate_type"_a, "gate"_a, "up_type"_a, "up"_a, "down_type"_a, "down_t"_a,
       "n_ff"_a, "h"_a, "logit"_a.none(), "pred_thr"_a, "begin"_a, "end"_a, "n_threads"_a);
    t.def("cpu_activation", [](const std::string& act, F32In1 g, float t_) {
        Activation a;
        if (!activation_from_name(act, &a)) fail("unknown activation " + act);
        std::vector<float> out(g.shape(0));
        for (size_t i = 0; i < out.size(); ++i) out[i] = ffn_activation(a, g.data()[i], t_);
        return owned_array(std::move(out), {out.size()});
    }, "act"_a, "g"_a, "t"_a);
    t.def("cpu_rope", [](F32In2 x, int n_heads, int head_dim, int n_rot, F32In2 cs) {
        const size_t nt = x.shape(0), ld = x.shape(1);
        if (size_t(n_heads) * size_t(head_dim) > ld || n_rot > head_dim || cs.shape(0) != nt || int(cs.shape(1)) != n_rot)
            fail("shape mismatch");
        std::vector<float> y(x.data(), x.data() + nt * ld);
        for (size_t t = 0; t < nt; ++t) rope(y.data() + t * ld, n_heads, head_dim, n_rot, cs.data() + t * size_t(n_rot));
        return owned_array(std::move(y), {nt, ld});
    }, "x"_a, "n_heads"_a, "head_dim"_a, "n_rot"_a, "cs"_a);
    t.def("cpu_rope_table", [](int n_rot, const std::vector<int32_t>& pos, float theta, float freq_scale) {
        std::vector<float> cs(pos.size() * size_t(n_rot));
        for (size_t t = 0; t < pos.size(); ++t) rope_table(cs.data() + t * size_t(n_rot), n_rot, pos[t], theta, freq_scale);
        return owned_array(std::move(cs), {pos.size(), size_t(n_rot)});
    }, "n_rot"_a, "pos"_a, "theta"_a, "freq_scale"_a);
#if defined(PROSPARSE_HAVE_CUDA)
    register_gpu_hooks(t);  // gpu_*: CUDA builds only (tests/test_gpu_kernels.py skips without a GPU)
#endif
}

}  // namespace ps::py

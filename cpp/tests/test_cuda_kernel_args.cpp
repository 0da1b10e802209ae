// cuda/kernels.h's host-side checks, which need no GPU: every wrapper refuses arguments its kernels
// cannot take with a ps::Error naming the problem, before any CUDA call, and the size functions
// give what the kernels index. Runs in any CUDA build (CI has nvcc and no GPU); a build without
// CUDA has no kernels and only prints that.
#include <cstdio>
#include <cstring>
#include <string>

#include "common.h"
#if defined(PROSPARSE_HAVE_CUDA)
#include "cpu/kernels.h"
#include "cuda/kernels.h"
#endif

namespace {

int failures = 0;

void check(bool ok, const char* what, int line) {
    if (!ok) {
        std::fprintf(stderr, "test_cuda_kernel_args.cpp:%d: FAILED: %s\n", line, what);
        ++failures;
    }
}
#define CHECK(c) check((c), #c, __LINE__)

// f() throws ps::Error whose message contains `needle`.
template <class F>
bool refuses(F&& f, const char* needle) {
    try {
        f();
    } catch (const ps::Error& e) {
        if (std::strstr(e.what(), needle)) return true;
        std::fprintf(stderr, "  message was: %s\n", e.what());
        return false;
    } catch (...) {
        return false;
    }
    return false;
}

}  // namespace

int main() {
#if defined(PROSPARSE_HAVE_CUDA)
    using namespace ps;
    using namespace ps::cuda;
    // Fake device addresses: never dereferenced, since every call below fails its checks first.
    alignas(16) static unsigned char buf[4096];
    void* p = buf;
    float* f = reinterpret_cast<float*>(buf);

    for (GgmlType w : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1,
                       GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::IQ4_NL}) {
        CHECK(kernel_type_supported(w));
        for (int64_t k : {32, 352, 4096}) {
            const size_t b = act_bytes(w, k);
            CHECK(b % 16 == 0);
            CHECK(b >= cpu::act_row_bytes(w, k) && b < cpu::act_row_bytes(w, k) + 16);
        }
    }
    for (GgmlType w : {GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K}) {
        CHECK(kernel_type_supported(w));
        for (int64_t k : {256, 768, 4096}) {
            const size_t b = act_bytes(w, k);
            CHECK(b % 16 == 0);
            CHECK(b >= cpu::act_row_bytes(w, k) && b < cpu::act_row_bytes(w, k) + 16);
        }
        CHECK(refuses([w] { act_bytes(w, 352); }, "whole number of blocks"));
    }
    CHECK(!kernel_type_supported(GgmlType::IQ4_XS));
    CHECK(refuses([] { act_bytes(GgmlType::IQ4_XS, 256); }, "iq4_xs"));
    CHECK(refuses([] { act_bytes(GgmlType::Q4_0, 33); }, "whole number of blocks"));
    CHECK(ffn_down_scratch_bytes(4096, 11008) == size_t(172) * 8 * 4096 * 4);
    CHECK(ffn_down_scratch_bytes(96, 77) == size_t(2) * 8 * 96 * 4);

    CHECK(refuses([&] { gemm(GgmlType::IQ4_XS, 256, p, 136, 1, p, 1, f, 1, nullptr); }, "no kernel for weight type iq4_xs"));
    CHECK(refuses([&] { gemm(GgmlType::Q4_K, 288, p, 162, 1, p, 1, f, 1, nullptr); }, "whole number of blocks"));
    CHECK(refuses([&] { gemm(GgmlType::Q6_K, 256, p, 200, 1, p, 1, f, 1, nullptr); }, "shorter than a row"));
    CHECK(refuses([&] { gemm(GgmlType::Q4_0, 48, p, 36, 1, p, 1, f, 1, nullptr); }, "whole number of blocks"));
    CHECK(refuses([&] { gemm(GgmlType::Q4_1, 32, buf + 2, 20, 1, p, 1, f, 1, nullptr); }, "4-byte boundaries"));
    CHECK(refuses([&] { gemm(GgmlType::Q4_0, 64, p, 18, 1, p, 1, f, 1, nullptr); }, "shorter than a row"));
    CHECK(refuses([&] { gemm(GgmlType::Q8_0, 32, p, 34, 4, p, 1, f, 3, nullptr); }, "ldy < nr"));
    CHECK(refuses([&] { gemm(GgmlType::Q8_0, 32, p, 34, 4, buf + 4, 1, f, 4, nullptr); }, "16-byte"));
    CHECK(refuses([&] { quantize_act(GgmlType::Q8_0, 64, f, 32, 1, p, nullptr); }, "ldx < k"));
    CHECK(refuses([&] { quantize_act(GgmlType::Q8_0, 64, f, 64, 1, buf + 8, nullptr); }, "16-byte"));

    FfnHotArgs a;
    a.strategy = FfnStrategy::PREDICT;
    a.n_embd = 64; a.n_hot = 10; a.nt = 1;
    a.gate_type = a.up_type = GgmlType::Q4_0;
    a.gate = a.up = p; a.gate_stride = a.up_stride = 36;
    a.xa_gate = a.xa_up = p; a.coef = f; a.ldc = 10; a.active = buf;
    CHECK(refuses([&] { ffn_hot_coef(a, nullptr); }, "predict needs logits"));
    a.strategy = FfnStrategy::EXACT;
    a.ldc = 9;
    CHECK(refuses([&] { ffn_hot_coef(a, nullptr); }, "ldc < n_hot"));
    a.ldc = 10;
    a.up_type = GgmlType::IQ4_XS;
    CHECK(refuses([&] { ffn_hot_coef(a, nullptr); }, "iq4_xs"));

    CHECK(refuses([&] { ffn_hot_down(GgmlType::Q4_0, 64, p, 36, 10, f, 9, buf, 1, f, 64, p, nullptr); }, "rows overlap"));
    CHECK(refuses([&] { ffn_hot_down(GgmlType::Q4_0, 64, p, 36, 10, f, 10, buf, 1, nullptr, 64, p, nullptr); },
                  "null pointer"));
    CHECK(refuses([&] { rope(f, 1, 64, 1, 64, 3, f, nullptr); }, "n_rot must be even"));
    CHECK(refuses([&] { rope(f, 1, 63, 1, 64, 2, f, nullptr); }, "ldx < n_heads * head_dim"));
    CHECK(refuses([&] { rms_norm(f, f, 1, 0, 1e-5f, f, nullptr); }, "n > 0"));
    CHECK(refuses([&] { embed(GgmlType::Q4_0, p, 18, 10, 48, reinterpret_cast<int32_t*>(buf), 1, 1.0f, f, nullptr); },
                  "whole number of blocks"));
    CHECK(refuses([&] {
        kv_store(KvType::Q8_0, 2, 48, 16, 1, f, f, 96, 1, reinterpret_cast<int32_t*>(buf), reinterpret_cast<int32_t*>(buf),
                 buf, buf, nullptr);
    }, "multiple of 32"));
    CHECK(refuses([&] {
        attention(KvType::F16, 6, 4, 64, 16, 1, f, 1, reinterpret_cast<int32_t*>(buf), reinterpret_cast<int32_t*>(buf), buf,
                  buf, 0.125f, f, buf, nullptr);
    }, "multiple of n_head_kv"));
    CHECK(refuses([&] {
        attention(KvType::F32, 2, 1, 320, 16, 1, f, 1, reinterpret_cast<int32_t*>(buf), reinterpret_cast<int32_t*>(buf), buf,
                  buf, 0.125f, f, buf, nullptr);
    }, "head_dim above 256"));
    // one token: a partial (head_dim + 2 floats) per (head, 128-position tile of n_ctx); a prompt's
    // tokens are chunked so that the partials stay within 64 MiB
    CHECK(attention_scratch_bytes(32, 128, 4096, 1) == size_t(32) * 32 * 130 * 4);
    CHECK(attention_scratch_bytes(4, 64, 129, 3) == size_t(3) * 4 * 2 * 66 * 4);
    CHECK(attention_scratch_bytes(32, 128, 4096, 512) == size_t(126) * 32 * 32 * 130 * 4);
    CHECK(!gemm_tiled_available(GgmlType::F16) && !gemm_tiled_available(GgmlType::Q4_K));
    CHECK(refuses([&] { gemm_tiled(GgmlType::F16, 32, p, 64, 1, p, 16, f, 1, nullptr); }, "no tiled kernel for f16"));
    // Nothing to do is not an error, and launches nothing (no GPU needed).
    gemm(GgmlType::Q4_0, 32, p, 18, 0, p, 1, f, 0, nullptr);
    gemm(GgmlType::Q4_0, 32, p, 18, 4, p, 0, f, 4, nullptr);
    ffn_hot_down(GgmlType::F16, 64, p, 128, 0, f, 0, buf, 3, f, 64, p, nullptr);
    std::printf("%s\n", failures ? "FAILED" : "ok");
#else
    std::printf("built without CUDA: no kernels to check\n");
#endif
    return failures ? 1 : 0;
}

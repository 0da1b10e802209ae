// cuda/device.h from C++, meant to run under AddressSanitizer/UBSan like the other cpp/tests
// (cmake -DPROSPARSE_SANITIZE=ON -DPROSPARSE_BUILD_TESTS=ON). Without a usable GPU (CI): the
// status says why, and device memory fails with CudaError rather than crashing. With GPUs: each
// one round-trips bytes through device memory, copies outside a buffer are refused, and a moved-from
// buffer owns nothing (so nothing is freed twice).
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <utility>
#include <vector>

#include "cuda/device.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, int line) {
    if (!ok) {
        std::fprintf(stderr, "test_cuda_device.cpp:%d: FAILED: %s\n", line, what);
        ++failures;
    }
}
#define CHECK(c) check((c), #c, __LINE__)

template <class F>
bool throws_cuda_error(F&& f) {
    try {
        f();
    } catch (const ps::cuda::CudaError&) {
        return true;
    }
    return false;
}

}  // namespace

int main() {
    using ps::cuda::DeviceBuffer;
    const ps::cuda::Status st = ps::cuda::status();
    CHECK(st.compiled == ps::cuda::compiled());
#ifdef PROSPARSE_HAVE_CUDA
    CHECK(st.compiled);
#else
    CHECK(!st.compiled);
#endif
    std::printf("CUDA compiled: %d, usable GPUs: %zu%s%s\n", int(st.compiled), st.devices.size(),
                st.reason.empty() ? "" : ", reason: ", st.reason.c_str());

    if (st.devices.empty()) {
        CHECK(!st.reason.empty());
        CHECK(throws_cuda_error([] { DeviceBuffer b(0, 16); }));
        CHECK(throws_cuda_error([] { ps::cuda::CudaStream s(0); }));
        CHECK(throws_cuda_error([] { ps::cuda::CudaEvent e(0); }));
        CHECK(throws_cuda_error([] { ps::cuda::PinnedBuffer p(16); }));
        CHECK(throws_cuda_error([] { ps::cuda::ScopedDevice on(0); }));
    }
    for (const auto& d : st.devices) {
        CHECK(d.cc_major * 10 + d.cc_minor >= ps::cuda::kMinComputeCapability);
        CHECK(d.free_memory > 0 && d.free_memory <= d.total_memory);
        const size_t n = 1 << 20;
        std::vector<unsigned char> in(n), out(n, 0);
        std::iota(in.begin(), in.end(), 0);
        DeviceBuffer b(d.index, n);
        CHECK(b.data() != nullptr && b.size() == n && b.device() == d.index);
        b.upload(in.data(), n);
        b.download(out.data(), n);
        CHECK(in == out);
        b.download(out.data(), 16, n - 16);
        CHECK(std::equal(out.begin(), out.begin() + 16, in.end() - 16));
        CHECK(throws_cuda_error([&] { b.upload(in.data(), n, 1); }));
        CHECK(throws_cuda_error([&] { b.download(out.data(), 1, n); }));
        DeviceBuffer c = std::move(b);
        CHECK(b.data() == nullptr && b.size() == 0);
        CHECK(c.size() == n);
        DeviceBuffer e(d.index, 0);  // empty: no allocation, nothing to free
        CHECK(e.data() == nullptr);

        // the executor's pattern: pinned staging, async copies on a stream, a blocking-sync event
        ps::cuda::ScopedDevice on(d.index);
        ps::cuda::CudaStream s(d.index);
        ps::cuda::CudaEvent t0(d.index), t1(d.index);
        ps::cuda::PinnedBuffer up(n), down(n);
        std::copy(in.begin(), in.end(), static_cast<unsigned char*>(up.data()));
        std::fill_n(static_cast<unsigned char*>(down.data()), n, 0);
        t0.record(s);
        ps::cuda::copy_to_device(c.data(), up.data(), n, s);
        ps::cuda::fill_zero(c.data(), 16, s);
        ps::cuda::copy_to_host(down.data(), c.data(), n, s);
        t1.record(s);
        t1.wait();
        CHECK(t1.done());
        CHECK(t1.seconds_since(t0) >= 0.0);
        const unsigned char* got = static_cast<const unsigned char*>(down.data());
        CHECK(std::all_of(got, got + 16, [](unsigned char x) { return x == 0; }));
        CHECK(std::equal(got + 16, got + n, in.begin() + 16));
        ps::cuda::PinnedBuffer moved = std::move(up);
        CHECK(up.data() == nullptr && moved.size() == n);
    }
    if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}

// Device query and device memory, compiled by nvcc when the build has CUDA (PROSPARSE_HAVE_CUDA).
// cudart is linked statically, so nothing here runs at load: a machine without a driver imports
// the module and gets "no driver" from status().
#include "cuda/device.h"

#include <cuda_runtime.h>

#include "common.h"

namespace ps::cuda {

namespace {

std::string describe(cudaError_t e) {
    return strfmt("%s (error %d: %s)", cudaGetErrorName(e), int(e), cudaGetErrorString(e));
}

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        cudaGetLastError();  // clear it, so the next call does not report it again
        throw CudaError("CUDA: " + std::string(what) + " failed: " + describe(e));
    }
}

// Sets the current device for the duration of a scope and restores the caller's afterwards, so a
// query or an allocation on device N does not move the caller's work to N.
class DeviceScope {
public:
    explicit DeviceScope(int device) {
        check(cudaGetDevice(&prev_), "cudaGetDevice");
        check(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() { cudaSetDevice(prev_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

private:
    int prev_ = 0;
};

constexpr unsigned kProbeValue = 0x70737274u;

// One thread writes a known word: the device can run this build's machine code (or JIT its PTX).
// A device the fat binary has no code for fails here with cudaErrorNoKernelImageForDevice, a driver
// too old for the PTX with cudaErrorUnsupportedPtxVersion, before any model is loaded.
__global__ void probe_kernel(unsigned* out) { *out = kProbeValue; }

// "" when the device is usable, else why not. The caller has made `device` current.
std::string probe(int device) {
    unsigned* d = nullptr;
    cudaError_t e = cudaMalloc(&d, sizeof(unsigned));
    if (e != cudaSuccess) {
        cudaGetLastError();
        return "cannot allocate device memory: " + describe(e);
    }
    probe_kernel<<<1, 1>>>(d);
    e = cudaGetLastError();
    unsigned h = 0;
    if (e == cudaSuccess) e = cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaFree(d);
    cudaGetLastError();
    if (e != cudaSuccess) return "cannot run this build's code: " + describe(e);
    if (h != kProbeValue) return "a test kernel wrote a wrong value";
    return "";
}

}  // namespace

bool compiled() { return true; }

Status status() {
    Status st;
    st.compiled = true;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice) {
        cudaGetLastError();
        st.reason = e == cudaErrorNoDevice
            ? "no CUDA device found (" + describe(e) + ")"
            : "no usable NVIDIA driver: none is installed or it is older than this build's CUDA "
              "runtime (" + describe(e) + ")";
        return st;
    }
    check(e, "cudaGetDeviceCount");
    std::string why;
    for (int i = 0; i < n; ++i) {
        DeviceInfo info;
        info.index = i;
        cudaDeviceProp prop;
        check(cudaGetDeviceProperties(&prop, i), "cudaGetDeviceProperties");
        info.name = prop.name;
        info.cc_major = prop.major;
        info.cc_minor = prop.minor;
        std::string bad;
        if (info.cc_major * 10 + info.cc_minor < kMinComputeCapability) {
            bad = strfmt("compute capability %d.%d is older than %d.%d, the oldest this build supports",
                         info.cc_major, info.cc_minor, kMinComputeCapability / 10,
                         kMinComputeCapability % 10);
        } else {
            // Free memory needs a context: this creates the device's primary context, which the
            // model would create anyway to use the device.
            DeviceScope scope(i);
            e = cudaMemGetInfo(&info.free_memory, &info.total_memory);
            if (e != cudaSuccess) {
                cudaGetLastError();
                bad = "cannot query its memory: " + describe(e);
            } else {
                bad = probe(i);
            }
        }
        if (bad.empty()) {
            st.devices.push_back(std::move(info));
        } else {
            why += strfmt("%sGPU %d (%s) is not usable: %s", why.empty() ? "" : "; ", i,
                          info.name.c_str(), bad.c_str());
        }
    }
    st.reason = why;
    return st;
}

DeviceBuffer::DeviceBuffer(int device, size_t bytes) : bytes_(bytes), device_(device) {
    if (bytes == 0) return;
    DeviceScope scope(device);
    check(cudaMalloc(&ptr_, bytes), strfmt("cudaMalloc of %zu bytes on GPU %d", bytes, device).c_str());
}

DeviceBuffer::~DeviceBuffer() { release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(o.ptr_), bytes_(o.bytes_), device_(o.device_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
    o.device_ = -1;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
        release();
        ptr_ = o.ptr_; bytes_ = o.bytes_; device_ = o.device_;
        o.ptr_ = nullptr; o.bytes_ = 0; o.device_ = -1;
    }
    return *this;
}

void DeviceBuffer::release() noexcept {
    if (ptr_) {
        int prev = 0;
        if (cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess) {
            cudaFree(ptr_);
            cudaSetDevice(prev);
        }
        cudaGetLastError();
    }
    ptr_ = nullptr;
    bytes_ = 0;
}

static void check_range(size_t offset, size_t bytes, size_t size) {
    if (offset > size || bytes > size - offset)
        throw CudaError(strfmt("device copy of %zu bytes at offset %zu outside a buffer of %zu bytes",
                               bytes, offset, size));
}

void DeviceBuffer::upload(const void* src, size_t bytes, size_t offset) {
    check_range(offset, bytes, bytes_);
    if (bytes == 0) return;
    DeviceScope scope(device_);
    check(cudaMemcpy(static_cast<char*>(ptr_) + offset, src, bytes, cudaMemcpyHostToDevice),
          "cudaMemcpy to the device");
}

void DeviceBuffer::download(void* dst, size_t bytes, size_t offset) const {
    check_range(offset, bytes, bytes_);
    if (bytes == 0) return;
    DeviceScope scope(device_);
    check(cudaMemcpy(dst, static_cast<const char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost),
          "cudaMemcpy from the device");
}

ScopedDevice::ScopedDevice(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    check(cudaSetDevice(device), strfmt("cudaSetDevice(%d)", device).c_str());
}

ScopedDevice::~ScopedDevice() {
    if (prev_ >= 0) cudaSetDevice(prev_);
}

CudaStream::CudaStream(int device) : device_(device) {
    DeviceScope scope(device);
    // Host waits block in the driver rather than spin (the events below ask for it too, whatever
    // these flags; an already active context may keep its old ones, which is then not an error).
    if (cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync) != cudaSuccess) cudaGetLastError();
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    s_ = s;
}

CudaStream::~CudaStream() {
    if (!s_) return;
    int prev = 0;
    if (cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess) {
        cudaStreamDestroy(static_cast<cudaStream_t>(s_));
        cudaSetDevice(prev);
    }
    cudaGetLastError();
}

void CudaStream::synchronize() {
    check(cudaStreamSynchronize(static_cast<cudaStream_t>(s_)), "cudaStreamSynchronize");
}

CudaEvent::CudaEvent(int device) : device_(device) {
    DeviceScope scope(device);
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, cudaEventBlockingSync), "cudaEventCreateWithFlags");
    e_ = e;
}

CudaEvent::~CudaEvent() {
    if (!e_) return;
    int prev = 0;
    if (cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess) {
        cudaEventDestroy(static_cast<cudaEvent_t>(e_));
        cudaSetDevice(prev);
    }
    cudaGetLastError();
}

void CudaEvent::record(CudaStream& s) {
    check(cudaEventRecord(static_cast<cudaEvent_t>(e_), static_cast<cudaStream_t>(s.handle())), "cudaEventRecord");
}

void CudaEvent::wait() { check(cudaEventSynchronize(static_cast<cudaEvent_t>(e_)), "cudaEventSynchronize"); }

bool CudaEvent::done() const {
    const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(e_));
    if (e == cudaErrorNotReady) return false;
    check(e, "cudaEventQuery");
    return true;
}

double CudaEvent::seconds_since(const CudaEvent& start) const {
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.e_), static_cast<cudaEvent_t>(e_)),
          "cudaEventElapsedTime");
    return double(ms) * 1e-3;
}

CudaGraph::~CudaGraph() { reset(); }

void CudaGraph::reset() noexcept {
    if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    if (graph_) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
    cudaGetLastError();
    exec_ = graph_ = nullptr;
}

void CudaGraph::begin_capture(CudaStream& s) {
    reset();
    // thread-local: CUDA calls of other threads (none here) do not join or break the capture
    check(cudaStreamBeginCapture(static_cast<cudaStream_t>(s.handle()), cudaStreamCaptureModeThreadLocal),
          "cudaStreamBeginCapture");
}

void CudaGraph::end_capture(CudaStream& s) {
    cudaGraph_t g = nullptr;
    check(cudaStreamEndCapture(static_cast<cudaStream_t>(s.handle()), &g), "cudaStreamEndCapture");
    graph_ = g;
    cudaGraphExec_t e = nullptr;
    check(cudaGraphInstantiate(&e, g, 0), "cudaGraphInstantiate");
    exec_ = e;
}

void CudaGraph::abort_capture(CudaStream& s) noexcept {
    cudaGraph_t g = nullptr;
    if (cudaStreamEndCapture(static_cast<cudaStream_t>(s.handle()), &g) == cudaSuccess && g) cudaGraphDestroy(g);
    cudaGetLastError();
    reset();
}

void CudaGraph::launch(CudaStream& s) {
    check(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), static_cast<cudaStream_t>(s.handle())),
          "cudaGraphLaunch");
}

PinnedBuffer::PinnedBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    check(cudaHostAlloc(&ptr_, bytes, cudaHostAllocPortable),
          strfmt("cudaHostAlloc of %zu bytes of pinned host memory", bytes).c_str());
}

PinnedBuffer::~PinnedBuffer() { release(); }

PinnedBuffer::PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
        release();
        ptr_ = o.ptr_; bytes_ = o.bytes_;
        o.ptr_ = nullptr; o.bytes_ = 0;
    }
    return *this;
}

void PinnedBuffer::release() noexcept {
    if (ptr_) {
        cudaFreeHost(ptr_);
        cudaGetLastError();
    }
    ptr_ = nullptr;
    bytes_ = 0;
}

static void copy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, CudaStream& s,
                       const char* what) {
    if (bytes == 0) return;
    check(cudaMemcpyAsync(dst, src, bytes, kind, static_cast<cudaStream_t>(s.handle())), what);
}

void copy_to_device(void* dst, const void* src, size_t bytes, CudaStream& s) {
    copy_async(dst, src, bytes, cudaMemcpyHostToDevice, s, "cudaMemcpyAsync to the device");
}

void copy_to_host(void* dst, const void* src, size_t bytes, CudaStream& s) {
    copy_async(dst, src, bytes, cudaMemcpyDeviceToHost, s, "cudaMemcpyAsync from the device");
}

void copy_on_device(void* dst, const void* src, size_t bytes, CudaStream& s) {
    copy_async(dst, src, bytes, cudaMemcpyDeviceToDevice, s, "cudaMemcpyAsync on the device");
}

void fill_zero(void* dst, size_t bytes, CudaStream& s) {
    if (bytes == 0) return;
    check(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(s.handle())), "cudaMemsetAsync");
}

}  // namespace ps::cuda

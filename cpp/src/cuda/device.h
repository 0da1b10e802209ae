// The GPU side as the rest of the runtime sees it: plain C++, no CUDA types, so the core and the
// Python module compile and link the same way whether or not CUDA was compiled. With CUDA the
// functions live in device.cu; without it in device_none.cpp, which reports "built without CUDA".
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ps::cuda {

// A CUDA call failed in a way that is not "there is no GPU" (a broken driver, out of device
// memory, a build without CUDA asked for device memory). Not a ps::Error: the arguments were fine,
// so Python sees a RuntimeError rather than a ValueError.
struct CudaError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The oldest compute capability this build carries machine code for (CUDA 13 has nothing older).
constexpr int kMinComputeCapability = 75;

struct DeviceInfo {
    int index = 0;           // the CUDA device ordinal ("cuda:N")
    std::string name;
    int cc_major = 0, cc_minor = 0;
    size_t total_memory = 0, free_memory = 0;  // bytes; free as the driver reports it now
};

struct Status {
    bool compiled = false;            // this build has the CUDA backend
    std::vector<DeviceInfo> devices;  // the usable GPUs (may be empty)
    std::string reason;               // why a GPU is missing or unusable; empty when all are usable
};

// Enumerates the GPUs. "No driver" (cudaErrorInsufficientDriver, 35) and "no device"
// (cudaErrorNoDevice, 100) are not errors: they give an empty list and say so in `reason`, as do
// devices older than kMinComputeCapability or that cannot run this build's code. Any other CUDA
// error of the enumeration itself throws CudaError naming the call and the error.
Status status();

bool compiled();

// Device memory owned by one object; copies are synchronous. Throws CudaError (with the CUDA
// error's name) on failure, and always in a build without CUDA.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(int device, size_t bytes);
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& o) noexcept;
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    void upload(const void* src, size_t bytes, size_t offset = 0);
    void download(void* dst, size_t bytes, size_t offset = 0) const;

    void* data() const { return ptr_; }
    size_t size() const { return bytes_; }
    int device() const { return device_; }

private:
    void release() noexcept;
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
    int device_ = -1;
};

// Makes `device` the calling thread's current device for the scope and restores the previous
// one after, so that kernel launches and copies of a model on GPU N go to N whichever thread runs
// them. Throws CudaError (always in a build without CUDA).
class ScopedDevice {
public:
    explicit ScopedDevice(int device);
    ~ScopedDevice();
    ScopedDevice(const ScopedDevice&) = delete;
    ScopedDevice& operator=(const ScopedDevice&) = delete;

private:
    int prev_ = -1;
};

// A CUDA stream of one device (non-blocking: it does not wait for the legacy default stream).
// handle() is the cudaStream_t as a void*, what cuda/kernels.h takes.
class CudaStream {
public:
    explicit CudaStream(int device);
    ~CudaStream();
    CudaStream(const CudaStream&) = delete;
    CudaStream& operator=(const CudaStream&) = delete;

    void* handle() const { return s_; }
    int device() const { return device_; }
    void synchronize();  // blocks (no spin: the events' and the device's blocking-sync flags)

private:
    void* s_ = nullptr;
    int device_ = -1;
};

// A point in a stream's work. The host waits for it with wait(), which blocks the thread in the
// driver (cudaEventBlockingSync) instead of spinning a core, so the CPU's own threads keep every
// core while the GPU works. seconds_since(start) is the GPU time between two recorded events,
// after both completed.
class CudaEvent {
public:
    explicit CudaEvent(int device);
    ~CudaEvent();
    CudaEvent(const CudaEvent&) = delete;
    CudaEvent& operator=(const CudaEvent&) = delete;

    void record(CudaStream& s);
    void wait();            // the host waits until the work recorded before it has run
    bool done() const;      // without waiting
    double seconds_since(const CudaEvent& start) const;

private:
    void* e_ = nullptr;
    int device_ = -1;
};

// Page-locked host memory: what asynchronous copies need to be asynchronous (from pageable memory
// cudaMemcpyAsync stages through a driver buffer and blocks the caller).
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(size_t bytes);
    ~PinnedBuffer();
    PinnedBuffer(PinnedBuffer&& o) noexcept;
    PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;

    void* data() const { return ptr_; }
    size_t size() const { return bytes_; }

private:
    void release() noexcept;
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

// A recorded sequence of one stream's work (a CUDA graph), replayed with one launch: a decode step's
// hundreds of small kernels then cost one launch on the host. Work queued on the stream between
// begin_capture and end_capture is recorded, not run; the stream must not be waited on meanwhile.
class CudaGraph {
public:
    CudaGraph() = default;
    ~CudaGraph();
    CudaGraph(const CudaGraph&) = delete;
    CudaGraph& operator=(const CudaGraph&) = delete;

    void begin_capture(CudaStream& s);
    void end_capture(CudaStream& s);           // instantiates what was recorded
    void abort_capture(CudaStream& s) noexcept;  // after a failure while recording: discards it
    void launch(CudaStream& s);
    bool ready() const { return exec_ != nullptr; }
    void reset() noexcept;

private:
    void* graph_ = nullptr;
    void* exec_ = nullptr;
};

// Asynchronous copies on a stream (device pointers from DeviceBuffer::data(), host pointers into a
// PinnedBuffer for the copy to overlap). The caller keeps both sides alive until the stream passes.
void copy_to_device(void* dst, const void* src, size_t bytes, CudaStream& s);
void copy_to_host(void* dst, const void* src, size_t bytes, CudaStream& s);
void copy_on_device(void* dst, const void* src, size_t bytes, CudaStream& s);
void fill_zero(void* dst, size_t bytes, CudaStream& s);  // device memory

}  // namespace ps::cuda

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

}  // namespace ps::cuda

// The CUDA interface in a build without CUDA (PROSPARSE_CUDA=OFF, or AUTO with no CUDA compiler):
// no devices, and a reason that says so, so device="cuda" can name it.
#include "cuda/device.h"

namespace ps::cuda {

// CMakeLists.txt defines PROSPARSE_CUDA_OFF when the build was asked for no CUDA, as against AUTO
// finding no compiler: the tests tell a deliberate CPU-only build from CI losing its nvcc.
#ifdef PROSPARSE_CUDA_OFF
static const char* kNoCuda = "built without CUDA (PROSPARSE_CUDA=OFF)";
#else
static const char* kNoCuda =
    "built without CUDA (no CUDA compiler was found at build time); rebuild with nvcc on the PATH "
    "or CUDACXX set, or -Ccmake.define.PROSPARSE_CUDA=ON to make that an error";
#endif

bool compiled() { return false; }

Status status() {
    Status st;
    st.reason = kNoCuda;
    return st;
}

DeviceBuffer::DeviceBuffer(int, size_t) { throw CudaError(kNoCuda); }
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer::DeviceBuffer(DeviceBuffer&&) noexcept = default;
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&&) noexcept = default;
void DeviceBuffer::release() noexcept {}
void DeviceBuffer::upload(const void*, size_t, size_t) { throw CudaError(kNoCuda); }
void DeviceBuffer::download(void*, size_t, size_t) const { throw CudaError(kNoCuda); }

}  // namespace ps::cuda

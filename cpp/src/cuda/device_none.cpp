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

ScopedDevice::ScopedDevice(int) { throw CudaError(kNoCuda); }
ScopedDevice::~ScopedDevice() = default;
CudaStream::CudaStream(int) { throw CudaError(kNoCuda); }
CudaStream::~CudaStream() = default;
void CudaStream::synchronize() { throw CudaError(kNoCuda); }
CudaEvent::CudaEvent(int) { throw CudaError(kNoCuda); }
CudaEvent::~CudaEvent() = default;
void CudaEvent::record(CudaStream&) { throw CudaError(kNoCuda); }
void CudaEvent::wait() { throw CudaError(kNoCuda); }
bool CudaEvent::done() const { throw CudaError(kNoCuda); }
double CudaEvent::seconds_since(const CudaEvent&) const { throw CudaError(kNoCuda); }
CudaGraph::~CudaGraph() = default;
void CudaGraph::reset() noexcept {}
void CudaGraph::begin_capture(CudaStream&) { throw CudaError(kNoCuda); }
void CudaGraph::end_capture(CudaStream&) { throw CudaError(kNoCuda); }
void CudaGraph::abort_capture(CudaStream&) noexcept {}
void CudaGraph::launch(CudaStream&) { throw CudaError(kNoCuda); }
PinnedBuffer::PinnedBuffer(size_t) { throw CudaError(kNoCuda); }
PinnedBuffer::~PinnedBuffer() = default;
PinnedBuffer::PinnedBuffer(PinnedBuffer&&) noexcept = default;
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&&) noexcept = default;
void PinnedBuffer::release() noexcept {}
void copy_to_device(void*, const void*, size_t, CudaStream&) { throw CudaError(kNoCuda); }
void copy_to_host(void*, const void*, size_t, CudaStream&) { throw CudaError(kNoCuda); }
void copy_on_device(void*, const void*, size_t, CudaStream&) { throw CudaError(kNoCuda); }
void fill_zero(void*, size_t, CudaStream&) { throw CudaError(kNoCuda); }

}  // namespace ps::cuda

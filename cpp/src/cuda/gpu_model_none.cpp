// GpuModel in a build without CUDA: never constructed (cuda::status() lists no GPU there), but
// defined so that the model links the same way in either build.
#include "cuda/device.h"
#include "cuda/gpu_model.h"

namespace ps {

struct GpuModel::Impl {};

GpuModel::GpuModel(const GpuModelConfig&) { throw cuda::CudaError("built without CUDA: no GPU model"); }
GpuModel::~GpuModel() = default;
bool GpuModel::resident() const { return false; }
bool GpuModel::attention_on_gpu(int) const { return false; }
void GpuModel::forward_layers(const TokenBatch&, float*, FfnLayerStats*) {}
int64_t GpuModel::n_hot(int) const { return 0; }
bool GpuModel::output_on_gpu() const { return false; }
void GpuModel::begin_batch(const TokenBatch&, const float*) {}
void GpuModel::attention(int, const TokenBatch&, const float*, float*) {}
void GpuModel::output(const float*, int, float*) {}
FfnExecutor& GpuModel::ffn() { throw cuda::CudaError("built without CUDA: no GPU model"); }
const GpuStats& GpuModel::stats() const {
    static const GpuStats none;
    return none;
}

}  // namespace ps

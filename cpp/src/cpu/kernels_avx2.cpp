// STUB (helper: kernels)
#include "cpu/kernels.h"
namespace ps::cpu {
const KernelSet kAvx2Kernels = kScalarKernels;
}

// STUB (helper: kernels)
#include "cpu/kernels.h"
namespace ps::cpu {
const KernelSet kAvx512Kernels = kScalarKernels;
}

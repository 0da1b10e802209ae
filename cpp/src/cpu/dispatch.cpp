// STUB (helper: kernels)
#include "cpu/kernels.h"
#include <cstring>
namespace ps::cpu {
const KernelSet& kernels() { return kScalarKernels; }
const KernelSet* kernels_for(const char* isa) { return std::strcmp(isa, "scalar") == 0 ? &kScalarKernels : nullptr; }
}

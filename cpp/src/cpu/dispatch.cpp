// The single point that chooses a kernel set: the best one this CPU runs, once, unless
// PROSPARSE_ISA names one (scalar | avx2 | avx512) for testing and benchmarking.
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "cpu/kernels.h"

namespace ps::cpu {

namespace {

bool cpu_has(const char* isa) {
    if (std::strcmp(isa, "scalar") == 0) return true;
#if defined(PROSPARSE_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    // Every flag the file is compiled with (CMakeLists.txt) must be here: the compiler may use
    // any of them anywhere in that file.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    if (std::strcmp(isa, "avx2") == 0) return avx2;
    if (std::strcmp(isa, "avx512") == 0)
        return avx2 && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#endif
    return false;
}

const KernelSet* choose() {
    if (const char* forced = std::getenv("PROSPARSE_ISA"); forced && *forced) {
        if (const KernelSet* ks = kernels_for(forced)) return ks;
        fail(strfmt("PROSPARSE_ISA=%s: not one of scalar, avx2, avx512 that this CPU supports", forced));
    }
    for (const char* isa : {"avx512", "avx2"})
        if (const KernelSet* ks = kernels_for(isa)) return ks;
    return &scalar_kernels();
}

}  // namespace

const KernelSet* kernels_for(const char* isa) {
    if (!isa || !cpu_has(isa)) return nullptr;
    if (std::strcmp(isa, "scalar") == 0) return &scalar_kernels();
#if defined(PROSPARSE_X86)
    if (std::strcmp(isa, "avx2") == 0) return &avx2_kernels();
    if (std::strcmp(isa, "avx512") == 0) return &avx512_kernels();
#endif
    return nullptr;
}

size_t act_row_bytes(GgmlType w, int64_t k) {
    if (!has_kernels(w)) return 0;
    switch (traits(w).act) {
        case Act::F32: return size_t(k) * sizeof(float);
        case Act::Q8S: return size_t(k / QK) * kQ8ActBlockBytes;
        case Act::Q8_1: return size_t(k / QK) * sizeof(block_q8_1);
        case Act::Q8K: return size_t(k / QK_K) * sizeof(block_q8_K);
    }
    return 0;
}

void KernelSet::no_kernel(GgmlType w) { fail(strfmt("no kernel for weight type %s", type_name(w))); }

const KernelSet& kernels() {
    static const KernelSet* chosen = choose();  // thread-safe one-time initialisation
    return *chosen;
}

}  // namespace ps::cpu

// STUB (me)
#include "arch.h"
namespace ps {
const char* arch_name(Arch a) { return a == Arch::LLAMA ? "llama" : "minicpm"; }
bool arch_from_name(const std::string&, Arch*) { return false; }
const char* activation_name(Activation) { return "silu"; }
bool activation_from_name(const std::string&, Activation*) { return false; }
std::string key(Arch, Key) { return ""; }
std::string tensor_name(TensorName, int) { return ""; }
}

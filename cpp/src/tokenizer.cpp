// STUB (helper: tokenizer)
#include "tokenizer.h"
#include "common.h"
namespace ps {
std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GGUFFile&) { fail("tokenizer not implemented"); }
bool Tokenizer::is_eog(int32_t) const { return false; }
}

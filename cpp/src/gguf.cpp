// STUB (helper: gguf loader)
#include "gguf.h"
#include "common.h"
namespace ps {
const char* gguf_type_name(GGUFType) { return "?"; }
GGUFFile::GGUFFile(const std::string& path) : path_(path) { fail("GGUF loader not implemented"); }
GGUFFile::~GGUFFile() {}
const GGUFValue* GGUFFile::find(std::string_view) const { return nullptr; }
std::string GGUFFile::get_str(std::string_view) const { fail("ni"); }
std::optional<std::string> GGUFFile::get_str_opt(std::string_view) const { return std::nullopt; }
int64_t GGUFFile::get_int(std::string_view) const { fail("ni"); }
int64_t GGUFFile::get_int(std::string_view, int64_t d) const { return d; }
double GGUFFile::get_float(std::string_view) const { fail("ni"); }
double GGUFFile::get_float(std::string_view, double d) const { return d; }
bool GGUFFile::get_bool(std::string_view, bool d) const { return d; }
std::vector<std::string_view> GGUFFile::get_str_array(std::string_view) const { return {}; }
std::vector<float> GGUFFile::get_float_array(std::string_view) const { return {}; }
std::vector<int64_t> GGUFFile::get_int_array(std::string_view) const { return {}; }
const Tensor* GGUFFile::tensor(std::string_view) const { return nullptr; }
}

// GGUF reader: memory-mapped, zero-copy, and validated before anything is used.
// Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (v2 and v3; PowerInfer's
// files are identical but for the magic "PWRI").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tensor.h"

namespace ps {

enum class GGUFType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GGUFType t);

// One metadata value. Scalars are decoded; strings and arrays point into the mapping.
struct GGUFValue {
    GGUFType type = GGUFType::UINT8;
    // scalar payload (integers widened, floats as double, bool as 0/1)
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0.0;
    std::string_view str;  // STRING
    // ARRAY
    GGUFType arr_type = GGUFType::UINT8;
    uint64_t arr_n = 0;
    const uint8_t* arr_data = nullptr;          // numeric arrays: packed little-endian elements
    std::vector<std::string_view> arr_strings;  // string arrays
};

class GGUFFile {
public:
    // Maps and validates the whole file; throws ps::Error naming the path and the problem.
    explicit GGUFFile(const std::string& path);
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    bool is_powerinfer() const { return powerinfer_; }  // magic "PWRI"
    size_t file_size() const { return size_; }

    // Metadata, in file order.
    const std::vector<std::pair<std::string, GGUFValue>>& metadata() const { return kv_; }
    const GGUFValue* find(std::string_view key) const;

    // Typed getters. The plain ones throw if the key is missing; all throw if the stored type
    // cannot represent the request (e.g. a string where a number is wanted), naming the key.
    // get_str/get_str_opt also refuse a string that is not UTF-8; string arrays stay raw bytes.
    std::string get_str(std::string_view key) const;
    std::optional<std::string> get_str_opt(std::string_view key) const;
    int64_t get_int(std::string_view key) const;  // any integer type
    int64_t get_int(std::string_view key, int64_t def) const;
    double get_float(std::string_view key) const;  // any float or integer type
    double get_float(std::string_view key, double def) const;
    bool get_bool(std::string_view key, bool def) const;
    std::vector<std::string_view> get_str_array(std::string_view key) const;  // empty if absent
    std::vector<float> get_float_array(std::string_view key) const;           // empty if absent
    std::vector<int64_t> get_int_array(std::string_view key) const;           // empty if absent

    // Tensors, in file order. Data pointers are valid while this object lives.
    const std::vector<Tensor>& tensors() const { return tensors_; }
    const Tensor* tensor(std::string_view name) const;  // nullptr if absent

private:
    std::string path_;
    uint8_t* base_ = nullptr;
    size_t size_ = 0;
    uint32_t version_ = 0;
    bool powerinfer_ = false;
    std::vector<std::pair<std::string, GGUFValue>> kv_;
    std::unordered_map<std::string, size_t> kv_index_;
    std::vector<Tensor> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace ps

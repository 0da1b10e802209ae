// GGUF reader. The file is mapped read-only and parsed through a bounds-checked cursor: every
// count, length and offset read from the file is checked against the bytes that remain before it
// is used, so a corrupt or hostile file produces a ps::Error, never a huge allocation, an
// out-of-bounds read or a crash.
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

#include "common.h"

namespace ps {

namespace {

constexpr uint32_t kMagicGGUF = 0x46554747;  // "GGUF" read little-endian
constexpr uint32_t kMagicPWRI = 0x49525750;  // "PWRI": PowerInfer's files, same layout
constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxDims = 4;

// The smallest encoding of one metadata pair (8-byte key length, empty key, 4-byte type, a
// 1-byte value) and of one tensor info (empty name, n_dims, one dimension, type, offset). A count
// larger than the remaining bytes allow is corrupt, whatever it says.
constexpr uint64_t kMinKVBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;

size_t value_size(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::BOOL: return 1;
        case GGUFType::UINT16: case GGUFType::INT16: return 2;
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::FLOAT32: return 4;
        case GGUFType::UINT64: case GGUFType::INT64: case GGUFType::FLOAT64: return 8;
        default: return 0;  // STRING, ARRAY: variable
    }
}

bool is_known_type(uint32_t t) { return t <= uint32_t(GGUFType::FLOAT64); }
bool is_int_type(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::UINT16: case GGUFType::INT16:
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::UINT64: case GGUFType::INT64:
            return true;
        default: return false;
    }
}
bool is_unsigned(GGUFType t) {
    return t == GGUFType::UINT8 || t == GGUFType::UINT16 || t == GGUFType::UINT32 ||
           t == GGUFType::UINT64;
}
bool is_float_type(GGUFType t) { return t == GGUFType::FLOAT32 || t == GGUFType::FLOAT64; }

// Decodes one little-endian scalar of type t at p into v's payload fields.
void decode_scalar(GGUFType t, const uint8_t* p, GGUFValue& v) {
    switch (t) {
        case GGUFType::UINT8: v.u = p[0]; break;
        case GGUFType::INT8: v.i = int8_t(p[0]); break;
        case GGUFType::BOOL: v.u = p[0] != 0; break;
        case GGUFType::UINT16: { uint16_t x; std::memcpy(&x, p, 2); v.u = x; break; }
        case GGUFType::INT16: { int16_t x; std::memcpy(&x, p, 2); v.i = x; break; }
        case GGUFType::UINT32: { uint32_t x; std::memcpy(&x, p, 4); v.u = x; break; }
        case GGUFType::INT32: { int32_t x; std::memcpy(&x, p, 4); v.i = x; break; }
        case GGUFType::UINT64: std::memcpy(&v.u, p, 8); break;
        case GGUFType::INT64: std::memcpy(&v.i, p, 8); break;
        case GGUFType::FLOAT32: { float x; std::memcpy(&x, p, 4); v.f = x; break; }
        case GGUFType::FLOAT64: std::memcpy(&v.f, p, 8); break;
        default: break;
    }
    // Keep the other views consistent where they are exact, so a reader may use any of them.
    if (is_unsigned(t) || t == GGUFType::BOOL) {
        v.i = v.u <= uint64_t(std::numeric_limits<int64_t>::max()) ? int64_t(v.u) : 0;
        v.f = double(v.u);
    } else if (is_int_type(t)) {
        v.u = v.i >= 0 ? uint64_t(v.i) : 0;
        v.f = double(v.i);
    }
}

// A cursor over the mapping that refuses to move past its end.
class Reader {
public:
    Reader(const uint8_t* base, size_t size, const std::string& path)
        : base_(base), size_(size), path_(path) {}

    size_t pos() const { return pos_; }
    size_t remaining() const { return size_ - pos_; }

    [[noreturn]] void bad(const std::string& what) const {
        fail(strfmt("%s: %s (at byte %zu of %zu)", path_.c_str(), what.c_str(), pos_, size_));
    }

    const uint8_t* take(uint64_t n, const char* what) {
        if (n > remaining())
            bad(strfmt("file is truncated: %s needs %llu bytes, %zu remain", what,
                       (unsigned long long)n, remaining()));
        const uint8_t* p = base_ + pos_;
        pos_ += size_t(n);
        return p;
    }
    template <class T>
    T read(const char* what) {
        T v;
        std::memcpy(&v, take(sizeof(T), what), sizeof(T));
        return v;
    }
    std::string_view read_string(const char* what) {
        const uint64_t n = read<uint64_t>(what);
        const uint8_t* p = take(n, what);
        return std::string_view(reinterpret_cast<const char*>(p), size_t(n));
    }

private:
    const uint8_t* base_;
    size_t size_;
    size_t pos_ = 0;
    const std::string& path_;
};

// Reads one metadata value of type t (already known to be a valid type id).
void read_value(Reader& r, GGUFType t, GGUFValue& v, const std::string& key) {
    v.type = t;
    if (t == GGUFType::STRING) {
        v.str = r.read_string(strfmt("the string value of '%s'", key.c_str()).c_str());
        return;
    }
    if (t != GGUFType::ARRAY) {
        decode_scalar(t, r.take(value_size(t), strfmt("the value of '%s'", key.c_str()).c_str()), v);
        return;
    }
    const uint32_t et = r.read<uint32_t>("an array element type");
    if (!is_known_type(et))
        r.bad(strfmt("key '%s' is an array of unknown value type %u", key.c_str(), et));
    v.arr_type = GGUFType(et);
    if (v.arr_type == GGUFType::ARRAY)
        r.bad(strfmt("key '%s' is an array of arrays, which GGUF readers do not support", key.c_str()));
    const uint64_t n = r.read<uint64_t>("an array length");
    v.arr_n = n;
    if (v.arr_type == GGUFType::STRING) {
        // Each string takes at least its 8-byte length: bound the count before reserving.
        if (n > r.remaining() / 8)
            r.bad(strfmt("key '%s' claims %llu strings, more than the file can hold "
                         "(truncated or corrupt)", key.c_str(), (unsigned long long)n));
        v.arr_strings.reserve(size_t(n));
        const std::string what = strfmt("a string in array '%s'", key.c_str());
        for (uint64_t i = 0; i < n; ++i) v.arr_strings.push_back(r.read_string(what.c_str()));
        return;
    }
    const size_t es = value_size(v.arr_type);
    if (n > r.remaining() / es)
        r.bad(strfmt("key '%s' claims %llu elements of %s, more than the file can hold "
                     "(truncated or corrupt)", key.c_str(), (unsigned long long)n,
                     gguf_type_name(v.arr_type)));
    v.arr_data = r.take(n * es, "array data");
}

// Keys and tensor names are identifiers (the spec says ASCII for keys): anything that is not
// UTF-8 is corruption, and refusing it here keeps every consumer (Python str, log lines) safe.
// String values are left as bytes until used (real vocabularies occasionally hold invalid
// sequences); get_str checks those read as text.
bool valid_utf8(std::string_view s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const size_t n = s.size();
    size_t i = 0;
    while (i < n) {
        const unsigned c = p[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) { ++i; continue; }
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
        else return false;
        if (n - i < len) return false;
        for (size_t k = 1; k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        // overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return false;
        i += len;
    }
    return true;
}

// a * b into *out; false if the product does not fit in int64_t.
bool mul_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

const char* gguf_type_name(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: return "uint8";
        case GGUFType::INT8: return "int8";
        case GGUFType::UINT16: return "uint16";
        case GGUFType::INT16: return "int16";
        case GGUFType::UINT32: return "uint32";
        case GGUFType::INT32: return "int32";
        case GGUFType::FLOAT32: return "float32";
        case GGUFType::BOOL: return "bool";
        case GGUFType::STRING: return "string";
        case GGUFType::ARRAY: return "array";
        case GGUFType::UINT64: return "uint64";
        case GGUFType::INT64: return "int64";
        case GGUFType::FLOAT64: return "float64";
    }
    return "unknown";
}

namespace {

// Opens and maps path read-only; the mapping keeps the file alive, so the descriptor is closed.
void map_file(const char* path, uint8_t** base, size_t* size) {
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        if (err == ENOENT) fail(strfmt("%s: file does not exist", path));
        fail(strfmt("%s: cannot open: %s", path, std::strerror(err)));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        fail(strfmt("%s: cannot stat: %s", path, std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(strfmt("%s: not a regular file%s", path, S_ISDIR(st.st_mode) ? " (it is a directory)" : ""));
    }
    if (st.st_size == 0) {
        ::close(fd);
        fail(strfmt("%s: file is empty, not a GGUF file", path));
    }
    const size_t n = size_t(st.st_size);
    void* m = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_err = errno;
    ::close(fd);
    if (m == MAP_FAILED) fail(strfmt("%s: cannot map file: %s", path, std::strerror(map_err)));
    *base = static_cast<uint8_t*>(m);
    *size = n;
}

struct Counts {
    uint64_t n_tensors, n_kv;
};

// Magic, version and the two counts, each count bounded by what the remaining bytes can hold.
Counts read_header(Reader& r, const char* path, bool* powerinfer, uint32_t* version) {
    if (r.remaining() < 4) r.bad("file is too small to be a GGUF file");
    const uint8_t* head = r.take(0, "the magic");
    const uint32_t magic = r.read<uint32_t>("the magic");
    if (magic == kMagicPWRI) *powerinfer = true;
    else if (magic != kMagicGGUF)
        fail(strfmt("%s: not a GGUF file (starts with bytes %02x %02x %02x %02x, expected \"GGUF\")",
                    path, head[0], head[1], head[2], head[3]));

    const uint32_t v = r.read<uint32_t>("the version");
    if (v != 2 && v != 3) {
        if (v == 1) fail(strfmt("%s: GGUF version 1 is not supported (only 2 and 3)", path));
        // A big-endian file (allowed from v3) has its version bytes reversed.
        if (v == 0x02000000u || v == 0x03000000u)
            fail(strfmt("%s: big-endian GGUF files are not supported", path));
        fail(strfmt("%s: unsupported GGUF version %u (only 2 and 3)", path, v));
    }
    *version = v;

    Counts c;
    c.n_tensors = r.read<uint64_t>("the tensor count");
    c.n_kv = r.read<uint64_t>("the metadata count");
    if (c.n_kv > r.remaining() / kMinKVBytes)
        r.bad(strfmt("metadata count %llu is more than the file can hold (truncated or corrupt)",
                     (unsigned long long)c.n_kv));
    if (c.n_tensors > r.remaining() / kMinTensorInfoBytes)
        r.bad(strfmt("tensor count %llu is more than the file can hold (truncated or corrupt)",
                     (unsigned long long)c.n_tensors));
    return c;
}

// One metadata pair: a UTF-8 key not seen before, a known value type, the value.
std::pair<std::string, GGUFValue> read_kv(Reader& r, uint64_t k,
                                          const std::unordered_map<std::string, size_t>& seen) {
    const std::string_view key = r.read_string("a metadata key");
    if (!valid_utf8(key)) r.bad(strfmt("metadata key %llu is not valid UTF-8", (unsigned long long)k));
    std::string skey(key);
    if (seen.count(skey)) r.bad(strfmt("duplicate metadata key '%s'", skey.c_str()));
    const uint32_t t = r.read<uint32_t>("a metadata value type");
    if (!is_known_type(t)) r.bad(strfmt("key '%s' has unknown value type %u", skey.c_str(), t));
    GGUFValue v;
    read_value(r, GGUFType(t), v, skey);
    return {std::move(skey), std::move(v)};
}

// general.alignment, when present, must be a positive power of two.
uint64_t alignment_of(const GGUFValue* a, const char* path) {
    if (!a) return kDefaultAlignment;
    if (!is_int_type(a->type))
        fail(strfmt("%s: general.alignment has type %s, expected an integer", path, gguf_type_name(a->type)));
    const uint64_t al = is_unsigned(a->type) ? a->u : (a->i > 0 ? uint64_t(a->i) : 0);
    if (al == 0 || (al & (al - 1)) != 0)
        fail(strfmt("%s: general.alignment is %s, not a positive power of two", path,
                    is_unsigned(a->type) ? std::to_string(a->u).c_str() : std::to_string(a->i).c_str()));
    return al;
}

// One tensor info: UTF-8 name not seen before, 1 to 4 dimensions whose product fits int64_t, a
// supported type whose blocks tile the rows, and an aligned data offset (returned in *offset;
// checked against the data section by place_tensor_data).
Tensor read_tensor_info(Reader& r, uint64_t ti, uint64_t alignment, const char* path,
                        const std::unordered_map<std::string, size_t>& seen, uint64_t* offset) {
    Tensor t;
    t.name = std::string(r.read_string("a tensor name"));
    const char* tn = t.name.c_str();
    if (!valid_utf8(t.name)) r.bad(strfmt("the name of tensor %llu is not valid UTF-8", (unsigned long long)ti));
    if (seen.count(t.name)) r.bad(strfmt("duplicate tensor name '%s'", tn));
    const uint32_t nd = r.read<uint32_t>("a tensor's dimension count");
    if (nd < 1 || nd > uint32_t(kMaxDims))
        r.bad(strfmt("tensor '%s' has %u dimensions (must be 1 to %d)", tn, nd, kMaxDims));
    t.n_dims = int(nd);
    int64_t nelem = 1;
    for (uint32_t d = 0; d < nd; ++d) {
        const uint64_t ne = r.read<uint64_t>("a tensor dimension");
        if (ne == 0 || ne > uint64_t(std::numeric_limits<int64_t>::max()))
            r.bad(strfmt("tensor '%s' has invalid dimension %u: %llu", tn, d, (unsigned long long)ne));
        t.ne[d] = int64_t(ne);
        if (!mul_ok(nelem, t.ne[d], &nelem)) r.bad(strfmt("tensor '%s' has too many elements (overflow)", tn));
    }
    const uint32_t type = r.read<uint32_t>("a tensor type");
    const TypeInfo* info = type_info(type);
    if (info == nullptr) r.bad(strfmt("tensor '%s' has unknown type id %u", tn, type));
    if (!info->supported)
        fail(strfmt("%s: tensor '%s' has type %s, which prosparse-rt does not support "
                    "(supported: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q2_k, q3_k, q4_k, q5_k, q6_k)", path, tn, info->name));
    t.type = GgmlType(type);
    if (t.ne[0] % info->block_size != 0)
        r.bad(strfmt("tensor '%s' of type %s has rows of %lld elements, not a multiple of the block size "
                     "%lld", tn, info->name, (long long)t.ne[0], (long long)info->block_size));
    int64_t nbytes = 0;
    if (!mul_ok(nelem / info->block_size, int64_t(info->block_bytes), &nbytes))
        r.bad(strfmt("tensor '%s' is too large (overflow)", tn));
    t.nbytes = size_t(nbytes);
    const uint64_t off = r.read<uint64_t>("a tensor data offset");
    if (off % alignment != 0)
        r.bad(strfmt("tensor '%s' has data offset %llu, not a multiple of the alignment %llu", tn,
                     (unsigned long long)off, (unsigned long long)alignment));
    *offset = off;
    return t;
}

// Tensor data starts at the first multiple of the alignment after the header; every tensor must
// lie inside the file from there.
void place_tensor_data(std::vector<Tensor>& tensors, const std::vector<uint64_t>& offsets,
                       const uint8_t* base, size_t size, uint64_t header_end, uint64_t alignment,
                       const char* path) {
    if (tensors.empty()) return;
    const uint64_t data_start = header_end + (alignment - header_end % alignment) % alignment;
    if (data_start < header_end || data_start > size)
        fail(strfmt("%s: file is truncated: tensor data would start at byte %llu, file has %zu", path,
                    (unsigned long long)data_start, size));
    const uint64_t data_size = size - data_start;
    for (size_t i = 0; i < tensors.size(); ++i) {
        Tensor& t = tensors[i];
        const uint64_t off = offsets[i];
        if (off > data_size || t.nbytes > data_size - off)
            fail(strfmt("%s: tensor '%s' (%zu bytes at data offset %llu) extends past the end of the file "
                        "(%llu bytes of tensor data): the file is truncated or corrupt", path, t.name.c_str(),
                        t.nbytes, (unsigned long long)off, (unsigned long long)data_size));
        t.data = base + data_start + off;
    }
}

}  // namespace

GGUFFile::GGUFFile(const std::string& path) : path_(path) {
    const char* p = path_.c_str();
    map_file(p, &base_, &size_);
    // The constructor has not finished, so the destructor will not run: unmap on any error.
    try {
        Reader r(base_, size_, path_);
        const Counts counts = read_header(r, p, &powerinfer_, &version_);

        kv_.reserve(size_t(counts.n_kv));
        kv_index_.reserve(size_t(counts.n_kv));
        for (uint64_t k = 0; k < counts.n_kv; ++k) {
            auto kv = read_kv(r, k, kv_index_);
            kv_index_.emplace(kv.first, kv_.size());
            kv_.push_back(std::move(kv));
        }
        const uint64_t alignment = alignment_of(find("general.alignment"), p);

        tensors_.reserve(size_t(counts.n_tensors));
        tensor_index_.reserve(size_t(counts.n_tensors));
        std::vector<uint64_t> offsets(size_t(counts.n_tensors));
        for (uint64_t ti = 0; ti < counts.n_tensors; ++ti) {
            Tensor t = read_tensor_info(r, ti, alignment, p, tensor_index_, &offsets[size_t(ti)]);
            tensor_index_.emplace(t.name, tensors_.size());
            tensors_.push_back(std::move(t));
        }
        place_tensor_data(tensors_, offsets, base_, size_, r.pos(), alignment, p);
    } catch (...) {
        ::munmap(base_, size_);
        base_ = nullptr;
        throw;
    }
}

GGUFFile::~GGUFFile() {
    if (base_ != nullptr) ::munmap(base_, size_);
}

const GGUFValue* GGUFFile::find(std::string_view key) const {
    auto it = kv_index_.find(std::string(key));
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

namespace {

[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const GGUFValue& v,
                             const char* wanted) {
    std::string have = gguf_type_name(v.type);
    if (v.type == GGUFType::ARRAY) have = strfmt("array of %s", gguf_type_name(v.arr_type));
    fail(strfmt("%s: metadata key '%.*s' has type %s, expected %s", path.c_str(), int(key.size()),
                key.data(), have.c_str(), wanted));
}

[[noreturn]] void missing(const std::string& path, std::string_view key) {
    fail(strfmt("%s: required metadata key '%.*s' is missing", path.c_str(), int(key.size()),
                key.data()));
}

int64_t as_int(const std::string& path, std::string_view key, const GGUFValue& v) {
    if (!is_int_type(v.type)) wrong_type(path, key, v, "an integer");
    if (v.type == GGUFType::UINT64 && v.u > uint64_t(std::numeric_limits<int64_t>::max()))
        fail(strfmt("%s: metadata key '%.*s' = %llu is out of range", path.c_str(), int(key.size()),
                    key.data(), (unsigned long long)v.u));
    return is_unsigned(v.type) ? int64_t(v.u) : v.i;
}

double as_float(const std::string& path, std::string_view key, const GGUFValue& v) {
    if (is_float_type(v.type)) return v.f;
    if (is_int_type(v.type)) return is_unsigned(v.type) ? double(v.u) : double(v.i);
    wrong_type(path, key, v, "a number");
}

// A string the runtime uses as text (architecture, activation, tokenizer kind...) must be UTF-8,
// as the spec says; refusing it here names the key, where it would otherwise surface as an
// unreadable name in another error message, or a decoding error in Python.
std::string as_str(const std::string& path, std::string_view key, const GGUFValue& v) {
    if (v.type != GGUFType::STRING) wrong_type(path, key, v, "string");
    if (!valid_utf8(v.str))
        fail(strfmt("%s: metadata key '%.*s' holds a string that is not valid UTF-8", path.c_str(),
                    int(key.size()), key.data()));
    return std::string(v.str);
}

// Element i of a numeric array value, decoded as a scalar of the array's element type.
GGUFValue array_element(const GGUFValue& v, size_t i) {
    GGUFValue e;
    e.type = v.arr_type;
    decode_scalar(v.arr_type, v.arr_data + i * value_size(v.arr_type), e);
    return e;
}

}  // namespace

std::string GGUFFile::get_str(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(path_, key);
    return as_str(path_, key, *v);
}

std::optional<std::string> GGUFFile::get_str_opt(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) return std::nullopt;
    return as_str(path_, key, *v);
}

int64_t GGUFFile::get_int(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(path_, key);
    return as_int(path_, key, *v);
}

int64_t GGUFFile::get_int(std::string_view key, int64_t def) const {
    const GGUFValue* v = find(key);
    return v ? as_int(path_, key, *v) : def;
}

double GGUFFile::get_float(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(path_, key);
    return as_float(path_, key, *v);
}

double GGUFFile::get_float(std::string_view key, double def) const {
    const GGUFValue* v = find(key);
    return v ? as_float(path_, key, *v) : def;
}

bool GGUFFile::get_bool(std::string_view key, bool def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->type != GGUFType::BOOL) wrong_type(path_, key, *v, "bool");
    return v->u != 0;
}

std::vector<std::string_view> GGUFFile::get_str_array(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) return {};
    if (v->type != GGUFType::ARRAY || v->arr_type != GGUFType::STRING)
        wrong_type(path_, key, *v, "array of string");
    return v->arr_strings;
}

std::vector<float> GGUFFile::get_float_array(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) return {};
    if (v->type != GGUFType::ARRAY || !(is_float_type(v->arr_type) || is_int_type(v->arr_type)))
        wrong_type(path_, key, *v, "array of numbers");
    std::vector<float> out(size_t(v->arr_n));
    for (size_t i = 0; i < out.size(); ++i) out[i] = float(as_float(path_, key, array_element(*v, i)));
    return out;
}

std::vector<int64_t> GGUFFile::get_int_array(std::string_view key) const {
    const GGUFValue* v = find(key);
    if (!v) return {};
    if (v->type != GGUFType::ARRAY || !is_int_type(v->arr_type))
        wrong_type(path_, key, *v, "array of integers");
    std::vector<int64_t> out(size_t(v->arr_n));
    for (size_t i = 0; i < out.size(); ++i) out[i] = as_int(path_, key, array_element(*v, i));
    return out;
}

const Tensor* GGUFFile::tensor(std::string_view name) const {
    auto it = tensor_index_.find(std::string(name));
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace ps

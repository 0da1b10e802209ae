// Standalone fuzz harness for the GGUF loader and the weight-type conversions, meant to run
// under AddressSanitizer/UBSan (cmake -DPROSPARSE_SANITIZE=ON -DPROSPARSE_BUILD_TESTS=ON).
//
//   test_gguf_fuzz [N_CASES] [SEED_FILE.gguf ...]
//
// Mutates a valid GGUF built here (and any seed files given, e.g. one from gguf.GGUFWriter) the
// way tests/test_gguf.py does, loads every mutant, and for those that load exercises every getter
// and reads every tensor byte. The only acceptable outcomes are success or ps::Error; the
// sanitizers turn any out-of-bounds read, leak or undefined behaviour into a failure.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "gguf.h"
#include "quant.h"

namespace {

using Bytes = std::vector<uint8_t>;

template <class T>
void put(Bytes& b, T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
}
void put_str(Bytes& b, const std::string& s) {
    put<uint64_t>(b, s.size());
    b.insert(b.end(), s.begin(), s.end());
}

struct TensorSpec {
    std::string name;
    std::vector<uint64_t> ne;
    ps::GgmlType type;
};

// A valid GGUF v3 file with metadata of every value type and tensors of every supported type.
Bytes build_seed() {
    using VT = ps::GGUFType;
    Bytes kv;
    uint64_t n_kv = 0;
    auto key = [&](const std::string& k, VT t) {
        put_str(kv, k);
        put<uint32_t>(kv, uint32_t(t));
        ++n_kv;
    };
    key("general.architecture", VT::STRING); put_str(kv, "llama");
    key("general.alignment", VT::UINT32); put<uint32_t>(kv, 32);
    key("u8", VT::UINT8); put<uint8_t>(kv, 200);
    key("i8", VT::INT8); put<int8_t>(kv, -100);
    key("u16", VT::UINT16); put<uint16_t>(kv, 60000);
    key("i16", VT::INT16); put<int16_t>(kv, -30000);
    key("u32", VT::UINT32); put<uint32_t>(kv, 4000000000u);
    key("i32", VT::INT32); put<int32_t>(kv, -2000000000);
    key("u64", VT::UINT64); put<uint64_t>(kv, ~uint64_t(0));
    key("i64", VT::INT64); put<int64_t>(kv, -5);
    key("f32", VT::FLOAT32); put<float>(kv, 0.5f);
    key("f64", VT::FLOAT64); put<double>(kv, 1e300);
    key("bool", VT::BOOL); put<uint8_t>(kv, 1);
    key("arr.str", VT::ARRAY); put<uint32_t>(kv, uint32_t(VT::STRING)); put<uint64_t>(kv, 3);
    put_str(kv, "<s>"); put_str(kv, "</s>"); put_str(kv, "\xe2\x96\x81the");
    key("arr.f32", VT::ARRAY); put<uint32_t>(kv, uint32_t(VT::FLOAT32)); put<uint64_t>(kv, 3);
    put<float>(kv, 0.f); put<float>(kv, -1.f); put<float>(kv, 2.f);
    key("arr.i32", VT::ARRAY); put<uint32_t>(kv, uint32_t(VT::INT32)); put<uint64_t>(kv, 2);
    put<int32_t>(kv, 1); put<int32_t>(kv, -2);
    key("arr.u64", VT::ARRAY); put<uint32_t>(kv, uint32_t(VT::UINT64)); put<uint64_t>(kv, 1);
    put<uint64_t>(kv, 1ull << 63);

    const std::vector<TensorSpec> tensors = {
        {"t.f32", {32, 3}, ps::GgmlType::F32},   {"t.f16", {64, 2}, ps::GgmlType::F16},
        {"t.bf16", {32, 2, 2}, ps::GgmlType::BF16}, {"t.q8_0", {64, 2}, ps::GgmlType::Q8_0},
        {"t.q4_0", {32, 1, 1, 2}, ps::GgmlType::Q4_0}, {"t.q4_1", {96}, ps::GgmlType::Q4_1},
    };
    Bytes out;
    put<uint32_t>(out, 0x46554747);  // "GGUF"
    put<uint32_t>(out, 3);
    put<uint64_t>(out, tensors.size());
    put<uint64_t>(out, n_kv);
    out.insert(out.end(), kv.begin(), kv.end());
    std::mt19937 rng(7);
    std::vector<Bytes> blobs;
    uint64_t off = 0;
    for (const auto& t : tensors) {
        put_str(out, t.name);
        put<uint32_t>(out, uint32_t(t.ne.size()));
        int64_t n = 1;
        for (uint64_t d : t.ne) { put<uint64_t>(out, d); n *= int64_t(d); }
        put<uint32_t>(out, uint32_t(t.type));
        put<uint64_t>(out, off);
        std::vector<float> x(static_cast<size_t>(n));
        std::normal_distribution<float> nd;
        for (auto& v : x) v = nd(rng);
        Bytes blob(ps::row_bytes(t.type, n));
        ps::quantize_row(t.type, x.data(), blob.data(), n);
        blob.resize((blob.size() + 31) / 32 * 32, 0);
        off += blob.size();
        blobs.push_back(std::move(blob));
    }
    out.resize((out.size() + 31) / 32 * 32, 0);
    for (const auto& b : blobs) out.insert(out.end(), b.begin(), b.end());
    return out;
}

// Everything a consumer might do with a loaded file; every byte the loader handed out is read.
double exercise(const ps::GGUFFile& f) {
    double acc = 0;
    for (const auto& [k, v] : f.metadata()) {
        try { acc += double(f.get_int(k)); } catch (const ps::Error&) {}
        try { acc += f.get_float(k); } catch (const ps::Error&) {}
        try { acc += f.get_bool(k, false); } catch (const ps::Error&) {}
        try { acc += double(f.get_str(k).size()); } catch (const ps::Error&) {}
        try {
            for (auto s : f.get_str_array(k)) acc += double(s.size()) + (s.empty() ? 0 : s.back());
        } catch (const ps::Error&) {}
        try { for (float x : f.get_float_array(k)) acc += double(x); } catch (const ps::Error&) {}
        try { for (int64_t x : f.get_int_array(k)) acc += double(x); } catch (const ps::Error&) {}
        if (f.find(k) != &v) std::abort();
    }
    std::vector<float> row;
    for (const auto& t : f.tensors()) {
        if (f.tensor(t.name) != &t) std::abort();
        unsigned sum = 0;
        for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
        acc += sum;
        if (t.nbytes != size_t(t.nrows()) * t.row_stride()) std::abort();
        row.resize(size_t(t.ne[0]));
        ps::dequantize_row(t.type, t.row(t.nrows() - 1), row.data(), t.ne[0]);
    }
    return acc;
}

Bytes mutate(const Bytes& seed, size_t header_end, std::mt19937_64& rng, int op) {
    static const uint64_t extremes[] = {0, 1, 13, 64, 1u << 31, 0xFFFFFFFFu, 1ull << 32,
                                        (1ull << 63) - 1, 1ull << 63, ~0ull, ~0ull - 31};
    auto below = [&](size_t n) { return n ? size_t(rng() % n) : 0; };
    Bytes d = seed;
    switch (op % 5) {
        case 0: d.resize(below(std::min(seed.size(), header_end + 64))); break;
        case 1:
            for (int k = 0, n = 1 + int(rng() % 4); k < n; ++k)
                d[below(header_end)] ^= uint8_t(1u << (rng() % 8));
            break;
        case 2: {
            const uint64_t v = extremes[rng() % (sizeof extremes / sizeof extremes[0])];
            std::memcpy(&d[below(header_end - 8)], &v, 8);
            break;
        }
        case 3: {
            const uint32_t v = uint32_t(rng() % 48);
            std::memcpy(&d[below(d.size() - 4)], &v, 4);
            break;
        }
        default: {  // splice: duplicate or drop a random span of the header
            const size_t a = below(header_end), len = 1 + below(16);
            if (rng() & 1) d.insert(d.begin() + long(a), seed.begin() + long(a),
                                    seed.begin() + long(std::min(a + len, seed.size())));
            else d.erase(d.begin() + long(a), d.begin() + long(std::min(a + len, d.size())));
        }
    }
    return d;
}

int fuzz_file(const Bytes& seed, const std::string& label, long n_cases, const std::string& tmp) {
    // Mutations aim at the header (metadata and tensor infos), where the parsing happens. Its
    // end is where the tensor data begins: the file size less the (32-aligned) tensor bytes.
    size_t header_end = seed.size();
    {
        std::ofstream(tmp, std::ios::binary)
            .write(reinterpret_cast<const char*>(seed.data()), long(seed.size()));
        ps::GGUFFile f(tmp);  // the seed itself must load
        exercise(f);
        size_t data_bytes = 0;
        for (const auto& t : f.tensors()) data_bytes += (t.nbytes + 31) / 32 * 32;
        if (data_bytes + 32 < seed.size()) header_end = seed.size() - data_bytes;
    }
    std::mt19937_64 rng(20240601);
    long loaded = 0, refused = 0;
    double sink = 0;
    for (long i = 0; i < n_cases; ++i) {
        Bytes d = mutate(seed, header_end, rng, int(i));
        std::ofstream(tmp, std::ios::binary | std::ios::trunc)
            .write(reinterpret_cast<const char*>(d.data()), long(d.size()));
        try {
            ps::GGUFFile f(tmp);
            sink += exercise(f);
            ++loaded;
        } catch (const ps::Error&) {
            ++refused;
        }
    }
    std::printf("%s: %ld cases, %ld loaded, %ld refused (checksum %g)\n", label.c_str(), n_cases,
                loaded, refused, sink);
    return loaded + refused == n_cases ? 0 : 1;
}

int check_quant() {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    const ps::GgmlType types[] = {ps::GgmlType::F32, ps::GgmlType::F16, ps::GgmlType::BF16,
                                  ps::GgmlType::Q8_0, ps::GgmlType::Q4_0, ps::GgmlType::Q4_1};
    const int64_t n = 32 * 64;
    std::vector<float> x(n), y(n);
    for (int round = 0; round < 4; ++round) {
        for (auto& v : x) v = nd(rng) * (round == 1 ? 7e4f : 1.0f);
        if (round >= 2) {  // non-finite values: the casts must stay defined
            for (int i = 0; i < 64; ++i)
                x[size_t(rng() % n)] = i % 3 == 0 ? NAN : (i % 3 == 1 ? INFINITY : -INFINITY);
        }
        for (auto t : types) {
            Bytes q(ps::row_bytes(t, n));
            ps::quantize_row(t, x.data(), q.data(), n);
            ps::dequantize_row(t, q.data(), y.data(), n);
        }
        std::vector<ps::block_q8_1> a(n / ps::QK);
        ps::quantize_row_q8_1(x.data(), a.data(), n);
    }
    // Every finite half survives the round trip through fp32.
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = ps::fp16_to_fp32(uint16_t(h));
        if (std::isnan(f)) continue;
        if (ps::fp32_to_fp16(f) != h) { std::printf("fp16 round trip failed at 0x%04x\n", h); return 1; }
    }
    // Random bit patterns through both converters.
    std::mt19937 bits(11);
    for (int i = 0; i < 1000000; ++i) {
        const uint32_t u = bits();
        float f;
        std::memcpy(&f, &u, 4);
        (void)ps::fp32_to_fp16(f);
        (void)ps::fp32_to_bf16(f);
    }
    std::printf("quant: ok\n");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const long n_cases = argc > 1 ? std::atol(argv[1]) : 5000;
    char tmpl[] = "/tmp/prosparse_fuzz_XXXXXX";
    const int fd = mkstemp(tmpl);
    if (fd < 0) { std::perror("mkstemp"); return 2; }
    close(fd);
    const std::string tmp = tmpl;
    int rc = check_quant();
    try {
        rc |= fuzz_file(build_seed(), "built-in seed", n_cases, tmp);
        for (int i = 2; i < argc; ++i) {
            std::ifstream in(argv[i], std::ios::binary);
            Bytes seed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
            rc |= fuzz_file(seed, argv[i], n_cases, tmp);
        }
    } catch (const ps::Error& e) {
        std::printf("seed file failed to load: %s\n", e.what());
        rc = 1;
    }
    std::remove(tmp.c_str());
    return rc;
}

// Unicode helpers for the tokenizers: UTF-8 decoding that never fails (invalid bytes become
// single-byte units) and the character classes the BPE pre-tokenizer regexes test.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ps::unicode {

// Class codes in the low 3 bits (general category's first letter; 0 = unassigned),
// kWhitespace = Unicode White_Space property (what \s matches in Oniguruma and Rust regex).
enum : uint8_t {
    kUnassigned = 0, kLetter = 1, kNumber = 2, kPunct = 3, kSymbol = 4, kMark = 5,
    kSeparator = 6, kOther = 7, kClassMask = 7, kWhitespace = 8,
};

extern const size_t kUnicodeRunCount;
extern const uint32_t kUnicodeRunStart[];
extern const uint8_t kUnicodeRunFlags[];

// Flags of one code point (anything above U+10FFFF is unassigned).
uint8_t flags(uint32_t cp);
inline uint8_t category(uint32_t cp) { return flags(cp) & kClassMask; }

// Decodes one UTF-8 sequence at s[i] (i < n). Returns its length (1..4) and sets cp. An invalid
// or truncated sequence, an overlong form, a surrogate or a value above U+10FFFF yields length 1
// and cp = kInvalid, so every byte of any input belongs to exactly one unit.
constexpr uint32_t kInvalid = 0xFFFFFFFFu;
size_t decode_utf8(const char* s, size_t n, size_t i, uint32_t& cp);

void append_utf8(std::string& out, uint32_t cp);

}  // namespace ps::unicode

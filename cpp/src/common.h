// Shared basics: the one exception type the core throws, and a printf-style formatter.
#pragma once

#include <cstdarg>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace ps {

// Every recoverable problem (bad file, bad argument, unsupported feature) is a ps::Error with a
// message that names the thing at fault. The Python binding maps it to ValueError.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A forward pass whose numbers went non-finite (NaN or Inf): the input was valid, the weights or
// the arithmetic are not. The Python binding maps it to RuntimeError.
struct NumericError : Error {
    using Error::Error;
};

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
inline std::string strfmt(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    va_list ap2;
    va_copy(ap2, ap);
    int n = std::vsnprintf(nullptr, 0, fmt, ap);
    va_end(ap);
    std::string s(n > 0 ? size_t(n) : 0, '\0');
    if (n > 0) std::vsnprintf(&s[0], size_t(n) + 1, fmt, ap2);
    va_end(ap2);
    return s;
}

[[noreturn]] inline void fail(const std::string& msg) { throw Error(msg); }

}  // namespace ps

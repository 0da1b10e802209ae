// STUB (helper: quant)
#include "quant.h"
#include "common.h"
namespace ps {
const TypeInfo* type_info(uint32_t) { return nullptr; }
const char* type_name(uint32_t) { return "?"; }
bool type_supported(GgmlType) { return false; }
size_t row_bytes(GgmlType, int64_t n) { return size_t(n) * 4; }
float fp16_to_fp32(uint16_t) { return 0; }
uint16_t fp32_to_fp16(float) { return 0; }
float bf16_to_fp32(uint16_t) { return 0; }
uint16_t fp32_to_bf16(float) { return 0; }
void dequantize_row(GgmlType, const void*, float*, int64_t) { fail("ni"); }
void quantize_row(GgmlType, const float*, void*, int64_t) { fail("ni"); }
void quantize_row_q8_1(const float*, block_q8_1*, int64_t) { fail("ni"); }
}

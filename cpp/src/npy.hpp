// Minimal .npy reader and writer (format versions 1.0-3.0, little-endian, C order) for the example program and
// the host tests. Supported dtypes: float32 '<f4', float16 '<f2', int32 '<i4', uint16 '<u2'.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace proxyattn {

struct NpyArray {
  std::string descr;           // '<f4', '<f2', '<i4', '<u2'
  std::vector<int64_t> shape;  // C order
  std::vector<uint8_t> data;   // raw little-endian elements
  int64_t numel() const;
  size_t item_size() const;
};

// Reads `path`; on failure returns false and sets *error (names the path and the problem).
bool npy_load(const std::string &path, NpyArray *out, std::string *error);

// Writes atomically (temporary file, then rename); on failure returns false and sets *error.
bool npy_save(const std::string &path, const NpyArray &array, std::string *error);

// Element conversions (round to nearest even for the narrowing ones).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

}  // namespace proxyattn

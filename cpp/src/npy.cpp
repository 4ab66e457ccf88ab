#include "npy.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>

namespace proxyattn {

namespace {

size_t descr_size(const std::string &d) {
  if (d == "<f4" || d == "<i4") return 4;
  if (d == "<f2" || d == "<u2") return 2;
  return 0;
}

// Value of `key` in the header dict, as the raw text up to the next top-level ',' or '}'.
bool dict_value(const std::string &h, const std::string &key, std::string *value) {
  size_t p = h.find("'" + key + "'");
  if (p == std::string::npos) return false;
  p = h.find(':', p);
  if (p == std::string::npos) return false;
  ++p;
  while (p < h.size() && h[p] == ' ') ++p;
  size_t e = p;
  int depth = 0;
  for (; e < h.size(); ++e) {
    char c = h[e];
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  *value = h.substr(p, e - p);
  return true;
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

size_t NpyArray::item_size() const { return descr_size(descr); }

bool npy_load(const std::string &path, NpyArray *out, std::string *error) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *error = "cannot open '" + path + "'";
    return false;
  }
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    *error = "'" + path + "' is not a .npy file (bad magic)";
    return false;
  }
  const int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char *>(b), 2)) {
      *error = "'" + path + "': truncated header";
      return false;
    }
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char *>(b), 4)) {
      *error = "'" + path + "': truncated header";
      return false;
    }
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    *error = "'" + path + "': unsupported .npy version " + std::to_string(major);
    return false;
  }
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) {
    *error = "'" + path + "': truncated header";
    return false;
  }
  std::string descr, fortran, shape;
  if (!dict_value(header, "descr", &descr) || !dict_value(header, "fortran_order", &fortran) ||
      !dict_value(header, "shape", &shape)) {
    *error = "'" + path + "': header lacks descr, fortran_order or shape: " + header;
    return false;
  }
  if (descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"')) descr = descr.substr(1, descr.size() - 2);
  if (descr == "|u1" || descr_size(descr) == 0) {
    *error = "'" + path + "': dtype " + descr + " is not supported; allowed: <f4, <f2, <i4, <u2";
    return false;
  }
  if (fortran.find("False") != 0) {
    *error = "'" + path + "': fortran_order arrays are not supported (save a C-contiguous array)";
    return false;
  }
  NpyArray a;
  a.descr = descr;
  // shape: "(2, 3)" or "(5,)" or "()"
  size_t i = shape.find('(');
  size_t j = shape.rfind(')');
  if (i == std::string::npos || j == std::string::npos) {
    *error = "'" + path + "': bad shape " + shape;
    return false;
  }
  std::string inner = shape.substr(i + 1, j - i - 1);
  size_t p = 0;
  while (p < inner.size()) {
    while (p < inner.size() && (inner[p] == ' ' || inner[p] == ',')) ++p;
    if (p >= inner.size()) break;
    size_t q = p;
    while (q < inner.size() && inner[q] >= '0' && inner[q] <= '9') ++q;
    if (q == p) {
      *error = "'" + path + "': bad shape " + shape;
      return false;
    }
    a.shape.push_back(std::stoll(inner.substr(p, q - p)));
    p = q;
  }
  const size_t bytes = size_t(a.numel()) * a.item_size();
  a.data.resize(bytes);
  if (bytes && !f.read(reinterpret_cast<char *>(a.data.data()), std::streamsize(bytes))) {
    *error = "'" + path + "': file holds fewer than the " + std::to_string(bytes) + " data bytes its header promises";
    return false;
  }
  *out = std::move(a);
  return true;
}

bool npy_save(const std::string &path, const NpyArray &a, std::string *error) {
  if (descr_size(a.descr) == 0) {
    *error = "npy_save: dtype " + a.descr + " is not supported";
    return false;
  }
  if (a.data.size() != size_t(a.numel()) * a.item_size()) {
    *error = "npy_save: data size does not match shape";
    return false;
  }
  std::string shape = "(";
  for (size_t i = 0; i < a.shape.size(); ++i) shape += std::to_string(a.shape[i]) + (a.shape.size() == 1 ? "," : (i + 1 < a.shape.size() ? ", " : ""));
  shape += ")";
  std::string header = "{'descr': '" + a.descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t unpadded = 10 + header.size() + 1;  // magic(6)+version(2)+len(2)+header+'\n'
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) {
      *error = "cannot write '" + tmp + "'";
      return false;
    }
    const uint16_t len = uint16_t(header.size());
    f.write("\x93NUMPY\x01\x00", 8);
    const char lb[2] = {char(len & 0xff), char(len >> 8)};
    f.write(lb, 2);
    f.write(header.data(), std::streamsize(header.size()));
    f.write(reinterpret_cast<const char *>(a.data.data()), std::streamsize(a.data.size()));
    if (!f) {
      *error = "write to '" + tmp + "' failed";
      std::remove(tmp.c_str());
      return false;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    *error = "cannot rename '" + tmp + "' to '" + path + "'";
    std::remove(tmp.c_str());
    return false;
  }
  return true;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0);  // inf / nan
  if (absx >= 0x477ff000u) return sign | 0x7c00;                                       // rounds to inf
  if (absx < 0x38800000u) {                                                            // subnormal or zero
    if (absx < 0x33000000u) return sign;
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffff) | 0x800000;
    const int shift = 126 - int(e);  // bits to drop to land at 2^-24 units: value = m * 2^(e - 150), e in 102..112
    uint32_t v = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (v & 1))) ++v;
    return sign | uint16_t(v);
  }
  uint32_t v = ((absx >> 13) - ((127 - 15) << 10));
  const uint32_t rem = absx & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (v & 1))) ++v;
  return sign | uint16_t(v);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);  // nan stays nan
  const uint32_t rounding = 0x7fff + ((x >> 16) & 1);
  return uint16_t((x + rounding) >> 16);
}

}  // namespace proxyattn

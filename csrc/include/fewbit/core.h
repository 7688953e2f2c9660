// fewbit core: header-only code shared by the CPU and CUDA kernels (host and device).
//
// The packed layout is the reference's (fewbit_dist/quant/packing.py): the codes form one little-endian
// bit stream, element i at stream bits [i*b, (i+1)*b), least significant bit first; stream bit p is bit
// p % 8 of byte p / 8. n codes take exactly ceil(n*b/8) bytes. Eight codes fill exactly b bytes, so groups
// of eight are independent: each kernel thread packs or unpacks whole groups and no two write one byte.
//
// Offsets are 64-bit everywhere: a tensor of 2^31 elements at 8 bits is 2^34 bits.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FEWBIT_HD __host__ __device__ __forceinline__
#else
#define FEWBIT_HD inline
#endif

namespace fewbit {

// Position of element i's first bit in the stream: byte index and bit shift within it.
struct BitPos {
  int64_t byte;
  int32_t shift;
};

FEWBIT_HD BitPos bit_position(int64_t element, int32_t bits) {
  const int64_t bit = element * static_cast<int64_t>(bits);
  return BitPos{bit >> 3, static_cast<int32_t>(bit & 7)};
}

FEWBIT_HD int64_t packed_nbytes(int64_t numel, int32_t bits) {
  return (numel * static_cast<int64_t>(bits) + 7) / 8;
}

// Code of one value: the number of borders <= x, for 2^bits - 1 sorted borders. A branch-free binary
// search (bits steps); NaN compares false with every border and gets code 0, as in the reference.
template <typename T>
FEWBIT_HD uint32_t encode(T x, const T* borders, int32_t bits) {
  uint32_t pos = 0;
  for (int32_t s = 1 << (bits - 1); s > 0; s >>= 1) {
    pos += (borders[pos + s - 1] <= x) ? static_cast<uint32_t>(s) : 0u;
  }
  return pos;
}

// The same code for a compile-time bit-width: up to 4 bits (15 borders) a plain count of the borders
// <= x, which has no dependent loads and vectorizes across elements; above, the binary search.
template <int BITS, typename T>
FEWBIT_HD uint32_t encode_fixed(T x, const T* borders) {
  if constexpr (BITS <= 4) {
    uint32_t count = 0;
#pragma unroll
    for (int32_t i = 0; i < (1 << BITS) - 1; ++i) {
      count += (borders[i] <= x) ? 1u : 0u;
    }
    return count;
  } else {
    return encode<T>(x, borders, BITS);
  }
}

// Pack `count` (1..8) codes, the group starting at an element index that is a multiple of 8, into
// ceil(count*bits/8) bytes at `out`.
FEWBIT_HD void pack_group(const uint32_t* codes, int32_t count, int32_t bits, uint8_t* out) {
  uint64_t word = 0;
  for (int32_t j = 0; j < count; ++j) {
    word |= static_cast<uint64_t>(codes[j]) << (j * bits);
  }
  const int32_t nbytes = (count * bits + 7) / 8;
  for (int32_t k = 0; k < nbytes; ++k) {
    out[k] = static_cast<uint8_t>((word >> (8 * k)) & 0xFFu);
  }
}

// Read the code of any element straight from the stream (it may straddle two bytes).
FEWBIT_HD uint32_t load_code(const uint8_t* packed, int64_t element, int32_t bits) {
  const BitPos p = bit_position(element, bits);
  uint32_t w = packed[p.byte];
  if (p.shift + bits > 8) {
    w |= static_cast<uint32_t>(packed[p.byte + 1]) << 8;
  }
  return (w >> p.shift) & ((1u << bits) - 1u);
}

// Unpack the group of `count` (1..8) codes that starts at element 8*g: read its bytes once.
FEWBIT_HD void unpack_group(const uint8_t* group_bytes, int32_t count, int32_t bits, uint32_t* codes) {
  const int32_t nbytes = (count * bits + 7) / 8;
  uint64_t word = 0;
  for (int32_t k = 0; k < nbytes; ++k) {
    word |= static_cast<uint64_t>(group_bytes[k]) << (8 * k);
  }
  const uint64_t mask = (1ull << bits) - 1ull;
  for (int32_t j = 0; j < count; ++j) {
    codes[j] = static_cast<uint32_t>((word >> (j * bits)) & mask);
  }
}

// Call f(std::integral_constant<int, BITS>{}) for a runtime bit-width in 1..8, so kernels can take it as a
// template parameter (loops unroll, shifts are constants). Callers check the range first; anything else
// runs nothing.
template <typename F>
inline void dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

}  // namespace fewbit

// ---------------------------------------------------------------------------------------------------------
// Group-affine quantization of saved linear-layer inputs (LowBitLinear). Each row of a [rows, cols] input
// is cut into groups of `group_size` columns (the last may be shorter); group g of row r has an offset
// lo and a step scale (both float32, scale > 0). A value x gets
//     code = clamp(floor((x - lo) / scale + u), 0, 2^bits - 1)
// with u uniform in [0, 1) for stochastic rounding (then E[lo + code * scale] = x for x in the group's
// range) or u = 0.5 for round-to-nearest. NaN gets code 0. Decoding is lo + code * scale, a product and a
// sum each rounded to float32 (no fused multiply-add), exactly what the pure-PyTorch reference computes.

namespace fewbit {

#if defined(__CUDA_ARCH__)
FEWBIT_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
FEWBIT_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
FEWBIT_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
FEWBIT_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
#else
// The CPU build passes -ffp-contract=off, so these stay separately rounded operations.
FEWBIT_HD float sub_rn(float a, float b) { return a - b; }
FEWBIT_HD float div_rn(float a, float b) { return a / b; }
FEWBIT_HD float add_rn(float a, float b) { return a + b; }
FEWBIT_HD float mul_rn(float a, float b) { return a * b; }
#endif

FEWBIT_HD uint32_t quantize_affine(float x, float lo, float scale, float u, int32_t bits) {
  const float t = add_rn(div_rn(sub_rn(x, lo), scale), u);
  const float qmax = static_cast<float>((1u << bits) - 1u);
  if (!(t >= 1.0f)) return 0u;  // below the first step, or NaN
  if (t >= qmax) return static_cast<uint32_t>(qmax);
  return static_cast<uint32_t>(t);  // truncation is floor for t >= 1
}

FEWBIT_HD float dequantize_affine(uint32_t code, float lo, float scale) {
  return add_rn(mul_rn(static_cast<float>(code), scale), lo);
}

// Group of element (row, col) in the [rows, groups_per_row] tables of lo and scale.
FEWBIT_HD int64_t group_index(int64_t element, int64_t cols, int64_t group_size, int64_t groups_per_row) {
  const int64_t row = element / cols;
  return row * groups_per_row + (element - row * cols) / group_size;
}

}  // namespace fewbit

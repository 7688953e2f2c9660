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

// Branch-free, so loops over elements vectorize: t below 1 or NaN gives 0, t at or above qmax gives qmax,
// and in between truncation is floor.
FEWBIT_HD uint32_t quantize_affine(float x, float lo, float scale, float u, int32_t bits) {
  const float t = add_rn(div_rn(sub_rn(x, lo), scale), u);
  const float qmax = static_cast<float>((1u << bits) - 1u);
  const float above = t >= 1.0f ? t : 0.0f;  // NaN compares false: 0
  return static_cast<uint32_t>(static_cast<int32_t>(above < qmax ? above : qmax));
}

FEWBIT_HD float dequantize_affine(uint32_t code, float lo, float scale) {
  return add_rn(mul_rn(static_cast<float>(code), scale), lo);
}

}  // namespace fewbit

// ---------------------------------------------------------------------------------------------------------
// The fused group quantizer (quantize_groups): group ranges, counter-based uniforms and the per-unit loop
// shared by the CPU kernel and the CUDA kernel.
//
// Ranges. lo = min and hi = max of a group's values converted to float32 (conversion is monotone, so this is
// the float32 rounding of the min and max in the input dtype); a NaN anywhere makes both NaN. The step is
// (hi - lo) / (2^bits - 1) rounded up by one ulp (so hi stays inside the last step), or 1 when hi > lo
// fails (a constant group, or NaN): exactly fewbit_dist.functional.lowbit.group_ranges on the CPU.
//
// Uniforms. Element (r, c) of a [rows, cols] input has the counter i = r * cols + c. With the 64-bit seed
// split into halves (s_lo, s_hi) and i into (i_lo, i_hi), all arithmetic modulo 2^32:
//     k0 = mix32(s_lo ^ 0x9E3779B9),  k1 = mix32(s_hi ^ 0x85EBCA6B) ^ k0           (once per call)
//     h  = mix32(mix32(i_lo ^ k0) ^ (i_hi + k1)),   u = (h >> 8) * 2^-24 in [0, 1)     (per element)
// mix32 is a 32-bit integer finalizer (xorshift-multiply, two rounds). u has 24 random bits, exactly a
// float32, so no noise tensor is ever stored: the uniform of an element is recomputed from (seed, i).
// The pure-PyTorch reference (fewbit_dist/ops/reference.py) runs the same integer arithmetic.

namespace fewbit {

FEWBIT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct UniformKey {
  uint32_t k0, k1;
};

FEWBIT_HD UniformKey uniform_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = mix32(static_cast<uint32_t>(s & 0xFFFFFFFFull) ^ 0x9E3779B9u);
  const uint32_t k1 = mix32(static_cast<uint32_t>(s >> 32) ^ 0x85EBCA6Bu) ^ k0;
  return UniformKey{k0, k1};
}

// h for the counter whose halves are (lo32, hi32); callers pass hi32 + k1 precomputed as `hik`.
FEWBIT_HD uint32_t counter_hash(uint32_t k0, uint32_t lo32, uint32_t hik) {
  return mix32(mix32(lo32 ^ k0) ^ hik);
}

FEWBIT_HD float uniform24(uint32_t h) {
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24: exact
}

FEWBIT_HD float uniform_at(UniformKey key, uint64_t i) {
  return uniform24(counter_hash(key.k0, static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32) + key.k1));
}

// min / max that return NaN when either operand is NaN (as torch.aminmax does).
FEWBIT_HD float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }
FEWBIT_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

FEWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FEWBIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// nextafter(s, +inf) for s in [-0, +inf] or NaN (the only values a step can take).
FEWBIT_HD float next_up(float s) {
  if (!(s < bits_float(0x7F800000u))) return s;        // +inf or NaN
  if (s == 0.0f) return bits_float(1u);                // the smallest denormal, from +0 or -0
  return bits_float(float_bits(s) + 1u);               // s > 0: the next representable value
}

FEWBIT_HD float group_step(float lo, float hi, int32_t bits) {
  const float step = next_up(div_rn(sub_rn(hi, lo), static_cast<float>((1u << bits) - 1u)));
  return hi > lo ? step : 1.0f;
}

// Min and max of columns [c0, c1) of one row (`row` points at its first element, `stride` apart), starting
// at column c0 + lane and stepping by `lanes`: a CUDA warp calls it with (lane, 32) and reduces; the CPU with
// (0, 1). Columns this lane never visits leave (+inf, -inf), neutral for nan_min / nan_max.
template <typename T>
FEWBIT_HD void group_minmax(const T* row, int64_t stride, int64_t c0, int64_t c1, int32_t lane, int32_t lanes,
                            float* mn, float* mx) {
  float lo = bits_float(0x7F800000u), hi = -lo;  // +inf, -inf
  for (int64_t c = c0 + lane; c < c1; c += lanes) {
    const float v = static_cast<float>(row[c * stride]);
    lo = nan_min(lo, v);
    hi = nan_max(hi, v);
  }
  *mn = lo;
  *mx = hi;
}

// Row and column of flat element `off` (an offset into [rows, cols]): a 32-bit division when both fit, as
// they do for any realistic width (this runs once per eight elements, never per element).
FEWBIT_HD void locate(int64_t off, int64_t cols, int64_t* row, int64_t* col) {
  if (off <= 0xFFFFFFFFll && cols <= 0xFFFFFFFFll) {
    const uint32_t r = static_cast<uint32_t>(off) / static_cast<uint32_t>(cols);
    *row = r;
    *col = off - static_cast<int64_t>(r) * cols;
  } else {
    *row = off / cols;
    *col = off - *row * cols;
  }
}

// Group table entry of (row, col): an index into [rows, groups] (one division per eight elements).
FEWBIT_HD int64_t group_at(int64_t row, int64_t col, int64_t group_size, int64_t groups) {
  const int64_t g = (col <= 0xFFFFFFFFll && group_size <= 0xFFFFFFFFll)
                        ? static_cast<int64_t>(static_cast<uint32_t>(col) / static_cast<uint32_t>(group_size))
                        : col / group_size;
  return row * groups + g;
}

// Walks flat elements of a [rows, cols] input from (row, col), keeping the group-table entry of the current
// element: the group advances by comparison, never by a division per element.
struct GroupCursor {
  int64_t row, col, grp, gend;  // gend: first column of the next group

  FEWBIT_HD GroupCursor(int64_t r, int64_t c, int64_t group_size, int64_t groups, int64_t cols) : row(r), col(c) {
    grp = group_at(r, c, group_size, groups);
    gend = (grp - r * groups + 1) * group_size;
    if (gend > cols) gend = cols;
  }

  FEWBIT_HD void next(int64_t cols, int64_t group_size, int64_t groups) {
    if (++col == cols) {
      col = 0;
      ++row;
      grp = row * groups;
      gend = group_size < cols ? group_size : cols;
    } else if (col == gend) {
      ++grp;
      gend = gend + group_size < cols ? gend + group_size : cols;
    }
  }
};

// The position of flat element `element` (64-bit division only past 2^32 elements): its cursor.
FEWBIT_HD GroupCursor cursor_at(int64_t element, int64_t cols, int64_t group_size, int64_t groups) {
  int64_t r, c;
  locate(element, cols, &r, &c);
  return GroupCursor(r, c, group_size, groups, cols);
}

// Quantize and pack one unit: `count` (1..8) consecutive flat elements starting at element e0 (a multiple of
// 8) at the cursor's (row, col), into out + e0 / 8 * BITS. lo / scale are read at [group - g_base] (the CUDA
// kernel's shared copy, or the whole table with g_base 0). `stochastic` false: u = 0.5 (round to nearest).
template <int BITS, typename T>
FEWBIT_HD void quantize_unit(const T* x, int64_t s0, int64_t s1, int64_t cols, int64_t group_size, int64_t groups,
                             int64_t e0, int32_t count, int64_t row, int64_t col, const float* lo,
                             const float* scale, int64_t g_base, bool stochastic, UniformKey key, uint8_t* out) {
  GroupCursor at(row, col, group_size, groups, cols);
  uint32_t codes[8];
  for (int32_t j = 0; j < count; ++j) {
    const float u = stochastic ? uniform_at(key, static_cast<uint64_t>(e0 + j)) : 0.5f;
    codes[j] = quantize_affine(static_cast<float>(x[at.row * s0 + at.col * s1]), lo[at.grp - g_base],
                               scale[at.grp - g_base], u, BITS);
    at.next(cols, group_size, groups);
  }
  pack_group(codes, count, BITS, out + (e0 >> 3) * BITS);
}

// quantize_pack's unit: the codes of elements e0 .. e0 + count - 1 (e0 a multiple of 8) of a contiguous input
// against given tables, with uniforms `noise` (per element) or 0.5.
template <typename T>
FEWBIT_HD void quantize_pack_unit(const T* x, const float* noise, int64_t e0, int32_t count, int32_t bits,
                                  int64_t cols, int64_t group_size, int64_t groups, const float* lo,
                                  const float* scale, uint8_t* out) {
  GroupCursor at = cursor_at(e0, cols, group_size, groups);
  uint32_t codes[8];
  for (int32_t j = 0; j < count; ++j) {
    const float u = noise != nullptr ? noise[e0 + j] : 0.5f;
    codes[j] = quantize_affine(static_cast<float>(x[e0 + j]), lo[at.grp], scale[at.grp], u, bits);
    at.next(cols, group_size, groups);
  }
  pack_group(codes, count, bits, out + (e0 >> 3) * bits);
}

// unpack_dequantize's unit: lo + code * scale for elements e0 .. e0 + count - 1 (e0 a multiple of 8).
template <typename T>
FEWBIT_HD void dequantize_unit(const uint8_t* packed, int64_t e0, int32_t count, int32_t bits, int64_t cols,
                               int64_t group_size, int64_t groups, const float* lo, const float* scale, T* out) {
  GroupCursor at = cursor_at(e0, cols, group_size, groups);
  uint32_t codes[8];
  unpack_group(packed + (e0 >> 3) * bits, count, bits, codes);
  for (int32_t j = 0; j < count; ++j) {
    out[e0 + j] = static_cast<T>(dequantize_affine(codes[j], lo[at.grp], scale[at.grp]));
    at.next(cols, group_size, groups);
  }
}

// The range [first, last] of group-table entries that the flat elements [begin, end) touch (end > begin).
FEWBIT_HD void span_groups(int64_t begin, int64_t end, int64_t cols, int64_t group_size, int64_t groups,
                           int64_t* first, int64_t* last) {
  int64_t r, c;
  locate(begin, cols, &r, &c);
  *first = group_at(r, c, group_size, groups);
  locate(end - 1, cols, &r, &c);
  *last = group_at(r, c, group_size, groups);
}

}  // namespace fewbit

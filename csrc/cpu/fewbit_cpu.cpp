// CPU kernels: few-bit activations (encode + pack in forward, unpack + scale in backward) and the
// group-affine quantization of LowBitLinear inputs (quantize + pack, unpack + dequantize).
// The arithmetic is csrc/include/fewbit/core.h, the same the CUDA kernels run. Work is split into whole
// groups of eight elements (b bytes each), so threads never share a byte.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "fewbit/checks.h"
#include "fewbit/core.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // groups per task: large enough to amortize the thread pool

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
}

// Whole groups of eight with a compile-time bit-width, so the loops unroll and vectorize: the codes of a
// block of groups first (an element-wise loop per border for up to 4 bits), then their packing.
constexpr int64_t kBlockGroups = 64;

template <int BITS, typename T, typename Acc>
void encode_pack_groups(const T* src, const Acc* borders, uint8_t* dst, int64_t g0, int64_t g1) {
  uint8_t codes[kBlockGroups * 8];
  for (int64_t b0 = g0; b0 < g1; b0 += kBlockGroups) {
    const int64_t nblock = std::min<int64_t>(kBlockGroups, g1 - b0);
    const T* x = src + b0 * 8;
    const int64_t m = nblock * 8;
    if constexpr (BITS <= 4) {
      Acc v[kBlockGroups * 8];
      for (int64_t e = 0; e < m; ++e) {
        v[e] = static_cast<Acc>(x[e]);
        codes[e] = 0;
      }
      for (int32_t i = 0; i < (1 << BITS) - 1; ++i) {
        const Acc t = borders[i];
        for (int64_t e = 0; e < m; ++e) {
          codes[e] += (t <= v[e]) ? 1 : 0;  // NaN: false for every border, code 0
        }
      }
    } else {
      for (int64_t e = 0; e < m; ++e) {
        codes[e] = static_cast<uint8_t>(fewbit::encode_fixed<BITS, Acc>(static_cast<Acc>(x[e]), borders));
      }
    }
    for (int64_t g = 0; g < nblock; ++g) {
      uint64_t word = 0;
      for (int32_t j = 0; j < 8; ++j) {
        word |= static_cast<uint64_t>(codes[g * 8 + j]) << (j * BITS);
      }
      uint8_t* out = dst + (b0 + g) * BITS;
      for (int32_t k = 0; k < BITS; ++k) {
        out[k] = static_cast<uint8_t>((word >> (8 * k)) & 0xFFu);
      }
    }
  }
}

torch::Tensor encode_pack(const torch::Tensor& input, const torch::Tensor& borders, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(input.device().is_cpu() && borders.device().is_cpu(), "fewbit_cpu: tensors must be on the CPU");
  TORCH_CHECK(borders.dim() == 1 && borders.numel() == (int64_t{1} << bits) - 1,
              "borders must hold 2**bits - 1 values, got ", borders.numel());
  const auto x = input.contiguous();
  const int64_t n = x.numel();
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))},
                          x.options().dtype(torch::kUInt8));
  const int64_t full = n / 8;
  uint8_t* dst = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewbit_encode_pack", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(borders.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "borders must be in the compute dtype (float64 for float64 input, else float32)");
    const scalar_t* src = x.data_ptr<scalar_t>();
    const auto bc = borders.contiguous();
    const acc_t* b = bc.data_ptr<acc_t>();
    fewbit::dispatch_bits(bits, [&](auto B) {
      at::parallel_for(0, full, kGrain, [&](int64_t g0, int64_t g1) {
        encode_pack_groups<decltype(B)::value>(src, b, dst, g0, g1);
      });
    });
    const int32_t rest = static_cast<int32_t>(n - full * 8);
    if (rest) {  // the last, partial group
      uint32_t codes[8];
      for (int32_t j = 0; j < rest; ++j) {
        codes[j] = fewbit::encode<acc_t>(static_cast<acc_t>(src[full * 8 + j]), b, static_cast<int32_t>(bits));
      }
      fewbit::pack_group(codes, rest, static_cast<int32_t>(bits), dst + full * bits);
    }
  });
  return out;
}

template <int BITS, typename T, typename Acc>
void unpack_scale_groups(const uint8_t* src, const Acc* levels, const T* grad, T* dst, int64_t g0, int64_t g1) {
  constexpr uint64_t mask = (1ull << BITS) - 1ull;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* in = src + g * BITS;
    uint64_t word = 0;
    for (int32_t k = 0; k < BITS; ++k) {
      word |= static_cast<uint64_t>(in[k]) << (8 * k);
    }
    const T* gi = grad + g * 8;
    T* out = dst + g * 8;
    for (int32_t j = 0; j < 8; ++j) {
      out[j] = static_cast<T>(levels[(word >> (j * BITS)) & mask] * static_cast<Acc>(gi[j]));
    }
  }
}

torch::Tensor unpack_scale(const torch::Tensor& packed, const torch::Tensor& levels, const torch::Tensor& grad,
                           int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "packed must be uint8");
  TORCH_CHECK(levels.dim() == 1 && levels.numel() == (int64_t{1} << bits), "levels must hold 2**bits values");
  const auto g = grad.contiguous();
  const int64_t n = g.numel();
  TORCH_CHECK(packed.numel() >= fewbit::packed_nbytes(n, static_cast<int32_t>(bits)),
              "packed is too short for ", n, " codes of ", bits, " bits");
  auto out = torch::empty_like(g);
  const int64_t full = n / 8;
  const auto pc = packed.contiguous();
  const uint8_t* src = pc.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fewbit_unpack_scale", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(levels.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "levels must be in the compute dtype (float64 for float64 gradients, else float32)");
    const scalar_t* gin = g.data_ptr<scalar_t>();
    const auto lc = levels.contiguous();
    const acc_t* lv = lc.data_ptr<acc_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    fewbit::dispatch_bits(bits, [&](auto B) {
      at::parallel_for(0, full, kGrain, [&](int64_t g0, int64_t g1) {
        unpack_scale_groups<decltype(B)::value>(src, lv, gin, dst, g0, g1);
      });
    });
    const int32_t rest = static_cast<int32_t>(n - full * 8);
    if (rest) {  // the last, partial group
      uint32_t codes[8];
      fewbit::unpack_group(src + full * bits, rest, static_cast<int32_t>(bits), codes);
      for (int32_t j = 0; j < rest; ++j) {
        dst[full * 8 + j] = static_cast<scalar_t>(lv[codes[j]] * static_cast<acc_t>(gin[full * 8 + j]));
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// LowBitLinear: group-affine quantization of a [rows, cols] input, packed at `bits` per element (row-major
// stream), and its inverse. lo and scale are float32 [rows, groups_per_row]; noise (optional) is float32
// [rows, cols] in [0, 1): stochastic rounding; without it, round to nearest (u = 0.5).

torch::Tensor quantize_pack(const torch::Tensor& input, const torch::Tensor& lo, const torch::Tensor& scale,
                            const c10::optional<torch::Tensor>& noise, int64_t bits, int64_t group_size) {
  check_bits(bits);
  TORCH_CHECK(input.device().is_cpu(), "fewbit_cpu: tensors must be on the CPU");
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [rows, cols]");
  const int64_t rows = input.size(0), cols = input.size(1);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  fewbit::check_group_tables(lo, scale, rows, groups);
  const auto x = input.contiguous();
  const auto lc = lo.contiguous(), sc = scale.contiguous();
  torch::Tensor nc;
  if (noise.has_value()) {
    TORCH_CHECK(noise->scalar_type() == torch::kFloat && noise->sizes() == input.sizes(),
                "noise must be float32 with the input's shape");
    nc = noise->contiguous();
  }
  const int64_t n = x.numel();
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))}, x.options().dtype(torch::kUInt8));
  if (n == 0) return out;
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float* plo = lc.data_ptr<float>();
  const float* psc = sc.data_ptr<float>();
  const float* pu = nc.defined() ? nc.data_ptr<float>() : nullptr;
  const int32_t b = static_cast<int32_t>(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewbit_quantize_pack", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 7) / 8, kGrain, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        fewbit::quantize_pack_unit(src, pu, g * 8, static_cast<int32_t>(std::min<int64_t>(8, n - g * 8)), b, cols,
                                   group_size, groups, plo, psc, dst);
      }
    });
  });
  return out;
}

// unpack_dequantize by blocks of eight rows (their codes start on a byte boundary), the inverse of
// quantize_groups_rows: a block's codes are unpacked eight at a time with a compile-time bit-width, then each
// group's lo + code * scale is a plain loop that vectorizes. The same values as fewbit::dequantize_unit.
template <int BITS, typename T>
void dequantize_rows(const uint8_t* block, int64_t r0, int64_t r1, int64_t cols, int64_t group_size,
                     int64_t groups, const float* lo, const float* scale, T* out, std::vector<uint8_t>& codes) {
  const int64_t n = (r1 - r0) * cols;
  codes.resize(static_cast<size_t>((n + 7) / 8 * 8));
  uint8_t* c = codes.data();
  constexpr uint64_t mask = (uint64_t{1} << BITS) - 1;
  for (int64_t e = 0; e < n; e += 8) {
    const uint8_t* in = block + (e / 8) * BITS;
    const int32_t nbytes = e + 8 <= n ? BITS : static_cast<int32_t>(((n - e) * BITS + 7) / 8);
    uint64_t word = 0;
    for (int32_t k = 0; k < nbytes; ++k) word |= static_cast<uint64_t>(in[k]) << (8 * k);
    for (int32_t j = 0; j < 8; ++j) c[e + j] = static_cast<uint8_t>((word >> (j * BITS)) & mask);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* rc = c + (r - r0) * cols;
    T* row = out + r * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
      const float l = lo[r * groups + g], st = scale[r * groups + g];
      for (int64_t k = c0; k < c1; ++k) row[k] = static_cast<T>(fewbit::dequantize_affine(rc[k], l, st));
    }
  }
}

torch::Tensor unpack_dequantize(const torch::Tensor& packed, const torch::Tensor& lo, const torch::Tensor& scale,
                                int64_t bits, int64_t cols, int64_t group_size, at::ScalarType dtype) {
  check_bits(bits);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.device().is_cpu(), "packed must be a CPU uint8 tensor");
  TORCH_CHECK(lo.dim() == 2, "lo must be 2-D [rows, groups]");
  const int64_t rows = lo.size(0);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  fewbit::check_group_tables(lo, scale, rows, groups);
  const int64_t n = rows * cols;
  TORCH_CHECK(packed.numel() >= fewbit::packed_nbytes(n, static_cast<int32_t>(bits)), "packed is too short");
  auto out = torch::empty({rows, cols}, lo.options().dtype(dtype));
  if (n == 0) return out;
  const auto pc = packed.contiguous(), lc = lo.contiguous(), sc = scale.contiguous();
  const uint8_t* src = pc.data_ptr<uint8_t>();
  const float* plo = lc.data_ptr<float>();
  const float* psc = sc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fewbit_unpack_dequantize", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    fewbit::dispatch_bits(bits, [&](auto B) {
      constexpr int BITS = decltype(B)::value;
      const int64_t blocks = (rows + 7) / 8;
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (8 * cols));
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        std::vector<uint8_t> codes;
        for (int64_t b = b0; b < b1; ++b) {  // 8 rows of cols codes fill cols * BITS bytes
          dequantize_rows<BITS, scalar_t>(src + b * cols * BITS, b * 8, std::min(rows, b * 8 + 8), cols,
                                          group_size, groups, plo, psc, dst, codes);
        }
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The fused group quantizer: group ranges, uniforms, codes and packing in one pass over a [rows, cols] input
// of any dtype and strides (no copy, no noise tensor). Work is split into blocks of eight rows (8 * cols
// codes: a whole number of bytes, so no two tasks share a byte). A row is converted to float32 once into a
// row buffer (it stays in cache), its uniforms are hashed in a plain uint32 loop that vectorizes, then each
// group's range is taken and its codes computed; the row's codes are streamed into the packed output.

template <int BITS>
struct CodeStream {  // appends codes to a packed stream that starts on a byte boundary
  uint8_t* out;
  uint8_t carry[8];
  int32_t ncarry = 0;

  void put8(const uint8_t* c) {
    uint64_t word = 0;
    for (int32_t j = 0; j < 8; ++j) word |= static_cast<uint64_t>(c[j]) << (j * BITS);
    for (int32_t k = 0; k < BITS; ++k) out[k] = static_cast<uint8_t>(word >> (8 * k));
    out += BITS;
  }

  void push(const uint8_t* codes, int64_t n) {
    int64_t i = 0;
    if (ncarry) {
      while (ncarry < 8 && i < n) carry[ncarry++] = codes[i++];
      if (ncarry < 8) return;
      put8(carry);
      ncarry = 0;
    }
    for (; i + 8 <= n; i += 8) put8(codes + i);
    while (i < n) carry[ncarry++] = codes[i++];
  }

  void finish() {  // the last, partial unit of the tensor
    if (!ncarry) return;
    uint32_t c[8];
    for (int32_t j = 0; j < ncarry; ++j) c[j] = carry[j];
    fewbit::pack_group(c, ncarry, BITS, out);
    ncarry = 0;
  }
};

struct RowBuffers {
  std::vector<float> x, u;
  std::vector<uint8_t> codes;
  explicit RowBuffers(int64_t cols, bool stochastic) : x(cols), u(stochastic ? cols : 0), codes(cols) {}
};

// Min and max of xf[c0, c1) (NaN for both if any value is NaN): eight independent lanes, so the loop
// vectorizes; the same values as fewbit::group_minmax (min and max do not depend on the order).
inline void row_group_minmax(const float* xf, int64_t c0, int64_t c1, float* mn, float* mx) {
  const float inf = fewbit::bits_float(0x7F800000u);
  float lo[8], hi[8];
  int32_t nan[8];
  for (int32_t j = 0; j < 8; ++j) {
    lo[j] = inf;
    hi[j] = -inf;
    nan[j] = 0;
  }
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    for (int32_t j = 0; j < 8; ++j) {
      const float v = xf[c + j];
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
      nan[j] |= v != v;
    }
  }
  for (int32_t j = 0; c + j < c1; ++j) {
    const float v = xf[c + j];
    lo[j] = v < lo[j] ? v : lo[j];
    hi[j] = v > hi[j] ? v : hi[j];
    nan[j] |= v != v;
  }
  float l = lo[0], h = hi[0];
  int32_t any = nan[0];
  for (int32_t j = 1; j < 8; ++j) {
    l = lo[j] < l ? lo[j] : l;
    h = hi[j] > h ? hi[j] : h;
    any |= nan[j];
  }
  const float qnan = fewbit::bits_float(0x7FC00000u);
  *mn = any ? qnan : l;
  *mx = any ? qnan : h;
}

template <int BITS, typename T>
__attribute__((always_inline)) inline void quantize_groups_rows_body(
    const T* x, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t cols, int64_t group_size, int64_t groups,
    bool stochastic, fewbit::UniformKey key, float* lo, float* scale, uint8_t* out, RowBuffers& buf) {
  CodeStream<BITS> stream{out};
  float* xf = buf.x.data();
  float* u = buf.u.data();
  uint8_t* codes = buf.codes.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * s0;
    if (s1 == 1) {
      for (int64_t c = 0; c < cols; ++c) xf[c] = static_cast<float>(row[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) xf[c] = static_cast<float>(row[c * s1]);
    }
    if (stochastic) {
      const uint64_t base = static_cast<uint64_t>(r) * static_cast<uint64_t>(cols);
      const uint32_t lo32 = static_cast<uint32_t>(base);
      if (static_cast<uint64_t>(lo32) + static_cast<uint64_t>(cols) <= (uint64_t{1} << 32)) {
        // the counter's high half is the same along the row: pure uint32 arithmetic
        const uint32_t hik = static_cast<uint32_t>(base >> 32) + key.k1;
        const uint32_t k0 = key.k0;
        for (int64_t c = 0; c < cols; ++c) {
          u[c] = fewbit::uniform24(fewbit::counter_hash(k0, lo32 + static_cast<uint32_t>(c), hik));
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) u[c] = fewbit::uniform_at(key, base + static_cast<uint64_t>(c));
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
      float mn, mx;
      row_group_minmax(xf, c0, c1, &mn, &mx);
      const float st = fewbit::group_step(mn, mx, BITS);
      lo[r * groups + g] = mn;
      scale[r * groups + g] = st;
      if (stochastic) {
        for (int64_t c = c0; c < c1; ++c) {
          codes[c] = static_cast<uint8_t>(fewbit::quantize_affine(xf[c], mn, st, u[c], BITS));
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          codes[c] = static_cast<uint8_t>(fewbit::quantize_affine(xf[c], mn, st, 0.5f, BITS));
        }
      }
    }
    stream.push(codes, cols);
  }
  stream.finish();
}

// The same loop compiled twice: for the build's baseline and, where the CPU has it, AVX2 (8-wide integer
// multiplies for the hash). Both give the same bytes: no fused multiply-add, IEEE float32 either way.
template <int BITS, typename T>
void quantize_groups_rows(const T* x, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t cols,
                          int64_t group_size, int64_t groups, bool stochastic, fewbit::UniformKey key, float* lo,
                          float* scale, uint8_t* out, RowBuffers& buf) {
  quantize_groups_rows_body<BITS, T>(x, s0, s1, r0, r1, cols, group_size, groups, stochastic, key, lo, scale, out,
                                     buf);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FEWBIT_HAVE_AVX2_PATH 1
template <int BITS, typename T>
__attribute__((target("avx2"))) void quantize_groups_rows_avx2(
    const T* x, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t cols, int64_t group_size, int64_t groups,
    bool stochastic, fewbit::UniformKey key, float* lo, float* scale, uint8_t* out, RowBuffers& buf) {
  quantize_groups_rows_body<BITS, T>(x, s0, s1, r0, r1, cols, group_size, groups, stochastic, key, lo, scale, out,
                                     buf);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// The CUDA kernel's decomposition run serially (spans of `span` elements, their group ranges, then units of
// eight through fewbit::quantize_unit): the tests run it on the CPU, so the GPU's indexing is checked here.
template <int BITS, typename T>
void quantize_groups_spans_serial(const T* x, int64_t s0, int64_t s1, int64_t n, int64_t cols, int64_t group_size,
                                  int64_t groups, bool stochastic, fewbit::UniformKey key, float* lo, float* scale,
                                  uint8_t* out, int64_t span) {
  std::vector<float> slo, ssc;
  for (int64_t s = 0; s < n; s += span) {
    const int64_t e = std::min(n, s + span);
    int64_t g0, g1;
    fewbit::span_groups(s, e, cols, group_size, groups, &g0, &g1);
    slo.resize(g1 - g0 + 1);
    ssc.resize(g1 - g0 + 1);
    for (int64_t grp = g0; grp <= g1; ++grp) {
      const int64_t row = grp / groups, c0 = (grp - row * groups) * group_size;
      float mn, mx;
      fewbit::group_minmax(x + row * s0, s1, c0, std::min(cols, c0 + group_size), 0, 1, &mn, &mx);
      slo[grp - g0] = mn;
      ssc[grp - g0] = fewbit::group_step(mn, mx, BITS);
      if (row * cols + c0 >= s) {  // the span holding the group's first element writes its entry
        lo[grp] = mn;
        scale[grp] = ssc[grp - g0];
      }
    }
    int64_t rs, cs;
    fewbit::locate(s, cols, &rs, &cs);
    for (int64_t e0 = s; e0 < e; e0 += 8) {
      int64_t dr, c;
      fewbit::locate(cs + (e0 - s), cols, &dr, &c);
      fewbit::quantize_unit<BITS, T>(x, s0, s1, cols, group_size, groups, e0,
                                     static_cast<int32_t>(std::min<int64_t>(8, e - e0)), rs + dr, c, slo.data(),
                                     ssc.data(), g0, stochastic, key, out);
    }
  }
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups_impl(
    const torch::Tensor& input, int64_t bits, int64_t group_size, const c10::optional<torch::Tensor>& seed,
    int64_t span) {
  check_bits(bits);
  TORCH_CHECK(input.device().is_cpu(), "fewbit_cpu: tensors must be on the CPU");
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [rows, cols]");
  const int64_t rows = input.size(0), cols = input.size(1);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  const bool stochastic = seed.has_value();
  fewbit::UniformKey key{0u, 0u};
  if (stochastic) {
    TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == torch::kLong && seed->numel() == 1,
                "seed must be a CPU int64 tensor of one element");
    key = fewbit::uniform_key(seed->contiguous().data_ptr<int64_t>()[0]);
  }
  const auto f32 = input.options().dtype(torch::kFloat);
  auto lo = torch::empty({rows, groups}, f32), scale = torch::empty({rows, groups}, f32);
  const int64_t n = rows * cols;
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))}, input.options().dtype(torch::kUInt8));
  if (n == 0) return {out, lo, scale};
  const int64_t s0 = input.stride(0), s1 = input.stride(1);
  uint8_t* dst = out.data_ptr<uint8_t>();
  float* plo = lo.data_ptr<float>();
  float* psc = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fewbit_quantize_groups", [&] {
    const scalar_t* src = input.data_ptr<scalar_t>();
    fewbit::dispatch_bits(bits, [&](auto B) {
      constexpr int BITS = decltype(B)::value;
      if (span > 0) {
        quantize_groups_spans_serial<BITS>(src, s0, s1, n, cols, group_size, groups, stochastic, key, plo, psc, dst,
                                           span);
        return;
      }
      const int64_t blocks = (rows + 7) / 8;
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (8 * cols));
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        RowBuffers buf(cols, stochastic);
        const int64_t r0 = b0 * 8, r1 = std::min(rows, b1 * 8);
        uint8_t* block = dst + b0 * cols * BITS;  // 8 rows of cols codes fill cols * BITS bytes
#ifdef FEWBIT_HAVE_AVX2_PATH
        if (cpu_has_avx2()) {
          quantize_groups_rows_avx2<BITS>(src, s0, s1, r0, r1, cols, group_size, groups, stochastic, key, plo, psc,
                                          block, buf);
          return;
        }
#endif
        quantize_groups_rows<BITS>(src, s0, s1, r0, r1, cols, group_size, groups, stochastic, key, plo, psc, block,
                                   buf);
      });
    });
  });
  return {out, lo, scale};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups(
    const torch::Tensor& input, int64_t bits, int64_t group_size, const c10::optional<torch::Tensor>& seed) {
  return quantize_groups_impl(input, bits, group_size, seed, 0);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups_spans(
    const torch::Tensor& input, int64_t bits, int64_t group_size, const c10::optional<torch::Tensor>& seed,
    int64_t span) {
  TORCH_CHECK(span >= 8 && span % 8 == 0, "span must be a positive multiple of 8, got ", span);
  return quantize_groups_impl(input, bits, group_size, seed, span);
}

// The indexing arithmetic, exposed so tests can check it past 2^31 bits without allocating that much.
std::tuple<int64_t, int64_t> bit_position(int64_t element, int64_t bits) {
  check_bits(bits);
  const auto p = fewbit::bit_position(element, static_cast<int32_t>(bits));
  return {p.byte, p.shift};
}

}  // namespace

#ifndef FEWBIT_BUILD_HASH
#define FEWBIT_BUILD_HASH unknown  // the build passes fewbit_dist.ops.buildinfo.build_hash
#endif
#define FEWBIT_STRINGIFY_(x) #x
#define FEWBIT_STRINGIFY(x) FEWBIT_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fewbit_dist CPU kernels";
  m.attr("build_hash") = FEWBIT_STRINGIFY(FEWBIT_BUILD_HASH);
  m.def("encode_pack", &encode_pack, "codes of input against borders, packed at bits per element");
  m.def("unpack_scale", &unpack_scale, "levels[code] * grad, computed in the compute dtype");
  m.def("quantize_pack", &quantize_pack, "group-affine codes of a [rows, cols] input, packed at bits per element");
  m.def("unpack_dequantize", &unpack_dequantize, "lo + code * scale as a [rows, cols] tensor of dtype");
  m.def("quantize_groups", &quantize_groups,
        "(packed, lo, scale): group ranges, codes (stochastic from a seed, or nearest) and packing in one pass");
  m.def("quantize_groups_spans", &quantize_groups_spans,
        "quantize_groups through the CUDA kernel's decomposition into spans, run serially (for tests)");
  m.def("bit_position", &bit_position, "(byte, shift) of an element's first bit");
}

// CPU kernels: few-bit activations (encode + pack in forward, unpack + scale in backward) and the
// group-affine quantization of LowBitLinear inputs (quantize + pack, unpack + dequantize).
// The arithmetic is csrc/include/fewbit/core.h, the same the CUDA kernels run. Work is split into whole
// groups of eight elements (b bytes each), so threads never share a byte.
#include <torch/extension.h>

#include <ATen/Parallel.h>

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
      uint32_t codes[8];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t first = g * 8;
        const int32_t count = static_cast<int32_t>(std::min<int64_t>(8, n - first));
        for (int32_t j = 0; j < count; ++j) {
          const int64_t e = first + j;
          const int64_t gi = fewbit::group_index(e, cols, group_size, groups);
          const float u = pu ? pu[e] : 0.5f;
          codes[j] = fewbit::quantize_affine(static_cast<float>(src[e]), plo[gi], psc[gi], u, b);
        }
        fewbit::pack_group(codes, count, b, dst + g * b);
      }
    });
  });
  return out;
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
  const int32_t b = static_cast<int32_t>(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fewbit_unpack_dequantize", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 7) / 8, kGrain, [&](int64_t g0, int64_t g1) {
      uint32_t codes[8];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t first = g * 8;
        const int32_t count = static_cast<int32_t>(std::min<int64_t>(8, n - first));
        fewbit::unpack_group(src + g * b, count, b, codes);
        for (int32_t j = 0; j < count; ++j) {
          const int64_t gi = fewbit::group_index(first + j, cols, group_size, groups);
          dst[first + j] = static_cast<scalar_t>(fewbit::dequantize_affine(codes[j], plo[gi], psc[gi]));
        }
      }
    });
  });
  return out;
}

// The indexing arithmetic, exposed so tests can check it past 2^31 bits without allocating that much.
std::tuple<int64_t, int64_t> bit_position(int64_t element, int64_t bits) {
  check_bits(bits);
  const auto p = fewbit::bit_position(element, static_cast<int32_t>(bits));
  return {p.byte, p.shift};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fewbit_dist CPU kernels";
  m.def("encode_pack", &encode_pack, "codes of input against borders, packed at bits per element");
  m.def("unpack_scale", &unpack_scale, "levels[code] * grad, computed in the compute dtype");
  m.def("quantize_pack", &quantize_pack, "group-affine codes of a [rows, cols] input, packed at bits per element");
  m.def("unpack_dequantize", &unpack_dequantize, "lo + code * scale as a [rows, cols] tensor of dtype");
  m.def("bit_position", &bit_position, "(byte, shift) of an element's first bit");
}

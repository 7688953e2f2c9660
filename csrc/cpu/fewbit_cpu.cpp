// CPU kernels of the few-bit activations: quantize + pack in forward, unpack + scale in backward.
// The arithmetic is csrc/include/fewbit/core.h, the same the CUDA kernels run. Work is split into whole
// groups of eight elements (b bytes each), so threads never share a byte.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fewbit/core.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // groups per task: large enough to amortize the thread pool

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
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
  const int64_t groups = (n + 7) / 8;
  uint8_t* dst = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewbit_encode_pack", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(borders.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "borders must be in the compute dtype (float64 for float64 input, else float32)");
    const scalar_t* src = x.data_ptr<scalar_t>();
    const acc_t* b = borders.data_ptr<acc_t>();
    const int32_t nb = static_cast<int32_t>(bits);
    at::parallel_for(0, groups, kGrain, [&](int64_t g0, int64_t g1) {
      uint32_t codes[8];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t first = g * 8;
        const int32_t count = static_cast<int32_t>(std::min<int64_t>(8, n - first));
        for (int32_t j = 0; j < count; ++j) {
          codes[j] = fewbit::encode<acc_t>(static_cast<acc_t>(src[first + j]), b, nb);
        }
        fewbit::pack_group(codes, count, nb, dst + g * nb);
      }
    });
  });
  return out;
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
  const int64_t groups = (n + 7) / 8;
  const uint8_t* src = packed.contiguous().data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fewbit_unpack_scale", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(levels.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "levels must be in the compute dtype (float64 for float64 gradients, else float32)");
    const scalar_t* gin = g.data_ptr<scalar_t>();
    const acc_t* lv = levels.data_ptr<acc_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int32_t nb = static_cast<int32_t>(bits);
    at::parallel_for(0, groups, kGrain, [&](int64_t g0, int64_t g1) {
      uint32_t codes[8];
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t first = grp * 8;
        const int32_t count = static_cast<int32_t>(std::min<int64_t>(8, n - first));
        fewbit::unpack_group(src + grp * nb, count, nb, codes);
        for (int32_t j = 0; j < count; ++j) {
          dst[first + j] = static_cast<scalar_t>(lv[codes[j]] * static_cast<acc_t>(gin[first + j]));
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
  m.def("bit_position", &bit_position, "(byte, shift) of an element's first bit");
}

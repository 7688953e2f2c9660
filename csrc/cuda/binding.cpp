// Python binding of the CUDA kernels (kept out of the .cu file: pybind11 is compiled by the host compiler).
#include <torch/extension.h>

torch::Tensor encode_pack_cuda(const torch::Tensor& input, const torch::Tensor& borders, int64_t bits);
torch::Tensor unpack_scale_cuda(const torch::Tensor& packed, const torch::Tensor& levels, const torch::Tensor& grad,
                                int64_t bits);
torch::Tensor quantize_pack_cuda(const torch::Tensor& input, const torch::Tensor& lo, const torch::Tensor& scale,
                                 const c10::optional<torch::Tensor>& noise, int64_t bits, int64_t group_size);
torch::Tensor unpack_dequantize_cuda(const torch::Tensor& packed, const torch::Tensor& lo, const torch::Tensor& scale,
                                     int64_t bits, int64_t cols, int64_t group_size, at::ScalarType dtype);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups_cuda(
    const torch::Tensor& input, int64_t bits, int64_t group_size, const c10::optional<torch::Tensor>& seed);

#ifndef FEWBIT_BUILD_HASH
#define FEWBIT_BUILD_HASH unknown  // the build passes fewbit_dist.ops.buildinfo.build_hash
#endif
#define FEWBIT_STRINGIFY_(x) #x
#define FEWBIT_STRINGIFY(x) FEWBIT_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fewbit_dist CUDA kernels";
  m.attr("build_hash") = FEWBIT_STRINGIFY(FEWBIT_BUILD_HASH);
  m.def("encode_pack", &encode_pack_cuda, "codes of input against borders, packed at bits per element");
  m.def("unpack_scale", &unpack_scale_cuda, "levels[code] * grad, computed in the compute dtype");
  m.def("quantize_pack", &quantize_pack_cuda, "group-affine codes of a [rows, cols] input, packed at bits per element");
  m.def("quantize_groups", &quantize_groups_cuda,
        "(packed, lo, scale): group ranges, codes (stochastic from a seed, or nearest) and packing in one pass");
  m.def("unpack_dequantize", &unpack_dequantize_cuda, "lo + code * scale as a [rows, cols] tensor of dtype");
}

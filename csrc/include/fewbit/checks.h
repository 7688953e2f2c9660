// Argument checks shared by the CPU and CUDA bindings (host code only: it uses torch's tensors).
#pragma once

#include <torch/types.h>

namespace fewbit {

// LowBitLinear's per-group tables: float32 lo and scale, both [rows, ceil(cols / group_size)].
inline void check_group_tables(const torch::Tensor& lo, const torch::Tensor& scale, int64_t rows, int64_t groups) {
  TORCH_CHECK(lo.scalar_type() == torch::kFloat && scale.scalar_type() == torch::kFloat,
              "lo and scale must be float32");
  TORCH_CHECK(lo.dim() == 2 && lo.size(0) == rows && lo.size(1) == groups && scale.sizes() == lo.sizes(),
              "lo and scale must be [rows, ceil(cols / group_size)] = [", rows, ", ", groups, "]");
}

inline int64_t groups_per_row(int64_t cols, int64_t group_size) {
  TORCH_CHECK(group_size >= 1 && cols >= 0, "group_size must be >= 1 and cols >= 0");
  return cols == 0 ? 0 : (cols + group_size - 1) / group_size;
}

}  // namespace fewbit

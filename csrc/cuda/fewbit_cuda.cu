// CUDA kernels of the few-bit activations and of LowBitLinear's input quantization: the same arithmetic
// as the CPU kernels (fewbit/core.h).
// One thread handles one group of eight elements (b packed bytes), so no two threads write one byte; the
// borders sit in shared memory. Launched on the current stream under a device guard.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "fewbit/checks.h"
#include "fewbit/core.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t blocks_for(int64_t groups) {
  const int64_t b = (groups + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(b, int64_t{1} << 20));
}

template <int BITS, typename T, typename Acc>
__global__ void encode_pack_kernel(const T* __restrict__ x, const Acc* __restrict__ borders,
                                   uint8_t* __restrict__ out, int64_t n) {
  __shared__ Acc sb[(1 << BITS) - 1];
  for (int i = threadIdx.x; i < (1 << BITS) - 1; i += blockDim.x) sb[i] = borders[i];
  __syncthreads();
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = g * 8;
    const int32_t count = static_cast<int32_t>(min(static_cast<int64_t>(8), n - first));
    uint32_t codes[8];
#pragma unroll
    for (int32_t j = 0; j < 8; ++j) {
      codes[j] = j < count ? fewbit::encode_fixed<BITS, Acc>(static_cast<Acc>(x[first + j]), sb) : 0u;
    }
    fewbit::pack_group(codes, count, BITS, out + g * BITS);
  }
}

template <int BITS, typename T, typename Acc>
__global__ void unpack_scale_kernel(const uint8_t* __restrict__ packed, const Acc* __restrict__ levels,
                                    const T* __restrict__ grad, T* __restrict__ out, int64_t n) {
  __shared__ Acc sl[1 << BITS];
  for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) sl[i] = levels[i];
  __syncthreads();
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = g * 8;
    const int32_t count = static_cast<int32_t>(min(static_cast<int64_t>(8), n - first));
    uint32_t codes[8];
    fewbit::unpack_group(packed + g * BITS, count, BITS, codes);
    for (int32_t j = 0; j < count; ++j) {
      out[first + j] = static_cast<T>(sl[codes[j]] * static_cast<Acc>(grad[first + j]));
    }
  }
}

// LowBitLinear: one thread per group of eight elements, as above; the group table entry found once per unit
// and advanced by comparison (fewbit::GroupCursor).
template <typename T>
__global__ void quantize_pack_kernel(const T* __restrict__ x, const float* __restrict__ lo,
                                     const float* __restrict__ scale, const float* __restrict__ noise,
                                     uint8_t* __restrict__ out, int64_t n, int64_t cols, int64_t group_size,
                                     int64_t groups_per_row, int32_t bits) {
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fewbit::quantize_pack_unit(x, noise, g * 8, static_cast<int32_t>(min(static_cast<int64_t>(8), n - g * 8)), bits,
                               cols, group_size, groups_per_row, lo, scale, out);
  }
}

// The fused group quantizer. One block per span of kSpan consecutive flat elements (a multiple of 8, so
// spans never share a byte): first its warps take the min and max of every group the span touches (a warp
// per group, lanes striding along the row, coalesced; an edge group that starts in an earlier span is read
// again here but written by that span), into shared memory; then each thread quantizes and packs units of
// eight elements through fewbit::quantize_unit, reading the input a second time from cache, not from memory
// in a second kernel. csrc/cpu runs the same decomposition serially (quantize_groups_spans) in the tests.
constexpr int64_t kSpan = 4096;  // touches at most kSpan group entries: 32 KiB of shared memory

template <int BITS, typename T>
__global__ void quantize_groups_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t n, int64_t cols,
                                       int64_t group_size, int64_t groups, const int64_t* __restrict__ seed_ptr,
                                       int64_t seed_value, bool stochastic, float* __restrict__ lo,
                                       float* __restrict__ scale, uint8_t* __restrict__ out) {
  __shared__ float slo[kSpan];
  __shared__ float ssc[kSpan];
  const fewbit::UniformKey key = fewbit::uniform_key(stochastic && seed_ptr != nullptr ? *seed_ptr : seed_value);
  const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t s = blockIdx.x * kSpan; s < n; s += static_cast<int64_t>(gridDim.x) * kSpan) {
    const int64_t e = min(n, s + kSpan);
    int64_t g0, g1;
    fewbit::span_groups(s, e, cols, group_size, groups, &g0, &g1);
    for (int64_t grp = g0 + warp; grp <= g1; grp += warps) {  // warp-uniform loop: full-mask shuffles
      const int64_t row = grp / groups, c0 = (grp - row * groups) * group_size;  // once per group
      float mn, mx;
      fewbit::group_minmax(x + row * s0, s1, c0, min(cols, c0 + group_size), lane, 32, &mn, &mx);
      for (int32_t off = 16; off > 0; off >>= 1) {
        mn = fewbit::nan_min(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, off));
        mx = fewbit::nan_max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
      }
      if (lane == 0) {
        const float st = fewbit::group_step(mn, mx, BITS);
        slo[grp - g0] = mn;
        ssc[grp - g0] = st;
        if (row * cols + c0 >= s) {  // the span holding the group's first element writes its entry
          lo[grp] = mn;
          scale[grp] = st;
        }
      }
    }
    __syncthreads();
    int64_t rs, cs;
    fewbit::locate(s, cols, &rs, &cs);
    for (int64_t e0 = s + 8 * static_cast<int64_t>(threadIdx.x); e0 < e; e0 += 8 * static_cast<int64_t>(blockDim.x)) {
      int64_t dr, c;
      fewbit::locate(cs + (e0 - s), cols, &dr, &c);
      fewbit::quantize_unit<BITS, T>(x, s0, s1, cols, group_size, groups, e0,
                                     static_cast<int32_t>(min(static_cast<int64_t>(8), e - e0)), rs + dr, c, slo, ssc,
                                     g0, stochastic, key, out);
    }
    __syncthreads();  // the shared ranges are rewritten for the next span
  }
}

template <typename T>
__global__ void unpack_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ lo,
                                         const float* __restrict__ scale, T* __restrict__ out, int64_t n,
                                         int64_t cols, int64_t group_size, int64_t groups_per_row, int32_t bits) {
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fewbit::dequantize_unit(packed, g * 8, static_cast<int32_t>(min(static_cast<int64_t>(8), n - g * 8)), bits, cols,
                            group_size, groups_per_row, lo, scale, out);
  }
}

}  // namespace

torch::Tensor encode_pack_cuda(const torch::Tensor& input, const torch::Tensor& borders, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(input.is_cuda() && borders.is_cuda(), "fewbit_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(borders.dim() == 1 && borders.numel() == (int64_t{1} << bits) - 1,
              "borders must hold 2**bits - 1 values, got ", borders.numel());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto x = input.contiguous();
  const auto b = borders.contiguous();
  const int64_t n = x.numel();
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))}, x.options().dtype(torch::kUInt8));
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t groups = (n + 7) / 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewbit_encode_pack_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(b.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "borders must be in the compute dtype");
    fewbit::dispatch_bits(bits, [&](auto B) {
      encode_pack_kernel<decltype(B)::value, scalar_t, acc_t><<<blocks_for(groups), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), b.data_ptr<acc_t>(), out.data_ptr<uint8_t>(), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor unpack_scale_cuda(const torch::Tensor& packed, const torch::Tensor& levels, const torch::Tensor& grad,
                                int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(packed.is_cuda() && levels.is_cuda() && grad.is_cuda(), "fewbit_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "packed must be uint8");
  TORCH_CHECK(levels.dim() == 1 && levels.numel() == (int64_t{1} << bits), "levels must hold 2**bits values");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  const auto p = packed.contiguous();
  const auto l = levels.contiguous();
  const int64_t n = g.numel();
  TORCH_CHECK(p.numel() >= fewbit::packed_nbytes(n, static_cast<int32_t>(bits)), "packed is too short");
  auto out = torch::empty_like(g);
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t groups = (n + 7) / 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fewbit_unpack_scale_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    TORCH_CHECK(l.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "levels must be in the compute dtype");
    fewbit::dispatch_bits(bits, [&](auto B) {
      unpack_scale_kernel<decltype(B)::value, scalar_t, acc_t><<<blocks_for(groups), kThreads, 0, stream>>>(
          p.data_ptr<uint8_t>(), l.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


torch::Tensor quantize_pack_cuda(const torch::Tensor& input, const torch::Tensor& lo, const torch::Tensor& scale,
                                 const c10::optional<torch::Tensor>& noise, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(input.is_cuda() && lo.is_cuda() && scale.is_cuda(), "fewbit_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [rows, cols]");
  const int64_t rows = input.size(0), cols = input.size(1);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  fewbit::check_group_tables(lo, scale, rows, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto x = input.contiguous();
  const auto lc = lo.contiguous(), sc = scale.contiguous();
  torch::Tensor nc;
  if (noise.has_value()) {
    TORCH_CHECK(noise->is_cuda() && noise->scalar_type() == torch::kFloat && noise->sizes() == input.sizes(),
                "noise must be a float32 CUDA tensor with the input's shape");
    nc = noise->contiguous();
  }
  const int64_t n = x.numel();
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))}, x.options().dtype(torch::kUInt8));
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewbit_quantize_pack_cuda", [&] {
    quantize_pack_kernel<scalar_t><<<blocks_for((n + 7) / 8), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), lc.data_ptr<float>(), sc.data_ptr<float>(),
        nc.defined() ? nc.data_ptr<float>() : nullptr, out.data_ptr<uint8_t>(), n, cols, group_size, groups,
        static_cast<int32_t>(bits));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor unpack_dequantize_cuda(const torch::Tensor& packed, const torch::Tensor& lo, const torch::Tensor& scale,
                                     int64_t bits, int64_t cols, int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(packed.is_cuda() && lo.is_cuda() && scale.is_cuda(), "fewbit_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "packed must be uint8");
  TORCH_CHECK(lo.dim() == 2, "lo must be 2-D [rows, groups]");
  const int64_t rows = lo.size(0);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  fewbit::check_group_tables(lo, scale, rows, groups);
  const int64_t n = rows * cols;
  TORCH_CHECK(packed.numel() >= fewbit::packed_nbytes(n, static_cast<int32_t>(bits)), "packed is too short");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = torch::empty({rows, cols}, lo.options().dtype(dtype));
  if (n == 0) return out;
  const auto pc = packed.contiguous(), lc = lo.contiguous(), sc = scale.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fewbit_unpack_dequantize_cuda", [&] {
    unpack_dequantize_kernel<scalar_t><<<blocks_for((n + 7) / 8), kThreads, 0, stream>>>(
        pc.data_ptr<uint8_t>(), lc.data_ptr<float>(), sc.data_ptr<float>(), out.data_ptr<scalar_t>(), n, cols,
        group_size, groups, static_cast<int32_t>(bits));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups_cuda(
    const torch::Tensor& input, int64_t bits, int64_t group_size, const c10::optional<torch::Tensor>& seed) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(input.is_cuda(), "fewbit_cuda: input must be on a CUDA device");
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [rows, cols]");
  const int64_t rows = input.size(0), cols = input.size(1);
  const int64_t groups = fewbit::groups_per_row(cols, group_size);
  const bool stochastic = seed.has_value();
  const int64_t* seed_ptr = nullptr;
  int64_t seed_value = 0;
  torch::Tensor seed_dev;
  if (stochastic) {
    TORCH_CHECK(seed->scalar_type() == torch::kLong && seed->numel() == 1, "seed must be an int64 tensor of one element");
    if (seed->is_cuda()) {  // read by the kernel: no host synchronization
      TORCH_CHECK(seed->device() == input.device(), "seed must be on the CPU or on the input's device");
      seed_dev = seed->contiguous();
      seed_ptr = seed_dev.data_ptr<int64_t>();
    } else {
      seed_value = seed->contiguous().data_ptr<int64_t>()[0];  // a host value: read on the host
    }
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const auto f32 = input.options().dtype(torch::kFloat);
  auto lo = torch::empty({rows, groups}, f32), scale = torch::empty({rows, groups}, f32);
  const int64_t n = rows * cols;
  auto out = torch::empty({fewbit::packed_nbytes(n, static_cast<int32_t>(bits))}, input.options().dtype(torch::kUInt8));
  if (n == 0) return {out, lo, scale};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t spans = (n + kSpan - 1) / kSpan;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(spans, int64_t{1} << 20));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fewbit_quantize_groups_cuda", [&] {
    fewbit::dispatch_bits(bits, [&](auto B) {
      quantize_groups_kernel<decltype(B)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(
          input.data_ptr<scalar_t>(), input.stride(0), input.stride(1), n, cols, group_size, groups, seed_ptr,
          seed_value, stochastic, lo.data_ptr<float>(), scale.data_ptr<float>(), out.data_ptr<uint8_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lo, scale};
}

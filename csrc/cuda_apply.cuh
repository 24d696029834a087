// The CUDA apply of the ops (see ops.h), after apex's multi_tensor_apply: one launch of apply_kernel per group of up
// to kMaxTensors tensors of one dtype, whose descriptors travel in the kernel arguments (nothing is copied to the
// device, nothing syncs with the host); each block runs the op's row functor on its share of one tensor's rows, and
// the functors' per-block shares of the per-tensor sums are reduced per tensor in block order by a second launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <vector>

#include "common.h"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {

// A launch's arguments: its tensors (descriptor T of the op, and whether its rows are read in 16-byte packs), the op's
// arguments and how many of the functor's sums the launch keeps.
template <typename T, typename Args>
struct Launch {
  Segments segments;
  T tensors[kMaxTensors];
  bool packed[kMaxTensors];
  Args args;
  int sums;
};

// Runs Rows (the op's functor for one dtype) on this block's rows; partial: [sums, blocks], the block's share of each
// kept sum. The functor's kBlocksPerSm bounds its registers so that that many blocks fit on an SM; its kSums, the most
// sums it returns, leaves out the reductions it never needs (restore: none, no barrier). The functors are named
// <op>_kernel so that the kernel's name, apply_kernel<scan_kernel<float>, ...>, says which op it runs (profilers,
// cuobjdump, tests/test_ext.py).
template <typename Rows, typename T, typename Args>
__global__ void __launch_bounds__(kThreads, Rows::kBlocksPerSm) apply_kernel(Launch<T, Args> launch, double* partial) {
  const BlockPlace place = place_block(launch.segments);
  const Sums shares = Rows{}(place, launch.tensors[place.slot], launch.args, launch.segments.index[place.slot],
                             launch.packed[place.slot]);
#pragma unroll
  for (int s = 0; s < Rows::kSums; ++s) {  // unrolled: shares stays in registers
    if (s == launch.sums) break;
    const double total = block_sum(shares.value[s]);
    if (threadIdx.x == 0) partial[s * gridDim.x + blockIdx.x] = total;
  }
}

// out[index[s] * columns + c] = the sum, in block order, of partial[c * blocks + b] over the blocks b of slot s. One
// block per (slot, column): the per-tensor totals without atomics, so they are the same bits on every run.
template <typename out_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(Segments segments, const double* partial, out_t* out) {
  const int slot = blockIdx.x, column = blockIdx.y, columns = gridDim.y;
  const double* values = partial + column * segments.blocks();
  double total = 0;
  for (int64_t b = segments.block_offset[slot] + threadIdx.x; b < segments.block_offset[slot + 1]; b += kThreads) {
    total += values[b];
  }
  total = block_sum(total);
  if (threadIdx.x == 0) out[segments.index[slot] * columns + column] = static_cast<out_t>(total);
}

template <typename out_t>
inline void sum_partials(const Segments& segments, const at::Tensor& partial, int columns, out_t* out,
                         cudaStream_t stream) {
  sum_partials_kernel<out_t>
      <<<dim3(segments.n, columns), kThreads, 0, stream>>>(segments, partial.const_data_ptr<double>(), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The op's tensor indices grouped into launches: one dtype per launch (the functors are templates on it), at most
// kMaxTensors tensors each, in order.
template <typename T>
std::vector<std::vector<int>> launch_groups(const std::vector<Work<T>>& work) {
  std::map<at::ScalarType, std::vector<int>> by_dtype;
  for (size_t i = 0; i < work.size(); ++i) by_dtype[work[i].dtype].push_back(static_cast<int>(i));
  std::vector<std::vector<int>> groups;
  for (const auto& [dtype, indices] : by_dtype) {
    for (size_t start = 0; start < indices.size(); start += kMaxTensors) {
      groups.emplace_back(indices.begin() + start,
                          indices.begin() + std::min(indices.size(), start + static_cast<size_t>(kMaxTensors)));
    }
  }
  return groups;
}

struct Device {
  // Launches Rows<scalar_t> over every tensor of `work` (on `device`, on its current stream), one launch per dtype
  // group, and writes the sums of the first `sums` shares the functor returns to out[i][0..sums) (out: float64 or
  // float32 on `device`, undefined without sums).
  template <template <typename> class Rows, typename T, typename Args>
  static void apply(const at::Device& device, const std::vector<Work<T>>& work, const Args& args, int sums,
                    const at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for (const auto& group : launch_groups(work)) {
      FASTADV_DISPATCH_FLOATING(work[group[0]].dtype, "fastadv", [&] {
        TORCH_INTERNAL_ASSERT(sums <= Rows<scalar_t>::kSums, "the functor returns fewer sums than the op keeps");
        constexpr auto kernel = apply_kernel<Rows<scalar_t>, T, Args>;
        Launch<T, Args> launch;
        launch.args = args;
        launch.sums = sums;
        launch.segments.max_blocks = resident_blocks<kernel>();
        for (int i : group) {
          const int slot = launch.segments.add(i, work[i].rows, Rows<scalar_t>::rows_per_block(args));
          launch.tensors[slot] = work[i].tensor;
          launch.packed[slot] = work[i].aligned;
        }
        const at::Tensor partial =
            sums == 0 ? at::Tensor() : at::empty({sums * launch.segments.blocks()}, out.options().dtype(at::kDouble));
        kernel<<<launch.segments.blocks(), kThreads, 0, stream>>>(
            launch, sums == 0 ? nullptr : partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (sums == 0) return;
        if (out.scalar_type() == at::kDouble) {
          sum_partials(launch.segments, partial, sums, out.mutable_data_ptr<double>(), stream);
        } else {
          sum_partials(launch.segments, partial, sums, out.mutable_data_ptr<float>(), stream);
        }
      });
    }
  }
};

}  // namespace fastadv::cuda

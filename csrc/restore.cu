// restore on CUDA: copy the backups back into their rows, bit-exact (16-byte packs when aligned). No host sync.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"

namespace fastadv::cuda {
namespace {

struct RestoreTensor {
  void* param;
  const int64_t* rows;
  const void* backup;
  int64_t n_rows, param_rows, cols;
  bool packed;
};

struct RestoreArgs {
  Segments segments;
  RestoreTensor tensors[kMaxTensors];
};

// 4 blocks per SM or more (64 registers): a batch of packs and its addresses, unspilled.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 4) restore_kernel(RestoreArgs args) {
  const BlockPlace place = place_block(args.segments);
  const RestoreTensor& t = args.tensors[place.slot];
  auto* __restrict__ param = static_cast<scalar_t*>(t.param);
  const auto* __restrict__ backup = static_cast<const scalar_t*>(t.backup);
  for_each_warp_row(place, t.n_rows, t.rows, t.param_rows, [&](int64_t j, int64_t row) {
    with_pack_width<scalar_t>(t.packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> packs[kUnroll];
        load_batch(backup + j * t.cols, batch, packs);
        store_batch(param + row * t.cols, batch, packs);
      });
    });
  });
}

void restore(at::TensorList params, at::TensorList rows, at::TensorList backups) {
  check_rows("restore", params, rows, backups);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> indices(n);  // alive until the kernels are enqueued
  for (size_t i = 0; i < n; ++i) indices[i] = rows[i].contiguous();
  for (const auto& group : launch_groups(params)) {
    FASTADV_DISPATCH_FLOATING(params[group[0]].scalar_type(), "fastadv::restore", [&] {
      RestoreArgs args;
      args.segments.max_blocks = resident_blocks<restore_kernel<scalar_t>>();
      for (int i : group) {
        const at::Tensor& param = params[i];
        args.tensors[args.segments.add(i, indices[i].size(0))] = {
            param.mutable_data_ptr(), indices[i].const_data_ptr<int64_t>(), backups[i].const_data_ptr(),
            indices[i].size(0), param.size(0), param.size(1), packable({&param, &backups[i]})};
      }
      restore_kernel<scalar_t><<<args.segments.blocks(), kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { m.impl("restore", &fastadv::cuda::restore); }

// scan on CUDA: one read of each gradient, warp per row; per-block partial sums of squares and fresh-row counts, then
// a per-tensor sum of the partials in block order (no atomics), all on the current stream without a host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"

namespace fastadv::cuda {
namespace {

struct ScanTensor {
  const void* grad;
  const bool* touched;
  bool* fresh;
  int64_t rows, cols;
  bool packed;
};

struct ScanArgs {
  Segments segments;
  ScanTensor tensors[kMaxTensors];
};

// partial: [2, blocks], the block's sum of squares then its fresh-row count.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scan_kernel(ScanArgs args, double* partial) {
  const BlockPlace place = place_block(args.segments);
  const ScanTensor& t = args.tensors[place.slot];
  const auto* grad = static_cast<const scalar_t*>(t.grad);
  float sumsq = 0;  // this lane's share, over all its rows
  double fresh_rows = 0;  // counted by lane 0 of each warp
  for_each_warp_row(place, t.rows, [&](int64_t row) {
    const scalar_t* values = grad + row * t.cols;
    uint32_t bits = 0;
    with_pack_width<scalar_t>(t.packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for_each_lane_pack<N>(t.cols, [&](int64_t col) {
        float v[N];
        load_floats<N>(values + col, v);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          sumsq = fmaf(v[k], v[k], sumsq);
          bits |= __float_as_uint(v[k]);
        }
      });
    });
    bits = warp_or(bits);
    if (threadIdx.x % kWarpSize == 0) {
      const bool is_fresh = magnitude_bits_nonzero(bits) && !t.touched[row];
      t.fresh[row] = is_fresh;
      fresh_rows += is_fresh;
    }
  });
  const double block_sumsq = block_sum(sumsq);
  const double block_fresh = block_sum(fresh_rows);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_sumsq;
    partial[gridDim.x + blockIdx.x] = block_fresh;
  }
}

at::Tensor scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh) {
  check_scan(grads, touched, fresh);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n = grads.size();
  at::Tensor stats = at::empty({static_cast<int64_t>(n), 2}, grads[0].options().dtype(at::kDouble));
  std::vector<at::Tensor> dense_grads(n), dense_touched(n);  // alive until the kernels are enqueued
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    dense_touched[i] = touched[i].contiguous();
  }
  for (const auto& group : launch_groups(grads)) {
    ScanArgs args;
    for (int i : group) {
      const at::Tensor& grad = dense_grads[i];
      args.tensors[args.segments.add(i, grad.size(0))] = {
          grad.const_data_ptr(), dense_touched[i].const_data_ptr<bool>(), fresh[i].mutable_data_ptr<bool>(),
          grad.size(0), grad.size(1), packable({&grad})};
    }
    const at::Tensor partial = at::empty({2 * args.segments.blocks()}, stats.options());
    FASTADV_DISPATCH_FLOATING(dense_grads[group[0]].scalar_type(), "fastadv::scan", [&] {
      scan_kernel<scalar_t><<<args.segments.blocks(), kThreads, 0, stream>>>(args, partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_partials(args.segments, partial, 2, stats.mutable_data_ptr<double>(), stream);
  }
  return stats;
}

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { m.impl("scan", &fastadv::cuda::scan); }

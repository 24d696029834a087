// scan and row_sumsq on CUDA: one read of each gradient (and parameter), or of the listed rows, warp per row;
// per-block partial sums, then a per-tensor sum of the partials in block order (no atomics), all on the current stream
// without a host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cuda_utils.cuh"

namespace fastadv::cuda {
namespace {

struct ScanTensor {
  const void* values;    // scan: the gradient; row_sumsq: the tensor
  const void* param;     // scan with params: summed too, else nullptr
  const int64_t* index;  // row_sumsq: the rows to read, else nullptr (every row)
  const bool* touched;   // scan only
  bool* fresh;           // scan only
  int64_t rows, tensor_rows, cols;
  bool packed;
};

struct ScanArgs {
  Segments segments;
  ScanTensor tensors[kMaxTensors];
  int columns;  // 3: scan (sum of squares, fresh rows, parameters' sum of squares); 1: row_sumsq
};

// partial: [columns, blocks], the block's share of each column.
// At least 3 blocks per SM (80 registers): the batched loads fit unspilled (ptxas -v, sm_80 to sm_90); unbounded,
// ptxas takes ~90 registers and 2 blocks fit.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 3) scan_kernel(ScanArgs args, double* partial) {
  const BlockPlace place = place_block(args.segments);
  const ScanTensor& t = args.tensors[place.slot];
  const auto* __restrict__ values = static_cast<const scalar_t*>(t.values);
  const auto* __restrict__ param = static_cast<const scalar_t*>(t.param);
  // This lane's shares over all its rows: one accumulator per pack of a batch for the gradient (summed in a fixed order
  // at the end), one for the parameters (AWP only), so that the kernel fits 80 registers (3 blocks per SM) unspilled.
  float sumsq[kUnroll] = {}, param_sumsq = 0;
  double fresh_rows = 0;  // counted by lane 0 of each warp
  for_each_warp_row(place, t.rows, t.index, t.tensor_rows, [&](int64_t, int64_t row) {
    uint32_t bits = 0;
    with_pack_width<scalar_t>(t.packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> packs[kUnroll], param_packs[kUnroll];
        load_batch(values + row * t.cols, batch, packs);
        if (param) load_batch(param + row * t.cols, batch, param_packs);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!batch.has(u)) continue;
          float v[N];
          widen<scalar_t>(packs[u], v);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            sumsq[u] = fmaf(v[k], v[k], sumsq[u]);
            bits |= __float_as_uint(v[k]);
          }
          if (!param) continue;
          widen<scalar_t>(param_packs[u], v);
#pragma unroll
          for (int k = 0; k < N; ++k) param_sumsq = fmaf(v[k], v[k], param_sumsq);
        }
      });
    });
    if (!t.fresh) return;  // the same for the whole block
    bits = warp_or(bits);
    if (threadIdx.x % kWarpSize == 0) {
      const bool is_fresh = magnitude_bits_nonzero(bits) && !t.touched[row];
      t.fresh[row] = is_fresh;
      fresh_rows += is_fresh;
    }
  });
  const double block_sumsq = block_sum(sum_of(sumsq));
  if (threadIdx.x == 0) partial[blockIdx.x] = block_sumsq;
  if (args.columns == 1) return;
  const double block_fresh = block_sum(fresh_rows);
  const double block_param_sumsq = block_sum(param_sumsq);
  if (threadIdx.x == 0) {
    partial[gridDim.x + blockIdx.x] = block_fresh;
    partial[2 * gridDim.x + blockIdx.x] = block_param_sumsq;
  }
}

// Launches scan_kernel over `tensors`, one launch per dtype group, describe(args, i) filling in tensor i, and sums the
// partials into out ([n, columns] float64).
template <typename F>
void launch_scan(at::TensorList tensors, int columns, const at::Tensor& out, const F& describe) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& group : launch_groups(tensors)) {
    FASTADV_DISPATCH_FLOATING(tensors[group[0]].scalar_type(), "fastadv::scan", [&] {
      ScanArgs args;
      args.columns = columns;
      args.segments.max_blocks = resident_blocks<scan_kernel<scalar_t>>();
      for (int i : group) describe(args, i);
      const at::Tensor partial = at::empty({columns * args.segments.blocks()}, out.options());
      scan_kernel<scalar_t><<<args.segments.blocks(), kThreads, 0, stream>>>(args, partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials(args.segments, partial, columns, out.mutable_data_ptr<double>(), stream);
    });
  }
}

at::Tensor scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh,
                std::optional<at::TensorList> params) {
  check_scan(grads, touched, fresh, params);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const size_t n = grads.size();
  at::Tensor stats = at::empty({static_cast<int64_t>(n), 3}, grads[0].options().dtype(at::kDouble));
  std::vector<at::Tensor> dense_grads(n), dense_touched(n), dense_params(n);  // alive until the kernels are enqueued
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    dense_touched[i] = touched[i].contiguous();
    if (params) dense_params[i] = (*params)[i].contiguous();
  }
  launch_scan(dense_grads, 3, stats, [&](ScanArgs& args, int i) {
    const at::Tensor& grad = dense_grads[i];
    const at::Tensor& param = params ? dense_params[i] : grad;
    args.tensors[args.segments.add(i, grad.size(0))] = {
        grad.const_data_ptr(), params ? param.const_data_ptr() : nullptr, nullptr,
        dense_touched[i].const_data_ptr<bool>(), fresh[i].mutable_data_ptr<bool>(), grad.size(0), grad.size(0),
        grad.size(1), packable({&grad, &param})};
  });
  return stats;
}

at::Tensor row_sumsq(at::TensorList tensors, at::TensorList rows) {
  check_row_sumsq(tensors, rows);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const size_t n = tensors.size();
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, tensors[0].options().dtype(at::kDouble));
  std::vector<at::Tensor> dense(n), indices(n);  // alive until the kernels are enqueued
  for (size_t i = 0; i < n; ++i) {
    dense[i] = tensors[i].contiguous();
    indices[i] = rows[i].contiguous();
  }
  launch_scan(dense, 1, out, [&](ScanArgs& args, int i) {
    const at::Tensor& t = dense[i];
    args.tensors[args.segments.add(i, indices[i].size(0))] = {
        t.const_data_ptr(), nullptr, indices[i].const_data_ptr<int64_t>(), nullptr, nullptr, indices[i].size(0),
        t.size(0), t.size(1), packable({&t})};
  });
  return out;
}

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  m.impl("scan", &fastadv::cuda::scan);
  m.impl("row_sumsq", &fastadv::cuda::row_sumsq);
}

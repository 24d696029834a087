// perturb, measure and project on CUDA: warp per perturbed row, one launch per pass and dtype group (see Pass).
// measure sums its per-block partials of ||W + scale * G - B||^2 per tensor in block order; the scales and project's
// norms are read on the device: no host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cuda_utils.cuh"

namespace fastadv::cuda {
namespace {

struct PerturbTensor {
  void* param;
  const void* grad;
  const int64_t* rows;
  void* backup;
  int64_t n_rows, param_rows, cols, n_backed;
  bool packed;
};

struct PerturbArgs {
  Segments segments;
  PerturbTensor tensors[kMaxTensors];
  Pass pass;
  const float* scales;       // per tensor of the op's lists
  const float* delta_sumsq;  // Pass::kProject: per tensor of the op's lists
  double eps;                // Pass::kBox: box_eps; Pass::kProject: the ball's radius
};

// partial: [blocks], the block's share of ||W + scale * G - B||^2 (Pass::kMeasure only).
// 2 blocks per SM (128 registers): up to three inputs' batches in flight; at 80 registers ptxas spills them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) perturb_kernel(PerturbArgs args, double* partial) {
  const BlockPlace place = place_block(args.segments);
  const PerturbTensor& t = args.tensors[place.slot];
  const int tensor = args.segments.index[place.slot];
  const Pass pass = args.pass;
  const float scale = args.scales[tensor];
  const float box_eps = static_cast<float>(args.eps);
  const Projection projection =
      pass == Pass::kProject ? projection_for(args.delta_sumsq[tensor], args.eps) : Projection{false, 1.0f};
  auto* __restrict__ param = static_cast<scalar_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const scalar_t*>(t.grad);
  auto* __restrict__ backup = static_cast<scalar_t*>(t.backup);
  // measure's share of this lane, one accumulator per pack of a batch (summed in a fixed order at the end)
  float delta_sumsq[kUnroll] = {};
  for_each_warp_row(place, t.n_rows, t.rows, t.param_rows, [&](int64_t j, int64_t row) {
    scalar_t* weights = param + row * t.cols;
    const scalar_t* g = grad + row * t.cols;
    scalar_t* saved = backup + j * t.cols;
    const bool backing = j >= t.n_backed;  // project: never (n_backed is every row)
    if (!backing && scale == 0.0f) return;  // nothing to back up, nothing to change
    // whether this pass needs B, and whether from the backup (else from the read of W)
    const bool uses_origin = pass != Pass::kStep && (pass != Pass::kProject || projection.outside);
    const bool reading_backup = uses_origin && !backing && scale != 0.0f;
    with_pack_width<scalar_t>(t.packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> raw[kUnroll], grads[kUnroll], origins[kUnroll];
        load_batch(weights, batch, raw);
        if (scale != 0.0f) load_batch(g, batch, grads);
        if (reading_backup) load_batch(saved, batch, origins);
        if (backing) store_batch(saved, batch, raw);  // bit-exact, from the one read of W
        if (scale == 0.0f) return;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!batch.has(u)) continue;
          float old[N], step[N], now[N];
          widen<scalar_t>(raw[u], old);
          widen<scalar_t>(grads[u], step);
#pragma unroll
          for (int k = 0; k < N; ++k) now[k] = perturbed(old[k], step[k], scale);
          if (uses_origin) {
            float origin[N];
            if (reading_backup) {
              widen<scalar_t>(origins[u], origin);
            } else {  // B is this read of W (copied by value: a select between two arrays put them in local memory)
#pragma unroll
              for (int k = 0; k < N; ++k) origin[k] = old[k];
            }
#pragma unroll
            for (int k = 0; k < N; ++k) {
              if (pass == Pass::kMeasure) {
                const float diff = now[k] - origin[k];
                delta_sumsq[u] = fmaf(diff, diff, delta_sumsq[u]);
              } else if (pass == Pass::kBox) {
                now[k] = boxed(now[k], origin[k], box_eps);
              } else {
                now[k] = lerp(origin[k], now[k], projection.factor);
              }
            }
          }
          if (pass != Pass::kMeasure) store_rounded<N>(weights + batch.col(u), now);
        }
      });
    });
  });
  if (pass == Pass::kMeasure) {
    const double total = block_sum(sum_of(delta_sumsq));
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

// Launches `pass` over every tensor, one launch per dtype group. Pass::kMeasure sums its partials into delta_sumsq;
// Pass::kProject reads its norms from there.
void run_pass(Pass pass, at::TensorList params, at::TensorList grads, at::TensorList rows,
              at::TensorList backups, const std::vector<int64_t>& n_backed, const at::Tensor& scales, double eps,
              const at::Tensor& delta_sumsq) {
  const size_t n = params.size();
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // alive until the kernels are enqueued
  const at::Tensor dense_scales = scales.contiguous();
  std::vector<at::Tensor> dense_grads(n), indices(n);
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    indices[i] = rows[i].contiguous();
  }
  for (const auto& group : launch_groups(params)) {
    FASTADV_DISPATCH_FLOATING(params[group[0]].scalar_type(), "fastadv::perturb", [&] {
      PerturbArgs args;
      args.pass = pass;
      args.scales = dense_scales.const_data_ptr<float>();
      args.delta_sumsq = delta_sumsq.defined() ? delta_sumsq.const_data_ptr<float>() : nullptr;
      args.eps = eps;
      args.segments.max_blocks = resident_blocks<perturb_kernel<scalar_t>>();
      for (int i : group) {
        const at::Tensor& param = params[i];
        args.tensors[args.segments.add(i, indices[i].size(0))] = {
            param.data_ptr(), dense_grads[i].const_data_ptr(), indices[i].const_data_ptr<int64_t>(),
            backups[i].data_ptr(), indices[i].size(0), param.size(0), param.size(1), n_backed[i],
            packable({&param, &dense_grads[i], &backups[i]})};
      }
      const bool measuring = pass == Pass::kMeasure;
      const at::Tensor partial =
          at::empty({measuring ? args.segments.blocks() : 0}, dense_scales.options().dtype(at::kDouble));
      perturb_kernel<scalar_t><<<args.segments.blocks(), kThreads, 0, stream>>>(args,
                                                                                partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (measuring) sum_partials(args.segments, partial, 1, delta_sumsq.mutable_data_ptr<float>(), stream);
    });
  }
}

void perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             c10::IntArrayRef n_backed, const at::Tensor& scales, std::optional<double> box_eps) {
  check_pass("perturb", params, grads, rows, backups, n_backed, scales);
  if (params.empty()) return;
  run_pass(box_eps ? Pass::kBox : Pass::kStep, params, grads, rows, backups, n_backed.vec(), scales,
           box_eps.value_or(0.0), at::Tensor());
}

at::Tensor measure(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
                   c10::IntArrayRef n_backed, const at::Tensor& scales) {
  check_pass("measure", params, grads, rows, backups, n_backed, scales);
  // every element is written by sum_partials
  at::Tensor delta_sumsq = at::empty({static_cast<int64_t>(params.size())}, scales.options().dtype(at::kFloat));
  if (params.empty()) return delta_sumsq;
  run_pass(Pass::kMeasure, params, grads, rows, backups, n_backed.vec(), scales, 0.0, delta_sumsq);
  return delta_sumsq;
}

void project(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             const at::Tensor& scales, const at::Tensor& delta_sumsq, double eps) {
  check_pass("project", params, grads, rows, backups, std::nullopt, scales);
  if (params.empty()) return;
  check_per_tensor(delta_sumsq, params.size(), params[0].device(), "project", "delta_sumsq");
  std::vector<int64_t> every_row(params.size());  // every backup is written already
  for (size_t i = 0; i < params.size(); ++i) every_row[i] = rows[i].size(0);
  run_pass(Pass::kProject, params, grads, rows, backups, every_row, scales, eps, delta_sumsq.contiguous());
}

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  m.impl("perturb", &fastadv::cuda::perturb);
  m.impl("measure", &fastadv::cuda::measure);
  m.impl("project", &fastadv::cuda::project);
}

// perturb on CUDA: warp per perturbed row. FGM is one launch (back up the new rows, W += scale * G); PGD is a measuring
// launch (backups, per-block partials of ||W + scale * G - B||^2), their per-tensor sum in block order, and a writing
// launch that decides the projection on the device. The scale comes from sumsq on the device too: no host sync.
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
  const double* sumsq;  // per tensor of the op's lists
  double coef;
  const float* delta_sumsq;  // Pass::kProject: per tensor of the op's lists
  double eps;
};

// partial: [blocks], the block's share of ||W + scale * G - B||^2 (Pass::kMeasure only).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) perturb_kernel(PerturbArgs args, double* partial) {
  const BlockPlace place = place_block(args.segments);
  const PerturbTensor& t = args.tensors[place.slot];
  const int tensor = args.segments.index[place.slot];
  const Pass pass = args.pass;
  const Step step = step_for(args.sumsq[tensor], args.coef);
  const Projection projection =
      pass == Pass::kProject ? projection_for(args.delta_sumsq[tensor], args.eps) : Projection{false, 1.0f};
  auto* param = static_cast<scalar_t*>(t.param);
  const auto* grad = static_cast<const scalar_t*>(t.grad);
  auto* backup = static_cast<scalar_t*>(t.backup);
  float delta_sumsq = 0;
  for_each_warp_row(place, t.n_rows, [&](int64_t j) {
    const int64_t row = t.rows[j];
    CUDA_KERNEL_ASSERT(row >= 0 && row < t.param_rows);
    scalar_t* weights = param + row * t.cols;
    const scalar_t* g = grad + row * t.cols;
    scalar_t* saved = backup + j * t.cols;
    const bool backing = pass != Pass::kProject && j >= t.n_backed;
    if (!backing && !step.usable) return;  // nothing to back up, nothing to change
    with_pack_width<scalar_t>(t.packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for_each_lane_pack<N>(t.cols, [&](int64_t col) {
        const Pack<scalar_t, N> raw = load_pack<N>(weights + col);
        if (backing) store_pack<N>(saved + col, raw);  // bit-exact, from the one read of W
        if (!step.usable) return;
        float old[N], grads[N], now[N];
        widen(raw, old);
        load_floats<N>(g + col, grads);
#pragma unroll
        for (int k = 0; k < N; ++k) now[k] = perturbed(old[k], grads[k], step.scale);
        if (pass == Pass::kMeasure) {
          float origin[N];
          if (backing) {
#pragma unroll
            for (int k = 0; k < N; ++k) origin[k] = old[k];
          } else {
            load_floats<N>(saved + col, origin);
          }
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const float diff = now[k] - origin[k];
            delta_sumsq = fmaf(diff, diff, delta_sumsq);
          }
          return;
        }
        if (pass == Pass::kProject && projection.outside) {
          float origin[N];
          load_floats<N>(saved + col, origin);
#pragma unroll
          for (int k = 0; k < N; ++k) now[k] = lerp(origin[k], now[k], projection.factor);
        }
        store_rounded<N>(weights + col, now);
      });
    });
  });
  if (pass == Pass::kMeasure) {
    const double total = block_sum(delta_sumsq);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

void perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             c10::IntArrayRef n_backed, const at::Tensor& sumsq, double coef, std::optional<double> project_eps) {
  check_perturb(params, grads, rows, backups, n_backed, sumsq);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor sumsq64 = sumsq.to(at::kDouble).contiguous();
  // per-tensor ||W + scale * G - B||^2 of PGD's measuring pass; every element is written before it is read
  const at::Tensor delta_sumsq =
      at::empty({project_eps ? static_cast<int64_t>(n) : 0}, sumsq64.options().dtype(at::kFloat));
  std::vector<at::Tensor> dense_grads(n), indices(n);  // alive until the kernels are enqueued
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    indices[i] = rows[i].contiguous();
  }
  for (const auto& group : launch_groups(params)) {
    PerturbArgs args;
    args.sumsq = sumsq64.const_data_ptr<double>();
    args.coef = coef;
    args.delta_sumsq = delta_sumsq.const_data_ptr<float>();
    args.eps = project_eps.value_or(0.0);
    for (int i : group) {
      const at::Tensor& param = params[i];
      args.tensors[args.segments.add(i, indices[i].size(0))] = {
          param.mutable_data_ptr(), dense_grads[i].const_data_ptr(), indices[i].const_data_ptr<int64_t>(),
          backups[i].mutable_data_ptr(), indices[i].size(0), param.size(0), param.size(1), n_backed[i],
          packable({&param, &dense_grads[i], &backups[i]})};
    }
    const at::Tensor partial = at::empty({project_eps ? args.segments.blocks() : 0}, sumsq64.options());
    const auto launch = [&](Pass pass) {
      args.pass = pass;
      FASTADV_DISPATCH_FLOATING(params[group[0]].scalar_type(), "fastadv::perturb", [&] {
        perturb_kernel<scalar_t><<<args.segments.blocks(), kThreads, 0, stream>>>(args,
                                                                                  partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (!project_eps) {
      launch(Pass::kStep);
      continue;
    }
    launch(Pass::kMeasure);
    sum_partials(args.segments, partial, 1, delta_sumsq.mutable_data_ptr<float>(), stream);
    launch(Pass::kProject);
  }
}

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { m.impl("perturb", &fastadv::cuda::perturb); }

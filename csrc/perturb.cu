// perturb, measure and project on CUDA: warp per perturbed row, one pass (see Pass). The entry points are in ops.h,
// the launch over the whole list and measure's per-tensor sums in cuda_apply.cuh; here the row functor. The scales and
// project's norms are read on the device: no host sync.
#include <torch/library.h>

#include "cuda_apply.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {
namespace {

// This block's rows of one pass; its share of ||W + scale * G - B||^2 for Pass::kMeasure.
template <typename scalar_t>
struct perturb_kernel {
  __device__ Sums operator()(const BlockPlace& place, const PerturbTensor& t, const PerturbArgs& args, int tensor,
                             bool packed) const {
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
      const bool backing = j >= t.n_backed;   // project: never (n_backed is every row)
      if (!backing && scale == 0.0f) return;  // nothing to back up, nothing to change
      // whether this pass needs B, and whether from the backup (else from the read of W)
      const bool uses_origin = pass != Pass::kStep && (pass != Pass::kProject || projection.outside);
      const bool reading_backup = uses_origin && !backing && scale != 0.0f;
      with_pack_width<scalar_t>(packed, [&](auto width) {
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
    return {{sum_of(delta_sumsq)}};
  }

  // 2 blocks per SM (128 registers): up to three inputs' batches in flight; at 80 registers ptxas spills them.
  static constexpr int kBlocksPerSm = 2;
  // measure's sum
  static constexpr int kSums = 1;
  // a warp per row
  static constexpr int64_t rows_per_block(const PerturbArgs&) { return kWarps; }
};

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { fastadv::impl_pass<fastadv::cuda::Device, fastadv::cuda::perturb_kernel>(m); }

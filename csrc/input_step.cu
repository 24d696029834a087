// input_step on CUDA: a team per group, in passes over the group's rows (tokens): the masked gradient for its norm,
// then delta and the gradient for the new values (stored, or with the "l2" bound summed, recomputed and stored scaled
// in a third pass). Per example the team is a block (its warps take the example's tokens in turn), per token a warp.
// The norms are reduced in a fixed order inside the team: no atomics, the same bits on every run and on every GPU (a
// group's reduction does not depend on the grid). The entry point is in ops.h, the launch in cuda_apply.cuh.
#include <torch/library.h>

#include "cuda_apply.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {
namespace {

// lr * sign(g): lr where g > 0, -lr where g < 0, else 0.
__device__ inline float sign_step(float grad, float lr) { return grad > 0.0f ? lr : grad < 0.0f ? -lr : 0.0f; }

template <typename scalar_t>
struct input_step_kernel {
  __device__ Sums operator()(const BlockPlace& place, const InputStepTensor& t, const InputStepArgs& args, int,
                             bool packed) const {
    const int warp = threadIdx.x / kWarpSize;
    // per token: warp w of block rank b takes groups w + kWarps * b, then strides by all the warps; per example: the
    // block takes groups b, then strides by the blocks (the same trip count in every thread, for the block's barriers)
    const int64_t first = args.per_token ? place.rank * kWarps + warp : place.rank;
    const int64_t stride = args.per_token ? place.blocks * kWarps : place.blocks;
    with_pack_width<scalar_t>(packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      for (int64_t group = first; group < t.groups; group += stride) step_group<N>(t, args, group, warp);
    });
    return {};
  }

  template <int N>
  __device__ static void step_group(const InputStepTensor& t, const InputStepArgs& args, int64_t group, int warp) {
    const bool whole_block = !args.per_token;
    const int first_row = whole_block ? warp : 0, row_stride = whole_block ? kWarps : 1;
    const int64_t first_token = group * t.group_tokens;
    auto* __restrict__ delta = static_cast<scalar_t*>(t.delta) + first_token * t.cols;
    const auto* __restrict__ grad = static_cast<const scalar_t*>(t.grad) + first_token * t.cols;
    const auto selected = [&](int64_t row) { return !t.mask || t.mask[first_token + row]; };
    const bool by_max = args.norm == InputNorm::kInf;

    // squares, or |g| maxima (NaN propagates), one accumulator per pack of a batch, combined in a fixed order
    float acc[kUnroll] = {};
    for (int64_t row = first_row; row < t.group_tokens; row += row_stride) {
      if (!selected(row)) continue;  // not even read: a NaN outside the mask must not count
      for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> raw[kUnroll];
        load_batch(grad + row * t.cols, batch, raw);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!batch.has(u)) continue;
          float g[N];
          widen<scalar_t>(raw[u], g);
#pragma unroll
          for (int k = 0; k < N; ++k) acc[u] = by_max ? maximum(acc[u], fabsf(g[k])) : fmaf(g[k], g[k], acc[u]);
        }
      });
    }
    float mine = acc[0];
#pragma unroll
    for (int u = 1; u < kUnroll; ++u) mine = by_max ? maximum(mine, acc[u]) : mine + acc[u];
    const float reduced = team_reduce(mine, by_max, whole_block);
    const float n = by_max ? reduced : sqrtf(reduced);  // correctly rounded (no --use_fast_math)
    if ((whole_block ? threadIdx.x : threadIdx.x % kWarpSize) == 0) t.norms[group] = n;
    const bool finite = finite_norm(n);
    const float denominator = step_denominator(n, args.denom_eps, args.denom_floor);

    // Calls fn(p, now) with the new fp32 values `now` of the N elements at p, pack by pack; the same bits on every
    // call.
    const auto for_each_new = [&](const auto& fn) {
      for (int64_t row = first_row; row < t.group_tokens; row += row_stride) {
        const bool reading = finite && selected(row);  // g is 0 outside the mask (not read)
        scalar_t* d_row = delta + row * t.cols;
        for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
          Bits<scalar_t, N> raw[kUnroll], grads[kUnroll];
          load_batch(d_row, batch, raw);
          if (reading) load_batch(grad + row * t.cols, batch, grads);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!batch.has(u)) continue;
            float now[N], g[N] = {};
            widen<scalar_t>(raw[u], now);
            if (reading) widen<scalar_t>(grads[u], g);
            if (finite) {
#pragma unroll
              for (int k = 0; k < N; ++k) {
                now[k] += args.norm == InputNorm::kSign ? sign_step(g[k], args.lr)
                                                        : scaled_step(g[k], args.lr, denominator);
              }
            }
            fn(d_row + batch.col(u), now);
          }
        });
      }
    };

    if (args.bound != InputBound::kL2) {
      for_each_new([&](scalar_t* p, float (&now)[N]) {
        if (args.bound == InputBound::kInf) {
#pragma unroll
          for (int k = 0; k < N; ++k) now[k] = clamped(now[k], args.radius);
        }
        store_rounded<N>(p, now);
      });
      return;
    }
    float sizes = 0.0f;
    for_each_new([&](scalar_t*, float (&now)[N]) {
#pragma unroll
      for (int k = 0; k < N; ++k) sizes = fmaf(now[k], now[k], sizes);
    });
    const float factor = bound_factor(sqrtf(team_reduce(sizes, false, whole_block)), args.radius);
    for_each_new([&](scalar_t* p, float (&now)[N]) {
#pragma unroll
      for (int k = 0; k < N; ++k) now[k] *= factor;
      store_rounded<N>(p, now);
    });
  }

  // 2 blocks per SM (128 registers): two inputs' batches in flight
  static constexpr int kBlocksPerSm = 2;
  static constexpr int kSums = 0;
  // per token a warp per group, per example a block
  static int64_t rows_per_block(const InputStepArgs& args) { return args.per_token ? kWarps : 1; }
};

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  fastadv::impl_input_step<fastadv::cuda::Device, fastadv::cuda::input_step_kernel>(m);
}

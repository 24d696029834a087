// input_step on CUDA, in passes over a group's tokens: the masked gradient for its norm, then delta and the gradient
// for the new values (stored, or with the "l2" bound summed, recomputed and stored scaled in a third pass). Sums are
// taken per slice of tokens, then over the group's slices in a fixed order (InputPhase, common.h). Per token a warp per
// group (kWhole: B * T groups fill the GPU). Per example a block per slice of kWarps tokens, a warp each, in one launch
// per phase: a batch of B examples of T tokens is B * T / kWarps blocks' work, where a block per example left all but
// B SMs idle (FreeLB's batch of 32 on 132 SMs); an example of one slice is a block's (kWhole, one launch). Within a
// team, lanes, warps and the block's warps are combined in a fixed order: the same bits on every run, for any grid and
// on every GPU. The entry point is in ops.h, the launch in cuda_apply.cuh.
#include <torch/library.h>

#include "cuda_apply.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {
namespace {

// lr * sign(g): lr where g > 0, -lr where g < 0, else 0.
__device__ inline float sign_step(float grad, float lr) { return grad > 0.0f ? lr : grad < 0.0f ? -lr : 0.0f; }

// How examples are sliced, and when they are split between blocks (ops.h's input_step): always, a warp per token.
struct InputSlicing {
  static int64_t slice_tokens(int64_t, int64_t) { return kWarps; }
  static bool split(int64_t) { return true; }
};

template <typename scalar_t>
struct input_step_kernel {
  __device__ Sums operator()(const BlockPlace& place, const InputStepTensor& t, const InputStepArgs& args, int,
                             bool packed) const {
    const int warp = threadIdx.x / kWarpSize;
    with_pack_width<scalar_t>(packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      if (args.phase != InputPhase::kWhole) {  // a block per slice, in turn
        for (int64_t row = place.rank; row < t.groups * t.slices; row += place.blocks) {
          slice_phase<N>(t, args, row / t.slices, row % t.slices, warp);
        }
        return;
      }
      // per token: warp w of block rank b takes groups w + kWarps * b, then strides by all the warps; per example: the
      // block takes groups b, then strides by the blocks (the same trip count in every thread, for the block's
      // barriers)
      const int64_t first = args.per_token ? place.rank * kWarps + warp : place.rank;
      const int64_t stride = args.per_token ? place.blocks * kWarps : place.blocks;
      for (int64_t group = first; group < t.groups; group += stride) whole_group<N>(t, args, group, warp);
    });
    return {};
  }

  // The tokens of slice k of a group (passed by value, as the steps: copies no store can alias), and the rows of it
  // that this thread's warp takes: every row (a warp's group: per token) or rows warp, warp + kWarps, ... (a block's:
  // per example).
  struct Slice {
    scalar_t* __restrict__ delta;
    const scalar_t* __restrict__ grad;
    const bool* mask;  // or nullptr: every token
    int64_t tokens, cols;
    int first_row, row_stride;
    bool whole_block;
    __device__ bool selected(int64_t row) const { return !mask || mask[row]; }
  };

  __device__ static Slice slice_of(const InputStepTensor& t, const InputStepArgs& args, int64_t group, int64_t k,
                                   int warp) {
    const int64_t first = t.slice_start(group, k);
    const bool whole_block = !args.per_token;
    return {static_cast<scalar_t*>(t.delta) + first * t.cols,
            static_cast<const scalar_t*>(t.grad) + first * t.cols,
            t.mask ? t.mask + first : nullptr,
            t.slice_size(k),
            t.cols,
            whole_block ? warp : 0,
            whole_block ? kWarps : 1,
            whole_block};
  }

  // Whether this thread writes its team's results: the first lane of the warp or of the block.
  __device__ static bool leader(Slice s) { return (s.whole_block ? threadIdx.x : threadIdx.x % kWarpSize) == 0; }

  // The slice's partial norm, the sum of the squares of the masked gradient (max |g| for "inf"), in every thread of
  // the team.
  template <int N>
  __device__ static float partial_norm(Slice s, const InputStepArgs& args) {
    const bool by_max = args.norm == InputNorm::kInf;
    // squares, or |g| maxima (NaN propagates), one accumulator per pack of a batch, combined in a fixed order
    float acc[kUnroll] = {};
    for (int64_t row = s.first_row; row < s.tokens; row += s.row_stride) {
      if (!s.selected(row)) continue;  // not even read: a NaN outside the mask must not count
      for_each_lane_batch<N>(s.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> raw[kUnroll];
        load_batch(s.grad + row * s.cols, batch, raw);
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
    return team_reduce(mine, by_max, s.whole_block);
  }

  // Calls fn(p, now) with the new fp32 values `now` of the N elements at p, pack by pack; the same bits on every
  // call.
  template <int N, typename F>
  __device__ static void for_each_new(Slice s, GroupStep step, const InputStepArgs& args, const F& fn) {
    for (int64_t row = s.first_row; row < s.tokens; row += s.row_stride) {
      const bool reading = step.finite && s.selected(row);  // g is 0 outside the mask (not read)
      scalar_t* d_row = s.delta + row * s.cols;
      for_each_lane_batch<N>(s.cols, [&](const LaneBatch<N>& batch) {
        Bits<scalar_t, N> raw[kUnroll], grads[kUnroll];
        load_batch(d_row, batch, raw);
        if (reading) load_batch(s.grad + row * s.cols, batch, grads);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!batch.has(u)) continue;
          float now[N], g[N] = {};
          widen<scalar_t>(raw[u], now);
          if (reading) widen<scalar_t>(grads[u], g);
          if (step.finite) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
              now[k] += args.norm == InputNorm::kSign ? sign_step(g[k], args.lr)
                                                      : scaled_step(g[k], args.lr, step.denominator);
            }
          }
          fn(d_row + batch.col(u), now);
        }
      });
    }
  }

  // The new values stored, clamped for the "inf" bound (not the "l2" bound: see stored_scaled).
  template <int N>
  __device__ static void stored(Slice s, GroupStep step, const InputStepArgs& args) {
    for_each_new<N>(s, step, args, [&](scalar_t* p, float (&now)[N]) {
      if (args.bound == InputBound::kInf) {
#pragma unroll
        for (int k = 0; k < N; ++k) now[k] = clamped(now[k], args.radius);
      }
      store_rounded<N>(p, now);
    });
  }

  // The sum of the squares of the slice's new values ("l2" bound), in every thread of the team.
  template <int N>
  __device__ static float sizes(Slice s, GroupStep step, const InputStepArgs& args) {
    float total = 0.0f;
    for_each_new<N>(s, step, args, [&](scalar_t*, float (&now)[N]) {
#pragma unroll
      for (int k = 0; k < N; ++k) total = fmaf(now[k], now[k], total);
    });
    return team_reduce(total, false, s.whole_block);
  }

  template <int N>
  __device__ static void stored_scaled(Slice s, GroupStep step, const InputStepArgs& args, float factor) {
    for_each_new<N>(s, step, args, [&](scalar_t* p, float (&now)[N]) {
#pragma unroll
      for (int k = 0; k < N; ++k) now[k] *= factor;
      store_rounded<N>(p, now);
    });
  }

  // A team (warp or block) runs every pass over the group's slices, their sums combined in slice order (only one-slice
  // examples take this per example: ops.h splits the others, whose sums split_total combines).
  template <int N>
  __device__ static void whole_group(const InputStepTensor& t, const InputStepArgs& args, int64_t group, int warp) {
    float total = 0.0f;
    for (int64_t k = 0; k < t.slices; ++k) {
      total = with_partial(total, partial_norm<N>(slice_of(t, args, group, k, warp), args), args.norm);
    }
    const GroupStep step = group_step(total, args.norm, args.denom_eps, args.denom_floor);
    const Slice first = slice_of(t, args, group, 0, warp);
    if (leader(first)) t.norms[group] = step.n;
    if (args.bound != InputBound::kL2) {
      for (int64_t k = 0; k < t.slices; ++k) stored<N>(slice_of(t, args, group, k, warp), step, args);
      return;
    }
    float size = 0.0f;
    for (int64_t k = 0; k < t.slices; ++k) size += sizes<N>(slice_of(t, args, group, k, warp), step, args);
    const float factor = bound_factor(sqrtf(size), args.radius);
    for (int64_t k = 0; k < t.slices; ++k) stored_scaled<N>(slice_of(t, args, group, k, warp), step, args, factor);
  }

  // The sum (maximum with by_max) of a group's `count` slice values, in every thread of the block: thread j takes
  // values j, j + kThreads, ... in order, then the block's threads are combined in a fixed order. Read again by every
  // block of the group (a few dozen values from L2) instead of a launch to reduce them once.
  __device__ static float split_total(const float* values, int64_t count, bool by_max) {
    float mine = 0.0f;
    for (int64_t j = threadIdx.x; j < count; j += kThreads) mine = by_max ? maximum(mine, values[j]) : mine + values[j];
    return team_reduce(mine, by_max, true);
  }

  // This block's phase on slice k of a group (a block per slice: every thread takes the same branches).
  template <int N>
  __device__ static void slice_phase(const InputStepTensor& t, const InputStepArgs& args, int64_t group, int64_t k,
                                     int warp) {
    const Slice s = slice_of(t, args, group, k, warp);
    const int64_t first = group * t.slices;
    if (args.phase == InputPhase::kNorm) {
      const float part = partial_norm<N>(s, args);
      if (leader(s)) t.partials[first + k] = part;
      return;
    }
    const float total = split_total(t.partials + first, t.slices, args.norm == InputNorm::kInf);
    const GroupStep step = group_step(total, args.norm, args.denom_eps, args.denom_floor);
    if (k == 0 && leader(s)) t.norms[group] = step.n;
    if (args.phase == InputPhase::kStep) {
      if (args.bound != InputBound::kL2) {
        stored<N>(s, step, args);
        return;
      }
      const float size = sizes<N>(s, step, args);
      if (leader(s)) t.sizes[first + k] = size;
      return;
    }
    const float size = split_total(t.sizes + first, t.slices, false);
    stored_scaled<N>(s, step, args, bound_factor(sqrtf(size), args.radius));
  }

  // 2 blocks per SM (128 registers): two inputs' batches in flight
  static constexpr int kBlocksPerSm = 2;
  static constexpr int kSums = 0;
  // per token a warp per group; per example a block per group or per slice
  static int64_t rows_per_block(const InputStepArgs& args) { return args.per_token ? kWarps : 1; }
};

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  fastadv::impl_input_step<fastadv::cuda::Device, fastadv::cuda::input_step_kernel, fastadv::cuda::InputSlicing>(m);
}

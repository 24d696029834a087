// input_step on the CPU, in passes over a group's tokens: the masked gradient for its norm, then delta and the gradient
// for the new values (stored, or with the "l2" bound summed, recomputed and stored scaled in a third pass). Sums are
// taken per slice of tokens, then over the group's slices in slice order (InputPhase, common.h). A thread per group
// (kWhole) while there are at least as many groups as threads: it keeps its example in its cache from one pass to the
// next. Fewer examples than threads (a small batch on a many-core CPU) are split, a slice per row of the apply, in one
// parallel region per phase: the same bits either way, and for any thread count. The entry point is in ops.h, the
// parallel loop in cpu_apply.h (chunks that depend on the shapes only).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "cpu_apply.h"
#include "cpu_utils.h"
#include "ops.h"

namespace fastadv::cpu {
namespace {

// lr * sign(g): lr where g > 0, -lr where g < 0, else 0.
inline FloatVec sign_step(const FloatVec& grad, float lr) {
  const FloatVec zero(0.0f);
  const FloatVec positive = FloatVec::blendv(zero, FloatVec(lr), grad > zero);
  return FloatVec::blendv(positive, FloatVec(-lr), grad < zero);
}

// The lanes' NaN-propagating maximum, in lane order.
inline float lane_max(const FloatVec& v) {
  std::array<float, FloatVec::size()> lanes;
  v.store(lanes.data());
  float most = lanes[0];
  for (float lane : lanes) most = maximum(most, lane);
  return most;
}

// How examples are sliced, and when they are split between threads (ops.h's input_step).
struct InputSlicing {
  // a slice of delta and grad is about a chunk of the apply
  static int64_t slice_tokens(int64_t cols, int64_t element_size) {
    return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, 2 * cols * element_size));
  }
  static bool split(int64_t groups) { return groups < at::get_num_threads(); }
};

// Rows of the apply: groups [begin, end) in InputPhase::kWhole, else slices of groups.
template <typename scalar_t>
struct input_step_kernel {
  Sums operator()(const InputStepTensor& t, const InputStepArgs& args, int, int64_t begin, int64_t end) const {
    for (int64_t row = begin; row < end; ++row) {
      if (args.phase == InputPhase::kWhole) {
        whole_group(t, args, row);
      } else {
        slice_phase(t, args, row / t.slices, row % t.slices);
      }
    }
    return {};
  }

  // The tokens of slice k of a group. Slices and steps are passed by value: copies the row loops' stores cannot alias.
  struct Slice {
    scalar_t* delta;
    const scalar_t* grad;
    const bool* mask;  // or nullptr: every token
    int64_t tokens, cols;
    bool selected(int64_t token) const { return !mask || mask[token]; }
  };

  static Slice slice_of(const InputStepTensor& t, int64_t group, int64_t k) {
    const int64_t first = t.slice_start(group, k);
    return {static_cast<scalar_t*>(t.delta) + first * t.cols, static_cast<const scalar_t*>(t.grad) + first * t.cols,
            t.mask ? t.mask + first : nullptr, t.slice_size(k), t.cols};
  }

  // The slice's partial norm: the sum of the squares of the masked gradient (max |g| for "inf").
  static float partial_norm(Slice s, const InputStepArgs& args) {
    FloatVec acc(0.0f);  // squares, or |g| maxima (NaN propagates)
    for (int64_t token = 0; token < s.tokens; ++token) {
      if (!s.selected(token)) continue;  // not even read: a NaN outside the mask must not count
      for_each_block<scalar_t>(s.cols, [&](int64_t col, int64_t count) FASTADV_INLINE {
        const auto g = load_widened(s.grad + token * s.cols + col, count);  // lanes past count: 0
        for (int k = 0; k < kWidened<scalar_t>; ++k) {
          acc = args.norm == InputNorm::kInf ? at::vec::maximum(acc, g[k].abs()) : at::vec::fmadd(g[k], g[k], acc);
        }
      });
    }
    return args.norm == InputNorm::kInf ? lane_max(acc) : lane_sum(acc);
  }

  // Calls fn(p, now, count) with the new fp32 values `now` of the `count` elements at p, block by block; the same
  // bits on every call.
  template <typename F>
  FASTADV_INLINE static void for_each_new(Slice s, GroupStep step, const InputStepArgs& args, const F& fn) {
    for (int64_t token = 0; token < s.tokens; ++token) {
      const bool reading = step.finite && s.selected(token);  // g is 0 outside the mask (not read)
      scalar_t* row = s.delta + token * s.cols;
      const scalar_t* g_row = s.grad + token * s.cols;
      for_each_block<scalar_t>(s.cols, [&](int64_t col, int64_t count) FASTADV_INLINE {
        auto now = load_widened(row + col, count);
        if (step.finite) {
          Widened<scalar_t> g;
          if (reading) {
            g = load_widened(g_row + col, count);
          } else {
            g.fill(FloatVec(0.0f));
          }
          for (int k = 0; k < kWidened<scalar_t>; ++k) {
            now[k] = now[k] + (args.norm == InputNorm::kSign ? sign_step(g[k], args.lr)
                                                             : scaled_step(g[k], args.lr, step.denominator));
          }
        }
        fn(row + col, now, count);
      });
    }
  }

  // The new values stored, clamped for the "inf" bound (not the "l2" bound: see stored_scaled).
  static void stored(Slice s, GroupStep step, const InputStepArgs& args) {
    for_each_new(s, step, args, [&](scalar_t* p, Widened<scalar_t>& now, int64_t count) FASTADV_INLINE {
      if (args.bound == InputBound::kInf) {
        for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = clamped(now[k], args.radius);
      }
      store_rounded(p, now, count);
    });
  }

  // The sum of the squares of the slice's new values ("l2" bound).
  static float sizes(Slice s, GroupStep step, const InputStepArgs& args) {
    FloatVec total(0.0f);
    for_each_new(s, step, args, [&](scalar_t*, Widened<scalar_t>& now, int64_t) FASTADV_INLINE {
      for (int k = 0; k < kWidened<scalar_t>; ++k) total = at::vec::fmadd(now[k], now[k], total);  // lanes past: 0
    });
    return lane_sum(total);
  }

  static void stored_scaled(Slice s, GroupStep step, const InputStepArgs& args, float factor) {
    const FloatVec scale(factor);
    for_each_new(s, step, args, [&](scalar_t* p, Widened<scalar_t>& now, int64_t count) FASTADV_INLINE {
      for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = now[k] * scale;
      store_rounded(p, now, count);
    });
  }

  static void whole_group(const InputStepTensor& t, const InputStepArgs& args, int64_t group) {
    float total = 0.0f;
    for (int64_t k = 0; k < t.slices; ++k)
      total = with_partial(total, partial_norm(slice_of(t, group, k), args), args.norm);
    const GroupStep step = group_step(total, args.norm, args.denom_eps, args.denom_floor);
    t.norms[group] = step.n;
    if (args.bound != InputBound::kL2) {
      for (int64_t k = 0; k < t.slices; ++k) stored(slice_of(t, group, k), step, args);
      return;
    }
    float size = 0.0f;
    for (int64_t k = 0; k < t.slices; ++k) size += sizes(slice_of(t, group, k), step, args);
    const float factor = bound_factor(std::sqrt(size), args.radius);
    for (int64_t k = 0; k < t.slices; ++k) stored_scaled(slice_of(t, group, k), step, args, factor);
  }

  static void slice_phase(const InputStepTensor& t, const InputStepArgs& args, int64_t group, int64_t k) {
    const Slice s = slice_of(t, group, k);
    const int64_t first = group * t.slices;
    if (args.phase == InputPhase::kNorm) {
      t.partials[first + k] = partial_norm(s, args);
      return;
    }
    float total = 0.0f;  // as whole_group sums: slice by slice
    for (int64_t j = 0; j < t.slices; ++j) total = with_partial(total, t.partials[first + j], args.norm);
    const GroupStep step = group_step(total, args.norm, args.denom_eps, args.denom_floor);
    if (k == 0) t.norms[group] = step.n;
    if (args.phase == InputPhase::kStep) {
      if (args.bound == InputBound::kL2) {
        t.sizes[first + k] = sizes(s, step, args);
      } else {
        stored(s, step, args);
      }
      return;
    }
    float size = 0.0f;
    for (int64_t j = 0; j < t.slices; ++j) size += t.sizes[first + j];
    stored_scaled(s, step, args, bound_factor(std::sqrt(size), args.radius));
  }
};

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) {
  fastadv::impl_input_step<fastadv::cpu::Device, fastadv::cpu::input_step_kernel, fastadv::cpu::InputSlicing>(m);
}

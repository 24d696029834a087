// input_step on the CPU: each group (an example, or a token with per_token) by one thread, in passes over its rows
// (tokens): the masked gradient for its norm, then delta and the gradient for the new values (stored, or with the "l2"
// bound summed, recomputed and stored scaled in a third pass). The entry point is in ops.h, the parallel loop over the
// groups in cpu_apply.h (chunks of groups that depend on the shapes only: the same bits for any thread count).
#include <torch/library.h>

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

// The groups [begin, end) of the tensor.
template <typename scalar_t>
struct input_step_kernel {
  Sums operator()(const InputStepTensor& t, const InputStepArgs& args, int, int64_t begin, int64_t end) const {
    for (int64_t group = begin; group < end; ++group) step_group(t, args, group);
    return {};
  }

  static void step_group(const InputStepTensor& t, const InputStepArgs& args, int64_t group) {
    const int64_t first_token = group * t.group_tokens, cols = t.cols;
    auto* delta = static_cast<scalar_t*>(t.delta) + first_token * cols;
    const auto* grad = static_cast<const scalar_t*>(t.grad) + first_token * cols;
    const auto selected = [&](int64_t token) { return !t.mask || t.mask[first_token + token]; };

    FloatVec acc(0.0f);  // squares, or |g| maxima (NaN propagates)
    for (int64_t token = 0; token < t.group_tokens; ++token) {
      if (!selected(token)) continue;  // not even read: a NaN outside the mask must not count
      for_each_block<scalar_t>(cols, [&](int64_t col, int64_t count) FASTADV_INLINE {
        const auto g = load_widened(grad + token * cols + col, count);  // lanes past count: 0
        for (int k = 0; k < kWidened<scalar_t>; ++k) {
          acc = args.norm == InputNorm::kInf ? at::vec::maximum(acc, g[k].abs()) : at::vec::fmadd(g[k], g[k], acc);
        }
      });
    }
    const float n = args.norm == InputNorm::kInf ? lane_max(acc) : std::sqrt(lane_sum(acc));
    t.norms[group] = n;
    const bool finite = finite_norm(n);
    const float denominator = step_denominator(n, args.denom_eps, args.denom_floor);

    // Calls fn(p, now, count) with the new fp32 values `now` of the `count` elements at p, block by block; the same
    // bits on every call.
    const auto for_each_new = [&](const auto& fn) FASTADV_INLINE {
      for (int64_t token = 0; token < t.group_tokens; ++token) {
        const bool reading = finite && selected(token);  // g is 0 outside the mask (not read)
        scalar_t* row = delta + token * cols;
        const scalar_t* g_row = grad + token * cols;
        for_each_block<scalar_t>(cols, [&](int64_t col, int64_t count) FASTADV_INLINE {
          auto now = load_widened(row + col, count);
          if (finite) {
            Widened<scalar_t> g;
            if (reading) {
              g = load_widened(g_row + col, count);
            } else {
              g.fill(FloatVec(0.0f));
            }
            for (int k = 0; k < kWidened<scalar_t>; ++k) {
              now[k] = now[k] + (args.norm == InputNorm::kSign ? sign_step(g[k], args.lr)
                                                               : scaled_step(g[k], args.lr, denominator));
            }
          }
          fn(row + col, now, count);
        });
      }
    };

    if (args.bound != InputBound::kL2) {
      for_each_new([&](scalar_t* p, Widened<scalar_t>& now, int64_t count) FASTADV_INLINE {
        if (args.bound == InputBound::kInf) {
          for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = clamped(now[k], args.radius);
        }
        store_rounded(p, now, count);
      });
      return;
    }
    FloatVec sizes(0.0f);
    for_each_new([&](scalar_t*, Widened<scalar_t>& now, int64_t) FASTADV_INLINE {
      for (int k = 0; k < kWidened<scalar_t>; ++k) sizes = at::vec::fmadd(now[k], now[k], sizes);  // lanes past: 0
    });
    const FloatVec factor(bound_factor(std::sqrt(lane_sum(sizes)), args.radius));
    for_each_new([&](scalar_t* p, Widened<scalar_t>& now, int64_t count) FASTADV_INLINE {
      for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = now[k] * factor;
      store_rounded(p, now, count);
    });
  }
};

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) {
  fastadv::impl_input_step<fastadv::cpu::Device, fastadv::cpu::input_step_kernel>(m);
}

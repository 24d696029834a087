// perturb, measure and project on the CPU: one pass (see Pass) over the perturbed rows. The entry points are in
// ops.h, the parallel loop over the rows of the whole list in cpu_apply.h; here the row functor.
#include <torch/library.h>

#include "cpu_apply.h"
#include "cpu_utils.h"
#include "ops.h"

namespace fastadv::cpu {
namespace {

// One pass over the perturbed rows [begin, end) of one tensor; its share of ||W + scale * G - B||^2 for
// Pass::kMeasure.
template <typename scalar_t>
struct perturb_kernel {
  Sums operator()(const PerturbTensor& t, const PerturbArgs& args, int i, int64_t begin, int64_t end) const {
    const Pass pass = args.pass;
    const char* op = pass == Pass::kMeasure ? "measure" : pass == Pass::kProject ? "project" : "perturb";
    const int64_t cols = t.cols;
    auto* param = static_cast<scalar_t*>(t.param);
    auto* backup = static_cast<scalar_t*>(t.backup);
    const auto* grad = static_cast<const scalar_t*>(t.grad);
    const float step = args.scales[i], eps = static_cast<float>(args.eps);  // eps: box_eps (kBox)
    const Projection projection =
        pass == Pass::kProject ? projection_for(args.delta_sumsq[i], args.eps) : Projection{false, 1.0f};
    const FloatVec scale(step);
    float delta_sumsq = 0;
    for_each_row(
        t.rows, begin, end, t.param_rows,
        [&](int64_t row) { TORCH_CHECK(false, "fastadv::", op, ": row ", row, " is outside [0, ", t.param_rows, ")"); },
        [&](int64_t next) FASTADV_INLINE {
          prefetch_row(param + next * cols, cols * sizeof(scalar_t), pass != Pass::kMeasure);
          if (step != 0.0f) prefetch_row(grad + next * cols, cols * sizeof(scalar_t));
        },
        [&](int64_t j, int64_t row) FASTADV_INLINE {
          scalar_t* weights = param + row * cols;
          scalar_t* saved = backup + j * cols;
          const bool backing = j >= t.n_backed;                               // project: never (n_backed is every row)
          if (backing) std::memcpy(saved, weights, cols * sizeof(scalar_t));  // bit-exact; the row stays in L1
          if (step == 0.0f) return;
          FloatVec row_delta(0.0f);
          for_each_block<scalar_t>(cols, [&](int64_t col, int64_t count) FASTADV_INLINE {
            const auto old = load_widened(weights + col, count);
            const auto g = load_widened(grad + row * cols + col, count);
            Widened<scalar_t> now;
            for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = perturbed(old[k], g[k], scale);
            if (pass != Pass::kStep && (pass != Pass::kProject || projection.outside)) {
              const auto origin = backing ? old : load_widened(saved + col, count);  // lanes past count: 0 in both
              for (int k = 0; k < kWidened<scalar_t>; ++k) {
                if (pass == Pass::kMeasure) {
                  const FloatVec diff = now[k] - origin[k];
                  row_delta = at::vec::fmadd(diff, diff, row_delta);
                } else if (pass == Pass::kBox) {
                  now[k] = boxed(now[k], origin[k], eps);
                } else {
                  now[k] = lerp(origin[k], now[k], projection.factor);
                }
              }
            }
            if (pass != Pass::kMeasure) store_rounded(weights + col, now, count);
          });
          delta_sumsq += lane_sum(row_delta);
        });
    return {{delta_sumsq}};
  }
};

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { fastadv::impl_pass<fastadv::cpu::Device, fastadv::cpu::perturb_kernel>(m); }

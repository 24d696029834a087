// perturb on the CPU: backups of the new rows, then W += scale * G on the perturbed rows (projected onto the eps ball
// for PGD), every tensor of the list in one parallel region per pass.
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu_utils.h"

namespace fastadv::cpu {
namespace {

// One pass (see Pass) over the perturbed rows [begin, end) of one tensor; returns their share of
// ||W + scale * G - B||^2 for Pass::kMeasure, else 0.
template <typename scalar_t>
float perturb_rows(Pass pass, const at::Tensor& params, const at::Tensor& grads, const at::Tensor& backups,
                   const int64_t* index, int64_t begin, int64_t end, int64_t n_backed, Step step,
                   Projection projection) {
  const int64_t n_rows = params.size(0), cols = params.size(1);
  scalar_t* param = params.mutable_data_ptr<scalar_t>();
  const scalar_t* grad = grads.const_data_ptr<scalar_t>();
  scalar_t* backup = backups.mutable_data_ptr<scalar_t>();
  const FloatVec scale(step.scale);
  float delta_sumsq = 0;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = index[j];
    TORCH_CHECK(row >= 0 && row < n_rows, "fastadv::perturb: row ", row, " is outside [0, ", n_rows, ")");
    scalar_t* weights = param + row * cols;
    scalar_t* saved = backup + j * cols;
    const bool backing = pass != Pass::kProject && j >= n_backed;
    if (backing) std::memcpy(saved, weights, cols * sizeof(scalar_t));  // bit-exact; the row stays in L1
    if (!step.usable) continue;
    FloatVec row_delta(0.0f);
    for_each_block<scalar_t>(cols, [&](int64_t col, int64_t count) {
      const auto old = load_widened(weights + col, count);
      const auto g = load_widened(grad + row * cols + col, count);
      Widened<scalar_t> now;
      for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = perturbed(old[k], g[k], scale);
      if (pass == Pass::kMeasure) {
        const auto origin = backing ? old : load_widened(saved + col, count);  // lanes past count are 0 in both
        for (int k = 0; k < kWidened<scalar_t>; ++k) {
          const FloatVec diff = now[k] - origin[k];
          row_delta = at::vec::fmadd(diff, diff, row_delta);
        }
        return;
      }
      if (pass == Pass::kProject && projection.outside) {
        const auto origin = load_widened(saved + col, count);
        for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = lerp(origin[k], now[k], projection.factor);
      }
      store_rounded(weights + col, now, count);
    });
    delta_sumsq += lane_sum(row_delta);
  }
  return delta_sumsq;
}

void perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             c10::IntArrayRef n_backed, const at::Tensor& sumsq, double coef, std::optional<double> project_eps) {
  check_perturb(params, grads, rows, backups, n_backed, sumsq);
  const size_t n = params.size();
  if (n == 0) return;
  const at::Tensor sumsq64 = sumsq.to(at::kDouble).contiguous();
  std::vector<Step> steps(n);
  std::vector<Projection> projections(n, Projection{false, 1.0f});
  std::vector<at::Tensor> dense_grads(n), indices(n);
  std::vector<int64_t> counts(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    steps[i] = step_for(sumsq64.const_data_ptr<double>()[i], coef);
    dense_grads[i] = grads[i].contiguous();
    indices[i] = rows[i].contiguous();
    counts[i] = rows[i].size(0);
    row_bytes[i] = params[i].size(1) * params[i].element_size();
  }
  const RowChunks chunks(counts, row_bytes);
  std::vector<float> chunk_delta(chunks.size());
  const auto run = [&](Pass pass) {
    chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
      FASTADV_DISPATCH_FLOATING(params[i].scalar_type(), "fastadv::perturb", [&] {
        chunk_delta[chunk] = perturb_rows<scalar_t>(pass, params[i], dense_grads[i], backups[i],
                                                    indices[i].const_data_ptr<int64_t>(), begin, end, n_backed[i],
                                                    steps[i], projections[i]);
      });
    });
  };
  if (!project_eps.has_value()) {
    run(Pass::kStep);
    return;
  }
  run(Pass::kMeasure);
  for (size_t i = 0; i < n; ++i) {
    projections[i] = projection_for(static_cast<float>(chunks.sum(chunk_delta, static_cast<int>(i))), *project_eps);
  }
  run(Pass::kProject);
}

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { m.impl("perturb", &fastadv::cpu::perturb); }

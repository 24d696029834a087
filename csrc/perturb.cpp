// perturb, measure and project on the CPU: one pass (see Pass) over the perturbed rows of every tensor of the list in
// one parallel region; measure's ||W + scale * G - B||^2 as per-chunk partials reduced per tensor in chunk order.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu_utils.h"

namespace fastadv::cpu {
namespace {

// One pass over the perturbed rows [begin, end) of one tensor; returns their share of ||W + scale * G - B||^2 for
// Pass::kMeasure, else 0. `eps` is box_eps for Pass::kBox (rounded to fp32 by the caller).
template <typename scalar_t>
float pass_rows(const char* op, Pass pass, const at::Tensor& params, const at::Tensor& grads, const at::Tensor& backups,
                const int64_t* index, int64_t begin, int64_t end, int64_t n_backed, float step, float eps,
                Projection projection) {
  const int64_t n_rows = params.size(0), cols = params.size(1);
  // measure writes nothing to W, project nothing to the backups
  scalar_t* param = pass == Pass::kMeasure ? const_cast<scalar_t*>(params.const_data_ptr<scalar_t>())
                                           : params.mutable_data_ptr<scalar_t>();
  scalar_t* backup = pass == Pass::kProject ? const_cast<scalar_t*>(backups.const_data_ptr<scalar_t>())
                                            : backups.mutable_data_ptr<scalar_t>();
  const scalar_t* grad = grads.const_data_ptr<scalar_t>();
  const FloatVec scale(step);
  float delta_sumsq = 0;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = index[j];
    TORCH_CHECK(row >= 0 && row < n_rows, "fastadv::", op, ": row ", row, " is outside [0, ", n_rows, ")");
    scalar_t* weights = param + row * cols;
    scalar_t* saved = backup + j * cols;
    if (j + 1 < end && index[j + 1] >= 0 && index[j + 1] < n_rows) {
      prefetch_row(param + index[j + 1] * cols, cols * sizeof(scalar_t), pass != Pass::kMeasure);
      if (step != 0.0f) prefetch_row(grad + index[j + 1] * cols, cols * sizeof(scalar_t));
    }
    const bool backing = j >= n_backed;  // project: never (n_backed is every row)
    if (backing) std::memcpy(saved, weights, cols * sizeof(scalar_t));  // bit-exact; the row stays in L1
    if (step == 0.0f) continue;
    FloatVec row_delta(0.0f);
    for_each_block<scalar_t>(cols, [&](int64_t col, int64_t count) {
      const auto old = load_widened(weights + col, count);
      const auto g = load_widened(grad + row * cols + col, count);
      Widened<scalar_t> now;
      for (int k = 0; k < kWidened<scalar_t>; ++k) now[k] = perturbed(old[k], g[k], scale);
      if (pass != Pass::kStep && (pass != Pass::kProject || projection.outside)) {
        const auto origin = backing ? old : load_widened(saved + col, count);  // lanes past count are 0 in both
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
  }
  return delta_sumsq;
}

// Runs `pass` over every tensor in one parallel region; returns the per-tensor sums of the chunks' results (measure's
// ||W + scale * G - B||^2, 0 for the other passes). `eps`: box_eps (kBox) or the ball's radius (kProject);
// `delta_sumsq`: the norms of kProject.
std::vector<double> run_pass(const char* op, Pass pass, at::TensorList params, at::TensorList grads,
                             at::TensorList rows, at::TensorList backups, const std::vector<int64_t>& n_backed,
                             const at::Tensor& scales, double eps, const float* delta_sumsq) {
  const size_t n = params.size();
  const at::Tensor dense_scales = scales.contiguous();
  const float* scale = dense_scales.const_data_ptr<float>();
  std::vector<at::Tensor> dense_grads(n), indices(n);
  std::vector<Projection> projections(n, Projection{false, 1.0f});
  std::vector<int64_t> counts(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    indices[i] = rows[i].contiguous();
    counts[i] = rows[i].size(0);
    row_bytes[i] = params[i].size(1) * params[i].element_size();
    if (pass == Pass::kProject) projections[i] = projection_for(delta_sumsq[i], eps);
  }
  const RowChunks chunks(counts, row_bytes);
  std::vector<float> chunk_delta(chunks.size());
  chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
    FASTADV_DISPATCH_FLOATING(params[i].scalar_type(), "fastadv::perturb", [&] {
      chunk_delta[chunk] =
          pass_rows<scalar_t>(op, pass, params[i], dense_grads[i], backups[i], indices[i].const_data_ptr<int64_t>(),
                              begin, end, n_backed[i], scale[i], static_cast<float>(eps), projections[i]);
    });
  });
  std::vector<double> totals(n);
  for (size_t i = 0; i < n; ++i) totals[i] = chunks.sum(chunk_delta, static_cast<int>(i));
  return totals;
}

void perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             c10::IntArrayRef n_backed, const at::Tensor& scales, std::optional<double> box_eps) {
  check_pass("perturb", params, grads, rows, backups, n_backed, scales);
  if (params.empty()) return;
  run_pass("perturb", box_eps ? Pass::kBox : Pass::kStep, params, grads, rows, backups, n_backed.vec(), scales,
           box_eps.value_or(0.0), nullptr);
}

at::Tensor measure(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
                   c10::IntArrayRef n_backed, const at::Tensor& scales) {
  check_pass("measure", params, grads, rows, backups, n_backed, scales);
  at::Tensor delta_sumsq = at::empty({static_cast<int64_t>(params.size())}, scales.options().dtype(at::kFloat));
  if (params.empty()) return delta_sumsq;
  const auto totals =
      run_pass("measure", Pass::kMeasure, params, grads, rows, backups, n_backed.vec(), scales, 0.0, nullptr);
  for (size_t i = 0; i < totals.size(); ++i) delta_sumsq.mutable_data_ptr<float>()[i] = static_cast<float>(totals[i]);
  return delta_sumsq;
}

void project(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             const at::Tensor& scales, const at::Tensor& delta_sumsq, double eps) {
  check_pass("project", params, grads, rows, backups, std::nullopt, scales);
  if (params.empty()) return;
  check_per_tensor(delta_sumsq, params.size(), params[0].device(), "project", "delta_sumsq");
  std::vector<int64_t> every_row(params.size());  // every backup is written already
  for (size_t i = 0; i < params.size(); ++i) every_row[i] = rows[i].size(0);
  const at::Tensor norms = delta_sumsq.contiguous();
  run_pass("project", Pass::kProject, params, grads, rows, backups, every_row, scales, eps,
           norms.const_data_ptr<float>());
}

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) {
  m.impl("perturb", &fastadv::cpu::perturb);
  m.impl("measure", &fastadv::cpu::measure);
  m.impl("project", &fastadv::cpu::project);
}

// The entry points of the fastadv ops, written once for both devices (host code only). Each checks its arguments,
// describes every tensor of its lists to the kernels (a descriptor per op: pointers and sizes) and hands them to the
// device's apply with the op's row functor, as apex's multi_tensor_apply does:
//
//   Device::apply<Rows>(device, work, args, sums, out)
//
// The apply (cpu_apply.h: one parallel region over the rows of the whole list; cuda_apply.cuh: one launch per dtype
// group of up to kMaxTensors tensors) splits the rows, dispatches on each tensor's dtype and calls Rows<scalar_t>,
// the op's per-device functor (scan.cpp/.cu, perturb.cpp/.cu, restore.cpp/.cu), on its share of the rows. The
// functor returns its shares of the op's per-tensor sums; the apply reduces them per tensor in a fixed order into
// `out` ([tensors, sums]). impl_scan, impl_pass and impl_restore register a family's entry points for a device (from
// its TORCH_LIBRARY_IMPL, with the device's functor).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "checks.h"
#include "common.h"

namespace fastadv {

// A functor's shares of the per-tensor sums, sums[0..sums) of the apply (the others are ignored): scan's sum of
// squares, fresh-row count and parameters' sum of squares; row_sumsq's sum of squares; measure's
// ||W + scale * G - B||^2. In fp64 so that counts and fp32 partials convert exactly.
constexpr int kMaxSums = 3;
struct Sums {
  double value[kMaxSums];
};

// One tensor of an op's list as the op hands it to an apply: the functor's descriptor of it and the work it is.
template <typename T>
struct Work {
  T tensor;              // what the functor reads: pointers and sizes
  at::ScalarType dtype;  // the functor is instantiated per dtype
  int64_t rows;          // the rows the functor processes: split between threads (CPU) or blocks (CUDA)
  int64_t row_bytes;     // the bytes one of those rows reads (CPU: sizes the chunks)
  bool aligned;          // every row it reads or writes starts 16-byte aligned (CUDA: read in 16-byte packs)
};

// Whether every row of every tensor (2-D) starts 16-byte aligned.
inline bool rows_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    const auto row_bytes = t->size(1) * t->element_size();
    if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  }
  return true;
}

// ---- scan, row_sumsq ----

// Op-wide arguments of the ops that have none.
struct NoArgs {};

struct ScanTensor {
  const void* values;    // scan: the gradient; row_sumsq: the tensor
  const void* param;     // scan with params: summed too, else nullptr
  const int64_t* index;  // row_sumsq: the rows to read, else nullptr (every row)
  const bool* touched;   // scan only
  bool* fresh;           // scan only
  int64_t rows, tensor_rows, cols;
};

template <typename Device, template <typename> class Rows>
at::Tensor scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh,
                std::optional<at::TensorList> params) {
  check_scan(grads, touched, fresh, params);
  const size_t n = grads.size();
  // alive until the kernels are enqueued
  std::vector<at::Tensor> dense_grads(n), dense_touched(n), dense_params(params ? n : 0);
  std::vector<Work<ScanTensor>> work(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& grad = dense_grads[i] = grads[i].contiguous();
    dense_touched[i] = touched[i].contiguous();
    if (params) dense_params[i] = (*params)[i].contiguous();
    const at::Tensor& param = params ? dense_params[i] : grad;
    work[i] = {{grad.const_data_ptr(), params ? param.const_data_ptr() : nullptr, nullptr,
                dense_touched[i].const_data_ptr<bool>(), fresh[i].mutable_data_ptr<bool>(), grad.size(0), grad.size(0),
                grad.size(1)},
               grad.scalar_type(),
               grad.size(0),
               grad.size(1) * grad.element_size() * (params ? 2 : 1),
               rows_aligned({&grad, &param})};
  }
  at::Tensor stats = at::empty({static_cast<int64_t>(n), 3}, grads[0].options().dtype(at::kDouble));
  Device::template apply<Rows>(grads[0].device(), work, NoArgs{}, 3, stats);
  return stats;
}

template <typename Device, template <typename> class Rows>
at::Tensor row_sumsq(at::TensorList tensors, at::TensorList rows) {
  check_row_sumsq(tensors, rows);
  const size_t n = tensors.size();
  std::vector<at::Tensor> dense(n), indices(n);  // alive until the kernels are enqueued
  std::vector<Work<ScanTensor>> work(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = dense[i] = tensors[i].contiguous();
    const at::Tensor& index = indices[i] = rows[i].contiguous();
    work[i] = {{t.const_data_ptr(), nullptr, index.const_data_ptr<int64_t>(), nullptr, nullptr, index.size(0),
                t.size(0), t.size(1)},
               t.scalar_type(),
               index.size(0),
               t.size(1) * t.element_size(),
               rows_aligned({&t})};
  }
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, tensors[0].options().dtype(at::kDouble));
  Device::template apply<Rows>(tensors[0].device(), work, NoArgs{}, 1, out);
  return out;
}

template <typename Device, template <typename> class Rows>
void impl_scan(torch::Library& m) {
  m.impl("scan", &scan<Device, Rows>);
  m.impl("row_sumsq", &row_sumsq<Device, Rows>);
}

// ---- perturb, measure, project ----

struct PerturbTensor {
  void* param;  // measure: read only
  const void* grad;
  const int64_t* rows;
  void* backup;  // project: read only
  int64_t n_rows, param_rows, cols, n_backed;
};

struct PerturbArgs {
  Pass pass;
  const float* scales;       // per tensor of the op's lists
  const float* delta_sumsq;  // Pass::kProject: per tensor of the op's lists
  double eps;                // Pass::kBox: box_eps; Pass::kProject: the ball's radius
};

// Runs `pass` over every tensor of the (non-empty) lists. Pass::kMeasure sums into delta_sumsq; Pass::kProject reads
// its norms from there.
template <typename Device, template <typename> class Rows>
void run_pass(Pass pass, at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
              const std::vector<int64_t>& n_backed, const at::Tensor& scales, double eps,
              const at::Tensor& delta_sumsq) {
  const size_t n = params.size();
  // alive until the kernels are enqueued
  const at::Tensor dense_scales = scales.contiguous();
  std::vector<at::Tensor> dense_grads(n), indices(n);
  std::vector<Work<PerturbTensor>> work(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = dense_grads[i] = grads[i].contiguous();
    const at::Tensor& index = indices[i] = rows[i].contiguous();
    // measure writes nothing to W, project nothing to the backups
    void* weights = pass == Pass::kMeasure ? const_cast<void*>(param.const_data_ptr()) : param.mutable_data_ptr();
    void* backup =
        pass == Pass::kProject ? const_cast<void*>(backups[i].const_data_ptr()) : backups[i].mutable_data_ptr();
    work[i] = {{weights, grad.const_data_ptr(), index.const_data_ptr<int64_t>(), backup, index.size(0), param.size(0),
                param.size(1), n_backed[i]},
               param.scalar_type(),
               index.size(0),
               param.size(1) * param.element_size(),
               rows_aligned({&param, &grad, &backups[i]})};
  }
  const PerturbArgs args{pass, dense_scales.const_data_ptr<float>(),
                         pass == Pass::kProject ? delta_sumsq.const_data_ptr<float>() : nullptr, eps};
  const bool measuring = pass == Pass::kMeasure;
  Device::template apply<Rows>(params[0].device(), work, args, measuring ? 1 : 0,
                               measuring ? delta_sumsq : at::Tensor());
}

template <typename Device, template <typename> class Rows>
void perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             c10::IntArrayRef n_backed, const at::Tensor& scales, std::optional<double> box_eps) {
  check_pass("perturb", params, grads, rows, backups, n_backed, scales);
  if (params.empty()) return;
  run_pass<Device, Rows>(box_eps ? Pass::kBox : Pass::kStep, params, grads, rows, backups, n_backed.vec(), scales,
                         box_eps.value_or(0.0), at::Tensor());
}

template <typename Device, template <typename> class Rows>
at::Tensor measure(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
                   c10::IntArrayRef n_backed, const at::Tensor& scales) {
  check_pass("measure", params, grads, rows, backups, n_backed, scales);
  // every element is written by the apply's reduction
  at::Tensor delta_sumsq = at::empty({static_cast<int64_t>(params.size())}, scales.options().dtype(at::kFloat));
  if (params.empty()) return delta_sumsq;
  run_pass<Device, Rows>(Pass::kMeasure, params, grads, rows, backups, n_backed.vec(), scales, 0.0, delta_sumsq);
  return delta_sumsq;
}

template <typename Device, template <typename> class Rows>
void project(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
             const at::Tensor& scales, const at::Tensor& delta_sumsq, double eps) {
  check_pass("project", params, grads, rows, backups, std::nullopt, scales);
  if (params.empty()) return;
  check_per_tensor(delta_sumsq, params.size(), params[0].device(), "project", "delta_sumsq");
  std::vector<int64_t> every_row(params.size());  // every backup is written already
  for (size_t i = 0; i < params.size(); ++i) every_row[i] = rows[i].size(0);
  run_pass<Device, Rows>(Pass::kProject, params, grads, rows, backups, every_row, scales, eps,
                         delta_sumsq.contiguous());
}

template <typename Device, template <typename> class Rows>
void impl_pass(torch::Library& m) {
  m.impl("perturb", &perturb<Device, Rows>);
  m.impl("measure", &measure<Device, Rows>);
  m.impl("project", &project<Device, Rows>);
}

// ---- restore ----

struct RestoreTensor {
  void* param;
  const int64_t* rows;
  const void* backup;
  int64_t n_rows, param_rows, cols;
};

template <typename Device, template <typename> class Rows>
void restore(at::TensorList params, at::TensorList rows, at::TensorList backups) {
  check_rows("restore", params, rows, backups);
  const size_t n = params.size();
  if (n == 0) return;
  std::vector<at::Tensor> indices(n);  // alive until the kernels are enqueued
  std::vector<Work<RestoreTensor>> work(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& index = indices[i] = rows[i].contiguous();
    work[i] = {{param.mutable_data_ptr(), index.const_data_ptr<int64_t>(), backups[i].const_data_ptr(), index.size(0),
                param.size(0), param.size(1)},
               param.scalar_type(),
               index.size(0),
               param.size(1) * param.element_size(),
               rows_aligned({&param, &backups[i]})};
  }
  Device::template apply<Rows>(params[0].device(), work, NoArgs{}, 0, at::Tensor());
}

template <typename Device, template <typename> class Rows>
void impl_restore(torch::Library& m) {
  m.impl("restore", &restore<Device, Rows>);
}

// ---- input_step ----

// The one tensor of input_step. A "row" of the apply is a group (an example, or a token with per_token) in
// InputPhase::kWhole, else a slice of a group (see InputPhase).
struct InputStepTensor {
  void* delta;
  const void* grad;
  const bool* mask;  // [B, T], or nullptr: every token
  float* norms;      // one per group
  float* partials;   // split groups: one per slice, its partial norm
  float* sizes;      // split groups, "l2" bound: one per slice, the sum of squares of its new values
  int64_t groups, group_tokens, cols;
  int64_t slices, slice_tokens;  // per group; the last slice may have fewer tokens

  // The first token of slice k of a group (a row of the [B * T, D] views), and the slice's token count.
  FASTADV_HD int64_t slice_start(int64_t group, int64_t k) const { return group * group_tokens + k * slice_tokens; }
  FASTADV_HD int64_t slice_size(int64_t k) const {
    const int64_t left = group_tokens - k * slice_tokens;
    return left < slice_tokens ? left : slice_tokens;
  }
};

struct InputStepArgs {
  InputNorm norm;
  InputBound bound;
  InputPhase phase;
  bool per_token;
  float lr, denom_eps, denom_floor, radius;  // rounded to fp32 once, as the torch backend's fp32 math does
};

// Slicing, the device's policy (input_step.cpp, input_step.cu): slice_tokens(cols, element_size), the tokens of an
// example's slice; split(groups), whether examples of several slices are split between teams.
template <typename Device, template <typename> class Rows, typename Slicing>
at::Tensor input_step(const at::Tensor& delta, const at::Tensor& grad, const std::optional<at::Tensor>& mask, double lr,
                      c10::string_view norm, bool per_token, double denom_eps, double denom_floor,
                      c10::string_view bound, double radius) {
  const InputModes modes = check_input_step(delta, grad, mask, lr, norm, denom_eps, denom_floor, bound, radius);
  const int64_t batch = delta.size(0), tokens = delta.size(1), cols = delta.size(2);
  const int64_t group_tokens = per_token ? 1 : tokens;
  // every element is written by the group's functor
  at::Tensor norms = per_token ? at::empty({batch, tokens}, delta.options().dtype(at::kFloat))
                               : at::empty({batch}, delta.options().dtype(at::kFloat));
  const int64_t groups = norms.numel();
  if (groups == 0) return norms;
  const int64_t slice_tokens = per_token ? 1 : Slicing::slice_tokens(cols, delta.element_size());
  const int64_t slices = std::max<int64_t>(1, ceil_div(group_tokens, slice_tokens));
  const bool split = slices > 1 && Slicing::split(groups);
  // alive until the kernels are enqueued; every element written by its slice's functor
  const at::Tensor flags = mask ? mask->contiguous() : at::Tensor();
  const at::Tensor partials = split ? at::empty({groups * slices}, norms.options()) : at::Tensor();
  const bool sized = split && modes.bound == InputBound::kL2;
  const at::Tensor sizes = sized ? at::empty({groups * slices}, norms.options()) : at::Tensor();
  const at::Tensor delta_rows = delta.view({batch * tokens, cols}), grad_rows = grad.view({batch * tokens, cols});
  const int64_t row_tokens = split ? slice_tokens : group_tokens;
  const std::vector<Work<InputStepTensor>> work{
      {{delta.mutable_data_ptr(), grad.const_data_ptr(), mask ? flags.const_data_ptr<bool>() : nullptr,
        norms.mutable_data_ptr<float>(), split ? partials.mutable_data_ptr<float>() : nullptr,
        sized ? sizes.mutable_data_ptr<float>() : nullptr, groups, group_tokens, cols, slices, slice_tokens},
       delta.scalar_type(),
       split ? groups * slices : groups,
       2 * row_tokens * cols * delta.element_size(),  // delta and grad
       rows_aligned({&delta_rows, &grad_rows})}};
  InputStepArgs args{modes.norm,
                     modes.bound,
                     split ? InputPhase::kNorm : InputPhase::kWhole,
                     per_token,
                     static_cast<float>(lr),
                     static_cast<float>(denom_eps),
                     static_cast<float>(denom_floor),
                     static_cast<float>(radius)};
  Device::template apply<Rows>(delta.device(), work, args, 0, at::Tensor());
  if (!split) return norms;
  args.phase = InputPhase::kStep;
  Device::template apply<Rows>(delta.device(), work, args, 0, at::Tensor());
  if (sized) {
    args.phase = InputPhase::kScale;
    Device::template apply<Rows>(delta.device(), work, args, 0, at::Tensor());
  }
  return norms;
}

template <typename Device, template <typename> class Rows, typename Slicing>
void impl_input_step(torch::Library& m) {
  m.impl("input_step", &input_step<Device, Rows, Slicing>);
}

}  // namespace fastadv

// Argument checks of the ops, shared by the CPU and CUDA implementations (host code only). The kernels rely on
// what is checked here: every tensor on one device, parameters/backups 2-D and contiguous (they are written in
// place), gradients/backups of the parameter's dtype, row indices int64, per-tensor vectors float32 of the list's
// length. Row indices are range-checked where they are read (TORCH_CHECK on the CPU, CUDA_KERNEL_ASSERT on CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace fastadv {

inline void check_floating(const at::Tensor& t, const char* op, const char* what, size_t i) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastadv::", op, ": ", what, "[", i,
              "] is ", dtype, "; expected float32, bfloat16 or float16");
}

inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.device() == device, "fastadv::", op, ": ", what, "[", i, "] is on ", t.device(), ", expected ", device);
}

inline void check_count(size_t count, size_t expected, const char* op, const char* what) {
  TORCH_CHECK(count == expected, "fastadv::", op, ": ", count, " ", what, " for ", expected, " parameters");
}

inline void check_row_flags(const at::Tensor& flags, int64_t rows, const at::Device& device, const char* op,
                            const char* what, size_t i) {
  check_device(flags, device, op, what, i);
  TORCH_CHECK(flags.scalar_type() == at::kBool && flags.dim() == 1 && flags.size(0) == rows, "fastadv::", op, ": ",
              what, "[", i, "] must be a bool vector of ", rows, " rows, got ", flags.scalar_type(), " ",
              flags.sizes());
}

// A 2-D [rows, cols] tensor of a supported dtype on `device` (read, not written).
inline void check_matrix(const at::Tensor& t, const at::Device& device, const char* op, const char* what, size_t i) {
  check_device(t, device, op, what, i);
  check_floating(t, op, what, i);
  TORCH_CHECK(t.dim() == 2, "fastadv::", op, ": ", what, "[", i, "] must be 2-D [rows, cols], got ", t.sizes());
}

// `other` (a gradient, or scan's parameter) has the shape and dtype of `like`.
inline void check_same(const at::Tensor& other, const at::Tensor& like, const char* op, const char* what,
                       const char* like_what, size_t i) {
  check_device(other, like.device(), op, what, i);
  TORCH_CHECK(other.sizes() == like.sizes() && other.scalar_type() == like.scalar_type(), "fastadv::", op, ": ", what,
              "[", i, "] is ", other.scalar_type(), " ", other.sizes(), " but ", like_what, "[", i, "] is ",
              like.scalar_type(), " ", like.sizes());
}

inline void check_index(const at::Tensor& rows, const at::Device& device, const char* op, size_t i) {
  check_device(rows, device, op, "rows", i);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "fastadv::", op, ": rows[", i,
              "] must be an int64 vector, got ", rows.scalar_type(), " ", rows.sizes());
}

// A float32 vector with one value per tensor (scales, delta_sumsq) on `device`.
inline void check_per_tensor(const at::Tensor& t, size_t n, const at::Device& device, const char* op,
                             const char* what) {
  TORCH_CHECK(t.device() == device, "fastadv::", op, ": ", what, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == static_cast<int64_t>(n), "fastadv::", op,
              ": ", what, " must be a float32 vector of ", n, " values, got ", t.scalar_type(), " ", t.sizes());
}

inline void check_scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh,
                       const std::optional<at::TensorList>& params) {
  TORCH_CHECK(!grads.empty(), "fastadv::scan: no gradients");
  check_count(touched.size(), grads.size(), "scan", "touched");
  check_count(fresh.size(), grads.size(), "scan", "fresh");
  if (params) check_count(params->size(), grads.size(), "scan", "params");
  const auto device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    check_matrix(grads[i], device, "scan", "grads", i);
    if (params) check_same((*params)[i], grads[i], "scan", "params", "grads", i);
    check_row_flags(touched[i], grads[i].size(0), device, "scan", "touched", i);
    check_row_flags(fresh[i], grads[i].size(0), device, "scan", "fresh", i);
    TORCH_CHECK(fresh[i].is_contiguous(), "fastadv::scan: fresh[", i, "] must be contiguous (it is written in place)");
  }
}

inline void check_row_sumsq(at::TensorList tensors, at::TensorList rows) {
  TORCH_CHECK(!tensors.empty(), "fastadv::row_sumsq: no tensors");
  check_count(rows.size(), tensors.size(), "row_sumsq", "row lists");
  const auto device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_matrix(tensors[i], device, "row_sumsq", "tensors", i);
    check_index(rows[i], device, "row_sumsq", i);
  }
}

// The checks shared by perturb, measure, project and restore: params[i] is written (read by measure) at rows[i],
// backups[i] holds those rows.
inline void check_rows(const char* op, at::TensorList params, at::TensorList rows, at::TensorList backups) {
  check_count(rows.size(), params.size(), op, "row lists");
  check_count(backups.size(), params.size(), op, "backups");
  if (params.empty()) return;
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& param = params[i];
    check_matrix(param, device, op, "params", i);
    TORCH_CHECK(param.is_contiguous(), "fastadv::", op, ": params[", i,
                "] must be contiguous (it is written in place), got strides ", param.strides());
    check_index(rows[i], device, op, i);
    const auto& backup = backups[i];
    check_device(backup, device, op, "backups", i);
    TORCH_CHECK(backup.scalar_type() == param.scalar_type(), "fastadv::", op, ": backups[", i, "] is ",
                backup.scalar_type(), " but params[", i, "] is ", param.scalar_type());
    TORCH_CHECK(backup.dim() == 2 && backup.is_contiguous() && backup.size(1) == param.size(1) &&
                    backup.size(0) >= rows[i].size(0),
                "fastadv::", op, ": backups[", i, "] must be a contiguous [>= ", rows[i].size(0), ", ", param.size(1),
                "] tensor, got ", backup.sizes());
  }
}

// perturb, measure and project (project passes no n_backed: its backups are all written).
inline void check_pass(const char* op, at::TensorList params, at::TensorList grads, at::TensorList rows,
                       at::TensorList backups, std::optional<c10::IntArrayRef> n_backed, const at::Tensor& scales) {
  check_rows(op, params, rows, backups);
  check_count(grads.size(), params.size(), op, "grads");
  if (n_backed) check_count(n_backed->size(), params.size(), op, "n_backed counts");
  if (params.empty()) return;
  check_per_tensor(scales, params.size(), params[0].device(), op, "scales");
  for (size_t i = 0; i < params.size(); ++i) {
    check_same(grads[i], params[i], op, "grads", "params", i);
    if (!n_backed) continue;
    const int64_t backed = (*n_backed)[i];
    TORCH_CHECK(backed >= 0 && backed <= rows[i].size(0), "fastadv::", op, ": n_backed[", i, "] = ", backed,
                " is outside [0, ", rows[i].size(0), "]");
  }
}

// input_step's norm and bound, as the kernels take them.
struct InputModes {
  InputNorm norm;
  InputBound bound;
};

inline InputModes check_input_step(const at::Tensor& delta, const at::Tensor& grad,
                                   const std::optional<at::Tensor>& mask, double lr, c10::string_view norm,
                                   double denom_eps, double denom_floor, c10::string_view bound, double radius) {
  const auto dtype = delta.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastadv::input_step: delta is ",
              dtype, "; expected float32, bfloat16 or float16");
  TORCH_CHECK(delta.dim() == 3 && delta.is_contiguous(), "fastadv::input_step: delta must be a contiguous [B, T, D] ",
              "tensor (it is written in place), got sizes ", delta.sizes(), " and strides ", delta.strides());
  TORCH_CHECK(grad.device() == delta.device(), "fastadv::input_step: grad is on ", grad.device(), ", delta on ",
              delta.device());
  TORCH_CHECK(grad.sizes() == delta.sizes() && grad.scalar_type() == dtype && grad.is_contiguous(),
              "fastadv::input_step: grad must be a contiguous tensor of delta's shape and dtype (", dtype, " ",
              delta.sizes(), "), got ", grad.scalar_type(), " ", grad.sizes(), " with strides ", grad.strides());
  if (mask) {
    TORCH_CHECK(mask->device() == delta.device(), "fastadv::input_step: mask is on ", mask->device(), ", delta on ",
                delta.device());
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == delta.size(0) &&
                    mask->size(1) == delta.size(1),
                "fastadv::input_step: mask must be a bool [B, T] = [", delta.size(0), ", ", delta.size(1),
                "] tensor, got ", mask->scalar_type(), " ", mask->sizes());
  }
  InputModes modes{};
  if (norm == "l2") {
    modes.norm = InputNorm::kL2;
  } else if (norm == "inf") {
    modes.norm = InputNorm::kInf;
  } else {
    TORCH_CHECK(norm == "sign", "fastadv::input_step: norm must be \"l2\", \"inf\" or \"sign\", got \"", norm, "\"");
    modes.norm = InputNorm::kSign;
  }
  if (bound == "none") {
    modes.bound = InputBound::kNone;
  } else if (bound == "l2") {
    modes.bound = InputBound::kL2;
  } else {
    TORCH_CHECK(bound == "inf", "fastadv::input_step: bound must be \"none\", \"l2\" or \"inf\", got \"", bound, "\"");
    modes.bound = InputBound::kInf;
  }
  TORCH_CHECK(std::isfinite(lr), "fastadv::input_step: lr must be finite, got ", lr);
  if (modes.norm != InputNorm::kSign) {  // a zero gradient would divide 0 by 0
    TORCH_CHECK(std::isfinite(denom_eps + denom_floor) && denom_eps >= 0 && denom_floor >= 0 &&
                    (denom_eps > 0 || denom_floor > 0),
                "fastadv::input_step: denom_eps and denom_floor must be finite, >= 0 and not both 0, got ", denom_eps,
                " and ", denom_floor);
  }
  if (modes.bound != InputBound::kNone) {
    TORCH_CHECK(std::isfinite(radius) && radius >= 0, "fastadv::input_step: radius must be finite and >= 0, got ",
                radius);
  }
  return modes;
}

}  // namespace fastadv

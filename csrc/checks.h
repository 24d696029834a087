// Argument checks of the ops, shared by the CPU and CUDA implementations (host code only). The kernels rely on
// what is checked here: every tensor on one device, parameters/backups 2-D and contiguous (they are written in
// place), gradients/backups of the parameter's dtype, row indices int64.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

inline void check_scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh) {
  TORCH_CHECK(!grads.empty(), "fastadv::scan: no gradients");
  check_count(touched.size(), grads.size(), "scan", "touched");
  check_count(fresh.size(), grads.size(), "scan", "fresh");
  const auto device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    check_device(grads[i], device, "scan", "grads", i);
    check_floating(grads[i], "scan", "grads", i);
    TORCH_CHECK(grads[i].dim() == 2, "fastadv::scan: grads[", i, "] must be 2-D [rows, cols], got ", grads[i].sizes());
    check_row_flags(touched[i], grads[i].size(0), device, "scan", "touched", i);
    check_row_flags(fresh[i], grads[i].size(0), device, "scan", "fresh", i);
    TORCH_CHECK(fresh[i].is_contiguous(), "fastadv::scan: fresh[", i, "] must be contiguous (it is written in place)");
  }
}

// The checks shared by perturb and restore: params[i] is written at rows[i], backups[i] holds those rows.
inline void check_rows(const char* op, at::TensorList params, at::TensorList rows, at::TensorList backups) {
  check_count(rows.size(), params.size(), op, "row lists");
  check_count(backups.size(), params.size(), op, "backups");
  if (params.empty()) return;
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& param = params[i];
    check_device(param, device, op, "params", i);
    check_floating(param, op, "params", i);
    TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "fastadv::", op, ": params[", i,
                "] must be a contiguous 2-D [rows, cols] tensor (it is written in place), got ", param.sizes());
    check_device(rows[i], device, op, "rows", i);
    TORCH_CHECK(rows[i].scalar_type() == at::kLong && rows[i].dim() == 1, "fastadv::", op, ": rows[", i,
                "] must be an int64 vector, got ", rows[i].scalar_type(), " ", rows[i].sizes());
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

inline void check_perturb(at::TensorList params, at::TensorList grads, at::TensorList rows, at::TensorList backups,
                          c10::IntArrayRef n_backed, const at::Tensor& sumsq) {
  check_rows("perturb", params, rows, backups);
  check_count(grads.size(), params.size(), "perturb", "grads");
  check_count(n_backed.size(), params.size(), "perturb", "n_backed counts");
  if (params.empty()) return;
  TORCH_CHECK(sumsq.device() == params[0].device(), "fastadv::perturb: sumsq is on ", sumsq.device(), ", expected ",
              params[0].device());
  TORCH_CHECK(sumsq.dim() == 1 && sumsq.size(0) == static_cast<int64_t>(params.size()) &&
                  at::isFloatingType(sumsq.scalar_type()),
              "fastadv::perturb: sumsq must be a floating vector of ", params.size(), " values, got ",
              sumsq.scalar_type(), " ", sumsq.sizes());
  for (size_t i = 0; i < params.size(); ++i) {
    check_device(grads[i], params[0].device(), "perturb", "grads", i);
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type(),
                "fastadv::perturb: grads[", i, "] is ", grads[i].scalar_type(), " ", grads[i].sizes(), " but params[",
                i, "] is ", params[i].scalar_type(), " ", params[i].sizes());
    TORCH_CHECK(n_backed[i] >= 0 && n_backed[i] <= rows[i].size(0), "fastadv::perturb: n_backed[", i, "] = ",
                n_backed[i], " is outside [0, ", rows[i].size(0), "]");
  }
}

}  // namespace fastadv

// The schemas of the fastadv ops (torch.ops.fastadv.*). The kernels register themselves next to their row functors:
// TORCH_LIBRARY_IMPL(fastadv, CPU, m) in each op's .cpp, TORCH_LIBRARY_IMPL(fastadv, CUDA, m) in each op's .cu
// (a separate library, loaded after this one), both with the entry points of ops.h; fastadv/backends/ext_ops.py adds
// the fake (meta) kernels.
//
// Lists are Tensor[]: one op call covers every target parameter. (a!)/(b!) mark the lists written in place so that
// torch.compile functionalises the calls correctly (input_step takes one [B, T, D] perturbation, not a list). The
// contract of each op is in fastadv/backends/contract.py.
#include <torch/library.h>

TORCH_LIBRARY(fastadv, m) {
  m.def("scan(Tensor[] grads, Tensor[] touched, Tensor(a!)[] fresh, Tensor[]? params=None) -> Tensor");
  m.def("row_sumsq(Tensor[] tensors, Tensor[] rows) -> Tensor");
  m.def(
      "perturb(Tensor(a!)[] params, Tensor[] grads, Tensor[] rows, Tensor(b!)[] backups, int[] n_backed, "
      "Tensor scales, float? box_eps=None) -> ()");
  m.def(
      "measure(Tensor[] params, Tensor[] grads, Tensor[] rows, Tensor(a!)[] backups, int[] n_backed, "
      "Tensor scales) -> Tensor");
  m.def(
      "project(Tensor(a!)[] params, Tensor[] grads, Tensor[] rows, Tensor[] backups, Tensor scales, "
      "Tensor delta_sumsq, float eps) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] rows, Tensor[] backups) -> ()");
  m.def(
      "input_step(Tensor(a!) delta, Tensor grad, Tensor? mask, float lr, str norm, bool per_token, float denom_eps, "
      "float denom_floor, str bound, float radius) -> Tensor");
}

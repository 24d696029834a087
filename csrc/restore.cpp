// restore on the CPU: copy the backups back into their rows, bit-exact (bytes, whatever the dtype).
#include <torch/library.h>

#include "checks.h"
#include "cpu_utils.h"

namespace fastadv::cpu {
namespace {

void restore(at::TensorList params, at::TensorList rows, at::TensorList backups) {
  check_rows("restore", params, rows, backups);
  const size_t n = params.size();
  std::vector<at::Tensor> indices(n);
  std::vector<int64_t> counts(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    indices[i] = rows[i].contiguous();
    counts[i] = rows[i].size(0);
    row_bytes[i] = params[i].size(1) * params[i].element_size();
  }
  const RowChunks chunks(counts, row_bytes);
  chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t /*chunk*/) {
    const int64_t n_rows = params[i].size(0);
    auto* param = static_cast<char*>(params[i].mutable_data_ptr());
    const auto* backup = static_cast<const char*>(backups[i].const_data_ptr());
    const int64_t* index = indices[i].const_data_ptr<int64_t>();
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = index[j];
      TORCH_CHECK(row >= 0 && row < n_rows, "fastadv::restore: rows[", i, "] holds ", row, ", outside [0, ", n_rows,
                  ")");
      if (j + 1 < end && index[j + 1] >= 0 && index[j + 1] < n_rows) {
        prefetch_row(param + index[j + 1] * row_bytes[i], row_bytes[i], true);
      }
      std::memcpy(param + row * row_bytes[i], backup + j * row_bytes[i], row_bytes[i]);
    }
  });
}

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { m.impl("restore", &fastadv::cpu::restore); }

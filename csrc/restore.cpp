// restore on the CPU: copy the backups back into their rows, bit-exact. The entry point is in ops.h, the parallel
// loop over the rows of the whole list in cpu_apply.h; here the row functor.
#include <torch/library.h>

#include "cpu_apply.h"
#include "cpu_utils.h"
#include "ops.h"

namespace fastadv::cpu {
namespace {

template <typename scalar_t>
struct restore_kernel {
  Sums operator()(const RestoreTensor& t, NoArgs, int i, int64_t begin, int64_t end) const {
    auto* param = static_cast<scalar_t*>(t.param);
    const auto* backup = static_cast<const scalar_t*>(t.backup);
    const int64_t cols = t.cols;
    for_each_row(
        t.rows, begin, end, t.param_rows,
        [&](int64_t row) {
          TORCH_CHECK(false, "fastadv::restore: rows[", i, "] holds ", row, ", outside [0, ", t.param_rows, ")");
        },
        [&](int64_t next) FASTADV_INLINE { prefetch_row(param + next * cols, cols * sizeof(scalar_t), true); },
        [&](int64_t j, int64_t row)
            FASTADV_INLINE { std::memcpy(param + row * cols, backup + j * cols, cols * sizeof(scalar_t)); });
    return {};
  }
};

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { fastadv::impl_restore<fastadv::cpu::Device, fastadv::cpu::restore_kernel>(m); }

// scan and row_sumsq on the CPU: one read of each gradient (and parameter), or of the listed rows. The entry points
// are in ops.h, the parallel loop over the rows of the whole list in cpu_apply.h; here the row functor.
#include <torch/library.h>

#include "cpu_apply.h"
#include "cpu_utils.h"
#include "ops.h"

namespace fastadv::cpu {
namespace {

struct RowScan {
  float sumsq;
  bool nonzero;
};

// The fp32 sum of squares of a row and whether any element is non-zero, in one pass. Four independent accumulators
// hide the FMA latency so that the loop runs at memory speed; the OR of the bit patterns costs one op per vector
// (row_sumsq and the parameters of scan use only the sum).
template <typename scalar_t>
RowScan scan_row(const scalar_t* row, int64_t cols) {
  constexpr int64_t kStep = at::vec::Vectorized<scalar_t>::size();
  constexpr int kAccumulators = 4;
  constexpr int kLoads = kAccumulators / kWidened<scalar_t>;  // loads per iteration
  std::array<FloatVec, kAccumulators> sums;
  sums.fill(FloatVec(0.0f));
  FloatVec bits(0.0f);
  int64_t col = 0;
  for (; col + kLoads * kStep <= cols; col += kLoads * kStep) {
    for (int load = 0; load < kLoads; ++load) {
      const auto values = load_widened(row + col + load * kStep, kStep);
      for (int k = 0; k < kWidened<scalar_t>; ++k) {
        auto& sum = sums[load * kWidened<scalar_t> + k];
        sum = at::vec::fmadd(values[k], values[k], sum);
        bits = bits | values[k];
      }
    }
  }
  for_each_block<scalar_t>(cols - col, [&](int64_t offset, int64_t count) FASTADV_INLINE {
    const auto values = load_widened(row + col + offset, count);
    for (int k = 0; k < kWidened<scalar_t>; ++k) {
      sums[k] = at::vec::fmadd(values[k], values[k], sums[k]);
      bits = bits | values[k];
    }
  });
  return {lane_sum((sums[0] + sums[1]) + (sums[2] + sums[3])), magnitude_bits_nonzero(lane_bits_or(bits))};
}

// scan and row_sumsq over the rows [begin, end) of one tensor (row_sumsq: of its index): the shares of the sum of
// squares, the fresh-row count (scan, which also writes the fresh flags) and the parameters' sum of squares.
template <typename scalar_t>
struct scan_kernel {
  Sums operator()(const ScanTensor& t, NoArgs, int i, int64_t begin, int64_t end) const {
    const auto* values = static_cast<const scalar_t*>(t.values);
    const auto* param = static_cast<const scalar_t*>(t.param);
    const int64_t cols = t.cols;
    float sumsq = 0, param_sumsq = 0;
    int64_t count = 0;
    for_each_row(
        t.index, begin, end, t.tensor_rows,
        [&](int64_t row) {
          TORCH_CHECK(false, "fastadv::row_sumsq: rows[", i, "] holds ", row, ", outside [0, ", t.tensor_rows, ")");
        },
        [&](int64_t next) FASTADV_INLINE { prefetch_row(values + next * cols, cols * sizeof(scalar_t)); },
        [&](int64_t, int64_t row) FASTADV_INLINE {
          const RowScan scanned = scan_row(values + row * cols, cols);
          sumsq += scanned.sumsq;
          if (param) param_sumsq += scan_row(param + row * cols, cols).sumsq;
          if (!t.fresh) return;
          const bool flag = scanned.nonzero && !t.touched[row];
          t.fresh[row] = flag;
          count += flag;
        });
    return {{sumsq, static_cast<double>(count), param_sumsq}};
  }
};

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { fastadv::impl_scan<fastadv::cpu::Device, fastadv::cpu::scan_kernel>(m); }

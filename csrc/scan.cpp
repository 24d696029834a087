// scan on the CPU: one read of each gradient, all tensors of the list in one parallel region.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_utils.h"

namespace fastadv::cpu {
namespace {

struct RowScan {
  float sumsq;
  bool nonzero;
};

// The fp32 sum of squares of a row and whether any element is non-zero, in one pass. Four independent accumulators
// hide the FMA latency so that the loop runs at memory speed; the OR of the bit patterns costs one op per vector.
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
  for_each_block<scalar_t>(cols - col, [&](int64_t offset, int64_t count) {
    const auto values = load_widened(row + col + offset, count);
    for (int k = 0; k < kWidened<scalar_t>; ++k) {
      sums[k] = at::vec::fmadd(values[k], values[k], sums[k]);
      bits = bits | values[k];
    }
  });
  return {lane_sum((sums[0] + sums[1]) + (sums[2] + sums[3])), magnitude_bits_nonzero(lane_bits_or(bits))};
}

at::Tensor scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh) {
  check_scan(grads, touched, fresh);
  const size_t n = grads.size();
  std::vector<at::Tensor> dense_grads(n), dense_touched(n);
  std::vector<int64_t> rows(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    dense_touched[i] = touched[i].contiguous();
    rows[i] = grads[i].size(0);
    row_bytes[i] = grads[i].size(1) * grads[i].element_size();
  }
  const RowChunks chunks(rows, row_bytes);
  std::vector<float> chunk_sumsq(chunks.size());
  std::vector<int64_t> chunk_fresh(chunks.size());
  chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
    FASTADV_DISPATCH_FLOATING(dense_grads[i].scalar_type(), "fastadv::scan", [&] {
      const int64_t cols = dense_grads[i].size(1);
      const scalar_t* grad = dense_grads[i].const_data_ptr<scalar_t>();
      const bool* seen = dense_touched[i].const_data_ptr<bool>();
      bool* is_fresh = fresh[i].mutable_data_ptr<bool>();
      float sumsq = 0;
      int64_t count = 0;
      for (int64_t row = begin; row < end; ++row) {
        const RowScan scanned = scan_row(grad + row * cols, cols);
        const bool flag = scanned.nonzero && !seen[row];
        is_fresh[row] = flag;
        count += flag;
        sumsq += scanned.sumsq;
      }
      chunk_sumsq[chunk] = sumsq;
      chunk_fresh[chunk] = count;
    });
  });
  at::Tensor stats = at::empty({static_cast<int64_t>(n), 2}, grads[0].options().dtype(at::kDouble));
  double* out = stats.mutable_data_ptr<double>();
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = chunks.sum(chunk_sumsq, static_cast<int>(i));
    out[2 * i + 1] = chunks.sum(chunk_fresh, static_cast<int>(i));
  }
  return stats;
}

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { m.impl("scan", &fastadv::cpu::scan); }

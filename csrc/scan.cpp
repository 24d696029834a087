// scan and row_sumsq on the CPU: one read of each gradient (and parameter), or of the listed rows, all tensors of the
// list in one parallel region; per-chunk partials reduced per tensor in chunk order (see RowChunks).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu_utils.h"

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
  for_each_block<scalar_t>(cols - col, [&](int64_t offset, int64_t count) {
    const auto values = load_widened(row + col + offset, count);
    for (int k = 0; k < kWidened<scalar_t>; ++k) {
      sums[k] = at::vec::fmadd(values[k], values[k], sums[k]);
      bits = bits | values[k];
    }
  });
  return {lane_sum((sums[0] + sums[1]) + (sums[2] + sums[3])), magnitude_bits_nonzero(lane_bits_or(bits))};
}

at::Tensor scan(at::TensorList grads, at::TensorList touched, at::TensorList fresh,
                std::optional<at::TensorList> params) {
  check_scan(grads, touched, fresh, params);
  const size_t n = grads.size();
  std::vector<at::Tensor> dense_grads(n), dense_touched(n), dense_params(params ? n : 0);
  std::vector<int64_t> rows(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    dense_grads[i] = grads[i].contiguous();
    dense_touched[i] = touched[i].contiguous();
    if (params) dense_params[i] = (*params)[i].contiguous();
    rows[i] = grads[i].size(0);
    row_bytes[i] = grads[i].size(1) * grads[i].element_size() * (params ? 2 : 1);
  }
  const RowChunks chunks(rows, row_bytes);
  std::vector<float> chunk_sumsq(chunks.size()), chunk_param_sumsq(chunks.size());
  std::vector<int64_t> chunk_fresh(chunks.size());
  chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
    FASTADV_DISPATCH_FLOATING(dense_grads[i].scalar_type(), "fastadv::scan", [&] {
      const int64_t cols = dense_grads[i].size(1);
      const scalar_t* grad = dense_grads[i].const_data_ptr<scalar_t>();
      const scalar_t* param = params ? dense_params[i].const_data_ptr<scalar_t>() : nullptr;
      const bool* seen = dense_touched[i].const_data_ptr<bool>();
      bool* is_fresh = fresh[i].mutable_data_ptr<bool>();
      float sumsq = 0, param_sumsq = 0;
      int64_t count = 0;
      for (int64_t row = begin; row < end; ++row) {
        const RowScan scanned = scan_row(grad + row * cols, cols);
        const bool flag = scanned.nonzero && !seen[row];
        is_fresh[row] = flag;
        count += flag;
        sumsq += scanned.sumsq;
        if (param) param_sumsq += scan_row(param + row * cols, cols).sumsq;
      }
      chunk_sumsq[chunk] = sumsq;
      chunk_fresh[chunk] = count;
      chunk_param_sumsq[chunk] = param_sumsq;
    });
  });
  at::Tensor stats = at::empty({static_cast<int64_t>(n), 3}, grads[0].options().dtype(at::kDouble));
  double* out = stats.mutable_data_ptr<double>();
  for (size_t i = 0; i < n; ++i) {
    out[3 * i] = chunks.sum(chunk_sumsq, static_cast<int>(i));
    out[3 * i + 1] = chunks.sum(chunk_fresh, static_cast<int>(i));
    out[3 * i + 2] = chunks.sum(chunk_param_sumsq, static_cast<int>(i));
  }
  return stats;
}

at::Tensor row_sumsq(at::TensorList tensors, at::TensorList rows) {
  check_row_sumsq(tensors, rows);
  const size_t n = tensors.size();
  std::vector<at::Tensor> dense(n), indices(n);
  std::vector<int64_t> counts(n), row_bytes(n);
  for (size_t i = 0; i < n; ++i) {
    dense[i] = tensors[i].contiguous();
    indices[i] = rows[i].contiguous();
    counts[i] = rows[i].size(0);
    row_bytes[i] = tensors[i].size(1) * tensors[i].element_size();
  }
  const RowChunks chunks(counts, row_bytes);
  std::vector<float> chunk_sumsq(chunks.size());
  chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
    FASTADV_DISPATCH_FLOATING(dense[i].scalar_type(), "fastadv::row_sumsq", [&] {
      const int64_t n_rows = dense[i].size(0), cols = dense[i].size(1);
      const scalar_t* values = dense[i].const_data_ptr<scalar_t>();
      const int64_t* index = indices[i].const_data_ptr<int64_t>();
      float sumsq = 0;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t row = index[j];
        TORCH_CHECK(row >= 0 && row < n_rows, "fastadv::row_sumsq: rows[", i, "] holds ", row, ", outside [0, ",
                    n_rows, ")");
        if (j + 1 < end && index[j + 1] >= 0 && index[j + 1] < n_rows) {
          prefetch_row(values + index[j + 1] * cols, row_bytes[i]);
        }
        sumsq += scan_row(values + row * cols, cols).sumsq;
      }
      chunk_sumsq[chunk] = sumsq;
    });
  });
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, tensors[0].options().dtype(at::kDouble));
  for (size_t i = 0; i < n; ++i) out.mutable_data_ptr<double>()[i] = chunks.sum(chunk_sumsq, static_cast<int>(i));
  return out;
}

}  // namespace
}  // namespace fastadv::cpu

TORCH_LIBRARY_IMPL(fastadv, CPU, m) {
  m.impl("scan", &fastadv::cpu::scan);
  m.impl("row_sumsq", &fastadv::cpu::row_sumsq);
}

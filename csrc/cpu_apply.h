// The CPU apply of the ops (see ops.h): the rows of every tensor of an op's list cut into chunks, all of them in one
// at::parallel_for, each chunk handed to the op's row functor for its tensor's dtype; the functors' per-chunk shares of
// the per-tensor sums reduced per tensor in chunk order.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastadv::cpu {

// Rows go to threads in chunks of about this many bytes: enough to amortise the per-chunk work, small enough that a
// few thousand touched rows still spread over all threads.
constexpr int64_t kChunkBytes = 64 * 1024;

// The rows of a list of tensors cut into chunks that never straddle two tensors. The chunks depend on the shapes
// only, not on the thread count, so per-chunk partial sums reduced in chunk order give the same bits on any machine
// (no atomics, no per-thread partials whose split would vary).
class RowChunks {
 public:
  // rows[i] rows of row_bytes[i] bytes each in tensor i.
  RowChunks(const std::vector<int64_t>& rows, const std::vector<int64_t>& row_bytes)
      : rows_(rows), chunk_rows_(rows.size()), first_chunk_(rows.size() + 1, 0) {
    for (size_t i = 0; i < rows.size(); ++i) {
      chunk_rows_[i] = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, row_bytes[i]));
      first_chunk_[i + 1] = first_chunk_[i] + ceil_div(rows[i], chunk_rows_[i]);
    }
  }

  int64_t size() const { return first_chunk_.back(); }

  // Calls fn(tensor, row_begin, row_end, chunk) for every chunk, all tensors in one parallel region.
  template <typename F>
  void parallel_for(const F& fn) const {
    at::parallel_for(0, size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int tensor = find_segment(first_chunk_.data(), static_cast<int>(rows_.size()), chunk);
        const int64_t row_begin = (chunk - first_chunk_[tensor]) * chunk_rows_[tensor];
        fn(tensor, row_begin, std::min(row_begin + chunk_rows_[tensor], rows_[tensor]), chunk);
      }
    });
  }

  // The sum of partial[chunk] over the chunks of `tensor`, in chunk order.
  double sum(const double* partial, int tensor) const {
    double total = 0;
    for (int64_t chunk = first_chunk_[tensor]; chunk < first_chunk_[tensor + 1]; ++chunk) total += partial[chunk];
    return total;
  }

 private:
  std::vector<int64_t> rows_, chunk_rows_, first_chunk_;
};

struct Device {
  // Calls Rows<scalar_t>{}(tensor, args, i, begin, end) on the rows [begin, end) of every chunk of every tensor i of
  // `work`, and writes the sums of the first `sums` shares it returns to out[i][0..sums) (out: float64 or float32,
  // undefined without sums).
  template <template <typename> class Rows, typename T, typename Args>
  static void apply(const at::Device& /*device: the CPU*/, const std::vector<Work<T>>& work, const Args& args, int sums,
                    const at::Tensor& out) {
    const size_t n = work.size();
    std::vector<int64_t> rows(n), row_bytes(n);
    for (size_t i = 0; i < n; ++i) {
      rows[i] = work[i].rows;
      row_bytes[i] = work[i].row_bytes;
    }
    const RowChunks chunks(rows, row_bytes);
    std::vector<double> partial(sums * chunks.size());  // [sums, chunks]
    chunks.parallel_for([&](int i, int64_t begin, int64_t end, int64_t chunk) {
      FASTADV_DISPATCH_FLOATING(work[i].dtype, "fastadv", [&] {
        const Sums shares = Rows<scalar_t>{}(work[i].tensor, args, i, begin, end);
        for (int s = 0; s < sums; ++s) partial[s * chunks.size() + chunk] = shares.value[s];
      });
    });
    for (size_t i = 0; i < n; ++i) {
      for (int s = 0; s < sums; ++s) {
        const double total = chunks.sum(partial.data() + s * chunks.size(), static_cast<int>(i));
        if (out.scalar_type() == at::kDouble) {
          out.mutable_data_ptr<double>()[i * sums + s] = total;
        } else {
          out.mutable_data_ptr<float>()[i * sums + s] = static_cast<float>(total);
        }
      }
    }
  }
};

}  // namespace fastadv::cpu

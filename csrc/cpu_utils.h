// CPU helpers shared by the ops' .cpp files: one parallel region over the rows of a whole tensor list, and vectorised
// loads/stores that widen bf16/fp16 to fp32 and round once when storing.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastadv::cpu {

using FloatVec = at::vec::Vectorized<float>;

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
  template <typename T>
  double sum(const std::vector<T>& partial, int tensor) const {
    double total = 0;
    for (int64_t chunk = first_chunk_[tensor]; chunk < first_chunk_[tensor + 1]; ++chunk) total += partial[chunk];
    return total;
  }

 private:
  std::vector<int64_t> rows_, chunk_rows_, first_chunk_;
};

// Asks for the cache lines of the row at `p` (`bytes` long) ahead of use. Rows listed in any order defeat the
// hardware prefetcher at each row start; asking for the next row while working on this one hides that latency.
inline void prefetch_row(const void* p, int64_t bytes, bool for_write = false) {
  const char* line = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    if (for_write) {
      __builtin_prefetch(line + offset, 1);
    } else {
      __builtin_prefetch(line + offset, 0);
    }
  }
}

// One Vectorized<scalar_t> widened to fp32: one fp32 vector for float, two for bf16/fp16.
template <typename scalar_t>
constexpr int kWidened = at::vec::Vectorized<scalar_t>::size() / FloatVec::size();

template <typename scalar_t>
using Widened = std::array<FloatVec, kWidened<scalar_t>>;

// `count` (<= Vectorized<scalar_t>::size()) elements at p as fp32; the lanes past count are zero.
template <typename scalar_t>
inline Widened<scalar_t> load_widened(const scalar_t* p, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec v = count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {v};
  } else {
    const auto [low, high] = at::vec::convert_to_float<scalar_t>(v);
    return {low, high};
  }
}

// Rounds v once to scalar_t and stores its first `count` elements at p.
template <typename scalar_t>
inline void store_rounded(scalar_t* p, const Widened<scalar_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v[0].store(p, static_cast<int>(count));
  } else {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, static_cast<int>(count));
  }
}

// Calls fn(col, count) over [0, cols) in blocks of one Vectorized<scalar_t> (the last one possibly partial).
template <typename scalar_t, typename F>
inline void for_each_block(int64_t cols, const F& fn) {
  constexpr int64_t step = at::vec::Vectorized<scalar_t>::size();
  int64_t col = 0;
  for (; col + step <= cols; col += step) fn(col, step);
  if (col < cols) fn(col, cols - col);
}

// Horizontal sum of the lanes, in lane order.
inline float lane_sum(const FloatVec& v) {
  std::array<float, FloatVec::size()> lanes;
  v.store(lanes.data());
  float total = 0;
  for (float lane : lanes) total += lane;
  return total;
}

// OR of the lanes' bit patterns (see magnitude_bits_nonzero).
inline uint32_t lane_bits_or(const FloatVec& v) {
  std::array<uint32_t, FloatVec::size()> lanes;
  v.store(lanes.data());
  uint32_t bits = 0;
  for (uint32_t lane : lanes) bits |= lane;
  return bits;
}

}  // namespace fastadv::cpu

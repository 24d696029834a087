// CPU helpers shared by the ops' row functors (.cpp files): prefetches, and vectorised loads/stores that widen
// bf16/fp16 to fp32 and round once when storing.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

namespace fastadv::cpu {

using FloatVec = at::vec::Vectorized<float>;

// On the lambdas that the row functors hand to for_each_row and for_each_block. Inlined, their captures stay in
// registers; GCC otherwise emitted the block body (called twice: full blocks and the tail) as a function called per
// vector, which made perturb 2-3x slower on listed rows.
#define FASTADV_INLINE __attribute__((always_inline))

// Asks for the cache lines of the row at `p` (`bytes` long) ahead of use.
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

// Calls fn(j, row) for the entries j of [begin, end), row = index[j] (j without an index). A listed row outside
// [0, n_rows) is passed to out_of_range, which throws; before working on a row, the next listed one is asked for with
// prefetch(next): rows listed in any order defeat the hardware prefetcher at each row start.
template <typename OutOfRange, typename Prefetch, typename F>
FASTADV_INLINE inline void for_each_row(const int64_t* index, int64_t begin, int64_t end, int64_t n_rows,
                                        const OutOfRange& out_of_range, const Prefetch& prefetch, const F& fn) {
  for (int64_t j = begin; j < end; ++j) {
    if (!index) {
      fn(j, j);
      continue;
    }
    const int64_t row = index[j];
    if (row < 0 || row >= n_rows) out_of_range(row);
    if (j + 1 < end && index[j + 1] >= 0 && index[j + 1] < n_rows) prefetch(index[j + 1]);
    fn(j, row);
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
FASTADV_INLINE inline void for_each_block(int64_t cols, const F& fn) {
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

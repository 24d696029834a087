// scan and row_sumsq on CUDA: one read of each gradient (and parameter), or of the listed rows, warp per row. The
// entry points are in ops.h, the launch over the whole list and the per-tensor sums in cuda_apply.cuh; here the row
// functor.
#include <torch/library.h>

#include "cuda_apply.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {
namespace {

// This block's shares of the sum of squares, the fresh-row count (scan, which also writes the fresh flags) and the
// parameters' sum of squares.
template <typename scalar_t>
struct scan_kernel {
  __device__ Sums operator()(const BlockPlace& place, const ScanTensor& t, NoArgs, int, bool packed) const {
    const auto* __restrict__ values = static_cast<const scalar_t*>(t.values);
    const auto* __restrict__ param = static_cast<const scalar_t*>(t.param);
    // This lane's shares over all its rows: one accumulator per pack of a batch for the gradient (summed in a fixed
    // order at the end), one for the parameters (AWP only), so that the kernel fits 80 registers (3 blocks per SM)
    // unspilled.
    float sumsq[kUnroll] = {}, param_sumsq = 0;
    double fresh_rows = 0;  // counted by lane 0 of each warp
    for_each_warp_row(place, t.rows, t.index, t.tensor_rows, [&](int64_t, int64_t row) {
      uint32_t bits = 0;
      with_pack_width<scalar_t>(packed, [&](auto width) {
        constexpr int N = decltype(width)::value;
        for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
          Bits<scalar_t, N> packs[kUnroll], param_packs[kUnroll];
          load_batch(values + row * t.cols, batch, packs);
          if (param) load_batch(param + row * t.cols, batch, param_packs);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!batch.has(u)) continue;
            float v[N];
            widen<scalar_t>(packs[u], v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
              sumsq[u] = fmaf(v[k], v[k], sumsq[u]);
              bits |= __float_as_uint(v[k]);
            }
            if (!param) continue;
            widen<scalar_t>(param_packs[u], v);
#pragma unroll
            for (int k = 0; k < N; ++k) param_sumsq = fmaf(v[k], v[k], param_sumsq);
          }
        });
      });
      if (!t.fresh) return;  // the same for the whole block
      bits = warp_or(bits);
      if (threadIdx.x % kWarpSize == 0) {
        const bool is_fresh = magnitude_bits_nonzero(bits) && !t.touched[row];
        t.fresh[row] = is_fresh;
        fresh_rows += is_fresh;
      }
    });
    return {{sum_of(sumsq), fresh_rows, param_sumsq}};
  }

  // At least 3 blocks per SM (80 registers): the batched loads fit unspilled (ptxas -v, sm_80 to sm_90); unbounded,
  // ptxas takes ~90 registers and 2 blocks fit.
  static constexpr int kBlocksPerSm = 3;
  // the sum of squares, the fresh-row count and the parameters' sum of squares
  static constexpr int kSums = 3;
  // a warp per row
  static constexpr int64_t rows_per_block(const NoArgs&) { return kWarps; }
};

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { fastadv::impl_scan<fastadv::cuda::Device, fastadv::cuda::scan_kernel>(m); }

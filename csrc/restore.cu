// restore on CUDA: copy the backups back into their rows, bit-exact (16-byte packs when aligned). No host sync. The
// entry point is in ops.h, the launch over the whole list in cuda_apply.cuh; here the row functor.
#include <torch/library.h>

#include "cuda_apply.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace fastadv::cuda {
namespace {

template <typename scalar_t>
struct restore_kernel {
  __device__ Sums operator()(const BlockPlace& place, const RestoreTensor& t, NoArgs, int, bool packed) const {
    auto* __restrict__ param = static_cast<scalar_t*>(t.param);
    const auto* __restrict__ backup = static_cast<const scalar_t*>(t.backup);
    for_each_warp_row(place, t.n_rows, t.rows, t.param_rows, [&](int64_t j, int64_t row) {
      with_pack_width<scalar_t>(packed, [&](auto width) {
        constexpr int N = decltype(width)::value;
        for_each_lane_batch<N>(t.cols, [&](const LaneBatch<N>& batch) {
          Bits<scalar_t, N> packs[kUnroll];
          load_batch(backup + j * t.cols, batch, packs);
          store_batch(param + row * t.cols, batch, packs);
        });
      });
    });
    return {};
  }

  // 4 blocks per SM or more (64 registers): a batch of packs and its addresses, unspilled.
  static constexpr int kBlocksPerSm = 4;
  static constexpr int kSums = 0;
  // a warp per row
  static constexpr int64_t rows_per_block(const NoArgs&) { return kWarps; }
};

}  // namespace
}  // namespace fastadv::cuda

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) { fastadv::impl_restore<fastadv::cuda::Device, fastadv::cuda::restore_kernel>(m); }

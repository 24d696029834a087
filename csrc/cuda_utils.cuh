// CUDA helpers of the apply and the ops' row functors (.cu files): how a launch splits its blocks between the tensors
// of a list, the warp-per-row loop, 16-byte vector loads and stores in batches, warp/block reductions.
//
// Every functor works warp-per-row: a block's warps take rows of its tensor in a grid-stride loop, a warp's lanes take
// 16-byte packs of the row, kUnroll of them at a time.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace fastadv::cuda {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Tensors per launch; longer lists take several launches.
constexpr int kMaxTensors = 16;
// 16-byte packs a lane loads before it uses any: a warp keeps kUnroll loads per lane and input in flight, not one.
constexpr int kUnroll = 4;

// The blocks of `kernel` that the current device runs at once: the occupancy API's blocks per SM (from the kernel's
// registers and shared memory) times the SMs, asked once per kernel and device. A tensor gets at most this many
// blocks (grid-stride loops cover the rest): one even wave, where a fixed cap left a ragged second wave on some GPUs
// and too few blocks on larger ones.
template <auto kernel>
int64_t resident_blocks() {
  static std::array<std::atomic<int64_t>, C10_COMPILE_TIME_MAX_GPUS> cached{};  // 0: not asked yet
  const c10::DeviceIndex device = c10::cuda::current_device();
  int64_t blocks = cached[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks = std::max(1, per_sm * sms);
    cached[device].store(blocks, std::memory_order_relaxed);  // a race stores the same value
  }
  return blocks;
}

// Which blocks of a launch work on which tensor: blocks [block_offset[s], block_offset[s + 1]) on the launch's tensor
// s, which is tensor index[s] of the op's lists (where per-tensor inputs and outputs live).
struct Segments {
  int n = 0;
  int64_t max_blocks = 1;  // per tensor: resident_blocks of the launch's kernel (set before add)
  int64_t block_offset[kMaxTensors + 1] = {0};
  int index[kMaxTensors] = {0};

  // Appends tensor `tensor_index` with `rows` rows to process, `rows_per_block` at a time per block (a warp per row:
  // kWarps); returns its slot in the launch.
  int add(int tensor_index, int64_t rows, int64_t rows_per_block = kWarps) {
    index[n] = tensor_index;
    const int64_t blocks = std::min(std::max<int64_t>(1, ceil_div(rows, rows_per_block)), max_blocks);
    block_offset[n + 1] = block_offset[n] + blocks;
    return n++;
  }

  FASTADV_HD int64_t blocks() const { return block_offset[n]; }
};

// Where this block works: its tensor's slot, its rank among that tensor's blocks and their number.
struct BlockPlace {
  int slot;
  int64_t rank;
  int64_t blocks;
};

__device__ inline BlockPlace place_block(const Segments& segments) {
  const int slot = find_segment(segments.block_offset, segments.n, blockIdx.x);
  return {slot, blockIdx.x - segments.block_offset[slot],
          segments.block_offset[slot + 1] - segments.block_offset[slot]};
}

// Calls fn(j, row) for the entries j of [0, n) of this warp, row = index[j] (j without an index): warp w of block rank
// b takes entries w + kWarps * b, then strides by all the tensor's warps. The trip count is the same for every lane of
// a warp. A row outside [0, tensor_rows) ends the loop and is asserted on after it: an assert in the loop holds
// registers across its call, which spilled the batched loads.
template <typename F>
__device__ inline void for_each_warp_row(const BlockPlace& place, int64_t n, const int64_t* index, int64_t tensor_rows,
                                         const F& fn) {
  const int64_t stride = place.blocks * kWarps;
  int64_t j = place.rank * kWarps + threadIdx.x / kWarpSize;
  for (; j < n; j += stride) {
    const int64_t row = index ? index[j] : j;
    if (row < 0 || row >= tensor_rows) break;
    fn(j, row);
  }
  CUDA_KERNEL_ASSERT(j >= n && "a row index is outside the tensor");
}

// ---- 16-byte packs ----

template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Calls fn(std::integral_constant<int, N>{}) with N the 16-byte pack width of scalar_t when `packed`, else 1, so the
// row loop below is compiled once per width.
template <typename scalar_t, typename F>
__device__ inline void with_pack_width(bool packed, const F& fn) {
  if (packed) {
    fn(std::integral_constant<int, kPack<scalar_t>>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// kUnroll packs of N elements of a row that belong to one lane: pack u starts at column col(u) and exists where
// has(u) (the last batch of a row may be partial).
template <int N>
struct LaneBatch {
  int64_t first, cols;
  __device__ int64_t col(int u) const { return first + u * kWarpSize * N; }
  __device__ bool has(int u) const { return col(u) < cols; }
};

// Calls fn(batch) for the batches of this lane's packs of a row of `cols` elements.
template <int N, typename F>
__device__ inline void for_each_lane_batch(int64_t cols, const F& fn) {
#pragma unroll 1  // a batch is the unrolled unit: unrolling batches too would only take registers from occupancy
  for (int64_t first = (threadIdx.x % kWarpSize) * N; first < cols; first += kUnroll * kWarpSize * N) {
    fn(LaneBatch<N>{first, cols});
  }
}

// A pack as registers hold it from its load to its use: four 32-bit words when it fills 16 bytes. Held as eight 2-byte
// elements, a bf16/fp16 pack took eight registers and was unpacked before the next input's loads were issued.
template <typename scalar_t, int N>
using Bits = std::conditional_t<N * sizeof(scalar_t) == 16, uint4, Pack<scalar_t, N>>;

// The batch's packs of the row at p, every load issued before any is used; missing packs are not read (left unset).
template <int N, typename scalar_t>
__device__ inline void load_batch(const scalar_t* __restrict__ p, const LaneBatch<N>& batch,
                                  Bits<scalar_t, N> (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (batch.has(u)) out[u] = *reinterpret_cast<const Bits<scalar_t, N>*>(p + batch.col(u));
  }
}

template <int N, typename scalar_t>
__device__ inline void store_batch(scalar_t* __restrict__ p, const LaneBatch<N>& batch,
                                   const Bits<scalar_t, N> (&packs)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (batch.has(u)) *reinterpret_cast<Bits<scalar_t, N>*>(p + batch.col(u)) = packs[u];
  }
}

// The N elements of a pack as fp32 (call as widen<scalar_t>).
template <typename scalar_t, int N>
__device__ inline void widen(const Bits<scalar_t, N>& bits, float (&out)[N]) {
  Pack<scalar_t, N> pack;
  memcpy(&pack, &bits, sizeof(pack));
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(pack.v[k]);
}

// Rounds v once to scalar_t and stores it.
template <int N, typename scalar_t>
__device__ inline void store_rounded(scalar_t* __restrict__ p, const float (&v)[N]) {
  Pack<scalar_t, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = static_cast<scalar_t>(v[k]);
  *reinterpret_cast<Pack<scalar_t, N>*>(p) = pack;
}

// The sum of per-pack accumulators in a fixed order.
__device__ inline float sum_of(const float (&partial)[kUnroll]) {
  float total = 0;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) total += partial[u];
  return total;
}

// ---- reductions ----

__device__ inline uint32_t warp_or(uint32_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v |= __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum over the block in a fixed order (deterministic), valid in thread 0. Every thread of the block must call it.
__device__ inline double block_sum(double v) {
  __shared__ double warp_totals[kWarps];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_totals[w];
  }
  __syncthreads();  // warp_totals is reused by the next call
  return total;
}

// The sum, or with `maximum` the NaN-propagating maximum, of v over the warp or, with `whole_block`, over the block;
// the same bits in every thread (butterflies of commutative steps, then the warps' results in warp order). Every
// thread of the warp (the block) must call it.
__device__ inline float team_reduce(float v, bool maximum_of, bool whole_block) {
  const auto combine = [maximum_of](float a, float b) { return maximum_of ? maximum(a, b) : a + b; };
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (!whole_block) return v;
  __shared__ float warp_results[kWarps];
  if (threadIdx.x % kWarpSize == 0) warp_results[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float result = warp_results[0];
  for (int w = 1; w < kWarps; ++w) result = combine(result, warp_results[w]);
  __syncthreads();  // warp_results is reused by the next call
  return result;
}

}  // namespace fastadv::cuda

// Device-independent pieces of the fastadv ops, shared by the CPU (.cpp) and CUDA (.cu) implementations so that the
// two cannot drift: the per-element formulas (step, AWP box, lerp), the passes and the projection decision, the index
// math and the dtype dispatch.
//
// The formulas are templates over the value type V so that the CPU can call them on at::vec::Vectorized<float>
// and the GPU on float; every formula computes in fp32 (the caller widens bf16/fp16 first and rounds once when it
// stores).
#pragma once

#include <ATen/Dispatch.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTADV_HD __host__ __device__
#else
#define FASTADV_HD
#endif

// The dtypes every op accepts (no double: fp32 accumulation is the contract); inside the body `scalar_t` is the
// element type (float, at::BFloat16 or at::Half).
#define FASTADV_DISPATCH_FLOATING(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace fastadv {

// ---- index math ----

FASTADV_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The segment s with offsets[s] <= index < offsets[s + 1], for prefix offsets of n segments (offsets[0] == 0).
// Finds the tensor of a list that a flattened chunk (CPU) or block (GPU) works on; lists are short, so a linear scan.
FASTADV_HD inline int find_segment(const int64_t* offsets, int n, int64_t index) {
  int s = 0;
  while (s + 1 < n && offsets[s + 1] <= index) ++s;
  return s;
}

// ---- scan ----

// A row is non-zero when any element is: the OR of the fp32 bit patterns of its elements, sign masked, is non-zero.
// Unlike a test on the sum of squares this cannot underflow, and NaN (non-zero payload) counts as non-zero. bf16 and
// fp16 widen to fp32 exactly, so testing the widened values is the same as testing the stored ones.
FASTADV_HD inline bool magnitude_bits_nonzero(uint32_t or_of_bits) { return (or_of_bits & 0x7fffffffu) != 0; }

// ---- perturb, measure, project ----

template <typename V>
FASTADV_HD inline V perturbed(V param, V grad, V scale) {
  return param + scale * grad;
}

// torch.maximum/minimum on fp32 scalars: NaN in either operand gives NaN. Vectors (CPU) use at::vec::maximum/minimum,
// which propagate NaN the same way and which the templates below find by argument-dependent lookup.
FASTADV_HD inline float maximum(float a, float b) { return a != a || a > b ? a : b; }
FASTADV_HD inline float minimum(float a, float b) { return a != a || a < b ? a : b; }

// a * b rounded to fp32 on its own. Compilers contract a product and a sum that uses it into one fused multiply-add
// (one rounding instead of two), even across statements: nvcc on floats, GCC (-O3 -mfma) on at::vec's intrinsics.
// The device multiplies with __fmul_rn, which is never contracted; the host hides the product from the optimiser.
template <typename V>
FASTADV_HD inline V rounded_product(V a, V b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  V product = a * b;
  asm("" : "+m"(product));
  return product;
#endif
}

// AWP's box: value clamped elementwise into [B - d, B + d] with d = eps * |B| rounded first (eps rounded to fp32 by
// the caller), min(max(value, B - d), B + d) as torch.clamp computes it. |B| is max(B, 0 - B), which vectors have too.
template <typename V>
FASTADV_HD inline V boxed(V value, V origin, float eps) {
  const V d = rounded_product(V(eps), maximum(origin, V(0.0f) - origin));
  return minimum(maximum(value, origin - d), origin + d);
}

// The passes over the perturbed rows. Every pass computes W + scale * G in fp32 from the one read of W and skips the
// tensors whose scale is 0; the first three back up the rows j >= n_backed (the bits) before anything else, and the
// box and measure read B from that read of W for those rows, from the backup for the others.
enum class Pass {
  kStep,     // perturb: W += scale * G, round, store
  kBox,      // perturb with box_eps (AWP): as kStep, clamped into the box around B (boxed) before rounding
  kMeasure,  // measure (PGD 1/2): accumulate ||W + scale * G - B||^2, write nothing to W
  kProject,  // project (PGD 2/2): W = projection of W + scale * G onto the eps ball around B, round, store
};

// The projection onto the eps ball around the backups B: W = B + eps / ||W - B|| * (W - B) where ||W - B|| > eps.
struct Projection {
  bool outside;
  float factor;
};

FASTADV_HD inline Projection projection_for(float delta_sumsq, double eps) {
  const float norm = sqrtf(delta_sumsq);
  const float radius = static_cast<float>(eps);
  const bool outside = norm > radius;  // NaN: not outside
  return {outside, outside ? radius / norm : 1.0f};
}

// torch.lerp's two-sided formula (exact at both ends), so the projection matches the torch backend's.
template <typename V>
FASTADV_HD inline V lerp(V start, V end, float weight) {
  return weight < 0.5f ? start + V(weight) * (end - start) : end - (end - start) * V(1.0f - weight);
}

// ---- input_step ----

enum class InputNorm { kL2, kInf, kSign };   // the group norm n (kSign: the l2 norm, the step lr * sign(g))
enum class InputBound { kNone, kL2, kInf };  // what bounds the new perturbation

// How input_step's passes run. A group is cut into slices of consecutive tokens (a token group is one slice); every
// sum is taken per slice, then over the group's slices in a fixed order, so the bits depend on the shapes only, never
// on which block or thread took which slice. kWhole: a team (thread, warp or block) per group runs every pass. A group
// split between teams, a team per slice, in one launch (CUDA) or parallel region (CPU) per phase: kNorm, each slice's
// partial norm; kStep, the group's norm from its partials, then the new values stored (with the "l2" bound, each
// slice's sum of their squares instead); kScale ("l2" bound only), the new values recomputed and stored scaled.
enum class InputPhase { kWhole, kNorm, kStep, kScale };

// Whether a group steps: its norm is finite (not inf, not NaN).
FASTADV_HD inline bool finite_norm(float n) { return n <= FLT_MAX; }

// max(n + denom_eps, denom_floor), the divisor of the "l2" and "inf" steps (only a finite n is used).
FASTADV_HD inline float step_denominator(float n, float denom_eps, float denom_floor) {
  return maximum(n + denom_eps, denom_floor);
}

// A group's norm n, from the sum of its slices' partial sums of squares ("l2", "sign") or their maximum ("inf"), and
// the step it gives.
struct GroupStep {
  float n;
  bool finite;
  float denominator;
};

FASTADV_HD inline GroupStep group_step(float total, InputNorm norm, float denom_eps, float denom_floor) {
  const float n = norm == InputNorm::kInf ? total : sqrtf(total);  // correctly rounded (no fast math)
  return {n, finite_norm(n), step_denominator(n, denom_eps, denom_floor)};
}

// The running sum (maximum for "inf") of a group's slice partials, one more partial added: slice by slice, in order,
// from 0.
FASTADV_HD inline float with_partial(float total, float part, InputNorm norm) {
  return norm == InputNorm::kInf ? maximum(total, part) : total + part;
}

// The "l2" and "inf" steps, lr * g / denominator, rounded as the torch backend rounds it: (g * lr) / denominator.
template <typename V>
FASTADV_HD inline V scaled_step(V grad, float lr, float denominator) {
  return grad * V(lr) / V(denominator);
}

// The "inf" bound: clamp(value, -radius, radius) as torch.clamp computes it (NaN stays NaN).
template <typename V>
FASTADV_HD inline V clamped(V value, float radius) {
  return minimum(maximum(value, V(-radius)), V(radius));
}

// The "l2" bound's factor: radius / size where the group's new values' norm `size` exceeds radius (not NaN), else 1
// (new * 1 is new, bit for bit).
FASTADV_HD inline float bound_factor(float size, float radius) { return size > radius ? radius / size : 1.0f; }

}  // namespace fastadv

"""input_step: one ascent step of an input perturbation (FreeLB, SMART), in place; one program per group.

A group is an example (``[T, D]``) or a token (``[D]``) of the contiguous ``[B, T, D]`` perturbation ``delta``; its
program walks it in ``[BLOCK_T, BLOCK_D]`` tiles (``BLOCK_T`` is 1 per token), in passes:

1. the gradient, where the token's mask is set, for the group's norm ``n`` (``NORM``): an fp32 tile of squares or of
   NaN-propagating maxima, reduced in a fixed order (no atomics, no second launch), stored to ``norms``;
2. ``delta`` and the gradient again for ``new = delta + step`` (``delta`` as is where ``n`` is not finite), clamped
   (``BOUND`` "inf") and stored rounded once; with the "l2" bound nothing is stored yet, the squares of ``new`` are
   summed instead;
3. "l2" bound only: ``new`` recomputed bit for bit and stored scaled by ``radius / ||new||`` where that norm exceeds
   ``radius``.

Re-reading instead of holding the group in registers keeps one kernel for every group size; a token group (16 KB at
D = 4096 fp32) is still in L1/L2 when the next pass reads it, an example group is re-read from memory. The step
``lr * g / max(n + denom_eps, denom_floor)`` is ``(g * lr) / denominator`` as the torch backend rounds it, with a
correctly rounded division and square root, so every backend rounds alike.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import col_block, device_guard, row_block

#: The ``norm`` and ``bound`` arguments as the kernel's constexprs, one code per name ("l2" and "inf" name both).
_L2, _INF, _SIGN, _NONE = (tl.constexpr(k) for k in range(4))
NORMS = {"l2": _L2, "inf": _INF, "sign": _SIGN}
BOUNDS = {"l2": _L2, "inf": _INF, "none": _NONE}
#: The dtypes of ``delta`` and ``grad``: fp32 math, not float64's.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _max_with_nan(a, b):
    """torch's max: NaN in either operand gives NaN (``tl.max`` would skip it, and a NaN norm must not be finite)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile(delta, grad, mask, first_token, t, c, tokens, cols, HAS_MASK: tl.constexpr):
    """Pointers of a tile's elements, which of them exist, and the gradient there where the mask is set (0 elsewhere:
    a value outside the mask, NaN included, is not even loaded)."""
    inside = (t < tokens) & (c < cols)
    offsets = (first_token + t) * cols + c
    selected = inside
    if HAS_MASK:
        selected = selected & (tl.load(mask + first_token + t, mask=t < tokens, other=0) != 0)
    g = tl.load(grad + offsets, mask=selected, other=0.0).to(tl.float32)
    return delta + offsets, inside, g


@triton.jit
def _stepped(d_ptrs, inside, g, lr, n, denominator, NORM: tl.constexpr):
    """``new = delta + step`` in fp32, ``delta`` where the group's norm ``n`` is not finite; 0 outside the group."""
    d = tl.load(d_ptrs, mask=inside, other=0.0).to(tl.float32)
    if NORM == _SIGN:
        step = tl.where(g > 0, lr, tl.where(g < 0, -lr, 0.0))
    else:
        step = tl.div_rn(g * lr, denominator)
    # n broadcast over the tile first: the interpreter can't combine a scalar condition with a tile
    finite = (n + tl.zeros_like(d)) <= 3.4028234663852886e38  # the largest fp32: False for inf and NaN
    return tl.where(finite & inside, d + step, d)


@triton.jit
def _input_step_kernel(delta, grad, mask, norms, tokens, cols, lr, denom_eps, denom_floor, radius,
                       NORM: tl.constexpr, BOUND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    first_token = group * tokens
    rows = tl.arange(0, BLOCK_T)[:, None]
    lanes = tl.arange(0, BLOCK_D)[None, :]

    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        for c0 in range(0, cols, BLOCK_D):
            _, _, g = _tile(delta, grad, mask, first_token, t0 + rows, c0 + lanes, tokens, cols, HAS_MASK)
            if NORM == _INF:
                acc = _max_with_nan(acc, tl.abs(g))
            else:
                acc += g * g
    if NORM == _INF:
        n = tl.reduce(tl.reduce(acc, 1, _max_with_nan), 0, _max_with_nan)
    else:
        n = tl.sqrt_rn(tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(norms + group, n)
    denominator = tl.maximum(n + denom_eps, denom_floor)

    sizes = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        for c0 in range(0, cols, BLOCK_D):
            d_ptrs, inside, g = _tile(delta, grad, mask, first_token, t0 + rows, c0 + lanes, tokens, cols, HAS_MASK)
            new = _stepped(d_ptrs, inside, g, lr, n, denominator, NORM)
            if BOUND == _L2:
                sizes += new * new
            else:
                if BOUND == _INF:
                    new = tl.minimum(tl.maximum(new, -radius, propagate_nan=tl.PropagateNan.ALL), radius,
                                     propagate_nan=tl.PropagateNan.ALL)
                tl.store(d_ptrs, new.to(delta.dtype.element_ty), mask=inside)

    if BOUND == _L2:
        size = tl.sqrt_rn(tl.sum(tl.sum(sizes, axis=1), axis=0))
        # radius / size where size > radius (not for NaN), else 1: new * 1 is new, bit for bit
        factor = tl.where(size > radius, tl.div_rn(radius, size), 1.0)
        for t0 in range(0, tokens, BLOCK_T):
            for c0 in range(0, cols, BLOCK_D):
                d_ptrs, inside, g = _tile(delta, grad, mask, first_token, t0 + rows, c0 + lanes, tokens, cols,
                                          HAS_MASK)
                new = _stepped(d_ptrs, inside, g, lr, n, denominator, NORM)
                tl.store(d_ptrs, (new * factor).to(delta.dtype.element_ty), mask=inside)


def _check(delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, denom_eps: float,
           denom_floor: float, bound: str, radius: float) -> None:
    """The kernel reads raw addresses and takes the arguments as given: reject what it would misread."""
    if delta.dim() != 3 or not delta.is_contiguous() or delta.dtype not in DTYPES:
        raise ValueError(f"delta must be a contiguous [B, T, D] float32, bfloat16 or float16 tensor, got {delta.dtype}"
                         f" {tuple(delta.shape)} with strides {tuple(delta.stride())}")
    if grad.shape != delta.shape or grad.dtype != delta.dtype or not grad.is_contiguous():
        raise ValueError(f"grad must be contiguous and of delta's shape and dtype ({delta.dtype}"
                         f" {tuple(delta.shape)}), got {grad.dtype} {tuple(grad.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != delta.shape[:2]):
        raise ValueError(f"mask must be a bool [B, T] = {tuple(delta.shape[:2])} tensor, got {mask.dtype}"
                         f" {tuple(mask.shape)}")
    if any(t.device != delta.device for t in (grad, mask) if t is not None):
        raise ValueError(f"delta, grad and mask must be on one device ({delta.device})")
    if norm not in NORMS or bound not in BOUNDS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)} and bound one of {', '.join(BOUNDS)}, got"
                         f" {norm!r} and {bound!r}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr}")
    if norm != "sign" and not (min(denom_eps, denom_floor) >= 0 and max(denom_eps, denom_floor) > 0
                               and math.isfinite(denom_eps + denom_floor)):
        raise ValueError(f"denom_eps and denom_floor must be finite, >= 0 and not both 0 (a zero gradient would"
                         f" divide 0 by 0), got {denom_eps} and {denom_floor}")
    if bound != "none" and not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")


def input_step(delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool,
               denom_eps: float, denom_floor: float, bound: str, radius: float) -> Tensor:
    """The ``input_step`` op of the backend contract: one launch, one program per group, no host sync."""
    _check(delta, grad, mask, lr, norm, denom_eps, denom_floor, bound, radius)
    batch, tokens, cols = delta.shape
    groups, group_tokens = (batch * tokens, 1) if per_token else (batch, tokens)
    norms = torch.empty(groups, dtype=torch.float32, device=delta.device)
    if groups:
        block_d = col_block([cols])
        block_t = 1 if per_token else row_block(block_d, tokens)
        flags = delta if mask is None else mask.contiguous().view(torch.uint8)  # never read without a mask
        with device_guard(delta.device):
            _input_step_kernel[(groups,)](delta, grad, flags, norms, group_tokens, cols, float(lr), float(denom_eps),
                                          float(denom_floor), float(radius), NORM=NORMS[norm].value,
                                          BOUND=BOUNDS[bound].value, HAS_MASK=mask is not None, BLOCK_T=block_t,
                                          BLOCK_D=block_d)
    return norms.view(batch, tokens) if per_token else norms

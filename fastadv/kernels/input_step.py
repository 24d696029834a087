"""input_step: one ascent step of an input perturbation (FreeLB, SMART), in place, spread over enough programs to fill
the GPU whatever the batch.

A group is an example (``[T, D]``) or a token (``[D]``) of the contiguous ``[B, T, D]`` perturbation ``delta``; it is
cut into *slices* of ``BLOCK_T`` tokens (one tile row; a token group is one slice), walked ``BLOCK_D`` columns at a
time. Every sum is taken per slice (an fp32 tile of squares or of NaN-propagating maxima, reduced in a fixed order),
then over the group's slices in a fixed order: the bits depend on the shapes only, not on which program took which
slice. The phases (``PHASE``, one launch each):

``_NORM``: each slice's partial norm of the gradient where the token's mask is set, stored to ``partials``;
``_STEP``: the group's norm ``n`` from its partials (stored to ``norms`` by the program of its first slice), then
    ``new = delta + step`` (``delta`` as is where ``n`` is not finite), clamped (the "inf" bound) and stored rounded
    once; with the "l2" bound nothing is stored yet, each slice's sum of the squares of ``new`` goes to ``sizes``;
``_SCALE`` ("l2" bound only): ``new`` recomputed bit for bit and stored scaled by ``radius / ||new||`` where that
    norm, from the group's ``sizes``, exceeds ``radius``;
``_WHOLE``: a group of one slice (every token group; an example of at most ``BLOCK_T`` tokens): the three in one
    program and one launch, the norm straight from the slice (the same bits: a sum of one partial is the partial).

So an example of several slices takes two launches (three with the "l2" bound) and ``B * slices`` programs (at most
about ``MAX_PROGRAMS``, each then taking consecutive slices of one group): FreeLB at batch 32, 128 tokens of 768 is 512
programs, where a program per example kept all but 32 of an H100's 132 SMs idle. Each program of ``_STEP`` and
``_SCALE`` re-reads its group's few partials (from L2) rather than a launch reducing them once. The passes re-read the
slices, as a program per example did (the gradient from L2 when the tensor fits there). The step
``lr * g / max(n + denom_eps, denom_floor)`` is ``(g * lr) / denominator`` as the torch backend rounds it, with a
correctly rounded division and square root, so every backend rounds alike.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import col_block, device_guard, row_block

#: The ``norm`` and ``bound`` arguments as the kernel takes them ("l2" and "inf" name both): run-time codes, not
#: constexprs, so that every mode runs in the one compiled kernel of a phase (branches uniform over the launch). A
#: constexpr per mode made 48 kernels per dtype and width where these are 4: what an attack runs, which the runtime
#: self-check runs in full, would take a minute of cold compiles per dtype.
_L2, _INF, _SIGN, _NONE = (tl.constexpr(k) for k in range(4))
NORMS = {"l2": _L2.value, "inf": _INF.value, "sign": _SIGN.value}
BOUNDS = {"l2": _L2.value, "inf": _INF.value, "none": _NONE.value}
#: The kernel's phases (see above).
_WHOLE, _NORM, _STEP, _SCALE = (tl.constexpr(k) for k in range(4))
#: The dtypes of ``delta`` and ``grad``: fp32 math, not float64's.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The largest fp32: ``n <= _FLT_MAX`` is False for inf and NaN.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
#: Partials a program adds per step when it combines a group's slices (fixed: a new sequence length compiles nothing).
_BLOCK_S = tl.constexpr(256)


@triton.jit
def _max_with_nan(a, b):
    """torch's max: NaN in either operand gives NaN (``tl.max`` would skip it, and a NaN norm must not be finite)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile(delta, grad, mask, first_token, t, c, tokens, masked_tokens, cols):
    """Pointers of a tile's elements, which of them exist, and the gradient there where the mask is set (0 elsewhere:
    a value outside the mask, NaN included, is not even loaded). The mask is read for the first ``masked_tokens`` of
    the group: all of them, or none without a mask."""
    inside = (t < tokens) & (c < cols)
    offsets = (first_token + t) * cols + c
    selected = inside & (tl.load(mask + first_token + t, mask=t < masked_tokens, other=1) != 0)
    g = tl.load(grad + offsets, mask=selected, other=0.0).to(tl.float32)
    return delta + offsets, inside, g


@triton.jit
def _stepped(d_ptrs, inside, g, lr, n, denominator, norm):
    """``new = delta + step`` in fp32, ``delta`` where the group's norm ``n`` is not finite; 0 outside the group."""
    d = tl.load(d_ptrs, mask=inside, other=0.0).to(tl.float32)
    if norm == _SIGN:
        step = tl.where(g > 0, lr, tl.where(g < 0, -lr, 0.0))
    else:
        step = tl.div_rn(g * lr, denominator)
    # n broadcast over the tile first: the interpreter can't combine a scalar condition with a tile
    finite = (n + tl.zeros_like(d)) <= _FLT_MAX
    return tl.where(finite & inside, d + step, d)


@triton.jit
def _slice_norm(
    grad, mask, first_token, t, c, tokens, masked_tokens, cols, norm, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The slice's partial norm: the sum of the squares of the masked gradient (``max |g|`` for "inf")."""
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for c0 in range(0, cols, BLOCK_D):
        _, _, g = _tile(grad, grad, mask, first_token, t, c0 + c, tokens, masked_tokens, cols)
        if norm == _INF:
            acc = _max_with_nan(acc, tl.abs(g))
        else:
            acc += g * g
    if norm == _INF:
        part = tl.reduce(tl.reduce(acc, 1, _max_with_nan), 0, _max_with_nan)
    else:
        part = tl.sum(tl.sum(acc, axis=1), axis=0)
    return part


@triton.jit
def _combined(values, count, by_max):
    """The group's ``count`` per-slice partials at ``values``, summed (maximum with ``by_max``) in a fixed order."""
    s = tl.arange(0, _BLOCK_S)
    acc = tl.zeros([_BLOCK_S], tl.float32)
    for s0 in range(0, count, _BLOCK_S):
        v = tl.load(values + s0 + s, mask=s0 + s < count, other=0.0)
        if by_max:
            acc = _max_with_nan(acc, v)
        else:
            acc += v
    if by_max:
        total = tl.reduce(acc, 0, _max_with_nan)
    else:
        total = tl.sum(acc, axis=0)
    return total


@triton.jit
def _bound_factor(size, radius):
    """radius / size where size > radius (not for NaN), else 1: new * 1 is new, bit for bit."""
    return tl.where(size > radius, tl.div_rn(radius, size), 1.0)


@triton.jit(do_not_specialize=["slices", "slices_per_program", "masked_tokens", "norm", "bound"])
def _input_step_kernel(
    delta,
    grad,
    mask,
    norms,
    partials,
    sizes,
    tokens,
    masked_tokens,
    cols,
    slices,
    slices_per_program,
    lr,
    denom_eps,
    denom_floor,
    radius,
    norm,
    bound,
    PHASE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # this program's group and its slices [first, last) (_WHOLE: the group's one slice)
    pid = tl.program_id(0).to(tl.int64)
    programs_per_group = tl.cdiv(slices, slices_per_program)
    group = pid // programs_per_group
    first = (pid % programs_per_group) * slices_per_program
    last = tl.minimum(first + slices_per_program, slices)
    first_token = group * tokens
    rows = tl.arange(0, BLOCK_T)[:, None]
    lanes = tl.arange(0, BLOCK_D)[None, :]

    if PHASE == _NORM:
        for k in range(first, last):
            part = _slice_norm(
                grad, mask, first_token, k * BLOCK_T + rows, lanes, tokens, masked_tokens, cols, norm, BLOCK_T, BLOCK_D
            )
            tl.store(partials + group * slices + k, part)
    else:
        factor = 1.0
        if PHASE == _SCALE:  # before the norm: after it, ptxas spilled a register (fp32, aligned rows)
            factor = _bound_factor(tl.sqrt_rn(_combined(sizes + group * slices, slices, False)), radius)
        if PHASE == _WHOLE:
            n = _slice_norm(grad, mask, first_token, rows, lanes, tokens, masked_tokens, cols, norm, BLOCK_T, BLOCK_D)
        else:
            n = _combined(partials + group * slices, slices, norm == _INF)
        if norm != _INF:
            n = tl.sqrt_rn(n)
        tl.store(norms + group, n, mask=first == 0)  # once per group
        # a group whose norm is not finite takes no step: 1 spares it inf / inf (which numpy warns about, interpreted)
        denominator = tl.where(n <= _FLT_MAX, tl.maximum(n + denom_eps, denom_floor), 1.0)
        for k in range(first, last):
            # the slice's new values: stored (clamped for the "inf" bound); with the "l2" bound, their sum of squares
            # stored to sizes and nothing else (_STEP), stored times factor (_SCALE), or both (_WHOLE: the slice is its
            # group, stored times the factor of its own sum)
            t = k * BLOCK_T + rows
            squares = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for c0 in range(0, cols, BLOCK_D):
                d_ptrs, inside, g = _tile(delta, grad, mask, first_token, t, c0 + lanes, tokens, masked_tokens, cols)
                new = _stepped(d_ptrs, inside, g, lr, n, denominator, norm)
                if PHASE == _SCALE:
                    tl.store(d_ptrs, (new * factor).to(delta.dtype.element_ty), mask=inside)
                elif bound == _L2:
                    squares += new * new
                else:
                    if bound == _INF:
                        new = tl.minimum(
                            tl.maximum(new, -radius, propagate_nan=tl.PropagateNan.ALL),
                            radius,
                            propagate_nan=tl.PropagateNan.ALL,
                        )
                    tl.store(d_ptrs, new.to(delta.dtype.element_ty), mask=inside)
            size = tl.sum(tl.sum(squares, axis=1), axis=0)
            if PHASE == _STEP:
                if bound == _L2:
                    tl.store(sizes + group * slices + k, size)
            if PHASE == _WHOLE:
                if bound == _L2:  # the values recomputed bit for bit, as _SCALE does
                    own = _bound_factor(tl.sqrt_rn(size), radius)
                    for c0 in range(0, cols, BLOCK_D):
                        d_ptrs, inside, g = _tile(
                            delta, grad, mask, first_token, t, c0 + lanes, tokens, masked_tokens, cols
                        )
                        new = _stepped(d_ptrs, inside, g, lr, n, denominator, norm)
                        tl.store(d_ptrs, (new * own).to(delta.dtype.element_ty), mask=inside)


def _check(
    delta: Tensor,
    grad: Tensor,
    mask: Tensor | None,
    lr: float,
    norm: str,
    denom_eps: float,
    denom_floor: float,
    bound: str,
    radius: float,
) -> None:
    """The kernel reads raw addresses and takes the arguments as given: reject what it would misread."""
    if delta.dim() != 3 or not delta.is_contiguous() or delta.dtype not in DTYPES:
        raise ValueError(
            f"delta must be a contiguous [B, T, D] float32, bfloat16 or float16 tensor, got {delta.dtype}"
            f" {tuple(delta.shape)} with strides {tuple(delta.stride())}"
        )
    if grad.shape != delta.shape or grad.dtype != delta.dtype or not grad.is_contiguous():
        raise ValueError(
            f"grad must be contiguous and of delta's shape and dtype ({delta.dtype}"
            f" {tuple(delta.shape)}), got {grad.dtype} {tuple(grad.shape)}"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != delta.shape[:2]):
        raise ValueError(
            f"mask must be a bool [B, T] = {tuple(delta.shape[:2])} tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    if any(t.device != delta.device for t in (grad, mask) if t is not None):
        raise ValueError(f"delta, grad and mask must be on one device ({delta.device})")
    if norm not in NORMS or bound not in BOUNDS:
        raise ValueError(
            f"norm must be one of {', '.join(NORMS)} and bound one of {', '.join(BOUNDS)}, got {norm!r} and {bound!r}"
        )
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr}")
    if norm != "sign" and not (
        min(denom_eps, denom_floor) >= 0 and max(denom_eps, denom_floor) > 0 and math.isfinite(denom_eps + denom_floor)
    ):
        raise ValueError(
            f"denom_eps and denom_floor must be finite, >= 0 and not both 0 (a zero gradient would"
            f" divide 0 by 0), got {denom_eps} and {denom_floor}"
        )
    if bound != "none" and not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")


def input_step(
    delta: Tensor,
    grad: Tensor,
    mask: Tensor | None,
    lr: float,
    norm: str,
    per_token: bool,
    denom_eps: float,
    denom_floor: float,
    bound: str,
    radius: float,
) -> Tensor:
    """The ``input_step`` op of the backend contract: one launch per phase (see above), no host sync."""
    _check(delta, grad, mask, lr, norm, denom_eps, denom_floor, bound, radius)
    batch, tokens, cols = delta.shape
    groups, group_tokens = (batch * tokens, 1) if per_token else (batch, tokens)
    norms = torch.empty(groups, dtype=torch.float32, device=delta.device)
    if groups:
        block_d = col_block([cols])
        block_t = 1 if per_token else row_block(block_d, tokens)
        slices = triton.cdiv(group_tokens, block_t)
        flags = (delta if mask is None else mask.contiguous()).view(torch.uint8)  # not read without a mask
        args = (delta, grad, flags, norms)
        dims = (group_tokens, 0 if mask is None else group_tokens, cols)
        modes = (float(lr), float(denom_eps), float(denom_floor), float(radius), NORMS[norm], BOUNDS[bound])
        with device_guard(delta.device):
            if slices <= 1:
                _input_step_kernel[(groups,)](
                    *args, norms, norms, *dims, 1, 1, *modes, PHASE=_WHOLE.value, BLOCK_T=block_t, BLOCK_D=block_d
                )
            else:
                # the partials are per slice, so how many slices a program takes changes no bit
                per_program = max(1, triton.cdiv(groups * slices, _common.MAX_PROGRAMS))
                grid = (groups * triton.cdiv(slices, per_program),)
                partials = torch.empty(groups * slices, dtype=torch.float32, device=delta.device)
                squares = torch.empty_like(partials) if bound == "l2" else partials  # read only for "l2"
                for phase in (_NORM, _STEP, _SCALE) if bound == "l2" else (_NORM, _STEP):
                    _input_step_kernel[grid](
                        *args,
                        partials,
                        squares,
                        *dims,
                        slices,
                        per_program,
                        *modes,
                        PHASE=phase.value,
                        BLOCK_T=block_t,
                        BLOCK_D=block_d,
                    )
    return norms.view(batch, tokens) if per_token else norms

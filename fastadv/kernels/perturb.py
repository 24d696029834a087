"""perturb, measure, project and row_sumsq: one kernel over the rows listed in ``rows[i]`` of each tensor.

Each program walks ``blocks_per_program`` consecutive blocks of ``BLOCK_M`` entries of one tensor's row list, each
block's columns ``BLOCK_N`` at a time. A tensor's step size is ``scales[i]`` in device memory; where it is zero the
weights are not written (the backups still are). Weights are loaded in their storage dtype, updated in fp32 and rounded
once; backups are the loaded bits, stored unconverted. ``B``, the centre of the box and of the ball, is a row's backup,
or the loaded weights themselves for a row backed up in the same launch. Each value is loaded only where something
uses it: W where it is stepped or backed up, G where it is stepped, a backup where it is the centre of a box, of a
measure or of a projection that moves the row. A listed row outside the parameter is skipped (see ``listed_rows``).

One kernel, four stages (``STAGE``):
``_STEP`` (perturb): back up, ``W + scale * G``, clamped into ``[B - d, B + d]``, ``d = box_eps * |B|`` rounded on
    its own, when ``BOX`` (AWP), stored; one launch.
``_MEASURE`` (PGD, first pass): back up and write each program's partial ``||W + scale * G - B||^2`` of the unrounded
    fp32 update; nothing else is written. A second launch sums each tensor's partials.
``_PROJECT`` (PGD, second pass): recompute the update bit for bit, pull it back onto the ball where the tensor's norm
    (``sqrt(delta_sumsq[i])`` in device memory, so the host never waits) exceeds ``eps``, store it. The square root and
    the quotient ``eps / norm`` are correctly rounded, as in the extension, so every backend decides ``norm > eps``
    alike.
``_SUMSQ`` (row_sumsq): each program's partial sum of squares of its rows, then the per-tensor sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastadv.backends.contract import Tensors

from ._common import (
    INTERPRETED,
    TL_DTYPES,
    block_range,
    check,
    check_rows,
    device_guard,
    launch,
    listed_rows,
    locate,
    plan,
    segment_sum,
    typed,
)

_STEP, _MEASURE, _PROJECT, _SUMSQ = (tl.constexpr(k) for k in range(4))
_INTERPRETED = tl.constexpr(INTERPRETED)

# Table fields, one row per tensor.
(
    _PARAM,
    _GRAD,
    _ROWS,
    _BACKUP,
    _N_LISTED,
    _N_BACKED,
    _P_ROWS,
    _COLS,
    _P_STRIDE,
    _G_STRIDE,
    _B_STRIDE,
    _INDEX,
    _FIRST,
    _PART,
) = (tl.constexpr(k) for k in range(14))
_FIELDS = tl.constexpr(14)


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s formula, so the result matches the torch backend's to the ulp."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _mul_rn(a, b):
    """fp32 ``a * b`` rounded on its own: PTX ``mul.rn``, which neither LLVM nor ptxas fuses into an FMA with the sum
    that follows (a plain product is, and libdevice's flushes subnormals)."""
    if _INTERPRETED:  # no inline assembly there; numpy rounds each product anyway
        return a * b
    else:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _rows_kernel(
    table,
    n,
    blocks_per_program,
    scales,
    box_eps,
    delta_sumsq,
    eps,
    partials,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    STAGE: tl.constexpr,
    BOX: tl.constexpr,
    NT: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t, program = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    param = typed(fields + _PARAM, P_DTYPE, VEC)
    grad = typed(fields + _GRAD, G_DTYPE, VEC)
    backup = typed(fields + _BACKUP, P_DTYPE, VEC)
    index = typed(fields + _ROWS, tl.int64, 1)
    which = tl.load(fields + _INDEX)
    n_listed = tl.load(fields + _N_LISTED)
    n_param_rows = tl.load(fields + _P_ROWS)
    n_backed = tl.load(fields + _N_BACKED)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)
    p_stride = tl.multiple_of(tl.load(fields + _P_STRIDE), VEC)
    g_stride = tl.multiple_of(tl.load(fields + _G_STRIDE), VEC)
    b_stride = tl.multiple_of(tl.load(fields + _B_STRIDE), VEC)

    lanes = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)[None, :]
    if STAGE != _SUMSQ:
        # Per-tensor values loaded once per lane: the interpreter can't broadcast a scalar comparison into a mask.
        scale = tl.load(scales + which + tl.zeros_like(lanes))[:, None]
        usable = scale != 0
    if STAGE == _PROJECT:
        norm = tl.sqrt_rn(tl.load(delta_sumsq + which + tl.zeros_like(lanes)).to(tl.float32))[:, None]
        outside = norm > eps
        factor = tl.div_rn(eps, tl.where(outside, norm, 1.0))
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first, last = block_range(program, blocks_per_program, n_listed, BLOCK_M)
    for block in range(first, last):
        j = block * BLOCK_M + lanes
        r, touch = listed_rows(index, j, n_listed, n_param_rows)
        row_ok = touch[:, None]
        p_ptrs = param + r[:, None] * p_stride + cols
        g_ptrs = grad + r[:, None] * g_stride + cols
        b_ptrs = backup + j[:, None].to(tl.int64) * b_stride + cols
        if STAGE != _SUMSQ:
            to_back = (j >= n_backed)[:, None]
            if STAGE != _STEP or BOX:
                # The rows whose B is read from the backup: those backed up earlier whose update is used (in PROJECT
                # only those the projection moves: inside the ball the update is stored as is).
                from_backup = row_ok & usable & ~to_back
                if STAGE == _PROJECT:
                    from_backup = from_backup & outside
        for start in range(0, n_cols, BLOCK_N):
            cols_ok = start + cols < n_cols
            mask = row_ok & cols_ok
            if STAGE == _SUMSQ:
                old = tl.load(p_ptrs + start, mask=mask, other=0.0).to(tl.float32)
                acc += old * old
            else:
                w = tl.load(p_ptrs + start, mask=mask & (usable | to_back), other=0.0)  # to step or to back up
                old = w.to(tl.float32)
                new = old + tl.load(g_ptrs + start, mask=mask & usable, other=0.0).to(tl.float32) * scale  # 0: old
                if STAGE != _PROJECT:
                    tl.store(b_ptrs + start, w, mask=mask & to_back)
                if STAGE != _STEP or BOX:
                    origin = tl.where(
                        to_back, old, tl.load(b_ptrs + start, mask=from_backup & cols_ok, other=0.0).to(tl.float32)
                    )
                if STAGE == _MEASURE:
                    acc += tl.where(usable, (new - origin) * (new - origin), 0.0)
                else:
                    if STAGE == _PROJECT:
                        new = tl.where(outside, _lerp(origin, new, factor), new)
                    if BOX:
                        d = _mul_rn(box_eps, tl.abs(origin))  # the contract rounds d first
                        new = tl.maximum(new, origin - d, propagate_nan=tl.PropagateNan.ALL)
                        new = tl.minimum(new, origin + d, propagate_nan=tl.PropagateNan.ALL)
                    tl.store(p_ptrs + start, new.to(P_DTYPE), mask=mask & usable)
    if STAGE == _MEASURE or STAGE == _SUMSQ:
        tl.store(partials + tl.load(fields + _PART) + program, tl.sum(tl.sum(acc, axis=1), axis=0))


def _launch(
    stage: tl.constexpr,
    params: Tensors,
    grads: Tensors,
    rows: Tensors,
    backups: Tensors,
    n_backed: list[int],
    scales: Tensor | None,
    *,
    box_eps: float | None = None,
    delta_sumsq: Tensor | None = None,
    eps: float = 0.0,
    out: Tensor | None = None,
) -> None:
    """``stage`` over the lists: one launch per (param, grad) dtype pair and vector width (one in practice); with
    ``out`` (``[n]``), one more that sums each tensor's partials into it. No host sync."""
    device = params[0].device if params else torch.device("cpu")
    groups, first_part = plan(
        [(p.dtype, g.dtype) for p, g in zip(params, grads, strict=True)],
        [p.shape[1] for p in params],
        [len(idx) for idx in rows],
        list(zip(params, grads, backups, strict=True)),
    )
    partials = None if out is None else torch.empty((first_part[-1], 1), dtype=torch.float32, device=device)
    dummy = scales if scales is not None else partials  # for the pointers a stage does not read
    scales_at, delta_sumsq_at, partials_at = (dummy if v is None else v for v in (scales, delta_sumsq, partials))

    def fields(i: int, first: int) -> tuple[int, ...]:
        param, grad, idx, backup = params[i], grads[i], rows[i], backups[i]
        addresses = (t.data_ptr() for t in (param, grad, idx, backup))
        strides = (t.stride(0) for t in (param, grad, backup))
        return (*addresses, len(idx), n_backed[i], *param.shape, *strides, i, first, first_part[i])

    with device_guard(device):
        launch(
            _rows_kernel,
            groups,
            device,
            fields,
            scales_at,
            float(box_eps or 0.0),
            delta_sumsq_at,
            float(eps),
            partials_at,
            keyed=lambda key: {"P_DTYPE": TL_DTYPES[key[0]], "G_DTYPE": TL_DTYPES[key[1]]},
            STAGE=stage.value,
            BOX=box_eps is not None,
        )
        if out is not None and partials is not None:  # the one implies the other
            segment_sum(partials, first_part, out.view(-1, 1))


def _checked(params, grads, rows, backups, *vectors: Tensor) -> Tensors:
    """Reject what the kernel would misread; ``vectors`` (per-tensor device values) made contiguous."""
    check_rows(params, rows, backups)
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        check(grad, f"grads[{i}]", 2)
        if grad.shape != param.shape:
            raise ValueError(f"grads[{i}] is {tuple(grad.shape)} but params[{i}] {tuple(param.shape)}")
    for vector in vectors:
        if vector.shape != (len(params),) or not vector.is_floating_point():
            raise ValueError(
                f"expected a float vector of {len(params)} values, got {vector.dtype} {tuple(vector.shape)}"
            )
    return [vector.contiguous() for vector in vectors]


def perturb(
    params: Tensors,
    grads: Tensors,
    rows: Tensors,
    backups: Tensors,
    n_backed: list[int],
    scales: Tensor,
    box_eps: float | None = None,
) -> None:
    """The ``perturb`` op of the backend contract: back up, step, clamp into the box; one launch per dtype pair."""
    (scales,) = _checked(params, grads, rows, backups, scales)
    _launch(_STEP, params, grads, rows, backups, n_backed, scales.float(), box_eps=box_eps)


def measure(
    params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int], scales: Tensor
) -> Tensor:
    """The ``measure`` op of the backend contract: back up, float32 ``[n]`` ``||W + scale * G - B||^2``."""
    (scales,) = _checked(params, grads, rows, backups, scales)
    out = torch.empty(len(params), dtype=torch.float32, device=scales.device)
    _launch(_MEASURE, params, grads, rows, backups, n_backed, scales.float(), out=out)
    return out


def project(
    params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, scales: Tensor, delta_sumsq: Tensor, eps: float
) -> None:
    """The ``project`` op of the backend contract: the step pulled back onto the ``eps`` ball around the backups."""
    scales, delta_sumsq = _checked(params, grads, rows, backups, scales, delta_sumsq)
    _launch(
        _PROJECT,
        params,
        grads,
        rows,
        backups,
        [len(idx) for idx in rows],
        scales.float(),
        delta_sumsq=delta_sumsq,
        eps=eps,
    )


def row_sumsq(tensors: Tensors, rows: Tensors) -> Tensor:
    """The ``row_sumsq`` op of the backend contract: float64 ``[n]``, reading only the listed rows."""
    check_rows(tensors, rows, tensors)
    out = torch.empty(len(tensors), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    _launch(_SUMSQ, tensors, tensors, rows, tensors, [0] * len(tensors), None, out=out)
    return out

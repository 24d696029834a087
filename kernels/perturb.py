"""perturb, measure, project and row_sumsq: one kernel over the rows listed in ``rows[i]`` of each tensor.

Each program takes ``BLOCK_M`` entries of one tensor's row list and walks their columns ``BLOCK_N`` at a time. A
tensor's step size is ``scales[i]`` in device memory; where it is zero the weights are not written (the backups still
are). Weights are loaded in their storage dtype, updated in fp32 and rounded once; backups are the loaded bits, stored
unconverted. ``B``, the centre of the box and of the ball, is a row's backup, or the loaded weights themselves for a
row backed up in the same launch.

One kernel, four stages (``STAGE``):
``_STEP`` (perturb): back up, ``W + scale * G``, clamped into ``[B - d, B + d]``, ``d = box_eps * |B|``, when ``BOX``
    (AWP), stored; one launch.
``_MEASURE`` (PGD, first pass): back up and write each program's partial ``||W + scale * G - B||^2`` of the unrounded
    fp32 update; nothing else is written. A second launch sums each tensor's partials.
``_PROJECT`` (PGD, second pass): recompute the update bit for bit, pull it back onto the ball where the tensor's norm
    (``sqrt(delta_sumsq[i])`` in device memory, so the host never waits) exceeds ``eps``, store it.
``_SUMSQ`` (row_sumsq): each program's partial sum of squares of its rows, then the per-tensor sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, check, check_rows, device_guard, locate, plan, segment_sum, table, typed

_STEP, _MEASURE, _PROJECT, _SUMSQ = (tl.constexpr(k) for k in range(4))

# Table fields, one row per tensor.
(_PARAM, _GRAD, _ROWS, _BACKUP, _N_ROWS, _N_BACKED, _COLS, _P_STRIDE, _G_STRIDE, _B_STRIDE, _INDEX, _FIRST,
 _PART) = (tl.constexpr(k) for k in range(13))
_FIELDS = tl.constexpr(13)


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s formula, so the result matches the torch backend's to the ulp."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _rows_kernel(table, n, scales, box_eps, delta_sumsq, eps, partials, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 STAGE: tl.constexpr, BOX: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    t, blk = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    param = typed(fields + _PARAM, P_DTYPE, VEC)
    grad = typed(fields + _GRAD, G_DTYPE, VEC)
    backup = typed(fields + _BACKUP, P_DTYPE, VEC)
    index = typed(fields + _ROWS, tl.int64, 1)
    which = tl.load(fields + _INDEX)
    n_rows = tl.load(fields + _N_ROWS)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)

    j = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    j_ok = j < n_rows
    if STAGE != _SUMSQ:
        # The tensor's scale, loaded once per row: the interpreter can't broadcast a scalar comparison into a mask.
        scale = tl.load(scales + which + tl.zeros_like(j))[:, None]
        usable = scale != 0
        to_back = (j >= tl.load(fields + _N_BACKED))[:, None]
    if STAGE == _PROJECT:
        norm = tl.sqrt(tl.load(delta_sumsq + which).to(tl.float32))
        outside = norm > eps
        factor = eps / tl.where(outside, norm, 1.0)

    r = tl.load(index + j, mask=j_ok, other=0)
    cols = tl.arange(0, BLOCK_N)[None, :]
    p_ptrs = param + r[:, None] * tl.multiple_of(tl.load(fields + _P_STRIDE), VEC) + cols
    g_ptrs = grad + r[:, None] * tl.multiple_of(tl.load(fields + _G_STRIDE), VEC) + cols
    b_ptrs = backup + j[:, None].to(tl.int64) * tl.multiple_of(tl.load(fields + _B_STRIDE), VEC) + cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        mask = j_ok[:, None] & (start + cols < n_cols)
        w = tl.load(p_ptrs + start, mask=mask, other=0.0)
        old = w.to(tl.float32)
        if STAGE == _SUMSQ:
            acc += old * old
        else:
            new = old + tl.load(g_ptrs + start, mask=mask & usable, other=0.0).to(tl.float32) * scale  # 0: old
            if STAGE != _PROJECT:
                tl.store(b_ptrs + start, w, mask=mask & to_back)
            if STAGE != _STEP or BOX:
                origin = tl.where(to_back, old, tl.load(b_ptrs + start, mask=mask & ~to_back, other=0.0).to(tl.float32))
            if STAGE == _MEASURE:
                acc += tl.where(usable, (new - origin) * (new - origin), 0.0)
            else:
                if STAGE == _PROJECT:
                    new = tl.where(outside, _lerp(origin, new, factor), new)
                if BOX:
                    d = box_eps * tl.abs(origin)
                    new = tl.maximum(new, origin - d, propagate_nan=tl.PropagateNan.ALL)
                    new = tl.minimum(new, origin + d, propagate_nan=tl.PropagateNan.ALL)
                tl.store(p_ptrs + start, new.to(P_DTYPE), mask=mask & usable)
    if STAGE == _MEASURE or STAGE == _SUMSQ:
        tl.store(partials + tl.load(fields + _PART) + blk, tl.sum(tl.sum(acc, axis=1), axis=0))


def _launch(stage: tl.constexpr, params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor],
            n_backed: list[int], scales: Tensor | None, *, box_eps: float | None = None,
            delta_sumsq: Tensor | None = None, eps: float = 0.0, out: Tensor | None = None) -> None:
    """``stage`` over the lists: one launch per (param, grad) dtype pair (one in practice); with ``out`` (``[n]``),
    one more that sums each tensor's partials into it. No host sync."""
    device = params[0].device if params else torch.device("cpu")
    groups, first_part = plan([(p.dtype, g.dtype) for p, g in zip(params, grads, strict=True)],
                              [p.shape[1] for p in params], [len(idx) for idx in rows],
                              list(zip(params, grads, backups, strict=True)))
    partials = None if out is None else torch.empty((first_part[-1], 1), dtype=torch.float32, device=device)
    dummy = scales if scales is not None else partials  # for the pointers a stage does not read
    scales, delta_sumsq, partials = (dummy if v is None else v for v in (scales, delta_sumsq, partials))
    with device_guard(device):
        for group in groups:
            fields = [(params[i].data_ptr(), grads[i].data_ptr(), rows[i].data_ptr(), backups[i].data_ptr(),
                       len(rows[i]), n_backed[i], params[i].shape[1], params[i].stride(0), grads[i].stride(0),
                       backups[i].stride(0), i, group.first[k], first_part[i]) for k, i in enumerate(group.members)]
            p_dtype, g_dtype = group.key
            _rows_kernel[group.grid](
                table(fields, device), len(group.members), scales, float(box_eps or 0.0), delta_sumsq, float(eps),
                partials,
                P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype], STAGE=stage.value, BOX=box_eps is not None,
                **group.meta,
            )
        if out is not None:
            segment_sum(partials, first_part, out.view(-1, 1))


def _checked(params, grads, rows, backups, *vectors: Tensor) -> list[Tensor]:
    """Reject what the kernel would misread; ``vectors`` (per-tensor device values) made contiguous."""
    check_rows(params, rows, backups)
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        check(grad, f"grads[{i}]", 2)
        if grad.shape != param.shape:
            raise ValueError(f"grads[{i}] is {tuple(grad.shape)} but params[{i}] {tuple(param.shape)}")
    for vector in vectors:
        if vector.shape != (len(params),) or not vector.is_floating_point():
            raise ValueError(f"expected a float vector of {len(params)} values, got {vector.dtype}"
                             f" {tuple(vector.shape)}")
    return [vector.contiguous() for vector in vectors]


def perturb(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], n_backed: list[int],
            scales: Tensor, box_eps: float | None = None) -> None:
    """The ``perturb`` op of the backend contract: back up, step, clamp into the box; one launch per dtype pair."""
    (scales,) = _checked(params, grads, rows, backups, scales)
    _launch(_STEP, params, grads, rows, backups, n_backed, scales.float(), box_eps=box_eps)


def measure(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], n_backed: list[int],
            scales: Tensor) -> Tensor:
    """The ``measure`` op of the backend contract: back up, float32 ``[n]`` ``||W + scale * G - B||^2``."""
    (scales,) = _checked(params, grads, rows, backups, scales)
    out = torch.empty(len(params), dtype=torch.float32, device=scales.device)
    _launch(_MEASURE, params, grads, rows, backups, n_backed, scales.float(), out=out)
    return out


def project(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], scales: Tensor,
            delta_sumsq: Tensor, eps: float) -> None:
    """The ``project`` op of the backend contract: the step pulled back onto the ``eps`` ball around the backups."""
    scales, delta_sumsq = _checked(params, grads, rows, backups, scales, delta_sumsq)
    _launch(_PROJECT, params, grads, rows, backups, [len(idx) for idx in rows], scales.float(),
            delta_sumsq=delta_sumsq, eps=eps)


def row_sumsq(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
    """The ``row_sumsq`` op of the backend contract: float64 ``[n]``, reading only the listed rows."""
    check_rows(tensors, rows, tensors)
    out = torch.empty(len(tensors), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    _launch(_SUMSQ, tensors, tensors, rows, tensors, [0] * len(tensors), None, out=out)
    return out

"""perturb: back up the rows not yet backed up, then ``W += coef / ||G|| * G`` on the touched rows only, projected
onto the ``eps`` ball around the backups for PGD.

Each program takes ``BLOCK_M`` entries of one tensor's row list and walks their columns ``BLOCK_N`` at a time. The
scale comes from ``sumsq`` in device memory (fp64 math, one fp32 rounding); where it is zero or not finite the weights
are not written (the backups still are). Weights are loaded in their storage dtype, updated in fp32 and rounded once;
backups are the loaded bits, stored unconverted.

One kernel, three stages (``STAGE``):
``_STEP`` (FGM): back up, update, store; one launch.
``_MEASURE`` (PGD, first pass): back up and write each program's partial ``||W_new - B||^2`` of the unrounded fp32
    ``W_new``; nothing else is written. A second launch sums each tensor's partials.
``_PROJECT`` (PGD, second pass): recompute ``W_new`` bit for bit, pull it back onto the ball where the tensor's norm
    (read from device memory, so the host never waits) exceeds ``eps``, store it rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, check, check_rows, device_guard, locate, plan, segment_sum, table, typed

_STEP, _MEASURE, _PROJECT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# Table fields, one row per tensor.
(_PARAM, _GRAD, _ROWS, _BACKUP, _N_ROWS, _N_BACKED, _COLS, _P_STRIDE, _G_STRIDE, _B_STRIDE, _INDEX, _FIRST,
 _PART) = (tl.constexpr(k) for k in range(13))
_FIELDS = tl.constexpr(13)


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s formula, so the result matches the torch backend's to the ulp."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _perturb_kernel(table, n, sumsq, coef, norms_sq, eps, partials, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                    STAGE: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
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
    # The tensor's sumsq, loaded once per row: the interpreter can't broadcast a scalar comparison into a mask.
    s = tl.load(sumsq + which + tl.zeros_like(j)).to(tl.float64)
    usable = ((s > 0) & (s < float("inf")))[:, None]
    scale = (coef / tl.sqrt(tl.where(usable, s[:, None], 1.0))).to(tl.float32)
    if STAGE == _PROJECT:
        norm = tl.sqrt(tl.load(norms_sq + which))
        outside = norm > eps
        factor = eps / tl.where(outside, norm, 1.0)
        to_back = j[:, None] < 0  # the first pass backed them all up
    else:
        to_back = (j >= tl.load(fields + _N_BACKED))[:, None]

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
        new = old + tl.load(g_ptrs + start, mask=mask & usable, other=0.0).to(tl.float32) * scale  # unusable: old
        if STAGE != _PROJECT:
            tl.store(b_ptrs + start, w, mask=mask & to_back)
        if STAGE == _STEP:
            tl.store(p_ptrs + start, new.to(P_DTYPE), mask=mask & usable)
        else:
            origin = tl.where(to_back, old, tl.load(b_ptrs + start, mask=mask & ~to_back, other=0.0).to(tl.float32))
            if STAGE == _MEASURE:
                acc += (new - origin) * (new - origin)
            else:
                new = tl.where(outside, _lerp(origin, new, factor), new)
                tl.store(p_ptrs + start, new.to(P_DTYPE), mask=mask & usable)
    if STAGE == _MEASURE:
        tl.store(partials + tl.load(fields + _PART) + blk, tl.sum(tl.sum(acc, axis=1), axis=0))


def perturb(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    sumsq: Tensor,
    coef: float,
    project_eps: float | None,
) -> None:
    """The ``perturb`` op of the backend contract, no host sync. Launches per (param, grad) dtype pair (one in
    practice): one for FGM; for PGD a measuring pass, a per-tensor sum, and the projecting pass."""
    check_rows(params, rows, backups)
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        check(grad, f"grads[{i}]", 2)
        if grad.shape != param.shape:
            raise ValueError(f"grads[{i}] is {tuple(grad.shape)} but params[{i}] {tuple(param.shape)}")
    device = sumsq.device
    sumsq = sumsq.contiguous()
    groups, first_part = plan([(p.dtype, g.dtype) for p, g in zip(params, grads, strict=True)],
                              [p.shape[1] for p in params], [len(idx) for idx in rows],
                              list(zip(params, grads, backups, strict=True)))
    stages = [_STEP] if project_eps is None else [_MEASURE, _PROJECT]
    if project_eps is None:
        partials = norms_sq = sumsq  # not read by _STEP
    else:
        partials = torch.empty((first_part[-1], 1), dtype=torch.float32, device=device)
        norms_sq = torch.empty((len(params), 1), dtype=torch.float32, device=device)
    with device_guard(device):
        launches = []
        for group in groups:
            fields = [(params[i].data_ptr(), grads[i].data_ptr(), rows[i].data_ptr(), backups[i].data_ptr(),
                       len(rows[i]), n_backed[i], params[i].shape[1], params[i].stride(0), grads[i].stride(0),
                       backups[i].stride(0), i, group.first[k], first_part[i]) for k, i in enumerate(group.members)]
            launches.append((group, table(fields, device)))
        for stage in stages:
            if stage == _PROJECT:
                segment_sum(partials, first_part, norms_sq)
            for group, fields in launches:
                p_dtype, g_dtype = group.key
                _perturb_kernel[group.grid](
                    fields, len(group.members), sumsq, coef, norms_sq, project_eps or 0.0, partials,
                    P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype], STAGE=stage.value, **group.meta,
                )

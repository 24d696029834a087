"""scan: one read of every gradient (and parameter) for their fp32 sums of squares and the gradient's fresh rows.

Each program walks ``blocks_per_program`` consecutive blocks of ``BLOCK_M`` rows of one gradient (and of its
parameter, when ``params`` is given), each block's columns ``BLOCK_N`` at a time, accumulating squares in fp32 tiles;
it flags the fresh rows (non-zero, not yet touched; every row of every ``fresh`` buffer is written by exactly one
program) and writes one partial (gradient sum of squares, fresh count, parameter sum of squares); a second launch sums
the partials of each tensor into ``stats``. A row is non-zero when any element is (NaN included), even where its
squares underflow to zero in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastadv.backends.contract import Tensors

from ._common import TL_DTYPES, block_range, check, device_guard, launch, locate, plan, segment_sum, typed

# Table fields, one row per tensor.
(_GRAD, _PARAM, _TOUCHED, _FRESH, _ROWS, _COLS, _G_STRIDE, _P_STRIDE, _FIRST, _PART) = (
    tl.constexpr(k) for k in range(10)
)
_FIELDS = tl.constexpr(10)


@triton.jit
def _scan_kernel(
    table,
    n,
    blocks_per_program,
    partials,
    G_DTYPE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    HAS_PARAMS: tl.constexpr,
    NT: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t, program = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    grad = typed(fields + _GRAD, G_DTYPE, VEC)
    param = typed(fields + _PARAM, P_DTYPE, VEC)
    touched = typed(fields + _TOUCHED, tl.int8, 1)
    fresh = typed(fields + _FRESH, tl.int8, 1)
    n_rows = tl.load(fields + _ROWS)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)
    g_stride = tl.multiple_of(tl.load(fields + _G_STRIDE), VEC)
    p_stride = tl.multiple_of(tl.load(fields + _P_STRIDE), VEC)

    lanes = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_fresh = tl.zeros([BLOCK_M], tl.float32)
    first, last = block_range(program, blocks_per_program, n_rows, BLOCK_M)
    for block in range(first, last):
        rows = block * BLOCK_M + lanes
        row_ok = rows < n_rows
        g_ptrs = grad + rows[:, None].to(tl.int64) * g_stride + cols
        p_ptrs = param + rows[:, None].to(tl.int64) * p_stride + cols
        nonzero = tl.zeros([BLOCK_M, BLOCK_N], tl.int1)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(g_ptrs + start, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
            nonzero |= x != 0
            if HAS_PARAMS:
                w = tl.load(p_ptrs + start, mask=mask, other=0.0).to(tl.float32)
                acc_p += w * w
        seen = tl.load(touched + rows, mask=row_ok, other=1)
        new = (tl.max(nonzero.to(tl.int32), axis=1) > 0) & (seen == 0)
        tl.store(fresh + rows, new.to(tl.int8), mask=row_ok)
        n_fresh += new.to(tl.float32)

    part = partials + (tl.load(fields + _PART) + program) * 3
    tl.store(part, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(part + 1, tl.sum(n_fresh, axis=0))
    tl.store(part + 2, tl.sum(tl.sum(acc_p, axis=1), axis=0))


def scan(grads: Tensors, touched: Tensors, fresh: Tensors, params: Tensors | None = None) -> Tensor:
    """float64 ``[n, 3]`` stats (sum of squares of ``grads[i]``, its fresh row count, sum of squares of ``params[i]``
    or 0); flags ``fresh[i]``.

    One launch per (gradient, parameter) dtype pair and vector width (one in practice) plus one for the per-tensor
    sums; no host sync.
    """
    device = grads[0].device
    if params is not None and len(params) != len(grads):
        raise ValueError(f"{len(params)} params for {len(grads)} grads")
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh, strict=True)):
        check(grad, f"grads[{i}]", 2)
        check(seen, f"touched[{i}]", 1, torch.bool)
        check(new, f"fresh[{i}]", 1, torch.bool)
        if seen.shape != grad.shape[:1] or new.shape != grad.shape[:1]:
            raise ValueError(f"touched[{i}] and fresh[{i}] must have the {grad.shape[0]} rows of grads[{i}]")
        if params is not None:
            check(params[i], f"params[{i}]", 2)
            if params[i].shape != grad.shape:
                raise ValueError(f"params[{i}] is {tuple(params[i].shape)} but grads[{i}] {tuple(grad.shape)}")
    ps = grads if params is None else params  # without params the kernel never reads the second pointer
    groups, first_part = plan(
        [(g.dtype, p.dtype) for g, p in zip(grads, ps, strict=True)],
        [g.shape[1] for g in grads],
        [g.shape[0] for g in grads],
        list(zip(grads, ps, strict=True)),
    )
    partials = torch.empty((first_part[-1], 3), dtype=torch.float32, device=device)
    stats = torch.empty((len(grads), 3), dtype=torch.float64, device=device)

    def fields(i: int, first: int) -> tuple[int, ...]:
        addresses = (t.data_ptr() for t in (grads[i], ps[i], touched[i], fresh[i]))
        return (*addresses, *grads[i].shape, grads[i].stride(0), ps[i].stride(0), first, first_part[i])

    with device_guard(device):
        launch(
            _scan_kernel,
            groups,
            device,
            fields,
            partials,
            keyed=lambda key: {"G_DTYPE": TL_DTYPES[key[0]], "P_DTYPE": TL_DTYPES[key[1]]},
            HAS_PARAMS=params is not None,
        )
        segment_sum(partials, first_part, stats)
    return stats

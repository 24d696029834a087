"""scan: one read of every gradient for its fp32 sum of squares and its fresh rows (non-zero, not yet touched).

Each program takes ``BLOCK_M`` rows of one gradient, walks their columns ``BLOCK_N`` at a time accumulating squares in
an fp32 tile, flags its fresh rows (every row of every ``fresh`` buffer is written by exactly one program) and writes
one partial (sum of squares, fresh count); a second launch sums the partials of each tensor into ``stats``.
A row is non-zero when any element is (NaN included), even where its squares underflow to zero in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, check, device_guard, locate, plan, segment_sum, table, typed

# Table fields, one row per tensor.
_GRAD, _TOUCHED, _FRESH, _ROWS, _COLS, _STRIDE, _FIRST, _PART = (tl.constexpr(k) for k in range(8))
_FIELDS = tl.constexpr(8)


@triton.jit
def _scan_kernel(table, n, partials, DTYPE: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    t, blk = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    grad = typed(fields + _GRAD, DTYPE, VEC)
    touched = typed(fields + _TOUCHED, tl.int8, 1)
    fresh = typed(fields + _FRESH, tl.int8, 1)
    n_rows = tl.load(fields + _ROWS)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)
    stride = tl.multiple_of(tl.load(fields + _STRIDE), VEC)

    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    ptrs = grad + rows[:, None].to(tl.int64) * stride + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    nonzero = tl.zeros([BLOCK_M, BLOCK_N], tl.int1)
    for start in range(0, n_cols, BLOCK_N):
        mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
        x = tl.load(ptrs + start, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
        nonzero |= x != 0
    seen = tl.load(touched + rows, mask=row_ok, other=1)
    new = (tl.max(nonzero.to(tl.int32), axis=1) > 0) & (seen == 0)
    tl.store(fresh + rows, new.to(tl.int8), mask=row_ok)

    part = partials + (tl.load(fields + _PART) + blk) * 2
    tl.store(part, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(part + 1, tl.sum(new.to(tl.float32), axis=0))


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor]) -> Tensor:
    """float64 ``[n, 2]`` stats (sum of squares of ``grads[i]``, its fresh row count); flags ``fresh[i]``.

    One launch per gradient dtype (one in practice) plus one for the per-tensor sums; no host sync.
    """
    device = grads[0].device
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh, strict=True)):
        check(grad, f"grads[{i}]", 2)
        check(seen, f"touched[{i}]", 1, torch.bool)
        check(new, f"fresh[{i}]", 1, torch.bool)
        if seen.shape != grad.shape[:1] or new.shape != grad.shape[:1]:
            raise ValueError(f"touched[{i}] and fresh[{i}] must have the {grad.shape[0]} rows of grads[{i}]")
    groups, first_part = plan([g.dtype for g in grads], [g.shape[1] for g in grads], [g.shape[0] for g in grads],
                              [[g] for g in grads])
    partials = torch.empty((first_part[-1], 2), dtype=torch.float32, device=device)
    stats = torch.empty((len(grads), 2), dtype=torch.float64, device=device)
    with device_guard(device):
        for group in groups:
            fields = [(grads[i].data_ptr(), touched[i].data_ptr(), fresh[i].data_ptr(), *grads[i].shape,
                       grads[i].stride(0), group.first[k], first_part[i]) for k, i in enumerate(group.members)]
            _scan_kernel[group.grid](table(fields, device), len(group.members), partials, DTYPE=TL_DTYPES[group.key],
                                     **group.meta)
        segment_sum(partials, first_part, stats)
    return stats

"""restore: copy the backed-up rows back into the parameters, in place and bit-exact.

The kernel moves the elements as integers of their size, so the copy is of bits (NaN payloads included) and one launch
serves every dtype of that size (bf16 and fp16 together). Each program copies ``BLOCK_M`` rows.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import check_rows, device_guard, locate, plan, table, typed

_BITS = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}

# Table fields, one row per tensor.
_PARAM, _ROWS, _BACKUP, _N_ROWS, _COLS, _P_STRIDE, _B_STRIDE, _FIRST = (tl.constexpr(k) for k in range(8))
_FIELDS = tl.constexpr(8)


@triton.jit
def _restore_kernel(table, n, DTYPE: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    t, blk = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    param = typed(fields + _PARAM, DTYPE, VEC)
    backup = typed(fields + _BACKUP, DTYPE, VEC)
    index = typed(fields + _ROWS, tl.int64, 1)
    n_rows = tl.load(fields + _N_ROWS)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)

    j = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    j_ok = j < n_rows
    r = tl.load(index + j, mask=j_ok, other=0)
    cols = tl.arange(0, BLOCK_N)[None, :]
    p_ptrs = param + r[:, None] * tl.multiple_of(tl.load(fields + _P_STRIDE), VEC) + cols
    b_ptrs = backup + j[:, None].to(tl.int64) * tl.multiple_of(tl.load(fields + _B_STRIDE), VEC) + cols
    for start in range(0, n_cols, BLOCK_N):
        mask = j_ok[:, None] & (start + cols < n_cols)
        tl.store(p_ptrs + start, tl.load(b_ptrs + start, mask=mask), mask=mask)


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    """The ``restore`` op of the backend contract; one launch per element size, no host sync."""
    check_rows(params, rows, backups)
    if not params:
        return
    device = params[0].device
    groups, _ = plan([p.element_size() for p in params], [p.shape[1] for p in params], [len(idx) for idx in rows],
                     list(zip(params, backups, strict=True)))
    with device_guard(device):
        for group in groups:
            fields = [(params[i].data_ptr(), rows[i].data_ptr(), backups[i].data_ptr(), len(rows[i]),
                       params[i].shape[1], params[i].stride(0), backups[i].stride(0), group.first[k])
                      for k, i in enumerate(group.members)]
            _restore_kernel[group.grid](table(fields, device), len(group.members), DTYPE=_BITS[group.key],
                                        **group.meta)

"""restore: copy the backed-up rows back into the parameters, in place and bit-exact.

The kernel moves the elements as integers of their size, so the copy is of bits (NaN payloads included) and one launch
serves every dtype of that size (bf16 and fp16 together); 8-byte elements move as pairs of 4-byte words. Each program
copies ``blocks_per_program`` blocks of ``BLOCK_M`` rows. A listed row outside the parameter is skipped (and fails a
device assertion under ``TRITON_DEBUG``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadv.backends.contract import Tensors

from ._common import block_range, check_rows, device_guard, launch, listed_rows, locate, plan, typed

_BITS = {1: tl.int8, 2: tl.int16, 4: tl.int32}

# Table fields, one row per tensor.
(_PARAM, _ROWS, _BACKUP, _N_LISTED, _P_ROWS, _COLS, _P_STRIDE, _B_STRIDE, _FIRST) = (tl.constexpr(k) for k in range(9))
_FIELDS = tl.constexpr(9)


@triton.jit
def _restore_kernel(
    table,
    n,
    blocks_per_program,
    DTYPE: tl.constexpr,
    NT: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t, program = locate(table, n, _FIELDS, _FIRST, NT)
    fields = table + t * _FIELDS
    param = typed(fields + _PARAM, DTYPE, VEC)
    backup = typed(fields + _BACKUP, DTYPE, VEC)
    index = typed(fields + _ROWS, tl.int64, 1)
    n_listed = tl.load(fields + _N_LISTED)
    n_param_rows = tl.load(fields + _P_ROWS)
    n_cols = tl.multiple_of(tl.load(fields + _COLS), VEC)
    p_stride = tl.multiple_of(tl.load(fields + _P_STRIDE), VEC)
    b_stride = tl.multiple_of(tl.load(fields + _B_STRIDE), VEC)

    cols = tl.arange(0, BLOCK_N)[None, :]
    first, last = block_range(program, blocks_per_program, n_listed, BLOCK_M)
    for block in range(first, last):
        j = block * BLOCK_M + tl.arange(0, BLOCK_M)
        r, row_ok = listed_rows(index, j, n_listed, n_param_rows)
        p_ptrs = param + r[:, None] * p_stride + cols
        b_ptrs = backup + j[:, None].to(tl.int64) * b_stride + cols
        for start in range(0, n_cols, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < n_cols)
            tl.store(p_ptrs + start, tl.load(b_ptrs + start, mask=mask), mask=mask)


def restore(params: Tensors, rows: Tensors, backups: Tensors) -> None:
    """The ``restore`` op of the backend contract; one launch per element size and vector width, no host sync."""
    check_rows(params, rows, backups)
    if not params:
        return
    device = params[0].device
    # The same bytes, and no int64 variant of the kernel (it spilled a register in the copy loop).
    params, backups = ([t.view(torch.int32) if t.element_size() == 8 else t for t in ts] for ts in (params, backups))
    groups, _ = plan(
        [p.element_size() for p in params],
        [p.shape[1] for p in params],
        [len(idx) for idx in rows],
        list(zip(params, backups, strict=True)),
    )

    def fields(i: int, first: int) -> tuple[int, ...]:
        param, idx, backup = params[i], rows[i], backups[i]
        addresses = (t.data_ptr() for t in (param, idx, backup))
        return (*addresses, len(idx), *param.shape, param.stride(0), backup.stride(0), first)

    with device_guard(device):
        launch(_restore_kernel, groups, device, fields, keyed=lambda size: {"DTYPE": _BITS[size]})

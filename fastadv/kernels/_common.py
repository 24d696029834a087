"""Multi-tensor plumbing shared by the kernels: device-side pointer tables, block sizes, per-tensor sums.

One launch covers a list of tensors through an int64 table on the device, one row per tensor (data addresses, sizes,
strides, the first program of the tensor), as apex's ``multi_tensor_apply`` and PyTorch's foreach kernels do. Each
program finds its tensor by comparing its id with those first programs, loads the tensor's fields once, then walks
``blocks_per_program`` consecutive row blocks of it. A pointer's element type and the vector width of its accesses are
fixed at compile time, so a list takes one launch per (dtype, vector width) group (in practice every embedding of a
model has the same dtype and aligned rows: one launch). Reductions are two-stage and deterministic: each program
writes one partial, a second small launch sums each tensor's partials in a fixed order (no atomics, no zero-filled
buffers). A launch has at most about :data:`MAX_PROGRAMS` programs, so that second launch has few partials to add.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

_K = TypeVar("_K", bound=Hashable)

#: Elements per program tile (rows x columns): 16 per thread per live tensor at the default 4 warps.
TILE = 2048
MAX_BLOCK_N = 1024
#: Widest vector access the hints below aim at, in bytes.
_VEC_BYTES = 16
#: Programs per launch, about: several waves on any GPU (31 per SM of an H100), few enough that a big tensor's programs
#: each walk several row blocks after one round of table loads, and that its per-tensor sum adds few partials. Fixed,
#: not per device, so that the partition, hence the rounding of the sums, is the same on every GPU.
MAX_PROGRAMS = 4096

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def col_block(widths: Iterable[int]) -> int:
    """Power-of-two column tile: the widest row rounded up (at most 1024), halved while that pads the widest row by
    more than an eighth (768 columns: three full chunks of 256 rather than one 1024 chunk a quarter empty)."""
    widest = max(widths, default=1)
    block = min(triton.next_power_of_2(max(widest, 1)), MAX_BLOCK_N)
    while block > 64 and -widest % block > widest // 8:
        block //= 2
    return block


def row_block(block_n: int, most_rows: int) -> int:
    """Rows per program: fill the tile, but no more than the longest tensor needs."""
    return max(1, min(TILE // block_n, triton.next_power_of_2(max(most_rows, 1))))


def vec_hint(tensors: Iterable[Tensor], ints: Iterable[int]) -> int:
    """Largest element count (<= 16 bytes) dividing every address and every int (widths, strides): a vectorisation
    hint for the compiler, which cannot see the alignment of addresses read from a table."""
    tensors = list(tensors)
    vec = _VEC_BYTES // max(t.element_size() for t in tensors)
    values = [t.data_ptr() // t.element_size() for t in tensors] + list(ints)
    while vec > 1 and any(v % vec for v in values):
        vec //= 2
    return vec


def group_by(keys: Sequence[_K]) -> dict[_K, list[int]]:
    """Indices of ``keys`` grouped by value, in first-seen order (one launch per group)."""
    groups: dict[_K, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def starts(counts: Iterable[int]) -> list[int]:
    """Exclusive prefix sums, plus the total at the end."""
    out = [0]
    for count in counts:
        out.append(out[-1] + count)
    return out


@dataclasses.dataclass
class Group:
    """One launch: the list indices it covers (``members``), the first program of each plus the total (``first``),
    the row blocks each program walks, and its compile-time tile and hints (``meta``)."""

    key: Hashable
    members: list[int]
    first: list[int]
    blocks_per_program: int
    meta: dict[str, int]

    @property
    def grid(self) -> tuple[int]:
        return (self.first[-1],)


def plan(
    keys: Sequence[Hashable], widths: Sequence[int], lengths: Sequence[int], tensors: Sequence[Sequence[Tensor]]
) -> tuple[list[Group], list[int]]:
    """Launches for a list of ``lengths[i]`` rows of ``widths[i]`` columns, one per distinct (``keys[i]``, vector
    width), those with no program left out; and the global first program of each tensor plus the total (partials'
    index). ``tensors[i]`` are what tensor ``i``'s kernel reads: their alignment sets its vector width, so that an odd
    tensor (a ``[1, 3]`` bias, an offset view) does not drop an aligned one to scalar accesses."""
    vecs = [vec_hint(tensors[i], [t.stride(0) for t in tensors[i]] + [widths[i]]) for i in range(len(keys))]
    groups, programs = [], [0] * len(keys)
    for (key, vec), members in group_by(list(zip(keys, vecs, strict=True))).items():
        block_n = col_block(widths[i] for i in members)
        block_m = row_block(block_n, max(lengths[i] for i in members))
        blocks = {i: triton.cdiv(lengths[i], block_m) for i in members}
        per_program = max(1, triton.cdiv(sum(blocks.values()), MAX_PROGRAMS))
        for i in members:
            programs[i] = triton.cdiv(blocks[i], per_program)
        first = starts(programs[i] for i in members)
        meta = {"NT": triton.next_power_of_2(len(members)), "VEC": vec, "BLOCK_M": block_m, "BLOCK_N": block_n}
        if first[-1]:
            groups.append(Group(key, members, first, per_program, meta))
    return groups, starts(programs)


def _upload(values: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The table in (pinned) host memory and on ``device``, copied asynchronously on the current stream: no host
    sync."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host, host
    pinned = host.pin_memory()
    return pinned, pinned.to(device, non_blocking=True)


@functools.lru_cache(maxsize=128)
def _cached_table(values: tuple[tuple[int, ...], ...], device: torch.device, stream: int) -> Tensor:
    return _upload(values, device)[1]


#: The tables of launches captured into CUDA graphs, with the pinned buffers their captured copies read: a graph
#: replays both addresses for as long as it lives, which no cache can know, so they are kept for the process lifetime.
_CAPTURED: list[tuple[Tensor, Tensor]] = []


def capturing(device: torch.device) -> bool:
    """Whether launches on ``device``'s current stream are being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def table(rows: Iterable[Iterable[int]], device: torch.device) -> Tensor:
    """An int64 ``[len(rows), fields]`` table on ``device``. Eager launches share a cache, since the same tensors come
    back every step (per stream, as its copy is ordered only on the stream that made it); a launch being captured
    into a CUDA graph gets its own table, never freed (see :data:`_CAPTURED`)."""
    values = tuple(tuple(int(v) for v in row) for row in rows)
    if capturing(device):
        pinned, on_device = _upload(values, device)  # the copy is captured too: it runs before the kernel each replay
        _CAPTURED.append((pinned, on_device))
        return on_device
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    return _cached_table(values, device, stream)


def launch(
    kernel: Any,
    groups: Iterable[Group],
    device: torch.device,
    fields: Callable[[int, int], Sequence[int]],
    *args: Any,
    keyed: Callable[[Any], dict[str, Any]],
    **constexprs: Any,
) -> None:
    """``kernel`` launched once per group of :func:`plan`, with its table (``fields(i, first)``: the row of tensor
    ``i`` of the list, whose first program is ``first``), its tensor count, the row blocks per program, then ``args``;
    compile-time, ``keyed(group.key)`` (the dtypes), ``constexprs`` and the group's tile."""
    for group in groups:
        rows = [fields(i, first) for i, first in zip(group.members, group.first)]
        kernel[group.grid](
            table(rows, device),
            len(group.members),
            group.blocks_per_program,
            *args,
            **keyed(group.key),
            **constexprs,
            **group.meta,
        )


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check(tensor: Tensor, name: str, dim: int, dtype: torch.dtype | None = None) -> None:
    """The kernels read raw addresses, which Triton can't type-check: reject what they would misread."""
    if tensor.dim() != dim or (tensor.numel() > 1 and tensor.stride(-1) != 1):
        raise ValueError(
            f"{name} must be {dim}-D with unit stride along its last dim: {tuple(tensor.shape)},"
            f" strides {tuple(tensor.stride())}"
        )
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")


def check_rows(params: Sequence[Tensor], rows: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """``params[i]`` ``[rows, cols]``, ``rows[i]`` int64, ``backups[i]`` at least ``[len(rows[i]), cols]``."""
    for i, (param, idx, backup) in enumerate(zip(params, rows, backups, strict=True)):
        check(param, f"params[{i}]", 2)
        check(idx, f"rows[{i}]", 1, torch.int64)
        check(backup, f"backups[{i}]", 2, param.dtype)
        if backup.shape[0] < len(idx) or backup.shape[1] != param.shape[1]:
            raise ValueError(
                f"backups[{i}] is {tuple(backup.shape)}, too small for {len(idx)} rows of params[{i}]"
                f" {tuple(param.shape)}"
            )


@triton.jit
def locate(table, n, FIELDS: tl.constexpr, FIRST: tl.constexpr, NT: tl.constexpr):
    """(tensor, program within it) of this program: the last tensor whose first program (field FIRST) is <= its id."""
    pid = tl.program_id(0)
    ts = tl.arange(0, NT)
    firsts = tl.load(table + ts * FIELDS + FIRST, mask=ts < n, other=pid + 1)
    t = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    return t, pid - tl.load(table + t * FIELDS + FIRST)


@triton.jit
def block_range(program, blocks_per_program, n_rows, BLOCK_M: tl.constexpr):
    """The row blocks ``[first, last)`` that a tensor's ``program``-th program walks: ``blocks_per_program``
    consecutive ones, fewer at the tensor's end."""
    first = program * blocks_per_program
    return first, tl.minimum(first + blocks_per_program, tl.cdiv(n_rows, BLOCK_M))


@triton.jit
def listed_rows(index, j, n_listed, n_param_rows):
    """The parameter rows ``index[j]``, and which of them to touch: ``j`` listed and the row inside the parameter.

    A row outside ``[0, n_param_rows)`` is masked off, nothing read or written for it, and fails a device assertion
    in kernels compiled under ``TRITON_DEBUG=1`` (the torch backend raises, the extension asserts; a check on the host
    would need a sync). Its address is replaced by row 0's, which is never dereferenced."""
    listed = j < n_listed
    r = tl.load(index + j, mask=listed, other=0)
    inside = (r >= 0) & (r < n_param_rows)
    tl.device_assert(inside | ~listed, "fastadv: a listed row is outside its parameter")
    return tl.where(inside, r, 0), listed & inside


@triton.jit
def typed(field, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """The address in ``*field`` as a ``DTYPE`` pointer, hinted as aligned to VEC elements."""
    return tl.multiple_of(tl.load(field).to(tl.pointer_type(DTYPE)), VEC * (DTYPE.primitive_bitwidth // 8))


@triton.jit
def _segment_sum_kernel(partials, bounds, out, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, :] = sum of partials[bounds[i]:bounds[i + 1], :], accumulated in out's dtype in a fixed order; rows of K
    values."""
    i = tl.program_id(0)
    lo = tl.load(bounds + i)
    hi = tl.load(bounds + i + 1)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK_K], out.dtype.element_ty)
    for start in range(lo, hi, BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = (p < hi)[:, None] & (ks < K)[None, :]
        acc += tl.load(partials + p[:, None] * K + ks[None, :], mask=mask, other=0.0).to(acc.dtype)
    tl.store(out + i * K + ks, tl.sum(acc, axis=0), mask=ks < K)


#: Whether these kernels run under the interpreter (decided by ``TRITON_INTERPRET`` when they were decorated).
INTERPRETED = not isinstance(_segment_sum_kernel, triton.runtime.JITFunction)


#: Partials a program of the per-tensor sum adds per step: a tensor has at most about MAX_PROGRAMS of them, so a few
#: steps.
_SEGMENT_BLOCK = 1024


def segment_sum(partials: Tensor, first: list[int], out: Tensor) -> None:
    """``out[i] = partials[first[i]:first[i + 1]].sum(0)`` in one launch; ``partials`` is ``[P, K]``, ``out``
    ``[len(first) - 1, K]`` (every row written, empty segments as zero)."""
    if out.shape[0]:
        k = partials.shape[1]
        _segment_sum_kernel[(out.shape[0],)](
            partials, table([first], out.device), out, K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK=_SEGMENT_BLOCK
        )

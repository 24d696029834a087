"""Pure-PyTorch backend: one read of each gradient in ``scan``, everything else on the touched rows only.

It runs wherever PyTorch runs, on every dtype (float64 in float64 math), and is the fallback of every other backend.
See :class:`fastadv.backends.contract.Backend` for the contract of each op. Where a tensor's every row is perturbed
(a tied embedding, AWP's dense weights) and backed up, the rows are in order, so the ops use slices instead of
gathers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fastadv.backends.contract import Tensors

__all__ = ["scan", "row_sumsq", "backup", "perturb", "measure", "project", "restore", "input_step", "supports"]

# On the CPU the ops walk rows in chunks, through buffers made once per tensor of a call and reused by its chunks.
# Temporaries of the touched rows' size were fresh memory at every call (page faults: 6000 per FGM attack at 250002x768
# fp32, 41000 at 32000x4096 bf16, where converting rows then cost more than moving them); chunks stay in cache and
# allocate nothing new after the first call. A chunk is about this many fp32 bytes per thread (an op splits its rows
# over the threads; single-threaded, 0.5-1 MB was fastest on a 2-core CPU, 4 MB 30% slower), at most _MAX_CHUNK_BYTES:
# an op's few buffers must stay well below glibc's 32 MB mmap threshold, or they are fresh pages at every call
# (unmeasured on CPUs with more than 2 cores). Elsewhere a tensor is one chunk.
_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_BYTES = 4 << 20


def _math_dtype(tensor: Tensor) -> torch.dtype:
    """What the ops compute in: fp32, or fp64 for float64 tensors."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunk_rows(tensor: Tensor, count: int, itemsize: int = 4) -> int:
    """Rows per chunk when walking ``count`` rows of ``tensor`` through buffers of ``itemsize``-byte elements (the
    math dtype's, fp32 unless the rows stay in their own dtype)."""
    if tensor.device.type != "cpu":
        return max(1, count)
    chunk = min(_MAX_CHUNK_BYTES, _CHUNK_BYTES * torch.get_num_threads())
    return max(1, chunk // (itemsize * max(1, tensor.shape[1])))


def _spans(tensor: Tensor, count: int, itemsize: int = 4) -> list[slice]:
    """Chunks of the positions ``0..count-1`` of ``count`` rows of ``tensor``."""
    step = _chunk_rows(tensor, count, itemsize)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _every_row(param: Tensor, idx: Tensor, done: int) -> bool:
    """Whether the rows are ``0..n-1`` in order, so slices can replace gathers: a list holding every row is in order
    unless some but not all of its rows are backed up (the contract)."""
    return len(idx) == param.shape[0] and done in (0, len(idx))


def _pieces(param: Tensor, idx: Tensor, done: int, itemsize: int = 4) -> list[tuple[slice | Tensor, slice]]:
    """The perturbed rows in chunks: ``(rows of param, their positions in idx and the backup)``; the rows are slices
    when they are every row in order, else pieces of the index list."""
    spans = _spans(param, len(idx), itemsize)
    if _every_row(param, idx, done):
        return [(span, span) for span in spans]
    return [(idx[span], span) for span in spans]


class _Buffers:
    """Buffers of one chunk's shape, made on first use and reused by every chunk of a tensor."""

    def __init__(self, like: Tensor, rows: int) -> None:
        self.like, self.rows = like, rows
        self._made: dict[str, Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, rows: int) -> Tensor:
        buffer = self._made.get(name)
        if buffer is None:
            buffer = self._made[name] = self.like.new_empty((self.rows, self.like.shape[1]), dtype=dtype)
        return buffer[:rows]


def _rows_in(source: Tensor, piece: slice | Tensor, dtype: torch.dtype, buffers: _Buffers, name: str) -> Tensor:
    """The rows ``piece`` of ``source`` in ``dtype``: a view where they are a slice already in it, else written into
    the buffer ``name`` (a gather of a narrower dtype lands in a buffer of its own first: index_select does not
    convert)."""
    rows = piece.stop - piece.start if isinstance(piece, slice) else len(piece)
    if isinstance(piece, slice):
        view = source[piece]
        return view if source.dtype == dtype else buffers.get(name, dtype, rows).copy_(view)
    if source.dtype == dtype:
        return torch.index_select(source, 0, piece, out=buffers.get(name, dtype, rows))
    gathered = torch.index_select(source, 0, piece, out=buffers.get(f"{name}:{source.dtype}", source.dtype, rows))
    return buffers.get(name, dtype, rows).copy_(gathered)


def _row_norms(tensor: Tensor, idx: Tensor | None = None) -> Tensor:
    """L2 norm of each row of ``tensor`` (of the rows ``idx``), accumulated in the math dtype, in one read of them."""
    wide = _math_dtype(tensor)
    count = tensor.shape[0] if idx is None else len(idx)
    if tensor.device.type != "cpu" or (idx is None and tensor.dtype == wide):
        return torch.linalg.vector_norm(tensor if idx is None else tensor[idx], dim=-1, dtype=wide)
    out = torch.empty(count, dtype=wide, device=tensor.device)
    buffers = _Buffers(tensor, _chunk_rows(tensor, count))
    for span in _spans(tensor, count):
        rows = _rows_in(tensor, span if idx is None else idx[span], wide, buffers, "rows")
        torch.linalg.vector_norm(rows, dim=-1, out=out[span])
    return out


def _norms_and_sumsq(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Norms of the rows of ``grad``, zero exactly where their fp32 (fp64) ones are, and its sum of squares in the math
    dtype. A bf16/fp16 gradient on the CPU gets norms in its own dtype (accumulated in fp32, rounded once: a row's
    norm is at least its largest element, so none rounds to zero), a read at its own width where widening every row
    costs twice that; its sum of squares then comes from its non-zero rows alone (finding them is free on the CPU)."""
    wide = _math_dtype(grad)
    if grad.dtype == wide or grad.device.type != "cpu":
        norms = torch.linalg.vector_norm(grad, dim=-1, dtype=wide)
        return norms, norms.square().sum()
    norms = torch.linalg.vector_norm(grad, dim=-1)
    rows = norms.nonzero().view(-1)
    return norms, _row_norms(grad, None if len(rows) == len(norms) else rows).square().sum()


def scan(grads: Tensors, touched: Tensors, fresh: Tensors, params: Tensors | None = None) -> Tensor:
    stats = torch.zeros(len(grads), 3, dtype=torch.float64, device=grads[0].device)
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh)):
        norms, stats[i, 0] = _norms_and_sumsq(grad)
        torch.ne(norms.masked_fill_(seen, 0), 0, out=new)  # a NaN norm is non-zero, a touched row is not fresh
        stats[i, 1] = new.sum()
        if params is not None:
            stats[i, 2] = _row_norms(params[i]).square().sum()
    return stats


def row_sumsq(tensors: Tensors, rows: Tensors) -> Tensor:
    sums = [_row_norms(tensor, idx).square().sum() for tensor, idx in zip(tensors, rows)]
    return torch.stack(sums).double() if sums else torch.zeros(0, dtype=torch.float64)


def backup(params: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int]) -> None:
    for param, idx, saved, done in zip(params, rows, backups, n_backed):
        if done >= len(idx):
            continue
        if _every_row(param, idx, done):
            saved.copy_(param)
        else:
            torch.index_select(param, 0, idx[done:], out=saved[done : len(idx)])


def _steps(
    param: Tensor, grad: Tensor, idx: Tensor, backup: Tensor, done: int, scale: Tensor, buffers: _Buffers
) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
    """For each chunk of the perturbed rows: its rows, ``W + scale * G`` of them in the math dtype (a buffer, valid
    until the next chunk) and their backup rows ``B`` (in the parameter's dtype). The weights are read from ``param``
    (every backup is written before the first chunk)."""
    wide = _math_dtype(param)
    scale = scale.to(wide)
    for rows, at in _pieces(param, idx, done):
        weights = _rows_in(param, rows, wide, buffers, "new")
        step = _rows_in(grad, rows, wide, buffers, "grad")
        yield rows, torch.addcmul(weights, step, scale, out=buffers.get("new", wide, len(step))), backup[at]


def _widened(origin: Tensor, dtype: torch.dtype, buffers: _Buffers) -> Tensor:
    """Backup rows ``origin`` in the math dtype (read only): in the gradient's buffer, which ``W + s * G`` has used."""
    return _rows_in(origin, slice(0, len(origin)), dtype, buffers, "grad")


def _store(param: Tensor, rows: slice | Tensor, new: Tensor, keep: Tensor, buffers: _Buffers) -> None:
    """Round ``new`` once into ``rows``; on a GPU the write is masked by ``keep`` instead of a host sync."""
    if param.device.type != "cpu":
        new = torch.where(keep, new, param[rows].to(new.dtype))
    if isinstance(rows, slice):
        param[rows] = new
    else:
        if new.dtype != param.dtype:  # rounded once into the buffer the weights' gather used
            new = buffers.get(f"new:{param.dtype}", param.dtype, len(new)).copy_(new)
        _index_copy(param, rows, new)


def _buffers(param: Tensor, idx: Tensor) -> _Buffers:
    return _Buffers(param, _chunk_rows(param, len(idx)))


def perturb(
    params: Tensors,
    grads: Tensors,
    rows: Tensors,
    backups: Tensors,
    n_backed: list[int],
    scales: Tensor,
    box_eps: float | None = None,
) -> None:
    backup(params, rows, backups, n_backed)
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        keep = scales[i] != 0
        if param.device.type == "cpu" and not keep:
            continue  # free to check on the CPU; elsewhere the writes are masked instead of synced
        if box_eps is None and param.device.type == "cpu" and grad.dtype == param.dtype:
            _step_in_own_dtype(param, grad, idx, n_backed[i], scales[i].item())
            continue
        buffers = _buffers(param, idx)
        for piece, new, origin in _steps(param, grad, idx, saved, n_backed[i], scales[i], buffers):
            if box_eps is not None:
                origin = _widened(origin, new.dtype, buffers)
                reach = buffers.get("reach", new.dtype, len(new))
                for side, clamp in ((torch.sub, torch.maximum), (torch.add, torch.minimum)):
                    torch.abs(origin, out=reach).mul_(box_eps)  # fp32(box_eps) * |B|, as the seed computes it
                    clamp(new, side(origin, reach, out=reach), out=new)
            _store(param, piece, new, keep, buffers)


def _step_in_own_dtype(param: Tensor, grad: Tensor, idx: Tensor, done: int, scale: float) -> None:
    """``W += scale * G`` on the CPU without widening: addcmul with a Python ``value`` computes bf16/fp16 elements as
    ``float(W) + value * float(G)`` and rounds once (the contract's fp32 math; the op table checks it), where widening
    the rows, stepping and narrowing them took ten times as long. In place on every row, else chunk by chunk."""
    one = param.new_ones(())
    if _every_row(param, idx, done):
        param.addcmul_(grad, one, value=scale)
        return
    size = param.element_size()
    buffers = _Buffers(param, _chunk_rows(param, len(idx), size))
    for span in _spans(param, len(idx), size):  # the pieces of the index list (_pieces)
        rows = idx[span]
        weights = _rows_in(param, rows, param.dtype, buffers, "new")
        _index_copy(param, rows, weights.addcmul_(_rows_in(grad, rows, param.dtype, buffers, "grad"), one, value=scale))


def measure(
    params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int], scales: Tensor
) -> Tensor:
    backup(params, rows, backups, n_backed)
    wide = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    out = torch.zeros(len(params), dtype=wide, device=scales.device)
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        if param.device.type == "cpu" and scales[i] == 0:
            continue
        total = torch.zeros((), dtype=_math_dtype(param), device=param.device)
        buffers = _buffers(param, idx)
        for _, new, origin in _steps(param, grad, idx, saved, n_backed[i], scales[i], buffers):
            delta = new.sub_(_widened(origin, new.dtype, buffers)).view(-1)
            total += torch.dot(delta, delta)
        out[i] = torch.where(scales[i] != 0, total.to(wide), 0.0)
    return out


def project(
    params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, scales: Tensor, delta_sumsq: Tensor, eps: float
) -> None:
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        keep = scales[i] != 0
        on_cpu = param.device.type == "cpu"
        if on_cpu and not keep:
            continue
        norm = delta_sumsq[i].to(_math_dtype(param)).sqrt()
        outside, factor = norm > eps, torch.div(norm.new_tensor(eps), norm)  # eps / norm rounded once
        buffers = _buffers(param, idx)
        for piece, new, origin in _steps(param, grad, idx, saved, len(idx), scales[i], buffers):  # all backed up
            if not on_cpu or outside:  # the check is free on the CPU, and the ball is rarely left
                projected = torch.lerp(_widened(origin, new.dtype, buffers), new, factor, out=new if on_cpu else None)
                new = projected if on_cpu else torch.where(outside, projected, new)
            _store(param, piece, new, keep, buffers)


def _index_copy(param: Tensor, idx: Tensor, rows: Tensor) -> None:
    """``param[idx] = rows``, bit for bit, as 8- or 4-byte words where the rows split into them: index_copy_ moves an
    element at a time, so bf16 rows go four times faster as int64 words."""
    for word in (torch.int64, torch.int32):
        size = torch.iinfo(word).bits // 8
        if all(t.shape[1] * t.element_size() % size == 0 and t.data_ptr() % size == 0 for t in (param, rows)):
            param, rows = param.view(word), rows.view(word)
            break
    param.index_copy_(0, idx, rows)


def restore(params: Tensors, rows: Tensors, backups: Tensors) -> None:
    for param, idx, saved in zip(params, rows, backups):
        if _every_row(param, idx, len(idx)):  # every listed row is backed up
            param.copy_(saved)
        else:
            _index_copy(param, idx, saved)


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
    wide = _math_dtype(delta)
    dims = (-1,) if per_token else (-2, -1)
    g = grad.to(wide, copy=True)  # a copy even in the math dtype: the step is computed in it in place
    if mask is not None:  # where, not a product: a NaN outside the mask must not count
        g = torch.where(mask.unsqueeze(-1), g, 0.0)
    norms = torch.linalg.vector_norm(g, ord=math.inf if norm == "inf" else 2, dim=dims, keepdim=True)
    if norm == "sign":
        step = g.sign_().mul_(lr)
    else:
        step = g.mul_(lr).div_(torch.clamp(norms + denom_eps, min=denom_floor))
    new = torch.where(norms.isfinite(), delta.to(wide) + step, delta.to(wide))
    if bound == "l2":
        size = torch.linalg.vector_norm(new, dim=dims, keepdim=True)
        new = torch.where(size > radius, new * torch.div(size.new_tensor(radius), size), new)  # one rounding
    elif bound == "inf":
        new = new.clamp_(-radius, radius)
    delta.copy_(new)
    return norms.reshape(delta.shape[:2] if per_token else delta.shape[:1]).float()


def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
    """Every device, every floating dtype, gradients of any floating dtype."""
    return True

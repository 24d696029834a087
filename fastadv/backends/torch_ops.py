"""Pure-PyTorch backend: one read of each gradient in ``scan``, everything else on the touched rows only.

It runs wherever PyTorch runs, on every dtype (float64 in float64 math), and is the fallback of every other backend.
See :class:`fastadv.backends.contract.Backend` for the contract of each op. Where a tensor's every row is perturbed
(a tied embedding, AWP's dense weights) and backed up, the rows are in order, so the ops use slices of cache-sized row
chunks instead of gathers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["scan", "row_sumsq", "backup", "perturb", "measure", "project", "restore", "input_step", "supports"]

# Whole-matrix work on the CPU goes through row chunks of about this many fp32 bytes: temporaries that stay in cache
# (vector_norm(..., dtype=float32) of a whole bf16 matrix is ten times slower than chunk by chunk).
_CHUNK_BYTES = 4 << 20


def _row_chunks(tensor: Tensor) -> list[slice]:
    """Row slices covering ``tensor``: cache-sized on the CPU, the whole tensor elsewhere."""
    if tensor.device.type != "cpu":
        return [slice(None)]
    step = max(1, _CHUNK_BYTES // (4 * max(1, tensor.shape[1])))
    return [slice(start, start + step) for start in range(0, tensor.shape[0], step)]


def _math_dtype(tensor: Tensor) -> torch.dtype:
    """What the ops compute in: fp32, or fp64 for float64 tensors."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _row_norms(tensor: Tensor) -> Tensor:
    """L2 norm of each row, accumulated in the math dtype, in one read of ``tensor``."""
    wide = _math_dtype(tensor)
    if tensor.dtype == wide or tensor.device.type != "cpu":
        return torch.linalg.vector_norm(tensor, dim=-1, dtype=wide)
    out = torch.empty(tensor.shape[0], dtype=wide, device=tensor.device)
    for rows in _row_chunks(tensor):
        torch.linalg.vector_norm(tensor[rows].to(wide), dim=-1, out=out[rows])
    return out


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor], params: list[Tensor] | None = None) -> Tensor:
    stats = torch.zeros(len(grads), 3, dtype=torch.float64, device=grads[0].device)
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh)):
        norms = _row_norms(grad)
        torch.ne(norms, 0, out=new)
        new &= ~seen
        stats[i, 0] = norms.square().sum()
        stats[i, 1] = new.sum()
        if params is not None:
            stats[i, 2] = _row_norms(params[i]).square().sum()
    return stats


def row_sumsq(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
    sums = [_row_norms(_gather(tensor, idx)).square().sum() for tensor, idx in zip(tensors, rows)]
    return torch.stack(sums).double() if sums else torch.zeros(0, dtype=torch.float64)


def backup(params: list[Tensor], rows: list[Tensor], backups: list[Tensor], n_backed: list[int]) -> None:
    for param, idx, saved, done in zip(params, rows, backups, n_backed):
        if done >= len(idx):
            continue
        if _every_row(param, idx, done):
            saved.copy_(param)
        else:
            torch.index_select(param, 0, idx[done:], out=saved[done : len(idx)])


def _every_row(param: Tensor, idx: Tensor, done: int) -> bool:
    """Whether the rows are ``0..n-1`` in order, so slices can replace gathers: a list holding every row is in order
    unless some but not all of its rows are backed up (the contract)."""
    return len(idx) == param.shape[0] and done in (0, len(idx))


def _pieces(param: Tensor, idx: Tensor, done: int) -> list[slice | Tensor]:
    """How to address the perturbed rows: cache-sized slices when they are every row in order, else the index list
    once."""
    return _row_chunks(param) if _every_row(param, idx, done) else [idx]


def _rows_of(tensor: Tensor, piece: slice | Tensor) -> Tensor:
    return tensor[piece] if isinstance(piece, slice) else _gather(tensor, piece)


def _current(param: Tensor, idx: Tensor, backup: Tensor, done: int, piece: slice | Tensor) -> Tensor:
    """The rows ``piece`` of W; those backed up by this call are in ``backup`` already, so only the others are
    gathered."""
    if isinstance(piece, slice) or done == len(idx):
        return _rows_of(param, piece)
    return backup if done == 0 else torch.cat([_gather(param, idx[:done]), backup[done : len(idx)]])


def _steps(
    param: Tensor, grad: Tensor, idx: Tensor, backup: Tensor, done: int, scale: Tensor
) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
    """For each piece of the perturbed rows: the piece, a new tensor ``W + scale * G`` of its rows in the math dtype,
    and their backup rows ``B`` (in the parameter's dtype)."""
    wide = _math_dtype(param)
    scale = scale.to(wide)
    for piece in _pieces(param, idx, done):
        weights = _current(param, idx, backup, done, piece).to(wide)
        origin = backup[piece] if isinstance(piece, slice) else backup[: len(idx)]
        if isinstance(piece, slice):  # views of the gradient: never write into them
            yield piece, torch.addcmul(weights, grad[piece].to(wide), scale), origin
        else:
            gathered = _gather(grad, piece).to(wide)
            yield piece, torch.addcmul(weights, gathered, scale, out=gathered), origin


def _store(param: Tensor, piece: slice | Tensor, new: Tensor, keep: Tensor) -> None:
    """Round ``new`` once into the rows ``piece``; on a GPU the write is masked by ``keep`` instead of a host sync."""
    if param.device.type != "cpu":
        new = torch.where(keep, new, _rows_of(param, piece).to(new.dtype))
    if isinstance(piece, slice):
        param[piece] = new
    else:
        param.index_copy_(0, piece, new.to(param.dtype))


def perturb(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], n_backed: list[int],
            scales: Tensor, box_eps: float | None = None) -> None:
    backup(params, rows, backups, n_backed)
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        keep = scales[i] != 0
        if param.device.type == "cpu" and not keep:
            continue  # free to check on the CPU; elsewhere the writes are masked instead of synced
        in_place = box_eps is None and param.dtype == torch.float32 and param.device.type == "cpu"
        if in_place and _every_row(param, idx, n_backed[i]):
            param.addcmul_(grad, scales[i])  # in place, already rounded once
            continue
        for piece, new, origin in _steps(param, grad, idx, saved, n_backed[i], scales[i]):
            if box_eps is not None:
                origin = origin.to(new.dtype)
                reach = origin.abs().mul_(box_eps)  # fp32(box_eps) * |B|, as the seed computes it in fp32
                new = torch.minimum(torch.maximum(new, origin - reach), origin + reach)
            _store(param, piece, new, keep)


def measure(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], n_backed: list[int],
            scales: Tensor) -> Tensor:
    backup(params, rows, backups, n_backed)
    wide = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    out = torch.zeros(len(params), dtype=wide, device=scales.device)
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        if param.device.type == "cpu" and scales[i] == 0:
            continue
        total = torch.zeros((), dtype=_math_dtype(param), device=param.device)
        for _, new, origin in _steps(param, grad, idx, saved, n_backed[i], scales[i]):
            delta = new.sub_(origin.to(new.dtype)).view(-1)
            total += torch.dot(delta, delta)
        out[i] = torch.where(scales[i] != 0, total.to(wide), 0.0)
    return out


def project(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor], scales: Tensor,
            delta_sumsq: Tensor, eps: float) -> None:
    for i, (param, grad, idx, saved) in enumerate(zip(params, grads, rows, backups)):
        keep = scales[i] != 0
        on_cpu = param.device.type == "cpu"
        if on_cpu and not keep:
            continue
        norm = delta_sumsq[i].to(_math_dtype(param)).sqrt()
        outside, factor = norm > eps, eps / norm
        for piece, new, origin in _steps(param, grad, idx, saved, len(idx), scales[i]):  # all backed up
            if not on_cpu:
                new = torch.where(outside, torch.lerp(origin.to(new.dtype), new, factor), new)
            elif outside:  # the check is free on the CPU, and the ball is rarely left
                new = torch.lerp(origin.to(new.dtype), new, factor)
            _store(param, piece, new, keep)


def _gather(source: Tensor, idx: Tensor) -> Tensor:
    """``source[idx]``; into a preallocated output, which index_select fills several times faster on the CPU."""
    return torch.index_select(source, 0, idx, out=source.new_empty((len(idx), source.shape[1])))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    for param, idx, saved in zip(params, rows, backups):
        if _every_row(param, idx, len(idx)):  # every listed row is backed up
            param.copy_(saved)
        else:
            param.index_copy_(0, idx, saved)


def input_step(delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool,
               denom_eps: float, denom_floor: float, bound: str, radius: float) -> Tensor:
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
        new = torch.where(size > radius, new * (radius / size), new)
    elif bound == "inf":
        new = new.clamp_(-radius, radius)
    delta.copy_(new)
    return norms.reshape(delta.shape[:2] if per_token else delta.shape[:1]).float()


def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
    """Every device, every floating dtype, gradients of any floating dtype."""
    return True

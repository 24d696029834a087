"""Each op of each backend against dense PyTorch math, on lists of tensors of mixed shapes and dtypes.

Output buffers are poisoned first, so an op that leaves part of an output unwritten fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, assert_matches

from fastadv.backends import resolve_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, cols) of the tensors in one call: a matrix, a 1-row tensor (a 1-D parameter), a wide and a thin one.
SHAPES = [(37, 16), (1, 24), (5, 130), (9, 1)]


def ops(backend: str):
    return resolve_backend(backend, DEVICE)


def make_case(dtype: torch.dtype, density: float = 0.3, scale: float = 1.0):
    params, grads = [], []
    for rows, cols in SHAPES:
        params.append(torch.randn(rows, cols, device=DEVICE).to(dtype))
        keep = torch.rand(rows, 1, device=DEVICE) < density
        keep[torch.randint(rows, (1,))] = True  # at least one non-zero row
        grads.append((torch.randn(rows, cols, device=DEVICE) * scale * keep).to(dtype))
    return params, grads


def rows_of(grad: torch.Tensor) -> torch.Tensor:
    return (grad != 0).any(dim=1).nonzero().view(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan(backend, seed, dtype):
    _, grads = make_case(dtype)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]
    fresh = [torch.ones(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]  # poison: all True
    stats = ops(backend).scan(grads, touched, fresh)
    assert stats.dtype == torch.float64 and stats.shape == (len(grads), 2)
    for i, grad in enumerate(grads):
        expected_fresh = (grad != 0).any(dim=1) & ~touched[i]
        assert torch.equal(fresh[i], expected_fresh)
        assert stats[i, 1].item() == expected_fresh.sum().item()
        expected = grad.double().square().sum().item()
        assert math.isclose(stats[i, 0].item(), expected, rel_tol=1e-5)


def test_scan_nonfinite_rows_are_touched(backend, seed):
    grad = torch.zeros(6, 8, device=DEVICE)
    grad[1, 3], grad[4, 0] = float("nan"), float("inf")
    fresh = [torch.zeros(6, dtype=torch.bool, device=DEVICE)]
    stats = ops(backend).scan([grad], [torch.zeros(6, dtype=torch.bool, device=DEVICE)], fresh)
    assert fresh[0].tolist() == [False, True, False, False, True, False]
    assert not math.isfinite(stats[0, 0].item())


def dense_perturb(param, grad, coef, sumsq, project_eps=None):
    """The reference math on the whole tensor, in fp32."""
    origin = param.float()
    new = origin + coef / math.sqrt(sumsq) * grad.float()
    if project_eps is not None:
        norm = (new - origin).norm().item()
        if norm > project_eps:
            new = origin + project_eps / norm * (new - origin)
    return new


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("project_eps", [None, 0.05, 1e6], ids=["fgm", "pgd-ball-left", "pgd-inside"])
@pytest.mark.parametrize("density", [0.3, 1.0], ids=["rows", "every-row"])
def test_perturb(backend, seed, dtype, project_eps, density):
    params, grads = make_case(dtype, density)
    originals = [p.clone() for p in params]
    rows = [rows_of(g) for g in grads]
    # Rows already backed up by an earlier step keep their backup; the rest must be written by this call.
    n_backed = [len(r) // 2 for r in rows]
    backups = [torch.full((len(r), p.shape[1]), float("nan"), dtype=dtype, device=DEVICE) for r, p in zip(rows, params)]
    for p, r, b, n in zip(params, rows, backups, n_backed):
        b[:n] = p[r[:n]]
    sumsq = torch.tensor([g.double().square().sum().item() for g in grads], dtype=torch.float64, device=DEVICE)
    coef = 0.7
    assert ops(backend).perturb(params, grads, rows, backups, n_backed, sumsq, coef, project_eps) is None
    for i, (p, g, o) in enumerate(zip(params, grads, originals)):
        assert torch.equal(backups[i], o[rows[i]])
        assert_matches(p, dense_perturb(o, g, coef, sumsq[i].item(), project_eps))


def test_perturb_projects_from_the_current_weights(backend, seed):
    """A later PGD step: the weights already moved, the ball is around the backup, not the current weights."""
    params, grads = make_case(torch.float32)
    rows = [rows_of(g) for g in grads]
    backups = [p[r].clone() for p, r in zip(params, rows)]
    start = [p + 0.01 * torch.randn_like(p) * (g != 0) for p, g in zip(params, grads)]
    moved = [s.clone() for s in start]
    sumsq = torch.tensor([g.double().square().sum().item() for g in grads], dtype=torch.float64, device=DEVICE)
    ops(backend).perturb(moved, grads, rows, backups, [len(r) for r in rows], sumsq, 0.3, 0.2)
    for p, s, o, g in zip(moved, start, params, grads):
        new = s + 0.3 / g.norm() * g
        norm = (new - o).norm()
        expected = o + 0.2 / norm * (new - o) if norm > 0.2 else new
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("project_eps", [None, 0.1])
def test_perturb_leaves_tensor_alone_when_norm_unusable(backend, seed, bad, project_eps):
    params, grads = make_case(torch.float32)
    originals = [p.clone() for p in params]
    rows = [rows_of(g) for g in grads]
    backups = [torch.full((len(r), p.shape[1]), float("nan"), device=DEVICE) for r, p in zip(rows, params)]
    sumsq = torch.tensor([bad] + [1.0] * (len(grads) - 1), dtype=torch.float64, device=DEVICE)
    ops(backend).perturb(params, grads, rows, backups, [0] * len(rows), sumsq, 1.0, project_eps)
    assert torch.equal(params[0], originals[0])
    assert torch.equal(backups[0], originals[0][rows[0]])
    assert not torch.equal(params[1], originals[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(backend, seed, dtype):
    params, grads = make_case(dtype)
    rows = [rows_of(g) for g in grads]
    originals = [p.clone() for p in params]
    backups = [p[r].clone() for p, r in zip(params, rows)]
    for p in params:
        p.normal_()
    ops(backend).restore(params, rows, backups)
    for p, o, r in zip(params, originals, rows):
        assert torch.equal(p[r], o[r])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("project_eps", [None, 0.05])
def test_torch_every_row_path_in_chunks(seed, dtype, project_eps, monkeypatch):
    """The torch backend walks a dense matrix in row chunks; a tiny chunk size makes it take many."""
    from fastadv.backends import torch_ops

    monkeypatch.setattr(torch_ops, "_CHUNK_BYTES", 3 * 4 * 130)  # 3 rows of the widest tensor per chunk
    params, grads = make_case(dtype, density=1.0)
    originals = [p.clone() for p in params]
    rows = [torch.arange(p.shape[0], device=DEVICE) for p in params]
    backups = [torch.full_like(p, float("nan")) for p in params]
    sumsq = torch.tensor([g.double().square().sum().item() for g in grads], dtype=torch.float64, device=DEVICE)
    torch_ops.perturb(params, grads, rows, backups, [0] * len(rows), sumsq, 0.7, project_eps)
    for p, g, o, b, s in zip(params, grads, originals, backups, sumsq.tolist()):
        assert torch.equal(b, o)
        assert_matches(p, dense_perturb(o, g, 0.7, s, project_eps))

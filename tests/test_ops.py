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
@pytest.mark.parametrize("with_params", [False, True], ids=["grads", "grads+params"])
def test_scan(backend, seed, dtype, with_params):
    params, grads = make_case(dtype)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]
    fresh = [torch.ones(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]  # poison: all True
    stats = ops(backend).scan(grads, touched, fresh, params if with_params else None)
    assert stats.dtype == torch.float64 and stats.shape == (len(grads), 3)
    for i, (param, grad) in enumerate(zip(params, grads)):
        expected_fresh = (grad != 0).any(dim=1) & ~touched[i]
        assert torch.equal(fresh[i], expected_fresh)
        assert stats[i, 1].item() == expected_fresh.sum().item()
        assert math.isclose(stats[i, 0].item(), grad.double().square().sum().item(), rel_tol=1e-5)
        param_sumsq = param.double().square().sum().item() if with_params else 0.0
        assert math.isclose(stats[i, 2].item(), param_sumsq, rel_tol=1e-5)


def test_scan_nonfinite_rows_are_touched(backend, seed):
    grad = torch.zeros(6, 8, device=DEVICE)
    grad[1, 3], grad[4, 0] = float("nan"), float("inf")
    fresh = [torch.zeros(6, dtype=torch.bool, device=DEVICE)]
    stats = ops(backend).scan([grad], [torch.zeros(6, dtype=torch.bool, device=DEVICE)], fresh)
    assert fresh[0].tolist() == [False, True, False, False, True, False]
    assert not math.isfinite(stats[0, 0].item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sumsq_reads_the_listed_rows(backend, seed, dtype):
    params, _ = make_case(dtype, density=1.0)
    rows = [torch.randperm(p.shape[0], device=DEVICE)[: p.shape[0] // 2] for p in params]  # (1, 24): no rows
    sumsq = ops(backend).row_sumsq(params, rows)
    assert sumsq.dtype == torch.float64 and sumsq.shape == (len(params),)
    for i, (param, idx) in enumerate(zip(params, rows)):
        assert math.isclose(sumsq[i].item(), param[idx].double().square().sum().item(), rel_tol=1e-5, abs_tol=0)


def dense_step(param, grad, scale, origin=None, project_eps=None, box_eps=None):
    """The reference math on the whole tensor, in fp32: ``param`` stepped, projected/clamped around ``origin``."""
    origin = param.float() if origin is None else origin.float()
    new = param.float() + scale * grad.float()
    if project_eps is not None:
        norm = (new - origin).norm().item()
        if norm > project_eps:
            new = origin + project_eps / norm * (new - origin)
    if box_eps is not None:
        reach = box_eps * origin.abs()
        new = torch.minimum(torch.maximum(new, origin - reach), origin + reach)
    return new


def assert_step_matches(actual, start, grad, scale, origin, **bounds):
    """``actual`` against :func:`dense_step`. In bf16/fp16 one ulp of the output, except where ``W + scale * G``
    nearly cancels: there the fp32 rounding of the terms (the contract's fp32 math, an FMA or not) can exceed an ulp
    of the tiny result, so such elements may differ by up to a few fp32 ulps of the terms' magnitude."""
    expected = dense_step(start, grad, scale, origin, **bounds)
    if actual.dtype == torch.float32:
        assert_matches(actual, expected)
        return
    terms = start.float().abs() + (scale * grad.float()).abs() + origin.float().abs()
    cancelled = (actual.float() - expected).abs() <= 4 * torch.finfo(torch.float32).eps * terms
    assert_matches(torch.where(cancelled, expected.to(actual.dtype), actual), expected)


def step_case(dtype, density, moved):
    """Inputs of perturb/measure/project: rows (the non-zero ones), backups with the first half of each list
    already taken (the rest poisoned with NaN), and with ``moved`` weights that moved since their backup."""
    params, grads = make_case(dtype, density)
    originals = [p.clone() for p in params]
    rows = [rows_of(g) for g in grads]
    n_backed = [len(r) // 2 for r in rows]
    backups = [torch.full((len(r), p.shape[1]), float("nan"), dtype=dtype, device=DEVICE) for r, p in zip(rows, params)]
    for p, r, b, n in zip(params, rows, backups, n_backed):
        b[:n] = p[r[:n]]
        if moved:  # an earlier step moved the backed-up rows
            p[r[:n]] += (0.05 * torch.randn(n, p.shape[1], device=DEVICE)).to(dtype)
    scales = torch.rand(len(params), device=DEVICE) + 0.1
    return params, grads, rows, backups, n_backed, scales, originals


def origins(params, originals, rows):
    """The weights the ball or box is around: the originals on the perturbed rows, the current weights elsewhere."""
    out = []
    for p, o, r in zip(params, originals, rows):
        origin = p.clone()
        origin[r] = o[r]
        out.append(origin)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("box_eps", [None, 0.02, 10.0], ids=["fgm", "awp-box-hit", "awp-inside"])
@pytest.mark.parametrize("density", [0.3, 1.0], ids=["rows", "every-row"])
@pytest.mark.parametrize("moved", [False, True], ids=["first", "later"])
def test_perturb(backend, seed, dtype, box_eps, density, moved):
    params, grads, rows, backups, n_backed, scales, originals = step_case(dtype, density, moved)
    start = [p.clone() for p in params]
    around = origins(params, originals, rows)
    assert ops(backend).perturb(params, grads, rows, backups, n_backed, scales, box_eps) is None
    for i, (p, g) in enumerate(zip(params, grads)):
        assert torch.equal(backups[i], originals[i][rows[i]])
        assert_step_matches(p, start[i], g, scales[i].item(), around[i], box_eps=box_eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("project_eps", [0.05, 1e6], ids=["ball-left", "inside"])
@pytest.mark.parametrize("density", [0.3, 1.0], ids=["rows", "every-row"])
@pytest.mark.parametrize("moved", [False, True], ids=["first", "later"])
def test_measure_then_project(backend, seed, dtype, project_eps, density, moved):
    params, grads, rows, backups, n_backed, scales, originals = step_case(dtype, density, moved)
    start = [p.clone() for p in params]
    around = origins(params, originals, rows)
    delta_sumsq = ops(backend).measure(params, grads, rows, backups, n_backed, scales)
    assert delta_sumsq.dtype == torch.float32 and delta_sumsq.shape == (len(params),)
    for i, (p, g) in enumerate(zip(params, grads)):
        assert torch.equal(p, start[i]), "measure wrote the weights"
        assert torch.equal(backups[i], originals[i][rows[i]])
        expected = (start[i].float() + scales[i] * g.float() - around[i].float()).double().square().sum().item()
        assert math.isclose(delta_sumsq[i].item(), expected, rel_tol=1e-4)
    assert ops(backend).project(params, grads, rows, backups, scales, delta_sumsq, project_eps) is None
    for i, (p, g) in enumerate(zip(params, grads)):
        assert_step_matches(p, start[i], g, scales[i].item(), around[i], project_eps=project_eps)


def test_project_uses_the_given_norm(backend, seed):
    """The norm comes from ``delta_sumsq`` as given (a caller may all-reduce it over shards first)."""
    params, grads, rows, backups, n_backed, scales, originals = step_case(torch.float32, 0.3, moved=False)
    start = [p.clone() for p in params]
    ops(backend).measure(params, grads, rows, backups, n_backed, scales)
    global_sumsq = torch.full((len(params),), 4.0, device=DEVICE)  # norm 2: a ball of 0.5 is left by a factor 4
    ops(backend).project(params, grads, rows, backups, scales, global_sumsq, 0.5)
    for i, (p, g) in enumerate(zip(params, grads)):
        new = start[i] + scales[i] * g
        torch.testing.assert_close(p, start[i] + 0.25 * (new - start[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", ["perturb", "perturb-box", "measure+project"])
def test_zero_scale_leaves_a_tensor_alone(backend, seed, stage):
    params, grads, rows, backups, n_backed, scales, originals = step_case(torch.float32, 0.3, moved=False)
    scales[0] = 0.0
    backend_ops = ops(backend)
    if stage == "measure+project":
        delta_sumsq = backend_ops.measure(params, grads, rows, backups, n_backed, scales)
        assert delta_sumsq[0].item() == 0.0
        backend_ops.project(params, grads, rows, backups, scales, delta_sumsq, 0.01)
    else:
        backend_ops.perturb(params, grads, rows, backups, n_backed, scales, 0.5 if stage == "perturb-box" else None)
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
@pytest.mark.parametrize("bound", ["step", "box", "ball"])
def test_torch_every_row_path_in_chunks(seed, dtype, bound, monkeypatch):
    """The torch backend walks a dense matrix in row chunks; a tiny chunk size makes it take many."""
    from fastadv.backends import torch_ops

    monkeypatch.setattr(torch_ops, "_CHUNK_BYTES", 3 * 4 * 130)  # 3 rows of the widest tensor per chunk
    params, grads, rows, backups, n_backed, scales, originals = step_case(dtype, 1.0, moved=True)
    start = [p.clone() for p in params]
    around = origins(params, originals, rows)
    if bound == "ball":
        delta_sumsq = torch_ops.measure(params, grads, rows, backups, n_backed, scales)
        torch_ops.project(params, grads, rows, backups, scales, delta_sumsq, 0.05)
    else:
        torch_ops.perturb(params, grads, rows, backups, n_backed, scales, 0.02 if bound == "box" else None)
    for i, (p, g) in enumerate(zip(params, grads)):
        assert torch.equal(backups[i], originals[i][rows[i]])
        assert_step_matches(p, start[i], g, scales[i].item(), around[i],
                            project_eps=0.05 if bound == "ball" else None, box_eps=0.02 if bound == "box" else None)

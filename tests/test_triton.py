"""The triton backend against the torch backend and dense math, on the cases its multi-tensor kernels make special.

One call mixes dtypes (one launch per dtype group), 1-row tensors, more rows than one program's ``BLOCK_M`` and more
columns than one ``BLOCK_N`` chunk, tensors with no touched row, and unusable norms. Every output buffer, the
kernels' internal ones included, starts poisoned. Without a GPU the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

triton_backend = pytest.importorskip("fastadv.backends.triton_ops", reason="triton does not import here")

from conftest import assert_matches  # noqa: E402
from fastadv.kernels._common import col_block, plan, row_block  # noqa: E402

from fastadv.backends import torch_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.supports(DEVICE):
    pytest.skip(f"the triton backend does not run on {DEVICE} here (TRITON_INTERPRET is for CPU tensors)",
                allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (rows, cols, dtype) of the tensors in one call: dtype groups of 2, 3 and 1 tensors; (40, 130): two programs of 32
# rows, three 64-column chunks; (7, 1100): nine 128-column chunks; (1, 24) and (1, 1): 1-D parameters.
SPECS = [(40, 130, F32), (1, 24, BF16), (7, 1100, F16), (3, 5, F32), (1, 1, BF16), (20, 16, BF16)]

_empty = torch.empty


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    out = _empty(*args, **kwargs)
    return out.fill_(float("nan") if out.is_floating_point() else 1)


@contextlib.contextmanager
def poisoned_buffers():
    """Every ``torch.empty`` (the ops' outputs and partial sums) comes back full of NaN / True."""
    torch.empty = _poisoned_empty
    try:
        yield
    finally:
        torch.empty = _empty


def make_case(density: float = 0.4, specs=SPECS):
    params, grads = [], []
    for rows, cols, dtype in specs:
        params.append(torch.randn(rows, cols, device=DEVICE).to(dtype))
        keep = torch.rand(rows, 1, device=DEVICE) < density
        keep[torch.randint(rows, (1,))] = True
        grads.append((torch.randn(rows, cols, device=DEVICE) * keep).to(dtype))
    return params, grads


def nonzero_rows(grad: torch.Tensor) -> torch.Tensor:
    return (grad != 0).any(dim=1).nonzero().view(-1)


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def assert_stats(stats: torch.Tensor, expected: torch.Tensor) -> None:
    assert stats.dtype == torch.float64 and stats.shape == expected.shape
    assert torch.equal(stats[:, 1], expected[:, 1])
    torch.testing.assert_close(stats[:, 0], expected[:, 0], rtol=1e-5, atol=0.0, equal_nan=True)


def test_block_heuristics():
    assert col_block([768]) == 256  # three full chunks rather than a quarter-empty 1024 one
    assert col_block([4096]) == 1024 and col_block([1000]) == 1024 and col_block([5]) == 8
    assert row_block(256, 100_000) == 8 and row_block(1024, 1) == 1
    tensors = [torch.zeros(r, c, dtype=d) for r, c, d in SPECS]
    groups, first = plan([t.dtype for t in tensors], [t.shape[1] for t in tensors], [t.shape[0] for t in tensors],
                         [[t] for t in tensors])
    assert [g.key for g in groups] == [F32, BF16, F16]  # one launch per dtype, whatever the list order
    assert sorted(i for g in groups for i in g.members) == list(range(len(SPECS)))
    assert first[-1] == sum(g.grid[0] for g in groups)


@pytest.mark.parametrize("density", [0.4, 1.0], ids=["sparse", "dense"])
def test_scan(seed, density):
    _, grads = make_case(density)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]
    fresh = [torch.ones(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
    expected_fresh = [torch.zeros(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
    with poisoned_buffers():
        stats = triton_backend.scan(grads, touched, fresh)
    expected = torch_ops.scan(grads, touched, expected_fresh)
    assert_stats(stats, expected)
    for i, grad in enumerate(grads):
        assert torch.equal(fresh[i], expected_fresh[i])
        assert torch.equal(fresh[i], (grad != 0).any(dim=1) & ~touched[i])
        assert math.isclose(stats[i, 0].item(), grad.double().square().sum().item(), rel_tol=1e-5)


def test_scan_zero_nonfinite_and_underflowing_gradients(seed):
    grads = [torch.zeros(5, 8, device=DEVICE) for _ in range(4)] + [torch.randn(3, 4, device=DEVICE).to(BF16)]
    grads[1][2, 3] = float("nan")
    grads[2][0, 0] = float("inf")
    grads[3][4, 1] = 1e-24  # its square underflows to 0 in fp32, but the row is not zero
    touched = [torch.zeros(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
    touched[4][1] = True
    fresh = [torch.ones(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
    with poisoned_buffers():
        stats = triton_backend.scan(grads, touched, fresh)
    assert [f.nonzero().view(-1).tolist() for f in fresh] == [[], [2], [0], [4], [0, 2]]
    assert stats[:, 1].tolist() == [0, 1, 1, 1, 2]
    assert stats[0, 0].item() == 0 and stats[3, 0].item() == 0
    assert math.isnan(stats[1, 0].item()) and stats[2, 0].item() == math.inf


def perturb_case():
    """A mixed list after an earlier step: half of each tensor's rows already backed up (the rest poisoned), the
    weights of those rows already moved; one tensor has no touched row, one a zero, NaN or inf norm, and one a step
    ten times shorter than the others (0.07 rather than 0.7)."""
    params, grads = make_case()
    rows = [nonzero_rows(g) for g in grads]
    rows[3] = rows[3][:0]
    n_backed = [len(r) // 2 for r in rows]
    backups = [torch.full((len(r), p.shape[1]), math.nan, dtype=p.dtype, device=DEVICE)
               for r, p in zip(rows, params, strict=True)]
    for p, r, b, n in zip(params, rows, backups, n_backed, strict=True):
        b[:n] = p[r[:n]]
        p[r[:n]] += (0.01 * torch.randn(n, p.shape[1], device=DEVICE)).to(p.dtype)
    sumsq = torch.tensor([g.double().square().sum().item() for g in grads], dtype=torch.float64, device=DEVICE)
    sumsq[4] = [0.0, math.nan, math.inf][torch.randint(3, ()).item()]
    sumsq[5] *= 100
    return params, grads, rows, backups, n_backed, sumsq


@pytest.mark.parametrize("project_eps", [None, 0.4, 1e6], ids=["fgm", "pgd-some-leave-the-ball", "pgd-inside"])
def test_perturb(seed, project_eps):
    params, grads, rows, backups, n_backed, sumsq = perturb_case()
    before, expected_params, expected_backups = clones(params), clones(params), clones(backups)
    with poisoned_buffers():
        result = triton_backend.perturb(params, grads, rows, backups, n_backed, sumsq, 0.7, project_eps)
    assert result is None
    torch_ops.perturb(expected_params, grads, rows, expected_backups, n_backed, sumsq, 0.7, project_eps)
    left = []
    for i, (p, g, r, b) in enumerate(zip(params, grads, rows, backups, strict=True)):
        assert torch.equal(b[n_backed[i]:], before[i][r[n_backed[i]:]]), i  # bit for bit
        assert torch.equal(b, expected_backups[i]), i
        assert_matches(p, expected_params[i])
        if i in (3, 4):  # no touched row; an unusable norm
            assert torch.equal(p, before[i]), i
            continue
        # Dense fp64 math over the whole tensor (untouched rows have a zero gradient).
        origin = before[i].double().index_copy(0, r, b.double())
        new = before[i].double() + 0.7 / sumsq[i].sqrt() * g.double()
        norm = (new - origin).norm()
        if project_eps is not None and norm > project_eps:
            new = origin + project_eps / norm * (new - origin)
            left.append(i)
        assert_matches(p, new)
    assert left == {None: [], 0.4: [0, 1, 2], 1e6: []}[project_eps]


def test_restore_is_bit_exact(seed):
    params, grads = make_case()
    rows = [nonzero_rows(g) for g in grads]
    rows[3] = rows[3][:0]
    ptrs = [p.data_ptr() for p in params]
    # Any bit pattern, NaN payloads and signalling NaNs included, must come back unchanged.
    bits = [{F32: torch.int32, BF16: torch.int16, F16: torch.int16}[p.dtype] for p in params]
    backups = [torch.randint(torch.iinfo(k).min, torch.iinfo(k).max, (len(r), p.shape[1]), dtype=k, device=DEVICE)
               for p, r, k in zip(params, rows, bits, strict=True)]
    untouched = clones(params)
    triton_backend.restore(params, rows, [b.view(p.dtype) for p, b in zip(params, backups, strict=True)])
    for p, r, b, k, u, ptr in zip(params, rows, backups, bits, untouched, ptrs, strict=True):
        assert p.data_ptr() == ptr
        assert torch.equal(p.view(k)[r], b)
        others = torch.ones(p.shape[0], dtype=torch.bool, device=DEVICE)
        others[r] = False
        assert torch.equal(p[others], u[others])

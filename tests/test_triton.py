"""The triton backend against plain-PyTorch oracles, on the cases its multi-tensor kernels make special.

One call mixes dtypes (one launch per dtype group), 1-row tensors, more rows than one program's ``BLOCK_M`` and more
columns than one ``BLOCK_N`` chunk, tensors with no listed row, zero scales, and rows backed up by an earlier call
whose weights have moved since. Every output buffer, the kernels' internal ones included, starts poisoned. Without a
GPU the kernels run under ``TRITON_INTERPRET=1``.
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


def sumsq(tensor: torch.Tensor) -> float:
    return tensor.double().square().sum().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32-accumulated sums against float64 ones."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-30, equal_nan=True)


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


@pytest.mark.parametrize("with_params", [False, True], ids=["grads", "grads+params"])
@pytest.mark.parametrize("density", [0.4, 1.0], ids=["sparse", "dense"])
def test_scan(seed, density, with_params):
    params, grads = make_case(density)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]
    fresh = [torch.ones(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
    with poisoned_buffers():
        stats = triton_backend.scan(grads, touched, fresh, params if with_params else None)
    assert stats.dtype == torch.float64 and stats.shape == (len(grads), 3)
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        assert torch.equal(fresh[i], (grad != 0).any(dim=1) & ~touched[i])
        assert stats[i, 1].item() == fresh[i].sum().item()
        assert math.isclose(stats[i, 0].item(), sumsq(grad), rel_tol=1e-5)
        assert math.isclose(stats[i, 2].item(), sumsq(param) if with_params else 0.0, rel_tol=1e-5)


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
    assert stats[:, 1].tolist() == [0, 1, 1, 1, 2] and stats[:, 2].tolist() == [0] * 5
    assert stats[0, 0].item() == 0 and stats[3, 0].item() == 0
    assert math.isnan(stats[1, 0].item()) and stats[2, 0].item() == math.inf


def test_row_sumsq(seed):
    tensors, _ = make_case()
    # Rows in no particular order, every row of one tensor, and none of another.
    rows = [torch.randperm(t.shape[0], device=DEVICE)[: max(1, t.shape[0] // 2)] for t in tensors]
    rows[2] = torch.arange(tensors[2].shape[0], device=DEVICE)
    rows[3] = rows[3][:0]
    with poisoned_buffers():
        out = triton_backend.row_sumsq(tensors, rows)
    assert out.dtype == torch.float64 and out.shape == (len(tensors),)
    assert_close(out, torch.tensor([sumsq(t[r]) for t, r in zip(tensors, rows, strict=True)], dtype=torch.float64))
    assert out[3].item() == 0


def perturb_case(move: float = 0.03):
    """A mixed list after an earlier call: half of each tensor's rows already backed up (the rest poisoned), the
    weights of those rows moved since (by about ``move``); one tensor has no listed row, one a zero scale, one a ten
    times shorter step. The steps and the moves are of the order of the box ``0.05 * |B|``, so it clamps some
    elements, not all."""
    params, grads = make_case()
    rows = [nonzero_rows(g) for g in grads]
    rows[3] = rows[3][:0]
    n_backed = [len(r) // 2 for r in rows]
    backups = [torch.full((len(r), p.shape[1]), math.nan, dtype=p.dtype, device=DEVICE)
               for r, p in zip(rows, params, strict=True)]
    for p, r, b, n in zip(params, rows, backups, n_backed, strict=True):
        b[:n] = p[r[:n]]
        p[r[:n]] += (move * torch.randn(n, p.shape[1], device=DEVICE)).to(p.dtype)
    scales = torch.full((len(params),), 0.05, device=DEVICE)
    scales[4], scales[5] = 0.0, 0.005
    return params, grads, rows, backups, n_backed, scales


def stepped(param: torch.Tensor, grad: torch.Tensor, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``W + scale * G`` of the rows ``r``."""
    return param[r].float() + scale * grad[r].float()


def boxed(new: torch.Tensor, center: torch.Tensor, box_eps: float) -> torch.Tensor:
    """``new`` clamped into ``[B - d, B + d]``, ``d = float32(box_eps) * |B|``, all in fp32."""
    d = torch.tensor(box_eps, dtype=torch.float32) * center.abs()
    return torch.minimum(torch.maximum(new, center - d), center + d)


def check_backups(before, rows, backups, n_backed, old_backups) -> None:
    for i, (p, r, b) in enumerate(zip(before, rows, backups, strict=True)):
        assert torch.equal(b[n_backed[i]:], p[r[n_backed[i]:]]), i  # bit for bit
        assert torch.equal(b[:n_backed[i]], old_backups[i][:n_backed[i]]), i


@pytest.mark.parametrize("box_eps", [None, 0.05], ids=["fgm", "awp-box"])
def test_perturb(seed, box_eps):
    params, grads, rows, backups, n_backed, scales = perturb_case()
    before, old_backups = clones(params), clones(backups)
    with poisoned_buffers():
        assert triton_backend.perturb(params, grads, rows, backups, n_backed, scales, box_eps) is None
    check_backups(before, rows, backups, n_backed, old_backups)
    clamped = moved_center = 0
    for i, (p, g, r, b) in enumerate(zip(params, grads, rows, backups, strict=True)):
        expected = before[i].clone()
        if scales[i] != 0:
            new = stepped(before[i], g, r, scales[i])
            if box_eps is not None:
                box = boxed(new, b.float(), box_eps)  # around the backups: rows backed up earlier have moved since
                clamped += int((box != new).sum())
                around_w = boxed(new, before[i][r].float(), box_eps)
                moved_center += int((box[: n_backed[i]] != around_w[: n_backed[i]]).sum())
                new = box
            expected[r] = new.to(p.dtype)
        assert_matches(p, expected)
        if i in (3, 4):  # no listed row; a zero scale
            assert torch.equal(p, before[i]), i
    if box_eps is not None:
        assert clamped > 0 and moved_center > 0  # the box mattered, and around the backups


def measured(params, grads, rows, backups, scales) -> torch.Tensor:
    """float64 ``||W + scale * G - B||^2`` per tensor, 0 for a zero scale."""
    return torch.tensor([sumsq(stepped(p, g, r, s) - b.float()) if s != 0 else 0.0
                         for p, g, r, b, s in zip(params, grads, rows, backups, scales, strict=True)],
                        dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.4, 1e6], ids=["some-leave-the-ball", "inside"])
def test_measure_then_project_is_the_old_pgd_perturb(seed, eps):
    """measure + project with ``scales = coef / ||G||`` equal the old ``perturb(..., sumsq, coef, project_eps)``:
    the projection onto the ``eps`` ball around the backups of the step, rounded once (dense fp64 math)."""
    params, grads, rows, backups, n_backed, scales = perturb_case(move=0.01)
    coefs = (scales / 0.05 * 0.7).double()  # 0.7, but 0 and 0.07 for the zero and the short step
    norms = torch.stack([g.double().norm() for g in grads])
    scales = (coefs / norms).float()
    before, old_backups = clones(params), clones(backups)
    with poisoned_buffers():
        delta_sumsq = triton_backend.measure(params, grads, rows, backups, n_backed, scales)
    assert delta_sumsq.dtype == torch.float32 and delta_sumsq.shape == (len(params),)
    check_backups(before, rows, backups, n_backed, old_backups)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)  # measure writes no weight
    assert_close(delta_sumsq, measured(before, grads, rows, backups, scales))
    assert delta_sumsq[3].item() == 0 and delta_sumsq[4].item() == 0

    with poisoned_buffers():
        assert triton_backend.project(params, grads, rows, backups, scales, delta_sumsq, eps) is None
    left = []
    for i, (p, g, r, b) in enumerate(zip(params, grads, rows, backups, strict=True)):
        if i in (3, 4):  # no listed row; a zero scale
            assert torch.equal(p, before[i]), i
            continue
        origin = before[i].double().index_copy(0, r, b.double())
        new = before[i].double() + coefs[i] / norms[i] * g.double()  # untouched rows have a zero gradient
        norm = (new - origin).norm()
        if norm > eps:
            new = origin + eps / norm * (new - origin)
            left.append(i)
        assert_matches(p, new)
    assert left == {0.4: [0, 1, 2], 1e6: []}[eps]


def test_project_reads_the_given_norm(seed):
    """project takes the norm from ``delta_sumsq`` (float32 of it), e.g. all-reduced over shards in between."""
    params, grads, rows, _, _, scales = perturb_case()
    backups = [p[r] for p, r in zip(params, rows, strict=True)]
    before = clones(params)
    delta_sumsq = 4 * measured(params, grads, rows, backups, scales)  # float64, as if four shards alike
    eps = 0.5 * delta_sumsq.sqrt().float()[[0, 1, 2, 5]].min().item()
    triton_backend.project(params, grads, rows, backups, scales, delta_sumsq, eps)
    for i, (p, g, r, b) in enumerate(zip(params, grads, rows, backups, strict=True)):
        expected = before[i].clone()
        if scales[i] != 0 and len(r):
            norm = delta_sumsq[i].float().sqrt()
            expected[r] = torch.lerp(b.float(), stepped(before[i], g, r, scales[i]), eps / norm).to(p.dtype)
        assert_matches(p, expected)


@pytest.mark.skipif("measure" not in torch_ops.__all__, reason="the torch backend is not on the new contract yet")
def test_matches_torch_backend(seed):
    """Each op from the same inputs on both backends (chained, a one-ulp difference would grow)."""
    params, grads, rows, backups, n_backed, scales = perturb_case()
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]

    def run(backend):
        ps, bs, out = clones(params), clones(backups), []
        fresh = [torch.empty(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
        out += [backend.scan(grads, touched, fresh, ps), backend.row_sumsq(ps, rows), fresh]
        for box_eps in (None, 0.05):
            moved, moved_backups = clones(ps), clones(bs)
            backend.perturb(moved, grads, rows, moved_backups, n_backed, scales, box_eps)
            out += [moved, moved_backups]
        delta = backend.measure(ps, grads, rows, bs, n_backed, scales)
        backend.project(ps, grads, rows, bs, scales, delta, 0.3)
        return out + [delta, ps, bs]

    mine, theirs = run(triton_backend), run(torch_ops)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(mine[-3], theirs[-3], rtol=1e-5, atol=1e-12)
    for k in (2, 4, 6, 9):  # fresh flags, backups: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(mine[k], theirs[k], strict=True)), k
    for k in (3, 5, 8):  # weights: rounded once from (nearly) the same fp32 values
        for a, b in zip(mine[k], theirs[k], strict=True):
            assert_matches(a, b)


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

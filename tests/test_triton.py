"""The triton backend against plain-PyTorch oracles, on the cases its multi-tensor kernels make special.

One call mixes dtypes and vector widths (one launch per group), 1-row tensors, more rows than one program's
``BLOCK_M`` and more columns than one ``BLOCK_N`` chunk, tensors with no listed row, zero scales, and rows backed up by
an earlier call whose weights have moved since. Every output buffer, the kernels' internal ones included, starts
poisoned. Without a GPU the kernels run under ``TRITON_INTERPRET=1``; what only the compiled kernels show (the
instructions of the box and of the projection, registers and spills) is checked on the sm_90 code that
``triton.compile`` generates without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import weakref

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

triton_backend = pytest.importorskip("fastadv.backends.triton_ops", reason="triton does not import here")

import triton  # noqa: E402
from conftest import assert_matches  # noqa: E402
from fastadv.kernels import _common  # noqa: E402
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
    # One launch per (dtype, vector width), whatever the list order: widths of 130, 1100 and 5 columns (or 1) allow
    # 2, 4 and 1 elements per access.
    assert [(g.key, g.meta["VEC"]) for g in groups] == [(F32, 2), (BF16, 8), (F16, 4), (F32, 1), (BF16, 1)]
    assert [g.members for g in groups] == [[0], [1, 5], [2], [3], [4]]
    assert first[-1] == sum(g.grid[0] for g in groups)


def test_an_odd_tensor_keeps_the_others_vectorised():
    """A ``[1, 3]`` bias or an offset view in the list gets its own launch, the aligned embedding keeps 16-byte
    accesses."""
    embedding = torch.empty(250002, 768, device="meta")
    bias = torch.zeros(1, 3)
    offset = torch.zeros(8, 65)[:, 1:]  # 4 bytes past an aligned address
    tensors = [embedding, bias, offset, torch.zeros(30, 768)]
    groups, _ = plan([t.dtype for t in tensors], [t.shape[1] for t in tensors], [t.shape[0] for t in tensors],
                     [[t] for t in tensors])
    assert [(g.members, g.meta["VEC"]) for g in groups] == [([0, 3], 4), ([1, 2], 1)]


def test_programs_are_bounded_and_cover_every_block():
    """A 250002 x 768 tensor takes at most MAX_PROGRAMS programs of several row blocks each (not 31251 of one), so
    its per-tensor sum adds few partials; every row block belongs to exactly one program."""
    lengths = [250002, 514, 1]
    tensors = [torch.empty(n, 768, device="meta") for n in lengths]
    (group,), first = plan([F32] * 3, [768] * 3, lengths, [[t] for t in tensors])
    assert group.meta["BLOCK_M"] == 8 and group.blocks_per_program == 8
    assert first[-1] == group.grid[0] <= _common.MAX_PROGRAMS + len(lengths)
    for i, n in enumerate(lengths):
        blocks, programs = triton.cdiv(n, 8), first[i + 1] - first[i]
        assert (programs - 1) * group.blocks_per_program < blocks <= programs * group.blocks_per_program
    assert triton.cdiv(first[1] - first[0], _common._SEGMENT_BLOCK) <= 4  # steps of the per-tensor sum


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
    params, grads = make_case(specs=SPECS + [(6, 10, torch.float64)])  # fp64 moves as pairs of 4-byte words
    rows = [nonzero_rows(g) for g in grads]
    rows[3] = rows[3][:0]
    ptrs = [p.data_ptr() for p in params]
    # Any bit pattern, NaN payloads and signalling NaNs included, must come back unchanged.
    bits = [{F32: torch.int32, BF16: torch.int16, F16: torch.int16, torch.float64: torch.int64}[p.dtype]
            for p in params]
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


def test_programs_walking_several_blocks_match_one_block_each(seed, monkeypatch):
    """With few programs per launch each walks several row blocks, the last of a tensor fewer: the elementwise ops
    come out bit for bit as with one block per program, the sums as close as their order allows."""
    # (70, 1024): 35 blocks of 2 rows; with at most 4 programs, 10 blocks each, the last 5; (5, 1024): one program of
    # 3 blocks, the last half empty; (33, 256) bf16: its own launch.
    specs = [(70, 1024, F32), (5, 1024, F32), (33, 256, BF16)]
    params, grads = make_case(specs=specs)
    rows = [torch.arange(specs[0][0], device=DEVICE), torch.arange(specs[1][0], device=DEVICE), nonzero_rows(grads[2])]
    n_backed = [len(r) // 3 for r in rows]
    backups = [p[r] for p, r in zip(params, rows, strict=True)]
    scales = torch.tensor([0.05, 0.02, 0.05], device=DEVICE)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]

    # One norm for the projection in both runs: the measured one differs across runs in its last bits, as sums may.
    norm = 4 * triton_backend.measure(clones(params), grads, rows, clones(backups), n_backed, scales)

    def run():
        ps, bs = clones(params), clones(backups)
        fresh = [torch.empty(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
        stats = triton_backend.scan(grads, touched, fresh, ps)
        sums = triton_backend.row_sumsq(ps, rows)
        boxed_ps, boxed_bs = clones(ps), clones(bs)
        triton_backend.perturb(boxed_ps, grads, rows, boxed_bs, n_backed, scales, 0.05)
        delta = triton_backend.measure(ps, grads, rows, bs, n_backed, scales)
        triton_backend.project(ps, grads, rows, bs, scales, norm, 0.3)
        triton_backend.restore(boxed_ps, rows, bs)
        return [stats, sums, delta], [fresh, boxed_bs, ps, bs, boxed_ps]

    sums_one, exact_one = run()
    monkeypatch.setattr(_common, "MAX_PROGRAMS", 4)
    groups, _ = plan([p.dtype for p in params], [p.shape[1] for p in params], [len(r) for r in rows],
                     [[p] for p in params])
    assert groups[0].blocks_per_program == 10 and groups[0].grid == (5,)
    sums_few, exact_few = run()
    for a, b in zip(sums_few, sums_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)
    for k, (a, b) in enumerate(zip(exact_few, exact_one, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), k


def test_listed_rows_outside_the_parameter_touch_nothing(seed):
    """A row index outside ``[0, rows)`` (the torch backend raises, the extension asserts) reads and writes nothing:
    not the memory around the parameter, not its backup entry; the rows inside come out as if listed alone."""
    n_rows, cols = 12, 40
    idx = torch.tensor([3, -1, n_rows, 7, 2**40, -(2**40), 0], device=DEVICE)
    inside = (idx >= 0) & (idx < n_rows)
    weights = torch.randn(n_rows, cols, device=DEVICE)
    grad = torch.randn(n_rows, cols, device=DEVICE)
    scales = torch.full((1,), 0.05, device=DEVICE)

    def fresh_case():
        """The parameter between two poisoned rows on each side, a poisoned backup for every listed row, and the
        same for the rows inside alone."""
        memory = torch.full((n_rows + 4, cols), math.nan, device=DEVICE)
        memory[2:-2] = weights
        alone = weights.clone()
        return (memory, memory[2:-2], torch.full((len(idx), cols), math.nan, device=DEVICE),
                alone, torch.full((int(inside.sum()), cols), math.nan, device=DEVICE))

    def check(memory, param, backup, alone, alone_backup):
        assert memory[:2].isnan().all() and memory[-2:].isnan().all()
        assert backup[~inside].isnan().all()
        assert torch.equal(param, alone) and torch.equal(backup[inside], alone_backup)

    for box_eps in (None, 0.05):
        memory, param, backup, alone, alone_backup = fresh_case()
        triton_backend.perturb([param], [grad], [idx], [backup], [0], scales, box_eps)
        triton_backend.perturb([alone], [grad], [idx[inside]], [alone_backup], [0], scales, box_eps)
        check(memory, param, backup, alone, alone_backup)

    memory, param, backup, alone, alone_backup = fresh_case()
    delta = triton_backend.measure([param], [grad], [idx], [backup], [0], scales)
    alone_delta = triton_backend.measure([alone], [grad], [idx[inside]], [alone_backup], [0], scales)
    torch.testing.assert_close(delta, alone_delta, rtol=1e-6, atol=0.0)
    triton_backend.project([param], [grad], [idx], [backup], scales, delta, 0.01)
    triton_backend.project([alone], [grad], [idx[inside]], [alone_backup], scales, delta, 0.01)
    check(memory, param, backup, alone, alone_backup)

    torch.testing.assert_close(triton_backend.row_sumsq([param], [idx]),
                               triton_backend.row_sumsq([alone], [idx[inside]]), rtol=1e-6, atol=0.0)
    backup = torch.randn(len(idx), cols, device=DEVICE)
    alone_backup = backup[inside]
    triton_backend.restore([param], [idx], [backup])
    triton_backend.restore([alone], [idx[inside]], [alone_backup])
    check(memory, param, backup.masked_fill(~inside[:, None], math.nan), alone, alone_backup)


@pytest.mark.skipif(not _common.INTERPRETED, reason="compiled kernels assert only when built under TRITON_DEBUG=1")
def test_rows_outside_the_parameter_fail_the_debug_assertion(monkeypatch):
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    param, backup = torch.zeros(5, 8), torch.zeros(2, 8)
    triton_backend.restore([param], [torch.tensor([1, 4])], [backup])
    with pytest.raises(Exception, match="outside its parameter"):
        triton_backend.restore([param], [torch.tensor([1, 5])], [backup])


def test_tables_of_captured_launches_outlive_the_cache(monkeypatch):
    """A launch captured into a CUDA graph replays its table's address (and its copy the pinned buffer's) as long as
    the graph lives: the eager launches after it, with new row counts every step, must not evict and free them."""
    monkeypatch.setattr(_common, "_CAPTURED", [])

    def launch(step: int) -> torch.Tensor:  # a table as a launch builds it: a row count changes every step
        return _common.table([(1, 2, step)], DEVICE)

    eager = weakref.ref(launch(-1))
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    captured = weakref.ref(launch(-2))
    params, _ = make_case(specs=SPECS[:3])
    triton_backend.restore(params, [torch.arange(len(p), device=DEVICE) for p in params], clones(params))
    assert len(_common._CAPTURED) == 1 + 3  # one table per launch: three vector-width groups
    monkeypatch.setattr(_common, "capturing", lambda device: False)
    for step in range(200):
        launch(step)
    gc.collect()
    assert eager() is None  # the cache lets eager tables go
    assert captured() is not None and captured().tolist() == [[1, 2, -2]]
    assert all(t.device.type == DEVICE.type and h.device.type == "cpu" for h, t in _common._CAPTURED)


# Every kernel variant compiled for sm_90 without a GPU (``triton.compile``, in a process without TRITON_INTERPRET),
# each with its PTX and what ptxas reports: ``{name: {"ptx": text, "registers": n, "spill_bytes": n}}`` on stdout.
_AOT_SCRIPT = r"""
import json, re, subprocess, sys, tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
try:
    from triton.backends.nvidia.compiler import get_ptxas

    @triton.jit
    def probe(x):
        tl.store(x, 1.0)

    triton.compile(ASTSource(probe, {"x": "*fp32"}), target=TARGET)
    PTXAS = get_ptxas(TARGET.arch).path
except Exception as err:
    print(f"triton.compile for sm_90 does not run here: {err!r}")
    sys.exit(3)

from fastadv.kernels import _common, perturb, restore, scan

TYPES = {"table": "*i64", "bounds": "*i64", "n": "i32", "blocks_per_program": "i32", "partials": "*fp32",
         "scales": "*fp32", "box_eps": "fp32", "delta_sumsq": "*fp32", "eps": "fp32"}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
out = {}


def build(name, fn, constexprs, **types):
    signature = {a: "constexpr" if a in constexprs else types.get(a) or TYPES[a] for a in fn.arg_names}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(src, target=TARGET).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([PTXAS, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    out[name] = {"ptx": ptx, "registers": int(re.search(r"Used (\d+) registers", log)[1]),
                 "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill", log))}


for label, dtype in DTYPES.items():
    tile = {"NT": 1, "VEC": 16 // (dtype.primitive_bitwidth // 8), "BLOCK_M": 8, "BLOCK_N": 256}  # XLM-R's
    for has_params in (False, True):
        build(f"scan-{label}-params={has_params}", scan._scan_kernel,
              {"G_DTYPE": dtype, "P_DTYPE": dtype, "HAS_PARAMS": has_params, **tile})
    for stage, box in [("STEP", False), ("STEP", True), ("MEASURE", False), ("PROJECT", False), ("SUMSQ", False)]:
        build(f"rows-{label}-{stage}-box={box}", perturb._rows_kernel,
              {"P_DTYPE": dtype, "G_DTYPE": dtype, "STAGE": getattr(perturb, "_" + stage).value, "BOX": box, **tile})
for size, bits in restore._BITS.items():
    build(f"restore-{size}", restore._restore_kernel, {"DTYPE": bits, "NT": 1, "VEC": max(1, 16 // size),
                                                       "BLOCK_M": 8, "BLOCK_N": 256})
for k, out_type in [(1, "*fp32"), (3, "*fp64")]:
    build(f"segment_sum-{k}", _common._segment_sum_kernel,
          {"K": k, "BLOCK_K": triton.next_power_of_2(k), "BLOCK": _common._SEGMENT_BLOCK}, out=out_type)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """The sm_90 build of every variant (see ``_AOT_SCRIPT``); skips where triton.compile can't target sm_90."""
    script = tmp_path_factory.mktemp("sm90") / "build.py"  # triton.jit reads the source of what it compiles
    script.write_text(_AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_variant_compiles_for_sm90_without_spills(sm90):
    assert len(sm90) == 3 * (2 + 5) + 3 + 2
    assert not {name: v["spill_bytes"] for name, v in sm90.items() if v["spill_bytes"]}
    # The streaming kernels leave room for at least 3 programs of 4 warps per SM (65536 registers); the per-tensor
    # sum runs one program per tensor.
    assert max(v["registers"] for name, v in sm90.items() if not name.startswith("segment_sum")) <= 168


def _instructions(ptx: str, opcode: str) -> list[list[str]]:
    """The register operands of each ``opcode`` instruction (destination first)."""
    return [re.findall(r"%\w+", line) for line in ptx.splitlines() if line.split()[:1] == [opcode]]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_box_bounds_round_the_reach_first(sm90, dtype):
    """``d = fp32(box_eps * |B|)`` is its own ``mul.rn`` (never contracted), then ``B - d`` and ``B + d``: the box
    adds no fma to the step, and no fma reads ``d``."""
    box, plain = sm90[f"rows-{dtype}-STEP-box=True"]["ptx"], sm90[f"rows-{dtype}-STEP-box=False"]["ptx"]
    reaches = {ops[0] for ops in _instructions(box, "mul.rn.f32")}
    assert reaches
    fmas = _instructions(box, "fma.rn.f32")
    assert len(fmas) == len(_instructions(plain, "fma.rn.f32"))
    assert not any(reaches & set(ops[1:]) for ops in fmas)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_projection_is_correctly_rounded(sm90, dtype):
    """``sqrt`` and ``eps / norm`` correctly rounded, as in the extension: ``norm > eps`` decides alike everywhere."""
    ptx = sm90[f"rows-{dtype}-PROJECT-box=False"]["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert not re.search(r"sqrt\.approx|div\.(full|approx)|rcp\.approx", ptx)

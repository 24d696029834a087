"""The C++/CUDA extension (backend="ext"): its ops against plain-torch readings of the contract, the classes against
the seed, the build (CUDA included, when nvcc is here) and which GPUs it runs on, the fallback without a compiler, and
tracing under torch.compile.

Skipped with the reason when the extension cannot be built here. The first run compiles it (about a minute on two
cores; the CUDA library, for four GPU generations without a GPU, about five more); later runs load the cached build.
The CUDA sources are also checked without a GPU: compiled with nvcc and read with cuobjdump.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps
from torch import nn

from fastadv import FusedFGM, FusedPGD, ext
from fastadv.reference import FGM, PGD

try:
    from fastadv.backends import ext_ops
except ImportError as err:  # no compiler, no ninja, or a failed build: the reason is in the message
    pytest.skip(f"the C++ extension is unavailable: {err}", allow_module_level=True)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DEVICES = [CPU, CUDA] if torch.cuda.is_available() and ext_ops.supports(CUDA) else [CPU]
# (dtype, rows, cols) of the tensors of one op call: widths that are and aren't a multiple of the vector width, a
# one-row tensor (a 1-D parameter), and mixed dtypes in the same list.
LAYOUT = [
    (torch.float32, 37, 19),
    (torch.bfloat16, 50, 64),
    (torch.float16, 1, 33),
    (torch.float32, 23, 768),
    (torch.bfloat16, 9, 5),
    (torch.float16, 40, 48),
]


@pytest.fixture
def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sparse_grads(rng: torch.Generator, dense: bool = False) -> list[torch.Tensor]:
    """Gradients with about a third of the rows non-zero (every row with ``dense``, as for a tied LM head)."""
    grads = []
    for dtype, rows, cols in LAYOUT:
        keep = torch.ones(rows, 1) if dense else (torch.rand(rows, 1, generator=rng) < 0.35).float()
        keep[torch.randint(rows, (1,), generator=rng)] = 1
        grads.append((torch.randn(rows, cols, generator=rng) * keep).to(dtype))
    return grads


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 to rtol 1e-5; bf16/fp16 within one ulp (both backends round once from fp32 values that may differ in the
    last fp32 bit)."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert_ulps(actual, expected, 1)


def run_scan(grads: list[torch.Tensor], touched: list[torch.Tensor], params: list[torch.Tensor] | None = None):
    fresh = [~t for t in touched]  # poison: the opposite of the answer wherever the row is zero
    return ext_ops.scan(grads, touched, fresh, params), fresh


def fp32_sumsq(tensor: torch.Tensor) -> float:
    return tensor.float().square().sum(dtype=torch.float64).item()


# ---- ops against plain-torch readings of the contract ----


@pytest.mark.parametrize("with_params", [False, True], ids=["grads", "grads+params"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_scan(rng, dense, with_params):
    grads = sparse_grads(rng, dense)
    grads[0][3, 7] = float("nan")  # a NaN row counts as non-zero
    params = [torch.randn(g.shape, generator=rng).to(g.dtype) for g in grads] if with_params else None
    touched = [torch.rand(g.shape[0], generator=rng) < 0.4 for g in grads]
    stats, fresh = run_scan(grads, touched, params)
    assert stats.dtype == torch.float64 and stats.shape == (len(grads), 3)
    for i, grad in enumerate(grads):
        assert torch.equal(fresh[i], (grad != 0).any(dim=1) & ~touched[i])
        assert stats[i, 1] == fresh[i].sum()
        if i:
            assert stats[i, 0].item() == pytest.approx(fp32_sumsq(grad), rel=1e-5)
        assert stats[i, 2].item() == (pytest.approx(fp32_sumsq(params[i]), rel=1e-5) if params else 0.0)
    assert torch.isnan(stats[0, 0])


def test_scan_nonfinite_and_zero_tensors():
    grads = [torch.zeros(4, 8), torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(5, 3, dtype=torch.float16)]
    grads[1][1, 2] = float("inf")
    grads[2][4, 1] = -0.0  # -0 is zero
    grads.append(torch.zeros(2, 40))
    grads[3][1, 39] = 1e-30  # its square underflows in fp32 (the torch backend misses this row), still non-zero
    stats, fresh = run_scan(grads, [torch.zeros(g.shape[0], dtype=torch.bool) for g in grads])
    assert stats[0].tolist() == [0.0, 0.0, 0.0] and not fresh[0].any()
    assert stats[1, 0] == float("inf") and fresh[1].tolist() == [False, True, False]
    assert stats[2].tolist() == [0.0, 0.0, 0.0] and not fresh[2].any()
    assert stats[3].tolist() == [0.0, 1.0, 0.0] and fresh[3].tolist() == [False, True]


def test_row_sumsq(rng):
    tensors = [torch.randn(rows, cols, generator=rng).to(dtype) for dtype, rows, cols in LAYOUT]
    rows = [torch.randperm(len(t), generator=rng)[: len(t) // 2] for t in tensors]  # unordered, no repeats
    rows[3] = torch.arange(len(tensors[3]))  # every row, in order
    rows[5] = torch.empty(0, dtype=torch.long)  # no rows: 0
    sums = ext_ops.row_sumsq(tensors, rows)
    assert sums.dtype == torch.float64 and sums.shape == (len(tensors),)
    for i, (t, r) in enumerate(zip(tensors, rows)):
        assert sums[i].item() == pytest.approx(fp32_sumsq(t[r]), rel=1e-5)
    assert sums[5] == 0.0
    with pytest.raises(RuntimeError, match="outside"):
        ext_ops.row_sumsq(tensors[:1], [torch.tensor([len(tensors[0])])])


def test_sums_are_deterministic_across_thread_counts(rng):
    grads = [torch.randn(3000, 96, generator=rng), torch.randn(700, 200, generator=rng).bfloat16()]
    params = [torch.randn(g.shape, generator=rng).to(g.dtype) for g in grads]
    touched = [torch.zeros(g.shape[0], dtype=torch.bool) for g in grads]
    rows = [torch.randperm(len(g), generator=rng)[:1500] for g in grads]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((run_scan(grads, touched, params)[0], ext_ops.row_sumsq(grads, rows)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, results[0][0]) and torch.equal(b, results[0][1]) for a, b in results)


def perturb_case(rng: torch.Generator, dense: bool, moved: bool):
    """Inputs of perturb/measure: parameters, gradients, rows (the non-zero ones), backups with the first half of each
    list already backed up (as after an earlier step; ``moved``: the weights have moved since), the rest poisoned, and
    per-tensor scales."""
    grads = sparse_grads(rng, dense)
    params = [torch.randn(g.shape, generator=rng).to(g.dtype) for g in grads]
    rows = [(g != 0).any(dim=1).nonzero().view(-1) for g in grads]
    n_backed = [len(r) // 2 for r in rows]
    backups = []
    for p, r, n in zip(params, rows, n_backed):
        backup = torch.full((len(r), p.shape[1]), float("nan"), dtype=p.dtype)
        backup[:n] = p[r[:n]]
        backups.append(backup)
        if moved:
            p[r[:n]] += (0.05 * torch.randn(n, p.shape[1], generator=rng)).to(p.dtype)
    scales = 0.02 + 0.2 * torch.rand(len(grads), generator=rng)
    return params, grads, rows, backups, n_backed, scales


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def oracle_backups(params, rows, backups, n_backed) -> list[torch.Tensor]:
    """The backups after perturb/measure: the rows j >= n_backed[i] copied from the parameters."""
    out = clone_all(backups)
    for p, r, b, n in zip(params, rows, out, n_backed):
        b[n:] = p[r[n:]]
    return out


def oracle_passes(params, grads, rows, backups, scales, box_eps=None, delta_sumsq=None, eps=None):
    """The contract in plain torch, on backups already complete: (new parameters, ||W + s * G - B||^2 per tensor).
    With ``box_eps`` perturb's box; with ``delta_sumsq`` and ``eps`` project's projection."""
    new_params, deltas = [], []
    for i, (p, g, r, b) in enumerate(zip(params, grads, rows, backups)):
        scale, origin = scales[i], b.float()
        new = p[r].float() + scale * g[r].float()
        deltas.append((new - origin).square().sum(dtype=torch.float64).item() if scale != 0 else 0.0)
        if box_eps is not None:
            d = torch.tensor(box_eps, dtype=torch.float32) * origin.abs()
            new = torch.minimum(torch.maximum(new, origin - d), origin + d)
        if eps is not None:
            norm = delta_sumsq[i].float().sqrt()
            if norm > eps:
                new = torch.lerp(origin, new, torch.tensor(eps, dtype=torch.float32) / norm)
        out = p.clone()
        if scale != 0:
            out[r] = new.to(p.dtype)
        new_params.append(out)
    return new_params, deltas


def assert_params(actual, expected, originals, rows) -> None:
    """The listed rows as expected (see assert_same), every other row untouched, bit for bit."""
    for a, e, o, r in zip(actual, expected, originals, rows):
        assert_same(a, e)
        untouched = torch.ones(a.shape[0], dtype=torch.bool)
        untouched[r] = False
        assert torch.equal(a[untouched], o[untouched])


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("box_eps", [None, 0.01, 1e3], ids=["step", "box-hit", "box-inside"])
@pytest.mark.parametrize("moved", [False, True], ids=["first-step", "later-step"])
def test_perturb(rng, dense, box_eps, moved):
    params, grads, rows, backups, n_backed, scales = perturb_case(rng, dense, moved)
    scales[4] = 0.0  # left alone, its backups still written
    originals = clone_all(params)
    expected_backups = oracle_backups(params, rows, backups, n_backed)
    expected, _ = oracle_passes(params, grads, rows, expected_backups, scales, box_eps=box_eps)
    assert ext_ops.perturb(params, grads, rows, backups, n_backed, scales, box_eps) is None
    for b, e in zip(backups, expected_backups):
        assert torch.equal(b, e)  # NaN-free: every poisoned row was written, bit-exact
    assert_params(params, expected, originals, rows)
    assert torch.equal(params[4], originals[4])
    if box_eps == 0.01:  # the box is around the backup (not the moved weights), and the steps reach its walls
        for i, (p, r, b) in enumerate(zip(params, rows, backups)):
            if i == 4:  # scale 0: its weights (moved or not) are left alone
                continue
            beyond = (p[r].float() - b.float()).abs() - 0.01 * b.float().abs()
            ulp = 2.0 ** -(7 if p.dtype == torch.bfloat16 else 10 if p.dtype == torch.float16 else 22)
            assert (beyond <= b.float().abs() * ulp).all()  # within the box up to the rounding of the stored value
        assert (params[3][rows[3]] != originals[3][rows[3]]).any()


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("eps", [0.05, 1e6], ids=["projection-hit", "inside"])
@pytest.mark.parametrize("moved", [False, True], ids=["first-step", "later-step"])
def test_measure_and_project(rng, dense, eps, moved):
    params, grads, rows, backups, n_backed, scales = perturb_case(rng, dense, moved)
    scales[1] = 0.0
    originals = clone_all(params)
    expected_backups = oracle_backups(params, rows, backups, n_backed)
    _, expected_deltas = oracle_passes(params, grads, rows, expected_backups, scales)

    delta_sumsq = ext_ops.measure(params, grads, rows, backups, n_backed, scales)
    assert delta_sumsq.dtype == torch.float32 and delta_sumsq.shape == (len(params),)
    for b, e in zip(backups, expected_backups):
        assert torch.equal(b, e)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))  # measure writes no weight
    torch.testing.assert_close(
        delta_sumsq.double(), torch.tensor(expected_deltas, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert delta_sumsq[1] == 0.0

    delta_sumsq[0] *= 4  # project takes the norms it is given (e.g. all-reduced), not its own
    expected, _ = oracle_passes(params, grads, rows, backups, scales, delta_sumsq=delta_sumsq, eps=eps)
    assert ext_ops.project(params, grads, rows, backups, scales, delta_sumsq, eps) is None
    assert_params(params, expected, originals, rows)
    assert torch.equal(params[1], originals[1])
    if eps == 0.05:  # the ball is left: each update lies on its surface (bf16/fp16 rounding is coarser)
        for i, (p, r, b) in enumerate(zip(params, rows, backups)):
            if p.dtype == torch.float32:
                expected_norm = 0.05 * (0.5 if i == 0 else 1.0)  # tensor 0's norm was given twice its own
                assert (p[r].float() - b.float()).norm().item() == pytest.approx(expected_norm, rel=1e-3)


def test_box_propagates_nan_and_handles_zero_backups():
    params = [torch.tensor([[0.0, 1.0, 2.0, -3.0]])]
    grads = [torch.tensor([[1.0, float("nan"), 0.5, -1.0]])]
    rows, backups = [torch.tensor([0])], [torch.empty(1, 4)]
    ext_ops.perturb(params, grads, rows, backups, [0], torch.tensor([1.0]), 0.1)
    assert torch.equal(backups[0], torch.tensor([[0.0, 1.0, 2.0, -3.0]]))
    assert params[0][0, 0] == 0.0 and torch.isnan(params[0][0, 1])  # a zero backup pins the weight
    assert params[0][0, 2:].tolist() == pytest.approx([2.2, -3.3])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_box_rounds_its_radius_before_the_bounds(rng, device):
    """d = fp32(box_eps * |B|) is rounded on its own, then B - d and B + d: fused into one multiply-add (as nvcc and
    GCC -mfma contract them) about 1% of the clamped fp32 elements ended one ulp off. A power-of-two scale makes the
    step exact, so every element is compared bit for bit."""
    origin = torch.randn(300, 64, generator=rng)  # 64 columns: 16-byte packs on the GPU, whole vectors on the CPU
    grad = torch.randn(300, 64, generator=rng)
    box_eps = 0.013
    d = torch.tensor(box_eps, dtype=torch.float32) * origin.abs()
    new = origin + 4.0 * grad
    expected = torch.minimum(torch.maximum(new, origin - d), origin + d)
    assert ((new < origin - d) | (new > origin + d)).float().mean() > 0.9  # nearly every element is clamped
    params, backups = [origin.to(device)], [torch.empty(300, 64, device=device)]
    rows, scales = [torch.arange(300, device=device)], torch.tensor([4.0], device=device)
    ext_ops.perturb(params, [grad.to(device)], rows, backups, [0], scales, box_eps)
    assert torch.equal(params[0].cpu(), expected)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_restore_is_bit_exact(rng, dense):
    grads = sparse_grads(rng, dense)
    params = [torch.randn(g.shape, generator=rng).to(g.dtype) for g in grads]
    params[2][0, 1] = float("nan")
    rows = [(g != 0).any(dim=1).nonzero().view(-1) for g in grads]
    originals = clone_all(params)
    backups = [p[r].clone() for p, r in zip(params, rows)]
    for p in params:
        p.normal_()
    ext_ops.restore(params, rows, backups)
    for p, o, r in zip(params, originals, rows):
        assert torch.equal(p[r].view(torch.uint8), o[r].view(torch.uint8))


def test_ops_reject_bad_arguments():
    grad, rows, backups = torch.zeros(4, 8), [torch.tensor([1])], [torch.zeros(1, 8)]
    bools = [torch.zeros(4, dtype=torch.bool)]
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext_ops.scan([grad.double()], bools, [torch.zeros(4, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match="bool vector of 4 rows"):
        ext_ops.scan([grad], [torch.zeros(3, dtype=torch.bool)], bools)
    with pytest.raises(RuntimeError, match=r"params\[0\] is BFloat16"):
        ext_ops.scan([grad], bools, [torch.zeros(4, dtype=torch.bool)], [grad.bfloat16()])
    with pytest.raises(RuntimeError, match="outside"):
        ext_ops.restore([grad], [torch.tensor([4])], backups)
    with pytest.raises(RuntimeError, match="scales must be a float32 vector of 1 values"):
        ext_ops.perturb([grad], [grad], rows, backups, [0], torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="n_backed"):
        ext_ops.measure([grad], [grad], rows, backups, [2], torch.ones(1))
    with pytest.raises(RuntimeError, match="delta_sumsq must be a float32 vector of 1 values"):
        ext_ops.project([grad], [grad], rows, backups, torch.ones(1), torch.ones(2), 0.1)


@pytest.mark.skipif(not torch.cuda.is_available() or not ext_ops.supports(torch.device("cuda")), reason="no GPU")
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_cuda_matches_cpu(rng, dense):
    params, grads, rows, backups, n_backed, scales = perturb_case(rng, dense, moved=True)
    scales[4] = 0.0
    touched = [torch.rand(g.shape[0], generator=rng) < 0.4 for g in grads]

    def run(device: torch.device) -> list:
        def to(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device, copy=True) for t in tensors]

        p, g, r, b = to(params), to(grads), to(rows), to(backups)
        fresh = [~t for t in to(touched)]
        stats = ext_ops.scan(g, to(touched), fresh, p)
        sums = ext_ops.row_sumsq(p, r)
        delta_sumsq = ext_ops.measure(p, g, r, b, n_backed, scales.to(device))
        ext_ops.project(p, g, r, b, scales.to(device), delta_sumsq, 0.05)
        boxed, boxed_backups = to(params), to(backups)  # the boxed step on the inputs, not on project's output
        ext_ops.perturb(boxed, g, r, boxed_backups, n_backed, scales.to(device), 0.01)
        return [t.cpu() for t in (stats, sums, delta_sumsq, *fresh, *b, *boxed_backups, *p, *boxed)]

    n = len(params)
    cpu, gpu = run(CPU), run(torch.device("cuda"))
    assert torch.equal(cpu[0][:, 1], gpu[0][:, 1])
    for a, e in zip(gpu[:3], cpu[:3]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=0)
    for a, e in zip(gpu[3 : 3 + 3 * n], cpu[3 : 3 + 3 * n]):  # fresh flags and backups
        assert torch.equal(a, e)
    for a, e in zip(gpu[3 + 3 * n :], cpu[3 + 3 * n :]):  # weights after project, and after the boxed step
        assert_same(a, e)


def test_supports():
    assert ext_ops.supports(CPU)
    assert ext_ops.supports(torch.device("cuda")) == ("cuda" in ext.load(cuda=torch.cuda.is_available()))


# ---- torch.compile ----


def test_opcheck():
    grads = [torch.randn(5, 8), torch.randn(1, 3).bfloat16()]
    touched = [torch.zeros(5, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]
    fresh = [torch.empty(5, dtype=torch.bool), torch.empty(1, dtype=torch.bool)]
    params = [torch.randn(5, 8), torch.randn(1, 3).bfloat16()]
    ops = torch.ops.fastadv
    torch.library.opcheck(ops.scan.default, (grads, touched, fresh))
    torch.library.opcheck(ops.scan.default, (grads, touched, fresh, params))
    rows = [torch.tensor([0, 3]), torch.tensor([0])]
    torch.library.opcheck(ops.row_sumsq.default, (params, rows))
    backups = [p[r] for p, r in zip(params, rows)]
    scales = torch.tensor([0.5, 0.25])
    torch.library.opcheck(ops.perturb.default, (params, grads, rows, backups, [0, 0], scales))
    torch.library.opcheck(ops.perturb.default, (params, grads, rows, backups, [1, 1], scales, 0.01))
    torch.library.opcheck(ops.measure.default, (params, grads, rows, backups, [0, 0], scales))
    delta_sumsq = torch.tensor([0.1, 4.0])
    torch.library.opcheck(ops.project.default, (params, grads, rows, backups, scales, delta_sumsq, 0.5))
    torch.library.opcheck(ops.restore.default, (params, rows, backups))


def test_compiled_function_calling_the_ops():
    def attack(params, grads, touched, fresh, rows, backups):
        stats = ext_ops.scan(grads, touched, fresh, params)
        scales = (1.0 / stats[:, 0].sqrt()).float()
        delta_sumsq = ext_ops.measure(params, grads, rows, backups, [0], scales)
        ext_ops.project(params, grads, rows, backups, scales, delta_sumsq, 0.5)
        ext_ops.perturb(params, grads, rows, backups, [2], scales, box_eps=0.01)
        return stats, delta_sumsq, ext_ops.row_sumsq(params, rows)

    def inputs() -> list[list[torch.Tensor]]:
        grad = torch.zeros(6, 4)
        grad[[1, 4]] = torch.arange(8.0).view(2, 4)
        params = torch.arange(24.0).view(6, 4)
        bools = [torch.zeros(6, dtype=torch.bool), torch.empty(6, dtype=torch.bool)]
        return [[params], [grad], [bools[0]], [bools[1]], [torch.tensor([1, 4])], [torch.empty(2, 4)]]

    eager, compiled = inputs(), inputs()
    expected = attack(*eager)
    actual = torch.compile(attack, backend="aot_eager", fullgraph=True)(*compiled)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    for a, b in zip(eager, compiled):
        assert torch.equal(a[0], b[0])


# ---- the classes against the seed ----


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(40, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.word_embeddings(ids).mean(dim=1)), labels)


def assert_same_model(fused: nn.Module, ref: nn.Module) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("eps", [0.02, 10.0], ids=["small-eps", "large-eps"])
def test_training_loop_matches_the_seed(seed, kind, eps):
    fused = Tiny()
    ref = Tiny()
    ref.load_state_dict(fused.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fused, ref)]
    if kind == "fgm":
        attacker, oracle = FusedFGM(fused, eps=eps, backend="ext"), FGM(ref, eps=eps)
    else:
        attacker, oracle = FusedPGD(fused, eps=eps, alpha=eps / 2, backend="ext"), PGD(ref, eps=eps, alpha=eps / 2)
    for _ in range(4):
        ids, labels = torch.randint(40, (8, 5)), torch.randint(3, (8,))
        if kind == "fgm":
            attacker.step(functools.partial(fused, ids, labels))
            ref(ids, labels).backward()
            oracle.attack()
            ref(ids, labels).backward()
            oracle.restore()
        else:
            attacker.step(functools.partial(fused, ids, labels), k=3)
            ref(ids, labels).backward()
            oracle.backup_grad()
            for t in range(3):
                oracle.attack(is_first_attack=t == 0)
                if t != 2:
                    ref.zero_grad()
                else:
                    oracle.restore_grad()
                ref(ids, labels).backward()
            oracle.restore()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        assert_same_model(fused, ref)


# ---- build and fallback ----


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


@pytest.mark.skipif(importlib.util.find_spec("fastadv._C") is not None, reason="an ahead-of-time build is installed")
def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    result = run_python(
        """
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from fastadv import available_backends
            from fastadv.backends import resolve_backend
            backends = available_backends()
            chosen = [resolve_backend("auto", torch.device("cpu")).__name__ for _ in range(2)]
            try:
                resolve_backend("ext", None)
            except RuntimeError as err:
                explicit = str(err)
        messages = [str(w.message) for w in caught if "C++ extension is unavailable" in str(w.message)]
        print(backends, chosen, len(messages))
        print(explicit)
        """,
        CXX=str(tmp_path / "no-such-compiler"),
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        FASTADV_BACKEND="",
    )
    assert result.returncode == 0, result.stderr
    summary, explicit = result.stdout.splitlines()[-2:]
    assert "'ext'" not in summary.split("]")[0]
    assert "['fastadv.backends.torch_ops', 'fastadv.backends.torch_ops'] 1" in summary
    assert "no C++ compiler" in explicit


# ---- which GPUs a CUDA library runs on ----

needs_nvcc = pytest.mark.skipif(
    torch.version.cuda is None or ext.cuda_home() is None, reason="no CUDA build of torch, or no CUDA toolkit (nvcc)"
)


def fake_gpus(monkeypatch, *capabilities: tuple[int, int]) -> None:
    """torch.cuda as on a machine with these GPUs (none: no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device or 0])


def test_cuda_arch_list_is_the_visible_gpus_else_several_generations_with_ptx(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    fake_gpus(monkeypatch)
    assert ext.cuda_arch_list() == ext.DEFAULT_CUDA_ARCH
    assert ext.DEFAULT_CUDA_ARCH.endswith("+PTX")  # newer GPUs run its PTX
    fake_gpus(monkeypatch, (8, 0))
    assert ext.cuda_arch_list() == "8.0"  # a JIT build on a GPU compiles for that GPU only
    fake_gpus(monkeypatch, (9, 0), (8, 0), (9, 0))
    assert ext.cuda_arch_list() == "8.0;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert ext.cuda_arch_list() == "7.5"


@needs_nvcc
def test_default_cuda_archs_are_ones_nvcc_compiles_for(monkeypatch):
    """nvcc 13 dropped sm_50 to sm_72: every default target is one this nvcc lists, and the library has PTX."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ext.DEFAULT_CUDA_ARCH)
    targets = ext.cuda_targets(cpp_extension._get_cuda_arch_flags(ext.CUDA_FLAGS))
    assert {"sm_80", "sm_86", "sm_89", "sm_90", "compute_90"} <= set(targets)
    nvcc = str(ext.cuda_home() / "bin" / "nvcc")
    known = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    known += subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    assert set(targets) <= set(known)


def test_runs_on_follows_cuda_binary_compatibility():
    default = ["compute_90", "sm_80", "sm_86", "sm_89", "sm_90"]
    for capability in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]:
        assert ext.runs_on(default, capability), capability
    assert not ext.runs_on(default, (7, 5))  # older than every target
    assert not ext.runs_on(["sm_90"], (8, 0)) and not ext.runs_on(["sm_90"], (10, 0))  # machine code: same major
    assert ext.runs_on(["sm_80"], (8, 9)) and not ext.runs_on(["sm_86"], (8, 0))
    assert ext.runs_on(["compute_80"], (12, 0)) and not ext.runs_on(["compute_90"], (8, 9))  # PTX: newer GPUs
    assert ext.runs_on(["sm_90a"], (9, 0)) and not ext.runs_on(["sm_90a", "compute_90a"], (10, 0))  # arch-specific
    assert ext.runs_on(["sm_100f"], (10, 3)) and not ext.runs_on(["sm_100f"], (12, 0))  # family-specific
    assert not ext.runs_on([], (9, 0))


@pytest.fixture
def prebuilt_cuda(monkeypatch, tmp_path):
    """An ahead-of-time CUDA library that ext finds (loading it is recorded, not done), and the JIT build stubbed."""
    library = tmp_path / "_C_cuda.so"
    library.touch()
    find_spec = importlib.util.find_spec
    spec = types.SimpleNamespace(origin=str(library))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "fastadv._C_cuda" else find_spec(name, *a)
    )
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(ext, "_jit", lambda kind, verbose: f"jit-{kind}")
    monkeypatch.setattr(ext, "_loaded", {})
    monkeypatch.setattr(ext, "_failed", {})
    return library.with_name(ext.CUDA_TARGETS_FILE), loaded


def test_prebuilt_cuda_library_is_used_on_the_gpus_it_has_code_for(monkeypatch, prebuilt_cuda):
    record, loaded = prebuilt_cuda
    record.write_text("compute_90 sm_80 sm_86 sm_89 sm_90\n")
    fake_gpus(monkeypatch, (8, 0), (10, 0))  # machine code for one, PTX for the other
    assert ext._load("cuda", verbose=False, prebuilt=True) == str(record.with_name("_C_cuda.so"))
    assert loaded == [str(record.with_name("_C_cuda.so"))]


@pytest.mark.parametrize("recorded", ["sm_90\n", None], ids=["sm_90-only", "no-record"])
def test_prebuilt_cuda_library_without_code_for_the_gpu_falls_back_to_a_jit_build(monkeypatch, prebuilt_cuda, recorded):
    record, loaded = prebuilt_cuda
    if recorded:
        record.write_text(recorded)
    fake_gpus(monkeypatch, (8, 0))
    with pytest.warns(RuntimeWarning, match="no code for compute capability 8.0"):
        assert ext._load("cuda", verbose=False, prebuilt=True) == "jit-cuda"
    assert loaded == []
    fake_gpus(monkeypatch)  # without a GPU there is nothing to check: the prebuilt library loads
    monkeypatch.setattr(ext, "_loaded", {})
    assert ext._load("cuda", verbose=False, prebuilt=True) == str(record.with_name("_C_cuda.so"))


@needs_nvcc
def test_setup_records_the_cuda_targets_beside_the_library(tmp_path):
    """setup.py's build_ext (FASTADV_BUILD_EXT=1 FASTADV_BUILD_CUDA=1), compilers stubbed: it writes the targets of
    TORCH_CUDA_ARCH_LIST, named architectures expanded, next to fastadv/_C_cuda in the build tree."""
    root = Path(ext.__file__).resolve().parent.parent
    if not (root / "setup.py").exists():
        pytest.skip("fastadv is installed, not a checkout: no setup.py")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, setuptools.command.build_ext as b; b.build_ext.build_extension = lambda self, e: None; "
            "runpy.run_path('setup.py', run_name='__main__')",
            "build_ext",
            f"--build-lib={tmp_path / 'lib'}",
            f"--build-temp={tmp_path / 'temp'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTADV_BUILD_EXT": "1", "FASTADV_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0;Hopper"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = tmp_path / "lib" / "fastadv" / ext.CUDA_TARGETS_FILE
    assert record.read_text().split() == ["compute_90", "sm_80", "sm_90"]


# ---- the CUDA sources compiled with nvcc (no GPU needed) ----


def cuda_tool(name: str) -> str | None:
    """A CUDA binary utility (cuobjdump): the toolkit's, else one on PATH, else the copy that ships with triton."""
    home = ext.cuda_home()
    candidates = [home / "bin" / name] if home else []
    candidates += [Path(path) for path in [shutil.which(name)] if path]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin is not None:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / name)
    return next((str(path) for path in candidates if path.is_file()), None)


def run_tool(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def nvcc(tmp_path: Path, source: str, *flags: str) -> Path:
    """Compiles `source` (which may include csrc/'s headers) with the toolkit's nvcc; returns the output file."""
    from torch.utils import cpp_extension

    (tmp_path / "harness.cu").write_text(textwrap.dedent(source))
    out = tmp_path / "harness.out"
    includes = [str(ext.source_dir()), *cpp_extension.include_paths(), *ext.cuda_include_dirs()]
    run_tool(
        str(ext.cuda_home() / "bin" / "nvcc"),
        "-std=c++20",
        "--expt-relaxed-constexpr",
        *(f"-I{path}" for path in includes),
        *flags,
        str(tmp_path / "harness.cu"),
        "-o",
        str(out),
    )
    return out


@needs_nvcc
def test_box_radius_is_multiplied_on_its_own_on_the_gpu(tmp_path):
    """common.h's boxed() on the device: d = eps * |B| is one rounded multiply (__fmul_rn), then B - d and B + d.
    Before, ptxas turned the plain multiply and its two uses into two FFMAs (the PTX had mul.f32, not mul.rn.f32)."""
    source = """
        #include "common.h"
        __global__ void box(const float* value, const float* origin, float eps, float* out) {
          out[threadIdx.x] = fastadv::boxed(value[threadIdx.x], origin[threadIdx.x], eps);
        }
    """
    ptx = nvcc(tmp_path, source, "-arch=compute_80", "-ptx").read_text()
    assert re.findall(r"\b(mul(?:\.rn)?\.f32|fma\.rn\.f32)", ptx) == ["mul.rn.f32"]
    cuobjdump = cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump to read the machine code with")
    sass = run_tool(cuobjdump, "-sass", str(nvcc(tmp_path, source, "-arch=sm_90", "-cubin")))
    ops = re.findall(r"\b(FFMA|FMUL|FADD)\b", sass)
    assert "FFMA" not in ops and ops.count("FMUL") == 1, ops


@needs_nvcc
def test_grids_take_at_most_the_resident_blocks_per_tensor(tmp_path):
    """Segments::add caps a tensor's blocks at max_blocks (resident_blocks: blocks per SM from the occupancy API
    times the SMs), not at a fixed 1024: a large tensor gets exactly one wave. Host code only: runs without a GPU."""
    source = """
        #include <cstdio>
        #include "cuda_utils.cuh"
        int main() {
          fastadv::cuda::Segments segments;
          segments.max_blocks = 132 * 3;  // an H100 at 3 blocks per SM
          segments.add(0, 250002);        // 31251 blocks' worth of rows
          segments.add(1, 20);            // 3 blocks of 8 warps
          std::printf("%lld %lld\\n", (long long)segments.block_offset[1], (long long)segments.blocks());
        }
    """
    program = nvcc(tmp_path, source)
    assert run_tool(str(program)).split() == ["396", "399"]


@pytest.fixture(scope="module")
def cuda_library() -> str:
    """The CUDA library's JIT build (python -m fastadv.ext build --cuda): its path. A cold build takes 2 to 6 min on
    two cores, a cached one a second; deselect with -k 'not cuda_'."""
    if torch.version.cuda is None or ext.cuda_home() is None:
        pytest.skip("no CUDA build of torch, or no CUDA toolkit (nvcc)")
    result = subprocess.run(
        [sys.executable, "-m", "fastadv.ext", "build", "--cuda"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "torch.ops.fastadv: scan, row_sumsq, perturb, measure, project, restore" in result.stdout
    return re.search(r"fastadv: cuda library loaded in [\d.]+ s: (\S+)", result.stdout)[1]


def test_cuda_build_compiles_links_and_imports(cuda_library):
    assert Path(cuda_library).is_file()


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    tool = cuda_tool("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump")
    return tool


def test_cuda_library_holds_code_for_its_arch_list(cuda_library, cuobjdump, monkeypatch):
    """Machine code for every listed architecture and, by default, PTX for the newest (GPUs newer than all of them)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ext.cuda_arch_list())
    expected = ext.cuda_targets(cpp_extension._get_cuda_arch_flags(ext.CUDA_FLAGS))
    listed = run_tool(cuobjdump, "--list-elf", "--list-ptx", cuda_library)
    held = {f"sm_{arch}" for arch in re.findall(r"\.sm_(\d+a?f?)\.cubin", listed)}
    held |= {f"compute_{arch}" for arch in re.findall(r"\.sm_(\d+a?f?)\.ptx", listed)}
    assert held == set(expected)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        assert "compute_90" in held


def test_cuda_kernels_keep_their_batches_in_registers(cuda_library, cuobjdump):
    """The batched loads (kUnroll packs per lane and input) are not spilled: no stack frame, no local memory."""
    usage = run_tool(cuobjdump, "--dump-resource-usage", cuda_library)
    kernels = re.findall(
        r"Function (\S*(?:scan|perturb|restore)_kernel\S*):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage
    )
    assert len(kernels) >= 9  # three kernels times three dtypes, per architecture
    assert all(stack == local == "0" for _, _, stack, local in kernels), kernels


def loads_in_flight(sass: str) -> int:
    """The most 16-byte loads (LDG.E.128) a function's machine code issues before an instruction reads one of their
    registers (in program order, a lower bound across branches)."""
    best, pending = 0, set()
    for instruction in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass):
        if "LDG.E.128" in instruction:
            first = int(re.search(r"LDG\.E\.128\S*\s+R(\d+)", instruction)[1])
            pending |= set(range(first, first + 4))
            best = max(best, len(pending) // 4)
        elif {int(r) for r in re.findall(r"\bR(\d+)\b", instruction)} & pending:
            pending = set()
    return best


def test_cuda_kernels_batch_their_loads(cuda_library, cuobjdump):
    """kUnroll (4) packs per lane and input loaded before any is used: 4 for restore (the backup), 8 for scan
    (gradient and parameter), 12 for perturb (W, G, B). One pack per input was in flight before (two for scan)."""
    sass = run_tool(cuobjdump, "-sass", cuda_library)
    inputs = {"restore": 1, "scan": 2, "perturb": 3}
    seen = 0
    for name, code in re.findall(r"Function : (\S+)(.*?)(?=Function : |\Z)", sass, re.S):
        kernel = re.search(r"(scan|perturb|restore)_kernel", name)
        if kernel:
            seen += 1
            assert loads_in_flight(code) >= 4 * inputs[kernel[1]], name
    assert seen >= 9


def test_cuda_box_radius_is_a_rounded_multiply_in_the_library(cuda_library, cuobjdump):
    """The library's own PTX (see test_box_radius_is_multiplied_on_its_own_on_the_gpu): perturb's box pass has it."""
    ptx = run_tool(cuobjdump, "-ptx", cuda_library)
    if ".entry" not in ptx:
        pytest.skip("the library holds no PTX (TORCH_CUDA_ARCH_LIST without +PTX)")
    assert "mul.rn.f32" in ptx


def test_cuda_grids_are_sized_by_the_occupancy_api(cuda_library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    assert "cudaOccupancyMaxActiveBlocksPerMultiprocessor" in run_tool(nm, "-D", "--undefined-only", cuda_library)

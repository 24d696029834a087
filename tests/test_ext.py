"""The C++/CUDA extension (backend="ext"): its ops against the torch backend, the classes against the seed, the
build (CUDA included, when nvcc is here), the fallback without a compiler, and tracing under torch.compile.

Skipped with the reason when the extension cannot be built here. The first run compiles it (about a minute on two
cores; the CUDA library about three more); later runs load the cached build.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_ulps
from torch import nn

from fastadv import FusedFGM, FusedPGD, ext
from fastadv.backends import torch_ops
from fastadv.reference import FGM, PGD

try:
    from fastadv.backends import ext_ops
except ImportError as err:  # no compiler, no ninja, or a failed build: the reason is in the message
    pytest.skip(f"the C++ extension is unavailable: {err}", allow_module_level=True)

CPU = torch.device("cpu")
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


def run_scan(backend, grads: list[torch.Tensor], touched: list[torch.Tensor]):
    fresh = [~t for t in touched]  # poison: the opposite of the answer wherever the row is zero
    return backend.scan(grads, touched, fresh), fresh


# ---- ops against the torch backend ----


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_scan_matches_torch(rng, dense):
    grads = sparse_grads(rng, dense)
    grads[0][3, 7] = float("nan")  # a NaN row counts as non-zero
    touched = [torch.rand(g.shape[0], generator=rng) < 0.4 for g in grads]
    stats, fresh = run_scan(ext_ops, grads, touched)
    expected_stats, expected_fresh = run_scan(torch_ops, grads, touched)
    for i, grad in enumerate(grads):
        assert torch.equal(fresh[i], (grad != 0).any(dim=1) & ~touched[i])
        assert stats[i, 1] == fresh[i].sum()
    assert torch.isnan(stats[0, 0])
    torch.testing.assert_close(stats[1:, 0], expected_stats[1:, 0], rtol=1e-5, atol=0)
    assert torch.equal(stats[:, 1], expected_stats[:, 1])


def test_scan_nonfinite_and_zero_tensors():
    grads = [torch.zeros(4, 8), torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(5, 3, dtype=torch.float16)]
    grads[1][1, 2] = float("inf")
    grads[2][4, 1] = -0.0  # -0 is zero
    grads.append(torch.zeros(2, 40))
    grads[3][1, 39] = 1e-30  # its square underflows in fp32 (the torch backend misses this row), still non-zero
    stats, fresh = run_scan(ext_ops, grads, [torch.zeros(g.shape[0], dtype=torch.bool) for g in grads])
    assert stats[0].tolist() == [0.0, 0.0] and not fresh[0].any()
    assert stats[1, 0] == float("inf") and fresh[1].tolist() == [False, True, False]
    assert stats[2].tolist() == [0.0, 0.0] and not fresh[2].any()
    assert stats[3].tolist() == [0.0, 1.0] and fresh[3].tolist() == [False, True]


def test_scan_is_deterministic_across_thread_counts(rng):
    grads = [torch.randn(3000, 96, generator=rng), torch.randn(700, 200, generator=rng).bfloat16()]
    touched = [torch.zeros(g.shape[0], dtype=torch.bool) for g in grads]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run_scan(ext_ops, grads, touched)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def perturb_case(rng: torch.Generator, dense: bool, moved: bool):
    """Inputs of perturb: parameters, gradients, rows (the non-zero ones), backups with the first half of each list
    already backed up (as after an earlier PGD step; ``moved``: the weights have moved since), the rest poisoned."""
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
    sumsq = torch.tensor([g.double().square().sum().item() for g in grads], dtype=torch.float64)
    return params, grads, rows, backups, n_backed, sumsq


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("project_eps", [None, 0.05, 1e6], ids=["fgm", "pgd-projection-hit", "pgd-inside"])
@pytest.mark.parametrize("moved", [False, True], ids=["first-step", "later-step"])
def test_perturb_matches_torch(rng, dense, project_eps, moved):
    params, grads, rows, backups, n_backed, sumsq = perturb_case(rng, dense, moved)
    originals = clone_all(params)
    expected_params, expected_backups = clone_all(params), clone_all(backups)
    assert ext_ops.perturb(params, grads, rows, backups, n_backed, sumsq, 0.7, project_eps) is None
    torch_ops.perturb(expected_params, grads, rows, expected_backups, n_backed, sumsq, 0.7, project_eps)
    for i in range(len(params)):
        assert torch.equal(backups[i], expected_backups[i])  # NaN-free: every poisoned row was written, bit-exact
        assert_same(params[i], expected_params[i])
        untouched = torch.ones(params[i].shape[0], dtype=torch.bool)
        untouched[rows[i]] = False
        assert torch.equal(params[i][untouched], originals[i][untouched])
    if project_eps == 0.05:  # the ball is left: each update lies on its surface (bf16/fp16 rounding is coarser)
        for p, r, b in zip(params, rows, backups):
            if p.dtype == torch.float32:
                assert (p[r] - b).norm().item() == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("project_eps", [None, 0.1])
def test_perturb_leaves_a_tensor_alone_when_its_norm_is_unusable(rng, bad, project_eps):
    params, grads, rows, backups, n_backed, sumsq = perturb_case(rng, dense=False, moved=False)
    sumsq[1] = bad
    originals = clone_all(params)
    ext_ops.perturb(params, grads, rows, backups, n_backed, sumsq, 1.0, project_eps)
    assert torch.equal(params[1], originals[1])
    for i in range(len(params)):
        assert torch.equal(backups[i], originals[i][rows[i]])
    assert not torch.equal(params[0], originals[0])


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
    grad = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext_ops.scan([grad.double()], [torch.zeros(4, dtype=torch.bool)], [torch.zeros(4, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match="bool vector of 4 rows"):
        ext_ops.scan([grad], [torch.zeros(3, dtype=torch.bool)], [torch.zeros(4, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match="outside"):
        ext_ops.restore([grad], [torch.tensor([4])], [torch.zeros(1, 8)])


def test_supports():
    assert ext_ops.supports(CPU)
    assert ext_ops.supports(torch.device("cuda")) == ("cuda" in ext.load(cuda=torch.cuda.is_available()))


# ---- torch.compile ----


def test_opcheck():
    grads = [torch.randn(5, 8), torch.randn(1, 3).bfloat16()]
    touched = [torch.zeros(5, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]
    fresh = [torch.empty(5, dtype=torch.bool), torch.empty(1, dtype=torch.bool)]
    torch.library.opcheck(torch.ops.fastadv.scan.default, (grads, touched, fresh))
    params = [torch.randn(5, 8), torch.randn(1, 3).bfloat16()]
    rows = [torch.tensor([0, 3]), torch.tensor([0])]
    backups = [torch.empty(2, 8), torch.empty(1, 3, dtype=torch.bfloat16)]
    sumsq = torch.tensor([2.0, 3.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastadv.perturb.default, (params, grads, rows, backups, [0, 0], sumsq, 0.5, 0.1))
    torch.library.opcheck(torch.ops.fastadv.restore.default, (params, rows, backups))


def test_compiled_function_calling_the_ops():
    def attack(params, grads, touched, fresh, rows, backups):
        stats = ext_ops.scan(grads, touched, fresh)
        ext_ops.perturb(params, grads, rows, backups, [0], stats[:, 0], 1.0, 0.5)
        return stats

    def inputs() -> list[list[torch.Tensor]]:
        grad = torch.zeros(6, 4)
        grad[[1, 4]] = torch.arange(8.0).view(2, 4)
        params = torch.arange(24.0).view(6, 4)
        bools = [torch.zeros(6, dtype=torch.bool), torch.empty(6, dtype=torch.bool)]
        return [[params], [grad], [bools[0]], [bools[1]], [torch.tensor([1, 4])], [torch.empty(2, 4)]]

    eager, compiled = inputs(), inputs()
    expected = attack(*eager)
    actual = torch.compile(attack, backend="aot_eager", fullgraph=True)(*compiled)
    assert torch.equal(actual, expected)
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


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
@pytest.mark.skipif(ext.cuda_home() is None, reason="no CUDA toolkit (nvcc) found")
def test_cuda_build_compiles_links_and_imports():
    """A cold build takes 40 s to 3 min on two cores, a cached one a second; deselect with -k 'not cuda_build'."""
    result = subprocess.run(
        [sys.executable, "-m", "fastadv.ext", "build", "--cuda"],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "fastadv: cuda library loaded" in result.stdout
    assert "torch.ops.fastadv: scan, perturb, restore" in result.stdout

"""What only the C++/CUDA extension (backend="ext") has; its ops against the contract are in the table of
test_ops.py.

Its argument checks, sums that don't depend on the thread count, CUDA against CPU, tracing under torch.compile, the
build (CUDA included, when nvcc is here) and which GPUs it runs on, and the fallback without a compiler. Skipped with
the reason when the extension cannot be built here. The first run compiles it (about a minute on two cores; the CUDA
library, for four GPU generations without a GPU, about five more); later runs load the cached build. The CUDA sources
are also checked without a GPU: compiled with nvcc and read with cuobjdump.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from _helpers import assert_matches, input_step_args, make_tensors, nonzero_rows

from fastadv import ext

try:
    from fastadv.backends import ext_ops
except ImportError as err:  # no compiler, no ninja, or a failed build: the reason is in the message
    pytest.skip(f"the C++ extension is unavailable: {err}", allow_module_level=True)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# (rows, cols, dtype) of the tensors of one op call in the CUDA-against-CPU test: widths that are and aren't a multiple
# of the vector width, a one-row tensor (a 1-D parameter), and mixed dtypes in the same list.
LAYOUT = [
    (37, 19, torch.float32),
    (50, 64, torch.bfloat16),
    (1, 33, torch.float16),
    (23, 768, torch.float32),
    (9, 5, torch.bfloat16),
    (40, 48, torch.float16),
]


@pytest.fixture
def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the ops: argument checks, thread counts, CUDA against CPU ----


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
            fresh = [torch.empty(g.shape[0], dtype=torch.bool) for g in grads]
            results.append((ext_ops.scan(grads, touched, fresh, params), ext_ops.row_sumsq(grads, rows)))
            for per_token in (False, True):  # a group is one thread's whatever the count: its norm, its new values
                delta = torch.zeros(9, 40, 96).bfloat16()
                norms = ext_ops.input_step(
                    delta,
                    params[1][:360].view(9, 40, 200)[..., :96].contiguous(),
                    None,
                    0.1,
                    "l2",
                    per_token,
                    1e-6,
                    1e-8,
                    "l2",
                    0.05,
                )
                results.append((norms, delta))
    finally:
        torch.set_num_threads(threads)
    assert all(
        torch.equal(a, results[k % 3][0]) and torch.equal(b, results[k % 3][1]) for k, (a, b) in enumerate(results)
    )


INPUT_DEVICES = [CPU] + ([CUDA] if torch.cuda.is_available() and ext_ops.supports(CUDA) else [])


@pytest.mark.parametrize("device", INPUT_DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_input_step_bits_do_not_depend_on_the_split(rng, device, dtype):
    """Examples of several slices (CPU: 10 tokens of 768 fp32, 21 bf16; CUDA: 8), with a thread per example (one
    thread for the batch) or split between threads (an example alone, two threads), a block per slice on CUDA in grids
    of two sizes (the batch, an example alone): the same bits, for every norm and bound, with and without a mask; and
    the torch backend's results (fp32 tight, bf16 one ulp). 32 examples: a sum of the partials in another order
    changes the last bit of about one norm in five, so an order that depends on the split would show."""
    from fastadv.backends import torch_ops

    batch, tokens = 32, 45  # CPU: 5 slices (fp32), 3 (bf16), the last short; CUDA: 6
    delta = (0.1 * torch.randn(batch, tokens, 768, generator=rng)).to(device, dtype)
    grad = torch.randn(batch, tokens, 768, generator=rng).to(device, dtype)
    mask = (torch.arange(tokens) < torch.randint(1, tokens + 1, (batch, 1), generator=rng)).to(device)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    threads = torch.get_num_threads()
    try:
        for k, norm in enumerate(("l2", "inf", "sign")):
            for j, (bound, radius) in enumerate((("none", 0.0), ("l2", 2.0), ("inf", 0.12))):
                for m in [None, mask][(j + k) % 2 :]:  # a mask in every mode, none in every other one
                    args = (0.3, norm, False, 1e-6, 1e-3, bound, radius)
                    runs = []
                    for count, examples in [(1, slice(None))] + [(2, slice(b, b + 1)) for b in range(batch)]:
                        torch.set_num_threads(count)
                        out = delta[examples].clone()
                        norms = ext_ops.input_step(
                            out, grad[examples].contiguous(), None if m is None else m[examples], *args
                        )
                        runs.append((examples, out, norms))
                    _, out, norms = runs[0]
                    expected = delta.to(torch.float32, copy=True)
                    want = torch_ops.input_step(expected, grad.float(), m, *args)
                    torch.testing.assert_close(norms, want, rtol=1e-5, atol=0.0)
                    close = out
                    if dtype != torch.float32:  # where delta + step nearly cancels, a few fp32 ulps of its terms
                        terms = delta.float().abs() + (expected - delta.float()).abs()
                        cancelled = (out.float() - expected).abs() <= 4 * torch.finfo(torch.float32).eps * terms
                        close = torch.where(cancelled, expected.to(dtype), out)
                    assert_matches(close.cpu(), expected.cpu())
                    for examples, other, other_norms in runs[1:]:
                        assert torch.equal(other.view(bits), out[examples].view(bits)), (norm, bound, examples)
                        assert torch.equal(other_norms, norms[examples]), (norm, bound, examples)
    finally:
        torch.set_num_threads(threads)


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
        ext_ops.row_sumsq([grad], [torch.tensor([4])])
    with pytest.raises(RuntimeError, match="outside"):
        ext_ops.restore([grad], [torch.tensor([4])], backups)
    with pytest.raises(RuntimeError, match="scales must be a float32 vector of 1 values"):
        ext_ops.perturb([grad], [grad], rows, backups, [0], torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="n_backed"):
        ext_ops.measure([grad], [grad], rows, backups, [2], torch.ones(1))
    with pytest.raises(RuntimeError, match="delta_sumsq must be a float32 vector of 1 values"):
        ext_ops.project([grad], [grad], rows, backups, torch.ones(1), torch.ones(2), 0.1)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"delta": torch.zeros(2, 3, 8).double()}, "delta is Double; expected float32, bfloat16 or float16"),
        ({"delta": torch.zeros(6, 8)}, r"delta must be a contiguous \[B, T, D\] tensor"),
        ({"delta": torch.zeros(2, 8, 3).transpose(1, 2)}, r"delta must be a contiguous \[B, T, D\] tensor"),
        ({"grad": torch.zeros(2, 3, 8).bfloat16()}, "grad must be a contiguous tensor of delta's shape and dtype"),
        ({"grad": torch.zeros(2, 3, 9)}, "grad must be a contiguous tensor of delta's shape and dtype"),
        ({"grad": torch.zeros(2, 8, 3).transpose(1, 2)}, "grad must be a contiguous tensor of delta's shape and dtype"),
        ({"mask": torch.ones(2, 3)}, r"mask must be a bool \[B, T\] = \[2, 3\] tensor"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask must be a bool \[B, T\] = \[2, 3\] tensor"),
        ({"norm": "linf"}, 'norm must be "l2", "inf" or "sign", got "linf"'),
        ({"bound": "ball"}, 'bound must be "none", "l2" or "inf", got "ball"'),
        ({"lr": math.nan}, "lr must be finite"),
        ({"denom_eps": 0.0, "denom_floor": 0.0}, "denom_eps and denom_floor must be finite, >= 0 and not both 0"),
        ({"denom_eps": -1e-6}, "denom_eps and denom_floor must be finite, >= 0 and not both 0"),
        ({"denom_floor": math.inf}, "denom_eps and denom_floor must be finite, >= 0 and not both 0"),
        ({"radius": -0.5}, "radius must be finite and >= 0"),
        ({"radius": math.nan, "bound": "inf"}, "radius must be finite and >= 0"),
    ],
)
def test_input_step_rejects_bad_arguments(change, complaint):
    args = input_step_args()
    with pytest.raises(RuntimeError, match=complaint):
        ext_ops.input_step(**{**args, **change})
    # the denominators of a sign step and the radius of no bound are not used: not checked
    assert ext_ops.input_step(**{**args, "norm": "sign", "denom_eps": 0.0, "denom_floor": 0.0}).shape == (2,)
    assert ext_ops.input_step(**{**args, "bound": "none", "radius": math.nan}).shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available() or not ext_ops.supports(CUDA), reason="no GPU")
@pytest.mark.parametrize("density", [0.35, 1.0], ids=["sparse", "dense"])
def test_cuda_matches_cpu(seed, density):
    """Every op from the same inputs on both devices (backed-up rows that moved since, a zero scale): flags and
    backups bit for bit, sums to rtol 1e-5, weights within one ulp (rounded once from fp32 values that may differ in
    the last bit)."""
    params, grads = make_tensors(LAYOUT, CPU, density)
    rows = [nonzero_rows(g) for g in grads]
    n_backed = [len(r) // 2 for r in rows]
    backups = [torch.full((len(r), p.shape[1]), math.nan, dtype=p.dtype) for p, r in zip(params, rows)]
    for p, r, b, n in zip(params, rows, backups, n_backed):
        b[:n] = p[r[:n]]
        p[r[:n]] += (0.05 * torch.randn(n, p.shape[1])).to(p.dtype)
    scales = 0.02 + 0.2 * torch.rand(len(grads))
    scales[4] = 0.0
    touched = [torch.rand(g.shape[0]) < 0.4 for g in grads]

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
    cpu, gpu = run(CPU), run(CUDA)
    assert torch.equal(cpu[0][:, 1], gpu[0][:, 1])
    for a, e in zip(gpu[:3], cpu[:3]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=0)
    for a, e in zip(gpu[3 : 3 + 3 * n], cpu[3 : 3 + 3 * n]):  # fresh flags and backups
        assert torch.equal(a, e)
    for a, e in zip(gpu[3 + 3 * n :], cpu[3 + 3 * n :]):  # weights after project, and after the boxed step
        assert_matches(a, e)


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
    delta, grad = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.library.opcheck(ops.input_step.default, (delta, grad, mask, 0.1, "l2", False, 1e-6, 1e-8, "l2", 0.5))
    torch.library.opcheck(
        ops.input_step.default, (delta.bfloat16(), grad.bfloat16(), None, 0.1, "inf", True, 0.0, 1e-8, "inf", 0.05)
    )
    torch.library.opcheck(ops.input_step.default, (delta, grad, mask, 0.1, "sign", True, 1e-6, 1e-8, "none", 0.0))


def test_compiled_function_calling_the_ops():
    def attack(params, grads, touched, fresh, rows, backups, delta):
        input_norms = ext_ops.input_step(
            delta[0], grads[0].view(1, 6, 4), None, 0.1, "l2", False, 1e-6, 1e-8, "l2", 0.5
        )
        stats = ext_ops.scan(grads, touched, fresh, params)
        scales = (1.0 / stats[:, 0].sqrt()).float()
        delta_sumsq = ext_ops.measure(params, grads, rows, backups, [0], scales)
        ext_ops.project(params, grads, rows, backups, scales, delta_sumsq, 0.5)
        ext_ops.perturb(params, grads, rows, backups, [2], scales, box_eps=0.01)
        return stats, delta_sumsq, ext_ops.row_sumsq(params, rows), input_norms

    def inputs() -> list[list[torch.Tensor]]:
        grad = torch.zeros(6, 4)
        grad[[1, 4]] = torch.arange(8.0).view(2, 4)
        params = torch.arange(24.0).view(6, 4)
        bools = [torch.zeros(6, dtype=torch.bool), torch.empty(6, dtype=torch.bool)]
        return [
            [params],
            [grad],
            [bools[0]],
            [bools[1]],
            [torch.tensor([1, 4])],
            [torch.empty(2, 4)],
            [torch.linspace(-1, 1, 24).view(1, 6, 4)],
        ]

    eager, compiled = inputs(), inputs()
    expected = attack(*eager)
    actual = torch.compile(attack, backend="aot_eager", fullgraph=True)(*compiled)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    for a, b in zip(eager, compiled):
        assert torch.equal(a[0], b[0])


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
    """The batched loads (kUnroll packs per lane and input) are not spilled: no stack frame, no local memory (ptxas -v
    on sm_90: input_step 122-128 registers, no spill)."""
    usage = run_tool(cuobjdump, "--dump-resource-usage", cuda_library)
    kernels = re.findall(
        r"Function (\S*(?:scan|perturb|restore|input_step)_kernel\S*):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
        usage,
    )
    assert len(kernels) >= 12  # four kernels times three dtypes, per architecture
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
    (gradient and parameter) and input_step (delta and gradient), 12 for perturb (W, G, B). One pack per input was in
    flight before (two for scan)."""
    sass = run_tool(cuobjdump, "-sass", cuda_library)
    inputs = {"restore": 1, "scan": 2, "input_step": 2, "perturb": 3}
    seen = 0
    for name, code in re.findall(r"Function : (\S+)(.*?)(?=Function : |\Z)", sass, re.S):
        kernel = re.search(r"(scan|perturb|restore|input_step)_kernel", name)
        if kernel:
            seen += 1
            assert loads_in_flight(code) >= 4 * inputs[kernel[1]], name
    assert seen >= 12


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


def test_a_build_reports_its_progress(tmp_path, capsys):
    """The first build takes minutes: while it runs, a line with the time so far and the sources compiled."""
    from fastadv import ext

    with ext._progress(tmp_path, 3, every=0.01):
        (tmp_path / "ops.o").touch()
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("fastadv: still compiling (") for line in lines)
    assert lines[-1].endswith("1 of 3 sources compiled)")

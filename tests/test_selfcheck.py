"""The runtime self-check (fastadv.selfcheck): the compiled backends pass it here, and injected faults are caught.

Faults are injected into a fake backend (the torch backend's ops with one replaced: fast, and independent of what
compiled backends this machine has) and into the real compiled backend modules.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from _helpers import BACKENDS, DEVICE

try:
    import triton
except ImportError:
    triton = None

import fastadv.backends
from fastadv import selfcheck
from fastadv.backends import _registry, contract, torch_ops

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COMPILED = [name for name in BACKENDS if name != "torch"]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("FASTADV_SELFCHECK", raising=False)
    selfcheck.cache_clear()
    yield
    selfcheck.cache_clear()


def nudged(t: torch.Tensor, row: int) -> None:
    """Move one element of ``t[row]`` well past the tolerance: 2 ulps in bf16/fp16, 1e-3 relative in fp32."""
    if t.dtype == torch.float32:
        t[row, 0] *= 1.001
    else:
        t.view(torch.int16)[row, 0] += 2


# The faults, each with the op and what the description must say.
def wrong_weights(real):
    def op(params, grads, rows, *args):
        real(params, grads, rows, *args)
        nudged(params[0], int(rows[0][0]))

    return op


def skipped_backups(real):
    def op(params, grads, rows, backups, *args):
        real(params, grads, rows, [b.clone() for b in backups], *args)  # the backups written elsewhere

    return op


def writes_weights(real):
    def op(params, grads, rows, backups, n_backed, scales):
        out = real(params, grads, rows, backups, n_backed, scales)
        params[2].add_(1.0)
        return out

    return op


def skipped_fresh(real):
    def op(grads, touched, fresh, params=None):
        return real(grads, touched, [torch.empty_like(f) for f in fresh], params)

    return op


def wrong_sums(real):
    def op(tensors, rows):
        return real(tensors, rows) * (1 + 1e-4)

    return op


def float32_sums(real):
    def op(tensors, rows):
        return real(tensors, rows).float()

    return op


def no_restore(real):
    def op(params, rows, backups):
        return None

    return op


def wrong_projection(real):
    def op(params, grads, rows, backups, scales, delta_sumsq, eps):
        real(params, grads, rows, backups, scales, delta_sumsq, eps * 0.9)

    return op


def wrong_delta(real):
    def op(delta, *args):
        norms = real(delta, *args)
        nudged(delta, 0)
        return norms

    return op


def wrong_norms(real):
    def op(*args):
        return real(*args) * (1 + 1e-4)

    return op


def aligned(t: torch.Tensor) -> bool:
    """Rows the compiled kernels read in 16-byte vectors (the case's 768- and 1024-wide tensors)."""
    return t.shape[-1] % 16 == 0


def first_aligned(tensors: list[torch.Tensor]) -> int:
    return next(i for i, t in enumerate(tensors) if aligned(t))


# Faults of a vector path only: the odd tensors come out right, the first aligned one (tensor 3) does not.
def wrong_aligned_weights(real):
    def op(params, grads, rows, *args):
        real(params, grads, rows, *args)
        i = first_aligned(params)
        nudged(params[i], int(rows[i][0]))

    return op


def wrong_aligned_restore(real):
    def op(params, rows, backups):
        real(params, rows, backups)
        i = first_aligned(params)
        nudged(params[i], int(rows[i][0]))

    return op


def wrong_aligned_fresh(real):
    def op(grads, touched, fresh, params=None):
        stats = real(grads, touched, fresh, params)
        fresh[first_aligned(grads)][0] ^= True
        return stats

    return op


def wrong_aligned_sums(real):
    def op(tensors, rows):
        sums = real(tensors, rows)
        sums[first_aligned(tensors)] *= 1 + 1e-4
        return sums

    return op


def wrong_param_sums(real):
    """Right without weights (FGM, PGD), wrong with them (AWP's scan)."""

    def op(grads, touched, fresh, params=None):
        stats = real(grads, touched, fresh, params)
        if params is not None:
            stats[:, 2] *= 1 + 1e-4
        return stats

    return op


FAULTS = [
    ("perturb", wrong_weights, "perturb: weights of tensor 0 (7x5) differ by up to"),
    ("perturb", skipped_backups, "perturb: backups of tensor 0 (7x5) differ"),
    ("measure", writes_weights, "measure: weights (measure must not write them) of tensor 2 (4x9) differ"),
    ("scan", skipped_fresh, "scan: fresh flags of tensor 0 (7x5) differ"),
    ("row_sumsq", wrong_sums, "row_sumsq: sums of squares differ by up to"),
    ("row_sumsq", float32_sums, "row_sumsq: sums of squares are torch.float32"),
    ("project", wrong_projection, "project: weights of tensor 0 (7x5) differ by up to"),
    ("restore", no_restore, "restore: weights of tensor 0 (7x5) differ"),
    ("input_step", wrong_delta, "input_step: delta (l2 per example, none bound, no mask, 2x9x768) differ by up to"),
    ("input_step", wrong_norms, "input_step: gradient norms (l2 per example, none bound, no mask, 2x9x768) differ"),
    ("perturb", wrong_aligned_weights, "perturb: weights of tensor 3 (6x1024) differ by up to"),
    ("project", wrong_aligned_weights, "project: weights of tensor 3 (6x1024) differ by up to"),
    ("restore", wrong_aligned_restore, "restore: weights of tensor 3 (6x1024) differ"),
    ("scan", wrong_aligned_fresh, "scan: fresh flags of tensor 3 (6x1024) differ"),
    ("row_sumsq", wrong_aligned_sums, "row_sumsq: sums of squares differ by up to"),
    ("scan", wrong_param_sums, "scan(params): sums of squares differ by up to"),
]


def fake_backend(**ops) -> types.ModuleType:
    """A loaded backend whose module has the torch backend's functions, some replaced (None: removed)."""
    module = types.ModuleType("fake_ops")
    for name in (*contract.OPS, "supports"):
        setattr(module, name, getattr(torch_ops, name))
    for name, function in ops.items():
        if function is None:
            delattr(module, name)
        else:
            setattr(module, name, function)
    return _registry.complete(module)


def resolving(monkeypatch, backend: types.ModuleType) -> None:
    """check() and main() resolve the name "fake" to ``backend``."""
    real_resolve = _registry.resolve_backend

    def resolve(name, device):
        return backend if name == "fake" else real_resolve(name, device)

    monkeypatch.setattr(_registry, "resolve_backend", resolve)


@pytest.fixture
def fake(monkeypatch):
    """A backend named "fake": the torch backend's ops, all native, resolved by check() like a real one; patch its
    ops."""
    backend = fake_backend()
    resolving(monkeypatch, backend)
    return backend


def where(name: str) -> torch.device:
    """The CPU where the backend runs there (ext; triton under the interpreter), else the GPU."""
    return CPU if _on_cpu(name) else DEVICE


def _on_cpu(name: str) -> bool:
    try:
        fastadv.backends.resolve_backend(name, CPU)
    except RuntimeError:
        return False
    return True


def raising(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")


# ------------------------------------------------------------------------------------------------ the real backends


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["torch", *COMPILED])
def test_backends_pass(name, dtype):
    assert selfcheck.check(name, where(name), dtype) is None


@pytest.mark.parametrize("name", COMPILED)
def test_mismatch_in_a_compiled_backend_is_caught(name, monkeypatch):
    device = where(name)
    module = fastadv.backends.resolve_backend(name, device)
    monkeypatch.setattr(module, "perturb", wrong_weights(module.perturb))
    failure = selfcheck.check(name, device, torch.bfloat16)
    assert failure == "perturb: weights of tensor 0 (7x5) differ by up to 2 ulps"
    with pytest.warns(RuntimeWarning) as record:
        assert not selfcheck.passed(name, device, torch.bfloat16)
        assert not selfcheck.passed(name, device, torch.bfloat16)
    assert len(record) == 1
    message = str(record[0].message)
    for part in (repr(name), "perturb", device.type, "bfloat16", "torch backend for the rest of this process"):
        assert part in message


@pytest.mark.parametrize("name", COMPILED)
def test_exception_in_a_compiled_backend_is_caught(name, monkeypatch):
    device = where(name)
    module = fastadv.backends.resolve_backend(name, device)
    monkeypatch.setattr(module, "measure", raising)
    expected = "measure raised RuntimeError: CUDA error: no kernel image is available for execution on the device"
    assert selfcheck.check(name, device, torch.float16) == expected
    with pytest.warns(RuntimeWarning, match="measure raised RuntimeError"):
        assert not selfcheck.passed(name, device, torch.float16)


# ------------------------------------------------------------------------------------------------ injected faults


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, fault, expected", FAULTS, ids=[f"{op}-{fault.__name__}" for op, fault, _ in FAULTS])
def test_fault_is_named(fake, op, fault, expected, dtype):
    setattr(fake, op, fault(getattr(torch_ops, op)))
    failure = selfcheck.check("fake", CPU, dtype)
    assert failure is not None and failure.startswith(expected), failure


INPUT_MODES = [
    (norm, bound, per_token, masked, shape)
    for per_token in (False, True)
    for shape in selfcheck._INPUT_SHAPES[per_token]
    for masked in (False, True)
    for norm in selfcheck._NORMS
    for bound in selfcheck._BOUNDS
]


@pytest.mark.parametrize(
    ("norm", "bound", "per_token", "masked", "shape"),
    INPUT_MODES,
    ids=["-".join(map(str, mode)) for mode in INPUT_MODES],
)
def test_every_input_step_mode_is_checked(fake, norm, bound, per_token, masked, shape):
    """A fault in one mode of input_step at one shape only (a wrong kernel specialisation) is caught, and named."""

    def op(delta, grad, mask, lr, norm_, per_token_, denom_eps, denom_floor, bound_, radius):
        norms = torch_ops.input_step(delta, grad, mask, lr, norm_, per_token_, denom_eps, denom_floor, bound_, radius)
        if (norm_, bound_, per_token_, mask is not None, tuple(delta.shape)) == (norm, bound, per_token, masked, shape):
            last = delta.view(-1)[-1:]
            last += 0.01 + 0.05 * last.abs()  # a few ulps at any magnitude
        return norms

    fake.input_step = op
    what = (
        f"{norm} per {'token' if per_token else 'example'}, {bound} bound, {'masked' if masked else 'no mask'},"
        f" {'x'.join(map(str, shape))}"
    )
    assert selfcheck.check("fake", CPU, torch.bfloat16).startswith(f"input_step: delta ({what}) differ by up to")


def test_the_case_reaches_the_vector_and_split_paths():
    """What the compiled kernels specialise on, in the case: rows of 16-byte vectors (Triton's hint, the extension's
    packs) and odd rows, for every dtype; per-example input_step of several slices on every GPU backend (Triton's
    tile rows, 8 tokens per CUDA block) and of one slice; aligned and odd per-token rows."""
    aligned_rows = [(r, c) for r, c in selfcheck._SHAPES if aligned(torch.empty(0, c))]
    assert aligned_rows and len(aligned_rows) < len(selfcheck._SHAPES)
    assert any(c >= 4 * 32 * 4 for _, c in aligned_rows)  # a full CUDA batch of fp32 packs: 4 per lane
    for per_token, shapes in selfcheck._INPUT_SHAPES.items():
        assert {aligned(torch.empty(0, d)) for _, _, d in shapes} == {True, False}
        if not per_token:
            tokens = {aligned(torch.empty(0, d)): t for _, t, d in shapes}
            assert tokens[True] > 8 >= tokens[False]  # CUDA: split, and one block per example
    if triton is None:
        return
    from fastadv.kernels._common import col_block, row_block, vec_hint

    for dtype in DTYPES:
        hints = {vec_hint([torch.empty(0, c, dtype=dtype)], [c]) for _, c in selfcheck._SHAPES}
        assert hints == {1, 16 // torch.empty(0, dtype=dtype).element_size()}
    for _, t, d in selfcheck._INPUT_SHAPES[False]:
        slices = triton.cdiv(t, row_block(col_block([d]), t))
        assert (slices > 1) == aligned(torch.empty(0, d))


@pytest.mark.parametrize("op", contract.OPS)
def test_exception_is_described_not_raised(fake, op):
    setattr(fake, op, raising)
    failure = selfcheck.check("fake", CPU, torch.float32)
    assert failure.startswith(f"{op} raised RuntimeError: CUDA error: no kernel image")
    assert "more detail" not in failure  # the first line only


def test_only_native_ops_are_checked(monkeypatch):
    """An op that the backend's module lacks is the torch backend's, the reference: its case does not run."""
    backend = fake_backend(restore=None)
    resolving(monkeypatch, backend)
    ran = []
    for op, case in selfcheck._CASES.items():
        monkeypatch.setitem(selfcheck._CASES, op, lambda ops, c, op=op, case=case: (ran.append(op), case(ops, c)))
    assert backend.restore is torch_ops.restore and "restore" not in backend.native
    assert selfcheck.check("fake", CPU, torch.float32) is None
    assert ran == [op for op in contract.OPS if op != "restore"]


def test_a_native_op_without_a_case_fails(fake, monkeypatch):
    """A backend's own op that the self-check has no case for is not trusted; the torch backend, the reference, has
    nothing to compare it with."""
    monkeypatch.delitem(selfcheck._CASES, "restore")
    assert selfcheck.check("fake", CPU, torch.float32) == "restore: has no self-check case"
    assert selfcheck.check("torch", CPU, torch.float32) is None


def test_a_backend_that_cannot_load_is_described(monkeypatch):
    def resolve(name, device):
        raise RuntimeError(f"backend {name!r} does not run on {device} tensors")

    monkeypatch.setattr(_registry, "resolve_backend", resolve)
    expected = "load raised RuntimeError: backend 'ext' does not run on cpu tensors"
    assert selfcheck.check("ext", CPU, torch.float32) == expected


def test_an_unsupported_dtype_is_described(fake):
    fake.supports = lambda device, dtype=None, grad_dtype=None: dtype != torch.float16
    assert selfcheck.check("fake", CPU, torch.float32) is None
    assert selfcheck.check("fake", CPU, torch.float16) == "load: 'fake' does not support torch.float16 on cpu"


def test_the_passing_fake_passes(fake):
    for dtype in DTYPES:
        assert selfcheck.check("fake", CPU, dtype) is None


# ------------------------------------------------------------------------------------------------ the gate


def count_checks(monkeypatch) -> list[tuple]:
    calls = []
    real = selfcheck.check

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(selfcheck, "check", counting)
    return calls


def test_passed_warns_once_per_key_and_caches(fake, monkeypatch):
    fake.perturb = wrong_weights(torch_ops.perturb)
    calls = count_checks(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not selfcheck.passed("fake", CPU, torch.bfloat16)
            assert not selfcheck.passed("fake", "cpu", torch.bfloat16)
        assert not selfcheck.passed("fake", CPU, torch.float16)  # another key: checked and warned separately
    assert len(calls) == 2
    assert [w.category for w in record] == [RuntimeWarning, RuntimeWarning]
    assert "bfloat16" in str(record[0].message) and "float16" in str(record[1].message)
    expected = "'fake' backend failed its self-check on cpu bfloat16 (perturb: weights of tensor 0 (7x5) differ"
    assert expected in str(record[0].message)

    selfcheck.cache_clear()  # a fresh cache checks (and warns) again
    with pytest.warns(RuntimeWarning):
        assert not selfcheck.passed("fake", CPU, torch.bfloat16)
    assert len(calls) == 3


def test_passed_caches_a_pass_without_warning(fake, monkeypatch):
    calls = count_checks(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(selfcheck.passed("fake", CPU, torch.float32) for _ in range(3))
    assert len(calls) == 1


def test_disabled_by_environment(fake, monkeypatch):
    fake.perturb = raising
    calls = count_checks(monkeypatch)
    monkeypatch.setenv("FASTADV_SELFCHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.passed("fake", CPU, torch.float32)
    assert calls == []
    monkeypatch.setenv("FASTADV_SELFCHECK", "1")  # nothing was cached while off
    with pytest.warns(RuntimeWarning):
        assert not selfcheck.passed("fake", CPU, torch.float32)


def test_no_check_inside_a_cuda_graph_capture(fake, monkeypatch):
    """A check syncs with the host, which would break a capture: while capturing, a key not checked yet answers True
    and stays unchecked; the first call outside the capture checks, and its warning says the graph must be captured
    again. A key already checked keeps its answer inside a capture."""
    fake.perturb = wrong_weights(torch_ops.perturb)
    calls = count_checks(monkeypatch)
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.passed("fake", CPU, torch.bfloat16)
        assert selfcheck.passed("fake", CPU, torch.bfloat16)
    assert calls == []
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: False)
    with pytest.warns(RuntimeWarning, match="CUDA graphs captured before this check still run its kernels"):
        assert not selfcheck.passed("fake", CPU, torch.bfloat16)
    assert len(calls) == 1
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: True)
    assert not selfcheck.passed("fake", CPU, torch.bfloat16)  # cached: no check, no warning
    assert len(calls) == 1


def test_a_key_first_used_outside_a_capture_warns_without_the_graph_advice(fake, monkeypatch):
    fake.perturb = wrong_weights(torch_ops.perturb)
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: False)
    with pytest.warns(RuntimeWarning) as record:
        assert not selfcheck.passed("fake", CPU, torch.float16)
    assert "CUDA graphs" not in str(record[0].message)


def test_capturing_is_asked_of_the_device_stream(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not selfcheck._capturing(CPU)
    assert selfcheck._capturing(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not selfcheck._capturing(torch.device("cuda", 0))


def test_torch_always_passes(monkeypatch):
    calls = count_checks(monkeypatch)
    assert all(selfcheck.passed("torch", CPU, dtype) for dtype in DTYPES)
    assert calls == []


def test_resolution_that_consults_the_gate_does_not_recurse(fake, monkeypatch):
    """As wired into backend resolution: a resolve_backend that asks passed() while check() loads the backend."""

    def resolve(name, device):
        assert selfcheck.passed(name, device, torch.float32)  # answered True while the check runs
        return fake

    monkeypatch.setattr(_registry, "resolve_backend", resolve)
    calls = count_checks(monkeypatch)
    assert selfcheck.passed("fake", CPU, torch.float32)
    assert len(calls) == 1


def test_callers_state_is_left_alone(fake):
    """No global RNG draw, and it runs inside inference_mode, no_grad or deterministic mode alike."""
    rng = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.inference_mode():
        assert selfcheck.check("fake", CPU, torch.bfloat16) is None
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            assert selfcheck.check("fake", CPU, torch.float16) is None
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------------------------------ the command line


def test_main_prints_a_table(capsys, monkeypatch):
    """Every available compiled backend on every device and dtype (the checks themselves: test_backends_pass)."""
    calls = []
    monkeypatch.setattr(selfcheck, "check", lambda *args: calls.append(args))
    assert selfcheck.main([]) == 0
    assert {(name, dtype) for name, _, dtype in calls} == {(name, dtype) for name in COMPILED for dtype in DTYPES}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["backend", "device", "dtype", "result", "time"]
    body = [line.split() for line in lines[1:] if not line.startswith(("not run", "not checked", "no compiled"))]
    assert all(len(row) == 5 and row[3] == "ok" and row[4].endswith("s") for row in body), body
    assert {(row[0], row[2]) for row in body} == {
        (name, str(dtype).removeprefix("torch.")) for name in COMPILED for dtype in DTYPES
    }


def test_main_names_the_ops_taken_from_torch(monkeypatch, capsys):
    resolving(monkeypatch, fake_backend(backup=None, restore=None))
    monkeypatch.setattr(selfcheck, "check", lambda *args: None)
    assert selfcheck.main(["fake"]) == 0
    assert "not checked: backup, restore of fake (the torch backend's)" in capsys.readouterr().out.splitlines()


def test_main_fails_on_a_failure(fake, capsys):
    fake.restore = no_restore(torch_ops.restore)
    assert selfcheck.main(["fake"]) == 1
    out = capsys.readouterr().out
    assert out.count("restore: weights of tensor 0 (7x5) differ") == 3


def test_a_failing_reference_is_a_failure_not_an_exception(fake, monkeypatch):
    monkeypatch.setattr(torch_ops, "measure", raising)  # the reference, not the fake's own measure
    failure = selfcheck.check("fake", CPU, torch.float32)
    assert failure.startswith("measure: the check itself raised RuntimeError: CUDA error")
    with pytest.warns(RuntimeWarning, match="measure: the check itself raised"):
        assert not selfcheck.passed("fake", CPU, torch.float32)

"""The backend contract (:class:`fastadv.backends.contract.Backend`): every backend module has every op with its
signature; the ``torch.library`` ops of the compiled backends have the schemas the contract implies, fake kernels that
pass ``torch.library.opcheck``, and trace under ``torch.compile``.

The Triton ops run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py without a GPU).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import types
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from _helpers import BACKENDS, DEVICE

from fastadv import selfcheck
from fastadv.backends import _library, _registry, backend_for, contract, resolve_backend, torch_ops

if TYPE_CHECKING:  # what a type checker sees; the test below checks the same at run time, every backend included
    _: contract.Backend = torch_ops

F32, BF16 = torch.float32, torch.bfloat16


def backend_module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(f"fastadv.backends.{name}_ops")
    except ImportError as err:  # triton missing, or the extension can't be built here: the reason is in the message
        pytest.skip(f"the {name} backend is unavailable: {err}")


DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

#: The ``torch.library`` namespace of each compiled backend's ops (importing the module registers them).
NAMESPACES = {"triton": "fastadv_triton", "ext": "fastadv"}


def runnable(name: str) -> types.ModuleType:
    module = backend_module(name)
    if not module.supports(DEVICE):
        pytest.skip(f"the {name} backend does not run on {DEVICE} here")
    return module


# ---- every backend module against the Protocol ----


@pytest.mark.parametrize("name", ["torch", "triton", "ext"])
def test_backend_modules_conform(name):
    """The torch backend's module has every op; a compiled backend's every required one (the others are the torch
    backend's: the loaded backend has every op)."""
    assert contract.mismatches(backend_module(name), compiled=name != "torch") == []
    assert contract.mismatches(_registry.load(name)) == []


def test_traced_entry_points_conform():
    """What torch.compile traces into on the triton backend (the wrappers over ``torch.ops.fastadv_triton``)."""
    backend_module("triton")
    traced = types.ModuleType("traced")
    vars(traced).update(_library.calls("fastadv_triton", _registry.load("triton").native), supports=torch_ops.supports)
    assert contract.mismatches(traced, compiled=True) == []


def test_entry_points_convert_what_the_schemas_take():
    """The generated entry points pass ints, floats and bools of other types (numpy's, tensors') as Python's."""
    received = []
    perturb = _library._entry_point("perturb", lambda *args: received.append(args))
    input_step = _library._entry_point("input_step", lambda *args: received.append(args))
    lists = ([], [], [], [])
    assert perturb(*lists, np.array([3, 1]), "scales", box_eps=np.float32(0.5)) is None
    perturb(*lists, [np.int64(2)], "scales")
    input_step("delta", "grad", None, torch.tensor(0.25), "l2", np.bool_(True), 1, 0, "inf", np.float64(2.0))
    assert received == [
        (*lists, [3, 1], "scales", 0.5),
        (*lists, [2], "scales", None),
        ("delta", "grad", None, 0.25, "l2", True, 1.0, 0.0, "inf", 2.0),
    ]
    assert [type(v) for v in received[0][4:] + received[2][3:]] == [
        list,
        str,
        float,
        float,
        str,
        bool,
        float,
        float,
        str,
        float,
    ]
    assert type(received[1][4][0]) is int


def imitation(**changes: object) -> types.ModuleType:
    """A module with torch_ops's functions, some replaced (None: removed)."""
    module = types.ModuleType("imitation")
    vars(module).update({name: getattr(torch_ops, name) for name in (*contract.OPS, "supports")})
    for op, function in changes.items():
        if function is None:
            delattr(module, op)
        else:
            setattr(module, op, function)
    return module


def _renamed(params: list[torch.Tensor], idx: list[torch.Tensor], backups: list[torch.Tensor]) -> None: ...


def _reordered(rows: list[torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor: ...


def _no_default(
    grads: list[torch.Tensor], touched: list[torch.Tensor], fresh: list[torch.Tensor], params: list[torch.Tensor] | None
) -> torch.Tensor: ...


def _untyped(params, rows, backups): ...


def _retyped(params: list[torch.Tensor], rows: list[torch.Tensor], backups: list[torch.Tensor]) -> torch.Tensor: ...


@pytest.mark.parametrize(
    ("op", "function", "complaint"),
    [
        pytest.param("perturb", None, "imitation has no perturb()", id="missing"),
        pytest.param("supports", None, "imitation has no supports()", id="no-supports"),
        pytest.param("restore", _renamed, "does not take the parameters of restore", id="renamed"),
        pytest.param("row_sumsq", _reordered, "does not take the parameters of row_sumsq", id="reordered"),
        pytest.param("scan", _no_default, "does not take the parameters of scan", id="no-default"),
        pytest.param("restore", _untyped, "is not typed as restore", id="untyped"),
        pytest.param("restore", _retyped, "is not typed as restore", id="returns-a-tensor"),
    ],
)
def test_mismatches_name_what_departs(op, function, complaint):
    assert contract.mismatches(imitation()) == []
    found = contract.mismatches(imitation(**{op: function}))
    assert len(found) == 1 and complaint in found[0], found


def test_a_compiled_backend_may_lack_only_the_ops_not_required():
    assert not contract.OPS["backup"].required and contract.OPS["perturb"].required
    assert contract.mismatches(imitation(backup=None), compiled=True) == []
    assert contract.mismatches(imitation(backup=None)) == ["imitation has no backup()"]
    assert contract.mismatches(imitation(perturb=None), compiled=True) == ["imitation has no perturb()"]


# ---- the torch.library ops ----


@pytest.mark.parametrize("name", ["triton", "ext"])
def test_library_schemas_are_the_contract(name):
    """The Triton ops' schemas come from the contract; the extension's are written in csrc/registration.cpp."""
    backend_module(name)
    ops = getattr(torch.ops, NAMESPACES[name])
    native = _registry.load(name).native
    assert native == {op for op in contract.OPS if hasattr(ops, op)}  # an op of the namespace is native, and only those
    for op in native:
        assert str(getattr(ops, op).default._schema) == f"{ops.name}::{op}{_library.schema(op)}"


def test_eager_triton_calls_skip_the_dispatcher():
    from fastadv.kernels import perturb, scan

    triton_ops = backend_module("triton")
    assert triton_ops.scan.__wrapped__ is scan.scan
    assert triton_ops.measure.__wrapped__ is perturb.measure


def opcheck_cases() -> list[tuple[str, tuple]]:
    """(op, arguments): two tensors of two dtypes, one of them a single row, rows backed up or not; backups that are
    not the rows' weights, so that each write shows (opcheck checks that only the declared lists change)."""
    grads = [torch.randn(5, 8, device=DEVICE), torch.randn(1, 3, device=DEVICE).to(BF16)]
    params = [torch.randn(5, 8, device=DEVICE), torch.randn(1, 3, device=DEVICE).to(BF16)]
    touched = [torch.zeros(len(g), dtype=torch.bool, device=DEVICE) for g in grads]
    fresh = [torch.empty(len(g), dtype=torch.bool, device=DEVICE) for g in grads]
    rows = [torch.tensor([0, 3], device=DEVICE), torch.tensor([0], device=DEVICE)]
    backups = [torch.randn(len(r), p.shape[1], device=DEVICE).to(p.dtype) for p, r in zip(params, rows)]  # not W
    scales, delta_sumsq = torch.tensor([0.5, 0.25], device=DEVICE), torch.tensor([0.1, 4.0], device=DEVICE)
    lists = (params, grads, rows, backups)
    # input_step: one [B, T, D] perturbation, a padded mask or none; a radius that the "l2" bound hits
    delta, delta_grad = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE)
    mask = torch.tensor([[True, True, False], [True, False, False]], device=DEVICE)
    return [
        ("scan", (grads, touched, fresh)),
        ("scan", (grads, touched, fresh, params)),
        ("row_sumsq", (params, rows)),
        ("perturb", (*lists, [0, 0], scales)),
        ("perturb", (*lists, [1, 1], scales, 0.01)),
        ("measure", (*lists, [0, 1], scales)),
        ("project", (*lists, scales, delta_sumsq, 0.5)),
        ("restore", (params, rows, backups)),
        ("input_step", (delta, delta_grad, mask, 0.1, "l2", False, 1e-6, 1e-8, "l2", 0.5)),
        ("input_step", (delta.to(BF16), delta_grad.to(BF16), None, 0.1, "inf", True, 0.0, 1e-8, "inf", 0.05)),
        ("input_step", (delta, delta_grad, mask, 0.1, "sign", True, 1e-6, 1e-8, "none", 0.0)),
    ]


def test_triton_opcheck(seed):
    """Schema (mutations), fake kernels, and tracing through AOT autograd with dynamic shapes, of every Triton op.
    (test_ext.py runs the same checks on the extension's ops.)"""
    runnable("triton")
    ops = torch.ops.fastadv_triton
    assert {op for op, _ in opcheck_cases()} == _registry.load("triton").native
    for op, args in opcheck_cases():
        torch.library.opcheck(getattr(ops, op).default, args)


def test_compiled_triton_attack_is_one_graph_of_the_ops(seed):
    """A compiled function calling every Triton op: one graph (``fullgraph``) of the ``torch.ops.fastadv_triton`` ops,
    their shapes from the fake kernels, with the eager results and writes. (test_ext.py compiles the extension's.)"""
    triton_ops = runnable("triton")
    graphs: list[torch.fx.GraphModule] = []

    def recording(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return torch._dynamo.backends.debugging.aot_eager(graph, example_inputs)

    def step(params, grads, rows, backups, touched, fresh, delta):
        norms_in = triton_ops.input_step(delta, grads[0].view(1, 7, 4), None, 0.1, "l2", False, 1e-6, 1e-8, "l2", 0.5)
        stats = triton_ops.scan(grads, touched, fresh, params=params)
        scales = stats[:, 0].rsqrt().float()
        norms = triton_ops.measure(params, grads, rows, backups, [0, 0], scales)
        triton_ops.project(params, grads, rows, backups, scales, norms, eps=0.25)
        triton_ops.perturb(params, grads, rows, backups, [len(r) for r in rows], scales, box_eps=0.05)
        sums = triton_ops.row_sumsq(params, rows)
        moved = [p.clone() for p in params]
        triton_ops.restore(params, rows, backups)
        return stats, norms, sums, moved, norms_in

    shapes = [(7, 4, F32), (3, 9, BF16)]
    grads = [torch.randn(n, m, device=DEVICE).to(dtype) for n, m, dtype in shapes]
    grads[0][::2] = 0
    start = [torch.randn(n, m, device=DEVICE).to(dtype) for n, m, dtype in shapes]
    rows = [torch.tensor([5, 1, 3], device=DEVICE), torch.tensor([2], device=DEVICE)]
    delta = torch.randn(1, 7, 4, device=DEVICE)

    def arguments() -> tuple:
        return (
            [p.clone() for p in start],
            grads,
            rows,
            [torch.empty(len(r), p.shape[1], dtype=p.dtype, device=DEVICE) for p, r in zip(start, rows)],
            [torch.zeros(len(g), dtype=torch.bool, device=DEVICE) for g in grads],
            [torch.empty(len(g), dtype=torch.bool, device=DEVICE) for g in grads],
            delta.clone(),
        )

    eager, compiled = arguments(), arguments()
    expected = step(*eager)
    torch._dynamo.reset()
    actual = torch.compile(step, backend=recording, fullgraph=True)(*compiled)
    for a, e in zip(actual, expected):
        assert all(torch.equal(x, y) for x, y in zip(a, e)) if isinstance(a, list) else torch.equal(a, e)
    for a, e in zip(compiled, eager):
        assert all(torch.equal(x, y) for x, y in zip(a, e)) if isinstance(a, list) else torch.equal(a, e)
    assert len(graphs) == 1
    called = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert {f"fastadv_triton.{op}" for op in _registry.load("triton").native} <= called, called


# ---- adding an op (CONTRIBUTING.md): the checklist, and an op that lands in the torch backend first ----


def natives() -> dict[str, frozenset[str]]:
    """The ops each compiled backend that loads here implements itself."""
    found = {}
    for name in ("triton", "ext"):
        try:
            found[name] = _registry.load(name).native
        except RuntimeError:  # not available here: its required ops count below
            continue
    return found


def op_table_ops() -> set[str]:
    """The ops with a row in the op table: a test of tests/test_ops.py named for the op (``test_<op>...`` or
    ``..._<op>...``, as ``test_measure_then_project``). Read from its source: test modules do not import each other."""
    tree = ast.parse((pathlib.Path(__file__).parent / "test_ops.py").read_text())
    tests = [f"{node.name}_" for node in tree.body if isinstance(node, ast.FunctionDef) and node.name[:5] == "test_"]
    return {op for op in contract.OPS if any(f"_{op}_" in test for test in tests)}


def unfinished(op: str) -> list[str]:
    """What op ``op`` lacks of the checklist for a torch-only op, and of the self-check once a compiled backend has
    it (every required op counts as compiled)."""
    compiled = contract.OPS[op].required or any(op in native for native in natives().values())
    missing = [problem] if (problem := contract.mismatch(torch_ops, op)) else []
    if op not in op_table_ops():
        missing.append(f"{op} has no row in the op table (a test named for it in tests/test_ops.py)")
    if compiled and op not in _library._FAKES:
        missing.append(f"{op} has no fake kernel (fastadv/backends/_library.py)")
    if compiled and op not in selfcheck._CASES:
        missing.append(f"{op} has no self-check case (fastadv/selfcheck.py)")
    return missing


def test_every_op_has_its_checklist():
    """Each op of the contract: a torch implementation with its signature, a row in the op table and, where a
    compiled backend implements it (or must), a fake kernel and a self-check case; no fake or case of another op."""
    assert {op: unfinished(op) for op in contract.OPS} == {op: [] for op in contract.OPS}
    assert set(_library._FAKES) <= set(contract.OPS) and set(selfcheck._CASES) <= set(contract.OPS)


class _Twice:
    def twice(self, params: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        """``params[i][rows[i]] *= 2``, in place."""


def _twice(params: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
    for param, idx in zip(params, rows):
        param[idx] *= 2


@pytest.fixture
def twice(monkeypatch):
    """A new op, ``twice``, as it lands: a method of the contract and the torch backend's function, nothing else.
    (Loaded backends are made once per process: made afresh here, and the old ones back afterwards.)"""
    monkeypatch.setattr(contract.Backend, "twice", _Twice.twice, raising=False)
    monkeypatch.setitem(contract.OPS, "twice", contract.Op(writes=("params",), required=False))
    monkeypatch.setattr(torch_ops, "twice", _twice, raising=False)
    monkeypatch.setattr(_registry, "_LOADED", {})


@pytest.mark.parametrize("name", ["triton", "ext"])
def test_a_torch_only_op_lands_without_edits_elsewhere(twice, name, monkeypatch, capsys):
    """Every layer takes the new op from the contract: dispatch (the compiled backend runs the torch backend's, which
    is not native there), the torch.library ops (none to register, no fake kernel needed), the self-check (nothing
    to check; the report names it), the op table (every backend on every device runs it; the checklist asks only for
    its row there)."""
    module = runnable(name)
    weight = torch.randn(5, 3, device=DEVICE)
    rows = torch.tensor([4, 1], device=DEVICE)
    expected = weight.clone()
    expected[rows] *= 2
    monkeypatch.setenv("FASTADV_SELFCHECK", "0")  # the self-check itself runs below
    backend = backend_for(name, [weight], [weight])
    assert backend is resolve_backend(name, DEVICE) and backend.module is module
    assert backend.twice is _twice and "twice" not in backend.native and "twice" in _registry.load("torch").native
    assert contract.mismatches(backend) == [] and contract.mismatches(module, compiled=True) == []
    backend.twice([weight], [rows])
    assert torch.equal(weight, expected)

    assert not hasattr(getattr(torch.ops, NAMESPACES[name]), "twice") and "twice" not in _library._FAKES
    monkeypatch.delenv("FASTADV_SELFCHECK")
    assert selfcheck.check(name, DEVICE, torch.float32) is None  # a case for a native twice would be missing
    monkeypatch.setattr(selfcheck, "check", lambda *args: None)
    assert selfcheck.main([name]) == 0
    assert f"not checked: backup, twice of {name} (the torch backend's)" in capsys.readouterr().out.splitlines()

    for target in BACKENDS:
        for device in DEVICES:
            try:
                assert resolve_backend(target, device).twice is _twice
            except RuntimeError:  # not on this device
                continue
    assert unfinished("twice") == ["twice has no row in the op table (a test named for it in tests/test_ops.py)"]

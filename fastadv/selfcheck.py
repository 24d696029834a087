"""Runtime self-check of a compiled backend: one tiny case per op, against the torch backend, before it is trusted.

The Triton kernels and the C++/CUDA extension may be running on hardware (a new GPU, a new CPU, a new compiler or
driver) where they never ran before. :func:`check` runs each op of the backend contract (:mod:`fastadv.backends`)
that the backend implements itself (its ``native`` ops: those it takes from the torch backend are the reference)
once on a small random case and compares the results with the pure-PyTorch backend on identical inputs;
:func:`passed` is the cached per-process gate built on it: a backend that fails on a (device, dtype) is reported with
one ``RuntimeWarning`` and that device uses the torch backend for the rest of the process.

>>> import torch
>>> from fastadv import selfcheck
>>> selfcheck.check("ext", torch.device("cpu"), torch.bfloat16)  # doctest: +SKIP
>>> selfcheck.passed("ext", torch.device("cpu"), torch.bfloat16)  # doctest: +SKIP
True

From the command line, the first thing to run on a new machine (exit status 1 when a check fails; it also names the
ops each backend takes from the torch backend)::

    python -m fastadv.selfcheck

What runs: each op in each of its variants that an attack can reach, at odd widths (the kernels' element-wise paths)
and at aligned, embedding-sized ones (their vector paths): ``scan`` with and without weights, ``row_sumsq``,
``backup`` (the torch backend's in both compiled backends today), ``perturb`` with and without AWP's box, ``measure``
and ``project``, ``restore``, and ``input_step`` in every combination of its norm, bound, per token or per example and
mask, on examples spanning several slices (split between programs or blocks on a GPU) and on one-slice ones. An op
that a backend implements but that has no case here fails the check.

Cost: paid once per (backend, device, dtype) and process, by the first attack that uses it: 80 op calls (72 of them
``input_step``, 1-3 launches each) on tensors of at most 14 K elements, each compared with the torch backend on the
host, about 5,200 small torch ops in all (1,600 of them views, 340 host reads). On the already-built extension on a
CPU, 20-40 ms per dtype; for the Triton kernels under ``TRITON_INTERPRET=1``, 6-12 s (the interpreter runs each
program in Python). On a GPU, an estimated 30-60 ms per dtype (about 2,000 launches at 5-10 us of host time each, and
the host-side comparisons; not measured: no GPU was at hand), once the kernels are compiled: the first compilation of
the Triton kernels for a dtype takes seconds (6 input_step kernels, about 20 for the other ops), a warm cache loads
them.
``FASTADV_SELFCHECK=0`` turns the gate off.

Limitations: a check runs eagerly, outside ``torch.compile`` tracing and outside CUDA graph capture (see
:func:`passed`); its shapes are small, so the grids of a big tensor (Triton programs walking several row blocks, the
extension's grid-stride loops) are not what runs here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from fastadv._bits import same_bits, ulp_distance
from fastadv._util import user_stacklevel
from fastadv.backends import _registry, contract
from fastadv.backends import torch_ops as ref

__all__ = ["DTYPES", "cache_clear", "check", "main", "passed"]

#: The dtypes ``python -m fastadv.selfcheck`` checks.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: (rows, cols) of the tensors of the row ops, with the gradient rows left zero in each. Odd widths, which the kernels
#: read element by element: a gathered tensor whose rows come shuffled, a one-row tensor (a 1-D parameter) and a tensor
#: whose every row is perturbed (so its rows are in order). Aligned widths, 16-byte rows of an embedding's size, which
#: take the vector paths (Triton's 16-byte accesses, one launch apart from the odd tensors; the extension's 16-byte
#: packs in full batches on CUDA, whole vectors on the CPU): a gathered and a complete row list.
_SHAPES = ((7, 5), (1, 3), (4, 9), (6, 1024), (3, 768))
_ZERO_ROWS = ((1, 4), (), (), (2,), ())
_SEED = 20240917
_BOX_EPS = 0.3

#: input_step's modes, as the contract (:meth:`fastadv.backends.contract.Backend.input_step`) names them: every
#: combination of a norm, a bound, per token or per example, with and without a mask is checked, at each shape below.
_NORMS = ("l2", "inf", "sign")
_BOUNDS = ("none", "l2", "inf")
#: [B, T, D] of input_step, per example and per token (a token's work does not depend on T: few tokens). Rows of 768
#: elements (BERT's, XLM-R's) are aligned: Triton's 16-byte accesses, the extension's packs in a full batch and a
#: partial one on CUDA; examples of 9 of them span two slices on every GPU backend (8 tokens each), so they are split
#: between programs or blocks. Rows of 13 elements are neither, and examples of 5 of them are one slice (a program or
#: a block each).
_INPUT_SHAPES = {False: ((2, 9, 768), (2, 5, 13)), True: ((2, 2, 768), (2, 2, 13))}
_INPUT_LR = 1.0

# (name, device, dtype) -> None (passed) or the failure; guarded by _LOCK.
_CACHE: dict[tuple[str, torch.device, torch.dtype], str | None] = {}
# Keys used inside a CUDA graph capture before their check ran (see passed()); guarded by _LOCK.
_CAPTURED_UNCHECKED: set[tuple[str, torch.device, torch.dtype]] = set()
_LOCK = threading.RLock()
_STATE = threading.local()  # .running: a check is in progress on this thread (passed() then answers True)


class _Mismatch(Exception):
    """An op failed: its result differs from the torch backend's, or it raised; ``op`` is set by :func:`_op`."""

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(message)
        self.message, self.op = message, op

    def __str__(self) -> str:
        if self.op is None:
            return self.message
        return f"{self.op} {self.message}" if self.message.startswith("raised ") else f"{self.op}: {self.message}"


# ---------------------------------------------------------------------------------------------- comparisons


def _what(i: int) -> str:
    """Tensor ``i`` of the case, by its parameter's shape."""
    return f"tensor {i} ({'x'.join(map(str, _SHAPES[i]))})"


def _expect_bits(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not same_bits(a, e):
            raise _Mismatch(f"{what} of {_what(i)} differ")


def _expect_like(actual: Any, expected: Tensor, what: str) -> None:
    """A returned tensor: its dtype and shape exactly."""
    if not isinstance(actual, Tensor):
        raise _Mismatch(f"returned {type(actual).__name__} instead of a tensor")
    if actual.dtype != expected.dtype or actual.shape != expected.shape or actual.device != expected.device:
        raise _Mismatch(
            f"{what} are {actual.dtype} {tuple(actual.shape)} on {actual.device}, expected"
            f" {expected.dtype} {tuple(expected.shape)} on {expected.device}"
        )


def _expect_sums(actual: Any, expected: Tensor, what: str) -> None:
    """A vector of sums of squares: its dtype and shape exactly, its values within rtol 1e-5."""
    _expect_like(actual, expected, what)
    a, e = actual.detach().cpu().double(), expected.cpu().double()
    if not torch.allclose(a, e, rtol=1e-5, atol=0.0):
        worst = ((a - e).abs() / e.abs().clamp_min(1e-300)).nan_to_num(math.inf).max().item()
        raise _Mismatch(f"{what} differ by up to {worst:.3g} relative (allowed 1e-05)")


def _expect_weights(
    actual: list[Tensor],
    expected: list[Tensor],
    written: list[Tensor] | None,
    slack: list[float],
    names: list[str] | None = None,
) -> None:
    """Written weights: fp32 within rtol 1e-5/atol 1e-6, bf16/fp16 within one ulp (or, where the fp32 math nearly
    cancels, within ``slack``: a few fp32 ulps of its terms, which FMA or not may change); the rows not in
    ``written[i]`` bit for bit (``written=None``: every element is written). ``names``: what each tensor is, for the
    message (default: the case's weights)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        which = names[i] if names else f"weights of {_what(i)}"
        if a.dtype != e.dtype or a.shape != e.shape:
            raise _Mismatch(f"{which} changed dtype or shape")
        a, e = a.cpu(), e.cpu()
        if written is not None:
            mask = torch.zeros(e.shape[0], dtype=torch.bool)
            mask[written[i].cpu()] = True
            if not same_bits(a[~mask], e[~mask]):
                raise _Mismatch(f"{which} outside the listed rows were written")
            a, e = a[mask], e[mask]
        if a.isnan().any():
            raise _Mismatch(f"{which} are NaN")
        if e.dtype in (torch.float32, torch.float64):
            if not torch.allclose(a, e, rtol=1e-5, atol=1e-6):
                worst = (a - e).abs().max().item()
                raise _Mismatch(f"{which} differ by up to {worst:.3g} (rtol 1e-05, atol 1e-06)")
            continue
        bad = (ulp_distance(a, e) > 1) & ((a.float() - e.float()).abs() > slack[i])
        if bad.any():
            worst = int(ulp_distance(a, e)[bad].max())
            raise _Mismatch(f"{which} differ by up to {worst} ulps")


def _expect_unchanged(
    inputs: dict[str, list[Tensor]], originals: dict[str, list[Tensor]], which: Callable[[int], str] = _what
) -> None:
    """``which(i)``: what tensor ``i`` of a list is, for the message (default: the row ops' tensors)."""
    for what, tensors in inputs.items():
        for i, (t, o) in enumerate(zip(tensors, originals[what])):
            if not same_bits(t, o):
                raise _Mismatch(f"wrote its input {what} ({which(i)})")


# ---------------------------------------------------------------------------------------------- the case


def _clone(tensors: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


class _Case:
    """The tiny inputs, built on the CPU from a private generator and moved to ``device``."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen)

        self.device, self.dtype = device, dtype
        params, grads, rows, touched = [], [], [], []
        for (n_rows, n_cols), zero in zip(_SHAPES, _ZERO_ROWS):
            params.append(randn(n_rows, n_cols))
            grad = randn(n_rows, n_cols)
            grad[list(zero)] = 0.0
            grads.append(grad)
            nonzero = [r for r in range(n_rows) if r not in zero]
            if len(nonzero) < n_rows:  # a partial list may come in any order; a complete one is in order
                nonzero = [nonzero[j] for j in torch.randperm(len(nonzero), generator=gen).tolist()]
            rows.append(torch.tensor(nonzero, dtype=torch.long))
            touched.append(torch.rand(n_rows, generator=gen) < 0.5)
        # Backups of the first half of each row list already taken, and those rows moved since by an earlier step.
        self.n_backed = [len(r) // 2 for r in rows]
        self.originals = [p.to(dtype) for p in params]
        backups, moved = [], []
        for p, r, n in zip(self.originals, rows, self.n_backed):
            backup = torch.full((len(r), p.shape[1]), math.nan, dtype=dtype)  # poison: rows still to back up
            backup[:n] = p[r[:n]]
            backups.append(backup)
            q = p.clone()
            q[r[:n]] += (0.05 * randn(n, p.shape[1])).to(dtype)
            moved.append(q)
        scales = torch.rand(len(params), generator=gen) + 0.1
        self.scales = scales.to(device, torch.float64 if dtype == torch.float64 else torch.float32)

        def to(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(device) for t in tensors]

        self.params, self.grads = to(moved), to([g.to(dtype) for g in grads])
        self.rows, self.touched, self.backups = to(rows), to(touched), to(backups)
        self.originals = to(self.originals)
        self.full_backups = [o[r] for o, r in zip(self.originals, self.rows)]
        self.scrambled = to([randn(*p.shape).to(dtype) for p in params])  # weights for restore to overwrite
        # Slack for bf16/fp16 weights where W + s*G - B nearly cancels: 8 fp32 ulps of the largest terms.
        eps32 = torch.finfo(torch.float32).eps
        self.slack = [
            8 * eps32 * (p.abs().max().item() + s * g.abs().max().item() + o.abs().max().item())
            for p, g, o, s in zip(self.params, self.grads, self.originals, self.scales.tolist())
        ]


def _read_only(**inputs: list[Tensor]) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Clones of the inputs an op must not write, for the op, and the inputs themselves to check that it did not
    (nothing else is handed them: the torch backend gets clones of its own)."""
    return {k: _clone(v) for k, v in inputs.items()}, inputs


def _sync(device: torch.device) -> None:
    """Asynchronous kernel errors surface here, attributed to the op just run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _op(name: str) -> Iterator[None]:
    """Failures inside are attributed to the op ``name`` (unless an inner one already named theirs); an exception of
    the check itself (of the torch reference, say) is a failure too, so that ``check`` never raises."""
    try:
        yield
    except _Mismatch as err:
        if err.op is None:
            err.op = name
        raise
    except Exception as err:
        raise _Mismatch(f"the check itself raised {_describe(err)}", op=name) from err


def _describe(err: Exception) -> str:
    """``"RuntimeError: the first line of its message"``, at most about 200 characters."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 160:
        message = message[:157] + "..."
    return type(err).__name__ + (f": {message}" if message else "")


def _run(device: torch.device, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``: a backend op; any exception (also an asynchronous CUDA error) becomes a failure of the op."""
    try:
        out = fn(*args)
        _sync(device)
        return out
    except Exception as err:  # any failure of a backend op is a failed check
        raise _Mismatch(f"raised {_describe(err)}") from err


# ---- the cases: one function per op, each on fresh clones of the case, against the torch backend on identical
# inputs; each raises _Mismatch naming what differed.


def _check_scan(ops: ModuleType, case: _Case) -> None:
    device = case.device
    for op, params in (("scan", None), ("scan(params)", case.params)):  # FGM/PGD and hint checks; AWP
        with _op(op):
            expected_fresh = [torch.zeros_like(t) for t in case.touched]
            expected = ref.scan(
                _clone(case.grads), _clone(case.touched), expected_fresh, None if params is None else _clone(params)
            )
            fresh = [~f for f in expected_fresh]  # poison: the opposite of every right answer
            inputs, originals = _read_only(grads=case.grads, touched=case.touched, params=params or [])
            stats = _run(
                device,
                ops.scan,
                inputs["grads"],
                inputs["touched"],
                fresh,
                None if params is None else inputs["params"],
            )
            _expect_unchanged(inputs, originals)
            _expect_bits(fresh, expected_fresh, "fresh flags")
            _expect_like(stats, expected, "stats")
            if not torch.equal(stats[:, 1].cpu(), expected[:, 1].cpu()):
                raise _Mismatch(f"row counts are {stats[:, 1].tolist()}, expected {expected[:, 1].tolist()}")
            _expect_sums(stats[:, 0::2], expected[:, 0::2], "sums of squares")


def _check_row_sumsq(ops: ModuleType, case: _Case) -> None:
    expected = ref.row_sumsq(_clone(case.params), _clone(case.rows))
    inputs, originals = _read_only(params=case.params, rows=case.rows)
    sums = _run(case.device, ops.row_sumsq, inputs["params"], inputs["rows"])
    _expect_unchanged(inputs, originals)
    _expect_sums(sums, expected, "sums of squares")


def _check_backup(ops: ModuleType, case: _Case) -> None:
    backups = _clone(case.backups)
    inputs, originals = _read_only(params=case.params, rows=case.rows)
    _run(case.device, ops.backup, inputs["params"], inputs["rows"], backups, list(case.n_backed))
    _expect_unchanged(inputs, originals)
    _expect_bits(backups, case.full_backups, "backups")


def _check_perturb(ops: ModuleType, case: _Case) -> None:
    """FGM: half of each row list backed up (the rest poisoned), so perturb backs up the others first; AWP's box: the
    rows all backed up beforehand (as the attack classes do), and a zero scale on tensor 1."""
    some_zero = case.scales.clone()
    some_zero[1] = 0.0
    every = [len(r) for r in case.rows]
    for op, backed, start, scales, box_eps in (
        ("perturb", case.n_backed, case.backups, case.scales, None),
        ("perturb(box_eps)", every, case.full_backups, some_zero, _BOX_EPS),
    ):
        with _op(op):
            expected = _clone(case.params)
            ref.perturb(
                expected, _clone(case.grads), _clone(case.rows), _clone(start), list(backed), scales.clone(), box_eps
            )
            params, backups = _clone(case.params), _clone(start)
            inputs, originals = _read_only(grads=case.grads, rows=case.rows, scales=[scales])
            _run(
                case.device,
                ops.perturb,
                params,
                inputs["grads"],
                inputs["rows"],
                backups,
                list(backed),
                inputs["scales"][0],
                box_eps,
            )
            _expect_unchanged(inputs, originals)
            _expect_bits(backups, case.full_backups, "backups")
            _expect_weights(params, expected, case.rows, case.slack)


def _expected_delta_sumsq(case: _Case) -> Tensor:
    """The torch backend's measure on the case (the norms project is given)."""
    return ref.measure(
        _clone(case.params),
        _clone(case.grads),
        _clone(case.rows),
        _clone(case.backups),
        list(case.n_backed),
        case.scales.clone(),
    )


def _check_measure(ops: ModuleType, case: _Case) -> None:
    expected_sumsq = _expected_delta_sumsq(case)
    params, backups = _clone(case.params), _clone(case.backups)
    inputs, originals = _read_only(grads=case.grads, rows=case.rows, scales=[case.scales])
    sumsq = _run(
        case.device,
        ops.measure,
        params,
        inputs["grads"],
        inputs["rows"],
        backups,
        list(case.n_backed),
        inputs["scales"][0],
    )
    _expect_unchanged(inputs, originals)
    _expect_bits(params, case.params, "weights (measure must not write them)")
    _expect_bits(backups, case.full_backups, "backups")
    _expect_sums(sumsq, expected_sumsq, "delta_sumsq")


def _check_project(ops: ModuleType, case: _Case) -> None:
    """On identical inputs: the torch results of measure, and a ball that some steps leave."""
    expected_sumsq = _expected_delta_sumsq(case)
    norms = sorted(expected_sumsq.double().sqrt().tolist())
    eps = math.sqrt(norms[0] * norms[1])
    expected = _clone(case.params)
    ref.project(
        expected,
        _clone(case.grads),
        _clone(case.rows),
        _clone(case.full_backups),
        case.scales.clone(),
        expected_sumsq.clone(),
        eps,
    )
    params = _clone(case.params)
    inputs, originals = _read_only(
        grads=case.grads, rows=case.rows, backups=case.full_backups, scales=[case.scales], delta_sumsq=[expected_sumsq]
    )
    _run(
        case.device,
        ops.project,
        params,
        inputs["grads"],
        inputs["rows"],
        inputs["backups"],
        inputs["scales"][0],
        inputs["delta_sumsq"][0],
        eps,
    )
    _expect_unchanged(inputs, originals)
    _expect_weights(params, expected, case.rows, case.slack)


def _check_restore(ops: ModuleType, case: _Case) -> None:
    expected = _clone(case.scrambled)
    ref.restore(expected, _clone(case.rows), _clone(case.full_backups))
    params = _clone(case.scrambled)
    inputs, originals = _read_only(rows=case.rows, backups=case.full_backups)
    _run(case.device, ops.restore, params, inputs["rows"], inputs["backups"])
    _expect_unchanged(inputs, originals)
    _expect_bits(params, expected, "weights")


def _input_case(
    shape: tuple[int, int, int], masked: bool, dtype: torch.dtype, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``delta``, ``grad`` and ``mask`` of input_step, on the CPU: the last example's first token has an inf gradient
    (its group's norm is not finite: no step). With a mask, the first example is padded, the last is not, the others
    are padding only, and every padded token has a NaN gradient, which must not count."""
    batch, tokens, cols = shape
    delta = 0.1 * torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    grad[-1, 0, cols // 2] = math.inf
    mask = None
    if masked:
        lengths = torch.tensor([tokens - 2] + [0] * (batch - 2) + [tokens])
        mask = torch.arange(tokens) < lengths[:, None]
        grad[~mask] = math.nan
    return delta.to(dtype), grad.to(dtype), mask


def _group_norms(values: Tensor, per_token: bool) -> Tensor:
    return torch.linalg.vector_norm(values.float(), dim=(-1,) if per_token else (-2, -1))


def _check_input_step(ops: ModuleType, case: _Case) -> None:
    """input_step in every mode (:data:`_NORMS` x :data:`_BOUNDS`, per token and per example, with and without a mask)
    at each shape of :data:`_INPUT_SHAPES`, against the torch backend on identical inputs. The radius of a bound is
    the median group norm (l2) or element magnitude (inf) of the unbounded step, so it moves some values and not
    others. (Its own tensors: one [B, T, D] perturbation, not the row ops' lists.)"""
    device, dtype = case.device, case.dtype
    gen = torch.Generator().manual_seed(_SEED)
    for per_token in (False, True):
        for shape in _INPUT_SHAPES[per_token]:
            for masked in (False, True):
                delta, grad, mask = _input_case(shape, masked, dtype, gen)
                delta, grad = delta.to(device), grad.to(device)
                mask = None if mask is None else mask.to(device)
                for norm in _NORMS:
                    unbounded = delta
                    for bound in _BOUNDS:
                        what = (
                            f"{norm} per {'token' if per_token else 'example'}, {bound} bound,"
                            f" {'masked' if masked else 'no mask'}, {'x'.join(map(str, shape))}"
                        )
                        radius = {
                            "none": 0.0,
                            "l2": _group_norms(unbounded, per_token).median().item(),
                            "inf": unbounded.float().abs().median().item(),
                        }[bound]
                        args = (_INPUT_LR, norm, per_token, 1e-6, 1e-3, bound, radius)
                        expected = delta.clone()
                        want = ref.input_step(expected, grad.clone(), None if mask is None else mask.clone(), *args)
                        if bound == "none":
                            unbounded = expected
                        actual = delta.clone()
                        inputs, originals = _read_only(grad=[grad], mask=[] if mask is None else [mask])
                        norms = _run(
                            device,
                            ops.input_step,
                            actual,
                            inputs["grad"][0],
                            inputs["mask"][0] if inputs["mask"] else None,
                            *args,
                        )
                        # mypy infers no type for a lambda with a default argument (bound here: B023)
                        _expect_unchanged(inputs, originals, lambda i, what=what: what)  # type: ignore[misc]
                        _expect_sums(norms, want, f"gradient norms ({what})")
                        # a step of at most lr per element: where it nearly cancels delta, a few fp32 ulps of both
                        slack = 8 * torch.finfo(torch.float32).eps * (delta.abs().max().item() + _INPUT_LR)
                        _expect_weights([actual], [expected], None, [slack], [f"delta ({what})"])


#: The case of each op (``tests/test_contract.py`` checks that every op a compiled backend implements has one).
_CASES: dict[str, Callable[[ModuleType, _Case], None]] = {
    "scan": _check_scan,
    "row_sumsq": _check_row_sumsq,
    "backup": _check_backup,
    "perturb": _check_perturb,
    "measure": _check_measure,
    "project": _check_project,
    "restore": _check_restore,
    "input_step": _check_input_step,
}


def _check_ops(ops: ModuleType, case: _Case) -> None:
    """The case of each op of the contract that ``ops`` implements itself (its ``native`` ones: the others are the
    torch backend's, the reference). An op without a case fails, but in the torch backend (nothing to compare)."""
    for op in contract.OPS:
        if op not in ops.native or (op not in _CASES and ops.module is ref):
            continue
        with _op(op):
            if op not in _CASES:
                raise _Mismatch("has no self-check case")
            _CASES[op](ops, case)


# ---------------------------------------------------------------------------------------------- public API


def _key(name: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, torch.device, torch.dtype]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return name, device, dtype


@contextlib.contextmanager
def _eager_fp_state() -> Iterator[None]:
    """Autograd off, inference mode off (the case's tensors are ordinary ones whatever the caller's mode), and
    deterministic-algorithm checks off for the torch reference (index_copy_ on CUDA), restored afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if deterministic:
            torch.use_deterministic_algorithms(False)
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def check(name: str, device: torch.device, dtype: torch.dtype, *, seed: int = _SEED) -> str | None:
    """Run each op of backend ``name`` once on a tiny random case on (``device``, ``dtype``) and compare each with the
    torch backend on identical inputs.

    Returns None when everything matches, else a short description naming the op and what differed, e.g.
    ``"perturb: weights of tensor 0 (7x5) differ by up to 3 ulps"`` or ``"measure raised RuntimeError: ..."``. Never
    raises for a failing backend: a backend that cannot be loaded for ``device`` is described as ``"load raised ..."``.
    Bool/int outputs, backups and restored weights must match bit for bit, sums of squares within rtol 1e-5, written
    weights within rtol 1e-5/atol 1e-6 in fp32 and one ulp in bf16/fp16. The global RNG is not touched (``seed``
    feeds a private generator, so the case is the same every time). Only the ops the backend implements itself are
    run: the others are the torch backend's.
    """
    previous = getattr(_STATE, "running", False)
    _STATE.running = True
    try:
        with _eager_fp_state():
            with _op("load"):
                _, device, dtype = _key(name, device, dtype)
                ops = _run(torch.device("cpu"), _registry.resolve_backend, name, device)
                if not ops.supports(device, dtype, dtype):
                    raise _Mismatch(f"{name!r} does not support {dtype} on {device}")
            with _op("setup"):
                case = _Case(device, dtype, seed)
            _check_ops(ops, case)
    except _Mismatch as err:
        return str(err)
    finally:
        _STATE.running = previous
    return None


def _disabled() -> bool:
    return os.environ.get("FASTADV_SELFCHECK", "1").strip().lower() in ("0", "false", "no", "off")


def _capturing(device: torch.device) -> bool:
    """Whether work on ``device``'s current stream is being captured into a CUDA graph, where a check cannot run: it
    syncs with the host (and its tensors would come from the graph's pool)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def passed(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether backend ``name`` may be used on (``device``, ``dtype``) in this process: the torch backend always;
    every backend when ``FASTADV_SELFCHECK=0``; otherwise the result of :func:`check`, run on the first call for each
    (name, device, dtype) and cached. A failure is reported once, with a ``RuntimeWarning``: that device then uses
    the torch backend for that dtype for the rest of the process. Thread-safe; calls made while a check runs (by the
    backend resolution it uses) answer True.

    While ``device``'s current stream is being captured into a CUDA graph, a key not checked yet answers True without
    a check (nothing cached): the check runs at the next call outside a capture, and its warning, if it fails, says
    that graphs captured before it hold the backend's kernels. Warm up eagerly before capturing (as CUDA graphs need
    anyway) and the check runs there.
    """
    if name == "torch" or _disabled() or getattr(_STATE, "running", False):
        return True
    key = _key(name, device, dtype)
    with _LOCK:
        if key not in _CACHE:
            if _capturing(key[1]):
                _CAPTURED_UNCHECKED.add(key)
                return True
            _CACHE[key] = failure = check(*key)
            if failure is not None:
                dtype_name = str(key[2]).removeprefix("torch.")
                captured = (
                    " CUDA graphs captured before this check still run its kernels: capture them again."
                    if key in _CAPTURED_UNCHECKED
                    else ""
                )
                warnings.warn(
                    f"fastadv: the {name!r} backend failed its self-check on {key[1]} {dtype_name} ({failure});"
                    f" {dtype_name} weights on {key[1]} use the torch backend for the rest of this process.{captured}"
                    " Run `python -m fastadv.selfcheck` for a report; FASTADV_SELFCHECK=0 skips the check.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            _CAPTURED_UNCHECKED.discard(key)
        return _CACHE[key] is None


def cache_clear() -> None:
    """Forget every cached :func:`passed` answer (the next call checks again, and warns again on a failure)."""
    with _LOCK:
        _CACHE.clear()
        _CAPTURED_UNCHECKED.clear()


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def main(argv: list[str] | None = None) -> int:
    """``python -m fastadv.selfcheck [BACKEND ...]``: :func:`check` every available compiled backend (or those named)
    on every device and dtype, print a table and the ops each takes from the torch backend (not checked), and return 1
    if any check failed."""
    parser = argparse.ArgumentParser(prog="python -m fastadv.selfcheck", description=main.__doc__)
    parser.add_argument("backends", nargs="*", help="backends to check (default: every available one but torch)")
    args = parser.parse_args(argv)
    names = args.backends or [n for n in _registry.available_backends() if n != "torch"]

    rows, skipped, failed = [], [], False
    fallbacks: dict[str, list[str]] = {}
    for name in names:
        for device in _devices():
            try:
                ops = _registry.resolve_backend(name, device)
            except ValueError as err:  # not a backend name
                parser.error(str(err))
            except RuntimeError as err:  # not available, or not on this device
                skipped.append(f"{name} on {device} ({err})")
                continue
            fallbacks[name] = [op for op in contract.OPS if op not in ops.native]
            for dtype in DTYPES:
                start = time.perf_counter()
                failure = check(name, device, dtype)
                seconds = time.perf_counter() - start
                failed |= failure is not None
                rows.append((name, str(device), str(dtype).removeprefix("torch."), failure or "ok", f"{seconds:.2f}s"))

    header = ("backend", "device", "dtype", "result", "time")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not rows:
        print("no compiled backend to check")
    for name, missing in fallbacks.items():
        if missing:
            print(f"not checked: {', '.join(missing)} of {name} (the torch backend's)")
    for line in skipped:
        print(f"not run: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

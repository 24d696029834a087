"""CUDA graphs and streams with the compiled backends (GPU only: skipped without CUDA).

What of an attack a graph can capture: ``attack()`` reads on the host how many rows the batch touched (a scan's stats
with ``rows="scan"``, the hinted rows' count with row hints: the one sync of ``fastadv._hints.RowSource.find``), to
size the row list, and ``nonfinite_skips`` reads the skip flags; so a whole ``attack()`` is not capturable, and
neither is the self-check (it syncs) at a backend's first use. What follows the sync is: with the row lists fixed (their
length, hence the grid, is baked into the graph; their contents, the gradients, the weights and the step sizes are
read from device memory at each replay), the step sizes computed on the device, ``backup``, ``perturb`` (FGM),
``measure`` and ``project`` (PGD), ``restore``; and ``input_step`` (FreeLB, SMART), which never syncs. These tests
capture those ops as an FGM step (attack and restore), two PGD steps and restore, and a FreeLB and a SMART ascent step,
resolving the backend inside the capture (its first use there: the self-check must not run, and runs at the first
eager use after it); then replay the graph on new weights, gradients and rows and compare each replay with the same
ops run eagerly, bit for bit. Also: the ops on a non-default stream give the bits they give on the default one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastadv import selfcheck
from fastadv._bits import same_bits
from fastadv.backends import backend_for, resolve_backend, torch_ops

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs and streams need a GPU", allow_module_level=True)

CUDA = torch.device("cuda")
VOCAB, DIM, ROWS, BATCH, TOKENS = 1000, 768, 64, 4, 40
EPS, ALPHA = 1.0, 0.3


def _compiled() -> list[str]:
    names = []
    for name in ("triton", "ext"):
        try:
            resolve_backend(name, CUDA)
        except RuntimeError:
            continue
        names.append(name)
    return names


COMPILED = _compiled()
pytestmark = pytest.mark.skipif(not COMPILED, reason="no compiled backend runs on this GPU")


@dataclasses.dataclass
class Step:
    """The static tensors of a step: its inputs (weights, gradient, listed rows; input perturbations, their gradient
    and mask) and its outputs, written in place so that a graph's replay leaves them where eager code does."""

    param: torch.Tensor
    grad: torch.Tensor
    rows: torch.Tensor
    delta: torch.Tensor
    noise: torch.Tensor
    delta_grad: torch.Tensor
    mask: torch.Tensor
    backup: torch.Tensor
    fgm: torch.Tensor
    pgd: torch.Tensor
    freelb_norms: torch.Tensor
    smart_norms: torch.Tensor

    @classmethod
    def random(cls, dtype: torch.dtype) -> Step:
        rows = torch.randperm(VOCAB, device=CUDA)[:ROWS]
        grad = torch.zeros(VOCAB, DIM, device=CUDA, dtype=dtype)
        grad[rows] = torch.randn(ROWS, DIM, device=CUDA, dtype=dtype)
        embeds = (BATCH, TOKENS, DIM)
        lengths = torch.randint(1, TOKENS + 1, (BATCH, 1), device=CUDA)
        return cls(
            param=torch.randn(VOCAB, DIM, device=CUDA, dtype=dtype),
            grad=grad,
            rows=rows,
            delta=(0.01 * torch.randn(embeds, device=CUDA)).to(dtype),
            noise=(1e-5 * torch.randn(embeds, device=CUDA)).to(dtype),
            delta_grad=torch.randn(embeds, device=CUDA, dtype=dtype),
            mask=torch.arange(TOKENS, device=CUDA) < lengths,
            backup=torch.empty(ROWS, DIM, device=CUDA, dtype=dtype),
            fgm=torch.empty_like(grad),
            pgd=torch.empty_like(grad),
            freelb_norms=torch.empty(BATCH, device=CUDA),
            smart_norms=torch.empty(BATCH, TOKENS, device=CUDA),
        )

    def load(self, other: Step) -> None:
        """Copy ``other``'s inputs into this step's tensors (a graph reads them at their addresses)."""
        for field in ("param", "grad", "rows", "delta", "noise", "delta_grad", "mask"):
            getattr(self, field).copy_(getattr(other, field))

    def clone(self) -> Step:
        return Step(**{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)})

    def outputs(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name)
            for name in ("param", "fgm", "pgd", "delta", "noise", "freelb_norms", "smart_norms")
        }


def run_steps(ops, s: Step) -> None:
    """The ops of an FGM step, of two PGD steps and of a FreeLB and a SMART ascent, with the step sizes computed on
    the device as the attack classes compute them (nothing read on the host)."""
    params, grads, rows, backups = [s.param], [s.grad], [s.rows], [s.backup]
    norm = ops.row_sumsq(grads, rows).sqrt()  # rows hints' gradient norm: only the listed rows are non-zero
    ok = (norm > 0) & norm.isfinite()
    fgm_scales = torch.where(ok, EPS / norm, 0.0).float()
    pgd_scales = torch.where(ok, ALPHA / norm, 0.0).float()

    ops.backup(params, rows, backups, [0])
    ops.perturb(params, grads, rows, backups, [ROWS], fgm_scales)
    s.fgm.copy_(s.param)
    ops.restore(params, rows, backups)

    ops.backup(params, rows, backups, [0])
    for _ in range(2):
        delta_sumsq = ops.measure(params, grads, rows, backups, [ROWS], pgd_scales)
        ops.project(params, grads, rows, backups, pgd_scales, delta_sumsq, EPS)
    s.pgd.copy_(s.param)
    ops.restore(params, rows, backups)

    # FreeLB: per example, the l2 ball; SMART: per token, the inf box
    s.freelb_norms.copy_(ops.input_step(s.delta, s.delta_grad, s.mask, 0.1, "l2", False, 0.0, 1e-8, "l2", 0.5))
    s.smart_norms.copy_(ops.input_step(s.noise, s.delta_grad, s.mask, 1e-3, "inf", True, 1e-6, 0.0, "inf", 1e-3))


@pytest.fixture
def fresh_selfcheck(monkeypatch):
    """The gate with nothing checked yet, and the checks it runs counted."""
    monkeypatch.delenv("FASTADV_SELFCHECK", raising=False)
    selfcheck.cache_clear()
    calls = []
    real = selfcheck.check

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(selfcheck, "check", counting)
    yield calls
    selfcheck.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", COMPILED)
def test_captured_steps_replay_as_eager(name, dtype, fresh_selfcheck):
    torch.manual_seed(0)
    static = Step.random(dtype)
    # Warm up on a side stream, as CUDA graphs ask: kernels compiled and loaded, the ops module taken without the gate
    # (resolve_backend), so that the backend's first gated use is inside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_steps(resolve_backend(name, CUDA), static.clone())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops = backend_for(name, [static.param], [static.grad])
        run_steps(ops, static)
    assert ops is resolve_backend(name, CUDA) and ops is not torch_ops
    assert fresh_selfcheck == []  # not checked inside the capture
    assert backend_for(name, [static.param], [static.grad]) is ops  # checked now, eagerly, and passed
    assert len(fresh_selfcheck) == 1

    for trial in range(3):
        inputs = Step.random(dtype)
        static.load(inputs)
        eager = inputs.clone()
        graph.replay()
        run_steps(ops, eager)
        torch.cuda.synchronize()
        for field, value in eager.outputs().items():
            assert same_bits(getattr(static, field), value), (trial, field)
        assert same_bits(static.param, inputs.param)  # restored, bit for bit
        moved = (static.fgm != inputs.param).any(1)
        assert moved[inputs.rows].all() and moved.sum() == ROWS  # the listed rows, and only those
        assert not same_bits(static.delta, inputs.delta)


@pytest.mark.parametrize("name", COMPILED)
def test_ops_on_a_side_stream_give_the_same_bits(name):
    torch.manual_seed(1)
    ops = resolve_backend(name, CUDA)
    inputs = Step.random(torch.bfloat16)
    on_default = inputs.clone()
    run_steps(ops, on_default)
    on_side = inputs.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_steps(ops, on_side)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for field, value in on_default.outputs().items():
        assert same_bits(getattr(on_side, field), value), field

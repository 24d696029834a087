"""Benchmarks: the seed's classes against every available backend on the same shapes.

``python -m fastadv.bench`` prints, per case, the time per call, the speed-up over the seed, the extra peak memory of
the call and the memory still held after it (at full scale a row of fastadv under 1.5x the seed is red); then FGM's
scan against one read of the gradient, and FGM with the defaults on a Llama-3-sized bf16 embedding, untied and tied,
against their targets. ``--quick`` runs the BERT-base shapes only, ``--e2e`` adds whole training steps of a
``transformers`` BERT with a 250002-token vocabulary (and FreeLB, SMART and R3F steps against a plain step),
``--plot FILE.png`` draws the speed-ups. ``FASTADV_BENCH_SCALE`` (e.g. ``0.01``) shrinks every shape, for CI. The
pytest-benchmark suite in ``benchmarks/`` uses the same cases and checks the targets at full scale.

A "call" is what an attack costs besides the forward/backward passes: FGM ``attack`` + ``restore``; PGD k=3
``backup_grad``, three ``attack``s, ``restore_grad``, ``restore``; AWP ``attack`` + ``restore``. An implementation
``<backend>`` is a backend with ``rows="scan"``, ``<backend>+batch`` with ``rows="batch"`` (row hints; the call includes
recording the batch's lookup); end to end, ``<backend>+auto`` is the default, ``rows="auto"``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastadv import FusedAWP, FusedFGM, FusedFreeLB, FusedPGD, FusedR3F, FusedSMART, available_backends
from fastadv.backends import contract, resolve_backend
from fastadv.loops import backward_pass
from fastadv.reference import AWP, FGM, PGD, awp_step, fgm_step, freelb_step, pgd_step, r3f_step, smart_step

#: Embedding shapes (rows, dim) of the models users train.
SHAPES = {"bert-base": (30522, 768), "xlm-r": (250002, 768), "llama": (32000, 4096)}
TOUCHED_ROWS = 4000
PGD_K = 3
#: The GPU target for each op: this fraction of the bandwidth of a device copy moving as many bytes.
COPY_TARGET = 0.85
#: At full scale every row of a fastadv backend must be at least this much faster than the seed (issue 20).
MIN_SPEEDUP = 1.5
#: FGM with ``rows="scan"`` on the CPU: attack + restore within this factor of one read of the gradient, the floor of
#: any scan.
SCAN_TARGET = 1.2
#: A Llama-3-sized embedding, for the LLM cases (:func:`llm_cases`).
LLM_SHAPES = {"llama3": (128256, 4096)}
#: The LLM cases' targets: untied, the defaults at least this much faster than the seed, with at most this share of
#: the seed's extra peak memory (tied: one backup of the weight plus that share).
LLM_SPEEDUP, LLM_PEAK_SHARE = 50.0, 0.02
#: Tied, FGM with an exact restore moves at least 7 passes over the weight's bytes (the backup written, G read for its
#: norm, W and G read and W written, the backup read and W written): 3.5 copies of the weight, timed in the same run.
#: Target: within TIED_TARGET of that floor.
TIED_FLOOR_COPIES, TIED_TARGET = 3.5, 1.2


def bench_scale() -> float:
    """The factor ``FASTADV_BENCH_SCALE`` applies to the number of rows (and touched rows); 1 by default."""
    return float(os.environ.get("FASTADV_BENCH_SCALE", "1"))


def full_scale() -> bool:
    """Whether the shapes are the real ones: the targets hold there (shrunk, fixed costs dominate)."""
    return bench_scale() >= 1


@dataclass(frozen=True)
class Case:
    shape: str
    dtype: torch.dtype
    gradient: str  # "rows": a batch touched TOUCHED_ROWS rows; "dense": every row; "tied": every row, the weight
    # shared with an LM head (as a model ties it: rows="auto" then scans)
    method: str  # "fgm", "pgd3" or "awp"

    @property
    def group(self) -> str:
        return f"{self.method}-{self.shape}-{str(self.dtype).removeprefix('torch.')}-{self.gradient}"

    def size(self) -> tuple[int, int, int]:
        """(rows, dim, touched rows) after scaling."""
        rows, dim = {**SHAPES, **LLM_SHAPES}[self.shape]
        rows = max(2, int(rows * bench_scale()))
        touched = rows if self.gradient != "rows" else max(1, min(rows // 2, int(TOUCHED_ROWS * bench_scale())))
        return rows, dim, touched


def cases(quick: bool = False) -> list[Case]:
    shapes = ["bert-base"] if quick else list(SHAPES)
    return [
        Case(shape, dtype, gradient, method)
        for method in ("fgm", "pgd3", "awp")
        for shape in shapes
        for dtype in (torch.float32, torch.bfloat16)
        for gradient in ("rows", "dense")
    ]


def llm_cases() -> list[Case]:
    """FGM on a Llama-3-sized bf16 embedding, the batch's rows untied and every row tied to the LM head, run with the
    defaults (:data:`DEFAULT`) against the seed."""
    return [Case(shape, torch.bfloat16, gradient, "fgm") for shape in LLM_SHAPES for gradient in ("rows", "tied")]


def implementations(device: torch.device) -> list[str]:
    """``"seed"``, every backend that runs on ``device`` (Triton's CPU interpreter is for tests, not timings), and
    each of them with row hints (``"<backend>+batch"``)."""
    usable = []
    for name in available_backends():
        if name == "triton" and device.type == "cpu":
            continue
        try:
            resolve_backend(name, device)
        except RuntimeError:
            continue
        usable.append(name)
    return ["seed", *usable, *(f"{name}+batch" for name in usable)]


def runs(case: Case, impl: str) -> bool:
    """Whether ``impl`` applies to ``case``: row hints need untied rows and exist for FGM/PGD; torch.compile'd
    peers exist for FGM/PGD."""
    if "+" in impl:
        return case.gradient == "rows" and case.method != "awp"
    return not (impl == COMPILED_SEED and case.method == "awp")


def is_fastadv(impl: str) -> bool:
    """Whether ``impl`` is fastadv's (a backend, with or without hints, or the defaults), not the seed or a peer."""
    return impl not in _PEERS


def build_model(case: Case, device: torch.device) -> nn.Module:
    """A module holding one ``word_embeddings`` embedding with the case's gradient already set; ``model.ids`` are the
    rows the batch looked up (every row for a dense gradient)."""
    rows, dim, touched = case.size()
    gen = torch.Generator(device=device).manual_seed(0)
    model = nn.Module()
    model.word_embeddings = nn.Embedding(rows, dim, device=device, dtype=case.dtype)
    weight = model.word_embeddings.weight
    with torch.no_grad():
        weight.copy_(torch.randn(rows, dim, device=device, dtype=case.dtype, generator=gen))
    if case.gradient != "rows":
        model.ids = torch.arange(rows, device=device)
        weight.grad = torch.randn(rows, dim, device=device, dtype=case.dtype, generator=gen)
        if case.gradient == "tied":
            model.lm_head = nn.Module()
            model.lm_head.weight = weight
    else:
        model.ids = torch.randperm(rows, device=device, generator=gen)[:touched]
        weight.grad = torch.zeros(rows, dim, device=device, dtype=case.dtype)
        weight.grad[model.ids] = torch.randn(touched, dim, device=device, dtype=case.dtype, generator=gen)
    return model


def _record_lookup(model: nn.Module) -> None:
    """What ``rows="batch"`` adds to a forward pass: its hooks record the looked-up ids (the lookup itself is part of
    the forward pass with or without fastadv, so it is not timed)."""
    embedding = model.word_embeddings
    for hook in embedding._forward_hooks.values():
        hook(embedding, (model.ids,), {}, None)  # no output: nothing for the gradient check to pair


#: The peer a user would try first: the seed's classes with their per-tensor math compiled by torch.compile.
COMPILED_SEED = "compiled"
#: fastadv's classes with their defaults (``backend="auto"``, ``rows="auto"``).
DEFAULT = "default"


def _fgm_math(weight: torch.Tensor, grad: torch.Tensor, eps: float) -> None:
    """The seed's FGM update of one tensor, branch-free so that it compiles into one graph."""
    norm = torch.norm(grad)
    weight.add_(torch.where((norm != 0) & ~torch.isnan(norm), eps * grad / norm, 0.0))


def _pgd_math(weight: torch.Tensor, grad: torch.Tensor, origin: torch.Tensor, alpha: float, eps: float) -> None:
    """The seed's PGD step (update, then projection) of one tensor, branch-free."""
    norm = torch.norm(grad)
    r = weight + alpha * grad / norm - origin
    r_norm = torch.norm(r)
    r = torch.where(r_norm > eps, eps * r / r_norm, r)
    weight.copy_(torch.where((norm != 0) & ~torch.isnan(norm), origin + r, weight))


class _CompiledFGM(FGM):
    def attack(self, emb_name: str = "word_embeddings") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                _compiled(_fgm_math)(param.data, param.grad, self.eps)


class _CompiledPGD(PGD):
    def attack(self, emb_name: str = "word_embeddings", is_first_attack: bool = False) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                _compiled(_pgd_math)(param.data, param.grad, self.emb_backup[name], self.alpha, self.eps)


_PEERS = {"seed": (FGM, PGD, AWP), COMPILED_SEED: (_CompiledFGM, _CompiledPGD, None)}
_FUSED = (FusedFGM, FusedPGD, FusedAWP)
_METHODS = ("fgm", "pgd3", "awp")
_compiled_fns: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _compiled_fns:
        _compiled_fns[fn] = torch.compile(fn, dynamic=False)
    return _compiled_fns[fn]


def make_attacker(impl: str, method: str, model: nn.Module):
    """The attack object of ``method`` for ``impl``: "seed", ``COMPILED_SEED``, ``DEFAULT``, a backend
    (``rows="scan"``), or "<backend>+<rows>" (``rows="batch"``, or ``"auto"``, the default)."""
    which = _METHODS.index(method)
    if impl in _PEERS:
        return _PEERS[impl][which](model)
    if impl == DEFAULT:
        return _FUSED[which](model)
    backend, _, rows = impl.partition("+")
    return _FUSED[which](model, backend=backend, **({"rows": rows or "scan"} if which != 2 else {}))


def attack_call(impl: str, method: str, model: nn.Module) -> Callable[[], None]:
    """One call of ``method`` through ``impl`` on ``model``."""
    attacker = make_attacker(impl, method, model)
    record = _record_lookup if impl.endswith("+batch") or impl == DEFAULT else lambda model: None
    record(model)  # construction registered the hooks; the first attack needs a recorded lookup
    if method in ("fgm", "awp"):

        def call() -> None:
            attacker.attack()
            attacker.restore()
            record(model)

        return call

    def call() -> None:
        attacker.backup_grad()
        for t in range(PGD_K):
            attacker.attack(is_first_attack=t == 0)
            record(model)
        attacker.restore_grad()
        attacker.restore()

    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _return_freed_memory_to_the_os() -> None:
    """Make glibc give freed memory back (now, and every large block from now on), so RSS tracks live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 256 * 1024)  # also ends glibc's dynamic threshold, which keeps freed blocks
    libc.malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_of(fn: Callable[[], None], device: torch.device) -> tuple[int | None, int | None]:
    """Peak memory ``fn`` needs above what was live before it, and what it still holds when it returns (CUDA
    allocator stats; resident set size on Linux, with freed memory given back to the OS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        return None, None
    _return_freed_memory_to_the_os()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak resident set size, to the current one
    base = _proc_status_kib("VmRSS")
    fn()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return (_proc_status_kib("VmHWM") - base) * 1024, (_proc_status_kib("VmRSS") - base) * 1024


@dataclass
class Result:
    case: Case
    impl: str
    seconds: float
    extra_bytes: int | None = None  # peak memory of a first call above what was live before it
    held_bytes: int | None = None  # memory still held after it


def time_case(case: Case, device: torch.device, impls: list[str], repeats: int) -> list[Result]:
    """Median time per call of each implementation on one shared model (weights checked restored after each).

    Each implementation runs its calls back to back after a warm-up: interleaving them call by call would charge the
    seed's freeing of gigabytes (the kernel returns the pages for a while after) to whoever runs next.
    """
    model = build_model(case, device)
    param = model.word_embeddings.weight
    weight, grad = param.detach().clone(), param.grad
    results = []
    for impl in impls:
        if not runs(case, impl):
            continue
        results.append(Result(case, impl, time_call(attack_call(impl, case.method, model), device, repeats)))
        assert torch.equal(param, weight), f"{impl} did not restore the weights"
        param.grad = grad  # the seed's restore_grad put a clone there
    return results


def measure_peaks(case: Case, device: torch.device, results: list[Result]) -> None:
    """Fill in the extra peak memory and the memory held after each result's first call on a fresh model (after all
    timings: on the CPU this switches glibc to returning freed memory at once, which would slow later timings)."""
    for result in results:
        model = build_model(case, device)
        result.extra_bytes, result.held_bytes = memory_of(attack_call(result.impl, case.method, model), device)
        del model


def scan_vs_read(device: torch.device, backends: list[str], repeats: int) -> list[tuple[str, float, float]]:
    """FGM attack + restore with ``rows="scan"`` on each backend at XLM-R size (fp32, TOUCHED_ROWS non-zero rows)
    against one read of the gradient (``torch.linalg.vector_norm``), the floor of any scan: rows of (backend,
    attack seconds, read seconds), the two timed alternately (see :func:`_alternating`)."""
    model = build_model(Case("xlm-r", torch.float32, "rows", "fgm"), device)
    grad = model.word_embeddings.weight.grad
    out = []
    for name in backends:
        read, seconds = _alternating(
            lambda: torch.linalg.vector_norm(grad), attack_call(name, "fgm", model), device, repeats
        )
        out.append((name, seconds, read))
    return out


def tied_floor(case: Case, device: torch.device, repeats: int) -> tuple[float, float]:
    """The defaults' FGM attack + restore on ``case`` (a tied weight) and a copy of the weight into a buffer that
    exists already, timed alternately: (attack seconds, copy seconds). :data:`TIED_FLOOR_COPIES` copies are the
    floor."""
    model = build_model(case, device)
    weight = model.word_embeddings.weight.detach()
    target = torch.empty_like(weight)
    return _alternating(lambda: target.copy_(weight), attack_call(DEFAULT, case.method, model), device, repeats)[::-1]


def llm_measures(
    default: Result, seed: Result, floor: tuple[float, float] | None
) -> dict[str, tuple[float, str, float]]:
    """An LLM case's measures against their targets, ``name -> (value, "<=" or ">=", target)``: untied, the speed-up
    over the seed and the extra peak memory as a share of the seed's; tied (``floor``: :func:`tied_floor`'s times),
    the time over the floor, the extra peak as a share of the seed's (one backup of the weight allowed on top) and
    the memory held after restore as a share of one backup."""
    rows, dim, _ = default.case.size()
    backup = rows * dim * default.case.dtype.itemsize
    known = default.extra_bytes is not None and seed.extra_bytes
    share = default.extra_bytes / seed.extra_bytes if known else math.nan
    if floor is None:
        return {
            "x seed": (seed.seconds / default.seconds, ">=", LLM_SPEEDUP),
            "peak/seed's": (share, "<=", LLM_PEAK_SHARE),
        }
    seconds, copy = floor
    return {
        "x floor": (seconds / (TIED_FLOOR_COPIES * copy), "<=", TIED_TARGET),
        "peak/seed's": (share, "<=", backup / seed.extra_bytes + LLM_PEAK_SHARE if known else math.nan),
        "held/backup": (default.held_bytes / backup if default.held_bytes is not None else math.nan, "<=", 0.02),
    }


def meets(value: float, how: str, target: float) -> bool:
    """Whether ``value`` meets ``target`` (unknown values, NaN, do)."""
    return not (value > target if how == "<=" else value < target)


def _red(text: str, miss: bool) -> str:
    """``text`` in red on a terminal where it misses its target."""
    return f"\033[31m{text}\033[0m" if miss and sys.stdout.isatty() else text


class NoAttack:
    """The attack calls of the usage loops with nothing attacked: the baseline of an attack's own cost end to end,
    the same passes and the same gradient accumulation (PGD's clean gradients kept and put back by reference)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._grads: dict[str, torch.Tensor | None] = {}

    def attack(self, *args: object, **kwargs: object) -> None:
        pass

    def restore(self, *args: object, **kwargs: object) -> None:
        pass

    def backup_grad(self) -> None:
        self._grads = {name: p.grad for name, p in self.model.named_parameters()}

    def restore_grad(self) -> None:
        for name, p in self.model.named_parameters():
            p.grad = self._grads.get(name)
        self._grads = {}  # a reference kept here would make the next backward accumulate out of place


def _e2e_bert(device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The end-to-end model, a transformers BERT (250002-token vocabulary, hidden 256, 2 layers), and a batch of
    16x64 tokens whose attention mask pads the end of half the rows."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab = max(1000, int(250002 * bench_scale()))
    config = BertConfig(
        vocab_size=vocab, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device)
    mask = torch.ones(16, 64, dtype=torch.long, device=device)
    mask[::2, 48:] = 0
    batch = {
        "input_ids": torch.randint(0, vocab, (16, 64), device=device),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (16,), device=device),
    }
    return model, batch


def _alternating(
    baseline: Callable[[], None], attacked: Callable[[], None], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``attacked``, timed alternately so that drifts of the machine's speed cancel
    in their ratio, each first in turn so that neither always pays for freeing what the other allocated."""
    times: dict[Callable[[], None], list[float]] = {baseline: [], attacked: []}
    for r in range(2 * repeats + 1):
        for fn in (baseline, attacked) if r % 2 else (attacked, baseline):
            times[fn].append(time_call(fn, device, 1, 0))
    base, seconds = (statistics.median(t[1:]) for t in times.values())
    return base, seconds


def end_to_end(
    device: torch.device, impls: list[str], repeats: int, methods: tuple[str, ...] = _METHODS
) -> list[tuple[str, str, float, float]]:
    """Training steps of a transformers BERT (250002-token vocabulary, hidden 256, 2 layers, batch 16x64).

    Returns rows of (method, impl, seconds per step, step time / that of the same loop with attacks that do nothing:
    the attack's own cost), each step timed alternately with the no-attack step; ``impls`` with row hints run as the
    default, ``rows="auto"``. The first row of each method is the no-attack step itself.
    """
    model, batch = _e2e_bert(device)
    del batch["attention_mask"]

    def closure() -> torch.Tensor:
        return model(**batch).loss

    def step(attacker, method: str) -> None:
        model.zero_grad()
        k = PGD_K if method == "pgd3" else 1
        if isinstance(attacker, (FusedFGM, FusedPGD, FusedAWP)):
            attacker.run(backward_pass(closure), k)  # the library's loops
        elif method == "fgm":
            fgm_step(attacker, closure)
        elif method == "pgd3":
            pgd_step(attacker, model, closure, k)
        else:
            awp_step(attacker, model, closure, k)

    rows = []
    for method in methods:
        baseline = functools.partial(step, NoAttack(model), method)
        rows.append((method, "no attack", time_call(baseline, device, repeats=repeats), 1.0))
        for impl in dict.fromkeys(i.replace("+batch", "+auto") for i in impls):  # the default rather than forced hints
            if not runs(Case("xlm-r", torch.float32, "rows", method), impl):  # BERT's embedding: untied
                continue
            attacked = functools.partial(step, make_attacker(impl, method, model), method)
            base, seconds = _alternating(baseline, attacked, device, repeats)
            rows.append((method, impl, seconds, seconds / base))
    return rows


#: The input-space methods end to end: their class, reference step and hyperparameters (GLUE-like FreeLB with K=3;
#: SMART and R3F with their defaults).
INPUT_METHODS = {
    "freelb": (FusedFreeLB, freelb_step, {"adv_lr": 0.1, "adv_steps": 3, "adv_init_mag": 0.6, "adv_max_norm": 1.0}),
    "smart": (FusedSMART, smart_step, {}),
    "r3f": (FusedR3F, r3f_step, {}),
}


def input_end_to_end(
    device: torch.device, backends: list[str], repeats: int, methods: tuple[str, ...] = tuple(INPUT_METHODS)
) -> list[tuple[str, str, float, float]]:
    """FreeLB, SMART and R3F training steps of the end-to-end BERT (:func:`_e2e_bert`, padded batch).

    Returns rows of (method, impl, seconds per step, step time / that of one plain training step, a forward and a
    backward pass): ``seed`` is the reference step (:mod:`fastadv.reference`: the public code's unfused ops), each
    backend the fused class on it. FreeLB's K passes and SMART's and R3F's extra forward passes are most of the
    ratio; the fused ops' share shows in the seed/backend difference.
    """
    model, batch = _e2e_bert(device)
    embedding = model.bert.embeddings.word_embeddings

    def plain() -> None:
        model.zero_grad()
        model(**batch).loss.backward()

    def forward(logits: bool) -> Callable[[], object]:
        return (lambda: model(**batch)) if logits else (lambda: model(**batch).loss)

    rows = []
    for method in methods:
        cls, reference_step, options = INPUT_METHODS[method]
        closure = forward(method != "freelb")
        rows.append((method, "plain step", time_call(plain, device, repeats=repeats), 1.0))
        steps = {"seed": functools.partial(reference_step, embedding, closure, batch["attention_mask"], **options)}
        for name in backends:
            attacker = cls(model, backend=name, **options)
            steps[name] = functools.partial(attacker.step, closure, batch["attention_mask"])
        for impl, run in steps.items():

            def step(run: Callable[[], object] = run) -> None:
                model.zero_grad()
                run()

            base, seconds = _alternating(plain, step, device, repeats)
            rows.append((method, impl, seconds, seconds / base))
    return rows


def _op_calls(ops, weight: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One call of each op of the backend module ``ops`` on one tensor whose gradient is non-zero in rows ``idx``."""
    backup = torch.empty(len(idx), weight.shape[1], device=weight.device, dtype=weight.dtype)
    flags = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    fresh = torch.empty_like(flags)
    scales = torch.full((1,), 1e-3, device=weight.device)
    delta = ops.measure([weight], [grad], [idx], [backup], [0], scales)
    return {
        "scan": lambda: ops.scan([grad], [flags], [fresh]),
        "row_sumsq": lambda: ops.row_sumsq([grad], [idx]),
        "perturb": lambda: ops.perturb([weight], [grad], [idx], [backup], [0], scales),
        "measure": lambda: ops.measure([weight], [grad], [idx], [backup], [0], scales),
        "project": lambda: ops.project([weight], [grad], [idx], [backup], scales, delta, 1e9),
        "restore": lambda: ops.restore([weight], [idx], [backup]),
    }


def op_bandwidth(
    device: torch.device, backends: list[str], dtype: torch.dtype = torch.float32, repeats: int = 5
) -> list[tuple[str, str, str, float, float]]:
    """Each op of each backend alone at XLM-R size: rows of (op, gradient, backend, GB/s, fraction of the bandwidth
    of a plain ``copy_`` moving as many bytes on the same device).

    Bytes counted are those the op must move: scan reads the gradient (and a flag per row, writes one); row_sumsq
    reads the listed gradient rows; perturb (FGM, first step) reads W and G rows and writes the backup and W rows;
    measure reads W and G rows and writes the backup; project reads W, G and backup rows and writes W; restore reads
    the backup and writes W.
    """
    rows, dim = SHAPES["xlm-r"]
    rows = max(2, int(rows * bench_scale()))
    weight = torch.randn(rows, dim, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    row_bytes = weight.element_size() * dim
    out = []
    for gradient in ("rows", "dense"):
        if gradient == "dense":
            idx = torch.arange(rows, device=device)
        else:
            idx = torch.randperm(rows, device=device)[: max(1, min(rows // 2, int(TOUCHED_ROWS * bench_scale())))]
        grad = torch.zeros_like(weight)
        grad[idx] = torch.randn(len(idx), dim, device=device, dtype=dtype)
        touched = len(idx) * row_bytes
        moved = {
            "scan": grad.numel() * grad.element_size() + 2 * rows,
            "row_sumsq": touched,
            "perturb": 4 * touched,
            "measure": 3 * touched,
            "project": 4 * touched,
            "restore": 2 * touched,
        }
        src = torch.empty(max(moved.values()) // 8 + 1, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        for name in backends:
            ops = resolve_backend(name, device)
            calls = _op_calls(ops, weight, grad, idx.sort().values)
            for op, call in ((op, calls[op]) for op in contract.OPS if op in calls and op in ops.native):
                if op == "scan" and gradient == "dense":
                    continue  # the same read either way
                half = moved[op] // 8  # fp32 elements: a copy of n bytes moves 2n, a read and a write
                copy_seconds = time_call(lambda a=dst[:half], b=src[:half]: a.copy_(b), device, repeats)
                seconds = time_call(call, device, repeats)
                out.append((op, gradient, name, moved[op] / seconds / 1e9, copy_seconds / seconds))
    out.extend(_input_step_bandwidth(device, backends, dtype, repeats))
    return out


def _input_step_bandwidth(
    device: torch.device, backends: list[str], dtype: torch.dtype, repeats: int
) -> list[tuple[str, str, str, float, float]]:
    """``input_step`` at a large FreeLB/SMART batch (32 x 512 tokens x 1024, a quarter padded): FreeLB's per-example
    l2 step with its l2 bound, and SMART's per-token inf step with its box. Bytes counted: one read of the gradient and
    of delta, one write of delta (the passes a group's norm and bound need again are the op's own cost)."""
    shape = (32, max(2, int(512 * bench_scale())), 1024)
    gen = torch.Generator(device).manual_seed(0)
    delta = 0.01 * torch.randn(shape, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    mask = torch.arange(shape[1], device=device) < (shape[1] * 3) // 4
    mask = mask.expand(shape[0], -1).contiguous()
    moved = 3 * delta.numel() * delta.element_size()
    src = torch.empty(moved // 8 + 1, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_seconds = time_call(lambda: dst.copy_(src), device, repeats)  # a read and a write of moved / 2 bytes
    out = []
    for name in backends:
        ops = resolve_backend(name, device)
        for what, options in (
            ("example-l2", ("l2", False, 0.0, 1e-8, "l2", 1.0)),
            ("token-inf", ("inf", True, 1e-6, 0.0, "inf", 1e-3)),
        ):
            step = functools.partial(ops.input_step, delta, grad, mask, 0.1, *options)
            seconds = time_call(step, device, repeats)
            out.append(("input_step", what, name, moved / seconds / 1e9, copy_seconds / seconds))
    return out


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastadv.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="BERT-base shapes only")
    parser.add_argument("--e2e", action="store_true", help="also time whole training steps of a transformers BERT")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speed-ups over the seed")
    parser.add_argument(
        "--compiled-seed", action="store_true", help="also time the seed's math under torch.compile (compiles first)"
    )
    parser.add_argument(
        "--bandwidth", action="store_true", help="only each op alone: GB/s and the fraction of a device copy's"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.bandwidth:
        backends = [i for i in implementations(device) if i != "seed" and "+" not in i]
        print(f"fastadv.bench --bandwidth on {device}, torch {torch.__version__}, XLM-R fp32, scale {bench_scale()}")
        print(f"{'op':<10} {'gradient':<9} {'backend':<8} {'GB/s':>8} {'of copy':>8} {f'>= {COPY_TARGET:.0%}':>7}")
        for op, gradient, name, rate, fraction in op_bandwidth(device, backends, repeats=args.repeats):
            verdict = "yes" if fraction >= COPY_TARGET else "no"
            print(f"{op:<10} {gradient:<9} {name:<8} {rate:>8.1f} {fraction:>7.0%} {verdict:>7}")
        return 0
    impls = implementations(device)
    if args.compiled_seed:
        impls.insert(1, COMPILED_SEED)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"fastadv.bench on {device} ({name}), torch {torch.__version__}, scale {bench_scale()}")
    results = []
    matrix = cases(args.quick) + ([] if args.quick else llm_cases())
    for case in matrix:
        results.extend(time_case(case, device, [DEFAULT, "seed"] if case.shape in LLM_SHAPES else impls, args.repeats))
        print(f"timed {case.group}", file=sys.stderr, flush=True)
    backends = [i for i in impls if is_fastadv(i) and "+" not in i]
    scans = [] if args.quick else scan_vs_read(device, backends, args.repeats)
    floors = {case: tied_floor(case, device, args.repeats) for case in matrix if case.gradient == "tied"}
    e2e = end_to_end(device, impls, args.repeats) if args.e2e else []
    input_e2e = input_end_to_end(device, backends, args.repeats) if args.e2e else []
    for case in matrix:  # memory last: see measure_peaks
        measure_peaks(case, device, [r for r in results if r.case == case])

    header = f"{'case':<32} {'impl':<11} {'ms/call':>10} {'vs seed':>8} {'extra peak':>11} {'held after':>11}"
    print(header + "\n" + "-" * len(header))
    seed = {r.case: r for r in results if r.impl == "seed"}
    slow = 0
    for r in results:
        speedup = seed[r.case].seconds / r.seconds
        miss = is_fastadv(r.impl) and full_scale() and speedup < MIN_SPEEDUP
        slow += miss
        print(
            _red(
                f"{r.case.group:<32} {r.impl:<11} {r.seconds * 1e3:>10.2f} {speedup:>7.1f}x"
                f" {_fmt_bytes(r.extra_bytes):>11} {_fmt_bytes(r.held_bytes):>11}",
                miss,
            )
        )
    if slow:
        print(_red(f"{slow} rows of fastadv under {MIN_SPEEDUP}x the seed", True))
    if scans:
        print(
            f"\n{'FGM scan (xlm-r fp32 rows)':<32} {'backend':<11} {'ms/call':>10} {'read G':>8} {'ratio':>7}"
            f" {f'<= {SCAN_TARGET}x':>7}"
        )
    for name, seconds, read in scans:
        checked = device.type == "cpu" and full_scale()  # the target is the CPU's; shrunk, fixed costs dominate
        miss = checked and seconds / read > SCAN_TARGET
        verdict = ("no" if miss else "yes") if checked else "-"
        print(
            _red(
                f"{'attack+restore / one read of G':<32} {name:<11} {seconds * 1e3:>10.2f} {read * 1e3:>8.2f}"
                f" {seconds / read:>6.2f}x {verdict:>7}",
                miss,
            )
        )
    if any(case.shape in LLM_SHAPES for case in matrix):
        print("\nLLM embedding (fgm, defaults): measure = value (target)")
    for case in matrix:
        if case.shape in LLM_SHAPES:
            by_impl = {r.impl: r for r in results if r.case == case}
            measures = llm_measures(by_impl[DEFAULT], by_impl["seed"], floors.get(case))
            floor = f"floor {TIED_FLOOR_COPIES * floors[case][1] * 1e3:.1f} ms, " if case in floors else ""
            print(
                f"{case.group:<32} {floor}"
                + ", ".join(
                    _red(f"{name} = {value:.3g} ({how} {target:.3g})", full_scale() and not meets(value, how, target))
                    for name, (value, how, target) in measures.items()
                )
            )
    if e2e:
        print(f"\n{'end to end (BERT, 250002 vocab)':<32} {'impl':<11} {'ms/step':>10} {'/ no-op':>8}")
        for method, impl, seconds, ratio in e2e:
            print(f"{method:<32} {impl:<11} {seconds * 1e3:>10.1f} {ratio:>7.2f}x")
        print(f"\n{'input space (BERT, padded batch)':<32} {'impl':<11} {'ms/step':>10} {'/ plain':>8}")
        for method, impl, seconds, ratio in input_e2e:
            print(f"{method:<32} {impl:<11} {seconds * 1e3:>10.1f} {ratio:>7.2f}x")
    if args.plot:
        _plot(results, args.plot)
    return 0


def _plot(results: list[Result], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.case.group for r in results))
    impls = [i for i in dict.fromkeys(r.impl for r in results) if i != "seed"]
    seed = {r.case.group: r.seconds for r in results if r.impl == "seed"}
    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 0.6), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        speedup = {r.case.group: seed[r.case.group] / r.seconds for r in results if r.impl == impl}
        ax.bar([i + k * width for i in range(len(groups))], [speedup.get(g, 0) for g in groups], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_ylabel("speed-up over the seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

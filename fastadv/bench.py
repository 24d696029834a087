"""Benchmarks: the seed's classes against every available backend on the same shapes.

``python -m fastadv.bench`` prints, per case, the time per call, the speed-up over the seed, the extra peak memory of
the call and the memory still held after it (at full scale a row of fastadv under 1.5x the seed is red); then FGM's
scan against one read of the gradient, and FGM with the defaults on a Llama-3-sized bf16 embedding, untied and tied,
against their targets. ``--quick`` runs the BERT-base shapes only, ``--e2e`` adds whole training steps of a
``transformers`` BERT with a 250002-token vocabulary at full scale (and FreeLB, SMART and R3F steps against a plain
step), ``--plot FILE.png`` draws the speed-ups. ``FASTADV_BENCH_SCALE`` (e.g. ``0.01``) shrinks every shape, for CI;
every caption prints the shapes it used. The pytest-benchmark suite in ``benchmarks/`` uses the same cases and checks
the targets at full scale.

A "call" is what an attack costs besides the forward/backward passes: FGM ``attack`` + ``restore``; PGD k=3
``backup_grad``, three ``attack``s, ``restore_grad``, ``restore``; AWP ``attack`` + ``restore``. An implementation
``<backend>`` is a backend with ``rows="scan"``, ``<backend>+batch`` with ``rows="batch"`` (row hints; the call includes
recording the batch's lookup); end to end, ``<backend>+auto`` is the default, ``rows="auto"``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import importlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

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
#: The end-to-end BERT (:func:`_e2e_bert`): its vocabulary before scaling (XLM-R's), hidden size, layers and batch
#: (sequences, tokens); the padded batch masks tokens from ``E2E_PAD_FROM`` on in every other sequence.
E2E_VOCAB, E2E_HIDDEN, E2E_LAYERS, E2E_BATCH, E2E_PAD_FROM = 250002, 256, 2, (16, 64), 48
#: ``input_step`` alone (:func:`_input_step_bandwidth`): examples, tokens before scaling, hidden size.
INPUT_STEP_SHAPE = (32, 512, 1024)


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

    def describe(self) -> str:
        """The shape actually used, e.g. ``xlm-r 2500x768 bfloat16, 40 rows touched``."""
        rows, dim, touched = self.size()
        what = f"{touched} rows touched" if self.gradient == "rows" else f"every row ({self.gradient})"
        return f"{self.shape} {rows}x{dim} {str(self.dtype).removeprefix('torch.')}, {what}"


def e2e_vocab() -> int:
    """The vocabulary of the end-to-end BERT after scaling (at least 1000 tokens)."""
    return max(1000, int(E2E_VOCAB * bench_scale()))


def input_step_shape() -> tuple[int, int, int]:
    """The shape of :func:`_input_step_bandwidth`'s perturbation after scaling (its tokens scale)."""
    examples, tokens, hidden = INPUT_STEP_SHAPE
    return examples, max(2, int(tokens * bench_scale())), hidden


def machine(device: torch.device) -> str:
    """The machine in words: the GPU's name, or the CPU's model with its cores and torch's threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.multi_processor_count} SMs"
    return f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


class BenchModel(nn.Module):
    """What :func:`build_model` returns: a module holding one embedding (and, tied, an LM head sharing its weight)."""

    word_embeddings: nn.Embedding
    ids: torch.Tensor  # the rows the batch looked up
    lm_head: nn.Module


def build_model(case: Case, device: torch.device) -> BenchModel:
    """A module holding one ``word_embeddings`` embedding with the case's gradient already set; ``model.ids`` are the
    rows the batch looked up (every row for a dense gradient)."""
    rows, dim, touched = case.size()
    gen = torch.Generator(device=device).manual_seed(0)
    model = BenchModel()
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


def _record_lookup(model: BenchModel) -> None:
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
        for name, param in cast(nn.Module, self.model).named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                _compiled(_fgm_math)(param.data, param.grad, self.eps)


class _CompiledPGD(PGD):
    def attack(self, emb_name: str = "word_embeddings", is_first_attack: bool = False) -> None:
        for name, param in cast(nn.Module, self.model).named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                _compiled(_pgd_math)(param.data, param.grad, self.emb_backup[name], self.alpha, self.eps)


_PEERS = {"seed": (FGM, PGD, AWP), COMPILED_SEED: (_CompiledFGM, _CompiledPGD, None)}
_FUSED = (FusedFGM, FusedPGD, FusedAWP)
_METHODS = ("fgm", "pgd3", "awp")
_compiled_fns: dict[Callable[..., None], Callable[..., None]] = {}


def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    if fn not in _compiled_fns:
        _compiled_fns[fn] = torch.compile(fn, dynamic=False)
    return _compiled_fns[fn]


def make_attacker(impl: str, method: str, model: nn.Module) -> Any:
    """The attack object of ``method`` for ``impl``: "seed", ``COMPILED_SEED``, ``DEFAULT``, a backend
    (``rows="scan"``), or "<backend>+<rows>" (``rows="batch"``, or ``"auto"``, the default)."""
    which = _METHODS.index(method)
    if impl in _PEERS:
        peer = _PEERS[impl][which]
        if peer is None:
            raise ValueError(f"{impl!r} has no {method}")
        return peer(model)
    if impl == DEFAULT:
        return _FUSED[which](model)
    backend, _, rows = impl.partition("+")
    if method == "awp":
        return FusedAWP(model, backend=backend)
    return (FusedFGM if method == "fgm" else FusedPGD)(model, backend=backend, rows=rows or "scan")


def attack_call(impl: str, method: str, model: BenchModel) -> Callable[[], None]:
    """One call of ``method`` through ``impl`` on ``model``."""
    attacker = make_attacker(impl, method, model)
    record: Callable[[BenchModel], None] = _record_lookup if impl.endswith("+batch") or impl == DEFAULT else _no_lookup
    record(model)  # construction registered the hooks; the first attack needs a recorded lookup
    if method in ("fgm", "awp"):

        def call() -> None:
            attacker.attack()
            attacker.restore()
            record(model)

        return call

    def pgd_call() -> None:
        attacker.backup_grad()
        for t in range(PGD_K):
            attacker.attack(is_first_attack=t == 0)
            record(model)
        attacker.restore_grad()
        attacker.restore()

    return pgd_call


def _no_lookup(model: BenchModel) -> None:
    """Nothing to record: without row hints the lookup has no hooks."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
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


def memory_of(fn: Callable[[], object], device: torch.device) -> tuple[int | None, int | None]:
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
    extra, seed_extra = default.extra_bytes, seed.extra_bytes
    share = extra / seed_extra if extra is not None and seed_extra else math.nan
    if floor is None:
        return {
            "x seed": (seed.seconds / default.seconds, ">=", LLM_SPEEDUP),
            "peak/seed's": (share, "<=", LLM_PEAK_SHARE),
        }
    seconds, copy = floor
    return {
        "x floor": (seconds / (TIED_FLOOR_COPIES * copy), "<=", TIED_TARGET),
        "peak/seed's": (
            share,
            "<=",
            backup / seed_extra + LLM_PEAK_SHARE if extra is not None and seed_extra else math.nan,
        ),
        "held/backup": (default.held_bytes / backup if default.held_bytes is not None else math.nan, "<=", 0.02),
    }


def meets(value: float, how: str, target: float) -> bool:
    """Whether ``value`` meets ``target`` (unknown values, NaN, do)."""
    return not (value > target if how == "<=" else value < target)


def _red(text: str, miss: bool, colour: bool | None = None) -> str:
    """``text`` in red where it misses its target and ``colour`` (by default: on a terminal)."""
    if colour is None:
        colour = sys.stdout.isatty()
    return f"\033[31m{text}\033[0m" if miss and colour else text


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
    """The end-to-end model, a transformers BERT (:data:`E2E_VOCAB` tokens scaled by :func:`e2e_vocab`, hidden 256,
    2 layers), and a batch of 16x64 tokens whose attention mask pads the end of half the rows."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab = e2e_vocab()
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=E2E_HIDDEN,
        num_hidden_layers=E2E_LAYERS,
        num_attention_heads=4,
        intermediate_size=4 * E2E_HIDDEN,
    )
    torch.manual_seed(0)
    model = cast(nn.Module, BertForSequenceClassification(config)).to(device)
    mask = torch.ones(E2E_BATCH, dtype=torch.long, device=device)
    mask[::2, E2E_PAD_FROM:] = 0
    batch = {
        "input_ids": torch.randint(0, vocab, E2E_BATCH, device=device),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, E2E_BATCH[:1], device=device),
    }
    return model, batch


def e2e_caption() -> str:
    """The end-to-end BERT in words, with the vocabulary it really has."""
    sequences, tokens = E2E_BATCH
    return (
        f"BERT, vocabulary {e2e_vocab()}, hidden {E2E_HIDDEN}, {E2E_LAYERS} layers, batch {sequences}x{tokens} tokens"
    )


def _alternating(
    baseline: Callable[[], object], attacked: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``attacked``, timed alternately so that drifts of the machine's speed cancel
    in their ratio, each first in turn so that neither always pays for freeing what the other allocated."""
    times: dict[Callable[[], object], list[float]] = {baseline: [], attacked: []}
    for r in range(2 * repeats + 1):
        for fn in (baseline, attacked) if r % 2 else (attacked, baseline):
            times[fn].append(time_call(fn, device, 1, 0))
    base, seconds = (statistics.median(t[1:]) for t in times.values())
    return base, seconds


def end_to_end(
    device: torch.device, impls: list[str], repeats: int, methods: tuple[str, ...] = _METHODS
) -> list[tuple[str, str, float, float]]:
    """Training steps of a transformers BERT (:func:`_e2e_bert`; 250002-token vocabulary at full scale).

    Returns rows of (method, impl, seconds per step, step time / that of the same loop with attacks that do nothing:
    the attack's own cost), each step timed alternately with the no-attack step; ``impls`` with row hints run as the
    default, ``rows="auto"``. The first row of each method is the no-attack step itself.
    """
    model, batch = _e2e_bert(device)
    del batch["attention_mask"]

    def closure() -> torch.Tensor:
        return model(**batch).loss

    def step(attacker: Any, method: str) -> None:
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
INPUT_METHODS: dict[str, tuple[Callable[..., Any], Callable[..., object], dict[str, Any]]] = {
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
    embedding = cast(nn.Embedding, model.get_submodule("bert.embeddings.word_embeddings"))

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
        steps: dict[str, Callable[[], object]] = {
            "seed": functools.partial(reference_step, embedding, closure, batch["attention_mask"], **options)
        }
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


def bandwidth_case(dtype: torch.dtype = torch.float32) -> Case:
    """The embedding :func:`op_bandwidth` times each op on: XLM-R's, the batch's rows touched (or every row)."""
    return Case("xlm-r", dtype, "rows", "fgm")


def _ops(name: str, device: torch.device) -> ModuleType:
    """The ops of backend ``name`` on ``device``."""
    ops = resolve_backend(name, device)
    if ops is None:  # only without a device
        raise RuntimeError(f"backend {name!r} has no ops on {device}")
    return ops


def _op_calls(
    ops: ModuleType, weight: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor
) -> dict[str, Callable[[], object]]:
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
    rows, dim, touched_rows = bandwidth_case(dtype).size()
    weight = torch.randn(rows, dim, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    row_bytes = weight.element_size() * dim
    out = []
    for gradient in ("rows", "dense"):
        if gradient == "dense":
            idx = torch.arange(rows, device=device)
        else:
            idx = torch.randperm(rows, device=device)[:touched_rows]
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
            ops = _ops(name, device)
            calls = _op_calls(ops, weight, grad, idx.sort().values)
            for op, call in ((op, calls[op]) for op in contract.OPS if op in calls and op in ops.native):
                if op == "scan" and gradient == "dense":
                    continue  # the same read either way
                half = moved[op] // 8  # fp32 elements: a copy of n bytes moves 2n, a read and a write
                copy_seconds = time_call(functools.partial(dst[:half].copy_, src[:half]), device, repeats)
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
    shape = input_step_shape()
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
        ops = _ops(name, device)
        for what, options in (
            ("example-l2", ("l2", False, 0.0, 1e-8, "l2", 1.0)),
            ("token-inf", ("inf", True, 1e-6, 0.0, "inf", 1e-3)),
        ):
            step = functools.partial(ops.input_step, delta, grad, mask, 0.1, *options)
            seconds = time_call(step, device, repeats)
            out.append(("input_step", what, name, moved / seconds / 1e9, copy_seconds / seconds))
    return out


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{round(n / 2**20):,d} MiB"


def _fmt(value: float, spec: str = ".3g") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str,
    misses: Sequence[bool] = (),
    colour: bool | None = None,
) -> list[str]:
    """The lines of a table: the header, a rule, then ``rows``; each column as wide as its widest cell (the header's
    included), two spaces apart, aligned as ``align`` says, a character a column: ``>`` right (numbers), ``<`` left.
    A row whose ``misses`` is true is red (``colour``: on a terminal by default), coloured after padding, so that the
    escape codes take no column."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        assert len(cells) == len(widths), cells
        return "  ".join(c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out.extend(_red(line(row), k < len(misses) and misses[k], colour) for k, row in enumerate(rows))
    return out


def _print(lines: list[str]) -> None:
    print("\n".join(lines))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


EPILOG = f"""environment:
  FASTADV_BENCH_SCALE  factor on every shape: the rows of each embedding (at
                       least 2) and the rows a batch touches, the end-to-end
                       BERT's vocabulary (at least 1000) and input_step's
                       tokens; e.g. 0.01 for a smoke run. Every caption prints
                       the shapes used. The targets (red rows, yes/no verdicts)
                       are checked at full scale only (default: 1)
  FASTADV_BACKEND      the backend that backend="auto" stands for in the
                       "{DEFAULT}" rows (the LLM cases: fastadv's defaults);
                       every other row names its backend (default: unset, the
                       first backend that runs on the device)

examples:
  python -m fastadv.bench --quick
  FASTADV_BENCH_SCALE=0.01 python -m fastadv.bench --repeats 1 --e2e --plot a.png
  python -m fastadv.bench --bandwidth --device cuda"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fastadv.bench``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="python -m fastadv.bench",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="time the BERT-base cases only: no XLM-R, LLaMA or Llama-3 cases, no scan against a read of the gradient"
        " (default: every case)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help=f"also time whole training steps of a transformers BERT ({E2E_VOCAB}-token vocabulary at full scale):"
        " FGM, PGD k=3 and AWP against the same loop with no attack, FreeLB, SMART and R3F against a plain step;"
        ' needs transformers: pip install -e ".[transformers]" (default: off)',
    )
    parser.add_argument(
        "--device",
        default=device,
        help="the device to run on, e.g. cpu, cuda, cuda:1 (default: cuda when one is available, else cpu; here"
        " %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        metavar="N",
        help="timed calls per measurement after one warm-up call; the median counts (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write a bar chart of each case's speed-ups over the seed to FILE.png; needs matplotlib, the plot"
        ' extra: pip install -e ".[plot]" (default: no chart)',
    )
    parser.add_argument(
        "--compiled-seed",
        action="store_true",
        help="also time the seed's math compiled by torch.compile, the peer a user would try first (compiles before"
        " timing; default: off)",
    )
    parser.add_argument(
        "--bandwidth",
        action="store_true",
        help="instead of the cases, time each op of each backend alone on an XLM-R-sized embedding: GB/s and the"
        f" fraction of a device copy's bandwidth, against the {COPY_TARGET * 100:.0f}%% target (default: off)",
    )
    return parser


def _check_needs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit at once (before timing anything) where an option cannot be honoured at the end of the run."""
    if args.plot and args.bandwidth:
        parser.error("--plot draws the cases' speed-ups, and --bandwidth times none")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            parser.error(f"--plot {args.plot}: there is no folder {folder}")
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error(
                "--plot needs matplotlib, which is not installed; install the plot extra,"
                ' from a checkout: pip install -e ".[plot]" (or pip install matplotlib)'
            )
    if args.e2e:
        try:
            importlib.import_module("transformers")
        except ImportError:
            parser.error(
                "--e2e needs transformers, which is not installed; install the transformers extra,"
                ' from a checkout: pip install -e ".[transformers]"'
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_needs(parser, args)
    device = torch.device(args.device)
    where = f"on {device} ({machine(device)}), torch {torch.__version__}, {datetime.date.today()}"
    if args.bandwidth:
        backends = [i for i in implementations(device) if i != "seed" and "+" not in i]
        print(f"fastadv.bench --bandwidth {where}, scale {bench_scale()}")
        examples, tokens, hidden = input_step_shape()
        print(
            f"each op alone on {bandwidth_case().describe()} (dense: every row);"
            f" input_step on {examples}x{tokens}x{hidden} float32"
        )
        rows = [
            [op, gradient, name, f"{rate:.1f}", f"{fraction:.0%}", "yes" if fraction >= COPY_TARGET else "no"]
            for op, gradient, name, rate, fraction in op_bandwidth(device, backends, repeats=args.repeats)
        ]
        _print(table(["op", "gradient", "backend", "GB/s", "of copy", f">= {COPY_TARGET:.0%}"], rows, "<<<>>>"))
        return 0
    impls = implementations(device)
    if args.compiled_seed:
        impls.insert(1, COMPILED_SEED)
    print(f"fastadv.bench {where}, scale {bench_scale()}")
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

    shapes = {case.shape: Case(case.shape, case.dtype, "rows", case.method).size() for case in matrix}
    print(
        "\nattack calls: time per call, the seed's time over it, the extra peak memory of a first call, what it holds"
        " after\nshapes (rows x dim, rows a batch touches; dense and tied: every row): "
        + ", ".join(f"{shape} {rows}x{dim} ({touched})" for shape, (rows, dim, touched) in shapes.items())
    )
    seed = {r.case: r for r in results if r.impl == "seed"}
    rows, misses = [], []
    for r in results:
        speedup = seed[r.case].seconds / r.seconds
        misses.append(is_fastadv(r.impl) and full_scale() and speedup < MIN_SPEEDUP)
        rows.append(
            [
                r.case.group,
                r.impl,
                f"{r.seconds * 1e3:.2f}",
                f"{speedup:.1f}x",
                _fmt_bytes(r.extra_bytes),
                _fmt_bytes(r.held_bytes),
            ]
        )
    _print(table(["case", "impl", "ms/call", "vs seed", "extra peak", "held after"], rows, "<<>>>>", misses))
    if any(misses):
        print("\n" + _red(f"{sum(misses)} rows of fastadv under {MIN_SPEEDUP}x the seed", True))
    if scans:
        checked = device.type == "cpu" and full_scale()  # the target is the CPU's; shrunk, fixed costs dominate
        print(
            '\nFGM attack + restore with rows="scan" against one read of the gradient, its floor;'
            f" {Case('xlm-r', torch.float32, 'rows', 'fgm').describe()}"
        )
        rows, misses = [], []
        for name, seconds, read in scans:
            misses.append(checked and seconds / read > SCAN_TARGET)
            verdict = ("no" if misses[-1] else "yes") if checked else "-"
            rows.append([name, f"{seconds * 1e3:.2f}", f"{read * 1e3:.2f}", f"{seconds / read:.2f}x", verdict])
        header = ["backend", "ms/call", "ms read G", "ratio", f"<= {SCAN_TARGET}x"]
        _print(table(header, rows, "<>>>>", misses))
    llm = [case for case in matrix if case.shape in LLM_SHAPES]
    if llm:
        llm_shapes = {(case.shape, case.dtype): Case(case.shape, case.dtype, "rows", "fgm").size() for case in llm}
        print(
            f'\nLLM embedding: FGM with the defaults ("{DEFAULT}") against the seed, on '
            + ", ".join(
                f"{shape} {rows}x{dim} {str(dtype).removeprefix('torch.')} (rows: {touched} touched; tied: every row)"
                for (shape, dtype), (rows, dim, touched) in llm_shapes.items()
            )
        )
        rows, misses = [], []
        for case in llm:
            by_impl = {r.impl: r for r in results if r.case == case}
            if case in floors:
                floor = TIED_FLOOR_COPIES * floors[case][1] * 1e3
                rows.append([case.group, f"floor ({TIED_FLOOR_COPIES} copies), ms", f"{floor:.1f}", "-", "-"])
                misses.append(False)
            for name, (value, how, target) in llm_measures(by_impl[DEFAULT], by_impl["seed"], floors.get(case)).items():
                met = meets(value, how, target)
                misses.append(full_scale() and not met)
                rows.append(
                    [
                        case.group,
                        name,
                        _fmt(value),
                        f"{how} {_fmt(target)}",
                        ("yes" if met else "no") if full_scale() else "-",
                    ]
                )
        _print(table(["case", "measure", "value", "target", "met"], rows, "<<>>>", misses))
    if e2e:
        print(f"\nend to end: training steps against the same loop with no attack, on a transformers {e2e_caption()}")
        rows = [[method, impl, f"{seconds * 1e3:.1f}", f"{ratio:.2f}x"] for method, impl, seconds, ratio in e2e]
        _print(table(["method", "impl", "ms/step", "/ no attack"], rows, "<<>>"))
    if input_e2e:
        print(
            f"\ninput space: training steps against a plain step, on the same {e2e_caption()}"
            f"\n(every other sequence padded from token {E2E_PAD_FROM})"
        )
        rows = [[method, impl, f"{seconds * 1e3:.1f}", f"{ratio:.2f}x"] for method, impl, seconds, ratio in input_e2e]
        _print(table(["method", "impl", "ms/step", "/ plain"], rows, "<<>>"))
    if args.plot:
        _plot(results, args.plot, device)
    return 0


def _plot(results: list[Result], path: str, device: torch.device) -> None:
    """A bar chart of each case's speed-ups over the seed, one bar per implementation, titled with the machine, the
    date and the scale; the legend outside the axes, so that it hides no bar."""
    matplotlib = importlib.import_module("matplotlib")  # checked importable before the run (main)
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")

    groups = list(dict.fromkeys(r.case.group for r in results))
    impls = [i for i in dict.fromkeys(r.impl for r in results) if i != "seed"]
    seed = {r.case.group: r.seconds for r in results if r.impl == "seed"}
    fig, ax = plt.subplots(figsize=(max(7.0, 2.5 + 0.45 * len(groups)), 5.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        speedup = {r.case.group: seed[r.case.group] / r.seconds for r in results if r.impl == impl}
        at = [i for i, group in enumerate(groups) if group in speedup]
        ax.bar([i + k * width for i in at], [speedup[groups[i]] for i in at], width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8, label="seed (1x)")
    if full_scale():
        ax.axhline(MIN_SPEEDUP, color="red", linestyle="--", linewidth=0.8, label=f"target ({MIN_SPEEDUP}x)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(groups) - 0.5 + 0.8 - width)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_ylabel("speed-up over the seed (its time / this one's; log scale)")
    ax.set_xlabel("case: method-shape-dtype-gradient; a call is attack + restore (PGD: its k=3 steps)")
    scale = "full shapes" if full_scale() else f"shapes scaled by {bench_scale()} (targets not checked)"
    fig.suptitle("fastadv: attack-call speed-up over the seed", fontweight="bold")
    ax.set_title(
        f"{machine(device)}; torch {torch.__version__}; {datetime.date.today()}; {scale}", fontsize=8, color="dimgray"
    )
    ax.legend(title="implementation", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

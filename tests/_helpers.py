"""What several test modules share: twin models and their comparisons, the attacker factory, the seed's usage loops;
for the ops, the tensors of a case, valid input_step arguments and poisoned buffers; for the training frameworks, the
hand-written loop they must match, the two-process runs and tiny transformers models.

Test modules import from here, never from conftest (fixtures only) or from one another; the bit and ulp comparisons
are :mod:`fastadv._bits`, the self-check's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastadv import FusedFreeLB, FusedGradientPenalty, FusedR3F, FusedSMART, FusedVAT, reference
from fastadv._bits import ulp_distance
from fastadv.backends import available_backends
from fastadv.methods import method
from fastadv.reference import AWP, FGM, PGD, awp_step, fgm_step, pgd_step

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends()


class BertEmbeddings(nn.Module):
    """BERT's embedding block, named as in BERT: word and position embeddings, summed, then a LayerNorm."""

    def __init__(self, vocab: int, dim: int, positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class TinyEncoder(nn.Module):
    """A BERT-shaped toy: word/position embeddings, an embedding LayerNorm, a head; optionally tied to an LM head."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 16,
        tied: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = DEVICE,
    ):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, dim, positions=32)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embeddings.word_embeddings.weight
        self.to(device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embeddings(ids)))
        logits = self.lm_head(h).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def batch(vocab: int = 64, size: tuple[int, int] = (4, 6), low: int = 0) -> torch.Tensor:
    return torch.randint(low, vocab, size, device=DEVICE)


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.to(actual.dtype).isnan()), "NaN pattern differs"
    finite = ~actual.isnan()
    worst = int(ulp_distance(actual[finite], expected[finite]).max()) if finite.any() else 0
    assert worst <= ulps, f"{worst} ulps apart (allowed {ulps})"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: tight tolerance; bf16/fp16: one ulp of the output (``expected`` may be a wider-precision oracle)."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-6)
    else:
        assert_ulps(actual, expected, 1)


HALF = [torch.bfloat16, torch.float16]
KINDS = ("fgm", "pgd", "awp")
#: The hyperparameters of :func:`make_attacker` unless a test gives others.
HYPER = {"fgm": {"eps": 0.5}, "pgd": {"eps": 0.2, "alpha": 0.1}, "awp": {"adv_eps": 0.02}}
#: What the seed's usage code does per kind without a ``k``: PGD's ``pgd_k = 3``, AWP's ``adv_step = 1``.
DEFAULT_K = {"fgm": 1, "pgd": 3, "awp": 1}


def twins(**kwargs) -> tuple[TinyEncoder, TinyEncoder]:
    """Two identical :class:`TinyEncoder` models: one for fastadv, one for the reference."""
    model = TinyEncoder(**kwargs)
    return model, copy.deepcopy(model)


def twins_with_grads(
    edit: Callable[[nn.Module, torch.Tensor], None] | None = None, **kwargs
) -> tuple[TinyEncoder, TinyEncoder, torch.Tensor]:
    """:func:`twins` after a backward pass of each on the same batch, then ``edit(model, batch)`` on each (to set a
    gradient by hand, say); also returns the batch."""
    fused, ref = twins(**kwargs)
    ids = batch()
    for m in (fused, ref):
        m(ids).backward()
        if edit is not None:
            edit(m, ids)
    return fused, ref, ids


def assert_same_params(fused: nn.Module, ref: nn.Module) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert a.shape == b.shape, name
        assert_matches(a.detach(), b.detach())


def assert_same_grads(fused: nn.Module, ref: nn.Module) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert_matches(a.grad, b.grad)


def widened(model: nn.Module) -> nn.Module:
    """An fp32 copy of a half-precision model, with its gradients: the oracle runs the reference on it."""
    wide = copy.deepcopy(model).float()
    for p, q in zip(model.parameters(), wide.parameters()):
        q.grad = None if p.grad is None else p.grad.float()
    return wide


def make_attacker(
    kind: str, model: nn.Module, backend: str | None = None, *, emb_name: str = "word_embeddings", **options
):
    """fastadv's class for ``kind`` ("fgm", "pgd", "awp") on ``backend``, or with ``backend=None`` the seed's class
    (:mod:`fastadv.reference`), configured alike: :data:`HYPER` updated with ``options`` (which may add fastadv-only
    options such as ``rows``). FGM and PGD attack ``emb_name``; the seed's classes take it in ``attack``/``restore``,
    so it is bound there."""
    options = {**HYPER[kind], **options}
    if backend is not None:
        if kind != "awp":
            options["emb_name"] = emb_name
        return method(kind).build(model, backend=backend, **options)
    attacker = {"fgm": FGM, "pgd": PGD, "awp": AWP}[kind](model, **options)
    if kind != "awp" and emb_name != "word_embeddings":
        attacker.attack = functools.partial(attacker.attack, emb_name)
        attacker.restore = functools.partial(attacker.restore, emb_name)
    return attacker


def adversarial_step(
    kind: str,
    attacker,
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    k: int | None = None,
    use_step: bool = False,
) -> torch.Tensor:
    """One batch of adversarial training: the seed's usage code for ``kind`` (``fgm_step``/``pgd_step``/``awp_step``,
    ``k`` passes, :data:`DEFAULT_K` without one), or with ``use_step`` fastadv's ``attacker.step``. The clean loss."""
    k = DEFAULT_K[kind] if k is None else k
    if use_step:
        return attacker.step(closure) if kind == "fgm" else attacker.step(closure, k=k)
    if kind == "fgm":
        return fgm_step(attacker, closure)
    if kind == "pgd":
        return pgd_step(attacker, model, closure, k)
    return awp_step(attacker, model, closure, k)


def train(
    model: nn.Module,
    attacker,
    kind: str,
    *,
    steps: int = 4,
    k: int | None = None,
    seed: int = 1234,
    size: tuple[int, int] = (4, 6),
    lr: float = 0.1,
    momentum: float = 0.0,
    micro_batches: int = 1,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rows: slice = slice(None),
    device: torch.device = DEVICE,
    use_step: bool = False,
) -> list[float]:
    """A training loop around :func:`adversarial_step`: ``steps`` SGD steps, each after ``micro_batches`` batches of
    ids of ``size`` (the rows ``rows`` of each: this process's share) from a generator seeded with ``seed``; the loss
    is ``forward(ids)`` (``model(ids)`` by default), the optimizer steps through ``scaler`` when given. The attack
    object is built by the caller (on ``model`` or a wrapper of it); the usage code gets ``model.module`` for a wrapped
    model. Returns the clean losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    inner = model.module if hasattr(model, "module") else model
    forward = model if forward is None else forward
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for _ in range(steps):
        for _ in range(micro_batches):
            ids = torch.randint(0, 64, size, device=device, generator=gen)[rows]
            closure = functools.partial(forward, ids)
            losses.append(adversarial_step(kind, attacker, inner, closure, k, use_step).item())
        optimizer_step(model, opt, scaler, None)
    return losses


def assert_step_matches_the_seed(kind: str, backend: str, k: int | None = None, **options) -> None:
    """fastadv's ``step`` against the seed's usage code on one batch: the same clean loss, gradients and weights.
    ``options`` configure both attack objects (see :func:`make_attacker`); ``rows`` only fastadv's."""
    fused, ref = twins()
    ids = batch()
    loss = adversarial_step(
        kind, make_attacker(kind, fused, backend, **options), fused, lambda: fused(ids), k, use_step=True
    )
    options.pop("rows", None)
    want = adversarial_step(kind, make_attacker(kind, ref, None, **options), ref, lambda: ref(ids), k)
    assert loss.item() == want.item()
    assert_same_grads(fused, ref)
    assert_same_params(fused, ref)


# ---- the ops ----


def make_tensors(
    specs: Sequence[tuple], device: torch.device, density: float = 0.3
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and gradients, one pair per spec ``(rows, cols, dtype[, gradient dtype])``; each gradient row is
    non-zero with probability ``density`` (one row at least)."""
    params, grads = [], []
    for rows, cols, dtype, *grad_dtype in specs:
        params.append(torch.randn(rows, cols, device=device).to(dtype))
        keep = torch.rand(rows, 1, device=device) < density
        keep[torch.randint(rows, (1,))] = True
        grads.append((torch.randn(rows, cols, device=device) * keep).to(grad_dtype[0] if grad_dtype else dtype))
    return params, grads


def nonzero_rows(grad: torch.Tensor) -> torch.Tensor:
    return (grad != 0).any(dim=1).nonzero().view(-1)


def clones(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def input_step_args() -> dict[str, Any]:
    """Keyword arguments of ``input_step`` that every backend takes: a ``[2, 3, 8]`` CPU ``delta``, its gradient, no
    mask, an l2 step bounded to an l2 ball. Tests of the argument checks change one or two of them."""
    return {
        "delta": torch.zeros(2, 3, 8),
        "grad": torch.zeros(2, 3, 8),
        "mask": None,
        "lr": 0.1,
        "norm": "l2",
        "per_token": False,
        "denom_eps": 1e-6,
        "denom_floor": 1e-8,
        "bound": "l2",
        "radius": 1.0,
    }


@contextlib.contextmanager
def poisoned_buffers():
    """Every ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` (the ops' outputs, partial sums) comes
    back full of NaN (True, 1 for other dtypes)."""

    def poisoned(make):
        def alloc(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(math.nan if out.is_floating_point() else 1)

        return alloc

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in [(torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")]:
            patch.setattr(owner, name, poisoned(getattr(owner, name)))
        yield


# ---- training frameworks (Lightning, accelerate): the hand-written loop they must match ----

#: PGD and AWP passes per step in the framework tests (AWP with 2 covers the earlier gradients put back before its
#: last pass).
FRAMEWORK_K = {"fgm": 1, "pgd": 2, "awp": 2}
#: Their hyperparameters: large enough that training with the attack ends far from training without.
FRAMEWORK_HYPER = {"fgm": {"eps": 2.0}, "pgd": {"eps": 2.0, "alpha": 1.0}, "awp": {"adv_eps": 0.1}}


def framework_batches(count: int, seed: int = 5, rows: slice = slice(None)) -> list[torch.Tensor]:
    """``count`` CPU batches of ids of :class:`TinyEncoder`'s vocabulary; ``rows``: this process's share of each."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 6), generator=gen)[rows] for _ in range(count)]


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter of ``model``, detached, in one flat tensor."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_matches_and_attacked(actual: torch.Tensor, want: torch.Tensor, plain: torch.Tensor) -> None:
    """Flat fp32 weights after training: ``actual`` within fp32 tolerance of ``want`` (the hand-written loop's), and
    ``want`` far outside it from ``plain`` (the same training without an attack), so that an attack that did nothing
    fails."""
    rtol, atol = 1e-5, 1e-6
    torch.testing.assert_close(actual, want, rtol=rtol, atol=atol)
    assert (want - plain).abs().max() > 10 * (atol + rtol * want.abs().max()), "the attack changed nothing"


def _seed_awp_step(awp, model: nn.Module, closure: Callable[[], torch.Tensor], k: int) -> None:
    """:func:`fastadv.reference.awp_step` with gradient accumulation: the attack sees this micro-batch's gradient
    alone; earlier micro-batches' are put back before the last adversarial backward (under DDP, the one that
    all-reduces them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    earlier = [p.grad for p in params]
    model.zero_grad()
    closure().backward()
    for t in range(k):
        awp.attack()
        model.zero_grad()
        if t == k - 1:
            for p, grad in zip(params, earlier):
                p.grad = grad
        closure().backward()
    awp.restore()


def optimizer_step(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, clip: float | None
) -> None:
    """The end of a hand-written step: unscale, clip the gradients to ``clip``, step (through ``scaler``), zero."""
    if scaler is not None:
        scaler.unscale_(opt)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def seed_loop(
    model: nn.Module,
    kind: str | None,
    batches: Sequence[torch.Tensor],
    *,
    accumulate: int = 1,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr: float = 0.1,
    epochs: int = 1,
    start_epoch: int = 0,
    backend: str | None = None,
) -> None:
    """What a user writes by hand around the seed's classes and usage code (:mod:`fastadv.reference`, ``k`` from
    :data:`FRAMEWORK_K`, hyperparameters from :data:`FRAMEWORK_HYPER`): SGD, ``torch.autocast`` around each forward,
    each pass's loss divided by ``accumulate`` (and scaled by ``scaler``), DDP's ``no_sync`` on the micro-batches before
    the last of each step, clipping of the unscaled gradients, then the optimizer step. ``kind=None``: no attack; no
    attack before ``start_epoch`` either. ``model`` may be DDP-wrapped. With a ``backend``, fastadv's class on it and
    its ``step`` instead."""
    inner = model.module if hasattr(model, "module") else model
    attacker = None if kind is None else make_attacker(kind, model, backend, **FRAMEWORK_HYPER[kind])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for i, ids in enumerate(batches):
            last = (i + 1) % accumulate == 0 or i + 1 == len(batches)

            def closure(ids=ids):
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    loss = model(ids) / accumulate
                return loss if scaler is None else scaler.scale(loss)

            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                if attacker is None or epoch < start_epoch:
                    closure().backward()
                elif backend is not None:
                    adversarial_step(kind, attacker, inner, closure, FRAMEWORK_K[kind], use_step=True)
                elif kind == "fgm":
                    fgm_step(attacker, closure)
                elif kind == "pgd":
                    pgd_step(attacker, inner, closure, FRAMEWORK_K[kind])
                else:
                    _seed_awp_step(attacker, inner, closure, FRAMEWORK_K[kind])
            if last:
                optimizer_step(model, opt, scaler, clip)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """``examples/<name>.py``'s ``main(argv)``, run as ``python examples/<name>.py`` runs it (``examples/`` first on
    the path: the examples share ``_toy.py``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.main(argv)


def assert_toy_example_runs(
    example: str,
    methods: set[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv: Sequence[str] = (),
) -> None:
    """An example on ``examples/_toy.py``'s task, shortened: every method's results are finite, the adversarial
    loss exists where there is a method, and the table prints "-" where there is none."""
    results = run_example(example, ["--epochs", "1", "--train-size", "64", *argv], monkeypatch)
    assert set(results) == methods
    for name, r in results.items():
        assert all(math.isfinite(r[key]) for key in ("loss", "acc", "test_loss", "attacked_loss"))
        assert math.isnan(r["adv_loss"]) == (name == "none")
    out = capsys.readouterr().out
    assert "FGM-attacked loss" in out and "nan" not in out


def ddp_start(rank: int, world: int, steps: int, accumulate: int) -> tuple[list[torch.Tensor], nn.Module, torch.Tensor]:
    """What a framework's two-process test starts from, in each process: this rank's share of ``steps * accumulate``
    batches, the model every run starts from, and the weights of the hand-written loop without attack over them on
    the DDP-wrapped model."""
    batches = framework_batches(steps * accumulate, rows=slice(rank, None, world))
    torch.manual_seed(0)
    start = TinyEncoder(device="cpu")
    plain = copy.deepcopy(start)
    seed_loop(nn.parallel.DistributedDataParallel(plain), None, batches, accumulate=accumulate)
    return batches, start, flat_params(plain)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """One thread (much faster for models this small) and transformers' logs at errors only, for the block."""
    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)


_Model = TypeVar("_Model", bound="PreTrainedModel")

#: The size of the tests' transformers models: one layer, hidden size 16, two attention heads, 32 positions.
TINY_TRANSFORMER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
}


def tiny_transformer(
    model_cls: type[_Model], config_cls: type[PretrainedConfig], seed: int = 0, **config: Any
) -> _Model:
    """A randomly initialised ``model_cls`` (the random state seeded with ``seed``) of :data:`TINY_TRANSFORMER`'s
    size; ``config``: the vocabulary and the other ``config_cls`` values (which may override the size's)."""
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY_TRANSFORMER, **config}))


def tiny_llama(vocab: int, seed: int = 0, tied: bool = False, **config: Any) -> LlamaForCausalLM:
    """:func:`tiny_transformer` as a Llama causal LM of ``vocab`` tokens: two key/value heads, the LM head tied to the
    input embedding if ``tied``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return tiny_transformer(
        LlamaForCausalLM,
        LlamaConfig,
        seed,
        vocab_size=vocab,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        **config,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[[int, int], dict], world: int, out_dir: Path) -> list[dict]:
    """Runs ``worker(rank, world)`` in ``world`` spawned processes, on one thread each, in a gloo process group set up
    from the environment variables a launcher (torchrun) sets, which Lightning and accelerate read to find the
    processes they run in. Returns what each rank's ``worker`` returned (saved under ``out_dir``), in rank order."""
    mp.spawn(_run_rank, args=(worker, world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank-{rank}.pt") for rank in range(world)]


def _run_rank(rank: int, worker: Callable[[int, int], dict], world: int, port: int, out_dir: str) -> None:
    """One process of :func:`spawn_ranks`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0",
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(worker(rank, world), f"{out_dir}/rank-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# ---- the input-space methods (FreeLB, SMART, R3F, VAT, the gradient penalty) ----


class TinyClassifier(nn.Module):
    """A BERT-shaped classifier: word and position embeddings, LayerNorm, dropout, a masked mean over the tokens and a
    head; returns ``(loss, logits)`` (``labels`` float: a regression head and MSE)."""

    def __init__(
        self,
        vocab: int = 50,
        dim: int = 16,
        classes: int = 3,
        dropout: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = DEVICE,
    ):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, dim, positions=16)
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.to(device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.hidden(self.dropout(self.embeddings(ids))))
        weights = mask.to(h.dtype).unsqueeze(-1)
        logits = self.head((h * weights).sum(1) / weights.sum(1))
        if labels.is_floating_point():
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels), logits
        return nn.functional.cross_entropy(logits.float(), labels), logits


def input_batches(
    count: int, seed: int = 5, regression: bool = False, rows: slice = slice(None), device: torch.device = DEVICE
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches for :class:`TinyClassifier` (``rows``: this process's share): token ids, an attention mask
    padded at the end of some rows, labels."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 50, (4, 10), generator=gen, device=device)
        lengths = torch.randint(2, 11, (4,), generator=gen, device=device)
        mask = (torch.arange(10, device=device) < lengths[:, None]).long()
        labels = (
            torch.randn(4, generator=gen, device=device)
            if regression
            else torch.randint(0, 3, (4,), generator=gen, device=device)
        )
        batches.append({"ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]})
    return batches


#: Each method's configurations: (fused class, its reference step, keyword arguments both take).
INPUT_CASES = {
    "freelb-l2": (
        FusedFreeLB,
        reference.freelb_step,
        {"adv_lr": 0.1, "adv_steps": 3, "adv_init_mag": 0.5, "adv_max_norm": 0.3, "norm": "l2"},
    ),
    "freelb-linf": (
        FusedFreeLB,
        reference.freelb_step,
        {"adv_lr": 0.05, "adv_steps": 2, "adv_init_mag": 0.05, "adv_max_norm": 0.04, "norm": "linf"},
    ),
    "freelb-plain": (FusedFreeLB, reference.freelb_step, {"adv_lr": 0.1, "adv_steps": 2}),
    "smart-inf": (
        FusedSMART,
        reference.smart_step,
        {"alpha": 4.0, "steps": 2, "step_size": 0.1, "noise_var": 1e-3, "adv_eps": 0.05},
    ),
    "smart-l2-example": (
        FusedSMART,
        reference.smart_step,
        {"steps": 2, "step_size": 0.1, "noise_var": 1e-3, "norm": "l2", "per_token": False},
    ),
    "smart-sign": (FusedSMART, reference.smart_step, {"step_size": 0.01, "noise_var": 1e-3, "norm": "sign"}),
    "smart-default": (FusedSMART, reference.smart_step, {}),
    "smart-paper": (
        FusedSMART,
        reference.smart_step,
        {"steps": 2, "step_size": 0.1, "noise_var": 1e-3, "update": "paper", "adv_eps": 0.05},
    ),
    "smart-mse": (
        FusedSMART,
        reference.smart_step,
        {"steps": 2, "step_size": 0.1, "noise_var": 1e-3, "divergence": "mse"},
    ),
    "r3f": (FusedR3F, reference.r3f_step, {"r3f_lambda": 1.5, "eps": 1e-2}),
    "r3f-normal": (FusedR3F, reference.r3f_step, {"eps": 1e-2, "noise_type": "normal"}),
    "r3f-mse": (FusedR3F, reference.r3f_step, {"eps": 1e-2, "divergence": "mse"}),
    "vat": (FusedVAT, reference.vat_step, {"eps": 1.0, "alpha": 2.0}),
    "vat-k2": (FusedVAT, reference.vat_step, {"eps": 0.5, "xi": 1e-2, "power_iters": 2}),
    "vat-default": (FusedVAT, reference.vat_step, {}),
    "gradient_penalty": (FusedGradientPenalty, reference.gradient_penalty_step, {"epsilon": 10.0}),
    "gradient_penalty-default": (FusedGradientPenalty, reference.gradient_penalty_step, {}),
}


def input_forward(
    model: nn.Module, kind: str, batch: dict[str, torch.Tensor], divide: int = 1, autocast: torch.dtype | None = None
) -> Callable[[], object]:
    """The closure of ``kind``: FreeLB's and the gradient penalty's return the loss, the others' ``(loss, logits)``."""
    ids = batch["ids"]

    def forward():
        with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
            loss, logits = model(ids, batch["attention_mask"], batch["labels"])
        return loss / divide if kind.startswith(("freelb", "gradient_penalty")) else (loss / divide, logits)

    return forward


def input_train(
    model: nn.Module,
    kind: str,
    backend: str | None,
    batches: Sequence[dict],
    *,
    accumulate: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    autocast: torch.dtype | None = None,
    clip: float | None = None,
    lr: float = 0.1,
    seed: int = 1000,
) -> nn.Module:
    """SGD over ``batches``, ``accumulate`` micro-batches per step, with the fused class of ``kind`` on ``backend`` or
    (None) its reference step: the random state seeded with ``seed + i`` before micro-batch ``i`` (its noise and
    dropout masks), each backpropagated loss (SMART, R3F: with the regulariser) divided by ``accumulate`` and scaled
    by ``scaler``, DDP's ``no_sync`` before the
    last micro-batch of a step, the unscaled gradients clipped to ``clip``. Returns the unwrapped model."""
    cls, ref_step, options = INPUT_CASES[kind]
    inner = model.module if hasattr(model, "module") else model
    attacker = cls(model, backend=backend, **options) if backend else None

    def backward(loss: torch.Tensor) -> None:
        loss = loss / accumulate
        (loss if scaler is None else scaler.scale(loss)).backward()

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i, micro_batch in enumerate(batches):
        last = (i + 1) % accumulate == 0 or i + 1 == len(batches)
        forward = input_forward(model, kind, micro_batch, autocast=autocast)
        mask = micro_batch["attention_mask"]
        torch.manual_seed(seed + i)
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            if attacker is None:
                ref_step(inner.embeddings.word_embeddings, forward, mask, backward=backward, **options)
            else:
                attacker.run(forward, backward, mask)
        if last:
            optimizer_step(model, opt, scaler, clip)
    return inner

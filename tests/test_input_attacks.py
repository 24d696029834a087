"""FusedFreeLB, FusedSMART and FusedR3F against their oracles (fastadv.reference): whole training loops on every
backend, padding masks, mixed precision with a GradScaler, gradient accumulation, two DDP processes; misuse."""

from __future__ import annotations

import copy
import functools
import os
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import BACKENDS, DEVICE
from torch import nn

from fastadv import reference
from fastadv.input_attacks import FusedFreeLB, FusedR3F, FusedSMART


class TinyClassifier(nn.Module):
    """A BERT-shaped classifier: word and position embeddings, LayerNorm, dropout, a masked mean over the tokens and a
    head; returns ``(loss, logits)`` (``labels`` float: a regression head and MSE)."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 3, dropout: float = 0.1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = DEVICE):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, dim)
        self.embeddings.position_embeddings = nn.Embedding(16, dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.to(device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(pos)
        h = torch.tanh(self.hidden(self.dropout(self.embeddings.LayerNorm(h))))
        weights = mask.to(h.dtype).unsqueeze(-1)
        logits = self.head((h * weights).sum(1) / weights.sum(1))
        if labels.is_floating_point():
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels), logits
        return nn.functional.cross_entropy(logits.float(), labels), logits


def make_batch(generator: torch.Generator, size: tuple[int, int] = (4, 10), regression: bool = False,
               device: torch.device = DEVICE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, an attention mask padded at the end of some rows, labels."""
    ids = torch.randint(0, 50, size, generator=generator, device=device)
    lengths = torch.randint(2, size[1] + 1, (size[0],), generator=generator, device=device)
    mask = (torch.arange(size[1], device=device) < lengths[:, None]).long()
    if regression:
        labels = torch.randn(size[0], generator=generator, device=device)
    else:
        labels = torch.randint(0, 3, (size[0],), generator=generator, device=device)
    return ids, mask, labels


#: Each method's configurations: (fused class, its reference step, keyword arguments both take).
CASES = {
    "freelb-l2": (FusedFreeLB, reference.freelb_step,
                  {"adv_lr": 0.1, "adv_steps": 3, "adv_init_mag": 0.5, "adv_max_norm": 0.3, "norm": "l2"}),
    "freelb-linf": (FusedFreeLB, reference.freelb_step,
                    {"adv_lr": 0.05, "adv_steps": 2, "adv_init_mag": 0.05, "adv_max_norm": 0.04, "norm": "linf"}),
    "freelb-plain": (FusedFreeLB, reference.freelb_step, {"adv_lr": 0.1, "adv_steps": 2}),
    "smart-inf": (FusedSMART, reference.smart_step,
                  {"alpha": 2.0, "steps": 2, "step_size": 0.1, "noise_var": 1e-3, "adv_eps": 0.05}),
    "smart-l2-example": (FusedSMART, reference.smart_step,
                         {"steps": 2, "step_size": 0.1, "noise_var": 1e-3, "norm": "l2", "per_token": False}),
    "smart-sign": (FusedSMART, reference.smart_step, {"step_size": 0.01, "noise_var": 1e-3, "norm": "sign"}),
    "smart-default": (FusedSMART, reference.smart_step, {}),
    "smart-mse": (FusedSMART, reference.smart_step,
                  {"steps": 2, "step_size": 0.1, "noise_var": 1e-3, "divergence": "mse"}),
    "r3f": (FusedR3F, reference.r3f_step, {"r3f_lambda": 1.5, "eps": 1e-2}),
    "r3f-normal": (FusedR3F, reference.r3f_step, {"eps": 1e-2, "noise_type": "normal"}),
    "r3f-mse": (FusedR3F, reference.r3f_step, {"eps": 1e-2, "divergence": "mse"}),
}


def forward_of(model: nn.Module, kind: str, ids, mask, labels, divide: int = 1, autocast: torch.dtype | None = None):
    """The closure of ``kind``: FreeLB's returns the loss, SMART's and R3F's ``(loss, logits)``."""

    def forward():
        with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
            loss, logits = model(ids, mask, labels)
        return loss / divide if kind.startswith("freelb") else (loss / divide, logits)

    return forward


def train(model: nn.Module, kind: str, backend: str | None, *, steps: int = 3, micro_batches: int = 1,
          seed: int = 7, scaler: torch.amp.GradScaler | None = None, autocast: torch.dtype | None = None,
          rows: slice = slice(None), device: torch.device = DEVICE) -> nn.Module:
    """``steps`` SGD steps of ``kind`` with the fused class on ``backend``, or with (None) the reference; each over
    ``micro_batches`` accumulated batches, through ``scaler`` when given. Returns the unwrapped model."""
    cls, ref_step, options = CASES[kind]
    inner = model.module if hasattr(model, "module") else model
    attacker = cls(model, backend=backend, **options) if backend else None
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler else (lambda loss: loss.backward())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator(device=device).manual_seed(seed)
    for step in range(steps):
        for _ in range(micro_batches):
            ids, mask, labels = (t[rows] for t in make_batch(gen, regression=kind.endswith("mse"), device=device))
            forward = forward_of(model, kind, ids, mask, labels, micro_batches, autocast)
            torch.manual_seed(seed + step)  # the same noise and dropout masks on both sides
            if attacker is None:
                ref_step(inner.embeddings.word_embeddings, forward, mask, backward=backward, **options)
            else:
                attacker.run(forward, backward, mask)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return inner


def assert_close_params(fused: nn.Module, ref: nn.Module, **tolerance) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("kind", CASES)
def test_training_matches_the_reference(kind, backend, seed):
    model = TinyClassifier(classes=1 if kind.endswith("mse") else 3)
    ref = train(copy.deepcopy(model), kind, None)
    fused = train(copy.deepcopy(model), kind, backend)
    assert_close_params(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_the_attack_changes_the_gradients(kind, seed):
    """Against the same loop without the method: a step that silently did nothing would pass the parity tests."""
    model = TinyClassifier(dropout=0.0)
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))
    plain = copy.deepcopy(model)
    plain(ids, mask, labels)[0].backward()
    cls, _, options = CASES[kind]
    cls(model, **options).step(forward_of(model, kind, ids, mask, labels), mask)
    changed = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
    assert changed > 1e-6


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_gradient_accumulation_matches_the_reference(kind, seed):
    model = TinyClassifier()
    ref = train(copy.deepcopy(model), kind, None, micro_batches=2)
    fused = train(copy.deepcopy(model), kind, "auto", micro_batches=2)
    assert_close_params(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["freelb-l2", "freelb-linf", "smart-inf", "r3f"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_the_reference(kind, dtype, backend, seed):
    """bf16/fp16 weights end to end: the steps agree with the reference's to one rounding of the perturbation, so
    the weights after a step agree to a few ulps of the half dtype."""
    model = TinyClassifier(dtype=dtype)
    ref = train(copy.deepcopy(model), kind, None, steps=1)
    fused = train(copy.deepcopy(model), kind, backend, steps=1)
    assert_close_params(fused, ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_fp16_autocast_with_a_grad_scaler_matches_the_reference(kind, seed):
    model = TinyClassifier()
    runs = [train(copy.deepcopy(model), kind, backend, autocast=torch.float16,
                  scaler=torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)) for backend in (None, "auto")]
    assert_close_params(runs[1], runs[0], rtol=1e-4, atol=1e-5)


class _InfGrad(torch.autograd.Function):
    """The identity, whose gradient is inf: a GradScaler's overflow, on demand."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


def test_freelb_overflowed_gradient_keeps_the_delta(seed):
    """An overflowed gradient must not write NaN into the perturbation (the official code does): the later passes
    stay finite, and the parameters' inf gradients make a GradScaler skip the step as usual."""
    model = TinyClassifier(dropout=0.0)
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))

    def forward():
        _, logits = model(ids, mask, labels)
        return nn.functional.cross_entropy(_InfGrad.apply(logits), labels)

    first, last = FusedFreeLB(model, adv_init_mag=0.1, adv_steps=3).run(forward, lambda loss: loss.backward(), mask)
    assert torch.isfinite(first) and torch.isfinite(last)
    torch.testing.assert_close(first, last)  # the delta never moved
    assert not torch.isfinite(model.head.weight.grad).all()


def test_shared_dropout_draws_the_same_masks_in_every_pass(seed):
    model = TinyClassifier(dropout=0.5)
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))
    forward = forward_of(model, "freelb", ids, mask, labels)
    # a tiny step: the passes' losses differ by the dropout masks alone
    shared = FusedFreeLB(model, adv_lr=1e-9, adv_steps=3, shared_dropout=True).run(forward, torch.Tensor.backward, mask)
    fresh = FusedFreeLB(model, adv_lr=1e-9, adv_steps=3).run(forward, torch.Tensor.backward, mask)
    torch.testing.assert_close(shared[0], shared[1], rtol=1e-6, atol=1e-7)
    assert abs(fresh[0] - fresh[1]) > 1e-4


def test_hugging_face_style_output_and_hooks_removed(seed):
    """SMART and R3F take an output object with .loss and .logits; no hook is left on the model after a step."""
    model = TinyClassifier()
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))

    class Output:
        def __init__(self, loss, logits):
            self.loss, self.logits = loss, logits

    for attacker in (FusedSMART(model), FusedR3F(model)):
        attacker.step(lambda: Output(*model(ids, mask, labels)), mask)
        assert not model.embeddings.word_embeddings._forward_hooks


# ---- misuse: clear errors, nothing changed, no hook left ----


@pytest.mark.parametrize(("cls", "options", "message"), [
    (FusedFreeLB, {"adv_lr": 0.0}, "adv_lr must be"),
    (FusedFreeLB, {"adv_steps": 0}, "adv_steps must be"),
    (FusedFreeLB, {"norm": "l1"}, "norm must be one of"),
    (FusedFreeLB, {"adv_max_norm": -1.0}, "adv_max_norm must be"),
    (FusedSMART, {"norm": "linf"}, "norm must be one of"),
    (FusedSMART, {"adv_eps": float("nan")}, "adv_eps must be"),
    (FusedSMART, {"divergence": "js"}, "divergence must be one of"),
    (FusedR3F, {"noise_type": "gumbel"}, "noise_type must be one of"),
    (FusedR3F, {"emb_name": "nothing_like_this"}, "no module of the model is named like"),
    (FusedR3F, {"emb_name": "embeddings"}, "modules"),
    (FusedR3F, {"backend": "cuda-magic"}, "cuda-magic"),
])
def test_bad_arguments_are_refused_at_construction(cls, options, message):
    with pytest.raises((ValueError, KeyError, RuntimeError), match=message):
        cls(TinyClassifier(), **options)


def step_error(attacker, forward, mask) -> Exception:
    """The error of a step; the weights are unchanged and no hook is left."""
    model = attacker.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError, RuntimeError)) as caught:
        attacker.step(forward, mask)
    assert not model.embeddings.word_embeddings._forward_hooks
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    return caught.value


def test_bad_step_inputs_are_clear_errors(seed):
    model = TinyClassifier()
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))
    forward = forward_of(model, "smart", ids, mask, labels)
    assert "attention_mask has shape" in str(step_error(FusedSMART(model), forward, mask[:, :-1]))
    bare = forward_of(model, "freelb", ids, mask, labels)
    assert "must return (loss, logits)" in str(step_error(FusedR3F(model), bare, mask))

    def twice():
        model.embeddings.word_embeddings(ids)
        return forward()

    assert "ran 2 times" in str(step_error(FusedSMART(model), twice, mask))

    def not_through_the_embeddings():
        model(ids, mask, labels)
        return model.head.weight.sum()

    assert "does not depend" in str(step_error(FusedFreeLB(model), not_through_the_embeddings, mask))


def test_an_error_in_a_later_pass_leaves_no_hook_and_the_next_step_works(seed):
    model = TinyClassifier()
    ids, mask, labels = make_batch(torch.Generator(device=DEVICE).manual_seed(seed))
    forward = forward_of(model, "smart", ids, mask, labels)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward()

    smart = FusedSMART(model, steps=2)
    with pytest.raises(KeyboardInterrupt):
        smart.step(failing, mask)
    assert not model.embeddings.word_embeddings._forward_hooks
    smart.step(forward, mask)


def test_attack_objects_copy_and_pickle():
    model = TinyClassifier(device="cpu")
    for attacker in (FusedFreeLB(model), FusedSMART(model), FusedR3F(model)):
        for clone in (copy.deepcopy(attacker), pickle.loads(pickle.dumps(attacker))):
            ids, mask, labels = make_batch(torch.Generator().manual_seed(0), device=torch.device("cpu"))
            kind = "freelb" if isinstance(clone, FusedFreeLB) else "smart"
            clone.step(forward_of(clone.model, kind, ids, mask, labels), mask)
            assert all(p.grad is not None for p in clone.model.parameters())


# ---- two processes (DDP, gloo) ----

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in ("freelb-l2", "smart-inf", "r3f"):
            for backend in (None, *BACKENDS):
                torch.manual_seed(0)
                model = nn.parallel.DistributedDataParallel(TinyClassifier(dropout=0.0, device="cpu"))
                trained = train(model, kind, backend, seed=11 + rank, rows=slice(rank, None, WORLD),
                                device=torch.device("cpu"))
                results[kind, backend] = {n: p.detach().clone() for n, p in trained.named_parameters()}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform != "linux",
                    reason="needs torch.distributed with gloo (Linux)")
def test_two_ddp_processes_match_the_reference_in_them(tmp_path):
    """Each rank perturbs its own examples; DDP averages the gradients. The fused classes on every backend give the
    reference's weights on both ranks, and the ranks agree."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    for (kind, backend), params in ranks[0].items():
        for rank in ranks:
            for name, value in rank[kind, None].items():
                torch.testing.assert_close(rank[kind, backend][name], value, rtol=1e-5, atol=1e-6,
                                           msg=functools.partial("{}/{}/{}: {}".format, kind, backend, name))
        for name, value in params.items():
            assert torch.equal(value, ranks[1][kind, backend][name]), (kind, backend, name)

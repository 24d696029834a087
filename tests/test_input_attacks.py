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
from _helpers import INPUT_CASES, TinyClassifier, input_batches, input_forward, input_train
from conftest import BACKENDS, DEVICE
from torch import nn

from fastadv.input_attacks import FusedFreeLB, FusedR3F, FusedSMART


def train(model: nn.Module, kind: str, backend: str | None, *, steps: int = 3, micro_batches: int = 1,
          seed: int = 7, rows: slice = slice(None), device: torch.device = DEVICE, **options) -> nn.Module:
    """:func:`input_train` over ``steps * micro_batches`` fresh batches."""
    batches = input_batches(steps * micro_batches, seed, kind.endswith("mse"), rows, device)
    return input_train(model, kind, backend, batches, accumulate=micro_batches, **options)


def one_batch(seed: int) -> dict[str, torch.Tensor]:
    return input_batches(1, seed)[0]


def assert_close_params(fused: nn.Module, ref: nn.Module, **tolerance) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("kind", INPUT_CASES)
def test_training_matches_the_reference(kind, backend, seed):
    model = TinyClassifier(classes=1 if kind.endswith("mse") else 3)
    ref = train(copy.deepcopy(model), kind, None)
    fused = train(copy.deepcopy(model), kind, backend)
    assert_close_params(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_the_attack_changes_the_gradients(kind, seed):
    """Against the same loop without the method: a step that silently did nothing would pass the parity tests."""
    model = TinyClassifier(dropout=0.0)
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"]
    plain = copy.deepcopy(model)
    plain(ids, mask, labels)[0].backward()
    cls, _, options = INPUT_CASES[kind]
    cls(model, **options).step(input_forward(model, kind, b), mask)
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
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"]

    def forward():
        _, logits = model(ids, mask, labels)
        return nn.functional.cross_entropy(_InfGrad.apply(logits), labels)

    first, last = FusedFreeLB(model, adv_init_mag=0.1, adv_steps=3).run(forward, lambda loss: loss.backward(), mask)
    assert torch.isfinite(first) and torch.isfinite(last)
    torch.testing.assert_close(first, last)  # the delta never moved
    assert not torch.isfinite(model.head.weight.grad).all()


def test_shared_dropout_draws_the_same_masks_in_every_pass(seed):
    model = TinyClassifier(dropout=0.5)
    b = one_batch(seed)
    mask = b["attention_mask"]
    forward = input_forward(model, "freelb", b)
    # a tiny step: the passes' losses differ by the dropout masks alone
    options = {"adv_lr": 1e-9, "adv_steps": 3, "adv_init_mag": 1e-6}  # the initial delta draws random numbers too
    shared = FusedFreeLB(model, shared_dropout=True, **options).run(forward, torch.Tensor.backward, mask)
    fresh = FusedFreeLB(model, **options).run(forward, torch.Tensor.backward, mask)
    torch.testing.assert_close(shared[0], shared[1], rtol=1e-6, atol=1e-7)
    assert abs(fresh[0] - fresh[1]) > 1e-4


def test_hugging_face_style_output_and_hooks_removed(seed):
    """SMART and R3F take an output object with .loss and .logits; no hook is left on the model after a step."""
    model = TinyClassifier()
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"]

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
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"]
    forward = input_forward(model, "smart", b)
    assert "attention_mask has shape" in str(step_error(FusedSMART(model), forward, mask[:, :-1]))
    bare = input_forward(model, "freelb", b)
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
    b = one_batch(seed)
    mask = b["attention_mask"]
    forward = input_forward(model, "smart", b)
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
            b = input_batches(1, 0, device=torch.device("cpu"))[0]
            kind = "freelb" if isinstance(clone, FusedFreeLB) else "smart"
            clone.step(input_forward(clone.model, kind, b), b["attention_mask"])
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

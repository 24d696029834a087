"""FusedFreeLB, FusedSMART, FusedR3F, FusedVAT and FusedGradientPenalty against their oracles (fastadv.reference):
whole training loops on every backend, padding masks, mixed precision with a GradScaler, gradient accumulation, two DDP
processes; misuse."""

from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import (
    BACKENDS,
    DEVICE,
    INPUT_CASES,
    TinyClassifier,
    assert_toy_example_runs,
    input_batches,
    input_forward,
    input_train,
)
from torch import nn

from fastadv import reference
from fastadv.input_attacks import FusedFreeLB, FusedGradientPenalty, FusedR3F, FusedSMART, FusedVAT


def train(
    model: nn.Module,
    kind: str,
    backend: str | None,
    *,
    steps: int = 3,
    micro_batches: int = 1,
    seed: int = 7,
    rows: slice = slice(None),
    device: torch.device = DEVICE,
    **options,
) -> nn.Module:
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


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"])
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


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"])
def test_gradient_accumulation_matches_the_reference(kind, seed):
    model = TinyClassifier()
    ref = train(copy.deepcopy(model), kind, None, micro_batches=2)
    fused = train(copy.deepcopy(model), kind, "auto", micro_batches=2)
    assert_close_params(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["freelb-l2", "freelb-linf", "smart-inf", "r3f", "vat", "gradient_penalty"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_the_reference(kind, dtype, backend, seed):
    """bf16/fp16 weights end to end: the steps agree with the reference's to one rounding of the perturbation, so
    the weights after a step agree to a few ulps of the half dtype."""
    model = TinyClassifier(dtype=dtype)
    ref = train(copy.deepcopy(model), kind, None, steps=1)
    fused = train(copy.deepcopy(model), kind, backend, steps=1)
    assert_close_params(fused, ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"])
def test_fp16_autocast_with_a_grad_scaler_matches_the_reference(kind, seed):
    model = TinyClassifier()
    runs = [
        train(
            copy.deepcopy(model),
            kind,
            backend,
            autocast=torch.float16,
            scaler=torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10),
        )
        for backend in (None, "auto")
    ]
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
    """SMART, R3F, VAT and the gradient penalty take an output object with .loss and .logits; no hook is left on the
    model after a step."""
    model = TinyClassifier()
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"]

    class Output:
        def __init__(self, loss, logits):
            self.loss, self.logits = loss, logits

    for attacker in (FusedSMART(model), FusedR3F(model), FusedVAT(model), FusedGradientPenalty(model)):
        attacker.step(lambda: Output(*model(ids, mask, labels)), mask)
        assert not model.embeddings.word_embeddings._forward_hooks


# ---- misuse: clear errors, nothing changed, no hook left ----


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (FusedFreeLB, {"adv_lr": 0.0}, "adv_lr must be"),
        (FusedFreeLB, {"adv_steps": 0}, "adv_steps must be"),
        (FusedFreeLB, {"norm": "l1"}, "norm must be one of"),
        (FusedFreeLB, {"adv_max_norm": -1.0}, "adv_max_norm must be"),
        (FusedSMART, {"norm": "linf"}, "norm must be one of"),
        (FusedSMART, {"adv_eps": float("nan")}, "adv_eps must be"),
        (FusedSMART, {"divergence": "js"}, "divergence must be one of"),
        (FusedR3F, {"noise_type": "gumbel"}, "noise_type must be one of"),
        (FusedVAT, {"eps": 0.0}, "eps must be"),
        (FusedVAT, {"xi": float("inf")}, "xi must be"),
        (FusedVAT, {"alpha": -1.0}, "alpha must be"),
        (FusedVAT, {"power_iters": 0}, "power_iters must be"),
        (FusedVAT, {"power_iters": 1.5}, "power_iters must be"),
        (FusedGradientPenalty, {"epsilon": -1.0}, "epsilon must be"),
        (FusedGradientPenalty, {"epsilon": float("nan")}, "epsilon must be"),
        (FusedGradientPenalty, {"emb_name": "nothing_like_this"}, "no module of the model is named like"),
        (FusedR3F, {"emb_name": "nothing_like_this"}, "no module of the model is named like"),
        (FusedR3F, {"emb_name": "embeddings"}, "modules"),
        (FusedR3F, {"backend": "cuda-magic"}, "cuda-magic"),
    ],
)
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
    for attacker in (
        FusedFreeLB(model),
        FusedSMART(model),
        FusedR3F(model),
        FusedVAT(model),
        FusedGradientPenalty(model),
    ):
        for clone in (copy.deepcopy(attacker), pickle.loads(pickle.dumps(attacker))):
            b = input_batches(1, 0, device=torch.device("cpu"))[0]
            kind = "freelb" if isinstance(clone, (FusedFreeLB, FusedGradientPenalty)) else "smart"
            clone.step(input_forward(clone.model, kind, b), b["attention_mask"])
            assert all(p.grad is not None for p in clone.model.parameters())


# ---- two processes (DDP, gloo) ----

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in ("freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"):
            for backend in (None, *BACKENDS):
                torch.manual_seed(0)
                model = nn.parallel.DistributedDataParallel(TinyClassifier(dropout=0.0, device="cpu"))
                trained = train(
                    model, kind, backend, seed=11 + rank, rows=slice(rank, None, WORLD), device=torch.device("cpu")
                )
                results[kind, backend] = {n: p.detach().clone() for n, p in trained.named_parameters()}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform != "linux",
    reason="needs torch.distributed with gloo (Linux)",
)
def test_two_ddp_processes_match_the_reference_in_them(tmp_path):
    """Each rank perturbs its own examples; DDP averages the gradients. The fused classes on every backend give the
    reference's weights on both ranks, and the ranks agree."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    for (kind, backend), params in ranks[0].items():
        for rank in ranks:
            for name, value in rank[kind, None].items():
                torch.testing.assert_close(
                    rank[kind, backend][name],
                    value,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=functools.partial("{}/{}/{}: {}".format, kind, backend, name),
                )
        for name, value in params.items():
            assert torch.equal(value, ranks[1][kind, backend][name]), (kind, backend, name)


# ---- the hook lives only while a step runs, and nothing of fastadv is ever on the model ----


def _fastadv_hooks() -> list[object]:
    """The global forward hooks fastadv installs for a step (none outside one)."""
    return list(nn.modules.module._global_forward_hooks.values())


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"])
def test_a_copy_or_save_inside_a_step_carries_nothing_away(kind, seed):
    """A ``copy.deepcopy`` (an EMA or teacher copy) or ``torch.save`` of the model taken inside a step: the copy has
    no hook and computes the unperturbed outputs; during the step the model itself has no hook either."""
    model = TinyClassifier(dropout=0.0, device="cpu")
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    forward, copies = input_forward(model, kind, b), []

    def copying():
        assert not model.embeddings.word_embeddings._forward_hooks and _fastadv_hooks()
        saved = io.BytesIO()
        torch.save(model, saved)
        saved.seek(0)
        copies.extend([copy.deepcopy(model), torch.load(saved, weights_only=False)])
        return forward()

    cls, _, options = INPUT_CASES[kind]
    cls(model, **options).step(copying, b["attention_mask"])
    assert not _fastadv_hooks()
    plain = model(b["ids"], b["attention_mask"], b["labels"])[1]
    for twin in copies:
        assert not twin.embeddings.word_embeddings._forward_hooks
        torch.testing.assert_close(twin(b["ids"], b["attention_mask"], b["labels"])[1], plain, rtol=0, atol=0)


def _passes(attacker, forward, mask) -> int:
    """How many forward passes a step of ``attacker`` makes (its gradients zeroed after)."""
    calls = []
    attacker.step(lambda: calls.append(1) or forward(), mask)
    attacker.model.zero_grad()
    return len(calls)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty"])
@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_the_hook_goes_on_every_way_out_of_a_step(kind, failure, seed):
    """An exception or a KeyboardInterrupt in any pass: the global hook is removed, and the next step (and a plain
    forward pass) runs unperturbed by it."""
    model = TinyClassifier(dropout=0.0, device="cpu")
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    forward = input_forward(model, kind, b)
    cls, _, options = INPUT_CASES[kind]
    attacker = cls(model, **options)
    for fail_at in range(1, _passes(attacker, forward, b["attention_mask"]) + 1):
        calls = []

        def failing(fail_at=fail_at, calls=calls):
            calls.append(1)
            if len(calls) == fail_at:
                raise failure("boom")
            return forward()

        with pytest.raises(failure, match="boom"):
            attacker.step(failing, b["attention_mask"])
        assert not _fastadv_hooks()
        model.zero_grad()
    attacker.step(forward, b["attention_mask"])
    assert not _fastadv_hooks()


class _CheckpointedClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose whole forward, the embedding lookup included, is one non-reentrant checkpoint:
    the backward recomputes the embedding's output."""

    def forward(self, ids, mask, labels):
        return torch.utils.checkpoint.checkpoint(super().forward, ids, mask, labels, use_reentrant=False)


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "smart-paper", "r3f", "vat", "gradient_penalty"])
def test_activation_checkpointing_recomputes_each_pass_with_its_own_perturbation(kind, backend, seed):
    """With the embedding inside a checkpoint, the recomputation in the backward is no pass and gets the perturbation
    of the pass it recomputes: the gradients are those of the same step without the checkpoint. (The reference steps
    add the current perturbation to every recomputation, right for FreeLB only: SMART's and R3F's final backward
    recomputes their clean pass with the noise added.)"""
    torch.manual_seed(seed)
    plain = TinyClassifier(dropout=0.0)
    checkpointed = _CheckpointedClassifier(dropout=0.0)
    checkpointed.load_state_dict(plain.state_dict())
    b = one_batch(seed)
    cls, ref_step, options = INPUT_CASES[kind]
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(seed)
        cls(model, backend=backend, **options).step(input_forward(model, kind, b), b["attention_mask"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    if kind.startswith("freelb"):
        ref = _CheckpointedClassifier(dropout=0.0)
        ref.load_state_dict(plain.state_dict())
        torch.manual_seed(seed)
        ref_step(ref.embeddings.word_embeddings, input_forward(ref, kind, b), b["attention_mask"], **options)
        torch.testing.assert_close(
            torch.cat([p.grad.flatten() for p in ref.parameters()]), grads[0], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f", "vat"])
def test_a_model_compiled_in_its_first_step_trains_as_the_eager_one(kind, seed):
    """torch.compile traces the model at its first call, inside the first step, global hook and all: the hook's work
    runs eagerly at a graph break, so every step reads its own perturbation (traced into the graph, FreeLB's stayed
    the first step's), and evaluation after training sees no perturbation."""
    torch._dynamo.reset()  # traced afresh: dynamo reuses code traced for other instances of the class
    torch.manual_seed(seed)
    start = TinyClassifier(dropout=0.0, device="cpu")
    batches = input_batches(3, seed, device=torch.device("cpu"))
    cls, _, options = INPUT_CASES[kind]
    trained = []
    for compiled in (False, True):
        model = copy.deepcopy(start)
        run = torch.compile(model) if compiled else model
        attacker, opt = cls(model, **options), torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on global hooks and compiled modules
            for i, b in enumerate(batches):
                torch.manual_seed(i)
                attacker.step(input_forward(run, kind, b), b["attention_mask"])
                opt.step()
                opt.zero_grad()
            b = batches[0]
            trained.append((flat(model), run(b["ids"], b["attention_mask"], b["labels"])[1]))
    torch.testing.assert_close(trained[1][0], trained[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained[1][1], trained[0][1], rtol=1e-5, atol=1e-6)


def test_a_model_compiled_before_the_step_is_named_in_the_error(seed):
    """Traced without the hook (outside a step), the embedding's call is in the graph and never sees it: a clear
    error, not a silently unperturbed step."""
    torch._dynamo.reset()
    model = TinyClassifier(device="cpu")
    compiled = torch.compile(model)
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    compiled(b["ids"], b["attention_mask"], b["labels"])  # compiled without fastadv's hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on global hooks and compiled modules
        error = step_error(FusedFreeLB(compiled), input_forward(compiled, "freelb", b), b["attention_mask"])
    assert "did not run in the forward pass" in str(error) and "torch.compile" in str(error)


def neftune_post_forward_hook(module, args, output):
    """transformers' NEFTune hook (``transformers.integrations.neftune``), as ``Trainer(neftune_noise_alpha=...)``
    installs it: fresh uniform noise on the embedding output at every call in training mode."""
    if module.training:
        dims = torch.tensor(output.size(1) * output.size(2))
        mag_norm = module.neftune_noise_alpha / torch.sqrt(dims)
        output = output + torch.zeros_like(output).uniform_(-mag_norm, mag_norm)
    return output


@pytest.mark.parametrize(
    ("cls", "options"),
    [(FusedSMART, {"update": "paper"}), (FusedR3F, {}), (FusedVAT, {"eps": 1e-2})],
    ids=["smart-paper", "r3f", "vat"],
)
def test_neftune_noise_is_shared_by_the_passes_that_are_compared(cls, options, seed):
    """SMART, R3F and VAT measure how the logits move under their perturbation; NEFTune's hook draws new noise at every
    pass, which would make the divergence measure NEFTune (hundreds of times these small-perturbation terms). Within
    a step the noise is drawn once and added to every pass, so the term is about that of the model without NEFTune;
    NEFTune's hook is back in place after the step, in its order."""
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    kind = "smart" if cls is FusedSMART else "r3f"
    terms = {}
    for neftune in (False, True):
        torch.manual_seed(seed)
        model = TinyClassifier(dropout=0.0, device="cpu")
        embedding = model.embeddings.word_embeddings
        if neftune:
            embedding.neftune_noise_alpha = 5.0
            first = embedding.register_forward_hook(neftune_post_forward_hook)
            last = embedding.register_forward_hook(lambda module, args, output: None)
        terms[neftune] = cls(model, **options).run(
            input_forward(model, kind, b), torch.Tensor.backward, b["attention_mask"]
        )[1]
    assert list(embedding._forward_hooks) == [first.id, last.id]
    # what sharing prevents: the divergence of two independent NEFTune draws
    noised = [model(b["ids"], b["attention_mask"], b["labels"])[1] for _ in range(2)]
    independent = 2 * torch.nn.functional.kl_div(
        noised[1].log_softmax(-1), noised[0].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert independent > 100 * terms[False], (independent, terms)
    assert terms[True] < 10 * terms[False], terms


class _TokenLM(nn.Module):
    """A causal-LM-shaped toy: token-level logits ``[B, T, V]``, each position's from the running mean of the
    embeddings up to it (so padding's logits depend on the tokens before it), and a loss over the unpadded tokens."""

    def __init__(self, vocab: int = 20, dim: int = 8):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, mask, labels):
        e = self.embeddings.word_embeddings(ids)
        seen = e.cumsum(1) / torch.arange(1, e.size(1) + 1, device=e.device).unsqueeze(-1)
        logits = self.head(torch.tanh(self.hidden(seen)))
        labels = labels.masked_fill(mask == 0, -100)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), logits


@pytest.mark.parametrize("kind", ["smart-inf", "smart-mse", "r3f", "vat"])
def test_token_level_logits_count_the_attention_mask(kind, backend, seed):
    """Padding positions are no predictions: the divergence of token-level logits averages over the tokens of the
    attention mask, as the loss does (the public code counts them all). Parity with the reference (which masks them
    too), and the term does not change when the padded positions' logits do."""
    torch.manual_seed(seed)
    model = _TokenLM().to(DEVICE)
    ids = torch.randint(0, 20, (3, 6), device=DEVICE)
    mask = (torch.arange(6, device=DEVICE) < torch.tensor([[6], [4], [2]], device=DEVICE)).long()
    labels = torch.randint(0, 20, (3, 6), device=DEVICE)
    cls, ref_step, options = INPUT_CASES[kind]
    if kind == "smart-mse":
        options = {**options, "divergence": "mse"}

    def forward_of(net, pad_shift=0.0):
        def forward():
            loss, logits = net(ids, mask, labels)
            return loss, logits + pad_shift * (1 - mask).unsqueeze(-1) * torch.arange(20, device=DEVICE)

        return forward

    results = []
    for shift in (0.0, 7.0):
        net = copy.deepcopy(model)
        torch.manual_seed(seed)
        results.append(cls(net, backend=backend, **options).run(forward_of(net, shift), torch.Tensor.backward, mask)[1])
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)
    ref = copy.deepcopy(model)
    torch.manual_seed(seed)
    fused = copy.deepcopy(model)
    cls(fused, backend=backend, **options).step(forward_of(fused), mask)
    torch.manual_seed(seed)
    ref_step(ref.embeddings.word_embeddings, forward_of(ref), mask, **options)
    assert_close_params_grads(fused, ref)


def assert_close_params_grads(fused: nn.Module, ref: nn.Module) -> None:
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_smart_at_its_defaults_changes_training(seed):
    """mt-dnn's update (the default) moves the noise to about 1 per token, for which its defaults were chosen: over
    four steps SMART changes the weights' update measurably. The paper's update at the same defaults moves it by
    step_size (1e-3) and changes training ten thousand times less."""
    start = TinyClassifier(dropout=0.0)
    batches = input_batches(4, seed)
    plain = copy.deepcopy(start)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for b in batches:
        plain(b["ids"], b["attention_mask"], b["labels"])[0].backward()
        opt.step()
        opt.zero_grad()
    plain_change = (flat(plain) - flat(start)).norm()
    change = {}
    for update in ("mtdnn", "paper"):
        model = copy.deepcopy(start)
        attacker = FusedSMART(model, update=update)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for b in batches:
            attacker.step(input_forward(model, "smart", b), b["attention_mask"])
            opt.step()
            opt.zero_grad()
        change[update] = (flat(model) - flat(plain)).norm() / plain_change
    assert change["mtdnn"] > 1e-3, change  # measured about 1e-2
    assert change["paper"] < 1e-5, change  # measured about 1e-6


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class _EncoderDecoder(nn.Module):
    """An encoder-decoder whose encoder and decoder have embedding modules of their own sharing one weight (BART's,
    T5's layout): the last name part ``embed_tokens`` names two modules."""

    def __init__(self, vocab: int = 30, dim: int = 8):
        super().__init__()
        shared = nn.Embedding(vocab, dim)
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.embed_tokens, self.decoder.embed_tokens = nn.Embedding(vocab, dim), nn.Embedding(vocab, dim)
        self.encoder.embed_tokens.weight = self.decoder.embed_tokens.weight = shared.weight
        self.encoder.layer, self.head = nn.Linear(dim, dim), nn.Linear(dim, vocab)

    def forward(self, ids, mask, labels):
        memory = torch.tanh(self.encoder.layer(self.encoder.embed_tokens(ids))).mean(1, keepdim=True)
        logits = self.head(self.decoder.embed_tokens(labels) + memory)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits.mean(1)


def test_a_dotted_suffix_selects_one_of_an_encoder_decoders_embeddings(seed):
    model = _EncoderDecoder().to(DEVICE)
    with pytest.raises(ValueError, match="2 modules .encoder.embed_tokens, decoder.embed_tokens.*dotted suffix"):
        FusedFreeLB(model, emb_name="embed_tokens")
    ids, mask = torch.randint(0, 30, (2, 5), device=DEVICE), torch.ones(2, 5, dtype=torch.long, device=DEVICE)
    labels = torch.randint(0, 30, (2, 4), device=DEVICE)
    ref = copy.deepcopy(model)
    options = INPUT_CASES["freelb-l2"][2]
    torch.manual_seed(seed)
    FusedFreeLB(model, emb_name="encoder.embed_tokens", **options).step(lambda: model(ids, mask, labels)[0], mask)
    torch.manual_seed(seed)
    reference.freelb_step(ref.encoder.embed_tokens, lambda: ref(ids, mask, labels)[0], mask, **options)
    assert_close_params_grads(model, ref)


def test_a_submodule_called_module_is_part_of_the_model(seed):
    """Wrappers are recognised by type (DDP, DataParallel, FSDP, DeepSpeed engines), not by a ``.module``
    attribute."""
    model = TinyClassifier()
    model.module = nn.Linear(2, 2)
    assert FusedR3F(model).model is model
    assert FusedR3F(nn.DataParallel(model)).model is model


def test_example_script_runs(capsys, monkeypatch):
    assert_toy_example_runs("input_space", {"none", "freelb", "smart", "r3f"}, monkeypatch, capsys)


# ---- VAT and the gradient penalty: what they compute, checked without the reference ----


def _layer_norm_inputs(model: TinyClassifier) -> tuple[list[torch.Tensor], object]:
    """The input of the embedding LayerNorm at each pass (word embeddings + perturbation + positions), recorded by a
    hook whose handle is returned with the list."""
    seen: list[torch.Tensor] = []
    handle = model.embeddings.LayerNorm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen, handle


@pytest.mark.parametrize("power_iters", [1, 2])
def test_vat_perturbs_along_the_direction_the_prediction_is_most_sensitive_to(power_iters, backend, seed):
    """For a binary classifier the Hessian of KL(p(x) || p(x + r)) at r = 0 has rank one, along the gradient of the
    logit margin: the power iteration's direction, whatever d it starts from. Each ascent perturbation is xi long and
    the last eps long (l2 over each example's tokens), none on padding, though the model here reads the padding too
    (it pools every token)."""
    model = TinyClassifier(classes=2, dropout=0.0)
    b = one_batch(seed)
    ids, mask, labels = b["ids"], b["attention_mask"], b["labels"] % 2
    every_token = torch.ones_like(mask)
    seen, handle = _layer_norm_inputs(model)
    eps, xi = 0.7, 0.1  # xi: the default, a finite difference well above fp32 rounding
    FusedVAT(model, eps=eps, xi=xi, power_iters=power_iters, backend=backend).step(
        lambda: model(ids, every_token, labels), mask
    )
    handle.remove()
    assert len(seen) == power_iters + 2
    perturbations = [x - seen[0] for x in seen[1:]]
    padding = ~mask.bool()
    for r, length in zip(perturbations, [xi] * power_iters + [eps]):
        assert torch.equal(r[padding], torch.zeros_like(r[padding]))
        torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((len(r),), length, dtype=r.dtype))

    outputs = []
    grab = model.embeddings.word_embeddings.register_forward_hook(
        lambda module, args, out: outputs.append(out.detach().requires_grad_()) or outputs[-1]
    )
    logits = model(ids, every_token, labels)[1]
    grab.remove()
    (margin,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), outputs[0])
    margin = torch.where(mask.bool().unsqueeze(-1), margin, 0.0)
    cosine = nn.functional.cosine_similarity(perturbations[-1].flatten(1), margin.flatten(1), dim=1)
    # measured over 40 seeds: 1 - |cosine| at most 5e-4 (xi's finite difference); a random direction's above 0.9
    torch.testing.assert_close(cosine.abs(), torch.ones_like(cosine), rtol=0, atol=5e-3)


def _float64_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The cross entropy of a float64 :class:`TinyClassifier` in float64 (its own is fp32), at ``params`` when given;
    the model pools every token, padding included."""
    inputs = (batch["ids"], torch.ones_like(batch["attention_mask"]), batch["labels"])
    logits = (model(*inputs) if params is None else torch.func.functional_call(model, params, inputs))[1]
    return nn.functional.cross_entropy(logits, batch["labels"])


def test_vat_perturbation_is_eps_long_however_small_the_gradient(backend, seed):
    """``d / ||d||`` exactly, as Miyato's scale-invariant ``_scale_l2``: with a head that barely reacts (its weights
    scaled by 1e-2) the KL's gradient at ``xi`` is about 1e-9 long (measured: 2e-10 to 7e-9), where the PyTorch
    ports' ``d / (||d|| + 1e-8)`` would shrink the perturbation to a fraction of ``eps``; the finite difference is
    still well above fp32 rounding (a head scaled by 1e-4 gives examples whose gradient rounds to 0)."""
    model = TinyClassifier(dropout=0.0)
    with torch.no_grad():
        model.head.weight.mul_(1e-2)
        model.head.bias.zero_()
    b = one_batch(seed)
    seen, handle = _layer_norm_inputs(model)
    FusedVAT(model, eps=0.5, backend=backend).step(input_forward(model, "vat", b), b["attention_mask"])
    handle.remove()
    torch.testing.assert_close(
        (seen[-1] - seen[0]).flatten(1).norm(dim=1), torch.full((4,), 0.5, device=DEVICE), rtol=1e-5, atol=0
    )


def _penalty(model: nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """||d loss / d e||^2 over the tokens of the batch's mask, at ``params``, by a first-order gradient (no double
    backward)."""
    outputs = []
    grab = model.embeddings.word_embeddings.register_forward_hook(lambda module, args, out: outputs.append(out))
    loss = _float64_loss(model, batch, params)
    grab.remove()
    (grad,) = torch.autograd.grad(loss, outputs[0])
    return torch.where(batch["attention_mask"].bool().unsqueeze(-1), grad, 0.0).square().sum()


def test_the_gradient_penalty_trains_on_the_gradient_of_the_penalty(seed):
    """The parameters' gradient is the loss's plus epsilon / 2 times the penalty's, checked against central finite
    differences of the penalty (computed from first-order gradients only) along a random direction; the model pools
    padding too, so the penalty counting padding would show. bert4torch's version gets the loss's gradient twice
    and none of the penalty's."""
    model = TinyClassifier(dropout=0.0, dtype=torch.float64)
    b = one_batch(seed)
    epsilon = 3.0
    FusedGradientPenalty(model, epsilon=epsilon).step(lambda: _float64_loss(model, b), b["attention_mask"])
    plain = copy.deepcopy(model)
    plain.zero_grad()
    _float64_loss(plain, b).backward()
    penalty_grad = {
        n: 2 / epsilon * (p.grad - q.grad) for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters())
    }
    params = {n: p.detach() for n, p in model.named_parameters()}
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    h = 1e-5
    shifted = [
        _penalty(model, {n: (p + sign * h * direction[n]).requires_grad_() for n, p in params.items()}, b)
        for sign in (1, -1)
    ]
    finite_difference = (shifted[0] - shifted[1]) / (2 * h)
    along = sum((penalty_grad[n] * direction[n]).sum() for n in params)
    assert abs(finite_difference) > 1e-6, finite_difference  # the penalty does move with the weights here
    torch.testing.assert_close(along, finite_difference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["vat", "gradient_penalty"])
def test_an_interrupt_anywhere_in_a_step_changes_nothing(kind, seed):
    """Their one backward is their last act: a KeyboardInterrupt in any forward pass or in the backward leaves the
    weights and their gradients as they were, no hook, and the next step is the step a fresh object makes."""
    model = TinyClassifier(dropout=0.0, device="cpu")
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    forward, mask = input_forward(model, kind, b), b["attention_mask"]
    cls, _, options = INPUT_CASES[kind]
    attacker = cls(model, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    places = [("pass", i) for i in range(1, _passes(attacker, forward, mask) + 1)] + [("backward", 1)]
    model.zero_grad(set_to_none=True)
    for where, at in places:
        calls = []

        def failing(calls=calls, where=where, at=at):
            calls.append(1)
            if where == "pass" and len(calls) == at:
                raise KeyboardInterrupt
            return forward()

        def backward(loss, where=where):
            if where == "backward":
                raise KeyboardInterrupt
            loss.backward()

        with pytest.raises(KeyboardInterrupt):
            attacker.run(failing, backward, mask)
        assert not _fastadv_hooks() and not model.embeddings.word_embeddings._forward_hooks
        assert all(p.grad is None for p in model.parameters()), (where, at)
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    twin = copy.deepcopy(model)
    for net, attack in ((model, attacker), (twin, cls(twin, **options))):
        torch.manual_seed(seed)
        attack.step(input_forward(net, kind, b), mask)
    assert_close_params_grads(model, twin)


def test_vat_and_the_gradient_penalty_errors_are_clear(seed):
    model = TinyClassifier(classes=1)
    b = one_batch(seed)
    mask = b["attention_mask"]
    one_logit = input_forward(model, "vat", {**b, "labels": b["labels"].float()})
    assert "has size 1 here" in str(step_error(FusedVAT(model), one_logit, mask))

    def not_through_the_embeddings():
        model(b["ids"], mask, b["labels"].float())
        return model.head.weight.sum()

    assert "does not depend" in str(step_error(FusedGradientPenalty(model), not_through_the_embeddings, mask))


def test_the_gradient_penalty_under_torch_compile_fails_loudly(seed):
    """AOTAutograd has no double backward: the step raises (it does not train without the penalty's gradient), and
    leaves no hook."""
    torch._dynamo.reset()
    model = TinyClassifier(dropout=0.0, device="cpu")
    compiled = torch.compile(model)
    b = input_batches(1, seed, device=torch.device("cpu"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on global hooks and compiled modules
        with pytest.raises(RuntimeError):
            FusedGradientPenalty(model).step(input_forward(compiled, "gradient_penalty", b), b["attention_mask"])
    assert not _fastadv_hooks()


@pytest.mark.parametrize("kind", ["vat", "gradient_penalty"])
def test_a_frozen_embedding_trains_the_rest_as_an_unfrozen_one(kind, seed):
    """The perturbation and the penalty's gradient are the embedding output's (PEFT leaves the base embedding
    frozen): every other parameter gets the gradient it gets with the embedding trainable."""
    start = TinyClassifier(dropout=0.0)
    b = one_batch(seed)
    cls, _, options = INPUT_CASES[kind]
    trained = []
    for frozen in (False, True):
        model = copy.deepcopy(start)
        model.embeddings.word_embeddings.weight.requires_grad_(not frozen)
        torch.manual_seed(seed)
        cls(model, **options).step(input_forward(model, kind, b), b["attention_mask"])
        trained.append(model)
    assert trained[1].embeddings.word_embeddings.weight.grad is None
    for (name, a), (_, b_) in zip(trained[1].named_parameters(), trained[0].named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b_.grad, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")

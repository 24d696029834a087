"""AdversarialTrainer against hand-written training loops built on fastadv.reference, on a tiny random BERT (CPU)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _helpers import quiet_transformers, run_example, tiny_llama, tiny_transformer  # noqa: E402
from torch.utils.data import SequentialSampler, default_collate  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from fastadv import reference  # noqa: E402
from fastadv.integrations.transformers import AdversarialTrainer  # noqa: E402
from fastadv.methods import METHODS  # noqa: E402

VOCAB, SEQ, BATCH, N = 100, 8, 4, 16  # 16 rows: 4 batches of 4
LR = 1e-2
PARAMS = {
    "fgm": {"adv_eps": 0.5},
    "pgd": {"adv_eps": 0.5, "adv_alpha": 0.2, "adv_k": 3},
    "awp": {"adv_lr": 0.5, "adv_eps": 0.05, "adv_k": 1},
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_single_threaded():
    with quiet_transformers():
        yield


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A BERT classifier without dropout, of :data:`_helpers.TINY_TRANSFORMER`'s size."""
    return tiny_transformer(
        BertForSequenceClassification,
        BertConfig,
        seed,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def make_data(n: int = N, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Tokens from half the vocabulary only, so most embedding rows get no gradient; label: is token 7 there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB // 2, (n, SEQ), generator=g)
    labels = (ids == 7).any(1).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


class CheckedTrainer(AdversarialTrainer):
    """Sequential batches (as the hand loop sees them); asserts that each step leaves the weights as it found them."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = [p.detach().clone() for p in model.parameters()]
        loss = super().training_step(model, inputs, num_items_in_batch)
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())), "weights not restored"
        return loss


def make_args(tmp_path: Path, ga: int = 1, epochs: float = 1, **kwargs) -> TrainingArguments:
    kwargs.setdefault("use_cpu", True)
    return TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        save_strategy="no",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ga,
        num_train_epochs=epochs,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kwargs,
    )


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":  # sensitive to the scale of the gradient, which AdamW mostly normalises away
        return torch.optim.SGD(model.parameters(), lr=0.5)
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def make_trainer(
    model: torch.nn.Module,
    args: TrainingArguments,
    data: list[dict[str, torch.Tensor]],
    method: str,
    opt: str = "sgd",
    trainer_cls: type[AdversarialTrainer] = CheckedTrainer,
    **options,
) -> AdversarialTrainer:
    """``trainer_cls`` training ``model`` on ``data`` with ``method`` and the optimizer ``opt`` of
    :func:`make_optimizer`; ``options``: the trainer's other arguments."""
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(make_optimizer(model, opt), None),
        adversarial=method,
        **options,
    )


def run_trainer(model, tmp_path, method, params=None, ga=1, opt="adamw", trainer_cls=CheckedTrainer, **kwargs):
    options = PARAMS.get(method, {}) if params is None else params
    trainer = make_trainer(
        model, make_args(tmp_path, ga=ga, **kwargs), make_data(), method, opt, trainer_cls, **options
    )
    trainer.train()
    return trainer


def hand_loop(model, method, params=None, ga=1, opt="adamw", divide=True, awp_from_step=0):
    """The seed-style loop: reference classes and loops, optimizer step every ``ga`` batches.

    Returns per optimizer step the clean loss and the loss of the last adversarial pass, summed over its micro-batches.
    """
    p = PARAMS.get(method, {}) if params is None else params
    if method == "fgm":
        attacker = reference.FGM(model, eps=p["adv_eps"])
    elif method == "pgd":
        attacker = reference.PGD(model, eps=p["adv_eps"], alpha=p["adv_alpha"])
    elif method == "awp":
        attacker = reference.AWP(model, adv_lr=p["adv_lr"], adv_eps=p["adv_eps"])
    optimizer = make_optimizer(model, opt)
    data = make_data()
    batches = [default_collate(data[i : i + BATCH]) for i in range(0, len(data), BATCH)]
    model.train()
    model.zero_grad()
    clean, adv, passes = [0.0], [0.0], []

    def closure_for(batch):
        def closure():
            loss = model(**batch).loss / (ga if divide else 1)
            passes.append(loss.item())
            return loss

        return closure

    for i, batch in enumerate(batches):
        closure = closure_for(batch)
        passes.clear()
        if method == "fgm":
            reference.fgm_step(attacker, closure)
        elif method == "pgd":
            reference.pgd_step(attacker, model, closure, k=p["adv_k"])
        elif method == "awp" and i // ga >= awp_from_step:
            params = [q for q in model.parameters() if q.requires_grad]
            earlier = [q.grad for q in params]
            for q in params:
                q.grad = None
            reference.awp_step(attacker, model, closure, k=p["adv_k"])
            for q, grad in zip(params, earlier):
                if grad is not None:
                    q.grad = grad if q.grad is None else q.grad.add_(grad)
        else:
            closure().backward()
        clean[-1] += passes[0]
        adv[-1] += passes[-1] if len(passes) > 1 else math.nan
        if (i + 1) % ga == 0:
            optimizer.step()
            model.zero_grad()
            clean.append(0.0)
            adv.append(0.0)
    return clean[:-1], adv[:-1]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def train_logs(trainer: Trainer, key: str) -> list[float]:
    return [entry.get(key, math.nan) for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(
    "method, extra, awp_from_step",
    [
        ("fgm", {}, 0),
        ("pgd", {}, 0),
        ("awp", {}, 0),
        ("awp", {"adv_k": 2, "awp_start_epoch": 0.5}, 2),  # state.epoch: 0, .25, .5, .75 before steps 0..3
    ],
    ids=["fgm", "pgd", "awp", "awp-k2-start0.5"],
)
def test_parity_with_reference_loop(tmp_path, method, extra, awp_from_step):
    model = tiny_bert()
    twin = copy.deepcopy(model)
    params = {**PARAMS[method], **extra}
    trainer = run_trainer(model, tmp_path, method, params)
    clean, adv = hand_loop(twin, method, params, awp_from_step=awp_from_step)
    assert_same_weights(model, twin)
    assert train_logs(trainer, "loss") == pytest.approx(clean, rel=1e-5)
    assert train_logs(trainer, "adv_loss") == pytest.approx(adv, rel=1e-5, nan_ok=True)
    assert trainer.attacker.nonfinite_skips == 0


@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_gradient_accumulation_parity(tmp_path, method):
    """GA=2 over 4 micro-batches, SGD (sensitive to the gradient's scale); the Trainer divides each pass by GA."""
    model = tiny_bert()
    model.accepts_loss_kwargs = False  # the Trainer divides the loss by GA (BERT ignores num_items_in_batch)
    twin = copy.deepcopy(model)
    trainer = run_trainer(model, tmp_path, method, ga=2, opt="sgd")
    clean, adv = hand_loop(twin, method, ga=2, opt="sgd")
    assert_same_weights(model, twin, rtol=1e-5, atol=1e-6)
    assert train_logs(trainer, "loss") == pytest.approx(clean, rel=1e-5)
    assert train_logs(trainer, "adv_loss") == pytest.approx(adv, rel=1e-5)


def test_gradient_accumulation_with_num_items_in_batch(tmp_path):
    """BERT's forward takes **kwargs, so the Trainer passes num_items_in_batch and does not divide by GA; each
    adversarial pass must be treated exactly like the clean one."""
    model = tiny_bert()
    twin = copy.deepcopy(model)
    trainer = run_trainer(model, tmp_path, "pgd", ga=2, opt="sgd")
    assert trainer.model_accepts_loss_kwargs
    hand_loop(twin, "pgd", ga=2, opt="sgd", divide=False)
    assert_same_weights(model, twin, rtol=1e-5, atol=1e-6)


def test_none_is_the_plain_trainer(tmp_path):
    model = tiny_bert()
    twin = copy.deepcopy(model)
    trainer = run_trainer(model, tmp_path, None)
    assert trainer.attacker is None

    class PlainTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    plain = PlainTrainer(
        model=twin,
        args=make_args(tmp_path),
        train_dataset=make_data(),
        optimizers=(make_optimizer(twin, "adamw"), None),
    )
    plain.train()
    for pa, pb in zip(model.parameters(), twin.parameters()):
        assert torch.equal(pa, pb)
    assert train_logs(trainer, "loss") == train_logs(plain, "loss")
    assert all(math.isnan(v) for v in train_logs(trainer, "adv_loss"))


@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_bf16_autocast(tmp_path, method):
    """bf16 autocast on the CPU: every pass runs under it, weights come back bit-exact after each step
    (CheckedTrainer), and the SGD updates stay within a few per cent of the fp32 run's (AdamW would blow up
    rounding differences in near-zero gradients to whole steps)."""
    model = tiny_bert()
    start, twin = copy.deepcopy(model), copy.deepcopy(model)
    trainer = run_trainer(model, tmp_path, method, opt="sgd", bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    losses = train_logs(trainer, "loss") + train_logs(trainer, "adv_loss")
    assert all(math.isfinite(v) for v in losses)
    run_trainer(twin, tmp_path, method, opt="sgd")
    params = list(zip(start.parameters(), model.parameters(), twin.parameters()))
    update = torch.cat([(p32 - p0).flatten() for p0, _, p32 in params])
    error = torch.cat([(p16 - p32).flatten() for _, p16, p32 in params])
    assert update.norm() > 0.1
    assert 0 < error.norm() < 0.03 * update.norm()  # bf16 did run (not 0), and close (measured 0.3-0.5%)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 loss scaling (GradScaler) runs on CUDA only: with "
    "use_cpu, accelerate turns neither autocast nor the scaler on for fp16",
)
@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_fp16_grad_scaler_cuda(tmp_path, method):
    trainer = run_trainer(tiny_bert(), tmp_path, method, fp16=True, use_cpu=False)
    assert trainer.accelerator.scaler is not None
    assert all(math.isfinite(v) for v in train_logs(trainer, "loss") + train_logs(trainer, "adv_loss"))


@pytest.mark.parametrize("method, failing_pass", [("fgm", 2), ("pgd", 3), ("awp", 2)])
def test_weights_restored_when_a_pass_raises(tmp_path, method, failing_pass):
    model = tiny_bert()
    original = copy.deepcopy(model)

    class Failing(CheckedTrainer):
        calls = 0

        def compute_loss(self, *args, **kwargs):
            Failing.calls += 1
            if Failing.calls == failing_pass:
                raise KeyboardInterrupt("boom")
            return super().compute_loss(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt, match="boom"):
        run_trainer(model, tmp_path, method, trainer_cls=Failing)
    for pa, pb in zip(model.parameters(), original.parameters()):
        assert torch.equal(pa, pb)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'fgm', 'pgd', 'awp'"):
        AdversarialTrainer(adversarial="fgsm")
    with pytest.raises(ValueError, match="adv_k"):
        AdversarialTrainer(adversarial="pgd", adv_k=0)
    with pytest.raises(ValueError, match="adv_k"):
        AdversarialTrainer(adversarial="fgm", adv_k=3)
    with pytest.raises(ValueError, match="adv_k: not an option of 'freelb'"):
        AdversarialTrainer(adversarial="freelb", adv_k=3)
    with pytest.raises(ValueError, match="awp_start_epoch"):
        AdversarialTrainer(adversarial="awp", awp_start_epoch=-1)
    with pytest.raises(ValueError, match="adv_start_epoch"):
        AdversarialTrainer(adversarial="fgm", adv_start_epoch=math.nan)
    with pytest.raises(ValueError, match="adv_eps must be a finite number > 0"):
        AdversarialTrainer(adversarial="pgd", adv_eps=-1.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        AdversarialTrainer(adversarial="smart", adv_options={"steps": 0})
    model = tiny_bert()
    with pytest.raises(ValueError, match="emb_name='wte'.*word_embeddings"):
        AdversarialTrainer(model=model, args=make_args(tmp_path), adversarial="fgm", emb_name="wte")
    with pytest.raises(ValueError, match="adv_param='nope'"):
        AdversarialTrainer(model=model, args=make_args(tmp_path), adversarial="awp", adv_param="nope")
    trainer = AdversarialTrainer(model=model, args=make_args(tmp_path), adversarial="AWP")
    assert trainer.adversarial == "awp" and trainer.attacker.adv_eps == 0.01


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    monkeypatch.delitem(sys.modules, "fastadv.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install -e \".\[transformers\]\""):
        importlib.import_module("fastadv.integrations.transformers")


def test_example_script_runs(capsys, monkeypatch):
    argv = ["--steps", "4", "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--hidden", "16"]
    results = run_example("adversarial_bert", [*argv, "--layers", "1"], monkeypatch)
    assert set(results) == {"none", "fgm", "pgd", "awp"}
    for method, r in results.items():
        assert math.isfinite(r["train_loss"]) and 0 <= r["acc"] <= 1
        assert math.isfinite(r["attacked_loss"])
        assert math.isnan(r["train_adv_loss"]) == (method == "none")
    assert "attacked" in capsys.readouterr().out


INPUT_PARAMS = {
    "freelb": {"adv_lr": 0.1, "adv_steps": 2, "adv_init_mag": 0.1, "adv_max_norm": 0.5},
    "smart": {"alpha": 1.0, "steps": 2, "step_size": 0.1, "noise_var": 1e-3, "adv_eps": 0.05},
    "r3f": {"r3f_lambda": 1.0, "eps": 1e-2},
    "vat": {"eps": 1.0, "alpha": 2.0},
    "gradient_penalty": {"epsilon": 10.0},
}
REFERENCE_STEPS = {
    "freelb": reference.freelb_step,
    "smart": reference.smart_step,
    "r3f": reference.r3f_step,
    "vat": reference.vat_step,
    "gradient_penalty": reference.gradient_penalty_step,
}


def masked_data() -> list[dict[str, torch.Tensor]]:
    """:func:`make_data` with an attention mask padding the end of some rows."""
    data = make_data()
    for i, row in enumerate(data):
        row["attention_mask"] = (torch.arange(SEQ) < SEQ - i % 3).long()
    return data


class SeededTrainer(CheckedTrainer):
    """Seeds the random state before each micro-batch (its noise), as :func:`input_hand_loop` does."""

    micro_batches = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        torch.manual_seed(1000 + self.micro_batches)
        self.micro_batches += 1
        return super().training_step(model, inputs, num_items_in_batch)


def input_hand_loop(model, method: str, ga: int, attack: bool = True) -> None:
    """The hand-written loop around the reference step of ``method`` (SGD, the loss divided by ``ga``); without
    ``attack`` the plain loop."""
    optimizer = make_optimizer(model, "sgd")
    data = masked_data()
    batches = [default_collate(data[i : i + BATCH]) for i in range(0, len(data), BATCH)]
    model.train()
    for i, batch in enumerate(batches):
        torch.manual_seed(1000 + i)

        def forward(batch=batch):
            out = model(**batch)
            return (out.loss, out.logits) if METHODS[method].needs_logits else out.loss

        if attack:
            REFERENCE_STEPS[method](
                model.bert.embeddings.word_embeddings,
                forward,
                batch["attention_mask"],
                backward=lambda loss: (loss / ga).backward(),
                **INPUT_PARAMS[method],
            )
        else:
            (model(**batch).loss / ga).backward()
        if (i + 1) % ga == 0:
            optimizer.step()
            model.zero_grad()


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("method", ["freelb", "smart", "r3f", "vat", "gradient_penalty"])
def test_input_space_methods_match_their_reference_loop(tmp_path, method, ga):
    """FreeLB, SMART, R3F, VAT and the gradient penalty on a BERT through the Trainer (its compute_loss, GA division
    and backward) against the hand-written loop around their reference steps, with padded batches."""
    model = tiny_bert()
    model.accepts_loss_kwargs = False  # the Trainer divides by GA
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    trainer = make_trainer(
        model,
        make_args(tmp_path, ga=ga),
        masked_data(),
        method,
        trainer_cls=SeededTrainer,
        adv_options=INPUT_PARAMS[method],
    )
    trainer.train()
    input_hand_loop(twin, method, ga)
    assert_same_weights(model, twin, rtol=1e-5, atol=1e-6)
    assert all(math.isfinite(value) for value in train_logs(trainer, "adv_loss"))
    input_hand_loop(plain, method, ga, attack=False)
    attacked = max((a - b).abs().max().item() for a, b in zip(twin.parameters(), plain.parameters()))
    assert attacked > 1e-5, "the method changed nothing"  # 10x the tolerance above


def test_input_space_options_are_checked(tmp_path):
    """The shorthand arguments set the method's option of that name (``adv_X``: ``X``, else ``adv_X``); one the method
    lacks, and any adv_options key it lacks, is refused at construction."""
    smart = AdversarialTrainer(model=tiny_bert(), args=make_args(tmp_path), adversarial="smart", adv_eps=0.1)
    assert smart.attacker.adv_eps == 0.1
    assert (
        AdversarialTrainer(model=tiny_bert(), args=make_args(tmp_path), adversarial="r3f", adv_eps=0.1).attacker.eps
        == 0.1
    )
    with pytest.raises(ValueError, match="adv_param does not apply to 'smart'.*adv_options="):
        AdversarialTrainer(model=tiny_bert(), args=make_args(tmp_path), adversarial="smart", adv_param="x")
    with pytest.raises(ValueError, match="a: not an option of 'fgm'"):
        AdversarialTrainer(model=tiny_bert(), args=make_args(tmp_path), adversarial="fgm", adv_options={"a": 1})
    with pytest.raises(ValueError, match="alpha: not an option of 'r3f'"):
        AdversarialTrainer(model=tiny_bert(), args=make_args(tmp_path), adversarial="r3f", adv_options={"alpha": 1})
    with pytest.raises(ValueError, match="adv_eps given both"):
        AdversarialTrainer(
            model=tiny_bert(), args=make_args(tmp_path), adversarial="smart", adv_eps=0.1, adv_options={"adv_eps": 0.2}
        )


# ---- a causal LM: the Trainer's defaults (loss kwargs, num_items_in_batch) ----

LM_VOCAB, LM_SEQ = 48, 8


def lm_data(n: int = 8, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of different lengths; padding has label -100, as a collator sets it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, LM_VOCAB, (n, LM_SEQ), generator=g)
    lengths = torch.randint(3, LM_SEQ + 1, (n,), generator=g)
    mask = (torch.arange(LM_SEQ) < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def run_lm(tmp_path, method, batch: int, ga: int, gradient_checkpointing: bool = False, **kwargs) -> torch.nn.Module:
    model = tiny_llama(LM_VOCAB)
    args = make_args(tmp_path, ga=ga, gradient_checkpointing=gradient_checkpointing)
    args.per_device_train_batch_size = batch
    trainer = make_trainer(model, args, lm_data(), method, emb_name="embed_tokens", **kwargs)
    assert trainer.model_accepts_loss_kwargs  # the default for a causal LM: num_items_in_batch, no GA division
    trainer.train()
    return model


@pytest.mark.parametrize(
    "method, options",
    [
        ("smart", {"alpha": 5.0}),
        ("r3f", {"r3f_lambda": 200.0, "eps": 0.05}),
        ("freelb", {"adv_init_mag": 0.1}),  # per-example steps (FGM's and PGD's whole-gradient norm do depend on it)
        ("vat", {"eps": 2.0, "alpha": 20.0}),
        ("gradient_penalty", {"epsilon": 0.1}),  # of the accumulated batch's loss: num_items_in_batch normalises it
    ],
)
def test_a_causal_lm_update_does_not_depend_on_how_the_batch_is_split(tmp_path, method, options):
    """With a loss normalised by num_items_in_batch the Trainer does not divide by the accumulation steps; SMART's and
    R3F's regulariser (a per-micro-batch mean in 0.3) was then counted once per micro-batch: exactly 2x at GA=2. Now
    it counts the loss's positions and is normalised like the loss, so (batch 4, GA 1) and (batch 2, GA 2) give the
    same update, as they do for the plain Trainer. (The noise is the same too: the CPU generator's draws for a batch
    of 4 are those for two batches of 2.)"""
    adv_options = {"adv_options": options} if options else {}
    one = run_lm(tmp_path, method, 4, 1, **adv_options)
    split = run_lm(tmp_path, method, 2, 2, **adv_options)
    plain = run_lm(tmp_path, None, 4, 1)
    assert_same_weights(split, one, rtol=1e-4, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(one.parameters(), plain.parameters())) > 1e-4


@pytest.mark.parametrize("method", ["fgm", "freelb", "smart", "r3f", "vat"])
@pytest.mark.parametrize("loss", ["label_smoothing", "compute_loss_func"])
def test_each_pass_gets_its_own_copy_of_the_batch(tmp_path, method, loss):
    """A label smoother or a compute_loss_func makes compute_loss pop the labels from the batch: every pass of a step
    must still have them (0.3 gave the second pass none). The step matches the hand loop with the same loss."""
    model = tiny_bert()
    model.accepts_loss_kwargs = False
    twin = copy.deepcopy(model)
    smoothing = 0.1

    def smoothed(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs["logits"], labels, label_smoothing=smoothing)

    extra = {"label_smoothing_factor": smoothing} if loss == "label_smoothing" else {}
    args = make_args(tmp_path, **extra)
    trainer_kwargs = {"compute_loss_func": smoothed} if loss == "compute_loss_func" else {}
    options = {"adv_options": INPUT_PARAMS[method]} if method in INPUT_PARAMS else PARAMS[method]
    trainer = make_trainer(model, args, masked_data(), method, trainer_cls=SeededTrainer, **options, **trainer_kwargs)
    trainer.train()
    optimizer = make_optimizer(twin, "sgd")
    data = masked_data()
    for i, start in enumerate(range(0, len(data), BATCH)):
        batch = default_collate(data[start : start + BATCH])
        torch.manual_seed(1000 + i)

        def forward(batch=batch):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = twin(**inputs).logits
            loss = smoothed({"logits": logits}, batch["labels"])
            return loss if method in ("fgm", "freelb") else (loss, logits)

        if method == "fgm":
            reference.fgm_step(reference.FGM(twin, eps=PARAMS["fgm"]["adv_eps"]), forward)
        else:
            REFERENCE_STEPS[method](
                twin.bert.embeddings.word_embeddings, forward, batch["attention_mask"], **INPUT_PARAMS[method]
            )
        optimizer.step()
        twin.zero_grad()
    assert_same_weights(model, twin, rtol=1e-5, atol=1e-6)


class _ScheduleFreeLike(torch.optim.SGD):
    """What schedule-free optimizers do around evaluation: ``eval()`` moves the weights to their evaluation point,
    ``train()`` back (here: scaled by 2 and back); the Trainer calls ``eval()`` in evaluate(), ``train()`` at the
    start of its training_step."""

    training = True

    def eval(self):
        self._switch(False, 2.0)

    def train(self):
        self._switch(True, 0.5)

    def _switch(self, training: bool, scale: float) -> None:
        if self.training != training:
            with torch.no_grad():
                torch._foreach_mul_([p for group in self.param_groups for p in group["params"]], scale)
            self.training = training


class _Unchecked(AdversarialTrainer):
    """:class:`SeededTrainer` without the weights check (the optimizer's train() moves them inside the step)."""

    _get_train_sampler = CheckedTrainer._get_train_sampler
    micro_batches = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        torch.manual_seed(1000 + self.micro_batches)
        self.micro_batches += 1
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("method", ["fgm", "smart"])
def test_an_evaluation_between_steps_with_a_schedule_free_optimizer(tmp_path, method):
    """The step calls what Trainer.training_step calls before its forward pass, in its order: model.train(), then the
    optimizer's train() (0.3's input-space step ran its first forward at the evaluation weights). Evaluating after
    every step changes nothing against training without evaluation."""
    results = []
    for evaluate in (False, True):
        model = tiny_bert()
        model.accepts_loss_kwargs = False
        extra = {"eval_strategy": "steps", "eval_steps": 1} if evaluate else {}
        options = {"adv_options": INPUT_PARAMS[method]} if method in INPUT_PARAMS else PARAMS[method]
        trainer = _Unchecked(
            model=model,
            args=make_args(tmp_path, **extra),
            train_dataset=masked_data(),
            eval_dataset=masked_data()[:4] if evaluate else None,
            optimizers=(_ScheduleFreeLike(model.parameters(), lr=0.5), None),
            adversarial=method,
            **options,
        )
        trainer.train()
        trainer.optimizer.train()
        results.append(model)
    assert_same_weights(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["smart", "r3f"])
def test_neftune_noise_is_shared_within_a_step(tmp_path, method):
    """Trainer(neftune_noise_alpha=...) adds fresh noise to the embedding output at every pass; SMART and R3F compare
    passes, so within a step the noise is drawn once: the logged divergence stays the method's (small here), not
    NEFTune's."""
    options = {"smart": {"update": "paper"}, "r3f": {}}[method]
    logs = {}
    for alpha in (None, 5.0):
        model = tiny_bert()
        trainer = make_trainer(
            model, make_args(tmp_path, neftune_noise_alpha=alpha), masked_data(), method, adv_options=options
        )
        trainer.train()
        logs[alpha] = max(train_logs(trainer, "adv_loss"))
    assert logs[5.0] < 10 * logs[None], logs


def test_lora_on_the_embedding_is_refused_for_weight_attacks(tmp_path):
    """PEFT LoRA targeting the embedding: FGM/PGD would attack lora_embedding_A/B; refused with what to take."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(LM_VOCAB), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="adapter weights.*an input-space method: FusedFreeLB"):
        AdversarialTrainer(model=model, args=make_args(tmp_path), adversarial="pgd", emb_name="embed_tokens")
    frozen = peft.get_peft_model(tiny_llama(LM_VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="frozen.*modules_to_save"):
        AdversarialTrainer(model=frozen, args=make_args(tmp_path), adversarial="fgm", emb_name="embed_tokens")


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb", "smart", "r3f"])
def test_gradient_checkpointing_changes_nothing(tmp_path, method):
    """transformers' gradient checkpointing (non-reentrant, its default) recomputes the layers in the backward:
    the same weights as without it, for every method."""
    options = {"fgm": {}, "pgd": {"adv_k": 2}}.get(method, {"adv_options": {}})
    runs = [
        run_lm(tmp_path, method, 4, 1, gradient_checkpointing=checkpointing, **options)
        for checkpointing in (False, True)
    ]
    assert_same_weights(runs[1], runs[0], rtol=1e-5, atol=1e-6)

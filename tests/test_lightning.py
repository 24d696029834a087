"""The Lightning callback (and the manual-optimization recipe) against the hand-written loop around the seed's classes
(:func:`_helpers.seed_loop`): 32-true, bf16-mixed, fp16 with the GradScaler, gradient accumulation, clipping, a late
start, and two DDP processes (gloo) with and without accumulation."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _helpers import (  # noqa: E402
    FRAMEWORK_HYPER,
    FRAMEWORK_K,
    INPUT_CASES,
    KINDS,
    TinyClassifier,
    TinyEncoder,
    assert_matches_and_attacked,
    assert_toy_example_runs,
    ddp_start,
    flat_params,
    framework_batches,
    input_batches,
    input_train,
    make_attacker,
    seed_loop,
    spawn_ranks,
)
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fastadv.integrations.lightning import AdversarialTraining  # noqa: E402

STEPS = 4  # optimizer steps
WORLD = 2
#: The callback's options for each kind: the hyperparameters of the seed's classes in :func:`seed_loop`.
OPTIONS = {kind: {**FRAMEWORK_HYPER[kind], **({"k": FRAMEWORK_K[kind]} if kind != "fgm" else {})} for kind in KINDS}
#: Trainer options, and the matching options of seed_loop. "16-mixed" on the CPU would silently be bf16: the plugin
#: is what gives fp16 autocast with the GradScaler.
CONFIGS = {
    "32-true": ({}, {}),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {"autocast": torch.bfloat16}),
    "16-mixed-scaler": ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, {"autocast": torch.float16, "scaler": True}),
    "accumulate-2": ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
    "clip": ({"gradient_clip_val": 0.5}, {"clip": 0.5}),  # clean gradient norm ~0.6, with the attack ~1.2
}


@pytest.fixture(autouse=True, scope="module")
def _single_threaded():
    """One thread is much faster for a model this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Module(pl.LightningModule):
    """:class:`TinyEncoder` under Lightning; counts its training_step calls and logs the count."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.1):
        super().__init__()
        self.model = model
        self.lr = lr
        self.calls = 0

    def training_step(self, ids, batch_idx):
        self.calls += 1
        self.log("calls", float(self.calls))
        return self.model(ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualModule(Module):
    """The README's manual-optimization recipe: ``attacker.run`` with ``self.manual_backward``, ``no_sync`` on the
    micro-batches before the last, ``clip_gradients``."""

    def __init__(self, model, kind: str, accumulate: int, clip: float):
        super().__init__(model)
        self.automatic_optimization = False
        self.kind, self.accumulate, self.clip = kind, accumulate, clip

    def on_fit_start(self):
        self.attacker = make_attacker(self.kind, self, "auto", **FRAMEWORK_HYPER[self.kind])  # FusedPGD(self, ...)

    def training_step(self, ids, batch_idx):
        opt = self.optimizers()
        last = (batch_idx + 1) % self.accumulate == 0

        def run_pass():
            loss = self.model(ids) / self.accumulate
            self.manual_backward(loss)
            return loss

        no_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)  # DDP's no_sync
        with contextlib.nullcontext() if last else no_sync():
            self.attacker.run(run_pass, FRAMEWORK_K[self.kind])
        if last:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()


#: The input-space configurations the callback is tested with, and the random seed of each batch (both loops).
INPUT_KINDS = ("freelb-l2", "smart-inf", "r3f", "vat", "gradient_penalty")
INPUT_SEED = 1000


class ClassifierModule(pl.LightningModule):
    """:class:`TinyClassifier` under Lightning, on dict batches; returns the loss and the logits (SMART, R3F); seeds
    the random state at each batch as :func:`input_train` does."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.1):
        super().__init__()
        self.model, self.lr = model, lr

    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(INPUT_SEED + batch_idx)

    def training_step(self, batch, batch_idx):
        loss, logits = self.model(batch["ids"], batch["attention_mask"], batch["labels"])
        return {"loss": loss, "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def input_callback(kind: str) -> AdversarialTraining:
    return AdversarialTraining(kind.split("-")[0], adv_options=INPUT_CASES[kind][2])


def quiet_trainer(**options: Any) -> pl.Trainer:
    """A CPU Trainer that logs, shows and saves nothing (checkpoints with ``enable_checkpointing=True``), for one epoch
    unless ``max_epochs`` says otherwise; ``options``: the Trainer's other arguments."""
    options = {"max_epochs": 1, "enable_checkpointing": False, **options}
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **options)


def fit(
    model: torch.nn.Module,
    batches,
    callbacks=(),
    module_cls=Module,
    epochs: int = 1,
    devices: int = 1,
    module_args=(),
    **trainer_options,
) -> pl.Trainer:
    module = module_cls(model, *module_args)
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=list(callbacks),
        use_distributed_sampler=False,
        **trainer_options,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def seed_options(options: dict) -> dict:
    options = dict(options)
    if options.pop("scaler", False):
        options["scaler"] = torch.amp.GradScaler("cpu")
    return options


@pytest.mark.parametrize("config", CONFIGS)
def test_callback_matches_the_seed_loop(config):
    """Every method under one Trainer configuration: the weights after training match the hand-written loop's;
    ``training_step``'s logs come from the clean pass only."""
    trainer_options, loop_options = CONFIGS[config]
    accumulate = loop_options.get("accumulate", 1)
    batches = framework_batches(STEPS * accumulate)
    torch.manual_seed(0)
    start = TinyEncoder(device="cpu")
    plain = copy.deepcopy(start)
    seed_loop(plain, None, batches, **seed_options(loop_options))
    for kind in KINDS:
        model, want = copy.deepcopy(start), copy.deepcopy(start)
        callback = AdversarialTraining(kind, **OPTIONS[kind])
        trainer = fit(model, batches, [callback], **trainer_options)
        seed_loop(want, kind, batches, **seed_options(loop_options))
        # bf16/fp16 too: both loops run the same autocast ops on fp32 weights and only the attacks' fp32 rounding
        # differs (measured: at most 1.2e-7), while bf16 against fp32 moves the weights by 1e-4: so autocast did run
        assert_matches_and_attacked(flat_params(model), flat_params(want), flat_params(plain))
        passes = 1 + FRAMEWORK_K[kind]
        assert trainer.callback_metrics["calls"] == len(batches) * passes - (passes - 1)
        assert torch.isfinite(trainer.callback_metrics["adv_loss"])
        assert callback.attacker.nonfinite_skips == 0


@pytest.mark.parametrize("config", CONFIGS)
def test_input_space_methods_match_their_reference_loop(config):
    """FreeLB, SMART, R3F, VAT and the gradient penalty through the callback under each Trainer configuration,
    against the hand-written loop around their reference steps (the same batches, noise and dropout masks)."""
    trainer_options, loop_options = CONFIGS[config]
    accumulate = loop_options.get("accumulate", 1)
    batches = input_batches(STEPS * accumulate, device=torch.device("cpu"))
    torch.manual_seed(0)
    start = TinyClassifier(device="cpu")
    plain = copy.deepcopy(start)
    fit(plain, batches, module_cls=ClassifierModule, **trainer_options)
    for kind in INPUT_KINDS:
        model, want = copy.deepcopy(start), copy.deepcopy(start)
        trainer = fit(model, batches, [input_callback(kind)], module_cls=ClassifierModule, **trainer_options)
        input_train(want, kind, None, batches, seed=INPUT_SEED, **seed_options(loop_options))
        if "autocast" in loop_options:
            # The same math, rounded differently in one place (FreeLB: Lightning's pass divided after its backward;
            # R3F: the divergence's formula), shows through the half-precision backward: about 5e-5 here
            actual, want_flat, plain_flat = flat_params(model), flat_params(want), flat_params(plain)
            torch.testing.assert_close(actual, want_flat, rtol=0, atol=1e-4)
            assert (want_flat - plain_flat).abs().max() > 1e-3, "the attack changed nothing"
        else:
            assert_matches_and_attacked(flat_params(model), flat_params(want), flat_params(plain))
        assert torch.isfinite(trainer.callback_metrics["adv_loss"])
        assert not model.embeddings.word_embeddings._forward_hooks
        assert "training_step" not in trainer.lightning_module.__dict__  # the wrapper is gone after fitting


def test_input_space_methods_need_the_logits():
    with pytest.raises(RuntimeError, match="'loss' and 'logits'"):
        fit(
            TinyClassifier(device="cpu"),
            input_batches(2, device=torch.device("cpu")),
            [AdversarialTraining("smart")],
            module_cls=_LossOnly,
        )


class _LossOnly(ClassifierModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def test_manual_optimization_recipe():
    """The README's recipe (accumulation, clipping) with each method, single process."""
    batches = framework_batches(STEPS * 2)
    torch.manual_seed(0)
    start = TinyEncoder(device="cpu")
    plain = copy.deepcopy(start)
    seed_loop(plain, None, batches, accumulate=2, clip=0.5)
    for kind in KINDS:
        model, want = copy.deepcopy(start), copy.deepcopy(start)
        fit(model, batches, module_cls=ManualModule, module_args=(kind, 2, 0.5))
        seed_loop(want, kind, batches, accumulate=2, clip=0.5)
        assert_matches_and_attacked(flat_params(model), flat_params(want), flat_params(plain))


def test_start_epoch():
    """Plain steps in epoch 0, adversarial from epoch 1 on."""
    batches = framework_batches(STEPS)
    torch.manual_seed(0)
    start = TinyEncoder(device="cpu")
    model, want, plain = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    fit(model, batches, [AdversarialTraining("awp", start_epoch=1, **OPTIONS["awp"])], epochs=2)
    seed_loop(want, "awp", batches, epochs=2, start_epoch=1)
    seed_loop(plain, "awp", batches, epochs=2)  # attacked from the start
    assert_matches_and_attacked(flat_params(model), flat_params(want), flat_params(plain))


def _ddp_worker(rank: int, world: int) -> dict:
    """Per accumulation (1, 2) and method: the callback and the manual recipe (with clipping) under Lightning's DDP,
    each against the hand-written loop on a DDP-wrapped model in the same process group."""
    results = {}
    for accumulate in (1, 2):
        batches, start, results[accumulate, "plain"] = ddp_start(rank, world, STEPS, accumulate)
        for kind in KINDS:
            model, manual, want = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
            fit(
                model,
                batches,
                [AdversarialTraining(kind, **OPTIONS[kind])],
                devices=world,
                accumulate_grad_batches=accumulate,
            )
            seed_loop(torch.nn.parallel.DistributedDataParallel(want), kind, batches, accumulate=accumulate)
            results[accumulate, kind] = flat_params(model), flat_params(want)
            if accumulate == 2:
                fit(manual, batches, module_cls=ManualModule, module_args=(kind, 2, 0.5), devices=world)
                clipped = copy.deepcopy(start)
                seed_loop(torch.nn.parallel.DistributedDataParallel(clipped), kind, batches, accumulate=2, clip=0.5)
                results["manual", kind] = flat_params(manual), flat_params(clipped)
    for accumulate in (1, 2):
        batches = input_batches(STEPS * accumulate, rows=slice(rank, None, world), device=torch.device("cpu"))
        torch.manual_seed(0)
        start = TinyClassifier(device="cpu")
        plain = copy.deepcopy(start)
        fit(plain, batches, module_cls=ClassifierModule, devices=world, accumulate_grad_batches=accumulate)
        results["input", accumulate, "plain"] = flat_params(plain)
        for kind in INPUT_KINDS:
            model, want = copy.deepcopy(start), copy.deepcopy(start)
            fit(
                model,
                batches,
                [input_callback(kind)],
                module_cls=ClassifierModule,
                devices=world,
                accumulate_grad_batches=accumulate,
            )
            input_train(
                torch.nn.parallel.DistributedDataParallel(want),
                kind,
                None,
                batches,
                accumulate=accumulate,
                seed=INPUT_SEED,
            )
            results["input", accumulate, kind] = flat_params(model), flat_params(want)
    return results


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo")
@pytest.mark.skipif(sys.platform != "linux", reason="spawns processes (Linux CI)")
def test_ddp_two_processes(tmp_path):
    """One spawn for every configuration (starting processes is the slow part). Under DDP the ranks must agree, and
    each must match the hand loop (which all-reduces in every synchronised backward and runs the micro-batches
    before the last of a step under no_sync, so its perturbations there are per rank)."""
    ranks = spawn_ranks(_ddp_worker, WORLD, tmp_path)
    for key, value in ranks[0].items():
        if key[-1] == "plain":
            continue
        if key[0] == "input":
            plain = ranks[0]["input", key[1], "plain"]
        else:
            plain = ranks[0][1 if key[0] == "manual" else key[0], "plain"]
        for result in ranks:
            actual, want = result[key]
            assert_matches_and_attacked(actual, want, plain)
        assert torch.equal(value[0], ranks[1][key][0]), f"{key}: the ranks differ"


def test_bad_arguments():
    with pytest.raises(ValueError, match="'fgm', 'pgd', 'awp'"):
        AdversarialTraining("fgsm")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        AdversarialTraining("pgd", eps=-1.0)
    with pytest.raises(ValueError, match="adv_lr must be"):
        AdversarialTraining("awp", adv_lr=float("nan"))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        AdversarialTraining("pgd", k=0)
    with pytest.raises(ValueError, match="FGM makes one attack per step, got k=3"):
        AdversarialTraining("fgm", k=3)
    with pytest.raises(ValueError, match="k: not an option of 'smart' \\(its options: alpha, steps"):
        AdversarialTraining("smart", k=3)
    with pytest.raises(ValueError, match="update must be one of 'mtdnn', 'paper'"):
        AdversarialTraining("smart", adv_options={"update": "mt-dnn"})
    with pytest.raises(ValueError, match="eps given both"):
        AdversarialTraining("fgm", eps=1.0, adv_options={"eps": 2.0})
    with pytest.raises(ValueError, match="eps, emb_name: not options of 'awp'"):
        AdversarialTraining("awp", eps=1.0, emb_name="word_embeddings")
    with pytest.raises(ValueError, match="start_epoch"):
        AdversarialTraining("awp", start_epoch=-1)
    assert AdversarialTraining("AWP").method == "awp"


class ManualWithCallback(Module):
    def __init__(self, model):
        super().__init__(model)
        self.automatic_optimization = False


class FailingAt(Module):
    """``training_step`` raises at its ``n``-th call."""

    def __init__(self, model, n: int):
        super().__init__(model)
        self.n = n

    def training_step(self, ids, batch_idx):
        if self.calls + 1 == self.n:
            raise RuntimeError("boom")  # not KeyboardInterrupt: Lightning turns that into SystemExit
        return super().training_step(ids, batch_idx)


@pytest.mark.parametrize(
    "kind, options, module, error, match",
    [
        ("fgm", {"emb_name": "wte"}, (Module,), ValueError, "emb_name='wte'.*word_embeddings"),
        ("awp", {"adv_param": "nope"}, (Module,), ValueError, "adv_param='nope'"),
        ("pgd", {}, (ManualWithCallback,), RuntimeError, "automatic optimization.*manual_backward"),
        ("fgm", {}, (FailingAt, 2), RuntimeError, "boom"),  # the adversarial pass
        ("pgd", {"k": 3}, (FailingAt, 3), RuntimeError, "boom"),  # the second adversarial pass
        ("awp", {"k": 2}, (FailingAt, 3), RuntimeError, "boom"),
    ],
    ids=["no-emb_name", "no-adv_param", "manual-optimization", "fgm-pass-raises", "pgd-pass-raises", "awp-pass-raises"],
)
def test_errors_leave_the_weights_untouched(kind, options, module, error, match):
    model = TinyEncoder(device="cpu")
    before = flat_params(model)
    with pytest.raises(error, match=match):
        fit(
            model,
            framework_batches(2),
            [AdversarialTraining(kind, **options)],
            module_cls=module[0],
            module_args=module[1:],
        )
    assert torch.equal(flat_params(model), before)


def test_missing_lightning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # makes `import lightning.pytorch` fail
    monkeypatch.delitem(sys.modules, "fastadv.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install -e \".\[lightning\]\""):
        importlib.import_module("fastadv.integrations.lightning")


def test_example_script_runs(capsys, monkeypatch):
    assert_toy_example_runs(
        "lightning_adversarial", {"none", "fgm", "pgd", "awp"}, monkeypatch, capsys, ["--accumulate", "2"]
    )


# ---- the user's whole lifecycle: a fit that raises, skipped batches, validation between steps, save and resume ----


def _fastadv_left_on(module: pl.LightningModule, trainer: pl.Trainer) -> list[str]:
    """What of fastadv is on the module (or the trainer's strategy) now: should be nothing."""
    left = [f"module.{name}" for name in ("training_step", "log") if name in module.__dict__]
    left += ["strategy.training_step"] if "training_step" in trainer.strategy.__dict__ else []
    left += [f"{name} hooks" for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    left += ["global hooks"] if torch.nn.modules.module._global_forward_hooks else []
    return left


class _FailsAt(ClassifierModule):
    """``training_step`` raises at its ``n``-th call."""

    def __init__(self, model, n: int):
        super().__init__(model)
        self.n, self.calls = n, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("kind", ["fgm", "freelb-l2", "smart-inf", "r3f"])
def test_after_a_fit_that_raises_nothing_of_fastadv_is_left_and_a_plain_fit_is_plain(kind):
    """0.3 left SMART's and R3F's wrapped training_step on the module after a failed fit, so a later plain fit
    trained with SMART."""
    batches = input_batches(STEPS, device=torch.device("cpu"))
    torch.manual_seed(0)
    start = TinyClassifier(device="cpu")
    callback = input_callback(kind) if "-" in kind or kind == "r3f" else AdversarialTraining(kind)
    model = copy.deepcopy(start)
    module = _FailsAt(model, 5)
    trainer = quiet_trainer(callbacks=[callback])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    assert not _fastadv_left_on(module, trainer)
    failed = copy.deepcopy(model)
    module.n = -1  # fails no more
    plain_trainer = quiet_trainer()
    plain_trainer.fit(module, DataLoader(batches, batch_size=None))
    want = copy.deepcopy(failed)
    fit(want, batches, module_cls=ClassifierModule)
    assert torch.equal(flat_params(model), flat_params(want))


class _SkipsAndValidates(ClassifierModule):
    """Skips its second batch (``training_step`` returns None, Lightning's way) and validates after every step; keeps
    the validation logits."""

    def __init__(self, model):
        super().__init__(model)
        self.validation_logits = []

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.validation_logits.append(self.model(batch["ids"], batch["attention_mask"], batch["labels"])[1])


@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_a_skipped_batch_and_validation_between_steps(kind):
    """0.3 left FreeLB's hook on after a skipped batch, into the validation that followed (noised logits). The
    validation outputs are the plain model's, and the training matches the hand loop over the batches not skipped."""
    batches = input_batches(STEPS + 1, device=torch.device("cpu"))
    torch.manual_seed(0)
    start = TinyClassifier(device="cpu")
    model = copy.deepcopy(start)
    module = _SkipsAndValidates(model)
    trainer = quiet_trainer(
        callbacks=[input_callback(kind)], val_check_interval=1, num_sanity_val_steps=0, limit_val_batches=1
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert not _fastadv_left_on(module, trainer)
    assert len(module.validation_logits) == STEPS + 1
    want = copy.deepcopy(start)
    for i, b in enumerate(batches):
        if i != 1:  # seeded as ClassifierModule seeds batch i
            input_train(want, kind, None, [b], seed=INPUT_SEED + i)
    final = want.eval()(batches[0]["ids"], batches[0]["attention_mask"], batches[0]["labels"])[1]
    torch.testing.assert_close(module.validation_logits[-1], final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["pgd", "smart-inf"])
def test_save_and_resume(tmp_path, kind):
    """Two epochs in one fit, or one, a checkpoint, and a new Trainer resuming from it: the same weights."""
    batches = input_batches(STEPS, device=torch.device("cpu"))
    torch.manual_seed(0)
    start = TinyClassifier(device="cpu")

    def callback():
        return AdversarialTraining(kind, **OPTIONS[kind]) if kind in OPTIONS else input_callback(kind)

    def trainer(epochs, **options):
        return quiet_trainer(max_epochs=epochs, callbacks=[callback()], **options)

    whole = copy.deepcopy(start)
    trainer(2).fit(ClassifierModule(whole), DataLoader(batches, batch_size=None))
    first = copy.deepcopy(start)
    halfway = trainer(1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    halfway.fit(ClassifierModule(first), DataLoader(batches, batch_size=None))
    checkpoint = halfway.checkpoint_callback.best_model_path
    resumed_model = copy.deepcopy(start)
    resumed = ClassifierModule(resumed_model)
    resuming = trainer(2, enable_checkpointing=True, default_root_dir=str(tmp_path))
    resuming.fit(resumed, DataLoader(batches, batch_size=None), ckpt_path=checkpoint)
    assert not _fastadv_left_on(resumed, resuming)
    torch.testing.assert_close(flat_params(resumed_model), flat_params(whole), rtol=1e-6, atol=1e-7)

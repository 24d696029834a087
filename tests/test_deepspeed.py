"""DeepSpeed ZeRO 1, 2 and 3 (two gloo processes, ``DS_ACCELERATOR=cpu``): the attack classes take the engine.

Each process trains on half of every batch through the engine; the weights must be those of the reference (the seed's
classes, ``freelb_step``/``smart_step``/``r3f_step``) run in one process on the whole batch (SGD on fp32 master
weights, as DeepSpeed's optimizer does). One spawn per stage runs every method x gradient accumulation (1, 2
micro-batches in one ``coalesce_grad_reduction`` block) x dtype (fp32, bf16) and the error cases, re-initialising the
engine for each (starting processes and importing deepspeed is the slow part); the parent asserts on each
configuration by name.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import (
    HYPER,
    KINDS,
    TinyClassifier,
    TinyEncoder,
    adversarial_step,
    input_batches,
    input_forward,
    make_attacker,
)
from torch import nn

from fastadv import FusedFGM, FusedFreeLB, FusedGradientPenalty, FusedR3F, FusedSMART, FusedVAT
from fastadv.loops import earlier_grads_set_aside
from fastadv.reference import freelb_step, gradient_penalty_step, r3f_step, smart_step, vat_step

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the processes train on the CPU (gloo), GPU or not
pytest.importorskip("deepspeed")
pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="spawns processes with a file:// rendezvous (Linux CI)"),
]

WORLD = 2
STEPS = 3
LR = 0.1
SIZE = (4, 6)
# 63 rows of 16: each ZeRO-3 partition (504 values) is 31.5 rows, so the attack works on half rows of 8
VOCAB = 63
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: The input-space methods: (class, reference step, options), strong enough that the perturbation, its noise and
#: (FreeLB, SMART) its ascent each change the weights by 3e-4 or more, 300 times the fp32 tolerance: FreeLB with 3
#: passes from initial noise, SMART's default (mt-dnn) update with 2 ascent steps from noise well above bf16's
#: resolution (smaller noise leaves its ascent gradient at rounding level in bf16), R3F.
INPUT_METHODS = {
    "freelb": (FusedFreeLB, freelb_step, {"adv_lr": 0.1, "adv_steps": 3, "adv_init_mag": 0.5, "adv_max_norm": 0.3}),
    "smart": (FusedSMART, smart_step, {"alpha": 4.0, "steps": 2, "step_size": 10.0, "noise_var": 0.1}),
    "r3f": (FusedR3F, r3f_step, {"r3f_lambda": 4.0, "eps": 0.5}),
    "vat": (FusedVAT, vat_step, {"eps": 1.0, "xi": 1.0, "alpha": 4.0}),  # xi: a power-iteration gradient above
    # rounding level in bf16 (at the default 0.1 its direction is rounding noise there)
    "gradient_penalty": (FusedGradientPenalty, gradient_penalty_step, {"epsilon": 10.0}),
}
CONFIGS = [(kind, gas, dtype) for kind in (*KINDS, *INPUT_METHODS) for gas in (1, 2) for dtype in DTYPES]
MANUAL = ("fgm-manual", 1, "fp32")  # the seed's attack()/restore() calls inside the caller's block
#: The hidden size of :class:`TinyClassifier`, the model of the input-space methods.
INPUT_DIM = 16


def new_model(dtype: str = "fp32", kind: str = "fgm") -> nn.Module:
    """:class:`TinyEncoder`, or for an input-space ``kind`` :class:`TinyClassifier` without dropout (its masks, drawn
    per rank, would not be the whole batch's)."""
    torch.manual_seed(0)
    if kind in INPUT_METHODS:
        return TinyClassifier(dropout=0.0, dtype=DTYPES[dtype], device="cpu")
    return TinyEncoder(vocab=VOCAB, device="cpu").to(DTYPES[dtype])


def rows_of(rank: int) -> slice:
    """The rows of each batch process ``rank`` trains on: whole consecutive blocks, in rank order, so that the noise
    each rank draws can be its block of the whole batch's (:func:`seed_noise`)."""
    share = SIZE[0] // WORLD
    return slice(rank * share, (rank + 1) * share)


def batches(kind: str, gas: int, rows: slice = slice(None)):
    """``STEPS`` optimizer steps of ``gas`` micro-batches each (this process's ``rows`` of each): token ids, or for an
    input-space ``kind`` the batches of :func:`input_batches`."""
    if kind in INPUT_METHODS:
        data = input_batches(STEPS * gas, rows=rows, device=torch.device("cpu"))
        yield from (data[i : i + gas] for i in range(0, len(data), gas))
        return
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        yield [torch.randint(0, VOCAB, SIZE, generator=gen)[rows] for _ in range(gas)]


def seed_noise(index: int, skipped_tokens: int = 0) -> None:
    """The random state before micro-batch ``index``: the reference draws the whole batch's noise ``[B, T, D]`` from
    it; a rank skips the draws of the earlier ranks' blocks of rows first (``skipped_tokens``: their tokens), so that
    its noise is its block of the whole batch's (every noise draw takes one 32-bit number per element, in order:
    :func:`test_each_rank_draws_its_block_of_the_whole_batch_noise`)."""
    torch.manual_seed(1000 + index)
    torch.rand(skipped_tokens * INPUT_DIM)


def reference_options(kind: str) -> dict[str, object]:
    """The options of the input-space ``kind`` for the one-process reference: the same, but the gradient penalty's. It
    squares the gradient of each rank's mean loss, ``WORLD`` times the whole batch's per token: ``WORLD**2`` times the
    square per rank, averaged over ``WORLD`` ranks, so the reference's ``epsilon`` is ``WORLD`` times larger (as for
    plain DDP). (SMART's ascent divergence is a sum over the rows, whose gradient per token does not depend on how
    many share the batch; FreeLB's and VAT's steps are normalised per example; R3F has none.)"""
    _, _, options = INPUT_METHODS[kind]
    if kind == "gradient_penalty":  # each rank's squared gradient is of its own mean loss: WORLD**2 times, averaged
        return {**options, "epsilon": options["epsilon"] * WORLD}
    return options


def reference(
    kind: str, gas: int, dtype: str, attack: bool = True, steps: list | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """The seed's classes or the input-space methods' reference steps (``kind``; ``attack=False``: its model and
    batches without attack) in one process on whole batches (``steps``: the micro-batches of each step, by default
    :func:`batches`); SGD steps fp32 master copies of the weights, which are then rounded to ``dtype`` (what
    DeepSpeed's ZeRO optimizers do). AWP's usage code zeroes the gradients of earlier micro-batches, which
    ``FusedAWP.step`` keeps (a documented difference): they are set aside around it here.

    Returns the weights and how far bf16 gradients let the fp32 master weights drift from them: the rounding of a
    gradient (8 significant bits) in each step, ``lr * 2**-8 * |g|`` summed over the steps, for the parameter with the
    largest such sum."""
    model = new_model(dtype, kind)
    master = [p.detach().float().clone() for p in model.parameters()]
    opt = torch.optim.SGD(master, lr=LR)
    grad_sums = torch.zeros(len(master))
    attacker = make_attacker(kind, model, None) if attack and kind in KINDS else None
    for step, micro_batches in enumerate(batches(kind, gas) if steps is None else steps):
        for i, data in enumerate(micro_batches):
            if kind in INPUT_METHODS:
                seed_noise(step * gas + i)
                forward = input_forward(model, kind, data)
                if attack:
                    _, ref_step, _ = INPUT_METHODS[kind]
                    ref_step(
                        model.embeddings.word_embeddings,
                        forward,
                        data["attention_mask"],
                        backward=lambda loss: (loss / gas).backward(),
                        **reference_options(kind),
                    )
                else:
                    (model(data["ids"], data["attention_mask"], data["labels"])[0] / gas).backward()
            elif attacker is None:
                model(data).backward()
            else:
                with earlier_grads_set_aside(model) if kind == "awp" else contextlib.nullcontext():
                    adversarial_step(kind, attacker, model, lambda ids=data: model(ids))
        for i, (m, p) in enumerate(zip(master, model.parameters())):
            m.grad = p.grad.float()
            p.grad = None
            grad_sums[i] += m.grad.abs().max()
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)
    return {name: p.detach().float() for name, p in model.named_parameters()}, LR * 2**-8 * grad_sums.max().item()


def _engine(stage: int, dtype: str = "fp32", kind: str = "fgm", **config):
    import deepspeed

    model = new_model(kind=kind)
    config = {
        "train_micro_batch_size_per_gpu": SIZE[0] // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # the default clips at 1.0 since 0.19.3
        "zero_allow_untested_optimizer": True,
        # 100: the LayerNorm weights (16 values) stay whole on every rank, the larger weights are partitioned
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
        "bf16": {"enabled": dtype == "bf16"},
        **config,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    return engine


def _full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below stage 3
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def _train(engine, kind: str, gas: int, rank: int) -> None:
    manual = kind == "fgm-manual"
    if kind in INPUT_METHODS:
        cls, _, options = INPUT_METHODS[kind]
        attacker = cls(engine, backend="auto", **options)
    else:
        attacker = make_attacker("fgm" if manual else kind, engine, "auto")
    for step, micro_batches in enumerate(batches(kind, gas, rows_of(rank))):
        # with one micro-batch step() opens (and flushes) the block itself
        with engine.coalesce_grad_reduction() if gas > 1 or manual else contextlib.nullcontext():
            for i, data in enumerate(micro_batches):
                if kind in INPUT_METHODS:
                    seed_noise(step * gas + i, rank * data["ids"].numel())
                    forward, mask = input_forward(engine, kind, data), data["attention_mask"]
                    if gas == 1:
                        attacker.step(forward, mask)
                    else:  # the caller's block; run() with the loss divided by the micro-batches
                        attacker.run(forward, lambda loss: engine.backward(loss / gas), mask)
                elif manual:
                    engine.backward(engine(data))
                    attacker.attack()
                    engine.backward(engine(data))
                    attacker.restore()
                else:
                    adversarial_step(kind, attacker, engine.module, lambda ids=data: engine(ids), use_step=True)
        engine.step()


def _error(call) -> str:
    try:
        call()
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _misuse(stage: int, rank: int) -> dict[str, object]:
    """The error cases; each also records whether weights (and gradients) were left as they were."""
    out: dict[str, object] = {}
    engine = _engine(stage)
    fgm = make_attacker("fgm", engine, "auto")
    ids = torch.randint(0, VOCAB, (2, 6))
    engine.backward(engine(ids))  # outside coalesce_grad_reduction: ZeRO has taken the gradients
    before = _full_params(engine)
    out["outside the block"] = _error(fgm.attack)
    out["outside the block: weights kept"] = all(torch.equal(v, before[k]) for k, v in _full_params(engine).items())
    engine.step()
    fgm.step(lambda: engine(ids))
    out["two steps"] = _error(lambda: fgm.step(lambda: engine(ids)))
    engine.step()
    freelb = FusedFreeLB(engine, adv_steps=2)
    out["input outside the block"] = _error(lambda: freelb.run(lambda: engine(ids), engine.backward))
    freelb.step(lambda: engine(ids))
    out["input two steps"] = _error(lambda: freelb.step(lambda: engine(ids)))
    engine.step()
    # the model instead of its engine (the issue's case: seed-style calls after engine.backward)
    engine.backward(engine(ids))
    out["model, not engine"] = _error(FusedFGM(engine.module).attack)
    out["input model, not engine"] = _error(lambda: FusedFreeLB(engine.module).step(lambda: engine(ids)))
    engine.step()
    if stage == 1:
        out["gas 2"] = _error(lambda: make_attacker("pgd", _engine(1, gradient_accumulation_steps=2), "auto"))
        out["stage 0"] = _error(lambda: make_attacker("awp", _engine(0), "auto"))
    return out


def _worker(rank: int, stage: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    import deepspeed  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip compiling the shm op (minutes)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict = {}
        for kind, gas, dtype in [*CONFIGS, MANUAL]:
            engine = _engine(stage, dtype, kind)
            try:
                _train(engine, kind, gas, rank)
                results[kind, gas, dtype] = _full_params(engine)
            except Exception as err:  # reported per configuration by the parent
                results[kind, gas, dtype] = f"{type(err).__name__}: {err}"
        results["misuse"] = _misuse(stage, rank)
        torch.save(results, os.path.join(out_dir, f"{stage}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def references() -> dict:
    refs = {(kind, gas, dtype): reference(kind, gas, dtype) for kind, gas, dtype in CONFIGS}
    refs[MANUAL] = refs["fgm", 1, "fp32"]
    refs["no attack"] = reference("fgm", 1, "fp32", attack=False)[0]
    refs["no input attack"] = reference("freelb", 1, "fp32", attack=False)[0]
    return refs


def _max_error(got: dict, want: dict, dtype: str = "fp32") -> float:
    """The largest absolute difference; for bf16, the largest part of it beyond one bf16 ulp of the weight (2**-7
    relative at most)."""
    margin = 2**-7 if dtype == "bf16" else 0.0
    return max(((got[n] - value).abs() - margin * value.abs()).max().item() for n, value in want.items())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_one_process(tmp_path, stage, references):
    """Every method, both accumulations and dtypes, manual calls and the error cases, at one ZeRO stage."""
    mp.spawn(_worker, args=(stage, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{stage}-{rank}.pt") for rank in range(WORLD)]
    errors = {}
    for config in [*CONFIGS, MANUAL]:
        want, drift = references[config]
        # fp32: rounding only (the mean of the halves' gradients against the whole batch's). bf16: a weight may round
        # to the neighbouring bf16 value (one ulp, in _max_error), and the fp32 master weights drift apart by the
        # rounding of the bf16 gradients (computed on half the rows, averaged over the ranks in bf16): the drift
        limit = 1e-6 if config[2] == "fp32" else drift
        if config[0] == "vat" and config[2] == "bf16":
            # VAT's perturbation is a unit direction from a bf16 gradient of the KL on each rank's rows: its rounding
            # turns the direction, and the whole eps-sized step with it (fp32 agrees to 1e-6)
            limit *= 3
        for rank, result in enumerate(ranks):
            got = result[config]
            if stage == 3 and config[0] == "gradient_penalty":  # refused: its double backward needs released weights
                assert isinstance(got, str) and "ZeRO stage 3" in got, got
                continue
            assert not isinstance(got, str), f"stage {stage} {config} rank {rank}: {got}"
            errors[config, rank] = _max_error(got, want, config[2]), limit
    print(
        {
            f"{c[0]} gas={c[1]} {c[2]}": "{:.2g} (limit {:.2g})".format(*max(errors[c, r] for r in range(WORLD)))
            for c in [*CONFIGS, MANUAL]
            if (c, 0) in errors
        }
    )
    for (config, rank), (error, limit) in errors.items():
        assert error <= limit, f"stage {stage} {config} rank {rank}: max error {error:.3g} > {limit:.3g}"
    # DeepSpeed#5667: an FGM step that changes nothing would match the run without attack; so would an input-space
    # step whose perturbation was lost
    for kind in ("fgm", *(kind for kind in INPUT_METHODS if stage != 3 or kind != "gradient_penalty")):
        plain = references["no input attack" if kind in INPUT_METHODS else "no attack"]
        moved = _max_error(ranks[0][kind, 1, "fp32"], plain)
        assert moved > 5e-4, f"stage {stage}: {kind} changed the weights by {moved:.3g} only"
    misuse = ranks[0]["misuse"]
    assert "coalesce_grad_reduction" in misuse["outside the block"], misuse
    assert misuse["outside the block: weights kept"], misuse
    assert "without engine.step()" in misuse["two steps"], misuse
    assert "coalesce_grad_reduction" in misuse["input outside the block"], misuse
    assert "without engine.step()" in misuse["input two steps"], misuse
    assert "pass the engine (deepspeed.initialize's first return value) to FusedFGM" in misuse["model, not engine"]
    assert (
        "pass the engine (deepspeed.initialize's first return value) to FusedFreeLB"
        in misuse["input model, not engine"]
    )
    if stage == 1:
        assert '"gradient_accumulation_steps": 2' in misuse["gas 2"], misuse
        assert "stages 1, 2 and 3, got stage 0" in misuse["stage 0"], misuse


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_rank_draws_its_block_of_the_whole_batch_noise(dtype):
    """The premise of :func:`seed_noise`: the noise draws of the methods (FreeLB's initial ``uniform_``, SMART's
    ``normal_``, R3F's ``torch.rand``) of each rank's block, after the skip, are that block of the whole batch's."""
    draws = {
        "uniform_": lambda shape: torch.zeros(shape, dtype=DTYPES[dtype]).uniform_(-1, 1),
        "normal_": lambda shape: torch.empty(shape, dtype=DTYPES[dtype]).normal_(0, 1),
        "rand": lambda shape: torch.rand(shape),
    }
    data = input_batches(1, device=torch.device("cpu"))[0]
    for name, draw in draws.items():
        seed_noise(0)
        whole = draw((*data["ids"].shape, INPUT_DIM))
        blocks = []
        for rank in range(WORLD):
            share = {key: value[rows_of(rank)] for key, value in data.items()}
            seed_noise(0, rank * share["ids"].numel())
            blocks.append(draw((*share["ids"].shape, INPUT_DIM)))
        assert torch.equal(torch.cat(blocks), whole), name


def test_old_deepspeed_is_refused(monkeypatch):
    import deepspeed

    from fastadv import FusedFGM

    monkeypatch.setattr(deepspeed, "__version__", "0.19.0")
    engine_class = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_class()
    engine.module = new_model()
    with pytest.raises(RuntimeError, match=r"needs deepspeed >= 0\.19\.1 .* found 0\.19\.0"):
        FusedFGM(engine)


def test_import_fastadv_does_not_import_deepspeed():
    code = "import sys, fastadv, fastadv.attacks; assert 'deepspeed' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


class _TinyLM(TinyEncoder):
    """:class:`TinyEncoder` as the Trainer calls a model: keyword inputs, the loss in a dict."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"loss": super().forward(input_ids)}


class _TinyTextClassifier(TinyClassifier):
    """:class:`TinyClassifier` as the Trainer calls a model: keyword inputs, the loss and the logits in a dict."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss, logits = super().forward(input_ids, attention_mask, labels)
        return {"loss": loss, "logits": logits}


TRAINER_STAGE = 2
#: The methods the Trainer trains with under DeepSpeed, and their arguments (the hyperparameters of the references).
TRAINER_METHODS = {
    "fgm": {"adv_eps": HYPER["fgm"]["eps"]},
    **{kind: {"adv_options": options} for kind, (_, _, options) in INPUT_METHODS.items()},
}
TRAINER_SAMPLES = 16  # 4 optimizer steps of 2 x 2 sequences


def _trainer_data(method: str) -> list[dict[str, torch.Tensor]]:
    if method in INPUT_METHODS:
        data = input_batches(TRAINER_SAMPLES // SIZE[0], seed=3, device=torch.device("cpu"))
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for b in data
            for ids, mask, label in zip(b["ids"], b["attention_mask"], b["labels"])
        ]
    ids = torch.randint(0, VOCAB, (TRAINER_SAMPLES, SIZE[1]), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": row, "labels": torch.tensor(0)} for row in ids]


def _trainer_worker(rank: int, init_file: str, out_dir: str, port: int) -> None:
    # accelerate checks these even with the process group already initialised
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import deepspeed  # noqa: F401
    from transformers import TrainingArguments

    from fastadv.integrations.transformers import AdversarialTrainer

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:

        class Recording(AdversarialTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                self.seen.append({key: value.clone() for key, value in inputs.items()})
                seed_noise(len(self.seen) - 1, rank * inputs["input_ids"].numel())  # the reference's noise
                return super().training_step(model, inputs, num_items_in_batch)

        results = {}
        for method, options in TRAINER_METHODS.items():
            torch.manual_seed(0)  # new_model's weights
            model = (
                _TinyTextClassifier(dropout=0.0, device="cpu")
                if method in INPUT_METHODS
                else _TinyLM(vocab=VOCAB, device="cpu")
            )
            args = TrainingArguments(
                output_dir=out_dir,
                report_to=[],
                save_strategy="no",
                max_grad_norm=0.0,
                lr_scheduler_type="constant",
                learning_rate=LR,
                per_device_train_batch_size=SIZE[0] // WORLD,
                num_train_epochs=1,
                disable_tqdm=True,
                dataloader_num_workers=0,
                seed=0,
                use_cpu=True,
                # the optimizer in the config: under DeepSpeed the Trainer replaces one passed to it by AdamW
                deepspeed={
                    "zero_optimization": {"stage": TRAINER_STAGE},
                    "zero_allow_untested_optimizer": True,
                    "optimizer": {"type": "SGD", "params": {"lr": LR}},
                    "train_micro_batch_size_per_gpu": "auto",
                    "gradient_accumulation_steps": "auto",
                    "gradient_clipping": "auto",
                },
            )
            trainer = Recording(
                model=model, args=args, train_dataset=_trainer_data(method), adversarial=method, **options
            )
            trainer.seen = []
            trainer.train()
            engine = trainer.model_wrapped
            results[method] = {
                "params": _full_params(engine),
                "seen": trainer.seen,
                "engine steps": engine.global_steps,
                "trainer steps": trainer.state.global_step,
            }
        torch.save(results, os.path.join(out_dir, f"trainer-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_adversarial_trainer_steps_the_engine_once(tmp_path):
    """AdversarialTrainer under DeepSpeed (ZeRO-2) with FGM, FreeLB, SMART and R3F: one engine step per optimizer step
    (accelerate's backward would step after every pass), and the weights of the reference (the seed's FGM loop, the
    reference steps) in one process on the whole batches."""
    pytest.importorskip("transformers")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_trainer_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), port), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"trainer-{rank}.pt") for rank in range(WORLD)]
    steps = TRAINER_SAMPLES // SIZE[0]
    for method in TRAINER_METHODS:
        for rank, result in enumerate(ranks):
            result = result[method]
            assert result["trainer steps"] == steps and result["engine steps"] == steps, (method, rank, result)
        whole = []  # the steps' batches, the ranks' halves put together, as the reference takes them
        for halves in zip(*(result[method]["seen"] for result in ranks)):
            batch = {key: torch.cat([half[key] for half in halves]) for key in halves[0]}
            whole.append(
                [
                    {"ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
                    if method in INPUT_METHODS
                    else batch["input_ids"]
                ]
            )
        want, _ = reference(method, 1, "fp32", steps=whole)
        for rank, result in enumerate(ranks):
            got = {name.removeprefix("module."): value for name, value in result[method]["params"].items()}
            error = _max_error(got, want)
            print(f"trainer {method} rank {rank}: max error {error:.3g}")
            assert error <= 1e-6, f"AdversarialTrainer {method} ZeRO-{TRAINER_STAGE} rank {rank}: max error {error:.3g}"

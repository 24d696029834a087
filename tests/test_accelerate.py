"""The README's accelerate recipe (``attacker.run`` with ``accelerator.backward`` under ``accelerator.accumulate``)
against the hand-written loop around the seed's classes (:func:`_helpers.seed_loop`): one process with gradient
accumulation 1 and 2 and bf16, and two processes (DDP over gloo) with accumulation 1 and 2."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("accelerate")

import torch.distributed as dist  # noqa: E402
from _helpers import (  # noqa: E402
    FRAMEWORK_HYPER,
    FRAMEWORK_K,
    KINDS,
    TinyEncoder,
    assert_matches_and_attacked,
    assert_toy_example_runs,
    ddp_start,
    flat_params,
    framework_batches,
    make_attacker,
    seed_loop,
    spawn_ranks,
)
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

STEPS = 4
WORLD = 2


def reset_accelerate(partial: bool = True) -> None:
    """accelerate keeps its state in process-wide singletons: each configuration (and the Trainer's tests) starts
    afresh."""
    AcceleratorState._reset_state(reset_partial_state=partial)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(threads)


def recipe(
    model: torch.nn.Module,
    kind: str,
    batches,
    accumulate: int = 1,
    mixed_precision: str = "no",
    clip: float | None = None,
) -> None:
    """The README's recipe with the seed loop's SGD and hyperparameters."""
    accelerator = Accelerator(gradient_accumulation_steps=accumulate, mixed_precision=mixed_precision, cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    attacker = make_attacker(kind, model, "auto", **FRAMEWORK_HYPER[kind])  # e.g. FusedPGD(model, eps=..., alpha=...)
    for ids in batches:
        with accelerator.accumulate(model):

            def run_pass(ids=ids):
                loss = model(ids)
                accelerator.backward(loss)
                return loss

            attacker.run(run_pass, FRAMEWORK_K[kind])
            if clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()


CONFIGS = {  # recipe options, seed_loop options
    "gas1": ({}, {}),
    "gas2-clip": ({"accumulate": 2, "clip": 0.5}, {"accumulate": 2, "clip": 0.5}),
    "bf16-gas2": ({"accumulate": 2, "mixed_precision": "bf16"}, {"accumulate": 2, "autocast": torch.bfloat16}),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_recipe_matches_the_seed_loop(config):
    options, loop_options = CONFIGS[config]
    batches = framework_batches(STEPS * options.get("accumulate", 1))
    torch.manual_seed(0)
    start = TinyEncoder(device="cpu")
    plain = copy.deepcopy(start)
    seed_loop(plain, None, batches, **loop_options)
    for kind in KINDS:
        model, want = copy.deepcopy(start), copy.deepcopy(start)
        recipe(model, kind, batches, **options)
        reset_accelerate()
        seed_loop(want, kind, batches, **loop_options)
        # bf16 too: both loops run the same autocast ops on fp32 weights and only the attacks' fp32 rounding differs
        # (measured: at most 1.2e-7), while bf16 against fp32 moves the weights by 1e-4: so bf16 did run
        assert_matches_and_attacked(flat_params(model), flat_params(want), flat_params(plain))


def _ddp_worker(rank: int, world: int) -> dict:
    """Per accumulation (1, 2) and method: the recipe and the hand-written loop on a DDP-wrapped model, this rank's
    weights after each."""
    results = {}
    for accumulate in (1, 2):
        batches, start, results[accumulate, "plain"] = ddp_start(rank, world, STEPS, accumulate)
        for kind in KINDS:
            model, want = copy.deepcopy(start), copy.deepcopy(start)
            recipe(model, kind, batches, accumulate=accumulate)
            reset_accelerate(partial=False)
            seed_loop(torch.nn.parallel.DistributedDataParallel(want), kind, batches, accumulate=accumulate)
            results[accumulate, kind] = flat_params(model), flat_params(want)
    return results


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo")
@pytest.mark.skipif(sys.platform != "linux", reason="spawns processes (Linux CI)")
def test_recipe_two_processes(tmp_path):
    """One spawn for both accumulations; the ranks must agree and match the hand loop under DDP."""
    ranks = spawn_ranks(_ddp_worker, WORLD, tmp_path)
    for key, value in ranks[0].items():
        if key[1] == "plain":
            continue
        for result in ranks:
            assert_matches_and_attacked(*result[key], ranks[0][key[0], "plain"])
        assert torch.equal(value[0], ranks[1][key][0]), f"{key}: the ranks differ"


def test_example_script_runs(capsys, monkeypatch):
    assert_toy_example_runs(
        "accelerate_adversarial", {"none", "fgm", "pgd", "awp"}, monkeypatch, capsys, ["--accumulate", "2"]
    )

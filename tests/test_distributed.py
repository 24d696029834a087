"""Several processes (gloo, CPU): DDP and FSDP2 (``fully_shard``, DTensor parameters sharded with ``Shard(0)``).

Two processes each train on half of every batch; the result must be the single-process run of the seed's classes on
the whole batch (DDP and FSDP2 average the halves' gradients, which is the whole batch's mean-loss gradient), and
every rank must hold the same weights.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import BACKENDS, KINDS, TinyEncoder, flat_params, framework_batches, make_attacker, seed_loop
from _helpers import train as train_loop

from fastadv import FusedFGM
from fastadv.backends import resolve_backend

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="spawns processes with a file:// rendezvous (Linux CI)"),
]

WORLD = 2
CPU = torch.device("cpu")
STEPS = 3


def _runs_on_cpu(name: str) -> bool:
    try:
        return resolve_backend(name, CPU) is not None
    except RuntimeError:  # e.g. triton on a GPU machine, where it is compiled for CUDA only
        return False


CPU_BACKENDS = [name for name in BACKENDS if _runs_on_cpu(name)]  # gloo: the processes train on the CPU


def train(model, kind: str, backend: str | None, rank: int, world: int) -> list[float]:
    """The seed's usage loops with fastadv's class on ``backend`` or (None) the seed's; this process takes rows
    ``rank::world`` of every batch."""
    return train_loop(
        model,
        make_attacker(kind, model, backend),
        kind,
        steps=STEPS,
        seed=11,
        rows=slice(rank, None, world),
        device=CPU,
    )


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode.startswith("ddp"):  # with bucket views, .grad are views into buckets the next backward rewrites
        return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=mode == "ddp-bucket-view")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))


def _worker(rank: int, mode: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backend in CPU_BACKENDS:
            for kind in KINDS:
                torch.manual_seed(0)
                model = TinyEncoder(device="cpu")
                wrapped = wrap(model, mode)
                if mode == "fsdp2":
                    shard = model.embeddings.word_embeddings.weight.to_local()
                    assert shard.shape == (64 // WORLD, 16), shard.shape  # really sharded
                train(wrapped, kind, backend, rank, WORLD)
                if mode == "fsdp2":  # updated in place: the shard's storage was never rebound
                    assert model.embeddings.word_embeddings.weight.to_local().data_ptr() == shard.data_ptr()
                results[backend, kind] = {
                    name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                    for name, p in model.named_parameters()
                }
        if mode == "ddp":  # AWP with accumulation: earlier micro-batches' gradients must be all-reduced too
            for backend in CPU_BACKENDS:
                batches = framework_batches(4, rows=slice(rank, None, WORLD))
                fused, want = TinyEncoder(device="cpu"), TinyEncoder(device="cpu")
                want.load_state_dict(fused.state_dict())
                seed_loop(wrap(fused, mode), "awp", batches, accumulate=2, backend=backend)
                seed_loop(wrap(want, mode), "awp", batches, accumulate=2)
                results[backend, "awp-accumulate"] = {"fused": flat_params(fused), "seed": flat_params(want)}
        # Row hints must refuse here, not perturb wrong rows: under DDP they see this rank's lookups while the
        # all-reduced gradient holds every rank's rows; under FSDP2 a shard's rows are not the vocabulary's ids.
        model = TinyEncoder(device="cpu")
        wrapped = wrap(model, mode)
        fgm = FusedFGM(wrapped, rows="batch")
        wrapped(torch.randint(0, 32, (2, 6)) + 32 * rank).backward()
        try:
            fgm.attack()
            results["hints"] = "attacked"
        except RuntimeError as err:
            results["hints"] = str(err)
        torch.save(results, os.path.join(out_dir, f"{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "ddp-bucket-view", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    """Every backend and attack in one spawn per mode (starting processes is the slow part)."""
    mp.spawn(_worker, args=(mode, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{mode}-{rank}.pt") for rank in range(WORLD)]
    for kind in KINDS:
        torch.manual_seed(0)
        single = TinyEncoder(device="cpu")
        train(single, kind, None, 0, 1)
        for backend in CPU_BACKENDS:
            for rank, result in enumerate(ranks):
                for name, param in single.named_parameters():
                    torch.testing.assert_close(
                        result[backend, kind][name],
                        param.detach(),
                        rtol=1e-5,
                        atol=1e-6,
                        msg=lambda m, where=(backend, kind, rank, name): f"{where}: {m}",
                    )
            for name, value in ranks[0][backend, kind].items():
                assert torch.equal(value, ranks[1][backend, kind][name]), f"{backend} {kind}: ranks differ in {name}"
    for backend in CPU_BACKENDS if mode == "ddp" else []:
        for result in ranks:
            got = result[backend, "awp-accumulate"]
            torch.testing.assert_close(got["fused"], got["seed"], rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[0][backend, "awp-accumulate"]["fused"], ranks[1][backend, "awp-accumulate"]["fused"])
    for result in ranks:
        assert ("no recorded lookup" if mode.startswith("ddp") else "sharded") in result["hints"]

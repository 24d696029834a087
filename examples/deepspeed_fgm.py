"""Adversarial training (FGM, PGD or AWP) of a small classifier through a DeepSpeed ZeRO engine, in two CPU processes.

The task: is token 7 in the sequence? The model: a word embedding, mean pooling and a linear head. The script spawns two
processes (gloo, ``DS_ACCELERATOR=cpu``, no launcher needed), builds a ZeRO engine at the chosen stage and trains with
``attack.step(closure)`` then ``engine.step()``. Every few steps it prints the clean loss and the loss under the
attack (one manual ``attack()``/``restore()`` inside ``engine.coalesce_grad_reduction()``): the attack raises the loss,
which it would not if it perturbed a copy the forward never reads (DeepSpeed#5667). Then the held-out accuracy.

    pip install -e ".[deepspeed]"
    python examples/deepspeed_fgm.py                      # ZeRO-3, FGM; about 30 s on 2 CPU cores
    python examples/deepspeed_fgm.py --stage 1 --method pgd --bf16
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from fastadv import FusedAWP, FusedFGM, FusedPGD  # noqa: E402

WORLD = 2
VOCAB, SEQ, TARGET = 200, 16, 7
ATTACKS = {
    "fgm": lambda engine: FusedFGM(engine, eps=0.5),
    "pgd": lambda engine: FusedPGD(engine, eps=0.5, alpha=0.2),
    "awp": lambda engine: FusedAWP(engine, adv_lr=0.5, adv_eps=0.01),
}


class Classifier(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss, or without ``labels`` the logits."""
        logits = self.head(torch.tanh(self.hidden(self.word_embeddings(ids).mean(1)))).float()
        return logits if labels is None else nn.functional.cross_entropy(logits, labels)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (n, SEQ), generator=g)
    ids[ids >= TARGET] += 1  # no TARGET yet
    labels = torch.randint(0, 2, (n,), generator=g)
    rows = labels.nonzero().view(-1)
    ids[rows, torch.randint(0, SEQ, (len(rows),), generator=g)] = TARGET
    return ids, labels


def worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecations inside deepspeed's collectives
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip compiling DeepSpeed's shm op (minutes)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = Classifier()
    config = {
        "train_micro_batch_size_per_gpu": args.batch // WORLD,
        "gradient_accumulation_steps": 1,  # fastadv accumulates inside coalesce_grad_reduction() itself
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.bf16},
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    attack = ATTACKS[args.method](engine)
    ids, labels = make_data(args.steps * args.batch, seed=1)
    for step in range(args.steps):
        rows = slice(step * args.batch + rank, (step + 1) * args.batch, WORLD)  # this process's half of the batch
        x, y = ids[rows], labels[rows]
        if step % 10 == 0 and args.method == "fgm":
            with engine.coalesce_grad_reduction():  # the seed's calls, inside the block that keeps .grad
                clean = engine(x, y)
                engine.backward(clean)
                attack.attack()
                adversarial = engine(x, y)
                engine.backward(adversarial)
                attack.restore()
            if rank == 0:
                print(f"step {step:3d}  clean loss {clean.item():.4f}  under FGM {adversarial.item():.4f}")
        else:
            loss = attack.step(lambda x=x, y=y: engine(x, y))
            if rank == 0 and step % 10 == 0:
                print(f"step {step:3d}  clean loss {loss.item():.4f}")
        engine.step()
    test_ids, test_labels = make_data(512, seed=2)
    with torch.no_grad():
        logits = engine(test_ids)  # through the engine: ZeRO-3 gathers the weights
    if rank == 0:
        accuracy = (logits.argmax(1) == test_labels).float().mean().item()
        print(f"ZeRO-{args.stage} {args.method}: held-out accuracy {accuracy:.3f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument("--method", choices=tuple(ATTACKS), default="fgm")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "rendezvous")), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()

"""What the small examples share: a synthetic task (is token 7 in the sequence?), a tiny classifier, its evaluation
clean and under an FGM attack on the embeddings, the command-line options and the results table."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastadv import FusedFGM

VOCAB, TARGET = 100, 7


def arguments(description: str, methods: Sequence[str]) -> argparse.ArgumentParser:
    """The options every example on this task takes; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--methods", nargs="+", choices=list(methods), default=list(methods))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--eval-eps", type=float, default=0.5, help="FGM eps of the attacked evaluation")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def datasets(args: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    """The training and test sets the options ask for (and one thread: the fastest for so small a model)."""
    torch.set_num_threads(1)
    return make_data(args.train_size, args.seq_len, seed=args.seed + 1), make_data(512, args.seq_len, args.seed + 2)


def make_data(n: int, seq_len: int, seed: int) -> TensorDataset:
    """``n`` sequences of token ids and their labels: half of them contain ``TARGET`` (label 1), the others not."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 1, (n, seq_len), generator=g)
    ids[ids >= TARGET] += 1  # tokens 1..VOCAB-1 without TARGET
    labels = torch.randint(0, 2, (n,), generator=g)
    rows = labels.nonzero().view(-1)
    ids[rows, torch.randint(0, seq_len, (len(rows),), generator=g)] = TARGET
    return TensorDataset(ids, labels)


class Classifier(nn.Module):
    """Embeddings, one tanh layer, a max over the tokens and a two-class head; ``forward(ids)`` gives the logits."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.word_embeddings.weight, std=0.1)
        self.encoder = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.word_embeddings(ids)).max(dim=1).values)


def evaluate(model: Classifier, data: TensorDataset, eps: float) -> dict[str, float]:
    """Accuracy and loss, clean and with the word embeddings moved by FGM along the gradient of the test loss (the
    attack adversarial training should resist)."""
    ids, labels = data.tensors
    model.zero_grad()
    with torch.enable_grad():
        nn.functional.cross_entropy(model(ids), labels).backward()
    fgm = FusedFGM(model, eps=eps)
    with torch.no_grad():
        logits = model(ids)
        result = {
            "acc": (logits.argmax(-1) == labels).float().mean().item(),
            "test_loss": nn.functional.cross_entropy(logits, labels).item(),
        }
        fgm.attack()
        try:
            result["attacked_loss"] = nn.functional.cross_entropy(model(ids), labels).item()
        finally:
            fgm.restore()
    model.zero_grad()
    return result


def print_table(results: dict[str, dict[str, float]]) -> None:
    """One row per method: the last training loss, its adversarial part ("-" where there is none), test accuracy
    and loss, and the test loss under FGM."""
    print(f"{'method':<7} {'loss':>7} {'adv loss':>8} {'test acc':>8} {'test loss':>9} {'FGM-attacked loss':>17}")
    for method, r in results.items():
        adv = "-" if math.isnan(r["adv_loss"]) else f"{r['adv_loss']:.4g}"
        print(
            f"{method:<7} {r['loss']:>7.4f} {adv:>8} {r['acc']:>8.3f} {r['test_loss']:>9.4f}"
            f" {r['attacked_loss']:>17.4f}"
        )

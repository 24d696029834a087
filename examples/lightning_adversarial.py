"""Train a tiny text classifier with Lightning and fastadv's ``AdversarialTraining`` callback (FGM, PGD, AWP).

The task: is token 7 in the sequence? (half of them contain it). For each method the script prints the last training
loss (clean) and ``adv_loss`` (the last adversarial pass), then test accuracy and loss, clean and under an FGM attack
on the embeddings (adversarial training should lower the attacked loss).

    pip install fastadv[lightning]
    python examples/lightning_adversarial.py                     # CPU, about 10 seconds
    python examples/lightning_adversarial.py --methods pgd --precision bf16-mixed --accumulate 2
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl

    from fastadv.integrations.lightning import AdversarialTraining
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"{exc}\nthis example needs lightning: pip install 'fastadv[lightning]'") from None

from fastadv import FusedFGM

VOCAB, TARGET = 100, 7
SETTINGS = {  # method -> AdversarialTraining arguments, eps scaled to this model (embedding rows of norm ~0.6)
    "none": None,
    "fgm": {"method": "fgm", "eps": 0.5},
    "pgd": {"method": "pgd", "eps": 0.5, "alpha": 0.2, "k": 3},
    "awp": {"method": "awp", "adv_lr": 0.5, "adv_eps": 0.01},  # from the second epoch on (if there is one)
}


def make_data(n: int, seq_len: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 1, (n, seq_len), generator=g)
    ids[ids >= TARGET] += 1  # tokens 1..VOCAB-1 without TARGET
    labels = torch.randint(0, 2, (n,), generator=g)
    rows = labels.nonzero().view(-1)
    ids[rows, torch.randint(0, seq_len, (len(rows),), generator=g)] = TARGET
    return TensorDataset(ids, labels)


class Classifier(pl.LightningModule):
    def __init__(self, dim: int = 32, lr: float = 3e-3):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.word_embeddings.weight, std=0.1)
        self.encoder = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, 2)
        self.lr = lr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.word_embeddings(ids)).max(dim=1).values)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = nn.functional.cross_entropy(self(ids), labels)
        self.log("loss", loss)  # the callback keeps the clean pass's logs only
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def evaluate(model: Classifier, data: TensorDataset, eps: float) -> dict[str, float]:
    """Accuracy and loss, clean and with the word embeddings moved by FGM along the gradient of the test loss."""
    ids, labels = data.tensors
    model.zero_grad()
    with torch.enable_grad():
        nn.functional.cross_entropy(model(ids), labels).backward()
    fgm = FusedFGM(model, eps=eps)
    with torch.no_grad():
        result = {"acc": (model(ids).argmax(-1) == labels).float().mean().item(),
                  "test_loss": nn.functional.cross_entropy(model(ids), labels).item()}
        fgm.attack()
        try:
            result["attacked_loss"] = nn.functional.cross_entropy(model(ids), labels).item()
        finally:
            fgm.restore()
    model.zero_grad()
    return result


def train_one(method: str, args: argparse.Namespace, train: TensorDataset, test: TensorDataset) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = Classifier()
    callbacks = []
    if SETTINGS[method] is not None:
        start = {"start_epoch": min(1, args.epochs - 1)} if method == "awp" else {}
        callbacks.append(AdversarialTraining(**SETTINGS[method], **start))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, precision=args.precision, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    metrics = trainer.callback_metrics
    result = {"loss": metrics["loss"].item(), "adv_loss": metrics.get("adv_loss", torch.tensor(math.nan)).item()}
    return {**result, **evaluate(model.eval(), test, args.eval_eps)}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with each method; print a table and return ``{method: {metric: value}}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--eval-eps", type=float, default=0.5, help="FGM eps of the attacked evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # advice on DataLoader workers and the like
    torch.set_num_threads(1)  # fastest for so small a model
    train = make_data(args.train_size, args.seq_len, seed=args.seed + 1)
    test = make_data(512, args.seq_len, seed=args.seed + 2)
    print(f"{'method':<6} {'loss':>7} {'adv loss':>8} {'test acc':>8} {'test loss':>9} {'FGM-attacked loss':>17}")
    results = {}
    for method in args.methods:
        r = results[method] = train_one(method, args, train, test)
        print(f"{method:<6} {r['loss']:>7.4f} {r['adv_loss']:>8.4f} {r['acc']:>8.3f} {r['test_loss']:>9.4f}"
              f" {r['attacked_loss']:>17.4f}")
    return results


if __name__ == "__main__":
    main()

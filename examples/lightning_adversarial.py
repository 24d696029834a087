"""Train a tiny text classifier with Lightning and fastadv's ``AdversarialTraining`` callback (FGM, PGD, AWP).

The task: is token 7 in the sequence? (half of them contain it). For each method the script prints the last training
loss (clean) and ``adv_loss`` (the last adversarial pass), then test accuracy and loss, clean and under an FGM attack
on the embeddings (adversarial training should lower the attacked loss).

    pip install -e ".[lightning]"
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
from _toy import Classifier, arguments, datasets, evaluate, print_table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl

    from fastadv.integrations.lightning import AdversarialTraining
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f'{exc}\nthis example needs lightning: pip install -e ".[lightning]"') from None


SETTINGS = {  # method -> AdversarialTraining arguments, eps scaled to this model (embedding rows of norm ~0.6)
    "none": None,
    "fgm": {"method": "fgm", "eps": 0.5},
    "pgd": {"method": "pgd", "eps": 0.5, "alpha": 0.2, "k": 3},
    "awp": {"method": "awp", "adv_lr": 0.5, "adv_eps": 0.01},  # from the second epoch on (if there is one)
}


class Module(pl.LightningModule):
    """The toy classifier under Lightning."""

    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.net = Classifier()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = nn.functional.cross_entropy(self.net(ids), labels)
        self.log("loss", loss)  # the callback keeps the clean pass's logs only
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def train_one(method: str, args: argparse.Namespace, train: TensorDataset, test: TensorDataset) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = Module()
    callbacks = []
    if SETTINGS[method] is not None:
        start = {"start_epoch": min(1, args.epochs - 1)} if method == "awp" else {}
        callbacks.append(AdversarialTraining(**SETTINGS[method], **start))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    metrics = trainer.callback_metrics
    result = {"loss": metrics["loss"].item(), "adv_loss": metrics.get("adv_loss", torch.tensor(math.nan)).item()}
    return {**result, **evaluate(model.net.eval(), test, args.eval_eps)}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with each method; print a table and return ``{method: {metric: value}}``."""
    parser = arguments(__doc__.split("\n\n")[0], SETTINGS)
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # advice on DataLoader workers and the like
    train, test = datasets(args)
    results = {method: train_one(method, args, train, test) for method in args.methods}
    print_table(results)
    return results


if __name__ == "__main__":
    main()

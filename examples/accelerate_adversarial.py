"""Train a tiny text classifier with Hugging Face accelerate and fastadv (FGM, PGD, AWP): the README's recipe.

The task: is token 7 in the sequence? (half of them contain it). For each method the script prints the mean clean and
adversarial training loss of the last epoch, then test accuracy and loss, clean and under an FGM attack on the
embeddings. Runs in one process, or in several with ``accelerate launch``.

    pip install -e ".[transformers]"                       # accelerate comes with it
    python examples/accelerate_adversarial.py              # CPU, about 5 seconds
    accelerate launch --cpu --num_processes 2 examples/accelerate_adversarial.py --accumulate 2 --precision bf16
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from _toy import Classifier, arguments, datasets, evaluate, print_table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f'{exc}\nthis example needs accelerate: pip install -e ".[transformers]"') from None

from fastadv import FusedAWP, FusedFGM, FusedPGD

SETTINGS = {  # method -> (attack class and arguments, k); eps scaled to this model (embedding rows of norm ~0.6)
    "none": None,
    "fgm": (FusedFGM, {"eps": 0.5}, 1),
    "pgd": (FusedPGD, {"eps": 0.5, "alpha": 0.2}, 3),
    "awp": (FusedAWP, {"adv_lr": 0.5, "adv_eps": 0.01}, 1),
}


def train_one(method: str, args: argparse.Namespace, train: TensorDataset) -> tuple[nn.Module, float, float]:
    """The recipe; returns the unwrapped model and the last epoch's mean clean and adversarial loss."""
    AcceleratorState._reset_state()  # a fresh accelerate state for each method of this script
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, mixed_precision=args.precision)
    torch.manual_seed(args.seed)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    attacker = None
    if SETTINGS[method] is not None:
        cls, options, k = SETTINGS[method]
        attacker = cls(model, **options)  # after prepare: a DDP wrapper is unwrapped
    for _ in range(args.epochs):
        totals = torch.zeros(3)
        for ids, labels in loader:
            with accelerator.accumulate(model):

                def run_pass(ids=ids, labels=labels):
                    loss = nn.functional.cross_entropy(model(ids).float(), labels)
                    accelerator.backward(loss)  # divides by gradient_accumulation_steps; scales fp16 losses
                    return loss

                loss, adv_loss = (run_pass(), torch.tensor(math.nan)) if attacker is None else attacker.run(run_pass, k)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            totals += torch.stack([loss.detach().float().cpu(), adv_loss.detach().float().cpu(), torch.tensor(1.0)])
    return accelerator.unwrap_model(model), (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with each method; print a table (on the main process) and return ``{method: {metric: value}}``."""
    parser = arguments(__doc__.split("\n\n")[0], SETTINGS)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    args = parser.parse_args(argv)
    train, test = datasets(args)
    results = {}
    for method in args.methods:
        model, loss, adv_loss = train_one(method, args, train)
        results[method] = {"loss": loss, "adv_loss": adv_loss, **evaluate(model.float().cpu(), test, args.eval_eps)}
    if AcceleratorState().is_main_process:
        print_table(results)
    return results


if __name__ == "__main__":
    main()

"""Train a tiny text classifier with the input-space methods (FreeLB, SMART, R3F) in a plain PyTorch loop.

These perturb the embedding *output* rather than weights, through a hook that exists only while a step runs: the
loop calls ``attacker.step(closure, attention_mask)``, which runs every forward and backward pass of the method and
leaves the gradients in ``.grad`` for the optimizer. The task: is token 7 in the sequence? For each method the
script prints the last training loss, the adversarial part of the step ("-" without one), then test accuracy and
loss, clean and under an FGM attack on the embeddings.

    pip install -e .
    python examples/input_space.py                          # CPU, about 10 seconds
    python examples/input_space.py --methods smart --epochs 5
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from _toy import Classifier, arguments, datasets, evaluate, print_table
from torch import nn
from torch.utils.data import DataLoader

from fastadv.methods import method as find_method

#: Per method, the class's options (scaled to this model: embedding rows of norm about 0.6).
SETTINGS = {
    "none": None,
    "freelb": {"adv_lr": 0.1, "adv_steps": 2, "adv_init_mag": 0.1},
    "smart": {"alpha": 1.0},
    "r3f": {"r3f_lambda": 1.0, "eps": 1e-3},
}


def train_one(name: str, args: argparse.Namespace, train) -> tuple[Classifier, float, float]:
    torch.manual_seed(args.seed)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    method = None if SETTINGS[name] is None else find_method(name)
    attacker = None if method is None else method.build(model, **SETTINGS[name])
    loss = adv = torch.tensor(math.nan)
    for _ in range(args.epochs):
        for ids, labels in DataLoader(train, batch_size=args.batch_size, shuffle=True):

            def forward(ids=ids, labels=labels):
                logits = model(ids)
                loss = nn.functional.cross_entropy(logits, labels)
                return (loss, logits) if method is not None and method.needs_logits else loss  # SMART, R3F: logits

            if method is None:
                loss = forward()
                loss.backward()
            else:  # every pass of the method; the mask: no padding in this task
                loss, adv = method.step(attacker, forward, torch.Tensor.backward, attention_mask=torch.ones_like(ids))
            optimizer.step()
            optimizer.zero_grad()
    return model, loss.item(), adv.item()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with each method; print a table and return ``{method: {metric: value}}``."""
    parser = arguments(__doc__.split("\n\n")[0], SETTINGS)
    args = parser.parse_args(argv)
    train, test = datasets(args)
    results = {}
    for name in args.methods:
        model, loss, adv = train_one(name, args, train)
        results[name] = {"loss": loss, "adv_loss": adv, **evaluate(model, test, args.eval_eps)}
    print_table(results)
    return results


if __name__ == "__main__":
    main()

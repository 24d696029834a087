"""Fine-tune a tiny, randomly initialised BERT with fastadv's AdversarialTrainer (FGM, PGD, AWP) on a synthetic task.

The task: is token 7 in the sequence? Half of the sequences contain it. No downloads: the model is built from a
``BertConfig``. For each method the script prints the clean and adversarial training loss (the Trainer's ``loss`` and
``adv_loss`` logs over the last fifth of training), then accuracy and loss on held-out data, clean and under an FGM
attack on the embeddings (a robustness check: adversarial training should lower the attacked loss).

    pip install fastadv[transformers]
    python examples/adversarial_bert.py --quick          # CPU, well under a minute
    python examples/adversarial_bert.py --methods fgm pgd --steps 600
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    from transformers.utils import logging as hf_logging

    from fastadv.integrations.transformers import AdversarialTrainer
except ImportError as exc:  # pragma: no cover
    hint = "this example needs transformers and accelerate: pip install 'fastadv[transformers]'"
    raise SystemExit(f"{exc}\n{hint}") from None

from fastadv import FusedFGM

VOCAB = 100
TARGET = 7
SETTINGS = {  # method -> AdversarialTrainer keyword arguments
    "none": {"adversarial": None},
    "fgm": {"adversarial": "fgm", "adv_eps": 0.1},  # eps scaled to this tiny model (embedding rows of norm ~0.1)
    "pgd": {"adversarial": "pgd", "adv_eps": 0.1, "adv_alpha": 0.03, "adv_k": 3},
    "awp": {"adversarial": "awp", "adv_lr": 1.0, "adv_eps": 0.01, "awp_start_epoch": 1.0},
}


def make_data(n: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of random tokens (never 0, never ``TARGET``); ``TARGET`` put at a random place in half."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 1, (n, seq_len), generator=g)
    ids[ids >= TARGET] += 1  # tokens 1..VOCAB-1 without TARGET
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, seq_len, (n,), generator=g)
    rows = labels.nonzero().view(-1)
    ids[rows, where[rows]] = TARGET
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def tiny_bert(hidden: int, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


@torch.no_grad()
def _accuracy_and_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Tensor, Tensor]:
    out = model(**batch)
    return (out.logits.argmax(-1) == batch["labels"]).float().sum(), out.loss * len(batch["labels"])


def evaluate(model: torch.nn.Module, data: list[dict[str, Tensor]], eps: float, batch_size: int) -> dict[str, float]:
    """Accuracy and loss on ``data``, clean and with each batch's word embeddings moved by FGM (``eps``) along the
    gradient of that batch's loss: the attack the model was trained against, at evaluation."""
    model.eval()
    fgm = FusedFGM(model, eps=eps)
    totals = torch.zeros(4)
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        batch = {k: torch.stack([row[k] for row in rows]).to(model.device) for k in rows[0]}
        clean = _accuracy_and_loss(model, batch)
        model.zero_grad()
        with torch.enable_grad():
            model(**batch).loss.backward()
        fgm.attack()
        try:
            attacked = _accuracy_and_loss(model, batch)
        finally:
            fgm.restore()
            model.zero_grad()
        totals += torch.stack([*clean, *attacked]).cpu()
    acc, loss, adv_acc, adv_loss = (totals / len(data)).tolist()
    return {"acc": acc, "loss": loss, "attacked_acc": adv_acc, "attacked_loss": adv_loss}


def train_one(method: str, args: argparse.Namespace, train: list, test: list, out_dir: str) -> dict[str, float]:
    model = tiny_bert(args.hidden, args.layers, args.seed)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    targs = TrainingArguments(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available() or args.cpu,
        bf16=args.bf16,
        disable_tqdm=True,
        seed=args.seed,
    )
    settings = dict(SETTINGS[method])
    if method == "awp":  # AWP from the second epoch on, as usually done (or half-way through a short run)
        settings["awp_start_epoch"] = min(1.0, 0.5 * args.steps / steps_per_epoch)
    trainer = AdversarialTrainer(model=model, args=targs, train_dataset=train, **settings)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its log dicts; the table below is enough
        trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"train_loss": logs[-1]["loss"], "train_adv_loss": logs[-1].get("adv_loss", math.nan), "seconds": seconds}
    result.update(evaluate(trainer.model, test, args.eval_eps, args.batch_size))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for CPU: 150 steps, 1 layer")
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 400, quick 150)")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default 2, quick 1)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-eps", type=float, default=0.1, help="FGM eps of the attacked evaluation")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest for so small a model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 400)
    args.layers = args.layers or (1 if args.quick else 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train with each method; print a table and return ``{method: {metric: value}}``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    train = make_data(args.train_size, args.seq_len, seed=args.seed + 1)
    test = make_data(args.test_size, args.seq_len, seed=args.seed + 2)
    print(f"{args.steps} steps of {args.batch_size}, BERT {args.layers}x{args.hidden}; task: is token {TARGET} there?")
    header = f"{'method':<6} {'clean loss':>10} {'adv loss':>9} {'test acc':>9} {'test loss':>9}"
    header += f" {'FGM-attacked acc':>17} {'attacked loss':>13} {'time':>7}"
    print(header)
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for method in args.methods:
            r = results[method] = train_one(method, args, train, test, out_dir)
            adv = "-" if math.isnan(r["train_adv_loss"]) else f"{r['train_adv_loss']:.4f}"
            print(
                f"{method:<6} {r['train_loss']:>10.4f} {adv:>9} {r['acc']:>9.3f} {r['loss']:>9.4f}"
                f" {r['attacked_acc']:>17.3f} {r['attacked_loss']:>13.4f} {r['seconds']:>6.1f}s"
            )
    print("clean/adv loss: training losses over the last fifth of the steps (adv: the last adversarial pass)")
    return results


if __name__ == "__main__":
    main()

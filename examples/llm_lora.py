"""Fine-tune a tiny causal LM with LoRA and an input-space adversarial method (FreeLB by default), on the CPU.

A randomly initialised Llama (a ``LlamaConfig``, nothing downloaded) learns a synthetic language: each token follows
from the one before (``next = 3 * token + 1 mod V``), with some noise. LoRA on the attention's q/v projections
(``peft``) leaves the embedding frozen, so the methods that perturb the embedding's output (FreeLB, SMART, R3F) are
the ones that apply; FGM/PGD are refused with what to do instead. Training goes through fastadv's
``AdversarialTrainer`` (TRL's ``SFTTrainer`` takes the same arguments as ``fastadv.integrations.trl.
AdversarialSFTTrainer``: README, LLM fine-tuning). Prints per method the last training loss, its adversarial part
and the held-out loss.

    pip install -e ".[transformers,peft]"
    python examples/llm_lora.py                    # FreeLB and no attack, CPU, about 20 seconds
    python examples/llm_lora.py --methods none freelb smart r3f --steps 60
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from collections.abc import Sequence

import torch

try:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from fastadv.integrations.transformers import AdversarialTrainer
except ImportError as exc:  # pragma: no cover
    hint = 'this example needs transformers and peft: pip install -e ".[transformers,peft]"'
    raise SystemExit(f"{exc}\n{hint}") from None

VOCAB, SEQ = 64, 16
#: Per method, AdversarialTrainer's arguments (None: the plain Trainer).
SETTINGS = {
    "none": None,
    "freelb": {"adversarial": "freelb", "adv_options": {"adv_lr": 0.05, "adv_steps": 2, "adv_init_mag": 0.05}},
    "smart": {"adversarial": "smart", "adv_options": {"alpha": 1.0}},
    "r3f": {"adversarial": "r3f", "adv_options": {"r3f_lambda": 1.0, "eps": 1e-3}},
}


def sequences(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of the synthetic language, right-padded to ``SEQ`` (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        ids = [int(torch.randint(1, VOCAB, (1,), generator=g))]
        for _ in range(length - 1):
            noise = torch.rand(1, generator=g).item() < 0.1
            ids.append(int(torch.randint(1, VOCAB, (1,), generator=g)) if noise else (3 * ids[-1] + 1) % VOCAB or 1)
        ids = torch.tensor(ids + [0] * (SEQ - length))
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        pad_token_id=0,
    )
    # the LM head trained in full beside LoRA on q/v: a random model must learn its output vocabulary
    lora = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return peft.get_peft_model(LlamaForCausalLM(config), lora)


def train_one(method: str, args: argparse.Namespace, train: list, test: list) -> dict[str, float]:
    model = lora_model()
    settings = SETTINGS[method] or {"adversarial": None}
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            logging_steps=max(1, args.steps // 5),
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = AdversarialTrainer(model=model, args=targs, train_dataset=train, eval_dataset=test, **settings)
        trainer.remove_callback(PrinterCallback)  # the table below says it
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        return {
            "loss": logs[-1]["loss"],
            "adv_loss": logs[-1].get("adv_loss", math.nan),
            "eval_loss": trainer.evaluate()["eval_loss"],
            "seconds": seconds,
        }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=["none", "freelb"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    train, test = sequences(256, seed=1), sequences(64, seed=2)
    results = {method: train_one(method, args, train, test) for method in args.methods}
    print(f"{'method':<8} {'loss':>7} {'adv_loss':>9} {'eval_loss':>10} {'seconds':>8}")
    for method, r in results.items():
        adv = "-" if math.isnan(r["adv_loss"]) else f"{r['adv_loss']:.4f}"
        print(f"{method:<8} {r['loss']:>7.4f} {adv:>9} {r['eval_loss']:>10.4f} {r['seconds']:>8.1f}")
    return results


if __name__ == "__main__":
    main()

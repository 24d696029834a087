"""PEFT/LoRA models (tiny Llama, no download): which methods apply and that they train as their reference steps do.

With LoRA the embedding is frozen: FGM and PGD have no gradient to follow and are refused (see tests/test_misuse.py and
tests/test_transformers.py), while FreeLB, SMART and R3F perturb the embedding's output and need no trainable weight.
With ``modules_to_save=["embed_tokens"]`` the embedding has a trainable copy, which FGM and PGD attack.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from _helpers import INPUT_CASES, run_example, tiny_llama  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from fastadv import FusedAWP, FusedFGM, FusedPGD, reference  # noqa: E402

VOCAB, SEQ = 40, 6
LORA = {
    "lora-qv": {"target_modules": ["q_proj", "v_proj"]},
    "lora-qv-embedding-saved": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]},
    "lora-on-the-embedding": {"target_modules": ["embed_tokens", "q_proj"]},
}


def base_llama(seed: int = 0) -> LlamaForCausalLM:
    """The model the adapters wrap: :func:`_helpers.tiny_llama` of this module's vocabulary, with 16 positions."""
    return tiny_llama(VOCAB, seed, max_position_embeddings=16)


def lora_llama(config: str, seed: int = 0):
    model = peft.get_peft_model(
        base_llama(seed), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **LORA[config])
    )
    return model  # init_lora_weights=False: lora_B random, so that the adapters have a gradient from the start


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (3, SEQ), generator=g)
        mask = (torch.arange(SEQ) < torch.tensor([[SEQ], [4], [3]])).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def trainable(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("config", LORA)
@pytest.mark.parametrize("kind", ["freelb-l2", "smart-inf", "r3f"])
def test_input_space_methods_train_lora_models_as_their_reference_steps(config, kind, backend):
    """The fused class (emb_name left to its default: the model's input embedding, through the PEFT wrapper)
    against the reference step on the same module, over three SGD steps of the trainable weights only."""
    cls, ref_step, options = INPUT_CASES[kind]
    model = lora_llama(config)
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    attacker = cls(model, backend=backend, **options)
    for net, step in ((model, None), (twin, ref_step)):
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        for i, b in enumerate(batches()):

            def forward(net=net, b=b):
                out = net(**b)
                return out.loss if kind.startswith("freelb") else out

            torch.manual_seed(100 + i)
            if step is None:
                attacker.step(forward, b["attention_mask"])
            else:
                step(net.get_input_embeddings(), forward, b["attention_mask"], **options)
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(trainable(model), trainable(twin), rtol=1e-5, atol=1e-6)
    assert (trainable(twin) - trainable(start)).abs().max() > 1e-3


@pytest.mark.parametrize("cls, options", [(FusedFGM, {"eps": 0.5}), (FusedPGD, {"eps": 0.5, "alpha": 0.2})])
def test_weight_attacks_take_the_trainable_copy_of_a_saved_embedding(cls, options, backend):
    """modules_to_save=["embed_tokens"]: the embedding's trainable copy is what get_input_embeddings() returns and
    what FGM/PGD attack (the frozen original is left alone), as the seed's classes do given its name."""
    model = lora_llama("lora-qv-embedding-saved")
    twin = copy.deepcopy(model)
    fused = cls(model, backend=backend, **options)
    assert fused.emb_name.endswith("embed_tokens.")
    seed_cls = {FusedFGM: reference.FGM, FusedPGD: reference.PGD}[cls](twin, **options)
    name = "embed_tokens.modules_to_save"
    b = batches(1)[0]
    if cls is FusedFGM:
        fused.step(lambda: model(**b).loss)
        reference.fgm_step(_Named(seed_cls, name), lambda: twin(**b).loss)
    else:
        fused.step(lambda: model(**b).loss, k=2)
        reference.pgd_step(_Named(seed_cls, name), twin, lambda: twin(**b).loss, k=2)
    for (n, a), b_ in zip(model.named_parameters(), twin.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b_[1].grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert torch.equal(a, b_[1]), n


class _Named:
    """A seed class with its ``emb_name`` bound (the seed's default is ``word_embeddings``)."""

    def __init__(self, attacker, emb_name: str):
        self._attacker, self._emb_name = attacker, emb_name

    def __getattr__(self, name):
        method = getattr(self._attacker, name)
        if name in ("attack", "restore"):
            return lambda *args, **kwargs: method(*args, emb_name=self._emb_name, **kwargs)
        return method


def test_awp_on_fresh_lora_adapters_does_nothing_at_first():
    """AWP's step and box are relative to the weights' size, and a fresh LoRA's lora_B is zero (lora_A then has no
    gradient): its first attacks perturb nothing, so the gradients are those of the step without AWP. Documented
    (README, LLM fine-tuning): start AWP later, or take FreeLB/SMART/R3F."""
    model = peft.get_peft_model(base_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    plain = copy.deepcopy(model)
    b = batches(1)[0]
    FusedAWP(model, adv_param="lora_", adv_lr=1.0, adv_eps=0.01).step(lambda: model(**b).loss)
    plain(**b).loss.backward()
    for a, c in zip(model.parameters(), plain.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-8)


def test_llm_example_runs(capsys, monkeypatch):
    """examples/llm_lora.py, shortened: a LoRA Llama with FreeLB and without; losses finite, "-" without a method."""
    results = run_example("llm_lora", ["--steps", "4", "--methods", "none", "freelb"], monkeypatch)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["eval_loss"]) for r in results.values())
    assert math.isnan(results["none"]["adv_loss"]) and math.isfinite(results["freelb"]["adv_loss"])
    assert "nan" not in capsys.readouterr().out

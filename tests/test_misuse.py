"""A hostile user: interrupts at every op boundary and inside the ops, rebinding and converting parameters, odd
dtypes and shapes, pickling, inference mode, compiled models, row-hint recorders under torch.func, torch.export,
tracers and copies of the model. After every case the weights are bit-exact (or the
result matches the reference) and the attack object still works."""

from __future__ import annotations

import copy
import functools
import gc
import io
import pickle
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
from _helpers import (
    DEVICE,
    TinyEncoder,
    adversarial_step,
    assert_matches,
    assert_same_params,
    batch,
    make_attacker,
    train,
)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from fastadv import FusedAWP, FusedFGM, FusedPGD
from fastadv.backends import backend_for, contract, torch_ops
from fastadv.reference import AWP, FGM, PGD, awp_step

OPS = tuple(contract.OPS)  # those a weight attack's step does not call (input_step) are never interrupted


class Interrupt(BaseException):
    """Stands for a KeyboardInterrupt or an out-of-memory error: not an Exception, so nothing swallows it."""


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_exact(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        bits = p.detach().contiguous().view(torch.uint8)
        assert p.dtype == before[n].dtype and torch.equal(bits, before[n].contiguous().view(torch.uint8)), n


def make(kind: str, model: nn.Module, backend: str | None, **kwargs):
    """fastadv's attack object on ``backend`` (None: the seed's), on every embedding unless ``kwargs`` say otherwise
    (AWP: every weight, with ``adv_lr=0.5``)."""
    if kind == "awp":
        return make_attacker(kind, model, backend, adv_lr=0.5)
    kwargs.setdefault("emb_name", "embeddings")
    return make_attacker(kind, model, backend, **kwargs)


def run_step(kind: str, attacker, closure) -> torch.Tensor:
    if kind == "fgm":
        return attacker.step(closure)
    return attacker.step(closure, k=3 if kind == "pgd" else 2)


def the_backend(backend: str, model: nn.Module) -> object:
    """The backend module the attack classes use for ``model``'s embeddings (after the self-check)."""
    weight = model.embeddings.word_embeddings.weight
    return backend_for(backend, [weight], [weight])


# ---- interrupts at every op boundary, and inside the torch backend's loops ----


class CallCounter:
    """Wraps ``owner.name``: counts its calls and, with ``fail_at``, raises ``Interrupt`` at that call, just before
    the real function runs (``after=False``: nothing done) or just after (``after=True``: all done)."""

    def __init__(self, owner: object, name: str, fail_at: int = 0, after: bool = False) -> None:
        self.real, self.fail_at, self.after, self.calls = getattr(owner, name), fail_at, after, 0
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at and not self.after:
            raise Interrupt
        out = self.real(*args, **kwargs)
        if self.calls == self.fail_at:
            raise Interrupt
        return out

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.patch.undo()


def one_step(kind: str, backend: str, attacker=None, model=None, ids=None, **options):
    """A fresh model and attack object (unless given; ``options`` for :func:`make`), and one ``step`` of ``kind`` on
    a batch."""
    model = TinyEncoder() if model is None else model
    ids = batch() if ids is None else ids
    attacker = make(kind, model, backend, **options) if attacker is None else attacker
    run_step(kind, attacker, lambda: model(ids))
    return attacker, model, ids


def interrupted_step(kind: str, backend: str, owner_of, name: str, nth: int, after: bool, **options) -> None:
    """One step interrupted at the ``nth`` call of ``name`` (of the module ``owner_of(model)``): the weights come
    back bit-exact, PGD's clean gradients come back, nothing stays active, and the object works afterwards."""
    model, ids = TinyEncoder(), batch()
    attacker = make(kind, model, backend, **options)
    before = snapshot(model)
    with CallCounter(owner_of(model), name, nth, after), pytest.raises(Interrupt):
        run_step(kind, attacker, lambda: model(ids))
    if attacker._rows.active_name is not None:  # only the final restore itself was interrupted: call it again
        assert name == "restore" and not after
        attacker.restore()
    assert_bit_exact(model, before)
    if kind == "pgd":
        assert not attacker._grads.pending, "clean gradients not put back"
    model.zero_grad()
    one_step(kind, backend, attacker, model, ids)
    assert_bit_exact(model, before)


@pytest.mark.parametrize(
    ("kind", "emb_name"),
    [
        ("fgm", "embeddings"),
        ("pgd", "embeddings"),
        ("awp", None),
        ("fgm", "word_embeddings"),
        ("pgd", "word_embeddings"),
    ],
    ids=["fgm-scan", "pgd-scan", "awp", "fgm-hints", "pgd-hints"],
)
@pytest.mark.parametrize("after", [False, True], ids=["before-op", "after-op"])
def test_interrupt_at_every_op_boundary(backend, seed, kind, emb_name, after):
    """Each op call of a whole step, in turn, is interrupted just before or just after it runs: with every embedding
    (a scan finds the rows) and with the word embeddings alone (``rows="auto"`` takes them from the lookups)."""
    module_of = functools.partial(the_backend, backend)
    options = {} if emb_name is None else {"emb_name": emb_name}
    for op in OPS:
        model = TinyEncoder()
        with CallCounter(module_of(model), op) as counter:
            one_step(kind, backend, model=model, **options)
        for nth in range(1, counter.calls + 1):
            interrupted_step(kind, backend, module_of, op, nth, after, **options)


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
@pytest.mark.parametrize("helper", ["_rows_in", "_index_copy"])
def test_interrupt_inside_the_torch_backend(seed, kind, helper):
    """An interrupt between two tensors of one op (the torch backend loops over them in Python)."""
    with CallCounter(torch_ops, helper) as counter:
        one_step(kind, "torch")
    assert counter.calls > 1
    for nth in range(1, counter.calls + 1):
        interrupted_step(kind, "torch", lambda model: torch_ops, helper, nth, after=False)


def test_failed_backup_leaves_nothing_active(backend, seed):
    """An attack() called by hand whose backup fails: no weight was written, nothing is left to restore."""
    model = TinyEncoder()
    model(batch()).backward()
    before = snapshot(model)
    fgm = FusedFGM(model, backend=backend)
    module = the_backend(backend, model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "backup", lambda *a: (_ for _ in ()).throw(MemoryError("out of memory")))
        with pytest.raises(MemoryError):
            fgm.attack()
    assert_bit_exact(model, before)
    with pytest.raises(RuntimeError, match="without an active attack"):
        fgm.restore()
    fgm.attack()
    fgm.restore()
    assert_bit_exact(model, before)


def test_failed_later_step_keeps_the_earlier_ones_restorable(backend, seed):
    """PGD's second step fails in its backup: its new rows are forgotten, the first step's rows still restore."""
    model = TinyEncoder()
    ids = batch()
    before = snapshot(model)
    pgd = FusedPGD(model, emb_name="embeddings", backend=backend)
    model(ids).backward()
    pgd.attack(is_first_attack=True)
    model.zero_grad()
    model(batch()).backward()
    module = the_backend(backend, model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "backup", lambda *a: (_ for _ in ()).throw(Interrupt()))
        with pytest.raises(Interrupt):
            pgd.attack()
    pgd.attack()  # the attack is still active and goes on
    pgd.restore()
    assert_bit_exact(model, before)


# ---- 1. rows completed out of order by a later step ----


def crafted_steps(model: nn.Module, attacker, grads: list[torch.Tensor], kind: str, fused: bool) -> list[torch.Tensor]:
    """Attack steps (PGD or AWP) on ``model.weight`` with the given gradient at each step; the weight after each."""
    out = []
    for t, grad in enumerate(grads):
        model.weight.grad = grad.clone()
        if kind == "awp":
            attacker.attack()
        elif fused:
            attacker.attack(is_first_attack=t == 0)
        else:
            attacker.attack("weight", is_first_attack=t == 0)
        out.append(model.weight.detach().clone())
    return out


@pytest.mark.parametrize("kind", ["pgd-ball-hit", "pgd-inside", "awp"])
@pytest.mark.parametrize("order", [[2, 3, 4, 5], [5, 3], [1, 0, 5, 4, 3]])
def test_rows_completed_out_of_order(backend, seed, kind, order):
    """A later step adds the rows that complete the set, after rows that are not its first ones: every step, the
    projection or box and the restore must use the right rows (the torch backend copied them by position)."""
    rows, cols = 6, 5
    first = torch.zeros(rows, cols, device=DEVICE)
    first[order] = torch.randn(len(order), cols, device=DEVICE)
    grads = [first, torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)]
    weight = torch.randn(rows, cols, device=DEVICE)
    fused, ref = nn.Module(), nn.Module()
    fused.weight, ref.weight = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    if kind == "awp":
        attacker, oracle = FusedAWP(fused, adv_eps=0.05, backend=backend), AWP(ref, adv_eps=0.05)
    else:
        eps = 0.3 if kind == "pgd-ball-hit" else 50.0
        attacker = FusedPGD(fused, eps=eps, alpha=0.4, emb_name="weight", backend=backend)
        oracle = PGD(ref, eps=eps, alpha=0.4)
    kind = kind[:3]
    for a, b in zip(crafted_steps(fused, attacker, grads, kind, True), crafted_steps(ref, oracle, grads, kind, False)):
        assert_matches(a, b)
    attacker.restore()
    assert torch.equal(fused.weight, weight)


# ---- 2. gradients of another dtype than the weights ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_dtype_differs_from_the_weights(backend, seed, dtype):
    """``weight.data = weight.data.half()`` after a backward: fp32 gradients on half weights, as the reference
    (which promotes) handles them: within one ulp of it in fp32."""
    model = TinyEncoder()
    model(batch()).backward()
    weight = model.embeddings.word_embeddings.weight
    weight.data = weight.data.to(dtype)
    original = weight.detach().clone()
    wide = nn.Module()
    wide.word_embeddings = nn.Parameter(original.float())
    wide.word_embeddings.grad = weight.grad.clone()
    fgm = FusedFGM(model, eps=2.0, backend=backend)
    fgm.attack()
    FGM(wide, eps=2.0).attack()
    assert weight.dtype == dtype
    assert_matches(weight.detach(), wide.word_embeddings.detach())
    fgm.restore()
    assert torch.equal(weight, original)


# ---- 3. parameters rebound or converted between attack and restore ----


@pytest.mark.parametrize("change", ["double", "half", "rebind", "clone"])
def test_restore_after_the_parameter_was_converted_or_rebound(backend, seed, change):
    model = TinyEncoder()
    model(batch()).backward()
    before = snapshot(model)
    fgm = FusedFGM(model, emb_name="embeddings", backend=backend)
    fgm.attack()
    weight = model.embeddings.word_embeddings.weight
    if change == "double":
        model.to(torch.float64)
    elif change == "half":
        model.half()
    elif change == "rebind":
        weight.data = weight.data + 0  # new storage holding the perturbed values
    else:
        model.embeddings.word_embeddings.weight = nn.Parameter(weight.detach().clone())
    with pytest.warns(RuntimeWarning, match="rebound or converted"):
        fgm.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n].to(p.dtype)), n


def test_restore_after_a_shape_change_raises(backend, seed):
    model = TinyEncoder()
    model(batch()).backward()
    before = snapshot(model)
    fgm = FusedFGM(model, emb_name="embeddings", backend=backend)
    fgm.attack()
    model.embeddings.word_embeddings.weight.data = torch.zeros(3, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="word_embeddings.weight.*changed shape"):
        fgm.restore()
    for n, p in model.named_parameters():  # the other targets were restored
        if "word_embeddings" not in n:
            assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="without an active attack"):  # nothing is left active
        fgm.restore()


def pgd_after_a_backward(backend: str):
    """A fresh model, a batch, the model's weights before anything, and a FusedPGD on it after one backward."""
    model = TinyEncoder()
    ids = batch()
    before = snapshot(model)
    pgd = FusedPGD(model, backend=backend)
    model(ids).backward()
    return model, ids, before, pgd


def test_continuing_after_a_conversion_raises_before_writing(backend, seed):
    model, _, before, pgd = pgd_after_a_backward(backend)
    pgd.attack(is_first_attack=True)
    model.to(torch.float64)
    converted = snapshot(model)
    with pytest.raises(RuntimeError, match="rebound or converted.*restore"):
        pgd.attack()
    assert_bit_exact(model, converted)
    with pytest.warns(RuntimeWarning, match="rebound or converted"):
        pgd.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n].double()), n


# ---- 4. copy_grads=True over several steps: tests/test_errors.py; 5. gradients that are bucket views ----


def test_gradients_that_are_views_are_copied(backend, seed):
    """A gradient that views a larger buffer (as DDP's gradient_as_bucket_view makes them) is rewritten in place by
    the next backward: backup_grad copies it instead of keeping a reference."""
    model = TinyEncoder()
    model(batch()).backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    offset = 0
    for p in model.parameters():  # every gradient a view of one buffer, as DDP's buckets
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    clean = flat.clone()
    pgd = FusedPGD(model, backend=backend)
    pgd.backup_grad()
    pgd.attack(is_first_attack=True)
    model.zero_grad()
    model(batch()).backward()
    flat.add_(1.0)  # the bucket is rewritten by the next backward
    pgd.restore_grad()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), clean)
    pgd.restore()


# ---- 6. pickling and copying ----


@pytest.mark.parametrize("rows", ["scan", "batch"])
@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
def test_attack_objects_pickle_and_deep_copy(backend, seed, kind, rows):
    if kind == "awp" and rows == "batch":
        pytest.skip("row hints are for embeddings")
    model = TinyEncoder()
    ids = batch()
    hints = {"rows": rows, "emb_name": "word_embeddings"} if rows == "batch" else {}
    attacker = make(kind, model, backend, **hints)
    model.zero_grad()
    run_step(kind, attacker, lambda: model(ids))
    for clone in (copy.deepcopy(attacker), pickle.loads(pickle.dumps(attacker))):
        twin = clone.model
        assert twin is not model
        before = snapshot(twin)
        twin.zero_grad()
        run_step(kind, clone, lambda twin=twin: twin(ids))
        assert_bit_exact(twin, before)
        assert any(p.grad is not None for p in twin.parameters())
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole model, with the row-hint hooks on it
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded(ids).backward()
    for (n, a), (_, b) in zip(loaded.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


# ---- 7. float64 ----


def reference_step(kind: str, model: nn.Module, closure) -> torch.Tensor:
    """The seed's usage loop with the reference class of ``kind``, configured as :func:`make` configures fastadv's,
    with as many passes as :func:`run_step`."""
    return adversarial_step(kind, make(kind, model, None), model, closure, k=3 if kind == "pgd" else 2)


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
def test_float64_models(backend, seed, kind):
    """float64 works whatever the backend asked for, in float64 math: the reference's results to fp64 precision."""
    fused = TinyEncoder(dtype=torch.float64)
    ref = copy.deepcopy(fused)
    ids = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compiled backend says (once) that the torch backend does float64
        got = run_step(kind, make(kind, fused, backend), lambda: fused(ids))
    want = reference_step(kind, ref, lambda: ref(ids))
    assert got.item() == want.item()
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=n)


def test_float64_auto_picks_a_backend_that_runs_it():
    model = TinyEncoder(dtype=torch.float64)
    weight = model.embeddings.word_embeddings.weight
    assert backend_for("auto", [weight], [weight]).__name__ == "fastadv.backends.torch_ops"


# ---- 8. row hints with a model compiled and run before the attack object ----


def test_row_hints_on_a_model_compiled_before_the_attack_object(seed):
    model = TinyEncoder()
    compiled = torch.compile(model, backend="eager")
    ids = batch()
    compiled(ids).backward()
    fgm = FusedFGM(model, rows="batch")
    model.zero_grad()
    compiled(ids).backward()
    before = snapshot(model)
    if fgm._rows.row_source.hints.lookups.seen:  # this torch runs hooks added after compiling: the hints just work
        fgm.attack()
        fgm.restore()
        return
    with pytest.raises(RuntimeError, match=r"no lookup .* was recorded.*torch.compile.*rows='scan'"):
        fgm.attack()
    assert_bit_exact(model, before)


# ---- 9. zero-size parameters ----


def test_zero_size_parameters_are_skipped(backend, seed):
    model = TinyEncoder()
    model.added_embeddings = nn.Embedding(0, 16).to(DEVICE)  # an empty added-tokens embedding
    model.empty = nn.Linear(16, 0).to(DEVICE)
    ref = copy.deepcopy(model)
    ids = batch()
    loss = FusedAWP(model, adv_eps=0.02, backend=backend).step(lambda: model(ids) + model.empty.weight.sum())
    want = awp_step(AWP(ref, adv_eps=0.02), ref, lambda: ref(ids) + ref.empty.weight.sum())
    assert loss.item() == want.item()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert_matches(a.grad, b.grad)
    fgm = FusedFGM(model, emb_name="added_embeddings", backend=backend)  # only zero-size targets: nothing to do
    fgm.attack()
    fgm.restore()


# ---- 10. inference mode ----


def test_attack_under_inference_mode(backend, seed):
    model, ids, before, pgd = pgd_after_a_backward(backend)
    with torch.inference_mode():
        pgd.backup_grad()
        pgd.attack(is_first_attack=True)
        pgd.attack()
    pgd.restore_grad()
    pgd.restore()
    assert_bit_exact(model, before)
    model.zero_grad()
    model(ids).backward()
    pgd.step(lambda: model(ids))  # the buffers made under inference_mode are ordinary tensors
    assert_bit_exact(model, before)


# ---- 11. non-contiguous parameters ----


def test_non_contiguous_parameter_is_refused_before_anything_is_written(seed):
    """Refused while the targets are validated, before any backend op: checked once."""
    model = TinyEncoder()
    model(batch()).backward()
    weight = model.embeddings.word_embeddings.weight
    weight.data = weight.data.t().contiguous().t()
    weight.grad = weight.grad.contiguous()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="not contiguous.*contiguous"):
        FusedFGM(model, emb_name="embeddings").attack()
    assert_bit_exact(model, before)


# ---- 12. wrappers, recognised by type ----


class WithBlock(TinyEncoder):
    """:class:`TinyEncoder` with one more layer, the submodule :attr:`BLOCK`."""

    BLOCK = "block"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        setattr(self, self.BLOCK, nn.Linear(16, 16, device=self.hidden.weight.device))

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(pos)
        h = torch.tanh(getattr(self, self.BLOCK)(torch.tanh(self.hidden(self.embeddings.LayerNorm(h)))))
        return nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), ids.flatten())


class WithModule(WithBlock):
    """A model whose own submodule is called ``module`` (a layer of the network, not a wrapper)."""

    BLOCK = "module"


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
def test_a_submodule_called_module_is_part_of_the_model(backend, seed, kind):
    """The seed's classes (and fastadv 0.3) took ``model.module`` for a wrapper's model and attacked that layer
    alone; fastadv unwraps DDP, DataParallel, FSDP and DeepSpeed engines by type. The step matches the seed's on the
    same network with the layer under another name."""
    fused = WithModule()
    renamed = WithBlock()
    renamed.load_state_dict({k.replace("module.", "block."): v for k, v in fused.state_dict().items()})
    attacker = make(kind, fused, backend)
    assert attacker.model is fused
    ids = batch()
    run_step(kind, attacker, lambda: fused(ids))
    adversarial_step(kind, make(kind, renamed, None), renamed, lambda: renamed(ids), k=3 if kind == "pgd" else 2)
    for a, b in zip(fused.parameters(), renamed.parameters()):
        assert_matches(a.grad, b.grad)


def test_a_compiled_model_is_unwrapped(seed):
    model = TinyEncoder()
    assert FusedFGM(torch.compile(model)).model is model
    assert FusedPGD(nn.DataParallel(model)).model is model


# ---- 13. errors where they can be raised, naming their cause ----


def test_errors_known_before_the_clean_pass_are_raised_at_construction(seed, monkeypatch):
    model = TinyEncoder()
    with pytest.raises(ValueError, match="emb_name='wte'"):
        FusedPGD(model, emb_name="wte")
    with pytest.raises(ValueError, match="adv_param='nope'"):
        FusedAWP(model, adv_param="nope")
    monkeypatch.setenv("FASTADV_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTADV_BACKEND='cuda-magic': unknown backend"):
        FusedFGM(model)
    monkeypatch.delenv("FASTADV_BACKEND")
    triton_ops = pytest.importorskip("fastadv.backends.triton_ops")
    monkeypatch.setattr(triton_ops, "supports", lambda device, *args: torch.device(device).type == "cuda")
    with pytest.raises(RuntimeError, match="backend='triton'.*cpu tensors.*TRITON_INTERPRET=1"):
        FusedFGM(TinyEncoder(device="cpu"), backend="triton")
    monkeypatch.setenv("FASTADV_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FASTADV_BACKEND='triton'.*unset FASTADV_BACKEND"):
        FusedFGM(TinyEncoder(device="cpu"))


class _LoRAEmbedding(nn.Module):
    """What PEFT makes of an embedding: the frozen weight under ``base_layer`` and trainable ``lora_embedding_A/B``
    (with LoRA on other layers only, the embedding is just frozen)."""

    def __init__(self, base: nn.Embedding, rank: int = 2, adapted: bool = True):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        if adapted:
            self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(rank, base.num_embeddings))})
            self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(base.embedding_dim, rank))})


@pytest.mark.parametrize("adapted", [True, False], ids=["lora-on-the-embedding", "frozen-embedding"])
def test_a_frozen_or_lora_embedding_is_refused_with_what_to_take(adapted):
    """FGM/PGD on ``embed_tokens`` of a LoRA model: with LoRA on the embedding only its adapter matches, and
    perturbing it moves the embedding output far more than ``eps`` says; without, the embedding is frozen. Both
    refused at construction, pointing at the input-space methods and ``modules_to_save``."""
    model = TinyEncoder()
    model.embed_tokens = _LoRAEmbedding(model.embeddings.word_embeddings, adapted=adapted)
    del model.embeddings.word_embeddings
    match = "adapter weights .*lora_embedding" if adapted else "frozen .*requires_grad=False"
    for cls in (FusedFGM, FusedPGD):
        with pytest.raises(ValueError, match=f"{match}.*an input-space method: FusedFreeLB.*modules_to_save"):
            cls(model, emb_name="embed_tokens")


# ---- 14. row-hint recorders under torch.func transforms, torch.export and tracers, and in copies of the model ----


def assert_trains_as_the_seed_quietly(model: nn.Module, attacker, ref: nn.Module, oracle) -> None:
    """Two more FGM steps, without a warning, that end where the seed's class ends on the twin model."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(model, attacker, "fgm", steps=2, seed=3)
    want = train(ref, oracle, "fgm", steps=2, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)


def recorded(attacker) -> tuple:
    """Everything the row-hint recorders of ``attacker`` hold, comparable: each mask's rows (and that it is a real
    tensor, not a fake one), the names looked up, looked up unrecorded, and unexplained by provenance."""
    lookups = attacker._rows.row_source.hints.lookups
    masks = {name: (type(mask), mask.nonzero().view(-1).tolist()) for name, mask in lookups.masks.items()}
    return masks, set(lookups.seen), set(lookups.unrecorded), set(lookups.foreign), dict(lookups.arrivals)


def _detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _functional(model: nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    return lambda params, ids: torch.func.functional_call(model, params, (ids,))


def _fake_weights(model: nn.Module, ids: torch.Tensor) -> str:
    """Fake parameters, outside their mode (the model's positions are a real tensor)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    params = {n: mode.from_tensor(p) for n, p in model.named_parameters()}
    torch.func.functional_call(model, params, (mode.from_tensor(ids),))
    return ""


def _fake_mode(model: nn.Module, ids: torch.Tensor) -> str:
    """The real model under a fake mode (the outputs are fake), as memory estimators run it."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model(ids)
    return ""


#: Each runs ``model`` on ``ids`` under a transform or a tracer and returns the code it traced ("" when none).
TRANSFORMS = {
    "vmap-grad": lambda model, ids: (
        torch.func.vmap(torch.func.grad(_functional(model)), in_dims=(None, 0))(_detached(model), ids[:, None]) and ""
    ),
    "grad": lambda model, ids: torch.func.grad(_functional(model))(_detached(model), ids) and "",
    "export-strict": lambda model, ids: torch.export.export(model, (ids,), strict=True).graph_module.code,
    "export-non-strict": lambda model, ids: torch.export.export(model, (ids,), strict=False).graph_module.code,
    "make_fx": lambda model, ids: make_fx(model)(ids).code,
    "jit-trace": lambda model, ids: torch.jit.trace(model, (ids,), check_trace=False).code,
    "fake-mode": _fake_mode,
    "fake-weights": _fake_weights,
}


@pytest.mark.parametrize("how", list(TRANSFORMS))
def test_recorders_stay_out_of_transforms_and_traces(seed, how):
    """Before the first attack (no mask made yet) and after it: nothing raises, nothing is recorded (no fake mask
    either), no trace carries the recording (it would write into the attack object's masks whenever it runs), and the
    attacks are the seed's. The recorder is the same on every backend: the torch one runs the attacks."""
    model = TinyEncoder()
    ref = copy.deepcopy(model)
    attacker, oracle = make_attacker("fgm", model, "torch", rows="batch"), make_attacker("fgm", ref)
    for step in range(2):
        before = recorded(attacker)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracers' own warnings
            code = TRANSFORMS[how](model, batch())
        assert "index_fill" not in code
        assert recorded(attacker) == before
        train(model, attacker, "fgm", steps=1, seed=step)
        train(ref, oracle, "fgm", steps=1, seed=step)
    assert_trains_as_the_seed_quietly(model, attacker, ref, oracle)


@pytest.mark.parametrize("tracking", [True, False], ids=["provenance", "no-provenance"])
def test_a_partly_recorded_batch_is_found(backend, seed, tracking):
    """Two rows of each batch looked up by the model, the others by ``vmap`` of it, which records nothing but gives
    the weight gradient all the same: the first attack after it scans (provenance sees the gradient it cannot pair;
    without provenance, the lookup left unrecorded asks for the scan), warns, and is the seed's. The vmapped ids are
    moved to rows 1000 and up, out of the sweep's reach in two attacks."""
    model = TinyEncoder(vocab=1100)
    ref = copy.deepcopy(model)
    attacker, oracle = make_attacker("fgm", model, backend), make_attacker("fgm", ref)
    train(model, attacker, "fgm", steps=1)
    train(ref, oracle, "fgm", steps=1)
    if not tracking:
        attacker._rows.row_source.hints.stop_tracking()

    def partly_vmapped(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(ids[:2]) + torch.func.vmap(m)(ids[2:, None] + 1000).sum()

    with pytest.warns(RuntimeWarning, match="rows='auto'.*no recorded lookup explains"):
        got = train(model, attacker, "fgm", steps=2, seed=3, forward=functools.partial(partly_vmapped, model))
    want = train(ref, oracle, "fgm", steps=2, seed=3, forward=functools.partial(partly_vmapped, ref))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)


def _saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda model: pickle.loads(pickle.dumps(model)), "torch.save": _saved}


def copied_mid_step(model: nn.Module, copies: list[nn.Module], how: str, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s loss, with a copy of it taken after the forward pass (before its backward), as an EMA may."""
    loss = model(ids)
    copies.append(COPIES[how](model))
    return loss


@pytest.mark.parametrize("how", list(COPIES))
def test_copies_of_the_model_carry_inert_recorders(backend, seed, how):
    """A copy taken in the middle of each training step (after the forward pass, before its backward, as an EMA
    copy may be): its recorder records nothing the original reads, it has no gradient check, it trains by itself, it
    does not keep the original alive; the original's training stays the seed's."""
    model = TinyEncoder()
    ref = copy.deepcopy(model)
    attacker, oracle = make_attacker("pgd", model, backend), make_attacker("pgd", ref)
    copies = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(model, attacker, "pgd", steps=2, forward=functools.partial(copied_mid_step, model, copies, how))
    want = train(ref, oracle, "pgd", steps=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    twin = copies[-1]
    (recorder,) = twin.embeddings.word_embeddings._forward_hooks.values()
    assert recorder.lookups is None and not twin.embeddings.word_embeddings.weight._backward_hooks
    before = recorded(attacker)
    twin.zero_grad()
    twin(batch()).backward()
    assert recorded(attacker) == before
    lookups = weakref.ref(attacker._rows.row_source.hints.lookups)
    del model, attacker, copies
    gc.collect()
    assert lookups() is None  # the copy kept nothing of the original


def test_a_copied_attack_object_records_for_its_own_model(backend, seed):
    model = TinyEncoder()
    attacker = make_attacker("fgm", model, backend)
    train(model, attacker, "fgm", steps=1)
    clone = copy.deepcopy(attacker)
    before = recorded(attacker)
    clone.model(batch()).backward()
    assert recorded(attacker) == before
    lookups = clone._rows.row_source.hints.lookups
    assert lookups.seen and lookups is not attacker._rows.row_source.hints.lookups
    (recorder,) = clone.model.embeddings.word_embeddings._forward_hooks.values()
    assert recorder.lookups is lookups
    assert len(clone.model.embeddings.word_embeddings.weight._backward_hooks) == 1


class RaisesOnce:
    """A gradient hook that raises at the first backward pass after ``armed`` is set: the lookup's autograd node has
    run, the gradient check (registered after it) has not."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, grad: torch.Tensor) -> None:
        if self.armed:
            self.armed = False
            raise Interrupt


def test_an_interrupted_backward_pass_leaves_provenance_on(backend, seed):
    model = TinyEncoder()
    ref = copy.deepcopy(model)
    hook = RaisesOnce()
    model.embeddings.word_embeddings.weight.register_hook(hook)
    attacker, oracle = make_attacker("fgm", model, backend), make_attacker("fgm", ref)
    train(model, attacker, "fgm", steps=1)
    train(ref, oracle, "fgm", steps=1)
    hook.armed = True
    with pytest.raises(Interrupt):
        model(batch()).backward()
    model.zero_grad()
    assert_trains_as_the_seed_quietly(model, attacker, ref, oracle)
    assert attacker._rows.row_source.hints.lookups.tracking and not attacker._rows.row_source.hints.lookups.arrivals


def test_row_hints_on_a_model_compiled_after_the_attack_object(seed):
    """The recorders are traced into the compiled graph; its backward cannot be paired, so provenance goes off at the
    first attack's scan, quietly; the sweep stays."""
    model = TinyEncoder()
    ref = copy.deepcopy(model)
    attacker, oracle = make_attacker("pgd", model, "torch"), make_attacker("pgd", ref)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(model, attacker, "pgd", steps=3, forward=compiled)
    want = train(ref, oracle, "pgd", steps=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    hints = attacker._rows.row_source.hints
    assert attacker._rows.row_source.mode == "auto" and hints.verified and not hints.lookups.tracking

"""DeepSpeed ZeRO 1, 2 and 3 engines as the model of an attack class.

After ``engine.backward`` ZeRO moves the gradients out of ``.grad`` (into its partitions) and a second backward before
``engine.step()`` overwrites them (stages 1/2) or adds to them (stage 3), without a warning. Inside
``with engine.coalesce_grad_reduction():`` (deepspeed >= 0.19.1) every backward leaves this process's gradient in
``.grad``, as plain torch does, and the block's exit reduces them once for ``engine.step()``. So an attack runs inside
that block: it averages its targets' gradients over the data-parallel processes first (what DDP's backward would have
done), then perturbs the weights the next forward reads: the parameter itself at stages 1/2; at stage 3 this rank's
slice of ``param.ds_tensor``, from which ZeRO-3 gathers the next forward's weights (a copy it holds gathered, as it
does for persistent parameters, is dropped after each attack and restore). The optimizer's fp32 master copy is never
read by a forward, which is why DeepSpeed#5667 saw no effect.

deepspeed is imported only here, and only when an engine is passed.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastadv._sharding import Placement, Sharding

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine  # untyped (Any to mypy): deepspeed ships no type information

MIN_VERSION = (0, 19, 1)  # DeepSpeedEngine.coalesce_grad_reduction

#: engine -> its ``global_steps`` when a ``step()`` last flushed its gradients (a window it opened itself).
_flushed_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_engine(model: nn.Module) -> bool:
    """Whether ``model`` is a DeepSpeed engine (checked by class name: deepspeed is not imported for other models)."""
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed.") for cls in type(model).__mro__
    )


def refuse_zero_model(named: Iterable[tuple[str, nn.Parameter]], attack: str) -> None:
    """A clear error for the parameters of a model a DeepSpeed ZeRO optimizer trains, given instead of its engine:
    ZeRO moves their gradients out of ``.grad`` and overwrites them at each backward (stages 1/2), and at stage 3 holds
    their weights in partitions, so an attack on the model sees no gradient, or empty weights (it would silently do
    nothing), and a step's backwards bypass ``engine.backward``. ZeRO-3 marks its parameters with ``ds_id``; ZeRO 1/2
    (and DeepSpeed's bf16 optimizer) link every parameter to the fp32 partitions with ``_hp_mapping`` (None where
    another rank holds it)."""
    for name, param in named:
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            raise RuntimeError(
                f"parameter {name!r} is trained by a DeepSpeed ZeRO optimizer, which keeps its gradient (and at stage 3"
                f" its weights) out of the parameter: pass the engine (deepspeed.initialize's first return value) to"
                f" {attack} instead of the model"
            )


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class EngineSupport:
    """What an attack class needs to train through a DeepSpeed engine: the :class:`ZeroPlacement` its driver uses,
    the engine's backward as the pass, and the ``coalesce_grad_reduction`` window of a ``step()``."""

    def __init__(self, engine: DeepSpeedEngine) -> None:
        import deepspeed

        if _version(deepspeed.__version__) < MIN_VERSION or not hasattr(engine, "coalesce_grad_reduction"):
            raise RuntimeError(
                f"fastadv needs deepspeed >= {'.'.join(map(str, MIN_VERSION))} (for"
                f" engine.coalesce_grad_reduction()), found {deepspeed.__version__}: pip install -U deepspeed"
            )
        stage = int(engine.zero_optimization_stage())
        if stage not in (1, 2, 3):
            raise ValueError(
                f"fastadv supports DeepSpeed ZeRO stages 1, 2 and 3, got stage {stage}: set"
                ' "zero_optimization": {"stage": 1} (or 2, 3) in the config, or use torch DDP without DeepSpeed'
            )
        if engine.gradient_accumulation_steps() != 1:
            raise ValueError(
                f'the DeepSpeed config has "gradient_accumulation_steps": {engine.gradient_accumulation_steps()};'
                " fastadv needs 1 and accumulates itself: run the micro-batches of one optimizer step inside one"
                " `with engine.coalesce_grad_reduction():` block, then call engine.step() (divide the loss by the"
                " number of micro-batches in the closure if you want their mean)"
            )
        managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
        if not managed or getattr(engine, "pipeline_parallelism", False):
            raise ValueError(
                "fastadv needs engine.coalesce_grad_reduction(), which DeepSpeed refuses with"
                ' "managed_gradient_accumulation": false and under pipeline parallelism: remove that key / use a'
                " plain (non-pipeline) module"
            )
        if engine.optimizer is None:
            raise ValueError("the DeepSpeed engine has no optimizer: pass optimizer= (or a config's) to initialize()")
        if not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
            raise ValueError(
                f"the engine's optimizer wrapper {type(engine.optimizer).__name__} does not support"
                " engine.coalesce_grad_reduction() (DeepSpeed's ZeRO 1-3 optimizers do), which fastadv needs"
            )
        self.engine = engine
        self.placement = ZeroPlacement(engine, stage=stage)

    def backward_pass(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """The pass of ``closure()`` (forward, returns the loss) through ``engine.backward``."""

        def run() -> Tensor:
            loss = closure()
            self.engine.backward(loss)
            return loss

        return run

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        """The ``coalesce_grad_reduction`` block of one ``step()``: the caller's, if one is open, else its own (its
        exit reduces the gradients for ``engine.step()``)."""
        if self.placement.coalescing():
            yield
            return
        engine = self.engine
        if _flushed_at.get(engine) == engine.global_steps:
            raise RuntimeError(
                "step() was called twice without engine.step() in between: the second would overwrite the first's"
                " gradients (DeepSpeed replaces them on each flush, without a warning). Call engine.step() after each"
                " step(), or for gradient accumulation run the micro-batches' step() calls inside one"
                " `with engine.coalesce_grad_reduction():` block"
            )
        with engine.coalesce_grad_reduction():
            yield
        _flushed_at[engine] = engine.global_steps


class _Partition(NamedTuple):
    """This rank's partition of a ZeRO-3 parameter: its start and length in the flattened parameter, and the widest
    row length (a divisor of the parameter's) in which the partition is whole rows."""

    start: int
    length: int
    width: int


def _zero3(param: nn.Parameter) -> Any:
    """``param``, typed to have the attributes ZeRO-3 adds to its parameters at runtime (``ds_shape``, ``ds_tensor``,
    ``ds_numel``, ``ds_process_group``, ``ds_status``, ``partition()``), which torch's types lack."""
    return param


class ZeroPlacement(Placement):
    """The gradients in ``.grad`` (inside ``coalesce_grad_reduction``), averaged over the data-parallel group before
    an attack; the weights where the next forward reads them (see the module's docstring)."""

    def __init__(self, engine: DeepSpeedEngine, *, stage: int) -> None:
        self.engine = engine
        self.stage = stage
        self.group = engine.data_parallel_group

    def coalescing(self) -> bool:
        return bool(getattr(self.engine.optimizer, "_coalesce_grad_reduction", False))

    def ready(self) -> None:
        if not self.coalescing():
            raise RuntimeError(
                "under a DeepSpeed engine an attack reads the gradients of the current accumulation window, which stay"
                " in .grad only inside `with engine.coalesce_grad_reduction():` (elsewhere engine.backward() moves"
                " them into ZeRO's partitions). Use step(closure), which opens that block when none is open, or call"
                " attack()/restore() inside one; call engine.step() after the block"
            )

    def shape(self, param: nn.Parameter) -> torch.Size:
        return _zero3(param).ds_shape if self.stage == 3 else param.shape

    def prepare(self, named: list[tuple[str, nn.Parameter]]) -> None:
        world = dist.get_world_size(self.group)
        for _, param in named:
            grad = param.grad
            assert grad is not None  # the targets were checked to have gradients (fastadv._targets)
            # .data: averaging is not a modification PGD's gradient backup must refuse (its _version stays); the
            # flush averages again, which leaves averaged values as they are
            dist.all_reduce(grad.data, group=self.group)
            grad.data.div_(world)

    @staticmethod
    def _partition(parameter: nn.Parameter) -> _Partition:
        param = _zero3(parameter)
        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(param.ds_process_group)
        length = max(0, min(size, param.ds_numel - start))
        width = param.ds_numel // param.ds_shape[0] if len(param.ds_shape) > 1 else param.ds_numel
        return _Partition(start=start, length=length, width=math.gcd(start, length, width))

    def weights(self, param: nn.Parameter) -> Tensor:
        if self.stage != 3:
            return super().weights(param)
        part = self._partition(param)
        return _zero3(param).ds_tensor.narrow(0, 0, part.length).view(-1, part.width)

    def grad(self, param: nn.Parameter) -> Tensor:
        if self.stage != 3:
            return super().grad(param)
        part = self._partition(param)
        grad = param.grad
        assert grad is not None  # the targets were checked to have gradients (fastadv._targets)
        return grad.contiguous().view(-1).narrow(0, part.start, part.length).view(-1, part.width)

    def sharding(self, named: list[tuple[str, nn.Parameter]]) -> Sharding:
        if self.stage != 3:
            return Sharding()
        return Sharding([_zero3(named[0][1]).ds_process_group])  # the group ZeRO-3 partitions over

    def written(self, named: list[tuple[str, nn.Parameter]]) -> None:
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for _, parameter in named:
            param = _zero3(parameter)
            # a gathered copy (a persistent parameter, from the second step on) no longer matches the partitions: drop
            # it (the partitions are kept), so the next forward gathers the perturbed or restored weights
            if param.ds_status == ZeroParamStatus.AVAILABLE:
                param.partition()

    def set_grad(self, param: nn.Parameter, grad: Tensor | None) -> None:
        if grad is None or grad.shape == param.shape:
            param.grad = grad
            return
        # a released ZeRO-3 parameter's .data is empty and torch refuses a full-size .grad on it: assign the gradient
        # while .data is a full-shape alias of one element (no allocation), as during the backward that made it
        released = param.data
        param.data = grad.new_empty(1).expand(grad.shape)
        try:
            param.grad = grad
        finally:
            param.data = released

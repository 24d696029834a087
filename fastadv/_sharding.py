"""Where this process reads a target's gradient and writes its weights (:class:`Placement`), and how the targets are
split across processes (:class:`Sharding`). Parameters sharded by FSDP2 (DTensors with ``Shard(0)``) are worked on
through their local shards, with the sums of squares all-reduced over the shard groups; engines that keep weights or
gradients elsewhere (DeepSpeed ZeRO, :mod:`fastadv._deepspeed`) subclass :class:`Placement`."""

from __future__ import annotations

from typing import TypeGuard, cast

import torch
from torch import Tensor, nn

from fastadv._rows import as_rows

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without distributed support: nothing can be sharded
    # mypy types both names by the import above (a module, a class) and has no way to say "or None" for them
    dist, DTensor = None, None  # type: ignore[assignment,misc]


def distributed() -> bool:
    """Whether this process is one of several (DDP, FSDP, DeepSpeed): their gradients are all-reduced over ranks."""
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(tensor: Tensor) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard (its own storage, written in place), else itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


class Sharding:
    """How the targets are split across processes: the groups whose partial sums of squares add up to the norms."""

    def __init__(self, groups: list | None = None) -> None:
        self.groups = groups or []

    def all_reduce(self, sums: Tensor) -> None:
        """Sum ``sums`` in place over the shards (a no-op for unsharded targets)."""
        for group in self.groups:
            dist.all_reduce(sums, group=group)


def dtensor_sharding(named: list[tuple[str, nn.Parameter]]) -> Sharding:
    """The :class:`Sharding` of FSDP2's DTensor targets (none for plain tensors)."""
    sharded = [is_sharded(p) for _, p in named]
    if not any(sharded):
        return Sharding()
    if not all(sharded):
        plain = [n for (n, _), s in zip(named, sharded) if not s]
        raise RuntimeError(f"some target parameters are sharded DTensors and some ({', '.join(plain)}) are not")
    first = cast(DTensor, named[0][1])  # every target is a DTensor (checked above)
    for name, target in named:
        param = cast(DTensor, target)
        bad = [p for p in param.placements if not (p.is_replicate() or p.is_shard(0))]
        if bad or param.device_mesh != first.device_mesh or param.placements != first.placements:
            raise RuntimeError(
                f"{name!r} is a DTensor with placements {param.placements} on {param.device_mesh}; fastadv needs"
                " every target sharded the same way, with Shard(0) or Replicate (as FSDP2's fully_shard does)"
            )
    mesh = first.device_mesh
    return Sharding([mesh.get_group(d) for d, p in enumerate(first.placements) if p.is_shard(0)])


class Placement:
    """Where an attack reads a target's gradient and writes its weights: the tensors themselves, or a DTensor's local
    shard. The driver calls ``ready()`` at the start of every attack, ``prepare(targets)`` once they are validated,
    before it reads a gradient, and ``written(params)`` after an attack or a restore."""

    def ready(self) -> None:
        """Raise if the gradients cannot be read now (nothing is modified yet)."""

    def shape(self, param: nn.Parameter) -> torch.Size:
        """The parameter's full shape."""
        return param.shape

    def prepare(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Make the targets' gradients the ones to attack with (e.g. average them over processes)."""

    def weights(self, param: nn.Parameter) -> Tensor:
        """The ``[rows, cols]`` tensor this process writes in place."""
        return as_rows(local(param.data))

    def grad(self, param: nn.Parameter) -> Tensor:
        """The ``[rows, cols]`` gradient matching :meth:`weights` row for row."""
        grad = param.grad
        assert grad is not None  # the targets were checked to have gradients (fastadv._targets)
        return as_rows(local(grad).contiguous())

    def sharding(self, named: list[tuple[str, nn.Parameter]]) -> Sharding:
        return dtensor_sharding(named)

    def written(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Called after an attack or restore wrote these parameters' :meth:`weights`."""

    def set_grad(self, param: nn.Parameter, grad: Tensor | None) -> None:
        """``param.grad = grad`` (PGD's ``restore_grad``, AWP's earlier micro-batches)."""
        param.grad = grad

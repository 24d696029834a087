"""Parameters sharded by FSDP2 (DTensors with ``Shard(0)``): the attack works on their local shards, with the sums
of squares all-reduced over the shard groups."""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without distributed support: nothing can be sharded
    dist, DTensor = None, None


def distributed() -> bool:
    """Whether this process is one of several (DDP, FSDP, DeepSpeed): their gradients are all-reduced over ranks."""
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(tensor: Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard (its own storage, written in place), else itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


class Sharding:
    """How the targets are split across processes: the groups whose partial sums of squares add up to the norms."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        sharded = [is_sharded(p) for _, p in named]
        self.groups: list = []
        if not any(sharded):
            return
        if not all(sharded):
            plain = [n for (n, _), s in zip(named, sharded) if not s]
            raise RuntimeError(f"some target parameters are sharded DTensors and some ({', '.join(plain)}) are not")
        first = named[0][1]
        for name, param in named:
            bad = [p for p in param.placements if not (p.is_replicate() or p.is_shard(0))]
            if bad or param.device_mesh != first.device_mesh or param.placements != first.placements:
                raise RuntimeError(
                    f"{name!r} is a DTensor with placements {param.placements} on {param.device_mesh}; fastadv needs"
                    " every target sharded the same way, with Shard(0) or Replicate (as FSDP2's fully_shard does)"
                )
        mesh = first.device_mesh
        self.groups = [mesh.get_group(d) for d, p in enumerate(first.placements) if p.is_shard(0)]

    def all_reduce(self, sums: Tensor) -> None:
        """Sum ``sums`` in place over the shards (a no-op for unsharded targets)."""
        for group in self.groups:
            dist.all_reduce(sums, group=group)

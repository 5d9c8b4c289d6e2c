"""The ``(dp, tp)`` device mesh of data × tensor parallelism (torch's DeviceMesh).

``world = dp · tp`` ranks form ``init_device_mesh(device, (dp, tp), mesh_dim_names=("dp",
"tp"))``: global rank ``r`` is tensor-parallel rank ``r % tp`` of replica ``r // tp``, so the
ranks of one tp group are consecutive (one machine under torchrun's ``--nproc-per-node tp``)
and dp runs across machines. ``mesh["tp"]``'s group is the one the model is split over,
``mesh["dp"]``'s the one over which the replicas sum their gradients (engine/train).
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def check_layout(world: int, tp: int) -> int:
    """dp for ``world`` ranks at ``tp``; ValueError when tp does not divide the world."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    if world % tp:
        raise ValueError(f"tp={tp} does not divide the world size {world} (dp = world size / tp)")
    return world // tp


def mesh_groups(device_type: str, tp: int):
    """(tp group, dp group) of this rank, from a ``(dp, tp)`` DeviceMesh over the default
    group. The mesh itself is not kept: torch owns the groups (engine.parallel.shutdown)."""
    dp = check_layout(dist.get_world_size(), tp)
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return mesh["tp"].get_group(), mesh["dp"].get_group()

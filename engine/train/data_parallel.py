"""Data parallelism over the ``dp`` dimension of the ``(dp, tp)`` mesh (engine/parallel/mesh.py).

Every rank receives the whole batch and takes its share (``split_over_ranks``: data balanced
by tokens, first-fit-decreasing over the ranks, then over micro-batches within each rank), so
the same code runs from a WorkerPool and under torchrun. After the pass the replicas
exchange their outputs and metrics (``merge_outputs``), so every rank returns what one
process would for the whole batch. A rank whose share is empty runs no micro-batch but still
joins that exchange and the gradient sum.

Losses are sums over tokens, so the gradient of the whole batch is the sum of the replicas'
gradients: ``sum_gradients`` all-reduces them (SUM, one flat buffer) before the step; the
normalisation is global over every dp rank exactly as over micro-batches.

Optimizer state is sharded over dp (ZeRO-1): each parameter has one owner replica
(``owners``, balanced by size), whose AdamW alone keeps its moments and steps it; the owner
then broadcasts the new values to the other replicas (``broadcast_owned``). Every replica
holds the full (tp-sharded) weights and gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def split_over_ranks(sizes: list[int], dp: int, budget: int, group: int = 1) -> list[list[int]]:
    """Indices of the data each of ``dp`` ranks takes. ``group`` consecutive data form one
    unit (pairwise losses); units are placed largest first on the rank with the fewest
    tokens so far (first-fit-decreasing over ranks; ties go to the lower rank). A unit over
    ``budget`` counts 0 tokens: its rank drops it (pack_micro_batches)."""
    units = [list(range(i, min(i + group, len(sizes)))) for i in range(0, len(sizes), group)]
    cost = [sum(sizes[i] for i in u) for u in units]
    cost = [0 if c > budget else c for c in cost]
    load = [0] * dp
    shares: list[list[int]] = [[] for _ in range(dp)]
    for u in sorted(range(len(units)), key=lambda u: -cost[u]):
        rank = min(range(dp), key=lambda r: (load[r], r))
        shares[rank] += units[u]
        load[rank] += cost[u]
    return [sorted(s) for s in shares]


def merge_outputs(group, n: int, mine: list[int], outputs: list, metrics: dict) -> tuple[list, dict]:
    """Every replica's outputs (``outputs[k]`` is datum ``mine[k]``'s) put back in datum
    order, and the metrics summed over the replicas (all ``:sum`` metrics)."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (mine, outputs, metrics), group=group)
    merged: list = [None] * n
    total = dict.fromkeys(metrics, 0.0)
    for idx, outs, m in everyone:
        for i, o in zip(idx, outs):
            merged[i] = o
        for k, v in m.items():
            total[k] += v
    return merged, total


def sum_gradients(params: list[torch.nn.Parameter], group) -> None:
    """Sum every parameter's gradient over the replicas (one all-reduce). A parameter that
    has no gradient on any replica keeps none (AdamW skips it, as in one process); one that
    has a gradient on some replicas gets the sum, zeros standing in for the others."""
    if not params:
        return
    device = params[0].device
    grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
             for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat(grads + [present])
    dist.all_reduce(flat, group=group)
    sizes = [p.numel() for p in params]
    parts, seen = flat[:sum(sizes)].split(sizes), flat[sum(sizes):]
    for p, g, s in zip(params, parts, seen.tolist()):
        p.grad = g.view_as(p).to(p.dtype) if s > 0 else None


def owners(sizes: list[int], dp: int) -> list[int]:
    """The dp rank that keeps the optimizer state of each parameter: largest first, to the
    replica with the fewest elements so far. ``sizes`` must be equal on every rank."""
    load, out = [0] * dp, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(dp), key=lambda r: (load[r], r))
        out[i], load[r] = r, load[r] + sizes[i]
    return out


def agreed_sizes(params: list[torch.nn.Parameter], tp_group) -> list[int]:
    """Parameter sizes equal on every rank of the mesh (tp ranks' shards may differ by a
    vocabulary row: the largest counts)."""
    device = params[0].device if params else torch.device("cpu")  # NCCL reduces device tensors only
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    if tp_group is not None and len(params):
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=tp_group)
    return sizes.tolist()


@torch.no_grad()
def broadcast_owned(params: list[torch.nn.Parameter], owner: list[int], group) -> None:
    """Each owner's parameters, just stepped, to the other replicas: one broadcast per owner
    (and dtype) of its parameters flattened together."""
    for r in range(dist.get_world_size(group)):
        for dtype in dict.fromkeys(p.dtype for p in params):  # a float32 value head beside a bf16 model
            mine = [p for p, o in zip(params, owner) if o == r and p.dtype == dtype]
            if not mine:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in mine])
            dist.broadcast(flat, src=dist.get_global_rank(group, r), group=group)
            for p, v in zip(mine, flat.split([p.numel() for p in mine])):
                p.copy_(v.view_as(p))

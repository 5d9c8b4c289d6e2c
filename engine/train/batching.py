"""Micro-batches: pack data into token budgets by first-fit-decreasing (DESIGN.md).

``max_batch_size`` is the token budget of one micro-batch. Losses are sums over tokens, so
accumulating the gradients of the micro-batches gives exactly the gradient of one big batch.
A unit (one datum, or a pair for pairwise losses) longer than the budget is dropped with a
warning and counted, never split.
"""
from __future__ import annotations

import warnings


def check_groups(n: int, group: int) -> None:
    if n % group:
        raise ValueError(f"this loss takes data in groups of {group} (e.g. chosen, rejected pairs); got {n} data")


def pack_micro_batches(lengths: list[int], budget: int, group: int = 1) -> tuple[list[list[int]], list[int]]:
    """(micro-batches as lists of data indices, dropped indices).

    ``group`` consecutive data form one unit that stays in one micro-batch (group data in
    order). Units are placed largest first into the first micro-batch with room; within a
    micro-batch the indices are sorted so outputs come back in submission order.
    """
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_batch_size must be a positive number of tokens, got {budget!r}")
    check_groups(len(lengths), group)
    units = [list(range(i, i + group)) for i in range(0, len(lengths), group)]
    sizes = [sum(lengths[i] for i in u) for u in units]
    dropped: list[int] = []
    bins: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: -sizes[u]):
        if sizes[u] > budget:
            dropped += units[u]
            continue
        for b in range(len(bins)):
            if room[b] >= sizes[u]:
                bins[b] += units[u]
                room[b] -= sizes[u]
                break
        else:
            bins.append(list(units[u]))
            room.append(budget - sizes[u])
    if dropped:
        warnings.warn(f"dropped {len(dropped)} datum(s) longer than max_batch_size={budget} tokens "
                      f"(indices {sorted(dropped)[:8]}{'...' if len(dropped) > 8 else ''}); "
                      f"raise max_batch_size or shorten them", stacklevel=3)
    return [sorted(b) for b in bins], sorted(dropped)

"""Autograd-aware collectives of tensor parallelism (Megatron's f and g operators)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) whose backward is the identity: the ranks' partial results become
    one replicated value, and every rank's share gets that value's gradient as is."""
    return _SumOverGroup.apply(t, group)


def copy_to_group(t: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward sums the gradient over the ranks: a replicated input feeding
    rank-local work (each rank sees only its part of the input's gradient)."""
    return _CopyToGroup.apply(t, group)


def summed_grad(group, grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook (``param.register_hook(partial(summed_grad, group))``) for a
    replicated parameter whose gradient each rank sees only in part."""
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad

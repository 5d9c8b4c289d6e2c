"""Autograd-aware collectives of tensor parallelism (Megatron's f and g operators), and
``GroupRef``, the weak handle through which long-lived objects hold a process group."""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist


class GroupRef:
    """A torch.distributed process group, held weakly: ``ref()`` returns it, or raises once
    it was destroyed. (``GroupRef(None)()`` is None: no group.)

    torch.distributed owns its groups. Modules, hooks, autograd nodes and trainers that keep
    a group hold it through this, so that ``destroy_process_group()`` really frees the group,
    which joins gloo's worker threads. A gloo thread still alive when the interpreter shuts
    down can release the last reference to a Python object there (a finished all-reduce's
    tensor or thread-local state), and aborts the process ("terminate called without an
    active exception")."""

    __slots__ = ("_ref",)

    def __init__(self, group):
        self._ref = None if group is None else weakref.ref(group)

    def __call__(self):
        if self._ref is None:
            return None
        group = self._ref()
        if group is None:
            raise RuntimeError("the process group of this tensor-parallel object was destroyed "
                               "(torch.distributed.destroy_process_group or engine.parallel.shutdown)")
        return group


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
        ctx.group = GroupRef(group)  # an autograd graph kept alive must not keep the group alive
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group())
        return grad, None


def sum_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) whose backward is the identity: the ranks' partial results become
    one replicated value, and every rank's share gets that value's gradient as is."""
    return _SumOverGroup.apply(t, group)


def copy_to_group(t: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward sums the gradient over the ranks: a replicated input feeding
    rank-local work (each rank sees only its part of the input's gradient)."""
    return _CopyToGroup.apply(t, group)


def summed_grad(group: GroupRef, grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook (``param.register_hook(partial(summed_grad, GroupRef(group)))``) for a
    replicated parameter whose gradient each rank sees only in part."""
    grad = grad.clone()
    dist.all_reduce(grad, group=group())
    return grad

"""The backend-free half of ``linear_logprobs``: the per-token statistics a token-local
loss receives (:class:`TokenStats`), the loss evaluation both backends share, the
vocabulary slices of vocabulary parallelism, and the torch reference of the statistics
(the ``impl="torch"`` backend, which defines the semantics the Triton backend in
``linear_logprobs_triton.py`` reproduces). See ``linear_logprobs.py`` for the formulas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .collectives import copy_to_group, sum_over_group


def vocab_sizes(local_vocab: int, group) -> list[int]:
    """Vocabulary slice size of every rank (host ints only: one all-gather of sizes)."""
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, local_vocab, group=group)
    return sizes


def vocab_offset(local_vocab: int, group) -> int:
    """First global token id of this rank's slice."""
    return sum(vocab_sizes(local_vocab, group)[: dist.get_rank(group)])


@dataclass
class TokenStats:
    """Per-token statistics handed to a token-local loss: float32 [n] tensors, 0 on ignored
    tokens; ``entropy`` and ``sum`` (sum of the scores over the vocabulary) are None unless
    asked for; ``valid`` is False on ignored tokens."""
    logprob: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    sum: torch.Tensor | None
    valid: torch.Tensor


LossFn = Callable[..., torch.Tensor]  # loss_fn(stats: TokenStats, **aux) -> per-token loss [n]


def zero_ignored(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))


def evaluate_loss(loss_fn: LossFn, stats: TokenStats, aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token float32 loss of ``loss_fn(stats, **aux)``, checked, 0 on ignored tokens."""
    out = loss_fn(stats, **aux)
    if not isinstance(out, torch.Tensor) or out.shape != stats.logprob.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"loss_fn must return a per-token loss of shape {tuple(stats.logprob.shape)}, got {got}")
    return zero_ignored(out.float(), stats.valid)


def token_stats_torch(x, weight, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                      process_group=None, want_entropy=False, want_sum=False) -> dict[str, torch.Tensor]:
    """Reference statistics [N] float32: logprob, lse, and on request entropy and the sum
    of the scores over the vocabulary. Ignored rows are 0 in every output, with no gradient."""
    group = process_group
    if group is not None:
        x = copy_to_group(x, group)
    scores = x.float() @ weight.float().t()
    if bias is not None:
        scores = scores + bias.float()
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores / temperature
    valid = targets != ignore_index
    offset = vocab_offset(weight.shape[0], group) if group is not None else 0
    local = targets - offset
    mine = valid & (local >= 0) & (local < weight.shape[0])
    picked = scores.gather(1, torch.where(mine, local, 0)[:, None])[:, 0] * mine

    def reduce(t):
        return t if group is None else sum_over_group(t, group)

    row_max = scores.detach().amax(dim=1)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    lse = row_max + torch.log(reduce(torch.exp(scores - row_max[:, None]).sum(dim=1)))
    zero = torch.zeros((), device=x.device)
    out = {"logprob": torch.where(valid, reduce(picked) - lse, zero), "lse": torch.where(valid, lse, zero)}
    if want_entropy:
        # E[s] = sum_j p_j s_j with p_j = exp(s_j - lse). Each rank's partial sum must not
        # differentiate through the replicated lse (it would see only its own share of
        # dE/dlse = -E[s]); the lse path is added once, globally, by the second term.
        fixed = lse.detach()
        expected = reduce((torch.exp(scores - fixed[:, None]) * scores).sum(dim=1))
        expected = expected + (fixed - lse) * expected.detach()
        out["entropy"] = torch.where(valid, lse - expected, zero)
    if want_sum:
        out["sum"] = torch.where(valid, reduce(scores.sum(dim=1)), zero)
    return out

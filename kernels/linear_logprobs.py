"""Per-token log-probabilities and cross-entropy straight from hidden states and the LM
head (DESIGN.md: "everything is per-token logprobs").

This module holds the public ops and their torch reference backend (``impl="torch"``),
which defines the semantics every faster backend must reproduce. The reference builds the
full logits for the rows it is given, so it is meant for CPU, tests and small inputs.

Scores of one row: ``s = softcap(x @ weight.T + bias) / temperature`` in float32, where
``softcap(z) = c * tanh(z / c)``. Per token: ``logprob = s[target] - lse``,
``lse = logsumexp(s)``, ``entropy = lse - sum(softmax(s) * s)``.

Vocabulary parallelism: with ``process_group``, ``weight``/``bias`` hold this rank's
contiguous slice of the vocabulary (ranks in order); the statistics are combined with
all-reduces of [N]-sized tensors, and ``x``'s gradient is summed over the ranks so that
every output and gradient equals the unsharded op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._dispatch import resolve_impl

_BACKENDS = ("torch",)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank then computes the same
    loss from the same reduced value, so each rank's share gets the gradient as is."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Identity whose backward sums the gradient over the ranks (x is replicated, each rank
    only sees the part of dx that comes from its vocabulary slice)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def vocab_offset(local_vocab: int, group) -> int:
    """First global token id of this rank's slice (host ints only: one all-gather of sizes)."""
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, local_vocab, group=group)
    return sum(sizes[: dist.get_rank(group)])


def token_stats_torch(x, weight, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                      process_group=None, want_entropy=False, want_sum=False) -> dict[str, torch.Tensor]:
    """Reference statistics [N] float32: logprob, lse, and on request entropy and the sum
    of the scores over the vocabulary. Ignored rows are 0 in every output, with no gradient."""
    group = process_group
    if group is not None:
        x = _CopyToGroup.apply(x, group)
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
        return t if group is None else _SumOverGroup.apply(t, group)

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


def _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, H] and weight [V, H] with the same H, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != x.shape[0] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N={x.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"{name} must be a floating tensor (fp32, bf16, fp16), got {t.dtype}")
    for name, t in (("weight", weight), ("targets", targets)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or positive, got {softcap!r}")
    if process_group is None and x.device.type == "cpu":  # free on the host; a sync on GPUs
        kept = targets[targets != ignore_index]
        bad = kept[(kept < 0) | (kept >= weight.shape[0])]
        if bad.numel():
            raise ValueError(f"targets holds id {int(bad[0])}, outside the vocabulary [0, {weight.shape[0]}) "
                             f"and not ignore_index={ignore_index}")


def linear_logprobs(x, weight, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                    return_lse=False, return_entropy=False, process_group=None, impl="auto"):
    """Log-probability of each target token without materialising the logits.

    Args:
        x: [N, H] hidden states (fp32, bf16 or fp16).
        weight: [V, H] LM head (this rank's vocabulary slice under ``process_group``).
        targets: [N] int64 global token ids; ``ignore_index`` marks tokens to skip.
        bias: optional [V] bias of the LM head.
        temperature, softcap: the scores are ``softcap(x @ weight.T + bias) / temperature``.
        return_lse, return_entropy: also return lse [N] and entropy [N], float32.
        process_group: vocabulary-parallel group (see the module docstring).
        impl: "auto" or "torch".

    Returns:
        logprobs [N] float32 (0 for ignored tokens), followed by lse and entropy when asked
        (also 0 for ignored tokens). Differentiable in x, weight and bias for any upstream
        gradient on each output; ignored tokens get no gradient.
    """
    _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group)
    resolve_impl("linear_logprobs", impl, x, _BACKENDS)
    stats = token_stats_torch(x, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                              ignore_index=ignore_index, process_group=process_group, want_entropy=return_entropy)
    outs = [stats["logprob"]] + [stats["lse"]] * return_lse + [stats.get("entropy")] * return_entropy
    return outs[0] if len(outs) == 1 else tuple(outs)


def linear_cross_entropy(x, weight, targets, *, bias=None, weights=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, return_lse=False,
                         process_group=None, impl="auto"):
    """Cross-entropy of ``softcap(x @ weight.T + bias) / temperature`` against ``targets``,
    equal in value and gradients to ``F.cross_entropy`` on those logits (same
    ``ignore_index``, ``label_smoothing`` and ``reduction``), plus ``z_loss * lse**2`` per
    token.

    Args:
        x [N, H], weight [V, H], targets [N] int64, bias [V] or None: as in linear_logprobs.
        weights: optional [N] per-token weights multiplying each token's loss; "mean" then
            divides by their sum over non-ignored tokens instead of the token count.
        reduction: "mean", "sum" or "none" ([N] float32, 0 for ignored tokens).
        label_smoothing: in [0, 1), mixes the uniform distribution into the target.
        z_loss: coefficient of the lse**2 penalty.
        return_lse: also return lse [N] float32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if weights is not None and tuple(weights.shape) != (x.shape[0],):
        raise ValueError(f"weights must be [N={x.shape[0]}], got {tuple(weights.shape)}")
    _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group)
    resolve_impl("linear_cross_entropy", impl, x, _BACKENDS)
    stats = token_stats_torch(x, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                              ignore_index=ignore_index, process_group=process_group, want_sum=label_smoothing > 0)
    loss = -stats["logprob"]
    if label_smoothing > 0:
        vocab = weight.shape[0] * (dist.get_world_size(process_group) if process_group is not None else 1)
        # -(1/V) sum_j log p_j = lse - sum_j s_j / V  (0 on ignored rows, where both are 0)
        uniform = stats["lse"] - stats["sum"] / vocab
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    if z_loss:
        loss = loss + z_loss * stats["lse"] ** 2
    valid = targets != ignore_index
    if weights is not None:
        loss = loss * weights.float()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        denom = weights.float()[valid].sum() if weights is not None else valid.sum()
        loss = loss.sum() / denom
    return (loss, stats["lse"]) if return_lse else loss

"""Per-token log-probabilities and cross-entropy straight from hidden states and the LM
head (DESIGN.md: "everything is per-token logprobs").

This module holds the public ops (``linear_logprobs``, ``linear_cross_entropy``,
``linear_token_loss``) and their torch reference backend (``impl="torch"``), which defines
the semantics the Triton backend (``linear_logprobs_triton.py``: chunked, never more than
one chunk of logits alive) reproduces. The reference builds the full logits for the rows
it is given, so it is meant for CPU, tests and small inputs.

Scores of one row: ``s = softcap(x @ weight.T + bias) / temperature`` in float32, where
``softcap(z) = c * tanh(z / c)``. Per token: ``logprob = s[target] - lse``,
``lse = logsumexp(s)``, ``entropy = lse - sum(softmax(s) * s)``.

Vocabulary parallelism: with ``process_group``, ``weight``/``bias`` hold this rank's
contiguous slice of the vocabulary (ranks in order); the statistics are combined with
all-reduces of [N]-sized tensors, and ``x``'s gradient is summed over the ranks so that
every output and gradient equals the unsharded op.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .dispatch import resolve_impl
from .linear_logprobs_triton import ChunkedStats, FusedTokenLoss, Options
from .token_stats import LossFn, TokenStats, evaluate_loss, token_stats_torch, vocab_sizes, zero_ignored

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_BACKENDS = ("triton", "torch")


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


def _token_stats(backend, x, weight, targets, bias, temperature, softcap, ignore_index, process_group,
                 want_entropy, want_sum, fp32_weight_grad):
    """Differentiable per-token statistics from either backend (dict of [N] float32)."""
    if backend == "torch":
        return token_stats_torch(x, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                 ignore_index=ignore_index, process_group=process_group,
                                 want_entropy=want_entropy, want_sum=want_sum)
    opts = Options(temperature, softcap, ignore_index, want_entropy, want_sum, process_group, fp32_weight_grad)
    logprob, lse, entropy, ssum = ChunkedStats.apply(x.contiguous(), weight.contiguous(), bias, targets, opts)
    out = {"logprob": logprob, "lse": lse}
    if want_entropy:
        out["entropy"] = entropy
    if want_sum:
        out["sum"] = ssum
    return out


def linear_logprobs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                    return_lse: bool = False, return_entropy: bool = False, process_group: ProcessGroup | None = None,
                    fp32_weight_grad: bool = False, impl: str = "auto") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probability of each target token without materialising the logits.

    Args:
        x: [N, H] hidden states (fp32, bf16 or fp16).
        weight: [V, H] LM head (this rank's vocabulary slice under ``process_group``).
        targets: [N] int64 global token ids; ``ignore_index`` marks tokens to skip.
        bias: optional [V] bias of the LM head.
        temperature, softcap: the scores are ``softcap(x @ weight.T + bias) / temperature``.
        return_lse, return_entropy: also return lse [N] and entropy [N], float32.
        process_group: vocabulary-parallel group (see the module docstring).
        fp32_weight_grad: accumulate the weight gradient in float32 (Triton backend; see
            kernels/linear_logprobs_triton.py for the default precision).
        impl: "auto" (Triton on CUDA tensors, else torch), "triton" or "torch".

    Returns:
        logprobs [N] float32 (0 for ignored tokens), followed by lse and entropy when asked
        (also 0 for ignored tokens). Differentiable in x, weight and bias for any upstream
        gradient on each output; ignored tokens get no gradient. The Triton backend keeps
        only [N] statistics in the forward and recomputes the logits chunk by chunk in the
        backward; for a loss known up front, ``linear_token_loss`` saves that second pass.
    """
    _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group)
    backend = resolve_impl("linear_logprobs", impl, x, _BACKENDS)
    stats = _token_stats(backend, x, weight, targets, bias, temperature, softcap, ignore_index, process_group,
                         return_entropy, False, fp32_weight_grad)
    outs = [stats["logprob"]] + [stats["lse"]] * return_lse + [stats.get("entropy")] * return_entropy
    return outs[0] if len(outs) == 1 else tuple(outs)


def linear_token_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                      aux: dict[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                      temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                      with_entropy: bool = False, with_sum: bool = False, return_stats: bool = False,
                      process_group: ProcessGroup | None = None, fp32_weight_grad: bool = False,
                      impl: str = "auto") -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over tokens of a token-local loss of the per-token statistics, in one pass over
    the vocabulary for forward and backward together.

    ``loss_fn(stats, **aux)`` receives a :class:`TokenStats` (logprob, lse, and entropy /
    sum when ``with_entropy`` / ``with_sum``) and the rows of each ``aux`` tensor, and returns
    the per-token loss of those rows. It must be token-local: the loss of a token may depend
    only on that token's statistics and aux values (every Tinker loss is: cross_entropy,
    importance_sampling, ppo, cispo, dro), because the Triton backend calls it on chunks of
    rows and forms each chunk's gradient as soon as its statistics are known. Normalisation
    over the batch goes in an aux tensor (e.g. per-token weights already divided by the
    token count). Example, PPO's clipped objective::

        def ppo(s, old_logprobs, advantages):
            ratio = torch.exp(s.logprob - old_logprobs)
            return -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)

        loss = linear_token_loss(h, lm_head, targets, ppo, aux=dict(old_logprobs=old, advantages=adv))

    Args:
        x, weight, targets, bias, temperature, softcap, ignore_index, process_group,
        fp32_weight_grad, impl: as in :func:`linear_logprobs`.
        aux: dict of [N] tensors passed to ``loss_fn`` by name; constants (no gradient).
        return_stats: also return a dict of detached [N] float32 tensors "logprob", "lse",
            "loss" (per token) and "entropy" when asked, for metrics.

    Returns:
        The float32 scalar sum of the per-token losses over non-ignored tokens, differentiable
        in x, weight and bias (under the Triton backend the gradients are computed in the
        forward when any of them requires grad, and the backward only scales them).
    """
    _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group)
    aux = dict(aux or {})
    for name, t in aux.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[0],) or t.device != x.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"aux[{name!r}] must be a [N={x.shape[0]}] tensor on {x.device}, got {got}")
    aux = {name: t.detach() for name, t in aux.items()}
    backend = resolve_impl("linear_token_loss", impl, x, _BACKENDS)
    if backend == "torch":
        st = token_stats_torch(x, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                               ignore_index=ignore_index, process_group=process_group,
                               want_entropy=with_entropy, want_sum=with_sum)
        stats = TokenStats(st["logprob"], st["lse"], st.get("entropy"), st.get("sum"), targets != ignore_index)
        per_token = evaluate_loss(loss_fn, stats, aux)
        total = per_token.sum()
        record = {"logprob": stats.logprob, "lse": stats.lse, "loss": per_token}
        if with_entropy:
            record["entropy"] = stats.entropy
        record = {name: t.detach() for name, t in record.items()}
    else:
        opts = Options(temperature, softcap, ignore_index, with_entropy, with_sum, process_group, fp32_weight_grad)
        total, *values = FusedTokenLoss.apply(x.contiguous(), weight.contiguous(), bias, targets, loss_fn,
                                              tuple(aux), opts, *aux.values())
        record = dict(zip(("logprob", "lse", "loss", "entropy"), values))
    return (total, record) if return_stats else total


def _cross_entropy_loss(stats, weights=None, *, label_smoothing, z_loss, vocab):
    loss = -stats.logprob
    if label_smoothing > 0:
        # -(1/V) sum_j log p_j = lse - sum_j s_j / V  (0 on ignored rows, where both are 0)
        loss = (1 - label_smoothing) * loss + label_smoothing * (stats.lse - stats.sum / vocab)
    if z_loss:
        loss = loss + z_loss * stats.lse**2
    return loss if weights is None else loss * weights


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0,
                         return_lse: bool = False, process_group: ProcessGroup | None = None,
                         fp32_weight_grad: bool = False,
                         impl: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        return_lse: also return lse [N] float32. With "mean" and "sum" it is for logging
            and carries no gradient (the loss is computed in one pass, see
            :func:`linear_token_loss`); with "none" it is differentiable.
        fp32_weight_grad, impl: as in :func:`linear_logprobs`.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if weights is not None and (tuple(weights.shape) != (x.shape[0],) or weights.device != x.device):
        raise ValueError(f"weights must be [N={x.shape[0]}] on {x.device}, got {tuple(weights.shape)} on {weights.device}")
    _check(x, weight, targets, bias, temperature, softcap, ignore_index, process_group)
    backend = resolve_impl("linear_cross_entropy", impl, x, _BACKENDS)
    vocab = weight.shape[0]
    if process_group is not None and label_smoothing > 0:  # a host all-gather: only when the sum is used
        vocab = sum(vocab_sizes(weight.shape[0], process_group))
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, vocab=vocab)
    common = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                  process_group=process_group, fp32_weight_grad=fp32_weight_grad)
    if reduction == "none":
        st = _token_stats(backend, x, weight, targets, bias, temperature, softcap, ignore_index, process_group,
                          False, label_smoothing > 0, fp32_weight_grad)
        stats = TokenStats(st["logprob"], st["lse"], None, st.get("sum"), targets != ignore_index)
        loss = _cross_entropy_loss(stats, None if weights is None else weights.float(), **options)
        return (loss, stats.lse) if return_lse else loss
    valid = targets != ignore_index
    per_token = weights.float().detach() if weights is not None else torch.ones(x.shape[0], device=x.device)
    if reduction == "mean":
        per_token = per_token / zero_ignored(per_token, valid).sum()

    def loss_fn(stats, w):
        return _cross_entropy_loss(stats, w, **options)

    loss, record = linear_token_loss(x, weight, targets, loss_fn, aux={"w": per_token}, with_sum=label_smoothing > 0,
                                     return_stats=True, impl=backend, **common)
    return (loss, record["lse"]) if return_lse else loss

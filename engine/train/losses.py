"""Built-in losses: token-local functions of the per-token statistics, sum reduction.

Formulas follow Tinker's documentation (``p`` the learner's logprob of the target token,
``q`` the sampler's, ``A`` the advantage, ``r = exp(p - q)``):

* cross_entropy:       ``-w * p``                            inputs target_tokens, weights
* importance_sampling: ``-r * A``                            inputs target_tokens, logprobs, advantages
* ppo:                 ``-min(r * A, clip(r, lo, hi) * A)``  config clip_low_threshold=0.8, clip_high_threshold=1.2
* cispo:               ``-sg(clip(r, lo, hi)) * p * A``      config clip_low_threshold=0.0, clip_high_threshold=4.0
* dro:                 ``-(p * A - beta / 2 * (p - q)^2)``   config beta=0.05

ppo's and cispo's thresholds may also be given per datum, as Tinker's loss inputs
``clip_low_threshold`` / ``clip_high_threshold`` (one value per token, or one number for
the datum); loss_fn_config (else the default) fills the data that give none
(``LossSpec.per_token``).

Each is ``fn(stats: kernels.TokenStats, **aux) -> [n]`` so ``kernels.linear_token_loss``
forms its gradient inside the one pass over the vocabulary. The loss is a plain sum over
tokens: a recipe that wants a mean puts ``1 / count`` into its weights or advantages, and
micro-batches add up to exactly the whole batch.

Scoring models (a scalar value per token instead of the LM head):

* mse:     ``w * (v - target_values)^2``                 inputs target_values, weights (optional)
* ranking: ``-log sigmoid(s_chosen - s_rejected)`` per pair of consecutive data, ``s`` the
  value at a sequence's last token; optional input ``weights`` (its last entry weights the pair).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F


def cross_entropy(s, weights):
    return -weights * s.logprob


def importance_sampling(s, logprobs, advantages):
    return -torch.exp(s.logprob - logprobs) * advantages


def ppo(s, logprobs, advantages, clip_low_threshold, clip_high_threshold):
    ratio = torch.exp(s.logprob - logprobs)
    clipped = torch.clamp(ratio, clip_low_threshold, clip_high_threshold)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(s, logprobs, advantages, clip_low_threshold, clip_high_threshold):
    coeff = torch.clamp(torch.exp(s.logprob - logprobs), clip_low_threshold, clip_high_threshold).detach()
    return -coeff * s.logprob * advantages


def dro(s, logprobs, advantages, *, beta: float):
    return -(s.logprob * advantages - 0.5 * beta * (s.logprob - logprobs) ** 2)


def linear_grad(s, grad):
    """``sum(grad * logprob)``: its gradient is that of any loss whose derivative in the
    logprobs is ``grad`` (how forward_backward_custom replays a custom loss)."""
    return grad * s.logprob


def mse(values, target_values, weights):
    return weights * (values - target_values) ** 2


def ranking(values, cu_seqlens, weights):
    """values [T] of a packed batch whose sequences come in (chosen, rejected) pairs."""
    last = cu_seqlens[1:].long() - 1
    scores, w = values[last], weights[last]
    return -(w[0::2] * F.logsigmoid(scores[0::2] - scores[1::2])).sum()


@dataclass(frozen=True)
class LossSpec:
    """``inputs``: required loss_fn_inputs; ``defaults``: optional inputs with their fill
    value; ``config``: loss_fn_config keys with defaults; ``scoring``: for scoring models;
    ``group``: data that must share a micro-batch (2 for pairwise losses); ``per_token``:
    config keys that are also optional loss_fn_inputs (``resolve_loss`` moves them into
    ``defaults``, filled with the config's value, so ``fn`` takes them per token)."""

    fn: Callable
    inputs: tuple[str, ...]
    defaults: dict
    config: dict
    scoring: bool = False
    group: int = 1
    per_token: tuple[str, ...] = ()


_CLIP = ("clip_low_threshold", "clip_high_threshold")
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("target_tokens",), {"weights": 1.0}, {}),
    "importance_sampling": LossSpec(importance_sampling, ("target_tokens", "logprobs", "advantages"), {}, {}),
    "ppo": LossSpec(ppo, ("target_tokens", "logprobs", "advantages"), {},
                    {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, per_token=_CLIP),
    "cispo": LossSpec(cispo, ("target_tokens", "logprobs", "advantages"), {},
                      {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, per_token=_CLIP),
    "dro": LossSpec(dro, ("target_tokens", "logprobs", "advantages"), {}, {"beta": 0.05}),
    "mse": LossSpec(mse, ("target_values",), {"weights": 1.0}, {}, scoring=True),
    "ranking": LossSpec(ranking, (), {"weights": 1.0}, {}, scoring=True, group=2),
}


def resolve_loss(loss_fn: str, loss_fn_config: dict | None, *, scoring: bool) -> tuple[LossSpec, Callable]:
    """The spec (its ``per_token`` config keys moved into ``defaults`` with the config's
    values) and the per-token function with the rest of its config bound; clear errors
    naming the argument for an unknown loss, a loss of the wrong model kind, or an unknown
    config key."""
    if not isinstance(loss_fn, str) or loss_fn not in LOSSES:
        raise ValueError(f"loss_fn must be one of {sorted(LOSSES)}, got {loss_fn!r}")
    spec = LOSSES[loss_fn]
    if spec.scoring != scoring:
        kinds = sorted(k for k, s in LOSSES.items() if s.scoring == scoring)
        what = "a scoring model (into_scoring_model)" if scoring else "a language model"
        raise ValueError(f"loss_fn={loss_fn!r} does not apply to {what}; use one of {kinds}")
    config = dict(loss_fn_config or {})
    unknown = sorted(set(config) - set(spec.config))
    if unknown:
        raise ValueError(f"loss_fn_config: unknown key(s) {unknown} for loss_fn={loss_fn!r}; "
                         f"accepted: {sorted(spec.config) or 'none'}")
    for key, value in config.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    bound = {**spec.config, **{k: float(v) for k, v in config.items()}}
    if spec.per_token:
        spec = replace(spec, defaults={**spec.defaults, **{k: bound.pop(k) for k in spec.per_token}})
    return spec, (partial(spec.fn, **bound) if bound else spec.fn)

"""Token sampling: temperature, top-k, top-p, seeded Gumbel-max, and the two logprobs.

Randomness is counter-based, so a seeded request gives the same tokens whatever else
shares its batch, after preemption and recompute, and on any backend: the uniform of
vocabulary entry v for a sequence at generation step s is a hash of (seed, s, v), and the
token is ``argmax_v(logp_filtered[v] + Gumbel(u_v))``, an exact sample of the filtered
distribution. No host round trip and no generator state; ``csrc/sampling.cu`` uses the
same hash (``mix32``) so the CUDA kernel and this torch twin draw the same tokens.

Two logprobs per sampled token:
* ``logprob``: under the distribution it was sampled from: logits / temperature, top-k,
  then top-p over the renormalised top-k distribution, renormalised (greedy rows: the
  raw logprob, since the point mass says nothing);
* ``raw_logprob``: the model's own log-softmax at temperature 1 without truncation, what
  ``compute_logprobs`` and the trainer compute.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: (x < 2^32) * _MUL stays below 2^63 in int64 arithmetic
_GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensor holding values in [0, 2^32))."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def stream_key(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] int64 per-row key from a 64-bit seed and the generation step."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    h = mix32(lo ^ mix32(hi ^ _GOLDEN))
    return mix32(h ^ (step & _M32))


def uniforms(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1) from the per-row keys [B] int64."""
    v = torch.arange(vocab, device=key.device, dtype=torch.int64)
    h = mix32(key[:, None] ^ mix32(v + _GOLDEN)[None, :])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def derive_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` of a request seeded with ``seed`` (splitmix64, host)."""
    m64 = (1 << 64) - 1
    x = (seed + (index + 1) * 0x9E3779B97F4A7C15) & m64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
    return (x ^ (x >> 31)) >> 1


def filtered_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """[B, V] float32 logprobs of the sampling distribution (-inf outside the kept set).
    temperature [B] float32 (rows <= 0 are treated as 1 here), top_k [B] int64 (<= 0: all),
    top_p [B] float32. ``truncate=False`` (a host flag: no row has top-k or top-p) skips
    the sort over the vocabulary."""
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    vocab = x.shape[-1]
    if truncate:
        vals, idx = x.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=x.device)[None, :]
        k = torch.where(top_k > 0, top_k, vocab)[:, None]
        vals = vals.masked_fill(rank >= k, float("-inf"))
        probs = vals.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        vals = vals.masked_fill((before >= top_p[:, None]) & (rank > 0), float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, vals)
    return x.log_softmax(-1)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, *,
                  truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row (torch twin of the CUDA kernel).

    Args:
        logits: [B, V] any float dtype.
        temperature: [B] float32; 0 means greedy.
        top_k: [B] int64; <= 0 keeps all tokens.
        top_p: [B] float32 in (0, 1].
        seeds: [B] int64 per-sequence seeds; steps: [B] int64 generation step of each row.
        truncate: host flag, False when no row uses top-k or top-p (skips a vocabulary sort).

    Returns:
        tokens [B] int64, logprob [B] float32 under the sampling distribution, raw_logprob
        [B] float32 under the model's distribution (temperature 1, no truncation).
    """
    raw = logits.float().log_softmax(-1)
    logp = filtered_logprobs(logits, temperature, top_k, top_p, truncate)
    gumbel = -torch.log(-torch.log(uniforms(stream_key(seeds, steps), logits.shape[-1])))
    sampled = (logp + gumbel).argmax(-1)
    greedy = temperature <= 0
    tokens = torch.where(greedy, raw.argmax(-1), sampled)
    raw_lp = raw.gather(-1, tokens[:, None])[:, 0]
    lp = torch.where(greedy, raw_lp, logp.gather(-1, tokens[:, None])[:, 0])
    return tokens, lp, raw_lp

"""The decoder shared by the Llama, Qwen2, Qwen3 and Mistral families, on packed batches.

A batch is a flat token stream (DESIGN.md, "Token packing"): ``input_ids [T]``,
``position_ids [T]`` restarting at 0 in each sequence, ``cu_seqlens [B+1]`` int32 and a
host int ``max_seqlen``. q/k/v and gate/up are each one fused projection (one matmul
instead of three or two); the checkpoint map in ``checkpoint.py`` places the Hugging Face
weights into their row blocks. Local head counts come from the weight shapes, so a
tensor-parallel shard runs the same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig
from .lora import check_adapter_ids, project


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' order of operations (normalise in float32, cast back, then scale).
        # Eager ops: the inference engine calls the fused kernel itself (engine/infer).
        return kernels.rms_norm(x, self.weight, self.eps, impl="torch")


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Computed on the CPU, then moved to the default device: on the meta device this
        # arithmetic would import torch._dynamo (~75 MB of host memory).
        inv_freq = config.inv_freq(device="cpu").to(torch.empty(0).device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = self.config.inv_freq(device=self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] in ``dtype``, computed in float32."""
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        hd = config.head_dim
        self.head_dim = hd
        self.kv_ratio = config.num_heads // config.num_kv_heads
        self.window = config.window(layer)
        self.qkv = nn.Linear(config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * hd, bias=config.qkv_bias)
        self.o = nn.Linear(config.num_heads * hd, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def qkv_rope(self, x, cos, sin, adapter_ids=None, impl="torch"):
        """q [T, Hq, D], k and v [T, Hkv, D] of x, with the q/k norms and RoPE applied (the
        part of attention shared by training and cached decoding, engine/infer). ``impl``
        of ``kernels.rope``: the model runs the eager ops, so a forward with and without
        autograd agree bit for bit; the inference engine passes "auto" (fused on CUDA)."""
        t = x.shape[0]
        kv_size = self.qkv.out_features // (self.kv_ratio + 2)
        q, k, v = project(self.qkv, x, adapter_ids).split([kv_size * self.kv_ratio, kv_size, kv_size], dim=-1)
        q, k, v = (z.view(t, -1, self.head_dim) for z in (q, k, v))
        norms = {}
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm first, fused with the rotation
            norms = dict(q_weight=self.q_norm.weight, k_weight=self.k_norm.weight, eps=self.q_norm.eps)
        q, k = kernels.rope(q, k, cos, sin, **norms, impl=impl)
        return q, k, v

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, adapter_ids=None):
        q, k, v = self.qkv_rope(x, cos, sin, adapter_ids)
        out = kernels.varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            causal=True, softmax_scale=self.head_dim**-0.5, window=self.window,
        )
        return project(self.o, out.reshape(x.shape[0], -1), adapter_ids)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x, adapter_ids=None, impl="torch"):
        """``impl`` of ``kernels.silu_mul`` (see ``Attention.qkv_rope``)."""
        return project(self.down, kernels.silu_mul(project(self.gate_up, x, adapter_ids), impl=impl), adapter_ids)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, adapter_ids=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, adapter_ids)
        return x + self.mlp(self.mlp_norm(x), adapter_ids)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` returns the final-normed hidden states of a packed
    batch; the LM head is applied by the fused logprob kernel in training, or by
    ``compute_logits`` for tests and small inputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # _weight skips the random init: on the meta device normal_() pulls in torch._dynamo.
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size,
                                  _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Checking token ids and cu_seqlens costs one host sync per forward; callers that
        # built the batch on the host (PackedBatch does the same checks) may switch it off.
        self.validate_inputs = True
        self.num_adapters = 0  # adapters packed by engine.models.set_adapter_stack

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the embedding matrix when embeddings are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        adapter_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids [T] int64; cu_seqlens [B+1] int32; max_seqlen host int;
        adapter_ids: optional [T] int32, the LoRA adapter of each token among those packed by
        ``engine.models.set_adapter_stack`` (-1: base model; inference only).
        Returns hidden states [T, hidden_size] after the final norm, in the model's dtype."""
        check_packed_inputs(input_ids, position_ids, cu_seqlens, max_seqlen, self.config.vocab_size,
                            self.embed.weight.device, check_values=self.validate_inputs)
        if adapter_ids is not None:
            check_adapter_ids(adapter_ids, input_ids.shape[0], self.num_adapters, self.embed.weight.device,
                              check_values=self.validate_inputs)
        h = self.embed(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, adapter_ids)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] in the model's dtype. Materialises the full logits:
        for tests and small inputs only."""
        return F.linear(hidden, self.lm_head_weight)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers after the parameters were materialised."""
        self.rope.reset_buffers()


def check_packed_inputs(input_ids, position_ids, cu_seqlens, max_seqlen, vocab_size, device, *, check_values=True):
    """Raise ValueError naming the argument when a packed batch is malformed."""
    for name, t, dtype in (("input_ids", input_ids, torch.int64), ("position_ids", position_ids, torch.int64),
                           ("cu_seqlens", cu_seqlens, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the model on {device}")
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one boundary (0)")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not check_values:
        return
    lens = cu_seqlens.diff()
    # One host read for every value check.
    stats = torch.stack([
        cu_seqlens[0].long(), cu_seqlens[-1].long(),
        (lens < 0).any().long() if lens.numel() else torch.zeros((), dtype=torch.long, device=device),
        lens.max().long() if lens.numel() else torch.zeros((), dtype=torch.long, device=device),
        input_ids.min() if input_ids.numel() else torch.zeros((), dtype=torch.long, device=device),
        input_ids.max() if input_ids.numel() else torch.zeros((), dtype=torch.long, device=device),
    ]).tolist()
    first, last, decreasing, longest, lo, hi = stats
    if first != 0 or decreasing or last != input_ids.numel():
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at len(input_ids)={input_ids.numel()}; "
            f"got first={first}, last={last}"
        )
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")

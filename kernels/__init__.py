"""The op library: fused kernels with a plain-torch reference backend for each op."""
from .fused_ops import rms_norm, rope, silu_mul
from .linear_logprobs import TokenStats, linear_cross_entropy, linear_logprobs, linear_token_loss
from .lora import lora_dropout_mask, lora_linear, lora_linear_multi, pack_lora_adapters
from .paged_attention import append_kv, paged_attention
from .varlen_attention import varlen_attention

__all__ = [
    "TokenStats", "append_kv", "linear_cross_entropy", "linear_logprobs", "linear_token_loss", "lora_dropout_mask",
    "lora_linear", "lora_linear_multi", "pack_lora_adapters", "paged_attention", "rms_norm", "rope", "silu_mul",
    "varlen_attention",
]

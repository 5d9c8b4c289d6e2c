"""The op library: fused kernels with a plain-torch reference backend for each op."""
from .linear_logprobs import TokenStats, linear_cross_entropy, linear_logprobs, linear_token_loss
from .varlen_attention import varlen_attention

__all__ = ["TokenStats", "linear_cross_entropy", "linear_logprobs", "linear_token_loss", "varlen_attention"]

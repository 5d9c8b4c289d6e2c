"""The op library: fused kernels with a plain-torch reference backend for each op."""
from .linear_logprobs import linear_cross_entropy, linear_logprobs
from .varlen_attention import varlen_attention

__all__ = ["linear_cross_entropy", "linear_logprobs", "varlen_attention"]

"""The op library: fused kernels with a plain-torch reference backend for each op."""
from .varlen_attention import varlen_attention

__all__ = ["varlen_attention"]

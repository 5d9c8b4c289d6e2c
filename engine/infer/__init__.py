"""Inference: paged KV cache, continuous batching, sampling (see model.py)."""
from .cache import BlockAllocator, KVCache
from .forward import StepBatch, forward_with_cache
from .model import InferenceModel
from .sampling import sample_tokens
from .types import Future, SampledSequence, SampleResponse, SamplingParams

__all__ = ["BlockAllocator", "Future", "InferenceModel", "KVCache", "SampleResponse", "SampledSequence",
           "SamplingParams", "StepBatch", "forward_with_cache", "sample_tokens"]

"""Inference: paged KV cache, continuous batching, sampling (core.py walks one request through)."""
from .cache import BlockAllocator, KVCache
from .cuda_graphs import DecodeGraphs, pad_decode_inputs
from .forward import StepBatch, forward_with_cache
from .model import InferenceModel, serve_tp
from .sampling import sample_tokens
from .types import Future, SampledSequence, SampleResponse, SamplingParams

__all__ = ["BlockAllocator", "DecodeGraphs", "Future", "InferenceModel", "KVCache", "SampleResponse", "SampledSequence",
           "SamplingParams", "StepBatch", "forward_with_cache", "pad_decode_inputs",
           "sample_tokens", "serve_tp"]

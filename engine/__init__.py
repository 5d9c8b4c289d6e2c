"""A kernel-level engine to train and sample Llama/Qwen-family models."""
__version__ = "0.1.0"

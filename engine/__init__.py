"""A kernel-level engine to train and sample Llama/Qwen-family models."""
__version__ = "0.1.0"

_API = ("AdamParams", "ClientFuture", "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "Future",
        "GetInfoResponse", "GetServerCapabilitiesResponse", "ModelBuilder", "ModelData", "ModelInput",
        "OptimStepOutput", "OptimStepResponse", "SamplingClient", "SaveWeightsForSamplerResponse",
        "SaveWeightsResponse", "ServiceClient", "SupportedModel", "TensorData", "TrainingModel", "model",
        "register_model")
_INFER = ("InferenceModel", "SampleResponse", "SampledSequence", "SamplingParams")


def __getattr__(name):
    # Imported on first use so ``python -m engine --help`` does not pay for torch.
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _INFER:
        from . import infer

        return getattr(infer, name)
    if name == "types":  # ``from engine import types`` in place of ``from tinker import types``
        from .api import types

        return types
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = list(_API + _INFER)

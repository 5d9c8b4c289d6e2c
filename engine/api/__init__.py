"""What users call: the model builder, TrainingModel, sampling clients, futures, the data
types (``engine.types``: Tinker's ``tinker.types`` names) and ``ServiceClient`` (Tinker's,
in-process)."""
from .builder import ModelBuilder, model, register_model
from .sampling import ClientFuture, SamplingClient
from .service import ServiceClient
from .training import TrainingModel
from .types import (AdamParams, Datum, EncodedTextChunk, ForwardBackwardOutput, Future, GetInfoResponse,
                    GetServerCapabilitiesResponse, ModelData, ModelInput, OptimStepOutput, OptimStepResponse,
                    SaveWeightsForSamplerResponse, SaveWeightsResponse, SupportedModel, TensorData)

__all__ = ["AdamParams", "ClientFuture", "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "Future",
           "GetInfoResponse", "GetServerCapabilitiesResponse", "ModelBuilder", "ModelData", "ModelInput",
           "OptimStepOutput", "OptimStepResponse", "SamplingClient", "SaveWeightsForSamplerResponse",
           "SaveWeightsResponse", "ServiceClient", "SupportedModel", "TensorData", "TrainingModel", "model",
           "register_model"]

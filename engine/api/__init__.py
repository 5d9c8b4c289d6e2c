"""What users call: the model builder, TrainingModel, sampling clients, futures and the data
types (``engine.types``: Tinker's ``tinker.types`` names)."""
from .builder import ModelBuilder, model, register_model
from .sampling import ClientFuture, SamplingClient
from .training import TrainingModel
from .types import (AdamParams, Datum, EncodedTextChunk, ForwardBackwardOutput, Future, GetInfoResponse, ModelData,
                    ModelInput, OptimStepOutput, OptimStepResponse, SaveWeightsForSamplerResponse, SaveWeightsResponse,
                    TensorData)

__all__ = ["AdamParams", "ClientFuture", "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "Future",
           "GetInfoResponse", "ModelBuilder", "ModelData", "ModelInput", "OptimStepOutput", "OptimStepResponse",
           "SamplingClient", "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "TensorData", "TrainingModel",
           "model", "register_model"]

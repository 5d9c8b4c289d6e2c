"""What users call: the model builder, TrainingModel, futures and the data types."""
from .builder import ModelBuilder, model, register_model
from .training import TrainingModel
from .types import AdamParams, Datum, ForwardBackwardOutput, Future, ModelInput, OptimStepOutput

__all__ = ["AdamParams", "Datum", "ForwardBackwardOutput", "Future", "ModelBuilder", "ModelInput",
           "OptimStepOutput", "TrainingModel", "model", "register_model"]

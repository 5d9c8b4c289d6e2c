"""Data types of the training and sampling API, shaped after Tinker's SDK (``tinker.types``)
so a recipe ports by changing only its client construction: ``from engine import types``
stands for ``from tinker import types``.

Objects of Tinker's own types are accepted by duck typing (no dependency on it): a model
input with ``to_ints()`` or ``chunks`` of ``tokens``, loss inputs with ``to_torch()``,
``to_numpy()``, ``tolist()`` or ``.data``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from engine.infer.scheduler import as_token_ids
# Re-exported, so this module holds every type a Tinker recipe names (``from engine import types``).
from engine.infer.types import Future, SampledSequence, SampleResponse, SamplingParams  # noqa: F401


@dataclass
class EncodedTextChunk:
    """A run of token ids inside a ModelInput (Tinker's chunk type for text)."""

    tokens: list[int]
    type: str = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ModelInput:
    """The token ids of one sequence: ``ModelInput(tokens)``, ``ModelInput.from_ints(tokens)``
    or, as Tinker writes it, ``ModelInput(chunks=[EncodedTextChunk(tokens=...), ...])`` (text
    chunks only: image inputs are not supported). ``append(chunk)`` / ``append_int(t)`` return
    a new ModelInput; ``chunks`` is one text chunk of all the tokens."""

    def __init__(self, tokens: Sequence[int] | None = None, *, chunks: Sequence[Any] | None = None):
        if tokens is not None and chunks is not None:
            raise ValueError("give ModelInput tokens or chunks, not both")
        if chunks is not None:
            tokens = [t for i, c in enumerate(chunks) for t in _chunk_tokens(c, where=f"chunks[{i}]")]
        # Checked where it is used (a float id fails that call's future, naming the datum).
        self.tokens = list(tokens) if tokens is not None else []

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        """Ints only: a float (even 2.0) or a bool is refused, never truncated."""
        return cls(as_token_ids(tokens, where="tokens"))

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls([])

    def to_ints(self) -> list[int]:
        return list(self.tokens)

    @property
    def chunks(self) -> list[EncodedTextChunk]:
        return [EncodedTextChunk(list(self.tokens))]

    @property
    def length(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, chunk: Any) -> "ModelInput":
        return ModelInput(self.tokens + _chunk_tokens(chunk, where="chunk"))

    def append_int(self, token: int) -> "ModelInput":
        return ModelInput(self.tokens + as_token_ids([token], where="token"))

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelInput) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"ModelInput(tokens={self.tokens!r})"


def _chunk_tokens(chunk: Any, *, where: str) -> list[int]:
    if not hasattr(chunk, "tokens"):
        raise ValueError(f"{where}: a chunk of type {type(chunk).__name__} has no tokens "
                         f"(only text chunks are supported, not image inputs)")
    return as_token_ids(chunk.tokens, where=f"{where}.tokens")


_WIRE = {"float32": torch.float32, "int64": torch.int64}


class TensorData:
    """A tensor as Tinker hands one over (``tinker.TensorData``'s interface, without the
    dependency): ``to_torch()``, ``to_numpy()``, ``tolist()``, ``data`` (flat list), ``dtype``
    ("float32" or "int64", Tinker's two) and ``shape`` (list); made by ``from_torch``,
    ``from_numpy`` or ``TensorData(data=..., dtype=..., shape=...)``. Holds one CPU tensor:
    floating dtypes are widened or narrowed to float32, integers and bools to int64."""

    __slots__ = ("_tensor",)

    def __init__(self, data: Any = None, dtype: str | None = None, shape: Sequence[int] | None = None):
        if dtype not in _WIRE:
            raise ValueError(f"TensorData dtype must be 'float32' or 'int64', got {dtype!r}")
        t = torch.as_tensor(np.asarray([] if data is None else data), dtype=_WIRE[dtype])
        self._tensor = t.reshape(list(shape)) if shape is not None else t

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> "TensorData":
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"TensorData.from_torch needs a real torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu()
        out = cls.__new__(cls)
        out._tensor = t.float() if t.is_floating_point() else t.long()
        return out

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "TensorData":
        array = np.asarray(array)
        if array.dtype.kind not in "fiub":
            raise ValueError(f"TensorData.from_numpy needs numbers, got a numpy array of {array.dtype}")
        return cls.from_torch(torch.from_numpy(np.ascontiguousarray(array)))

    @property
    def dtype(self) -> str:
        return "float32" if self._tensor.is_floating_point() else "int64"

    @property
    def shape(self) -> list[int]:
        return list(self._tensor.shape)

    @property
    def data(self) -> list:
        return self._tensor.reshape(-1).tolist()

    def to_torch(self) -> torch.Tensor:
        return self._tensor

    def to_numpy(self) -> np.ndarray:
        return self._tensor.numpy()

    def tolist(self) -> list:
        return self._tensor.tolist()

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape})"


def as_tensor_data(value: Any) -> Any:
    """A loss input as Tinker's Datum stores it: a torch tensor, numpy array or list of
    numbers becomes a TensorData (keeping float or int: a float token id is refused later,
    never truncated here); anything else (a TensorData, a value that holds no numbers) is
    kept as given, for the training call to accept or refuse naming the datum and key."""
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value) if not value.is_complex() and value.dtype != torch.bool else value
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return value
        return TensorData.from_numpy(array) if array.dtype.kind in "fiu" else value
    return value


def as_ints(model_input: Any, *, where: str = "model_input") -> list[int]:
    """Token ids of a ModelInput, a Tinker ModelInput (``to_ints`` or ``chunks``), or a
    sequence: ints only (``as_token_ids``: a float, even 2.0, is refused, never truncated)."""
    if hasattr(model_input, "chunks") and not hasattr(model_input, "to_ints"):
        for chunk in model_input.chunks:
            if not hasattr(chunk, "tokens"):
                raise ValueError(f"{where}: chunk of type {type(chunk).__name__} has no tokens (only text chunks are supported)")
    elif not isinstance(model_input, (list, tuple, np.ndarray, torch.Tensor)) and not hasattr(model_input, "to_ints"):
        raise ValueError(f"{where} must be a ModelInput, a list of token ids or an object with to_ints(), "
                         f"got {type(model_input).__name__}")
    return as_token_ids(model_input, where=where)


def as_tensor(value: Any, *, where: str) -> torch.Tensor:
    """A 1-D CPU tensor of numbers from a list, numpy array, torch tensor or Tinker TensorData."""
    try:
        t = _to_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where} must hold numbers, one per token ({type(e).__name__}: {e})") from None
    if t is None:
        raise ValueError(f"{where} must be a list, numpy array or torch tensor, got {type(value).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{where} must be 1-D (one value per token), got shape {tuple(t.shape)}")
    return t


def _to_tensor(value: Any) -> torch.Tensor | None:
    """``value`` as a tensor; None for a type that holds no array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "to_torch"):
        return value.to_torch()
    if hasattr(value, "to_numpy"):
        return torch.from_numpy(np.asarray(value.to_numpy()))
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return torch.tensor(value)
    if hasattr(value, "tolist"):
        return torch.tensor(value.tolist())
    if hasattr(value, "data"):
        return torch.tensor(value.data)
    return None


@dataclass
class Datum:
    """One training sequence: ``model_input`` (N tokens) and ``loss_fn_inputs``, a dict of
    per-token arrays of length N; position i of ``target_tokens`` is the token that follows
    position i of the input. As in Tinker, arrays given as torch tensors, numpy arrays or
    lists are stored as :class:`TensorData` (``datum.loss_fn_inputs["weights"].to_torch()``)."""

    model_input: Any
    loss_fn_inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.loss_fn_inputs, dict):
            self.loss_fn_inputs = {k: as_tensor_data(v) for k, v in self.loss_fn_inputs.items()}


@dataclass
class AdamParams:
    """AdamW hyperparameters for one ``optim_step`` (torch.optim.AdamW semantics);
    ``grad_clip_norm`` > 0 clips the global gradient norm first."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class ForwardBackwardOutput:
    """``loss_fn_outputs``: one dict per datum of :class:`TensorData` (``logprobs`` [N]
    float32 of the target tokens, or ``values`` [N] for a scoring model); ``metrics``:
    ``loss:sum`` and batch counters."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "ArrayRecord"

    @property
    def loss(self) -> float:
        return self.metrics["loss:sum"]


@dataclass
class OptimStepOutput:
    metrics: dict[str, float]


OptimStepResponse = OptimStepOutput  # Tinker's name


@dataclass
class SaveWeightsResponse:
    """What ``save_state`` returns: ``path``, the absolute folder written. A path-like
    object, so ``Path(result)`` and ``load_state(result)`` take it as it is."""

    path: str
    type: str = "save_weights"

    def __fspath__(self) -> str:
        return self.path


@dataclass
class SaveWeightsForSamplerResponse(SaveWeightsResponse):
    """What ``save_weights_for_sampler`` returns: ``path``, the folder written (a PEFT
    adapter, or a Hugging Face model folder); path-like, for ``create_sampling_client``."""

    type: str = "save_weights_for_sampler"


@dataclass
class ModelData:
    """arch: the Hugging Face architecture (config.json's ``architectures[0]``);
    model_name: the name the model was built from; tokenizer_id: the folder its tokenizer
    loads from (``AutoTokenizer.from_pretrained``), None when it ships none."""

    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass
class SupportedModel:
    """One model of ``ServiceClient.get_server_capabilities()``: the ``base_model`` name,
    its context length, and whether clients may train on it and sample it."""

    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


@dataclass
class GetServerCapabilitiesResponse:
    supported_models: list[SupportedModel]


@dataclass
class GetInfoResponse:
    """``TrainingModel.get_info()``: Tinker's fields (``model_id``, ``model_data``,
    ``is_lora``, ``lora_rank``, ``model_name``), then this engine's: the optimizer ``step``,
    ``tp``, ``dp``, ``dtype``, ``device``, ``max_batch_size``, the checkpoint ``path`` and
    ``model_type``, ``scoring_model``, ``lora`` (rank, alpha, target_modules) or None,
    parameter counts, ``activation_checkpointing`` and ``master_weights`` (fp32 masters of
    bf16/fp16 trained weights)."""

    model_id: str
    model_data: ModelData
    is_lora: bool
    lora_rank: int | None
    model_name: str
    step: int
    tp: int
    dtype: str
    device: str
    max_batch_size: int
    path: str
    model_type: str
    scoring_model: bool
    lora: dict | None
    parameters: int
    trainable_parameters: int
    activation_checkpointing: bool
    master_weights: bool = False
    type: str = "get_info"
    dp: int = 1

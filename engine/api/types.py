"""Data types of the training API, shaped after Tinker's SDK so recipes port with few changes.

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
from engine.infer.types import Future  # noqa: F401 - re-exported: one future type for training and sampling


@dataclass
class ModelInput:
    """The token ids of one sequence."""

    tokens: list[int]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        """Ints only: a float (even 2.0) or a bool is refused, never truncated."""
        return cls(as_token_ids(tokens, where="tokens"))

    def to_ints(self) -> list[int]:
        return list(self.tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


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
    position i of the input."""

    model_input: Any
    loss_fn_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdamParams:
    """AdamW hyperparameters for one ``optim_step`` (torch.optim.AdamW semantics);
    ``grad_clip_norm`` > 0 clips the global gradient norm first."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class ForwardBackwardOutput:
    """``loss_fn_outputs``: one dict per datum (``logprobs`` [N] float32, or ``values`` for
    a scoring model); ``metrics``: ``loss:sum`` and batch counters."""

    loss_fn_outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.metrics["loss:sum"]


@dataclass
class OptimStepOutput:
    metrics: dict[str, float]

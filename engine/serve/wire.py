"""Tinker's wire formats <-> the engine's types.

The SDK (``tinker`` 0.38) sends ``forward_backward`` as ``application/x-protobuf`` and
wants ``ForwardBackwardOutput`` and ``SampleResponse`` results back as protobuf (the schema
ships in the SDK: ``tinker.proto.tinker_public_pb2``); every other body is JSON shaped like
the SDK's pydantic types, read here as plain dicts. Each decoder raises ``ValueError``
naming the field at fault, which the server turns into a failed future (category user).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from engine.infer import SampleResponse, SamplingParams

PROTOBUF = "application/x-protobuf"
_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_STOP = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


@dataclass
class ForwardBackwardCall:
    """One decoded ``forward_backward`` (or, with ``forward_only``, ``forward``) chunk."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    forward_only: bool
    data: list[tuple[list[int], dict[str, torch.Tensor]]]  # (tokens [N], {name: [N] or [N, ...]})


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """A ``ForwardBackwardRequest`` protobuf: model id, seq id, loss and data."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise ValueError(f"forward_backward body is not a ForwardBackwardRequest protobuf ({e})") from None
    config: dict[str, float] = {k: v for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.HasField("text"):
            raise ValueError(f"loss_fn_config[{key!r}] is the string {value.text!r}; this server takes numbers only")
        config[key] = value.number
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise ValueError(f"data[{i}].model_input.chunks[{j}] is a {kind or 'empty'} chunk; "
                                 "this server takes token chunks (encoded_text) only")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        inputs = {name: tensor_from_proto(t, where=f"data[{i}].loss_fn_inputs[{name!r}]")
                  for name, t in datum.loss_fn_inputs.items()}
        data.append((tokens, inputs))
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.loss_fn, config or None, msg.forward_only, data)


def tensor_from_proto(msg, *, where: str) -> torch.Tensor:
    """A public ``Tensor`` message (dense, or sparse CSR made dense) as a CPU tensor."""
    if msg.dtype not in _NUMPY:
        raise ValueError(f"{where}: unsupported dtype {pb.DType.Name(msg.dtype)}; send float32 or int64")
    dtype = _NUMPY[msg.dtype]
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise ValueError(f"{where}: sparse CSR tensor of shape {shape} with {len(crow)} row pointers and "
                             f"{len(col)} columns for {len(values)} values is inconsistent")
        return torch.sparse_csr_tensor(torch.from_numpy(crow.copy()), torch.from_numpy(col.copy()),
                                       torch.from_numpy(values.copy()), size=shape,
                                       check_invariants=True).to_dense()  # indices come from the network
    array = np.frombuffer(msg.dense, dtype=dtype).copy()
    if not shape and array.size == 1:  # a number for the whole datum (e.g. a clip threshold)
        return torch.from_numpy(array.reshape(()))
    if shape:
        if math.prod(shape) != array.size:
            raise ValueError(f"{where}: shape {shape} does not match its {array.size} values")
        array = array.reshape(shape)
    return torch.from_numpy(array)


def encode_forward_backward_output(loss_fn_outputs: list[dict[str, Any]], metrics: dict[str, float]) -> bytes:
    """``ForwardBackwardOutput`` protobuf: one ArrayRecord whose fields batch every datum's
    arrays (float32 or int64 bytes back to back, byte offsets per datum)."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(loss_fn_outputs))
    names = sorted({name for out in loss_fn_outputs for name in out})
    for name in names:
        arrays = [_array(out[name]) for out in loss_fn_outputs]
        kind = np.int64 if all(a.dtype.kind in "iub" for a in arrays) else np.float32
        arrays = [a.astype(kind) for a in arrays]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
        record.fields[name].CopyFrom(pb.BatchedTensor(
            data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(),
            dtype=pb.DTYPE_INT64 if kind is np.int64 else pb.DTYPE_FLOAT32,
            trailing_shape=list(arrays[0].shape[1:]) if arrays else []))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=with_reductions(metrics))
    out.loss_fn_outputs.append(record)
    return out.SerializeToString()


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "to_torch"):  # a TensorData-like output
        value = value.to_torch()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def with_reductions(metrics: dict[str, float]) -> dict[str, float]:
    """Tinker's metric names carry their reduction (``loss:sum``); the SDK splits on ':' to
    combine chunks, so a bare name gets ``:mean``."""
    return {(k if ":" in k else f"{k}:mean"): float(v) for k, v in metrics.items()}


def encode_sample_response(response: SampleResponse) -> bytes:
    """``SampleResponse`` protobuf: tokens int32, logprobs float32, prompt logprobs float32
    with NaN where there is none (position 0)."""
    msg = pb.SampleResponse()
    for seq in response.sequences:
        msg.sequences.append(pb.SampledSequence(
            stop_reason=_STOP[seq.stop_reason], tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(_array(seq.logprobs), dtype=np.float32).tobytes()))
    if response.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in response.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return msg.SerializeToString()


def model_input_tokens(model_input: Any, *, where: str) -> list[int]:
    """Token ids of a JSON ``ModelInput`` (``{"chunks": [{"type": "encoded_text", "tokens": [...]}]}``)."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise ValueError(f"{where} must be a ModelInput object with a list of chunks")
    tokens: list[int] = []
    for j, chunk in enumerate(model_input["chunks"]):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text" or not isinstance(chunk.get("tokens"), list):
            raise ValueError(f"{where}.chunks[{j}] is a {kind} chunk; this server takes token chunks "
                             "(encoded_text) only")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in chunk["tokens"]):
            raise ValueError(f"{where}.chunks[{j}].tokens must be ints")
        tokens += chunk["tokens"]
    return tokens


def sampling_params(params: Any, *, prompt_len: int, context: int, eos: int | None) -> SamplingParams:
    """The engine's SamplingParams from Tinker's JSON ones: ``max_tokens`` None fills the
    context; EOS ends a sequence as well as ``stop`` (ids or strings) unless ``stop`` is
    ``[]``, which stops at nothing (Tinker's rule)."""
    if not isinstance(params, dict):
        raise ValueError("sampling_params must be an object")
    max_tokens = params.get("max_tokens")
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"sampling_params.max_tokens must be a positive int or null, got {max_tokens!r}"
                         + (f" (the prompt of {prompt_len} tokens fills the context of {context})" if room < 1 else ""))
    stop = params.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if (params.get("stop") is None or stop) and eos is not None and eos not in stop:
        stop.append(eos)  # as vLLM: EOS ends a sequence unless stop=[] says otherwise
    return SamplingParams(max_tokens=max_tokens, temperature=params.get("temperature", 1.0),
                          top_k=params.get("top_k", -1), top_p=params.get("top_p", 1.0), stop=stop,
                          seed=params.get("seed"))

"""Tensor parallelism on torch.distributed (DESIGN.md, "Parallelism"), applied to a built
model from outside (``engine.models`` knows nothing of it).

``load_tp_model(path, group)`` loads one rank's shard of a checkpoint (see
``tensor_parallel.py`` for what is split how). The parallel modules that run the
collectives live in ``modules.py``: ``ColumnParallelLinear`` / ``RowParallelLinear``
(``LoRALinear`` subclasses, so adapters train, export and serve on the shards) and
``VocabParallelEmbedding``; ``parallelize`` puts them in place of a model's own and
records the group, which ``tp_group(model)`` returns to the LM head's
``kernels.linear_logprobs(..., process_group=)`` and to engine/infer and engine/train.
``WorkerPool`` runs one process per rank from the caller's process (``RayWorkerPool``: one Ray
actor per rank, on any node of a Ray cluster; ``start_pool`` picks); ``init_distributed()``
is the entry for ranks that ``torchrun`` launched, and ``shutdown()`` their exit. Nothing
of the engine keeps a process group alive (``kernels.collectives.GroupRef``): torch owns
them, so ``shutdown()`` frees them and joins gloo's threads before the interpreter exits. With ``group=None`` (tp=1) nothing of this is installed: the model is exactly
``engine.models.load_model``'s.

Composing with data parallelism (several machines): build a 2-D device mesh
``init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))`` and give
``mesh["tp"].get_group()`` to the model; the gradients of every parameter are then
averaged over ``mesh["dp"].get_group()`` once per optimizer step (each rank's shard over
its dp peers only). Keep tp inside a machine (NVLink) and dp across machines. Traffic,
per token, for hidden size H and activations of b bytes:
  * tp: each layer all-reduces two [tokens, H] activations in the forward (after o and
    down) and two in the backward (the inputs of qkv and gate_up), each all-reduce moving
    2·(tp-1)/tp·H·b bytes per rank in a ring: 8·(tp-1)/tp·H·b bytes per token and layer
    for forward + backward; plus one [tokens, H] all-reduce for the embedding, and a few
    float32 [tokens] all-reduces for the vocabulary-parallel logprobs (never logits).
  * dp: independent of tokens: 2·(dp-1)/dp of this rank's parameter (or adapter) bytes
    per optimizer step.
For Llama-3-8B (H = 4096, bf16, 32 layers) at tp = 2 that is 1 MiB per token per step for
tp, against 2·(dp-1)/dp × 8 GB per step for full-weight dp (tens of MB for a LoRA adapter).
"""
from .modules import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, parallelize, tp_group
from .mesh import check_layout, mesh_groups
from .ray_workers import LAUNCHERS, RayWorkerPool, start_pool
from .tensor_parallel import (build_tp_model, check_tp, full_state, gather_vocab, load_tp_model, shard_entries,
                              shard_param, shard_tensor, unshard_param, vocab_slice)
from .workers import RankContext, WorkerError, WorkerPool, init_distributed, shutdown

__all__ = [
    "LAUNCHERS", "ColumnParallelLinear", "RankContext", "RayWorkerPool", "RowParallelLinear", "VocabParallelEmbedding", "WorkerError", "WorkerPool",
    "build_tp_model", "check_layout", "check_tp", "full_state", "gather_vocab", "init_distributed", "load_tp_model",
    "mesh_groups", "parallelize", "shard_entries", "shard_param", "shard_tensor", "shutdown", "tp_group",
    "start_pool", "unshard_param", "vocab_slice",
]

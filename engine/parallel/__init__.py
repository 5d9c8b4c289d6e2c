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
them, so ``shutdown()`` frees them and joins gloo's threads before the interpreter exits.
With ``group=None`` (tp=1) nothing of this is installed: the model is exactly
``engine.models.load_model``'s.

Data × tensor parallelism (``engine.model(p).tp(t).dp(d)``, or ``init_distributed(tp=t)``
under torchrun): the world forms a ``(dp, tp)`` DeviceMesh (``mesh.py``); the model is split
over ``mesh["tp"]``'s group and replicated over ``mesh["dp"]``'s. Each replica trains on
its token-balanced share of every batch; gradients are summed over dp once per optimizer
step, and the optimizer state is sharded over dp (ZeRO-1: each parameter's AdamW moments
live on one owner replica, which steps it and broadcasts it, the fp32 master of a bf16
parameter under master weights, which every replica then rounds alike; engine/train/data_parallel.py).
Keep tp inside a machine (NVLink) and dp across machines.

Why ZeRO-1 and not FSDP2 (``fully_shard`` on ``mesh["dp"]``): FSDP2's forward and backward
do run on the tensor-parallel modules (CPU, gloo, torch 2.13: tried), but it does not
compose with the rest of them. (1) ``fully_shard`` replaces every Parameter with a new
DTensor one: the gradient hooks the tp modules put on the originals (``summed_grad`` on
Qwen3's q/k norms and on a LoRA adapter's replicated factor) and their ``tp_sharded`` marks
are dropped, silently (tried: the hook no longer fires), so those gradients would be wrong.
(2) FSDP2 all-gathers in every forward and reduce-scatters in every backward, so every dp
rank must run the same number of micro-batches, which token-balanced shares (and an empty
share) do not give. (3) The inflight sampler, LoRA export and the fused LM-head kernel read
the trainer's plain local weights. ZeRO-1 keeps plain tensors and one collective per step;
its cost is full weights and gradients on every replica (parameters and gradients are not
sharded over dp).

Traffic, per token, for hidden size H and activations of b bytes:
  * tp: each layer all-reduces two [tokens, H] activations in the forward (after o and
    down) and two in the backward (the inputs of qkv and gate_up), each all-reduce moving
    2·(tp-1)/tp·H·b bytes per rank in a ring: 8·(tp-1)/tp·H·b bytes per token and layer
    for forward + backward; plus one [tokens, H] all-reduce for the embedding, and a few
    float32 [tokens] all-reduces for the vocabulary-parallel logprobs (never logits).
  * dp: independent of tokens, per optimizer step: an all-reduce of this rank's gradients
    (2·(dp-1)/dp of its parameter or adapter bytes, in float32) and the owners'
    broadcasts of the stepped parameters ((dp-1)/dp of them).
For Llama-3-8B (H = 4096, bf16, 32 layers) at tp = 2 that is 1 MiB per token per step for
tp, against 2·(dp-1)/dp × 32 GB (float32 gradients) per step for full-weight dp (tens of MB
for a LoRA adapter).
"""
from .modules import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, parallelize, tp_group
from .mesh import check_layout, mesh_groups
from .ray_workers import LAUNCHERS, RayWorkerPool, start_pool
from .tensor_parallel import (build_tp_model, check_tp, full_state, gather_vocab, load_tp_model, shard_entries,
                              shard_param, shard_tensor, unshard_param, vocab_slice)
from .workers import RankContext, WorkerError, WorkerPool, init_distributed, shutdown

__all__ = [
    "LAUNCHERS", "ColumnParallelLinear", "RankContext", "RayWorkerPool", "RowParallelLinear", "VocabParallelEmbedding",
    "WorkerError", "WorkerPool",
    "build_tp_model", "check_layout", "check_tp", "full_state", "gather_vocab", "init_distributed", "load_tp_model",
    "mesh_groups", "parallelize", "shard_entries", "shard_param", "shard_tensor", "shutdown", "tp_group",
    "start_pool", "unshard_param", "vocab_slice",
]

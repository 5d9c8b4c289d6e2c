"""Memory checked at spawn (CUDA only): a run that cannot hold one micro-batch of
``max_batch_size`` tokens fails when it is created, not at its first large batch.

``check_training_memory(trainer)`` allocates AdamW's state (zeros at step 0: the optimizer
then behaves exactly as if it had allocated them at its first step) and runs forward and
backward of dummy micro-batches, then drops their gradients. The largest micro-batch that
fits is estimated from two small probes rather than found by bisection: the memory a
micro-batch takes beyond the weights and the optimizer state is affine in its token count
(packed batches carry no padding; varlen attention stores O(T), not O(T^2); the fused
LM-head loss walks the vocabulary in chunks of a fixed number of tokens' logits), so
``peak(T) = a + b * T`` with ``a`` the fixed workspaces. Probing ``T1 < T2`` tokens gives
``a`` and ``b``; the largest ``T`` with ``a + b * T`` inside the budget is the answer, and
two short probes cost less than the tries a bisection needs, each of which may end in an
out-of-memory that fragments the allocator's cache. Under tensor and data parallelism the
ranks run the probes together (they are collectives; each dp replica gets a micro-batch of
the probe's size) and agree on the smallest answer, so they all pass or all raise alike.
When ``max_batch_size`` is larger than the probes, one full micro-batch then runs to
confirm it.

The budget is what the caching allocator holds now plus ``HEADROOM`` of the device's free
memory (the rest is for the CUDA context's growth, NCCL's buffers and fragmentation).
The memory the probes reserve stays in torch's cache, held for the training that follows.
Not probed: the optimizer step's temporaries (foreach AdamW: about one fp32 copy of the
trained parameters), which come after the micro-batches' activations are freed and are
smaller than them but for tiny max_batch_size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

HEADROOM = 0.95
PROBE_TOKENS = 1024  # the larger probe; the smaller is a quarter of it
DUMMY_SEQUENCE = 4096  # dummy micro-batches are packed sequences of at most this many tokens


def init_optimizer_state(trainer) -> None:
    """AdamW's moments, allocated now as AdamW's lazy initialisation would at its first step
    (torch.optim.adam's ``_init_group``: zeros like the parameter; ``step`` a 0-dim zero, on
    the host unless the group is fused or capturable)."""
    if trainer.optimizer is None:  # a dp replica that owns no parameter (ZeRO-1)
        return
    group = trainer.optimizer.param_groups[0]
    on_device = bool(group.get("fused") or group.get("capturable"))
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") else torch.float32
    for p in group["params"]:  # the parameters (masters) this replica steps
        if p not in trainer.optimizer.state:
            trainer.optimizer.state[p] = {
                "step": torch.zeros((), dtype=scalar, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _dummy(trainer, tokens: int):
    """(data, loss) of one micro-batch of ``tokens`` tokens in sequences of DUMMY_SEQUENCE
    (memory is the same as one long sequence's; attention's compute stays bounded)."""
    ids = torch.randint(0, trainer.vocab, (tokens + 1,), generator=torch.Generator().manual_seed(tokens))
    data = []
    for start in range(0, tokens, DUMMY_SEQUENCE):
        n = min(DUMMY_SEQUENCE, tokens - start)
        seq = ids[start:start + n + 1]
        if trainer.value_head is not None:
            data.append((seq[:-1].tolist(), {"target_values": torch.zeros(n), "weights": torch.ones(n)}))
        else:
            data.append((seq[:-1].tolist(), {"target_tokens": seq[1:], "weights": torch.ones(n)}))
    return data, "mse" if trainer.value_head is not None else "cross_entropy"


def _peak(trainer, tokens: int) -> int:
    """Bytes allocated above the current level at the peak of one forward/backward."""
    device = trainer.device
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    data, loss = _dummy(trainer, tokens)
    try:  # every dp replica takes one copy's worth: the copies split alike over the replicas
        trainer.run(data * trainer.dp, loss, None, True)
    finally:
        trainer.drop_gradients()
    return torch.cuda.max_memory_allocated(device) - base


def _agree_min(trainer, value: int) -> int:
    """The smallest ``value`` over the mesh (tp, then dp)."""
    t = torch.tensor([value], dtype=torch.int64, device=trainer.device)
    for group in (trainer.group, trainer.dp_group):
        if group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_training_memory(trainer) -> dict:
    """Make sure one micro-batch of ``trainer.max_batch_size`` tokens fits on the GPU, with
    the optimizer state allocated. Returns the measurements ({"bytes_per_token",
    "fixed_bytes", "largest_max_batch_size"}); raises ``torch.cuda.OutOfMemoryError`` with
    the largest max_batch_size that fits when it does not. CPU: nothing to check ({})."""
    if trainer.device.type != "cuda":
        return {}
    device, wanted = trainer.device, trainer.max_batch_size
    rng = torch.cuda.get_rng_state(device)  # LoRA dropout in the probes must not shift the run's randomness
    try:
        init_optimizer_state(trainer)
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * HEADROOM) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        big = min(wanted, PROBE_TOKENS)
        small = max(1, big // 4)
        try:
            p_small = _peak(trainer, small) if small < big else None
            p_big = _peak(trainer, big)
        except torch.cuda.OutOfMemoryError as e:
            raise torch.cuda.OutOfMemoryError(
                f"max_batch_size={wanted}: even a probe micro-batch of {big if small >= big else small} tokens runs "
                f"out of GPU memory on {device} after the weights and the optimizer state "
                f"({_gib(torch.cuda.memory_allocated(device))} allocated); use more GPUs (tp), LoRA, "
                f"activation_checkpointing() or a smaller model ({e})") from None
        per_token = max(1.0, (p_big - p_small) / (big - small)) if p_small is not None else p_big / big
        fixed = max(0.0, p_big - per_token * big)
        largest = _agree_min(trainer, max(0, int((budget - fixed) / per_token)))
        facts = (f"one micro-batch takes about {_gib(fixed)} + {per_token / 2**20:.3f} MiB per token beyond the "
                 f"weights and optimizer state ({_gib(torch.cuda.memory_allocated(device))}), with "
                 f"{_gib(budget)} available on {device}")
        if wanted > largest:
            raise torch.cuda.OutOfMemoryError(
                f"max_batch_size={wanted} does not fit: {facts}; the largest max_batch_size that fits is about "
                f"{largest} (or use activation_checkpointing(), LoRA or more GPUs)")
        if wanted > big:
            try:
                _peak(trainer, wanted)
            except torch.cuda.OutOfMemoryError:
                raise torch.cuda.OutOfMemoryError(
                    f"max_batch_size={wanted} ran out of GPU memory at spawn although the estimate said it fits "
                    f"({facts}); {big} tokens fit: try a max_batch_size between {big} and {int(0.9 * wanted)}") \
                    from None
        return {"bytes_per_token": per_token, "fixed_bytes": fixed, "largest_max_batch_size": largest}
    finally:
        torch.cuda.set_rng_state(rng, device)

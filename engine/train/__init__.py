"""Training internals: losses on per-token statistics, micro-batching, the per-rank step, checkpoints."""
from .batching import check_groups, pack_micro_batches
from .losses import LOSSES, LossSpec, resolve_loss
from .trainer import Trainer, enable_activation_checkpointing

__all__ = ["LOSSES", "LossSpec", "Trainer", "check_groups", "enable_activation_checkpointing", "pack_micro_batches",
           "resolve_loss"]

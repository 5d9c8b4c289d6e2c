"""Training under tensor and data parallelism: one ``Trainer`` per rank in WorkerPool
processes (``dp`` replicas of a ``tp``-way model, engine/train/data_parallel.py).

``RemoteTrainer`` has the Trainer methods the API calls and runs each on every rank (the
ranks execute the same step on their shards; rank 0's answer is returned, every rank's
being equal: replicas exchange their shares' outputs). Data travel to the ranks as token lists and small CPU tensors; the user's
``forward_backward_custom`` function runs in the caller's process between the two fused
passes (``custom_step``), so it need not be picklable. An error raised alike on every rank
fails its call and leaves the ranks usable (engine/parallel/workers.py); a dead rank ends them.
"""
from __future__ import annotations

from engine.models import add_lora
from engine.parallel import load_tp_model, start_pool

from .checkpoint import new_save_id, read_marker, writable_folder
from .memory import check_training_memory
from .trainer import Trainer, custom_step, enable_activation_checkpointing


def setup_rank(ctx, path, dtype, adapter, scoring, activation_checkpointing, max_batch_size,
               master_weights: bool = True) -> Trainer:
    """One rank's Trainer (its shard of the model, its replica's dp group), its memory checked
    on CUDA (every rank together): WorkerPool's setup, and the same call in a script that
    torchrun launched (``ctx = init_distributed(tp=t)``). ``adapter``: None or dict(rank=,
    alpha=, targets=, dropout=, seed=)."""
    model = load_tp_model(path, ctx.group, dtype=dtype, device=ctx.device)
    if adapter is not None:
        add_lora(model, adapter["rank"], adapter["alpha"], adapter["targets"], dropout=adapter["dropout"],
                 seed=adapter["seed"])
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    trainer = Trainer(model, max_batch_size=max_batch_size, scoring=scoring, lora=adapter is not None,
                      master_weights=master_weights, dp_group=ctx.dp_group)
    check_training_memory(trainer)  # CUDA: every rank, together
    return trainer


def _call(trainer, method, *args):
    return getattr(trainer, method)(*args)


class RemoteTrainer:
    def __init__(self, tp: int, path, *, dtype, adapter: dict | None, scoring: bool, activation_checkpointing: bool,
                 max_batch_size: int, vocab: int, master_weights: bool = True, dp: int = 1,
                 launcher: str | None = None):
        self.pool = start_pool(launcher, tp, setup_rank, path, dtype, adapter, scoring, activation_checkpointing,
                               max_batch_size, master_weights, dp=dp)
        self.vocab = vocab
        self.info = self.pool.run(_call, "describe")[0]
        self.signature = self._all("state_signature")
        self.step = self.info["step"]
        self.lora, self.value_head = self.info["lora"], (object() if self.info["scoring"] else None)

    def _all(self, method, *args):
        return self.pool.run(_call, method, *args)[0]

    def run(self, data, loss_fn, loss_fn_config, backward):
        return self._all("run", data, loss_fn, loss_fn_config, backward)

    def forward_backward_custom(self, data, fn):
        if self.value_head is not None:
            raise ValueError("forward_backward_custom needs a language model, not a scoring model")
        return custom_step(lambda d, backward: self._all("run_linear_grad", d, backward), data, fn)

    def optim_step(self, *hyper):
        metrics = self._all("optim_step", *hyper)
        self.step = int(metrics["step"])
        return metrics

    # Paths are checked here, before any rank is involved; the ranks check again (all alike).
    def save_state(self, folder):
        writable_folder(folder)
        return self._all("save_state", folder, new_save_id(self.step))

    def load_state(self, path, with_optimizer):
        read_marker(path, self.signature)
        self._all("load_state", path, with_optimizer)
        self.step = self._all("describe")["step"]

    def save_for_sampler(self, source, folder):
        writable_folder(folder)
        return self._all("save_for_sampler", source, folder)

    def close(self):
        self.pool.close()

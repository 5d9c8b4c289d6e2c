"""The per-rank training step: forward / backward over micro-batches, AdamW, and state.

``Trainer`` owns one model (or one tensor-parallel shard), its optional value head and its
optimizer. It takes data already normalised by the API layer (token lists and float/int
CPU tensors per datum) and returns plain tensors and floats, so the same code runs in the
caller's process (tp=1) and in a WorkerPool rank. With a dp group (replicas of the
model, engine/train/data_parallel.py) each rank runs its share of every batch, the
gradients are summed over the replicas at ``optim_step`` and the optimizer state is
sharded over them (ZeRO-1). With master weights, every replica keeps the fp32 masters (and
their fp32 gradients, summed over dp) of all its parameters; the owner of a parameter steps
its master and sends it to the other replicas, and each replica rounds the masters into the
model alike, so masters and weights stay identical across replicas (the step costs one
broadcast of fp32 masters; AdamW's 8 B per parameter is what ZeRO-1 divides by dp).

Host syncs: one ``.tolist()`` per call at the end (metrics), none per micro-batch; one per
``optim_step`` (the gradient norm, which decides whether the step is taken).

Master weights (``master_weights=True``, the default): a trainable parameter held in bf16
or fp16 gets an fp32 master copy, as Megatron-Core's and torchtitan's mixed precision do.
Each parameter's gradient, the moment autograd has accumulated it, is added into its
master's fp32 gradient and dropped (a post-accumulate-grad hook), so micro-batches and
calls accumulate in fp32; AdamW (fp32 moments) updates the masters, and the model's
weights are then the masters rounded to their dtype. Plain bf16 AdamW instead loses every
update smaller than half a bf16 step of the weight (2^-9 relative): small learning rates
stall, and the loss drifts away from fp32 training (tests/test_master_weights.py).
Memory per trained parameter, bf16 model:

    with master weights:  weight 2 B + master 4 B + gradient 4 B (fp32) + AdamW 8 B = 18 B
    plain bf16:           weight 2 B + gradient 2 B + AdamW 4 B (bf16 moments)       =  8 B
    fp32 model:           weight 4 B + gradient 4 B + AdamW 8 B                       = 16 B

plus, transiently, one parameter's bf16 gradient during the backward. fp32 parameters
(LoRA adapters, which ``add_lora`` keeps in fp32, and the value head) need no master:
they train as they are, so LoRA on a bf16 base costs 2 B per frozen base parameter.
"""
from __future__ import annotations

import math
import numbers
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.models import PackedBatch
from engine.parallel import tp_group
from kernels.collectives import GroupRef

from . import checkpoint as state_io
from . import data_parallel, losses
from .batching import check_groups, pack_micro_batches

Data = list[tuple[list[int], dict[str, torch.Tensor]]]


def _checkpointed(forward, *args):
    return checkpoint(forward, *args, use_reentrant=False)


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward instead of storing them: memory
    of one block's activations per layer becomes one [T, H] input per layer."""
    for block in model.layers:
        block.forward = partial(_checkpointed, block.forward)


def _to_master(master: torch.Tensor, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: move ``param``'s low-precision gradient into ``master``'s
    fp32 one."""
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None


class Trainer:
    def __init__(self, model, *, max_batch_size: int, scoring: bool = False, lora: bool = False,
                 master_weights: bool = True, dp_group=None):
        """``dp_group``: the group of this rank's replicas (data parallelism), held weakly."""
        self.model = model
        self.dp_group_ref = GroupRef(dp_group)
        self.dp = 1 if dp_group is None else torch.distributed.get_world_size(dp_group)
        self.dp_rank = 0 if dp_group is None else torch.distributed.get_rank(dp_group)
        self.max_batch_size = max_batch_size
        self.lora = lora
        self.device = model.embed.weight.device
        self.vocab = model.config.vocab_size
        self.value_head = None
        if scoring:
            # A float32 scalar head on the final hidden states, zero-initialised: the first
            # step's values are 0 and its gradient is the hidden state itself.
            self.value_head = nn.Linear(model.config.hidden_size, 1, device=self.device, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.params = self.named_trainable()
        # What AdamW updates: the fp32 master of a bf16/fp16 parameter, else the parameter.
        self.masters: dict[nn.Parameter, torch.Tensor] = {}
        if master_weights:
            for _, p in self.params:
                if p.dtype != torch.float32:
                    m = p.detach().float().requires_grad_(True)
                    m.tp_sharded = getattr(p, "tp_sharded", False)  # for the global gradient norm
                    p.register_post_accumulate_grad_hook(partial(_to_master, m))
                    self.masters[p] = m
        self.optim_params = [(n, self.masters.get(p, p)) for n, p in self.params]
        # ZeRO-1: this replica's AdamW holds the parameters (masters) it owns (all of them at dp=1).
        self.owner = [0] * len(self.params) if self.dp == 1 else data_parallel.owners(
            data_parallel.agreed_sizes([p for _, p in self.params], self.group), self.dp)
        owned = [p for (_, p), o in zip(self.optim_params, self.owner) if o == self.dp_rank]
        self.optimizer = torch.optim.AdamW(owned, lr=0.0) if owned else None  # None: a replica that owns none
        self.step = 0

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        out = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.value_head is not None:
            out += [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]
        return out

    # -- forward / backward ---------------------------------------------------------------
    def _hidden(self, seqs: list[list[int]]) -> tuple[torch.Tensor, PackedBatch]:
        batch = PackedBatch.from_sequences(seqs, vocab_size=self.vocab, device=self.device)
        self.model.validate_inputs = False  # PackedBatch checked the ids on the host
        h = self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        return h, batch

    def _micro_step(self, data: Data, idx: list[int], spec, fn, backward: bool):
        """Loss (0-dim tensor) and per-datum outputs of one micro-batch."""
        seqs = [data[i][0] for i in idx]
        cat = {k: torch.cat([data[i][1][k] for i in idx]).to(self.device) for k in data[idx[0]][1]}
        with torch.set_grad_enabled(backward):
            h, batch = self._hidden(seqs)
            if spec is not None and spec.scoring:
                values = self.value_head(h.float()).squeeze(-1)
                if fn is losses.ranking:
                    loss = losses.ranking(values, batch.cu_seqlens, cat["weights"].float())
                else:
                    loss = fn(values, **{k: v.float() for k, v in cat.items()}).sum()
                out, key = values.detach(), "values"
            else:
                targets = cat.pop("target_tokens").long()
                aux = {k: v.float() for k, v in cat.items()}
                loss, record = kernels.linear_token_loss(h, self.model.lm_head_weight, targets, fn, aux=aux,
                                                         return_stats=True, process_group=self.group)
                out, key = record["logprob"], "logprobs"
            if backward:
                loss.backward()
        return loss.detach(), [(i, {key: t.cpu()}) for i, t in zip(idx, batch.split(out))]

    def run(self, data: Data, loss_fn: str, loss_fn_config: dict | None, backward: bool):
        """forward (backward=False) or forward_backward with a built-in loss."""
        spec, fn = losses.resolve_loss(loss_fn, loss_fn_config, scoring=self.value_head is not None)
        return self._run(data, spec, fn, backward)

    def _run(self, data: Data, spec, fn, backward: bool):
        """This rank's share of ``data`` (all of it at dp=1); every replica returns the
        outputs and metrics of the whole batch."""
        if self.dp_group is None:
            return self._run_share(data, spec, fn, backward)
        group = spec.group if spec else 1
        check_groups(len(data), group)  # alike on every rank, before any collective
        mine = data_parallel.split_over_ranks([len(s) for s, _ in data], self.dp, self.max_batch_size,
                                              group)[self.dp_rank]
        outputs, metrics = self._run_share([data[i] for i in mine], spec, fn, backward)
        return data_parallel.merge_outputs(self.dp_group, len(data), mine, outputs, metrics)

    def _run_share(self, data: Data, spec, fn, backward: bool):
        self.model.train(backward)
        bins, dropped = pack_micro_batches([len(s) for s, _ in data], self.max_batch_size, spec.group if spec else 1)
        outputs: list = [None] * len(data)
        total = torch.zeros((), device=self.device)
        for idx in bins:
            loss, outs = self._micro_step(data, idx, spec, fn, backward)
            total += loss
            for i, o in outs:
                outputs[i] = o
        self.model.eval()  # a sampler sharing the model must not see training-mode dropout
        key = "values" if self.value_head is not None else "logprobs"
        for i in dropped:
            outputs[i] = {key: torch.full((len(data[i][0]),), float("nan"))}
        metrics = {"loss:sum": float(total), "dropped_data:sum": float(len(dropped)),
                   "tokens:sum": float(sum(len(data[i][0]) for b in bins for i in b)),
                   "micro_batches:sum": float(len(bins))}
        return outputs, metrics

    def run_linear_grad(self, data: Data, backward: bool):
        """The fused pass of ``sum(grad * logprob)`` that forward_backward_custom runs twice."""
        return self._run(data, None, losses.linear_grad, backward)

    def forward_backward_custom(self, data: Data, fn):
        if self.value_head is not None:
            raise ValueError("forward_backward_custom needs a language model, not a scoring model")
        return custom_step(self.run_linear_grad, data, fn)

    # -- state on disk (engine/train/checkpoint.py) -------------------------------------------
    def save_state(self, folder, save_id: str | None = None):
        return state_io.save_state(self, folder, save_id)

    def state_signature(self) -> dict:
        return state_io.signature(self)

    def load_state(self, path, with_optimizer: bool):
        return state_io.load_state(self, path, with_optimizer=with_optimizer)

    def save_for_sampler(self, source, folder):
        return state_io.save_for_sampler(self, source, folder)

    def sync_from_masters(self) -> None:
        """The model's weights := its masters rounded to the weights' dtype."""
        with torch.no_grad():
            for p, m in self.masters.items():
                p.copy_(m)

    def drop_gradients(self) -> None:
        """Every gradient (masters' included), not only those of the parameters this replica
        steps."""
        for _, p in self.params + self.optim_params:
            p.grad = None

    def describe(self) -> dict:
        return {"step": self.step, "master_weights": bool(self.masters),
                "trainable_parameters": sum(p.numel() for _, p in self.params),
                "parameters": sum(p.numel() for p in self.model.parameters()), "lora": self.lora,
                "scoring": self.value_head is not None,
                "target_modules": list(self.model.lora_config.target_modules) if self.lora else None}

    @property
    def group(self):
        """The tensor-parallel process group (None at tp=1); the model holds it weakly."""
        return tp_group(self.model)

    @property
    def dp_group(self):
        """The data-parallel process group of this rank's replicas (None at dp=1)."""
        return self.dp_group_ref()

    # -- optimizer --------------------------------------------------------------------------
    def _grad_norm(self, params) -> torch.Tensor:
        """The global gradient norm of the unsharded model, the same on every rank (NaN or
        inf when any gradient holds one)."""
        if self.group is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # clip_grad_norm_'s
        # Squares of sharded parameters are summed over the ranks, replicated ones (equal on
        # every rank) counted once; a non-finite replicated gradient anywhere poisons all.
        grads = [(p.grad, getattr(p, "tp_sharded", False)) for p in params if p.grad is not None]
        zero = torch.zeros((), device=self.device)
        sharded = sum((g.float().pow(2).sum() for g, s in grads if s), zero)
        replicated = sum((g.float().pow(2).sum() for g, s in grads if not s), zero)
        both = torch.stack([sharded, (~torch.isfinite(replicated)).float()])
        torch.distributed.all_reduce(both, group=self.group)
        return torch.where(both[1] > 0, torch.nan, (both[0] + replicated).sqrt())

    def optim_step(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   grad_clip_norm: float) -> dict:
        """One AdamW step. A non-finite gradient norm skips it (as mixed-precision trainers
        do): weights, optimizer state and step counter stay, the gradient is dropped, and
        ``skipped_nonfinite_grad:sum`` says so."""
        check_hyperparameters(lr, beta1, beta2, eps, weight_decay, grad_clip_norm)
        params = [p for _, p in self.optim_params]
        if self.dp_group is not None:  # the whole batch's gradient (losses are sums over tokens)
            data_parallel.sum_gradients(params, self.dp_group)
        norm = self._grad_norm(params)
        value = float(norm)  # the step's one host sync
        finite = math.isfinite(value)
        if finite:
            if grad_clip_norm > 0:  # clip_grad_norm_'s coefficient, with the global norm at any tp
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip_norm, norm)
            if self.optimizer is not None:
                for g in self.optimizer.param_groups:
                    g.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
                self.optimizer.step()
            if self.dp_group is not None:  # each owner's new values (masters) to the other replicas
                data_parallel.broadcast_owned(params, self.owner, self.dp_group)
            self.sync_from_masters()
            self.step += 1
        self.drop_gradients()
        return {"grad_norm": value, "skipped_nonfinite_grad:sum": 0.0 if finite else 1.0,
                "step": float(self.step)}


def check_hyperparameters(lr, beta1, beta2, eps, weight_decay, grad_clip_norm) -> None:
    """ValueError naming the AdamParams field for a value AdamW must not see (they are
    written into its param_groups directly, past its own checks)."""
    rules = (("learning_rate", lr, "a finite number >= 0", lambda v: v >= 0),
             ("beta1", beta1, "in [0, 1)", lambda v: 0 <= v < 1),
             ("beta2", beta2, "in [0, 1)", lambda v: 0 <= v < 1),
             ("eps", eps, "a finite number > 0", lambda v: v > 0),
             ("weight_decay", weight_decay, "a finite number >= 0", lambda v: v >= 0),
             ("grad_clip_norm", grad_clip_norm, "a finite number >= 0 (0: no clipping)", lambda v: v >= 0))
    for name, value, expected, ok in rules:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"adam_params.{name} must be {expected}, got {value!r}")


def custom_step(run_linear_grad, data: Data, fn):
    """forward_backward_custom in two passes: logprobs without grad, the user's loss on leaf
    copies of them (autograd gives dloss/dlogprob), then a fused pass of
    ``sum(grad * logprob)`` that carries exactly that gradient into the model, micro-batch by
    micro-batch. ``run_linear_grad(data, backward)`` runs the fused pass (locally, or on every
    tensor-parallel rank), so the user's ``fn`` always runs in the caller's process."""
    plain = [(s, {"target_tokens": inp["target_tokens"]}) for s, inp in data]
    zero = [(s, {**i, "grad": torch.zeros(len(s))}) for s, i in plain]
    outputs, _ = run_linear_grad(zero, False)
    logprobs = [o["logprobs"].clone().requires_grad_(True) for o in outputs]
    result = fn(data, logprobs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError("fn must return (loss, metrics): a scalar tensor and a dict of floats")
    loss, user_metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("fn's loss must be a scalar tensor computed from the logprobs it was given")
    grads = torch.autograd.grad(loss.reshape(()), logprobs, allow_unused=True)
    replay = [(s, {**i, "grad": torch.zeros(len(s)) if g is None else g.float()})
              for (s, i), g in zip(plain, grads)]
    _, metrics = run_linear_grad(replay, True)
    metrics["loss:sum"] = float(loss.detach())
    metrics.update({k: float(v) for k, v in (user_metrics or {}).items()})
    return [{"logprobs": lp.detach()} for lp in logprobs], metrics

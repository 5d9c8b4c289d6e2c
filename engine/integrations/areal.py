"""AReaL's ``TrainEngine`` and ``InferenceEngine`` on the engine's packed model and sampler.

``EngineTrainEngine(areal.api.engine_api.TrainEngine)`` trains the engine's ``Transformer``
(through ``engine.integrations.hf.EngineForCausalLM`` for loading and Hugging Face saving);
``EngineInferenceEngine(areal.api.engine_api.InferenceEngine)`` (engine/integrations/
areal_rollout.py, re-exported here) generates with the engine's ``InferenceModel``. Both
are usable by subclassing and through the dotted class path AReaL's ``TrainController`` /
``RolloutController`` hand to the engine-creation endpoint (``import_from_string`` then
``cls(config)``)::

    actor = EngineTrainEngine(TrainEngineConfig(path="/ckpt/Qwen3-0.6B", dtype="bfloat16",
                                                optimizer=OptimizerConfig(lr=1e-6)))
    actor.create_process_group(); actor.initialize(None, FinetuneSpec(1, 1000, 8))
    ppo = PPOActor(PPOActorConfig(...), actor)      # as AReaL's FSDPPPOActor wraps its engine

One ``train_batch(input_, loss_fn, loss_weight_fn)``, hop by hop:

1. The input (AReaL's right-padded dict of ``[B, S]`` tensors with ``attention_mask``, or a
   list of such trajectory dicts, concatenated as AReaL's ``concat_batch`` does).
2. Micro-batches from ``config.mb_spec`` (``MicroBatchSpec``): ``max_tokens_per_mb`` is the
   engine's token budget, filled by first-fit-decreasing (engine/train/batching.py) with
   ``granularity`` consecutive sequences kept together; then the largest micro-batch is
   halved until there are at least ``n_mbs`` (and a multiple of ``n_mbs_divisor`` where the
   sequences allow). A sequence over the budget raises (AReaL's outputs must cover every
   sequence, so nothing is dropped).
3. Each micro-batch is packed with AReaL's ``pack_tensor_dict`` (the 1-D dict its losses
   expect: per-token ``[T]``, ``cu_seqlens``, ``max_seqlen``) and runs through the engine's
   varlen model (no padding FLOPs); the fused LM-head kernel (``kernels.linear_logprobs``)
   gives each position's next-token logprob and entropy at ``config.temperature`` with no
   ``[T, vocab]`` tensor; a sequence's last token gets 0 (AReaL rolls its ``loss_mask``).
4. ``loss_fn(logprobs, entropy, mb)`` is scaled by ``loss_weight_fn(mb) / total weight``
   (global normalisation over the batch, as AReaL's FSDP engine) and back-propagated.
5. ``optimizer_step``: AdamW with ``config.optimizer`` (gradient clipping; a non-finite
   gradient norm skips the update and reports ``update_successful=0``).

``forward_batch`` runs steps 1-3 without gradients and returns the logprobs ``[B, S]``
(zero-padded; per trajectory for a list input), whatever the micro-batch split.

Covered: one process (data-parallel size 1; ``create_process_group`` raises for a larger
torch.distributed world), actor (not critic) models, full weights or the engine's LoRA
(``use_lora``), ``SaveLoadMeta`` with ``weight_format="hf"``, and ``WeightUpdateMeta`` of
``type="disk"``. Not covered: FSDP/tensor/sequence parallelism under AReaL's launcher,
``xccl`` weight updates, tree training, vision inputs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from areal.api.cli_args import MicroBatchSpec, OptimizerConfig, TrainEngineConfig
from areal.api.engine_api import InferenceEngine, TrainEngine
from areal.api.io_struct import DeviceRuntimeInfo, SaveLoadMeta, WeightUpdateMeta
from areal.utils import stats_tracker
from areal.utils.data import concat_batch, pack_tensor_dict, pad_and_stack_tensors_along_first_dim, split_batch

import kernels
from engine.models.files import write_torch
from engine.train.batching import pack_micro_batches

from .areal_rollout import EngineInferenceEngine
from .hf import IGNORE_INDEX, EngineForCausalLM

__all__ = ["EngineInferenceEngine", "EngineTrainEngine", "micro_batches"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def micro_batches(lengths: list[int], spec: MicroBatchSpec) -> list[list[int]]:
    """Sequence indices of each micro-batch (step 2 of the module docstring).

    Args:
        lengths: tokens of each sequence (its ``attention_mask`` sum).
        spec: AReaL's MicroBatchSpec (``n_mbs``, ``max_tokens_per_mb``, ``granularity``,
            ``n_mbs_divisor``).
    """
    g = spec.granularity or 1
    budget = spec.max_tokens_per_mb if spec.max_tokens_per_mb is not None else max(sum(lengths), 1)
    units = [sum(lengths[i:i + g]) for i in range(0, len(lengths), g)]
    if units and max(units) > budget:
        raise ValueError(f"mb_spec.max_tokens_per_mb={budget} is smaller than a group of {g} sequence(s) of "
                         f"{max(units)} tokens; raise it (AReaL's outputs must cover every sequence)")
    bins, _ = pack_micro_batches(lengths, budget, g)

    def split_largest() -> bool:
        splittable = [b for b in bins if len(b) > g]
        if not splittable:
            return False
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(big)
        half = (len(big) // g + 1) // 2 * g
        bins.extend([big[:half], big[half:]])
        return True

    while len(bins) < (spec.n_mbs or 1) and split_largest():
        pass
    while len(bins) % (spec.n_mbs_divisor or 1) and split_largest():
        pass
    return bins


class EngineTrainEngine(TrainEngine):
    """AReaL's TrainEngine on the engine's model (see the module docstring).

    Args:
        config: AReaL's TrainEngineConfig: ``path`` (a local Hugging Face folder), ``dtype``,
            ``mb_spec``, ``optimizer``, ``temperature``, ``gradient_checkpointing``,
            ``use_lora`` / ``lora_rank`` / ``lora_alpha`` / ``target_modules``.
    """

    def __init__(self, config: TrainEngineConfig):
        self.config = config
        self.model: EngineForCausalLM | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.rollout_engine: InferenceEngine | None = None
        self.tokenizer = None
        self._version = 0
        self._initialized = False

    # -- setup ------------------------------------------------------------------------------
    def create_process_group(self, parallel_strategy=None):
        """One process: data-parallel size 1 (the engine's own tp/dp runs through
        ``engine.model(...).spawn_train``, not AReaL's launcher)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        sizes = [getattr(parallel_strategy, f"{k}_parallel_size", 1) or 1
                 for k in ("data", "tensor", "pipeline", "context", "expert")]
        if world > 1 or any(s > 1 for s in sizes):
            raise ValueError(f"EngineTrainEngine runs in one process (data_parallel_world_size=1); got a "
                             f"torch.distributed world of {world} and parallel_strategy={parallel_strategy!r}")

    def initialize(self, addr: str | None = None, ft_spec=None, *args, model: EngineForCausalLM | None = None,
                   **kwargs):
        """Load ``config.path`` (or take ``model``), attach LoRA when ``config.use_lora``, and
        build AdamW and the learning-rate schedule (``ft_spec.total_train_steps`` steps,
        ``optimizer.lr_scheduler_type`` constant / linear / cosine after linear warmup)."""
        cfg = self.config
        if cfg.is_critic:
            raise ValueError("EngineTrainEngine trains actors (config.is_critic must be False)")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"config.dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
        if model is None:
            if not cfg.path:
                raise ValueError("config.path must name a local Hugging Face checkpoint folder")
            model = EngineForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[cfg.dtype], device_map="auto")
        self.model = model
        if cfg.use_lora:
            from peft import LoraConfig
            self.model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                              target_modules=list(cfg.target_modules) or "all-linear"))
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        opt = cfg.optimizer
        if opt is not None:
            if opt.type not in ("adam", "adamw"):
                raise ValueError(f"config.optimizer.type must be 'adam' (AdamW), got {opt.type!r}")
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                               weight_decay=opt.weight_decay)
            total = max(int(getattr(ft_spec, "total_train_steps", 1) or 1), 1)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(opt, total))
        self._initialized = True
        return self

    @property
    def initialized(self) -> bool:
        return self._initialized

    def destroy(self):
        self.model = self.optimizer = self.lr_scheduler = None
        self._initialized = False

    # -- data parallelism: one process -------------------------------------------------------
    @property
    def data_parallel_group(self):
        return None

    @property
    def data_parallel_rank(self) -> int:
        return 0

    @property
    def data_parallel_world_size(self) -> int:
        return 1

    def current_data_parallel_head(self) -> int:
        return 0

    def is_data_parallel_head(self) -> bool:
        return True

    @property
    def context_and_model_parallel_group(self):
        return None

    @property
    def cpu_group(self):
        return None

    def train(self, mode: bool = True):
        self._model().train(mode)
        return self

    # -- forward / backward ----------------------------------------------------------------
    def _model(self) -> EngineForCausalLM:
        if self.model is None:
            raise RuntimeError("EngineTrainEngine is not initialized: call initialize() first")
        return self.model

    def _split(self, input_) -> tuple[dict, Any, list[list[int]], list[dict]]:
        """Steps 1-3 up to packing: (batch, list meta or None, micro-batch indices, packed dicts)."""
        batch, meta = concat_batch(input_) if isinstance(input_, list) else (input_, None)
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("input_ must be a dict (or list of dicts) of [B, S] tensors with input_ids and "
                             "attention_mask")
        mask = batch["attention_mask"]
        b = mask.shape[0]
        bins = micro_batches(mask.sum(-1).tolist(), self.config.mb_spec)
        device = self._model().device
        packed = []
        for idx in bins:
            index = torch.tensor(idx, device=mask.device)
            sub = {k: v.index_select(0, index.to(v.device)) if torch.is_tensor(v) and v.dim() >= 1 and
                   v.shape[0] == b else v for k, v in batch.items()}
            mb = pack_tensor_dict(sub)
            packed.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()})
        return batch, meta, bins, packed

    def _logprobs_entropy(self, mb: dict, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] float32 logprob of the next token at each packed position and the entropy
        (step 3); 0 at each sequence's last token."""
        model = self._model()
        ids, cu = mb["input_ids"].long(), mb["cu_seqlens"]
        t = ids.numel()
        seq_start = cu[:-1].long().repeat_interleave(cu.diff(), output_size=t)
        positions = torch.arange(t, device=ids.device) - seq_start
        targets = ids.roll(-1)
        targets[cu[1:].long() - 1] = IGNORE_INDEX
        with torch.set_grad_enabled(with_grad), torch.autocast(ids.device.type, enabled=False):
            h = model.model(ids, positions, cu, int(mb["max_seqlen"]))
            return kernels.linear_logprobs(h, model.model.lm_head_weight, targets,
                                           temperature=self.config.temperature, return_entropy=True)

    def train_batch(self, input_, loss_fn: Callable[..., torch.Tensor],
                    loss_weight_fn: Callable[[dict], torch.Tensor]) -> dict[str, float]:
        """Steps 1-5 of the module docstring; AReaL's stats: ``update_successful``,
        ``grad_norm``, ``lr``, ``num_micro_batches``."""
        self.optimizer_zero_grad()
        _, n_mbs = self._run_loss(input_, loss_fn, loss_weight_fn, backward=True)
        stats = self.optimizer_step()
        stats["num_micro_batches"] = float(n_mbs)
        return stats

    @torch.no_grad()
    def eval_batch(self, input_, loss_fn: Callable[..., torch.Tensor],
                   loss_weight_fn: Callable[[dict], torch.Tensor]) -> torch.Tensor | None:
        """The globally weighted loss of ``loss_fn`` over the batch (a 0-dim tensor)."""
        return self._run_loss(input_, loss_fn, loss_weight_fn, backward=False)[0]

    def _run_loss(self, input_, loss_fn, loss_weight_fn, backward: bool) -> tuple[torch.Tensor, int]:
        """(the weighted loss, the number of micro-batches), steps 1-4."""
        _, _, bins, mbs = self._split(input_)
        weights = [torch.as_tensor(loss_weight_fn(mb), dtype=torch.float32) for mb in mbs]
        total = torch.stack(weights).sum()
        if not float(total) > 0:
            raise ValueError("loss_weight_fn gives a total weight of 0 over the batch (no token to train on)")
        out = torch.zeros((), device=self._model().device)
        for mb, w in zip(mbs, weights):
            if float(w) == 0:
                continue
            logprobs, entropy = self._logprobs_entropy(mb, with_grad=backward)
            loss = loss_fn(logprobs, entropy, mb) * (w.to(out.device) / total.to(out.device))
            if backward:
                loss.backward()
            out += loss.detach()
        return out, len(mbs)

    @torch.no_grad()
    def forward_batch(self, input_, output_seqlens: list[int] | None = None,
                      aggregate_fn: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat):
        """Logprobs ``[B, S]`` float32 (zero-padded) of the batch; a list per trajectory for a
        list input. ``output_seqlens``: lengths to cut the aggregated output into (default:
        each sequence's ``attention_mask`` sum); ``aggregate_fn`` joins the micro-batches'
        ``[T_mb]`` outputs."""
        batch, meta, bins, mbs = self._split(input_)
        lengths = batch["attention_mask"].sum(-1).tolist()
        if output_seqlens is not None and meta is None and len(output_seqlens) != len(lengths):
            raise ValueError(f"output_seqlens must give one length per sequence ({len(lengths)}), "
                             f"got {len(output_seqlens)}")
        seqlens = lengths if output_seqlens is None or meta is not None else output_seqlens
        outputs = [self._logprobs_entropy(mb, with_grad=False)[0] for mb in mbs]
        order = [i for idx in bins for i in idx]
        pieces = torch.split(aggregate_fn(outputs), [seqlens[i] for i in order])
        by_seq = [None] * len(order)
        for i, piece in zip(order, pieces):
            by_seq[i] = piece
        result = pad_and_stack_tensors_along_first_dim(by_seq)
        return result if meta is None else split_batch(result, meta)

    def forward_backward_batch(self, mb_list, process_output_fn, forward_only: bool = False) -> None:
        """AReaL's hook takes ``[T, vocab]`` logits, which this engine never forms; use
        ``train_batch`` / ``forward_batch`` (they hand the loss per-token logprobs)."""
        raise NotImplementedError("EngineTrainEngine computes logprobs in the fused LM-head kernel and never forms "
                                  "logits: use train_batch / eval_batch / forward_batch")

    # -- optimizer ----------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError("no optimizer: set config.optimizer (an OptimizerConfig) before initialize()")
        return self.optimizer

    def optimizer_zero_grad(self):
        self._optimizer().zero_grad(set_to_none=True)

    def optimizer_step(self) -> dict[str, float]:
        """One AdamW step after clipping to ``optimizer.gradient_clipping``; a non-finite
        gradient norm drops the gradient instead."""
        opt = self._optimizer()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        clip = self.config.optimizer.gradient_clipping
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf))
        ok = math.isfinite(norm)
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return {"update_successful": float(ok), "grad_norm": norm, "lr": self.lr_scheduler.get_last_lr()[0]}

    def lr_scheduler_step(self):
        if self.lr_scheduler is None:
            raise RuntimeError("no learning-rate schedule: set config.optimizer before initialize()")
        self.lr_scheduler.step()

    # -- versions, saving, weight updates ---------------------------------------------------
    def set_version(self, version: int):
        self._version = version

    def get_version(self) -> int:
        return self._version

    def save(self, meta: SaveLoadMeta):
        """``weight_format="hf"``: a folder transformers loads (the adapter in PEFT's format
        under LoRA), the tokenizer when given, and with ``with_optim`` the optimizer and
        schedule in ``optim.pt`` (written whole, then renamed)."""
        if meta.weight_format != "hf":
            raise ValueError(f"SaveLoadMeta.weight_format must be 'hf', got {meta.weight_format!r}")
        self._model().save_pretrained(meta.path)
        if meta.tokenizer is not None:
            meta.tokenizer.save_pretrained(meta.path)
        if meta.with_optim:
            write_torch(Path(meta.path) / "optim.pt", {"optimizer": self._optimizer().state_dict(),
                                                       "lr_scheduler": self.lr_scheduler.state_dict()})

    def load(self, meta: SaveLoadMeta):
        """Read back what ``save`` wrote (weights, or the adapter under LoRA; optimizer with
        ``with_optim``)."""
        if meta.weight_format != "hf":
            raise ValueError(f"SaveLoadMeta.weight_format must be 'hf', got {meta.weight_format!r}")
        model, folder = self._model(), Path(meta.path)
        if self.config.use_lora:
            model.load_adapter(str(folder))
        else:
            from safetensors.torch import load_file
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"SaveLoadMeta.path {folder} holds no .safetensors file")
            state = {}
            for f in files:
                state.update(load_file(f, device=str(model.device)))
            model.load_state_dict(state)
        if meta.with_optim:
            saved = torch.load(folder / "optim.pt", map_location=model.device)
            self._optimizer().load_state_dict(saved["optimizer"])
            self.lr_scheduler.load_state_dict(saved["lr_scheduler"])

    def connect_engine(self, engine: InferenceEngine, meta: WeightUpdateMeta):
        """The inference engine that ``update_weights`` and ``rollout_batch`` /
        ``prepare_batch`` use (``meta.type`` must be "disk")."""
        if meta.type != "disk":
            raise ValueError(f"WeightUpdateMeta.type must be 'disk' (xccl needs AReaL's NCCL groups), got {meta.type!r}")
        self.rollout_engine = engine

    def _rollout(self) -> InferenceEngine:
        if self.rollout_engine is None:
            raise RuntimeError("no inference engine: call connect_engine(engine, meta) first")
        return self.rollout_engine

    def update_weights(self, meta: WeightUpdateMeta):
        """``type="disk"``: pause the connected engine's generation, write the weights (as
        ``save``) to ``meta.path``, have the engine load them, and continue."""
        if meta.type != "disk":
            raise ValueError(f"WeightUpdateMeta.type must be 'disk', got {meta.type!r}")
        if not meta.path:
            raise ValueError("WeightUpdateMeta.path must name the folder to write the weights to")
        if self.config.use_lora or meta.use_lora:
            raise ValueError("disk weight updates carry full weights; under LoRA save the adapter (save) and "
                             "serve its folder with InferenceModel(adapter=...)")
        rollout = self._rollout()
        rollout.pause_generation()
        try:
            self._model().save_pretrained(meta.path)
            rollout.update_weights_from_disk(meta).result()
        finally:
            rollout.continue_generation()

    def rollout_batch(self, data, workflow, workflow_kwargs=None, group_size: int = 1):
        return self._rollout().rollout_batch(data, workflow, workflow_kwargs=workflow_kwargs, group_size=group_size)

    def prepare_batch(self, dataloader, workflow, workflow_kwargs=None, should_accept_fn=None, group_size: int = 1,
                      dynamic_bs: bool = False):
        return self._rollout().prepare_batch(dataloader, workflow, workflow_kwargs=workflow_kwargs,
                                             should_accept_fn=should_accept_fn, group_size=group_size,
                                             dynamic_bs=dynamic_bs)

    # -- statistics and memory -----------------------------------------------------------------
    def export_stats(self) -> dict[str, float]:
        return stats_tracker.export_all(reduce_group=None)

    def offload(self) -> None:
        """Nothing to offload (nor, in ``onload``, to bring back): the model stays where it was loaded."""

    def onload(self) -> None:
        pass

    def get_device_stats(self) -> DeviceRuntimeInfo:
        return DeviceRuntimeInfo.get_current()


def _lr_lambda(opt: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over ``warmup_steps_proportion`` of the steps, then
    constant, linear or cosine decay to ``min_lr_ratio``."""
    if opt.lr_scheduler_type not in ("constant", "linear", "cosine"):
        raise ValueError(f"optimizer.lr_scheduler_type must be constant, linear or cosine, "
                         f"got {opt.lr_scheduler_type!r}")
    warmup = int(opt.warmup_steps_proportion * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if opt.lr_scheduler_type == "constant":
            return 1.0
        frac = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        decay = 1 - frac if opt.lr_scheduler_type == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * decay

    return factor

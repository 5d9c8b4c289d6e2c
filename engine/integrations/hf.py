"""A transformers-shaped causal LM on the engine's packed model and fused kernels.

``EngineForCausalLM`` is a ``transformers.PreTrainedModel`` whose body is the engine's
``Transformer`` (fused q/k/v and gate/up, varlen attention on a packed token stream), so
transformers' ``Trainer``, TRL and the frameworks built on the same calling convention
drive it unchanged::

    model = EngineForCausalLM.from_pretrained("/ckpt/Qwen3-0.6B", dtype=torch.bfloat16, device_map="cuda")
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss; no [tokens, vocab] tensor

One forward, hop by hop:

1. ``unpad``: the ``[B, S]`` batch becomes the packed form (DESIGN.md, "Token packing").
   Tokens whose ``attention_mask`` is 0 are dropped (no FLOPs on padding); a sequence
   starts at each row's first kept token and wherever ``position_ids`` do not go up by one
   (a restart at 0; transformers' ``find_packed_sequence_indices`` rule), so a
   ``DataCollatorWithFlattening`` batch (one row, positions 0.. per example) is several
   sequences. Positions default to 0, 1, ... per sequence (RoPE is relative, so this equals
   transformers' ``arange(S)`` under right or left padding). Host reads per forward: the
   kept tokens' indices (with an ``attention_mask``) and the sequence starts, for
   ``cu_seqlens`` and ``max_seqlen``.
2. The engine's ``Transformer`` gives the final hidden states ``[T, hidden]``.
3. The loss: ``labels`` are shifted as transformers' ``ForCausalLMLoss`` shifts them (the
   token at ``t`` predicts ``labels[t + 1]`` of its row, -100 ignored), or ``shift_labels``
   are taken as given; a token whose next one starts another sequence or is padding
   predicts nothing (``DataCollatorWithFlattening`` already puts -100 at each sequence's
   first label, so this equals transformers there). ``kernels.linear_cross_entropy`` fuses
   the LM head with the loss: mean over the kept targets, or, with ``num_items_in_batch``
   (as Trainer passes it), their sum divided by it.
4. Logits ``[B, S, vocab]`` (zeros at padding) only when ``labels`` is None or
   ``return_logits=True``; ``logits_to_keep=k`` keeps the last ``k`` positions.

LoRA: peft's ``get_peft_model`` cannot wrap this model, because q/k/v and gate/up are fused
projections (no ``q_proj`` module exists for peft to replace). ``add_adapter(LoraConfig(...))``
(transformers' method name) attaches the engine's own LoRA on the same target modules
(``q_proj``, ``v_proj``, ...; exactly PEFT's math, see engine/models/lora.py), and
``save_pretrained`` then writes a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the
transformers model; ``load_adapter(folder)`` reads one back.

Generation is the engine's inference side's job (``engine.model(folder).spawn_inference()``
on a ``save_pretrained`` folder): this class has no KV cache and ``can_generate()`` is False.

Mixed precision: the kernels take one dtype, so under autocast (Trainer's ``bf16=True``)
the model computes in its parameters' dtype; load it in bf16 for bf16 compute.

Not covered: tensor parallelism (the model lives on one device; Trainer's data parallelism
wraps it from outside, untested here), ``inputs_embeds``, and Trainer's ``resume_from_checkpoint`` of a LoRA run
(Trainer resumes adapters only on a ``peft.PeftModel``; ``load_adapter`` of the checkpoint
folder restores the adapter). Full-weight runs resume: ``load_state_dict`` takes the
Hugging Face names ``save_pretrained`` writes.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import kernels
from engine.models import add_lora, build_model, load_model, load_peft_lora, parse_config, save_peft_lora, weight_map
from engine.models.files import copy_file, write_safetensors, write_text
from engine.models.peft import read_peft_adapter

IGNORE_INDEX = -100
# forward() keywords that transformers' callers pass and that change nothing here
# (packed_sample_seqlens: ArcticTraining's SFT collator; the sequences are read from position_ids).
_IGNORED_KWARGS = ("use_cache", "return_dict", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                   "max_length_k", "seq_idx", "packed_sample_seqlens")
# from_pretrained() keywords of transformers that change nothing here.
_IGNORED_LOAD_KWARGS = ("attn_implementation", "low_cpu_mem_usage", "trust_remote_code", "local_files_only",
                        "use_safetensors")


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
          position_ids: torch.Tensor | None = None) -> dict:
    """The packed form of a transformers batch (step 1 of the module docstring).

    Args:
        input_ids: [B, S] int64 (or [S]).
        attention_mask: optional [B, S], nonzero on the tokens to keep.
        position_ids: optional [B, S] or [1, S] int64; where they do not go up by one
            (a restart at 0), a new sequence starts.

    Returns a dict: ``input_ids`` / ``position_ids`` [T] int64 and ``cu_seqlens`` [N+1] int32
    of the kept tokens, ``max_seqlen`` (host int), ``keep`` [B, S] bool and ``index`` [T]
    int64 (the kept tokens' flat indices), both None when every token is kept, ``starts``
    [B, S] bool (the first token of each sequence) and ``shape`` (B, S).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.dtype != torch.int64:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be an int64 tensor [B, S] or [S], got {got}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    b, s = ids.shape
    device = ids.device
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and (t.dim() not in (1, 2) or t.shape[-1] != s or t.device != device):
            raise ValueError(f"{name} must be [B={b}, S={s}] on {device} like input_ids, got "
                             f"{tuple(t.shape)} on {t.device}")
    keep = None if attention_mask is None else attention_mask.reshape(-1, s).expand(b, s).bool()
    starts = torch.zeros(b, s, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:  # transformers' rule (find_packed_sequence_indices): a jump starts a sequence
        pos = position_ids.reshape(-1, s).expand(b, s).long()
        starts[:, 1:] |= pos.diff(dim=-1) != 1
    if keep is not None:  # the first kept token after a dropped one (left padding) starts a sequence
        after_drop = torch.ones_like(keep)
        after_drop[:, 1:] = ~keep[:, :-1]
        starts = (starts | after_drop) & keep
    # Host reads: the kept tokens' indices (with padding) and the sequence starts.
    index = None if keep is None else keep.flatten().nonzero().flatten()

    def kept(x: torch.Tensor) -> torch.Tensor:
        return x.flatten() if index is None else x.flatten().index_select(0, index)

    flat_starts = kept(starts)
    t = flat_starts.numel()
    if t == 0:
        raise ValueError("the batch keeps no token (attention_mask is 0 everywhere)")
    first = flat_starts.nonzero().flatten().cpu()
    cu = torch.cat([first, torch.tensor([t])]).to(torch.int32)
    max_seqlen = int(cu.diff().max())
    cu = cu.to(device)
    if position_ids is None:  # 0, 1, ... within each sequence
        seq_start = cu[:-1].long().repeat_interleave(cu.diff(), output_size=t)
        flat_pos = torch.arange(t, device=device) - seq_start
    else:
        flat_pos = kept(pos)
    return {"input_ids": kept(ids), "position_ids": flat_pos, "cu_seqlens": cu, "max_seqlen": max_seqlen,
            "keep": keep, "index": index, "starts": starts, "shape": (b, s)}


def shifted_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, packed: dict) -> torch.Tensor:
    """[T] int64 target of each kept token (step 3 of the module docstring): ``labels``
    shifted left by one in its row, or ``shift_labels`` as given; -100 where the next token
    starts another sequence, is padding, or lies past the row's end."""
    b, s = packed["shape"]
    given = shift_labels if shift_labels is not None else labels
    name = "shift_labels" if shift_labels is not None else "labels"
    if given.numel() != b * s:
        raise ValueError(f"{name} must be [B={b}, S={s}] like input_ids, got {tuple(given.shape)}")
    given = given.reshape(b, s).to(packed["starts"].device).long()
    if shift_labels is not None:
        targets = given
    else:
        targets = torch.full_like(given, IGNORE_INDEX)
        targets[:, :-1] = given[:, 1:]
        ends = torch.ones_like(packed["starts"])  # the next token starts a sequence or is dropped
        ends[:, :-1] = packed["starts"][:, 1:]
        if packed["keep"] is not None:
            ends[:, :-1] |= ~packed["keep"][:, 1:]
        targets = targets.masked_fill(ends, IGNORE_INDEX)
    flat = targets.flatten()
    return flat if packed["index"] is None else flat.index_select(0, packed["index"])


def _device(device_map) -> torch.device:
    """The one device a transformers ``device_map`` names (the packed model is not split)."""
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map must place the whole model on one device ({{'': device}}), "
                             f"got {device_map!r}")
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must be None, 'auto', a device or {{'': device}}, got {device_map!r}") from None


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None  # config.json's
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be 'auto', float32, bfloat16 or float16, got {dtype!r}")
    return dtype


class EngineForCausalLM(PreTrainedModel):
    """transformers' causal-LM convention on the engine's ``Transformer`` (see the module
    docstring). ``self.model`` is the engine model; its parameters are the trained ones."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # Trainer then passes num_items_in_batch
    _no_split_modules = ["Block"]

    def __init__(self, config: PretrainedConfig, model=None):
        super().__init__(config)
        if model is None:  # transformers-style random init (from_config): normal(0, initializer_range), norms 1
            model = build_model(parse_config(config.to_dict()))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, getattr(config, "initializer_range", 0.02))
        self.model = model
        self.gradient_checkpointing = False
        self.post_init()

    # -- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, dtype=None, torch_dtype=None, device_map=None,
                        config: PretrainedConfig | None = None, **kwargs) -> "EngineForCausalLM":
        """Load a local Hugging Face checkpoint folder (config.json + safetensors).

        Args:
            pretrained_model_name_or_path: the folder.
            dtype / torch_dtype: parameter dtype (transformers 5's and 4's names), "auto" or
                None for config.json's.
            device_map: None (CPU), "auto" (the current GPU, else CPU), a device, or
                ``{"": device}``; the packed model lives on one device.
            config: a PretrainedConfig to attach instead of the folder's (same architecture).
        """
        unknown = sorted(set(kwargs) - set(_IGNORED_LOAD_KWARGS))
        if unknown:
            raise TypeError(f"EngineForCausalLM.from_pretrained got unsupported keyword(s) {unknown}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
        folder = Path(pretrained_model_name_or_path)
        model = load_model(folder, dtype=_dtype(dtype if dtype is not None else torch_dtype),
                           device=_device(device_map))
        hf_config = config if config is not None else AutoConfig.from_pretrained(folder)
        hf_config.dtype = model.embed.weight.dtype
        out = cls(hf_config, model)
        out.name_or_path = str(folder)
        return out.eval()

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, is_main_process: bool = True,
                        **kwargs) -> None:
        """Write a folder transformers loads: config.json + model.safetensors under Hugging
        Face names (each file written whole, then renamed into place), and
        generation_config.json when the source checkpoint had one. With an adapter
        (``add_adapter``), only the adapter, in PEFT's format. ``state_dict``: this model's
        ``state_dict()`` to save instead of its parameters (as Trainer may pass). transformers'
        other keywords (``safe_serialization``, ``max_shard_size`` ...) are accepted and
        change nothing: one safetensors file is written."""
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if getattr(self.model, "lora_config", None) is not None:
            save_peft_lora(self.model, folder)
            return
        params = dict(self.model.named_parameters()) if state_dict is None else \
            {k.removeprefix("model."): v for k, v in state_dict.items()}
        tensors = {}
        for e in weight_map(self.model.config):
            t = params[e.param]
            tensors[e.hf_name] = t.narrow(0, e.row_offset, e.rows) if e.rows is not None else t
        write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
        self.config.dtype = self.model.embed.weight.dtype
        write_text(folder / "config.json", self.config.to_json_string())
        source = Path(self.name_or_path or "") / "generation_config.json"
        if self.name_or_path and source.is_file():
            copy_file(source, folder / "generation_config.json")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes the Hugging Face names
        ``save_pretrained`` writes (Trainer's ``resume_from_checkpoint`` loads
        model.safetensors through it): q/k/v and gate/up fill the row blocks of the fused
        parameters. Keys of neither kind are reported as unexpected."""
        entries = weight_map(self.model.config)
        if any(e.hf_name in state_dict for e in entries):
            state_dict = dict(state_dict)
            if self.model.config.tie_word_embeddings:
                state_dict.pop("lm_head.weight", None)  # a tied copy some writers add
            params = dict(self.model.named_parameters())
            ours = {}
            for e in entries:
                if e.hf_name not in state_dict:
                    continue
                t = state_dict.pop(e.hf_name)
                if e.rows is None:
                    ours["model." + e.param] = t
                else:
                    whole = ours.setdefault("model." + e.param, params[e.param].detach().clone())
                    whole[e.row_offset:e.row_offset + e.rows].copy_(t)
            state_dict.update(ours)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- LoRA (the engine's, in PEFT's format; see the module docstring) ----------------------
    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Attach a trainable LoRA adapter from a ``peft.LoraConfig`` (or its dict): ``r``,
        ``lora_alpha``, ``target_modules`` (``q_proj`` ... ``down_proj`` or "all-linear"),
        ``lora_dropout``, ``use_rslora``; every base weight is frozen. A-matrices are drawn
        from torch's global generator (``transformers.set_seed`` makes them repeatable)."""
        if adapter_name not in (None, "default"):
            raise ValueError(f"adapter_name: one adapter named 'default' is supported, got {adapter_name!r}")
        fields = adapter_config if isinstance(adapter_config, dict) else adapter_config.to_dict()
        fields = {k: (sorted(v) if isinstance(v, set) else v) for k, v in fields.items()}
        _, lora = read_peft_adapter({}, fields)
        add_lora(self.model, lora.rank, lora.alpha, lora.target_modules, dropout=lora.dropout,
                 use_rslora=lora.use_rslora, dtype=torch.float32, seed=int(torch.randint(2**31 - 1, ())))

    def load_adapter(self, peft_model_id, adapter_name: str | None = None) -> None:
        """Load a PEFT LoRA adapter folder as the model's trainable adapter (added with its
        config when the model has none; else its rank and targets must match)."""
        if adapter_name not in (None, "default"):
            raise ValueError(f"adapter_name: one adapter named 'default' is supported, got {adapter_name!r}")
        load_peft_lora(self.model, peft_model_id)

    # -- what transformers' Trainer and peft touch --------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        """The LM head (the embedding module when the embeddings are tied)."""
        return self.model.embed if self.model.lm_head is None else self.model.lm_head

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: the engine model reads the embedding as its LM head when tied."""

    def _init_weights(self, module) -> None:
        """No-op: the weights come from the checkpoint (or ``__init__``'s random init)."""

    def can_generate(self) -> bool:
        return False

    def floating_point_ops(self, input_dict: dict, exclude_embeddings: bool = True) -> int:
        """6 FLOPs per parameter per kept token (padding costs nothing here)."""
        mask = input_dict.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else input_dict[self.main_input_name].numel()
        return 6 * tokens * self.num_parameters(exclude_embeddings=exclude_embeddings)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """transformers' hook behind ``activation_checkpointing_enable`` / ``_disable`` (and the
        older ``gradient_checkpointing_*`` names): every ``every_n_layers``-th decoder block
        recomputes its activations in the backward through ``gradient_checkpointing_func``
        (torch.utils.checkpoint with the caller's kwargs, ``use_reentrant=False`` by default).
        With frozen embeddings (LoRA) the embedding output is made to require grad, as
        transformers does for its own adapters: transformers 4 checkpoints with
        ``use_reentrant=True``, which passes no gradient to blocks whose inputs do not require it."""
        self.gradient_checkpointing = enable
        if enable and not self.model.embed.weight.requires_grad and getattr(self, "_require_grads_hook", None) is None:
            self.enable_input_require_grads()
        for i, block in enumerate(self.model.layers):
            block.__dict__.pop("forward", None)
            if enable and i % every_n_layers == 0:
                block.forward = partial(gradient_checkpointing_func, type(block).forward.__get__(block))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                num_items_in_batch: torch.Tensor | int | None = None, logits_to_keep: int = 0,
                return_logits: bool | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool = False,
                output_hidden_states: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """transformers' causal-LM forward (steps 1-4 of the module docstring).

        Args:
            input_ids: [B, S] (or [S]) int64 token ids.
            attention_mask: optional [B, S], 0 on padding (dropped before any FLOP).
            labels: optional [B, S] int64, -100 ignored; shifted inside.
            position_ids: optional [B, S] int64; a restart (any step other than +1)
                starts a packed sequence.
            num_items_in_batch: the loss is the sum over targets divided by it (Trainer's
                gradient-accumulation normalisation); else the mean.
            shift_labels (kwargs): optional [B, S] targets already shifted (used as given;
                not a named parameter, so that Trainer's ``label_names``, read from this
                signature, stay ``["labels"]``).
            logits_to_keep: with logits, keep only the last ``k`` positions (0: all).
            return_logits: also return logits when labels are given.
            cu_seq_lens_q/k, max_length_q/k, seq_idx (kwargs, as
                ``DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)``
                adds them): accepted; the sequences are read from ``position_ids`` (which it
                also adds).

        Returns ``CausalLMOutputWithPast`` with ``loss`` (float32 scalar, or None without
        labels) and ``logits`` ([B, S or k, vocab] in the model's dtype, or None).
        """
        shift_labels = kwargs.pop("shift_labels", None)
        unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"EngineForCausalLM.forward got unsupported keyword(s) {unknown}")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        if past_key_values is not None or output_attentions or output_hidden_states:
            raise ValueError("past_key_values, output_attentions and output_hidden_states are not supported "
                             "(generation runs on the engine's sampler)")
        device = self.device
        packed = unpad(input_ids.to(device), None if attention_mask is None else attention_mask.to(device),
                       None if position_ids is None else position_ids.to(device))
        # The kernels take one dtype; autocast (Trainer's bf16=True / fp16=True) would mix
        # them. The model computes in its parameters' dtype: load it in bf16 for bf16 compute.
        with torch.autocast(device.type, enabled=False):
            h = self.model(packed["input_ids"], packed["position_ids"], packed["cu_seqlens"], packed["max_seqlen"])
            loss = logits = None
            if labels is not None or shift_labels is not None:
                loss = self.causal_lm_loss(h, shifted_targets(labels, shift_labels, packed), num_items_in_batch)
            if loss is None or return_logits:
                logits = self.padded_logits(h, packed, logits_to_keep)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def causal_lm_loss(self, hidden: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """transformers' ForCausalLMLoss on hidden [T, hidden] and targets [T] int64 (-100
        ignored) through the fused LM head: the mean, or the sum / ``num_items_in_batch``."""
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = kernels.linear_cross_entropy(hidden, self.model.lm_head_weight, targets, reduction=reduction)
        if num_items_in_batch is None:
            return loss
        n = num_items_in_batch
        return loss / (n.to(loss.device) if torch.is_tensor(n) else n)

    def padded_logits(self, hidden: torch.Tensor, packed: dict, logits_to_keep: int = 0) -> torch.Tensor:
        """[B, S or logits_to_keep, vocab] logits of the packed hidden states [T, hidden], back
        in the batch's padded layout (zeros at padding)."""
        b, s = packed["shape"]
        full = hidden if packed["index"] is None else hidden.new_zeros(b * s, hidden.shape[-1]).index_copy(
            0, packed["index"], hidden)
        full = full.view(b, s, -1)
        if logits_to_keep:
            full = full[:, -logits_to_keep:]
        return self.model.compute_logits(full)

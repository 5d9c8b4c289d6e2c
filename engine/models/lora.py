"""LoRA adapters on the decoder's projections.

``add_lora(model, rank, alpha)`` turns the targeted projections into :class:`LoRALinear`
(same ``weight`` / ``bias`` parameters, so checkpoints load as before), freezes every base
parameter and adds trainable ``lora_a`` / ``lora_b``; each projection then runs
``kernels.lora_linear``. A model without adapters is unchanged.

Layout against PEFT's per-projection adapters (``lora_A.weight`` [r, in], ``lora_B.weight``
[out_i, r], scaling ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``):
our q/k/v and gate/up are fused projections, so their adapters are fused too, exactly:

* ``lora_a`` [n_blocks * r, in]: the blocks' A matrices stacked (q, k, v or gate, up);
* ``lora_b`` [out, r]: the blocks' B matrices stacked along out (the compact form of the
  block-diagonal [out, n_blocks * r] matrix that the forward builds, a few hundred KB),
  so block i's outputs see only block i's rank-r input and one kernel call serves all.

A sub-projection that an adapter does not target (PEFT's common ``["q_proj", "v_proj"]``)
keeps zero A and B rows: it adds nothing, gets zero gradients and is not exported.

A LoRALinear may hold only a part of the projection it computes (engine/parallel's
tensor-parallel subclasses): ``full_in_features`` / ``full_blocks`` give the whole
projection's sizes, ``local_factors`` / ``full_factors`` convert adapter factors between
the whole and this module's part. A new adapter's A is drawn whole from a seeded generator
and cut by ``local_factors``, so it is the same however the projection is split.
Reading and writing PEFT's format, and multi-adapter stacks, are in ``peft.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

# Our projection -> the PEFT / Hugging Face sub-projections it fuses, in row order.
PROJECTIONS = {
    "qkv": ("attn.qkv", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("attn.o", "self_attn", ("o_proj",)),
    "gate_up": ("mlp.gate_up", "mlp", ("gate_proj", "up_proj")),
    "down": ("mlp.down", "mlp", ("down_proj",)),
}
PEFT_TO_OURS = {sub: ours for ours, (_, _, subs) in PROJECTIONS.items() for sub in subs}


@dataclass
class LoRAConfig:
    """What ``add_lora`` attached; ``target_modules`` are PEFT names (``q_proj`` ...)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Linear):
    """nn.Linear with an optional trainable adapter and an optional multi-adapter stack.

    ``blocks``: output sizes of the fused sub-projections (their sum is out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocks: tuple[int, ...] = (),
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.blocks = tuple(blocks) or (out_features,)
        self.register_parameter("lora_a", None)  # [n_blocks * r, in]
        self.register_parameter("lora_b", None)  # [out, r]
        self.scale = 0.0
        self.dropout = 0.0
        # Multi-adapter stacks (set_adapter_stack): [n, R, in], [n, out, R], [n]; not in state_dict.
        for name in ("stack_a", "stack_b", "stack_scales"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def wrap(cls, linear: nn.Linear, blocks: tuple[int, ...]) -> "LoRALinear":
        """A ``cls`` that shares ``linear``'s weight and bias."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocks=blocks, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    # The whole projection, of which a subclass may hold a part (see the module docstring).
    @property
    def full_in_features(self) -> int:
        return self.in_features

    @property
    def full_blocks(self) -> tuple[int, ...]:
        return self.blocks

    def local_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's part of the whole projection's adapter factors
        (A [n_blocks * r, full_in_features], B [sum(full_blocks), r])."""
        return a, b

    def full_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of ``local_factors`` (a subclass may need every holder to call it)."""
        return a, b

    def add_adapter(self, rank: int, scale: float, dropout: float, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A kaiming-uniform (as nn.Linear), B zero, so y is unchanged.
        A is drawn on the CPU from ``generator`` for the whole projection, then cut to this
        module's part, so every holder of a part draws the same."""
        a = torch.empty(len(self.blocks) * rank, self.full_in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        a, b = self.local_factors(a, torch.zeros(sum(self.full_blocks), rank))
        dev = self.weight.device
        self.lora_a = nn.Parameter(a.to(device=dev, dtype=dtype).contiguous())
        self.lora_b = nn.Parameter(b.to(device=dev, dtype=dtype).contiguous())
        self.scale, self.dropout = float(scale), float(dropout)

    def dense_b(self) -> torch.Tensor:
        """lora_b as the [out, n_blocks * r] block-diagonal matrix the kernel multiplies by."""
        if len(self.blocks) == 1:
            return self.lora_b
        return torch.block_diag(*self.lora_b.split(self.blocks))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lora_linear(x, self.bias, adapter_ids)

    def lora_linear(self, x: torch.Tensor, bias: torch.Tensor | None,
                    adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The projection with ``bias`` in place of ``self.bias``; ``adapter_ids`` [T] int32
        serves per-token adapters from the stacks (no autograd)."""
        if adapter_ids is None:
            if self.lora_a is None:
                return F.linear(x, self.weight, bias)
            return kernels.lora_linear(x, self.weight, self.lora_a, self.dense_b(), self.scale, bias=bias,
                                       dropout=self.dropout if self.training else 0.0)
        # A projection no stacked adapter targets has no stack: the base alone.
        if self.stack_a is not None:
            out = kernels.lora_linear_multi(x, self.weight, self.stack_a, self.stack_b, self.stack_scales,
                                            adapter_ids, bias=bias)
        else:
            out = F.linear(x, self.weight, bias)
        if self.lora_a is not None:  # the model's own adapter (a trainer's) serves the tokens with id -1
            own = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.dense_b().to(x.dtype))
            out = out + (self.scale * own) * (adapter_ids < 0).to(out.dtype)[:, None]
        return out


def project(layer: nn.Module, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)``; per-token adapters reach only LoRA projections."""
    if adapter_ids is not None and isinstance(layer, LoRALinear):
        return layer(x, adapter_ids)
    return layer(x)


def projections(model):
    """(layer index, our projection name, parent module, attribute, blocks) for every projection."""
    for i, block in enumerate(model.layers):
        attn = block.attn
        kv = attn.qkv.out_features // (attn.kv_ratio + 2)
        inter = block.mlp.gate_up.out_features // 2
        yield i, "qkv", attn, "qkv", (kv * attn.kv_ratio, kv, kv)
        yield i, "o", attn, "o", ()
        yield i, "gate_up", block.mlp, "gate_up", (inter, inter)
        yield i, "down", block.mlp, "down", ()


def peft_targets(targets) -> tuple[str, ...]:
    """Our names (qkv, o, gate_up, down) or PEFT's (q_proj, ...) -> sorted PEFT names."""
    if isinstance(targets, str):
        targets = (targets,)
    out = set()
    for t in targets:
        if t in PROJECTIONS:
            out.update(PROJECTIONS[t][2])
        elif t in PEFT_TO_OURS:
            out.add(t)
        else:
            raise ValueError(f"target {t!r} is not one of {sorted(PROJECTIONS)} or {sorted(PEFT_TO_OURS)}")
    return tuple(sorted(out))


def add_lora(model, rank: int, alpha: float, targets=("qkv", "o", "gate_up", "down"), *, dropout: float = 0.0,
             use_rslora: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoRAConfig:
    """Attach one trainable adapter per targeted projection and freeze the base model.

    Args:
        rank, alpha: PEFT's ``r`` and ``lora_alpha`` (scale ``alpha / rank``, or
            ``alpha / sqrt(rank)`` with ``use_rslora``).
        targets: our projection names and/or PEFT module names (``q_proj`` ... ``down_proj``).
        dropout: PEFT's ``lora_dropout``, applied in training mode only.
        dtype: adapter parameters' dtype (float32 by default, as PEFT's
            ``autocast_adapter_dtype``); the kernels compute in the activations' dtype.
        seed: seeds the draw of the A matrices (the same adapter at any tp).
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has a LoRA adapter")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    peft = peft_targets(targets)
    config = LoRAConfig(rank, float(alpha), peft, float(dropout), use_rslora)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for _, name, parent, attr, blocks in projections(model):
        subs = PROJECTIONS[name][2]
        if not set(subs) & set(peft):
            continue
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear.wrap(layer, blocks)
            setattr(parent, attr, layer)
        layer.add_adapter(rank, config.scale, dropout, dtype, generator)
        with torch.no_grad():  # sub-projections not targeted: zero A rows, B rows already zero
            for j, sub in enumerate(subs):
                if sub not in peft:
                    layer.lora_a[j * rank:(j + 1) * rank].zero_()
    model.lora_config = config
    return config


def check_adapter_ids(adapter_ids, n_tokens: int, num_adapters: int, device, *, check_values: bool = True) -> None:
    """Raise ValueError naming the argument when ``adapter_ids`` cannot be served."""
    if num_adapters == 0:
        raise ValueError("adapter_ids given but the model has no adapter stack (engine.models.set_adapter_stack)")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype != torch.int32 or tuple(adapter_ids.shape) != (n_tokens,):
        got = f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}" if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        raise ValueError(f"adapter_ids must be an int32 tensor [T={n_tokens}], got {got}")
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, the model on {device}")
    if check_values and n_tokens:
        lo, hi = torch.stack([adapter_ids.min(), adapter_ids.max()]).tolist()
        if lo < -1 or hi >= num_adapters:
            raise ValueError(f"adapter_ids holds {lo if lo < -1 else hi}, outside [-1, {num_adapters}) "
                             f"(-1 means the base model)")

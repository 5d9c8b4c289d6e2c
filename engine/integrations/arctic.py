"""ArcticTraining on the engine: a model factory named ``engine`` and an SFT trainer that takes it.

Importing this module registers, through ArcticTraining's ``RegistryMeta``:

- ``EngineModelFactory`` (``model: {type: engine, name_or_path: ...}``): builds
  ``engine.integrations.hf.EngineForCausalLM`` from a local Hugging Face folder, so
  ArcticTraining's loss (``self.model(**batch).loss``) runs on the engine's packed model and
  fused linear cross-entropy (no ``[tokens, vocab]`` logits). ArcticTraining's packed SFT
  batches (``position_ids`` restarting at 0 per sample) are split into their sequences.
- ``EngineSFTTrainer`` (``type: engine-sft``): ArcticTraining's ``SFTTrainer`` whose
  ``model_factory`` hint also lists ``EngineModelFactory``. Arctic's trainers accept only the
  factories their type hints name, so the stock ``type: sft`` takes ``model: {type: engine}``
  only with ``skip_validation: true`` (which also skips every other check of the recipe).

A recipe loads this module through its ``code:`` script (a file holding
``import engine.integrations.arctic``)::

    type: engine-sft
    code: train.py
    model: {type: engine, name_or_path: /ckpt/Qwen3-0.6B, dtype: bfloat16}
    data: {sources: [HuggingFaceH4/ultrachat_200k], max_length: 4096}

What maps and what does not:

- ``dtype``: the parameters' dtype (the kernels compute in it). ``attn_implementation`` is
  ignored: attention is always the engine's varlen kernel.
- ``peft_config`` with ``peft_type: Lora`` (ArcticTraining's spelling: peft's config class
  prefix): the engine's own LoRA on the same target modules (``EngineForCausalLM.add_adapter``;
  peft's ``get_peft_model`` cannot wrap the fused q/k/v and gate/up projections). Other PEFT
  types raise.
- Activation checkpointing (on unless ``disable_activation_checkpoint``): per decoder block.
- Refused with a clear error: ``sequence_parallel_size`` > 1 (Arctic's Ulysses path calls the
  transformers body and LM head separately) and ZeRO stage 3 (the fused LM-head loss reads
  the head's weight outside the module forward that ZeRO-3 gathers it for). ZeRO 0-2 and
  DeepSpeed's data parallelism wrap the model unchanged.

ArcticTraining (``pip install 'engine[arctic]'``) pins ``transformers<5``; the engine runs on
transformers 4.57 as on 5. Nothing else in ``engine`` imports this module.
"""
from __future__ import annotations

from typing import Union

from arctic_training.config.model import ModelConfig
from arctic_training.model.factory import ModelFactory
from arctic_training.model.hf_factory import HFModelFactory
from arctic_training.model.liger_factory import LigerModelFactory
from arctic_training.trainer.sft_trainer import SFTTrainer
from transformers import AutoConfig, PretrainedConfig

from engine.integrations.hf import EngineForCausalLM


class EngineModelFactory(ModelFactory):
    """``model: {type: engine}``: ``EngineForCausalLM`` from ``name_or_path`` (a local folder
    with config.json + safetensors), in ``dtype``, with ``hf_config_kwargs`` set on the
    attached transformers config (as ArcticTraining's ``huggingface`` factory does)."""

    name = "engine"
    config: ModelConfig

    def create_config(self) -> PretrainedConfig:
        config = AutoConfig.from_pretrained(self.config.name_or_path)
        for key, value in self.config.hf_config_kwargs.items():
            setattr(config, key, value)
        return config

    def create_model(self, model_config) -> EngineForCausalLM:
        trainer_config = self.trainer.config
        if trainer_config.sequence_parallel_size != 1:
            raise ValueError(f"sequence_parallel_size must be 1 with model type 'engine', got "
                             f"{trainer_config.sequence_parallel_size} (ArcticTraining's Ulysses path calls a "
                             f"transformers body and LM head separately, which this model does not expose)")
        if trainer_config.zero_3_enabled:
            raise ValueError("deepspeed.zero_optimization.stage must be 0, 1 or 2 with model type 'engine', got 3 "
                             "(the fused LM-head loss reads the head's weight outside ZeRO-3's gathered forward)")
        # On the host, as ArcticTraining's huggingface factory loads: deepspeed.initialize moves it.
        return EngineForCausalLM.from_pretrained(self.config.name_or_path, config=model_config,
                                                 dtype=self.config.dtype.value)

    def post_create_model_callback(self, model: EngineForCausalLM) -> EngineForCausalLM:
        """LoRA from ``peft_config`` and activation checkpointing, as the huggingface factory
        applies them, on the engine's own LoRA."""
        if self.config.peft_config is not None:
            peft_type = str(self.config.peft_config["peft_type"]).upper()
            if peft_type != "LORA":
                raise ValueError(f"model.peft_config.peft_type must be 'Lora' with model type 'engine', "
                                 f"got {self.config.peft_config['peft_type']!r}")
            model.add_adapter(self.config.peft_config_obj)
        if not self.config.disable_activation_checkpoint:
            model.gradient_checkpointing_enable()  # also makes the embedding output require grad under LoRA
        return model


class EngineSFTTrainer(SFTTrainer):
    """``type: engine-sft``: ArcticTraining's SFT trainer (same loss, data, optimizers and
    checkpoint engines) that also accepts ``model: {type: engine}``."""

    name = "engine-sft"
    model_factory: Union[EngineModelFactory, HFModelFactory, LigerModelFactory]

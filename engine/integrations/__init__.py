"""The shapes other frameworks expect, on the engine's models and kernels.

``engine.integrations.hf.EngineForCausalLM``: a transformers causal LM (``from_pretrained``,
``forward(input_ids, attention_mask, labels, ...)``, ``save_pretrained``) for transformers'
``Trainer``, TRL and the frameworks built on that calling convention.

``engine.integrations.arctic``: ArcticTraining's model factory ``engine`` and trainer
``engine-sft`` on that model (needs ``arctic_training``).

``engine.integrations.areal.EngineTrainEngine`` / ``EngineInferenceEngine``: AReaL's
abstract ``TrainEngine`` and ``InferenceEngine`` (the latter in ``areal_rollout.py``).

Submodules are imported by name (``from engine.integrations.hf import EngineForCausalLM``)
so that each framework is needed only by the integration that uses it.
"""

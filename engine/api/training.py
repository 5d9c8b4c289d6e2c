"""TrainingModel: the object ``spawn_train`` returns.

Every method returns a :class:`Future` and runs on one worker thread per model, so calls
execute in submission order (a ``forward_backward`` and an ``optim_step`` may both be
submitted before waiting) and an exception lands in its future, leaving the model usable.
Inputs are checked inside the call, so a bad datum fails its own future, not the caller.
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any, Callable

import torch

from engine.train import losses
from engine.train.trainer import Trainer

from .types import AdamParams, Future, ForwardBackwardOutput, OptimStepOutput, as_ints, as_tensor

_INT_INPUTS = ("target_tokens",)


class TrainingModel:
    def __init__(self, trainer: Trainer, *, source: Path, checkpoint_dir: Path, info: dict):
        self._trainer = trainer
        self._source = source
        self._checkpoint_dir = checkpoint_dir
        self._info = info
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-train")
        self._sampler = None  # the sampling client sharing this model's weights

    def _submit(self, fn: Callable, *args) -> Future:
        def call():
            if self._sampler is None:
                return fn(*args)
            # A sampling client shares the weights: train between its steps, never during one.
            return self._sampler.run_between_steps(lambda: fn(*args)).result()
        return Future(self._executor.submit(call))

    # -- inputs -------------------------------------------------------------------------------
    def _prepare(self, data, required: tuple[str, ...], optional: dict[str, float]):
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise ValueError(f"data must be a list of Datum, got {type(data).__name__}")
        out = []
        for i, datum in enumerate(data):
            if not hasattr(datum, "model_input") or not hasattr(datum, "loss_fn_inputs"):
                raise ValueError(f"data[{i}] must be a Datum(model_input, loss_fn_inputs), got {type(datum).__name__}")
            tokens = as_ints(datum.model_input, where=f"data[{i}].model_input")
            n = len(tokens)
            if n == 0:
                raise ValueError(f"data[{i}].model_input is empty; every datum needs at least one token")
            bad = [t for t in tokens if not 0 <= t < self._trainer.vocab]
            if bad:
                raise ValueError(f"data[{i}].model_input holds token id {bad[0]}, outside the vocabulary "
                                 f"[0, {self._trainer.vocab})")
            given = dict(datum.loss_fn_inputs or {})
            missing = [k for k in required if k not in given]
            if missing:
                raise ValueError(f"data[{i}].loss_fn_inputs is missing {missing}; this loss needs {list(required)}"
                                 + (f" (optional: {sorted(optional)})" if optional else ""))
            unknown = sorted(set(given) - set(required) - set(optional))
            if unknown:
                raise ValueError(f"data[{i}].loss_fn_inputs has unknown key(s) {unknown}; this loss takes "
                                 f"{list(required) + sorted(optional)}")
            inputs = {}
            for key in list(required) + sorted(optional):
                where = f"data[{i}].loss_fn_inputs[{key!r}]"
                if key not in given:
                    inputs[key] = torch.full((n,), float(optional[key]))
                    continue
                t = as_tensor(given[key], where=where)
                if t.shape[0] != n:
                    raise ValueError(f"{where} has length {t.shape[0]}, model_input has {n} tokens (one value per token)")
                if key in _INT_INPUTS:
                    if t.is_floating_point() and not torch.equal(t, t.round()):
                        raise ValueError(f"{where} must hold integer token ids, got {t.dtype}")
                    t = t.long()
                    if n and (int(t.min()) < 0 or int(t.max()) >= self._trainer.vocab):
                        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
                        raise ValueError(f"{where} holds token id {bad}, outside the vocabulary [0, {self._trainer.vocab})")
                else:
                    t = t.float()
                inputs[key] = t
            out.append((tokens, inputs))
        return out

    def _builtin(self, data, loss_fn, loss_fn_config, backward: bool) -> ForwardBackwardOutput:
        spec, _ = losses.resolve_loss(loss_fn, loss_fn_config, scoring=self._trainer.value_head is not None)
        prepared = self._prepare(data, spec.inputs, spec.defaults)
        outputs, metrics = self._trainer.run(prepared, loss_fn, loss_fn_config, backward)
        return ForwardBackwardOutput(outputs, metrics)

    # -- the API ------------------------------------------------------------------------------
    def forward(self, data, loss_fn: str, loss_fn_config: dict | None = None) -> Future:
        """Loss and per-datum outputs without gradients."""
        return self._submit(self._builtin, data, loss_fn, loss_fn_config, False)

    def forward_backward(self, data, loss_fn: str, loss_fn_config: dict | None = None) -> Future:
        """Accumulate the gradient of a built-in loss (sum over tokens) into the model."""
        return self._submit(self._builtin, data, loss_fn, loss_fn_config, True)

    def forward_backward_custom(self, data, fn: Callable[[list, list[torch.Tensor]], tuple[torch.Tensor, dict]]) -> Future:
        """``fn(data, logprobs_list) -> (loss, metrics)``: any differentiable loss of the
        per-datum logprob tensors [N_i]; costs one extra forward pass."""
        def call():
            prepared = self._prepare(data, ("target_tokens",), {"weights": 1.0})
            outputs, metrics = self._trainer.forward_backward_custom(prepared, lambda _, lps: fn(data, lps))
            return ForwardBackwardOutput(outputs, metrics)
        return self._submit(call)

    def optim_step(self, adam_params: AdamParams) -> Future:
        """One AdamW step (torch.optim.AdamW with these hyperparameters) on the accumulated
        gradients, after clipping their global norm when ``grad_clip_norm`` > 0; then zero them."""
        def call():
            p = adam_params
            for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
                if not hasattr(p, name):
                    raise ValueError(f"adam_params must be an AdamParams, missing {name!r}")
            if not p.learning_rate >= 0:
                raise ValueError(f"adam_params.learning_rate must be >= 0, got {p.learning_rate!r}")
            out = OptimStepOutput(self._trainer.optim_step(
                float(p.learning_rate), float(p.beta1), float(p.beta2), float(p.eps), float(p.weight_decay),
                float(p.grad_clip_norm or 0.0)))
            if self._sampler is not None and not self._sampler.closed:  # its shared weights changed: new version
                self._sampler.update_weights()
            return out
        return self._submit(call)

    def _path(self, name: str) -> Path:
        if not isinstance(name, (str, Path)) or not str(name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        path = Path(name)
        return path if path.is_absolute() or len(path.parts) > 1 else self._checkpoint_dir / path

    def save_state(self, name: str) -> Future:
        """Trainable weights, optimizer state and step counter; the future gives the path."""
        return self._submit(lambda: str(self._trainer.save_state(self._path(name))))

    def load_state(self, path: str) -> Future:
        """Weights only; the optimizer state starts fresh."""
        return self._submit(lambda: self._trainer.load_state(Path(path), False))

    def load_state_with_optimizer(self, path: str) -> Future:
        return self._submit(lambda: self._trainer.load_state(Path(path), True))

    def save_weights_for_sampler(self, name: str) -> Future:
        """A PEFT adapter folder under LoRA, else a folder that transformers loads."""
        return self._submit(lambda: str(self._trainer.save_for_sampler(self._source, self._path(name))))

    def save_weights_and_get_sampling_client(self, name: str | None = None, **kwargs):
        """A sampling client (``engine.infer.InferenceModel``) that shares this model's
        weights, adapter included, without a copy: after each ``optim_step`` it samples from
        the new weights and its version (``SampledSequence.weight_version``) increases. With
        ``name``, the weights are also saved for a sampler first. One client per model;
        ``kwargs`` (kv_cache_tokens, ...) apply when it is first made."""
        if name is not None:
            self.save_weights_for_sampler(name).result()
        if self._sampler is None or self._sampler.closed:
            self._sampler = None
            if self._trainer.value_head is not None:
                raise ValueError("a scoring model has no sampler")
            from engine.infer import InferenceModel

            kwargs.setdefault("gpu_memory_fraction", 0.3)  # it shares the GPU with training
            # A tensor-parallel trainer's ranks serve their own shards (engine/infer/runner.py).
            target = getattr(self._trainer, "model", None)
            target = self._trainer.pool if target is None else target
            # Made on the training thread: no call of this model is in flight meanwhile.
            self._sampler = self._submit(
                lambda: InferenceModel(target, max_batch_size=kwargs.pop("max_batch_size", 2048), **kwargs)).result()
        return self._sampler

    def create_sampling_client(self, path: str, **kwargs):
        """A sampling client of weights saved by ``save_weights_for_sampler``: a PEFT adapter
        folder (served on this model's base checkpoint) or a full Hugging Face folder. It
        runs at this model's tp unless ``tp=`` says otherwise."""
        from engine.infer import InferenceModel

        folder = Path(path)
        kwargs.setdefault("tp", self._info["tp"])  # the same number of ranks as this model
        if (folder / "adapter_config.json").is_file():
            return InferenceModel(self._source, adapter=str(folder), **kwargs)
        if (folder / "config.json").is_file():
            return InferenceModel(folder, **kwargs)
        raise FileNotFoundError(f"path {str(path)!r}: neither a PEFT adapter folder nor a Hugging Face model folder")

    def get_info(self) -> dict[str, Any]:
        return {**self._info, "step": self._trainer.step}

    def get_tokenizer(self):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((self._source / n).is_file() for n in names):
            raise ValueError(f"{self._source}: no tokenizer files ({', '.join(names)}) in the checkpoint folder")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self._source))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._sampler is not None:
            self._sampler.close()
        if hasattr(self._trainer, "close"):
            self._trainer.close()

    # Tinker's *_async spelling: ``fut = await model.forward_backward_async(...)``, then ``await fut``.
    async def forward_async(self, *a, **k) -> Future:
        return self.forward(*a, **k)

    async def forward_backward_async(self, *a, **k) -> Future:
        return self.forward_backward(*a, **k)

    async def forward_backward_custom_async(self, *a, **k) -> Future:
        return self.forward_backward_custom(*a, **k)

    async def optim_step_async(self, *a, **k) -> Future:
        return self.optim_step(*a, **k)

    async def save_state_async(self, *a, **k) -> Future:
        return self.save_state(*a, **k)

    async def save_weights_for_sampler_async(self, *a, **k) -> Future:
        return self.save_weights_for_sampler(*a, **k)

"""``engine.model(path)`` -> ModelBuilder -> ``spawn_train(max_batch_size=...)``.

The builder only records choices; ``spawn_train`` checks them together (so an invalid
combination fails there, with a message naming the option) and loads the model.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import threading
from pathlib import Path

import torch

from engine.models import add_lora, load_config, load_model, load_tokenizer, share_weights
from engine.parallel import LAUNCHERS, check_tp
from engine.train.memory import check_training_memory
from engine.train.remote import RemoteTrainer
from engine.train.trainer import Trainer, enable_activation_checkpointing

from .training import TrainingModel

_REGISTRY: dict[str, Path] = {}
_SCHEME = "model_registry://"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def register_model(name: str, path: str | Path) -> None:
    """Make ``model_registry://<name>`` (and the bare ``name``) resolve to a local folder."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    _REGISTRY[name] = Path(path)


def registered_models() -> dict[str, Path]:
    """Every name ``register_model`` made, with its folder."""
    return dict(_REGISTRY)


def resolve_path(path_or_name: str | Path) -> Path:
    s = str(path_or_name)
    if s.startswith(_SCHEME):
        name = s[len(_SCHEME):]
        if name not in _REGISTRY:
            raise ValueError(f"model {s!r} is not registered; registered: {sorted(_REGISTRY) or 'none'} "
                             f"(engine.register_model(name, path))")
        return _REGISTRY[name]
    if s in _REGISTRY and not Path(s).exists():
        return _REGISTRY[s]
    return Path(s)


class ModelBuilder:
    def __init__(self, path_or_name: str | Path):
        self._name = str(path_or_name)
        self._path = resolve_path(path_or_name)
        if not (self._path / "config.json").is_file():
            raise FileNotFoundError(f"model {self._name!r}: {str(self._path)!r} is not a checkpoint folder "
                                    f"with a config.json")
        self._tp = 1
        self._dp = 1
        self._adapter: dict | None = None
        self._scoring = False
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._activation_checkpointing = False
        self._master_weights = True
        self._shared: dict | None = None  # shared_base(): {(dtype, device): the loaded base model}

    def _with(self, **changes) -> "ModelBuilder":
        new = copy.copy(self)
        for k, v in changes.items():
            setattr(new, "_" + k, v)
        return new

    def tp(self, n: int) -> "ModelBuilder":
        """Tensor-parallel degree (one process per rank)."""
        return self._with(tp=n)

    def dp(self, n: int) -> "ModelBuilder":
        """Data-parallel degree: ``n`` replicas of the (tp-way) model, ``n · tp`` processes;
        each batch is split over the replicas by tokens, gradients summed, the optimizer
        state sharded over them (engine/train/data_parallel.py)."""
        return self._with(dp=n)

    def with_adapter(self, rank: int = 16, alpha: float | None = None, target_modules=None,
                     dropout: float = 0.0, seed: int = 0) -> "ModelBuilder":
        """Train a LoRA adapter (PEFT semantics; default alpha = 2 * rank, every linear layer)
        instead of the full weights. ``seed`` draws the A matrices (B starts at zero)."""
        if target_modules is not None and not isinstance(target_modules, str) and len(list(target_modules)) == 0:
            raise ValueError("target_modules=[] names no layer to adapt; leave it None for every linear layer, "
                             "or name them (PEFT's names, e.g. ['q_proj', 'v_proj'])")
        return self._with(adapter=dict(rank=rank, alpha=2 * rank if alpha is None else alpha,
                                       targets=target_modules, dropout=dropout, seed=seed))

    def named(self, name: str) -> "ModelBuilder":
        """The name the models report (``get_info().model_name``, ``get_base_model()``) in
        place of the path or registered name it was opened with (a served base model's name,
        e.g. ``"Qwen/Qwen3-0.6B"``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        return self._with(name=name)

    def into_scoring_model(self) -> "ModelBuilder":
        """A scalar value head on the final hidden states instead of the LM head (value and
        reward models); losses ``mse`` and ``ranking``."""
        return self._with(scoring=True)

    def dtype(self, dtype: str | torch.dtype) -> "ModelBuilder":
        return self._with(dtype=dtype)

    def device(self, device: str | torch.device) -> "ModelBuilder":
        return self._with(device=device)

    def activation_checkpointing(self, on: bool = True) -> "ModelBuilder":
        """Recompute each block's activations in the backward (less memory, ~1/3 more compute)."""
        return self._with(activation_checkpointing=on)

    def master_weights(self, on: bool = True) -> "ModelBuilder":
        """Full fine-tuning of a bf16/fp16 model keeps fp32 master weights, fp32 gradients and
        fp32 AdamW state, the model's weights being the masters rounded (on by default: 18 B
        per parameter of a bf16 model, engine/train/trainer.py). ``master_weights(False)``
        trains the bf16 weights directly with bf16 AdamW state (8 B per parameter), which
        loses updates below the weights' precision and drifts from fp32 training. No effect
        on fp32 models nor on LoRA adapters (fp32 already)."""
        return self._with(master_weights=bool(on))

    def shared_base(self) -> "ModelBuilder":
        """Load the base weights once, at the first spawn, and give every ``spawn_train`` (LoRA
        only: full-weight training would change them for all) and ``spawn_inference`` of this
        builder and of the builders derived from it a model sharing them (``share_weights``):
        several adapters train and a sampler serves on one copy of the base. tp=1 only."""
        return self._with(shared={}, shared_lock=threading.Lock())

    def _load(self, dtype: torch.dtype, device: torch.device):
        """The model a tp=1 spawn runs: its own, or one sharing this builder's base weights."""
        if self._shared is None:
            return load_model(self._path, dtype=dtype, device=device)
        key = (dtype, str(device))
        with self._shared_lock:  # spawns on several threads load it once
            if key not in self._shared:
                self._shared[key] = load_model(self._path, dtype=dtype, device=device)
        return share_weights(self._shared[key])

    def _check(self, max_batch_size) -> tuple[torch.dtype, torch.device]:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int (tokens per micro-batch), got {max_batch_size!r}")
        if isinstance(self._tp, bool) or not isinstance(self._tp, int) or self._tp < 1:
            raise ValueError(f"tp must be a positive int, got {self._tp!r}")
        if isinstance(self._dp, bool) or not isinstance(self._dp, int) or self._dp < 1:
            raise ValueError(f"dp must be a positive int, got {self._dp!r}")
        if self._tp > 1:
            check_tp(load_config(self._path), self._tp)
        if (self._tp > 1 or self._dp > 1) and self._shared is not None:
            raise ValueError(f"shared_base() shares weights within one process; tp must be 1 and dp 1, "
                             f"got tp={self._tp}, dp={self._dp}")
        device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but no CUDA GPU is available")
        dtype = self._dtype
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if self._adapter is not None:
            a = self._adapter
            if isinstance(a["rank"], bool) or not isinstance(a["rank"], int) or a["rank"] < 1:
                raise ValueError(f"with_adapter: rank must be a positive int, got {a['rank']!r}")
            if not a["alpha"] > 0:
                raise ValueError(f"with_adapter: alpha must be positive, got {a['alpha']!r}")
            if not 0.0 <= a["dropout"] < 1.0:
                raise ValueError(f"with_adapter: dropout must be in [0, 1), got {a['dropout']!r}")
            if isinstance(a["seed"], bool) or not isinstance(a["seed"], int):
                raise ValueError(f"with_adapter: seed must be an int, got {a['seed']!r}")
        load_config(self._path)  # an unsupported model_type fails here, before any weights load
        return dtype, device

    def spawn_train(self, max_batch_size: int, *, checkpoint_dir: str | Path = "checkpoints",
                    launcher: str | None = None) -> TrainingModel:
        """Load the model for training. ``max_batch_size``: tokens per micro-batch (data are
        packed into micro-batches by first-fit-decreasing; the gradient is that of the whole
        batch). On CUDA the optimizer state is allocated and one forward/backward of
        ``max_batch_size`` tokens runs here (on every rank), so a batch that cannot fit fails
        now, with ``torch.cuda.OutOfMemoryError`` giving the largest max_batch_size that fits
        (engine/train/memory.py). ``checkpoint_dir``: where ``save_state(name)`` writes a bare
        name (engine/api/training.py, "Checkpoint names"). ``launcher``: where the ranks of a
        tp/dp model run: ``"local"`` (processes of this machine), ``"ray"`` (Ray actors in a
        placement group, any node of the cluster; also at tp = dp = 1), or None: Ray when
        ``ray.init`` was called in this process, else local (engine/parallel/ray_workers.py)."""
        if launcher is not None and launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS} or None, got {launcher!r}")
        dtype, device = self._check(max_batch_size)
        adapter = None
        if self._shared is not None and self._adapter is None:
            raise ValueError("shared_base(): only a LoRA adapter may train on shared base weights; "
                             "call with_adapter(...) or drop shared_base()")
        if self._adapter is not None:
            a = self._adapter
            adapter = dict(a, targets=a["targets"] or ("qkv", "o", "gate_up", "down"))
        if self._tp > 1 or self._dp > 1 or launcher == "ray":  # one process per rank (engine/train/remote.py)
            trainer = RemoteTrainer(self._tp, self._path, dtype=dtype, adapter=adapter, scoring=self._scoring,
                                    activation_checkpointing=self._activation_checkpointing,
                                    max_batch_size=max_batch_size, vocab=load_config(self._path).vocab_size,
                                    master_weights=self._master_weights, dp=self._dp, launcher=launcher)
            described = trainer.info
        else:
            model = self._load(dtype, device)
            if adapter is not None:
                add_lora(model, adapter["rank"], adapter["alpha"], adapter["targets"], dropout=adapter["dropout"],
                         seed=adapter["seed"])
            if self._activation_checkpointing:
                enable_activation_checkpointing(model)
            trainer = Trainer(model, max_batch_size=max_batch_size, scoring=self._scoring, lora=adapter is not None,
                              master_weights=self._master_weights)
            check_training_memory(trainer)
            described = trainer.describe()
        info = {"model": self._name, "path": str(self._path), "model_type": load_config(self._path).model_type,
                "tp": self._tp, "dp": self._dp, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                "max_batch_size": max_batch_size, "scoring_model": self._scoring,
                "lora": None if adapter is None else {"rank": adapter["rank"], "alpha": adapter["alpha"],
                                                      "target_modules": described["target_modules"]},
                "parameters": described["parameters"], "trainable_parameters": described["trainable_parameters"],
                "activation_checkpointing": self._activation_checkpointing,
                "master_weights": described["master_weights"]}
        return TrainingModel(trainer, source=self._path, checkpoint_dir=Path(checkpoint_dir), info=info)

    def spawn_inference(self, max_batch_size: int = 2048, **kwargs):
        """Serve the base model (``engine.infer.InferenceModel``: continuous batching over a
        paged KV cache; with ``.tp(n)``, one process per rank). Requests name their LoRA
        adapter (a PEFT folder) with ``adapter=``;
        ``kwargs`` go to InferenceModel (kv_cache_tokens, block_size, max_adapters, ...). On
        CUDA the KV cache takes ``gpu_memory_fraction`` (default 0.9) of the memory free once
        the weights are loaded, unless ``kv_cache_tokens`` sizes it."""
        dtype, device = self._check(max_batch_size)
        if self._dp > 1:
            raise ValueError(f"dp={self._dp} is for training (replicas that split each batch); an inference "
                             "model serves at tp ranks: drop .dp()")
        if self._adapter is not None or self._scoring:
            raise ValueError("with_adapter / into_scoring_model are for training; name an adapter per request "
                             "(sample(..., adapter=path)) or use create_sampling_client")
        from engine.infer import InferenceModel

        kwargs.setdefault("base_model", self._name)
        source = self._path if self._shared is None else self._load(dtype, device)
        return InferenceModel(source, max_batch_size=max_batch_size, dtype=dtype, device=device, tp=self._tp,
                              tokenizer=load_tokenizer(self._path), **kwargs)

    async def spawn_inference_async(self, max_batch_size: int = 2048, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.spawn_inference, max_batch_size, **kwargs))

    async def spawn_train_async(self, max_batch_size: int, **kwargs) -> TrainingModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.spawn_train, max_batch_size, **kwargs))


def model(path_or_name: str | Path) -> ModelBuilder:
    """A builder for a local Hugging Face checkpoint folder or a registered name."""
    return ModelBuilder(path_or_name)

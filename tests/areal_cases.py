"""engine.integrations.areal under AReaL 1.0.4's own classes: its PPO actor computes logprobs
and takes steps through EngineTrainEngine, forward_batch does not depend on the micro-batch
split, and a RolloutWorkflow runs through EngineInferenceEngine, trains the train engine,
and a disk weight update raises the inference side's version.

AReaL pins torch<2.11, so it is installed with --no-deps into its own folder and these
cases run in a pytest process of their own with that folder first on sys.path (its
antlr4 4.9.3 shadows ours, and importing it installs uvloop's event loop policy):
tests/test_areal_integration.py does both. By hand: ``pip install --no-deps --target
~/.cache/engine-areal-site -r tests/areal_requirements.txt`` then ``python -m pytest
tests/areal_cases.py``; without that folder the module is skipped.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch

_POLICY = asyncio.get_event_loop_policy()  # areal.api.cli_args calls uvloop.install() on import
SITE = Path(os.environ.get("ENGINE_AREAL_SITE", Path.home() / ".cache" / "engine-areal-site"))
if SITE.is_dir() and str(SITE) not in sys.path:
    sys.path.insert(0, str(SITE))
areal = pytest.importorskip(
    "areal", reason=f"AReaL is not installed in {SITE}: run pip install --no-deps --target {SITE} "
                    f"-r tests/areal_requirements.txt (or set ENGINE_AREAL_SITE)")

from areal.api.cli_args import (GenerationHyperparameters, InferenceEngineConfig, MicroBatchSpec,  # noqa: E402
                                OptimizerConfig, PPOActorConfig, TrainEngineConfig)
from areal.api.alloc_mode import ParallelStrategy  # noqa: E402
from areal.api.engine_api import InferenceEngine, TrainEngine  # noqa: E402
from areal.api.io_struct import FinetuneSpec, ModelRequest, SaveLoadMeta, WeightUpdateMeta  # noqa: E402
from areal.api.workflow_api import RolloutWorkflow  # noqa: E402
from areal.trainer.ppo.actor import PPOActor  # noqa: E402
from areal.utils.dynamic_import import import_from_string  # noqa: E402

from engine.integrations.areal import EngineInferenceEngine, EngineTrainEngine, micro_batches  # noqa: E402

asyncio.set_event_loop_policy(_POLICY)  # the rest of the test run keeps asyncio's own loops

VOCAB = 259  # the tiny preset's vocabulary


def train_engine(folder, **mb) -> EngineTrainEngine:
    cfg = TrainEngineConfig(path=str(folder), dtype="float32", backend="engine", mb_spec=MicroBatchSpec(**mb),
                            optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0, gradient_clipping=1.0))
    eng = EngineTrainEngine(cfg)
    eng.create_process_group()
    eng.initialize(None, FinetuneSpec(total_train_epochs=1, dataset_size=8, train_batch_size=4))
    return eng


def padded_batch(lengths, prompt: int = 3, seed: int = 0) -> dict:
    """AReaL's right-padded rollout batch: prompt tokens then a response per row."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths)
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        mask[i, :n] = True
    loss_mask = mask.clone()
    loss_mask[:, :prompt] = False
    logprobs = torch.where(loss_mask, -torch.rand(b, s, generator=g) * 3, 0.0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask.int(), "logprobs": logprobs,
            "rewards": torch.randn(b, generator=g), "versions": torch.where(loss_mask, 0, -1)}


def test_class_paths_and_abstract_methods():
    for cls, base in ((EngineTrainEngine, TrainEngine), (EngineInferenceEngine, InferenceEngine)):
        path = f"{cls.__module__}.{cls.__name__}"  # how TrainController / RolloutController name the class
        resolved = import_from_string(path)  # how the engine-creation endpoint resolves it
        assert resolved is cls and issubclass(resolved, base)
        assert not cls.__abstractmethods__
    assert isinstance(import_from_string("engine.integrations.areal.EngineTrainEngine")(TrainEngineConfig(
        backend="engine")), TrainEngine)


def test_micro_batches_follow_spec():
    lengths = [5, 9, 2, 7, 3, 8]
    assert sorted(i for b in micro_batches(lengths, MicroBatchSpec()) for i in b) == list(range(6))
    assert len(micro_batches(lengths, MicroBatchSpec(n_mbs=4))) >= 4
    for b in micro_batches(lengths, MicroBatchSpec(max_tokens_per_mb=10)):
        assert sum(lengths[i] for i in b) <= 10
    for b in micro_batches(lengths, MicroBatchSpec(n_mbs=3, granularity=2)):
        assert len(b) % 2 == 0 and all(b[k] // 2 == b[k + 1] // 2 for k in range(0, len(b), 2))
    with pytest.raises(ValueError, match="max_tokens_per_mb"):
        micro_batches(lengths, MicroBatchSpec(max_tokens_per_mb=8))


def test_forward_batch_same_for_any_micro_batch_split(checkpoint):
    folder = checkpoint("qwen2")
    data = padded_batch([7, 12, 1, 9, 4], prompt=1)
    one = train_engine(folder)
    ref = one.forward_batch(data)
    assert ref.shape == data["input_ids"].shape and ref.dtype == torch.float32

    def nll(logprobs, entropy, mb):  # a normalised per-micro-batch loss, as AReaL's losses are
        mask = mb["loss_mask"].roll(-1).bool()
        return -logprobs[mask].mean()

    def weight(mb):
        return mb["loss_mask"].count_nonzero()

    ref_loss = one.eval_batch(data, nll, weight)
    for spec in ({"n_mbs": 3}, {"max_tokens_per_mb": 13}, {"n_mbs": 5, "granularity": 1}):
        eng = train_engine(folder, **spec)
        torch.testing.assert_close(eng.forward_batch(data), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eng.eval_batch(data, nll, weight), ref_loss, rtol=1e-5, atol=1e-6)
    # Against the transformers model: logprob of the next token at each kept position.
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(data["input_ids"], attention_mask=data["attention_mask"].long()).logits
    want = logits.log_softmax(-1)[:, :-1].gather(-1, data["input_ids"][:, 1:, None])[..., 0]
    keep = data["attention_mask"][:, 1:]
    torch.testing.assert_close(ref[:, :-1][keep], want[keep], rtol=1e-4, atol=1e-4)


def test_ppo_actor_steps_through_engine(checkpoint, tmp_path):
    eng = train_engine(checkpoint("qwen2"), n_mbs=2)
    actor = PPOActor(PPOActorConfig(ppo_n_minibatches=2, recompute_logprob=True, use_decoupled_loss=True,
                                    kl_ctl=0.0, adv_norm=None), eng)
    data = padded_batch([9, 6, 11, 8], prompt=3, seed=1)
    data["prox_logp"] = actor.compute_logp([data])[0]
    assert data["prox_logp"].shape == data["input_ids"].shape
    data = actor.compute_advantages([data])[0]
    before = [p.detach().clone() for p in eng.model.parameters()]
    actor.ppo_update([data])
    assert eng.get_version() == 0 and eng.get_device_stats().mem_total >= 0
    with pytest.raises(ValueError, match="one process"):
        eng.create_process_group(ParallelStrategy(data_parallel_size=2))
    moved = sum(not torch.equal(a, p) for a, p in zip(before, eng.model.parameters()))
    assert moved == len(before)
    # Saved weights (and optimizer) round-trip.
    eng.save(SaveLoadMeta(path=str(tmp_path / "ckpt"), weight_format="hf", with_optim=True))
    other = train_engine(checkpoint("qwen2"))
    other.load(SaveLoadMeta(path=str(tmp_path / "ckpt"), weight_format="hf", with_optim=True))
    for a, b in zip(eng.model.parameters(), other.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class TinyRLVR(RolloutWorkflow):
    """RLVRWorkflow's trajectory layout without a tokenizer: reward = share of even tokens."""

    def __init__(self, max_new_tokens: int = 5):
        self.gconfig = GenerationHyperparameters(max_new_tokens=max_new_tokens, temperature=1.0)

    async def arun_episode(self, engine, data):
        resp = await engine.agenerate(ModelRequest(input_ids=data["prompt"], gconfig=self.gconfig))
        assert resp.stop_reason in ("stop", "length") and len(resp.output_logprobs) == resp.output_len
        n_in, n_out = resp.input_len, resp.output_len
        seq = resp.input_tokens + resp.output_tokens
        reward = sum(t % 2 == 0 for t in resp.output_tokens) / max(n_out, 1)
        return {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.bool),
                "loss_mask": torch.tensor([[0] * n_in + [1] * n_out]),
                "logprobs": torch.tensor([[0.0] * n_in + resp.output_logprobs]),
                "versions": torch.tensor([[-1] * n_in + resp.output_versions]), "rewards": torch.tensor([reward])}


@pytest.mark.timeout(300)
def test_workflow_rollout_trains_and_updates_weights(checkpoint, tmp_path):
    folder = checkpoint("qwen2")
    rollout = EngineInferenceEngine(InferenceEngineConfig(backend="engine", max_concurrent_rollouts=4,
                                                          consumer_batch_size=4),
                                    model_path=str(folder), dtype=torch.float32, max_batch_size=256,
                                    kv_cache_tokens=512)
    rollout.initialize()
    try:
        eng = train_engine(folder)
        eng.connect_engine(rollout, WeightUpdateMeta(type="disk", path=str(tmp_path / "w")))
        prompts = [{"prompt": [3, 5, 7]}, {"prompt": [11, 2]}, {"prompt": [4, 4, 8, 1]}]
        batch = eng.rollout_batch(prompts, "tests.areal_cases.TinyRLVR", workflow_kwargs={},
                                  group_size=2)
        assert len(batch) == 3 and all(t["input_ids"].shape[0] == 2 for t in batch)
        assert all((t["versions"][t["loss_mask"].bool()] == 0).all() for t in batch)
        actor = PPOActor(PPOActorConfig(ppo_n_minibatches=1, kl_ctl=0.0, adv_norm=None), eng)
        logp = actor.compute_logp(batch)
        for t, lp in zip(batch, logp):  # the sampler's logprobs equal the trainer's (temperature 1)
            mask = t["loss_mask"].bool()
            torch.testing.assert_close(lp.roll(1, -1)[mask], t["logprobs"][mask], rtol=1e-4, atol=1e-4)
        actor.ppo_update(actor.compute_advantages(batch))
        eng.update_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "w"), version=1))
        eng.set_version(1)
        assert rollout.get_version() == 1 and not (tmp_path / "w").exists()  # clear_checkpoint_after_load
        served = dict(rollout.infer.model.named_parameters())
        for name, p in eng.model.model.named_parameters():
            torch.testing.assert_close(served[name], p, rtol=0, atol=0)
        rollout.pause_generation()  # a task submitted while paused waits, then runs on the new weights
        task = rollout.submit(prompts[0], TinyRLVR())
        rollout.continue_generation()
        again = rollout.wait_for_task(task, timeout=60)
        assert (again["versions"][again["loss_mask"].bool()] == 1).all()
        from torchdata.stateful_dataloader import StatefulDataLoader
        loader = StatefulDataLoader(prompts + prompts[:1], batch_size=4, collate_fn=list)
        ready = rollout.prepare_batch(loader, TinyRLVR())
        assert len(ready) == 4 and all(t["input_ids"].shape[0] == 1 for t in ready)
    finally:
        rollout.destroy()


def test_engine_creation_endpoint():
    """AReaL's worker endpoint (POST /create_engine, as TrainController / RolloutController
    call it with the class's dotted path) builds both engines."""
    import flask
    from areal.infra.rpc.guard import engine_blueprint as eb
    from areal.infra.rpc.serialization import serialize_value

    app = flask.Flask(__name__)
    app.register_blueprint(eb.engine_bp)
    client = app.test_client()
    try:
        for cls, cfg in ((EngineTrainEngine, TrainEngineConfig(backend="engine")),
                         (EngineInferenceEngine, InferenceEngineConfig(backend="engine"))):
            name = f"{cls.__name__}/0"
            r = client.post("/create_engine", json={"engine": f"{cls.__module__}.{cls.__name__}",
                                                    "engine_name": name,
                                                    "init_kwargs": serialize_value({"config": cfg})})
            assert r.status_code == 200, r.get_json()
            made = eb._engines.pop(name)
            assert type(made) is cls and type(made.config) is type(cfg) and made.config.backend == "engine"
    finally:
        eb.cleanup_engine_thread()


def test_lora_train_save_load(checkpoint, tmp_path):
    """use_lora: the engine's LoRA is trained and saved / loaded in PEFT's format."""
    cfg = dict(path=str(checkpoint("qwen2")), dtype="float32", backend="engine", use_lora=True, lora_rank=4,
               lora_alpha=8, target_modules=["q_proj", "v_proj"], optimizer=OptimizerConfig(lr=1e-2))
    engines = [EngineTrainEngine(TrainEngineConfig(**cfg)) for _ in range(2)]
    for eng in engines:
        eng.create_process_group()
        eng.initialize(None, FinetuneSpec(total_train_epochs=1, dataset_size=8, train_batch_size=4))
    data = padded_batch([7, 9, 5], seed=2)
    before = engines[0].forward_batch(data)
    stats = engines[0].train_batch(data, lambda lp, ent, mb: -lp[mb["loss_mask"].roll(-1).bool()].mean(),
                                   lambda mb: mb["loss_mask"].count_nonzero())
    assert stats["update_successful"] == 1.0 and stats["grad_norm"] > 0
    after = engines[0].forward_batch(data)
    assert not torch.allclose(after, before)
    engines[0].save(SaveLoadMeta(path=str(tmp_path / "lora"), weight_format="hf", with_optim=True))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    engines[1].load(SaveLoadMeta(path=str(tmp_path / "lora"), weight_format="hf", with_optim=True))
    torch.testing.assert_close(engines[1].forward_batch(data), after, rtol=1e-5, atol=1e-6)


def odd_length_reward(prompt, completion, prompt_ids, completion_ids, **data):
    return float(len(completion_ids) % 2)


def test_areal_rlvr_workflow(checkpoint):
    """AReaL's own RLVRWorkflow (reward function, stop/pad ids from the tokenizer) through
    EngineInferenceEngine, grouped as GRPO groups its samples."""
    from areal.workflow.rlvr import RLVRWorkflow

    from engine.models.presets import byte_tokenizer

    rollout = EngineInferenceEngine(InferenceEngineConfig(backend="engine", consumer_batch_size=2),
                                    model_path=str(checkpoint("qwen2")), dtype=torch.float32, max_batch_size=256,
                                    kv_cache_tokens=512)
    rollout.initialize()
    try:
        workflow = RLVRWorkflow(reward_fn=odd_length_reward, gconfig=GenerationHyperparameters(max_new_tokens=6),
                                tokenizer=byte_tokenizer(), get_input_ids_fn=lambda text, tok, thinking: tok.encode(text),
                                data_extract_prompt_fn=lambda d: d["question"])
        out = rollout.rollout_batch([{"question": "abc"}, {"question": "hello"}], workflow, group_size=2)
        prompts = set()
        for traj in out:
            assert traj["input_ids"].shape[0] == 2 and traj["rewards"].shape == (2,)
            n_out = traj["loss_mask"].sum(-1)
            n_in = traj["attention_mask"].sum(-1) - n_out
            prompts |= {bytes(row[:k].tolist()).decode() for row, k in zip(traj["input_ids"], n_in.tolist())}
            assert traj["rewards"].tolist() == (n_out % 2).float().tolist()
        assert prompts == {"abc", "hello"}
    finally:
        rollout.destroy()

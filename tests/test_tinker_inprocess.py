"""Tinker code in-process (issue 17, part 2): the logic of the cookbook's minimal loops
(tinker_cookbook/recipes/sl_loop.py and rl_loop.py) with local data on a tiny random
checkpoint that ships a tokenizer, changing only the client construction
(``engine.ServiceClient(models=...)`` for ``tinker.ServiceClient(base_url=...)``: test_serve
runs the same loops against ``python -m engine serve``); ``engine.ServiceClient`` itself; and
each Tinker shape those loops and their helpers rely on. The loops run on ``engine.types``
and, when the ``tinker`` SDK is installed, on ``tinker.types`` (only the clients are ours)."""
import asyncio
import concurrent.futures
import difflib
import gc
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

import engine
from engine import types as engine_types

NAME = "tiny/Qwen3-random"  # the base_model name the in-process service serves


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("qwen3", tokenizer=True)


@pytest.fixture(params=["engine", "tinker"])
def types(request):
    if request.param == "tinker":
        return pytest.importorskip("tinker").types
    return engine_types


@pytest.fixture
def new_service_client(ckpt, tmp_path):
    """The cookbook's ``tinker.ServiceClient(base_url=config.base_url, user_metadata=...)``,
    in-process; each service client made is closed at the end, as the process would end."""
    made = []

    def new(**kwargs):
        made.append(engine.ServiceClient(models={NAME: ckpt}, checkpoint_dir=tmp_path / "checkpoints",
                                         max_batch_size=4096, **kwargs))
        return made[-1]
    yield new
    for client in made:
        client.close("success").result()


# -- the cookbook's helpers, as the loops call them ------------------------------------------------
def save_checkpoint(training_client, name, log_path, loop_state, kind="state", ttl_seconds=None):
    """checkpoint_utils.save_checkpoint: *_async saves, result_async, ``.path``, one jsonl record."""
    async def save():
        futures = {}
        if kind in ("state", "both"):
            futures["state"] = await training_client.save_state_async(name, ttl_seconds=ttl_seconds)
        if kind in ("sampler", "both"):
            futures["sampler"] = await training_client.save_weights_for_sampler_async(name, ttl_seconds=ttl_seconds)
        results = {k: await v.result_async(timeout=60) for k, v in futures.items()}
        return {k + "_path": v.path for k, v in results.items()}

    paths = asyncio.run(save())
    with open(Path(log_path) / "checkpoints.jsonl", "a") as f:
        f.write(json.dumps({"name": name, **loop_state, **paths}) + "\n")
    return paths


def get_last_checkpoint(log_path):
    path = Path(log_path) / "checkpoints.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    records = [r for r in records if "state_path" in r]
    return SimpleNamespace(**records[-1]) if records else None


def compute_mean_nll(logprobs_list, weights_list):
    total_lp, total_w = 0.0, 0.0
    for logprobs, weights in zip(logprobs_list, weights_list, strict=True):
        lp, w = logprobs.to_torch(), weights.to_torch()
        total_lp += lp.dot(w)
        total_w += w.sum()
    return float(-total_lp / total_w)


def conversation_to_datum(types, tokenizer, messages, max_length):
    """supervised.data.conversation_to_datum for a chat: the tokenizer's chat template, loss
    weights on the last (assistant) message and its end-of-turn token, shifted by one,
    normalised to sum 1 (reduction "mean")."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    reply = tokenizer.encode(messages[-1]["content"] + "<|im_end|>")
    tokens, weights = (prompt + reply)[:max_length], ([0.0] * len(prompt) + [1.0] * len(reply))[:max_length]
    w = torch.tensor(weights[1:])
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": types.TensorData.from_torch(torch.tensor(tokens[1:])),
                                       "weights": types.TensorData.from_torch(w / w.sum())})


def resume_or_start(service_client, config):
    """The block both recipes open with: resume from the last checkpoint with its optimizer
    state, or start a LoRA training client (the futures are used as the clients)."""
    resume_info = get_last_checkpoint(config.log_path)
    if resume_info:
        return service_client.create_training_client_from_state_with_optimizer(resume_info.state_path), \
            resume_info.batch
    return service_client.create_lora_training_client(base_model=config.model_name, rank=config.lora_rank), 0


class Rows:
    """A local dataset (``select(range)`` of rows, as datasets.Dataset); ``crash_at``: the
    batch start at which it raises, as a run killed there would stop."""

    def __init__(self, rows, crash_at=None):
        self.rows, self.crash_at = rows, crash_at

    def __len__(self):
        return len(self.rows)

    def select(self, indices):
        if indices.start == self.crash_at:
            raise KeyboardInterrupt("killed")
        return [self.rows[i] for i in indices]


# -- sl_loop.py ------------------------------------------------------------------------------------
def sl_loop(config, dataset, tokenizer, types, new_service_client):
    """The cookbook's sl_loop.main, its ``tinker.ServiceClient(...)`` being
    ``new_service_client(...)`` and its logging a list of per-step metrics."""
    n_train_batches = len(dataset) // config.batch_size
    service_client = new_service_client(user_metadata={"recipe": "recipe_sl_loop"})
    training_client, start_batch = resume_or_start(service_client, config)
    logged = []
    for batch_idx in range(start_batch, n_train_batches):
        if config.max_steps is not None and batch_idx >= config.max_steps:
            break
        step = batch_idx
        metrics = {}
        if config.save_every > 0 and step % config.save_every == 0 and step > 0:
            save_checkpoint(training_client, f"{step:06d}", config.log_path, {"batch": batch_idx}, kind="state",
                            ttl_seconds=config.ttl_seconds)
        lr_mult = max(0.0, 1.0 - step / n_train_batches)
        current_lr = config.learning_rate * lr_mult
        adam_params = types.AdamParams(learning_rate=current_lr, beta1=0.9, beta2=0.95, eps=1e-8)
        batch_rows = dataset.select(range(batch_idx * config.batch_size, (batch_idx + 1) * config.batch_size))
        batch = [conversation_to_datum(types, tokenizer, row["messages"], config.max_length) for row in batch_rows]

        fwd_bwd_future = training_client.forward_backward(batch, loss_fn="cross_entropy")
        optim_step_future = training_client.optim_step(adam_params)
        fwd_bwd_result = fwd_bwd_future.result()
        optim_result = optim_step_future.result()
        if optim_result.metrics:
            metrics.update(optim_result.metrics)
        train_logprobs = [x["logprobs"] for x in fwd_bwd_result.loss_fn_outputs]
        train_weights = [d.loss_fn_inputs["weights"] for d in batch]
        metrics.update(step=step, num_sequences=len(batch), learning_rate=current_lr,
                       num_tokens=sum(d.model_input.length for d in batch),
                       train_mean_nll=compute_mean_nll(train_logprobs, train_weights))
        logged.append(metrics)
    save_checkpoint(training_client, "final", config.log_path, {"batch": n_train_batches}, kind="both",
                    ttl_seconds=None)
    return logged


def _chats(n):
    """Local data: 'spell <word> backwards' answered with the reversed word."""
    words = ["engine", "kernel", "tinker", "sample", "triton", "packed", "tensor", "memory", "stream", "vector",
             "matrix", "cached", "silver", "copper", "garden", "planet"]
    return [{"messages": [{"role": "user", "content": f"spell {w} backwards"},
                          {"role": "assistant", "content": w[::-1]}]} for w in words[:n]]


def check_sl_loop(model_name, tmp_path, tokenizer, types, new_service_client):
    """sl_loop's logic: the training NLL falls; a run killed after its step-2 checkpoint,
    resumed from checkpoints.jsonl with its optimizer state, logs exactly the metrics of an
    uninterrupted run; the final checkpoint holds a state and a sampler export. Returns
    that record."""
    def config(name):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(log_path=tmp_path / name, model_name=model_name, batch_size=4, learning_rate=2e-2,
                               max_length=64, lora_rank=8, save_every=2, ttl_seconds=604800, max_steps=None)

    whole = sl_loop(config("whole"), Rows(_chats(16)), tokenizer, types, new_service_client)
    nll = [m["train_mean_nll"] for m in whole]
    assert len(whole) == 4 and all(math.isfinite(x) for x in nll) and nll[-1] < nll[0], nll
    with pytest.raises(KeyboardInterrupt):
        sl_loop(config("resumed"), Rows(_chats(16), crash_at=12), tokenizer, types, new_service_client)
    resumed = sl_loop(config("resumed"), Rows(_chats(16)), tokenizer, types, new_service_client)
    assert [m["step"] for m in resumed] == [2, 3]
    assert resumed == whole[2:]
    return get_last_checkpoint(tmp_path / "resumed")


def test_sl_loop_ports_and_resumes(ckpt, tmp_path, types, new_service_client):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # tokenizer_utils.get_tokenizer(model_name)
    final = check_sl_loop(NAME, tmp_path, tokenizer, types, new_service_client)
    assert (Path(final.state_path) / "state.json").is_file()
    assert (Path(final.sampler_path) / "adapter_config.json").is_file()


# -- rl_loop.py ------------------------------------------------------------------------------------
def get_reward(response: str, answer: str) -> float:
    """How much of the answer the response holds, plus a tie-breaker under 1e-3 that differs
    whenever two responses' texts differ. The loop's logic is under test, not learning: a
    group whose rewards all tie is skipped, and with rewards of the length alone both groups
    of a batch tied now and then (unseeded sampling), leaving a batch with no step."""
    overlap = difflib.SequenceMatcher(None, response, answer).ratio()
    return overlap + int(hashlib.sha256(response.encode()).hexdigest()[:6], 16) / 2**24 * 1e-3


def rl_loop(config, problems, tokenizer, types, new_service_client):
    """The cookbook's rl_loop.main (GRPO-style centred rewards) on local problems, its
    ``tinker.ServiceClient(...)`` being ``new_service_client(...)``; returns per batch the
    metrics and, per datum, (observation length, sampler logprobs, learner logprobs) to check
    that the loop is on-policy."""
    n_train_batches = len(problems) // config.batch_size
    service_client = new_service_client(user_metadata={"recipe": "recipe_rl_loop"})
    training_client, start_batch = resume_or_start(service_client, config)
    sampling_params = types.SamplingParams(max_tokens=config.max_tokens,
                                           stop=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    adam_params = types.AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    logged = []
    for batch_idx in range(start_batch, n_train_batches):
        metrics = {"progress/batch": batch_idx, "optim/lr": config.learning_rate,
                   "progress/done_frac": (batch_idx + 1) / n_train_batches}
        if config.save_every > 0 and batch_idx % config.save_every == 0 and batch_idx > 0:
            save_checkpoint(training_client, f"{batch_idx:06d}", config.log_path, {"batch": batch_idx},
                            kind="state", ttl_seconds=config.ttl_seconds)
        batch_rows = problems[batch_idx * config.batch_size:(batch_idx + 1) * config.batch_size]
        sampling_client = training_client.save_weights_and_get_sampling_client()
        datums_D, rewards_P, futures_P, prompts_P = [], [], [], []
        for question, _ in batch_rows:
            convo = [{"role": "user", "content": question}]
            model_input = types.ModelInput.from_ints(
                tokenizer.encode(tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)))
            futures_P.append(sampling_client.sample(prompt=model_input, num_samples=config.group_size,
                                                    sampling_params=sampling_params))
            prompts_P.append(model_input)
        check = []
        for future, prompt, (_, answer) in zip(futures_P, prompts_P, batch_rows):
            sample_result = future.result()
            rewards_G, sampled_tokens_G_T, logprobs_G_T = [], [], []
            for sequence in sample_result.sequences:
                assert sequence.logprobs is not None
                sampled_tokens_G_T.append(sequence.tokens)
                logprobs_G_T.append(sequence.logprobs)
                rewards_G.append(get_reward(tokenizer.decode(sequence.tokens), answer))
            mean_reward = sum(rewards_G) / len(rewards_G)
            advantages_G = [reward - mean_reward for reward in rewards_G]
            rewards_P.append(mean_reward)
            if all(advantage == 0.0 for advantage in advantages_G):
                continue
            for sampled_tokens, logprobs, advantage in zip(sampled_tokens_G_T, logprobs_G_T, advantages_G):
                ob_len = prompt.length - 1
                model_input = prompt.append(types.EncodedTextChunk(tokens=sampled_tokens[:-1]))
                target_tokens = [0] * ob_len + sampled_tokens
                padded_logprobs = [0.0] * ob_len + logprobs
                padded_advantages = [0.0] * ob_len + [advantage] * (model_input.length - ob_len)
                assert model_input.length == len(target_tokens) == len(padded_logprobs) == len(padded_advantages)
                datums_D.append(types.Datum(model_input=model_input, loss_fn_inputs={
                    "target_tokens": types.TensorData.from_torch(torch.tensor(target_tokens)),
                    "logprobs": types.TensorData.from_torch(torch.tensor(padded_logprobs)),
                    "advantages": types.TensorData.from_torch(torch.tensor(padded_advantages))}))
                check.append((ob_len, logprobs))
        if datums_D:
            fwd_bwd_future = training_client.forward_backward(datums_D, loss_fn=config.loss_fn)
            optim_step_future = training_client.optim_step(adam_params)
            fwd_bwd_result = fwd_bwd_future.result()
            optim_result = optim_step_future.result()
            if optim_result.metrics:
                metrics.update(optim_result.metrics)
            check = [(ob, lp, out["logprobs"].to_torch()[ob:].tolist())
                     for (ob, lp), out in zip(check, fwd_bwd_result.loss_fn_outputs)]
        metrics["reward/total"] = sum(rewards_P) / len(rewards_P)
        logged.append((metrics, check))
    save_checkpoint(training_client, "final", config.log_path, {"batch": n_train_batches}, kind="both",
                    ttl_seconds=None)
    return logged


def check_rl_loop(model_name, tmp_path, tokenizer, types, new_service_client, loss_fn):
    """rl_loop's logic: each batch samples a snapshot of the weights, centres the rewards,
    and trains on them; the learner's logprobs of the sampled tokens equal the sampler's
    (the snapshot is of exactly the weights being trained: on-policy)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    problems = [(f"spell {w} backwards", w[::-1]) for w in ("abc", "tinker", "kernel", "engine")]
    config = SimpleNamespace(log_path=tmp_path, model_name=model_name, batch_size=2, group_size=4,
                             learning_rate=5e-2, lora_rank=8, save_every=1, max_tokens=6, ttl_seconds=604800,
                             loss_fn=loss_fn)
    logged = rl_loop(config, problems, tokenizer, types, new_service_client)
    assert [m["step"] for m, _ in logged] == [1.0, 2.0]  # every batch had groups to learn from
    for metrics, check in logged:
        assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        for _, sampler_lp, learner_lp in check:
            torch.testing.assert_close(torch.tensor(learner_lp), torch.tensor(sampler_lp), rtol=0, atol=1e-4)
    assert [r["name"] for r in map(json.loads, (tmp_path / "checkpoints.jsonl").read_text().splitlines())] == [
        "000001", "final"]


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_rl_loop_ports_on_policy(ckpt, tmp_path, types, new_service_client, loss_fn):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # tokenizer_utils.get_tokenizer(model_name)
    check_rl_loop(NAME, tmp_path / "log", tokenizer, types, new_service_client, loss_fn)


# -- engine.ServiceClient ----------------------------------------------------------------------------
def test_service_client_shares_the_base_and_finds_the_base_of_saved_paths(ckpt, tmp_path):
    """Training clients on one base share its weights, each training its own adapter; a
    create_* future is usable as the client, an _async form gives the client; what a save
    returned starts a new client by itself (its run.json names the base); the capabilities
    list the served models."""
    with engine.ServiceClient(models={NAME: ckpt}, checkpoint_dir=tmp_path, max_batch_size=512) as service:
        (model,) = service.get_server_capabilities().supported_models
        assert (model.model_name, model.trainable, model.sampleable) == (NAME, True, True)
        assert model.max_context_length > 0
        a = service.create_lora_training_client(NAME, rank=4)  # used as the client
        b = asyncio.run(service.create_lora_training_client_async(base_model=NAME, rank=2, seed=3, train_mlp=False))
        same = service.create_lora_training_client(NAME, rank=2, seed=3, train_mlp=False).result()
        unseeded = service.create_lora_training_client(NAME, rank=2, train_mlp=False).result()  # seed 0

        def adapter(tm):
            return torch.cat([p.detach().flatten() for _, p in tm._trainer.params])
        assert torch.equal(adapter(same), adapter(b)) and not torch.equal(adapter(unseeded), adapter(b))
        info = a.get_info()
        assert (info.model_name, info.model_data.model_name, info.lora_rank) == (NAME, NAME, 4)
        assert info.model_data.tokenizer_id == str(ckpt) and info.lora["target_modules"] == [
            "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert b.get_info().lora["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert a.result()._trainer.model.embed.weight is b._trainer.model.embed.weight
        data = [_datum(7), _datum(8, n=5)]
        before = b.forward(data, "cross_entropy").result().loss
        a.forward_backward(data, "cross_entropy")
        a.optim_step(engine.AdamParams(5e-2)).result()
        assert b.forward(data, "cross_entropy").result().loss == before
        tokens = data[0].model_input.to_ints() + data[0].loss_fn_inputs["target_tokens"].tolist()[-1:]
        learner = a.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        base = service.create_sampling_client(base_model=NAME)
        assert base.get_base_model() == NAME and base.get_tokenizer().eos_token_id == 256
        export = a.save_weights_for_sampler("export").result()
        by_path = asyncio.run(service.create_sampling_client_async(model_path=export))
        assert by_path.engine is base.engine  # one sampler per base, adapters per request
        torch.testing.assert_close(torch.tensor(by_path.compute_logprobs(tokens).result()[1:]), learner,
                                   rtol=0, atol=1e-4)
        assert not torch.allclose(torch.tensor(base.compute_logprobs(tokens).result()[1:]), learner, atol=1e-3)
        state = a.save_state("state").result()
        assert json.loads((Path(state.path).parent / "run.json").read_text())["base_model"] == NAME
        resumed = service.create_training_client_from_state_with_optimizer(state.path).result()
        fresh = service.create_training_client_from_state(state).result()  # weights only: Adam starts again
        assert (resumed.get_info().step, fresh.get_info().step) == (1, 0)
        for client in (resumed, fresh):
            assert client.forward(data, "cross_entropy").result().loss == a.forward(data, "cross_entropy").result().loss
    with pytest.raises(RuntimeError, match="ServiceClient is closed"):
        service.create_sampling_client(base_model=NAME)
    engine.register_model("qwen3-random", ckpt)  # models=None: the registered names
    assert "qwen3-random" in [m.model_name for m in engine.ServiceClient().get_server_capabilities().supported_models]


def test_service_client_refuses_what_it_cannot_honour(ckpt, tmp_path):
    with pytest.raises(ValueError, match="base_url='http://127.0.0.1:8000': engine.ServiceClient runs in this process"):
        engine.ServiceClient(models={NAME: ckpt}, base_url="http://127.0.0.1:8000")
    with pytest.raises(FileNotFoundError, match=r"models\['m'\]: .* is not a checkpoint folder"):
        engine.ServiceClient(models={"m": tmp_path})
    with pytest.raises(ValueError, match="models must map base_model names"):
        engine.ServiceClient(models={})
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        engine.ServiceClient(models={NAME: ckpt}, max_batch_size=0)
    with engine.ServiceClient(models={NAME: ckpt}, checkpoint_dir=tmp_path / "ckpt", max_batch_size=512) as service:
        with pytest.raises(ValueError, match="Either model_path or base_model must be provided"):
            service.create_sampling_client()
        export = service.create_lora_training_client(NAME, rank=2).save_weights_for_sampler("x").result().path
        copied = tmp_path / "copied"
        shutil.copytree(export, copied)
        failing = {
            "base_model 'nope' is not served; served: ['tiny/Qwen3-random']":
                service.create_lora_training_client("nope"),
            "train_attn and train_mlp are both False": service.create_lora_training_client(NAME, train_mlp=False,
                                                                                           train_attn=False),
            "optimizer type 'dimuon' is not supported": service.create_lora_training_client(
                NAME, optimizer={"type": "dimuon"}),
            "holds no training state": service.create_training_client_from_state(tmp_path),
            "holds no LoRA adapter": service.create_sampling_client(model_path=tmp_path),
            "no run.json beside it": service.create_sampling_client(model_path=copied),
            "record_stability_info=True is not supported": service.create_sampling_client(
                base_model=NAME, record_stability_info=True)}
        for match, future in failing.items():
            with pytest.raises((ValueError, FileNotFoundError), match=re.escape(match)):
                future.result()
        named = service.create_sampling_client(model_path=copied, base_model=NAME).result()  # the base, named
        assert len(named.compute_logprobs([1, 2, 3]).result()) == 3
        with pytest.raises(ValueError, match="status must be one of"):
            service.close("done")


# -- the shapes, one by one ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(ckpt, tmp_path_factory):
    tm = engine.model(ckpt).with_adapter(rank=4).spawn_train(max_batch_size=256,
                                                             checkpoint_dir=tmp_path_factory.mktemp("lora"))
    yield tm
    tm.close()


def _datum(seed, n=9, rl=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 259, (n + 1,), generator=g)
    inputs = {"target_tokens": tokens[1:]}
    if rl:
        inputs.update(logprobs=-4 - torch.rand(n, generator=g), advantages=torch.randn(n, generator=g))
    return engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), inputs)


def test_outputs_and_inputs_are_tensor_data(lora):
    d = _datum(0)
    assert isinstance(d.loss_fn_inputs["target_tokens"], engine.TensorData)
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64" and d.loss_fn_inputs["target_tokens"].shape == [9]
    out = lora.forward([d], "cross_entropy").result()
    lp = out.loss_fn_outputs[0]["logprobs"]
    assert isinstance(lp, engine.TensorData) and lp.dtype == "float32" and lp.shape == [9]
    assert lp.to_torch().dtype == torch.float32 and lp.tolist() == lp.data == lp.to_numpy().tolist()
    assert math.isclose(out.loss, -float(lp.to_torch().sum()), rel_tol=1e-5)
    again = engine.TensorData(data=lp.data, dtype="float32", shape=[3, 3])
    assert again.shape == [3, 3] and torch.equal(again.to_torch().reshape(-1), lp.to_torch())
    assert engine.TensorData.from_numpy(lp.to_numpy().astype("float64")).dtype == "float32"
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'int64'"):
        engine.TensorData(data=[1], dtype="bfloat16")


def test_model_input_chunks():
    mi = engine.ModelInput(chunks=[engine.EncodedTextChunk(tokens=[1, 2]), engine.EncodedTextChunk([3])])
    assert mi.to_ints() == [1, 2, 3] and mi.length == 3 and mi.chunks[0].tokens == [1, 2, 3]
    assert mi.append(engine.EncodedTextChunk([4])).append_int(5) == engine.ModelInput.from_ints([1, 2, 3, 4, 5])
    assert engine.ModelInput.empty().length == 0
    with pytest.raises(ValueError, match="only text chunks"):
        mi.append(SimpleNamespace(data=b"png"))


def test_saves_return_paths_and_take_ttl(lora, tmp_path):
    saved = lora.save_state(str(tmp_path / "state"), ttl_seconds=3600).result()
    assert isinstance(saved, engine.SaveWeightsResponse) and saved.path == str(tmp_path / "state")
    export = lora.save_weights_for_sampler(str(tmp_path / "export"), ttl_seconds=None).result()
    assert isinstance(export, engine.SaveWeightsForSamplerResponse)
    assert (Path(export.path) / "adapter_config.json").is_file()
    lora.load_state(saved).result()  # the result is path-like
    lora.load_state_with_optimizer(saved.path).result()
    for bad in (0, -5, 1.5, "1h"):
        with pytest.raises(ValueError, match="ttl_seconds must be None or a positive int"):
            lora.save_state("x", ttl_seconds=bad)


def test_futures_result_async_timeout_and_future(lora):
    fut = lora.forward([_datum(1)], "cross_entropy")
    assert isinstance(fut.future(), concurrent.futures.Future)
    assert concurrent.futures.wait([fut.future()], timeout=60).done
    assert asyncio.run(fut.result_async(timeout=5)).loss > 0
    pending = engine.Future()
    with pytest.raises(TimeoutError):
        asyncio.run(pending.result_async(timeout=0.01))
    assert not pending.done()  # a timeout does not cancel the call
    pending.set_result(3)
    assert asyncio.run(pending.coroutine()) == 3


def test_optim_step_takes_optim_params(lora):
    lora.forward_backward([_datum(2)], "cross_entropy")
    step = lora.get_info().step
    assert lora.optim_step(optim_params=engine.AdamParams(learning_rate=1e-3)).result().metrics["step"] == step + 1
    lora.forward_backward([_datum(2)], "cross_entropy")
    assert lora.optim_step(adam_params=engine.AdamParams(learning_rate=1e-3)).result().metrics["step"] == step + 2
    with pytest.raises(ValueError, match="not both"):
        lora.optim_step(engine.AdamParams(1e-3), adam_params=engine.AdamParams(1e-3))
    with pytest.raises(ValueError, match="needs optim_params"):
        lora.optim_step()


def test_get_info_is_tinkers_object(lora, ckpt):
    info = lora.get_info()
    assert info.model_id.startswith(Path(ckpt).name) and info.model_name == str(ckpt)
    assert info.model_data.arch == "Qwen3ForCausalLM" and info.model_data.model_name == str(ckpt)
    assert info.model_data.tokenizer_id == str(ckpt) and info.is_lora and info.lora_rank == 4
    assert info.tp == 1 and info.model_type == "qwen3"
    assert AutoTokenizer.from_pretrained(info.model_data.tokenizer_id).eos_token_id == 256


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_per_datum_clip_thresholds(lora, loss_fn):
    """clip_low_threshold / clip_high_threshold as loss inputs (a number per datum, or one
    per token) act as loss_fn_config does for that datum; data that give none take the
    config's (else the default)."""
    data = [_datum(3, rl=True), _datum(4, n=5, rl=True)]
    cur = lora.forward(data, "importance_sampling").result()
    for d, o in zip(data, cur.loss_fn_outputs):  # ratios near 1, so that clipping both binds and not
        d.loss_fn_inputs["logprobs"] = o["logprobs"].to_torch() + 0.4 * torch.randn(o["logprobs"].shape[0])
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}
    lo, hi = cfg.values()

    def loss(ds, config=None):
        return lora.forward(ds, loss_fn, config).result().loss

    def given(d, low, high):
        return engine.Datum(d.model_input, {**d.loss_fn_inputs, "clip_low_threshold": low, "clip_high_threshold": high})

    split = loss(data[:1], cfg) + loss(data[1:])
    mixed = loss([given(data[0], lo, torch.full((9,), hi)), data[1]])
    assert math.isclose(mixed, split, rel_tol=1e-5)
    assert math.isclose(loss([given(data[0], torch.tensor(lo), [hi] * 9), data[1]], cfg), loss(data, cfg), rel_tol=1e-5)
    assert not math.isclose(loss(data, cfg), loss(data), rel_tol=1e-5)  # the thresholds bind
    with pytest.raises(ValueError, match=r"data\[0\].loss_fn_inputs\['clip_low_threshold'\] holds nan"):
        lora.forward([given(data[0], float("nan"), hi)], loss_fn).result()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['clip_high_threshold', 'clip_low_threshold'\]"):
        lora.forward([given(data[0], lo, hi)], "importance_sampling").result()


@pytest.mark.parametrize("adapter", [True, False])
def test_snapshot_client_keeps_its_weights_inflight_follows(ckpt, tmp_path, adapter):
    """save_weights_and_get_sampling_client(): a future of a client (usable as the client)
    that samples the weights of that moment, whatever training follows; kind="inflight":
    the shared engine, which follows training. A LoRA snapshot's adapter copy goes when the
    client does."""
    b = engine.model(ckpt)
    tm = (b.with_adapter(rank=4) if adapter else b).spawn_train(max_batch_size=256, checkpoint_dir=tmp_path)
    data = [_datum(5), _datum(6, n=6)]
    tokens = data[0].model_input.to_ints() + data[0].loss_fn_inputs["target_tokens"].tolist()[-1:]

    def learner():
        return tm.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()

    def client_lp(client):
        return torch.tensor(client.compute_logprobs(tokens).result()[1:])

    try:
        tm.forward_backward(data, "cross_entropy")
        tm.optim_step(engine.AdamParams(5e-2))
        future = tm.save_weights_and_get_sampling_client()  # ordered after the step
        first = learner()
        torch.testing.assert_close(client_lp(future), first, rtol=0, atol=1e-4)  # used as the client
        snap = future.result()
        assert snap.get_base_model() == str(ckpt) and snap.get_tokenizer().eos_token_id == 256
        live = tm.save_weights_and_get_sampling_client(kind="inflight").result()
        for _ in range(2):
            tm.forward_backward(data, "cross_entropy")
            tm.optim_step(engine.AdamParams(5e-2))
        now = learner()
        assert not torch.allclose(now, first, atol=1e-3)
        torch.testing.assert_close(client_lp(snap), first, rtol=0, atol=1e-4)
        torch.testing.assert_close(client_lp(live), now, rtol=0, atol=1e-4)
        later = asyncio.run(tm.save_weights_and_get_sampling_client_async())
        torch.testing.assert_close(client_lp(later), now, rtol=0, atol=1e-4)
        params = engine.SamplingParams(max_tokens=4, seed=7)
        assert snap.sample(tokens, 2, params).result().sequences == snap.sample(tokens, 2, params).result().sequences
        folder = snap.adapter
        assert (folder is not None) == adapter
        snap.close()
        with pytest.raises(RuntimeError, match="closed"):
            snap.sample(tokens, 1, params).result()
        if adapter:
            assert not Path(folder).exists()
            folder = later.adapter
            del later
            gc.collect()
            assert not Path(folder).exists()  # collected with its client
        export = tm.save_weights_for_sampler("export").result()
        client = asyncio.run(tm.create_sampling_client_async(export.path))
        torch.testing.assert_close(client_lp(client), now, rtol=0, atol=1e-4)
        client.close()
    finally:
        tm.close()


def test_max_tokens_none_and_stop_none_at_eos(ckpt):
    """SamplingParams(max_tokens=None) samples up to what the KV cache leaves; stop=None
    stops at the tokenizer's EOS token, stop=[] at nothing."""
    prompt = [257, 117, 115, 101, 114]
    base = engine.model(ckpt).spawn_inference(max_batch_size=64, kv_cache_tokens=32, block_size=4)
    try:
        assert base.get_tokenizer().eos_token_id == 256 and base.get_base_model() == str(ckpt)
        greedy = base.sample(prompt, 1, engine.SamplingParams(max_tokens=None, temperature=0.0, stop=[])).result()
        seq = greedy.sequences[0]
        assert len(seq.tokens) == 32 - len(prompt) and seq.stop_reason == "length"
    finally:
        base.close()
    eos = seq.tokens[3]  # a tokenizer whose EOS the model emits greedily
    with engine.InferenceModel(ckpt, max_batch_size=64, kv_cache_tokens=32, block_size=4,
                               tokenizer=SimpleNamespace(eos_token_id=eos)) as model:
        out = model.sample(prompt, 1, engine.SamplingParams(max_tokens=None, temperature=0.0)).result().sequences[0]
        assert out.tokens == seq.tokens[:seq.tokens.index(eos) + 1] and out.stop_reason == "stop"
        out = model.sample(prompt, 1, engine.SamplingParams(max_tokens=10, temperature=0.0, stop=[])).result()
        assert out.sequences[0].tokens == seq.tokens[:10]
        with pytest.raises(ValueError, match="max_tokens must be a non-negative int or None"):
            model.sample(prompt, 1, engine.SamplingParams(max_tokens=2.0)).result()

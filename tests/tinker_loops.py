"""The logic of tinker-cookbook's minimal loops (``tinker_cookbook/recipes/sl_loop.py`` and
``rl_loop.py``) on local data, written against the ``tinker`` SDK's API: the same calls in
the same order (resume from the last state with ``create_training_client_from_state_with_optimizer``,
``save_state`` / ``save_weights_for_sampler`` with ``ttl_seconds`` and ``.path``, a linear
learning-rate schedule, ``forward_backward`` then ``optim_step`` before waiting, the mean NLL
from ``loss_fn_outputs[i]["logprobs"].to_torch()``; for RL, ``save_weights_and_get_sampling_client``,
groups of samples, centred rewards, datums padded as the recipe pads them,
``importance_sampling``). What is swapped: the dataset (``data`` / ``prompts`` arguments), the
reward (``reward_fn``), the renderer (token lists in, the tokenizer's EOS as stop), the
cookbook's checkpoint log (``checkpoints.jsonl`` in ``log_path``, read and written here), and
the model name. ``service_client`` is what the recipe builds with ``tinker.ServiceClient(base_url=...)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tinker import types
from tinker.types.tensor_data import TensorData


def _last_checkpoint(log_path: Path) -> dict | None:
    path = log_path / "checkpoints.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "state_path" in r]
    return rows[-1] if rows else None


def _save_checkpoint(training_client, name: str, log_path: Path, kind: str, loop_state: dict,
                     ttl_seconds: int | None) -> dict:
    futures = {}
    if kind in ("state", "both"):
        futures["state"] = training_client.save_state(name, ttl_seconds=ttl_seconds)
    if kind in ("sampler", "both"):
        futures["sampler"] = training_client.save_weights_for_sampler(name, ttl_seconds=ttl_seconds)
    paths = {k + "_path": f.result().path for k, f in futures.items()}
    with open(log_path / "checkpoints.jsonl", "a") as f:
        f.write(json.dumps({"name": name, **loop_state, **paths}) + "\n")
    return paths


def _start(service_client, model_name: str, log_path: Path, lora_rank: int):
    resume = _last_checkpoint(log_path)
    if resume:
        return service_client.create_training_client_from_state_with_optimizer(resume["state_path"]).result(), \
            resume["batch"]
    return service_client.create_lora_training_client(base_model=model_name, rank=lora_rank).result(), 0


def _compute_mean_nll(logprobs_list, weights_list) -> float:
    total, weight = 0.0, 0.0
    for logprobs, weights in zip(logprobs_list, weights_list, strict=True):
        total += float(logprobs.to_torch().dot(weights.to_torch()))
        weight += float(weights.to_torch().sum())
    return -total / weight


def sl_loop(service_client, model_name: str, log_path: Path, data: list[list[int]], *, batch_size: int = 4,
            learning_rate: float = 1e-2, lora_rank: int = 8, save_every: int = 2, max_steps: int | None = None,
            ttl_seconds: int | None = 604800) -> list[dict]:
    """Supervised: each token sequence is a datum (input tokens[:-1], targets tokens[1:],
    weights 1). Returns the logged metrics of each step."""
    log_path.mkdir(parents=True, exist_ok=True)
    n_train_batches = len(data) // batch_size
    training_client, start_batch = _start(service_client, model_name, log_path, lora_rank)
    logged = []
    for batch_idx in range(start_batch, n_train_batches):
        if max_steps is not None and batch_idx >= max_steps:
            break
        step = batch_idx
        metrics = {}
        if save_every > 0 and step % save_every == 0 and step > 0:
            _save_checkpoint(training_client, f"{step:06d}", log_path, "state", {"batch": batch_idx}, ttl_seconds)
        current_lr = learning_rate * max(0.0, 1.0 - step / n_train_batches)
        adam_params = types.AdamParams(learning_rate=current_lr, beta1=0.9, beta2=0.95, eps=1e-8)
        rows = data[batch_idx * batch_size:(batch_idx + 1) * batch_size]
        batch = [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                             loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(row[1:])),
                                             "weights": TensorData.from_torch(torch.ones(len(row) - 1))})
                 for row in rows]
        fwd_bwd_future = training_client.forward_backward(batch, loss_fn="cross_entropy")
        optim_step_future = training_client.optim_step(adam_params)
        fwd_bwd_result = fwd_bwd_future.result()
        optim_result = optim_step_future.result()
        if optim_result.metrics:
            metrics.update(optim_result.metrics)
        train_logprobs = [x["logprobs"] for x in fwd_bwd_result.loss_fn_outputs]
        train_weights = [d.loss_fn_inputs["weights"] for d in batch]
        metrics.update(step=step, num_sequences=len(batch), learning_rate=current_lr,
                       train_mean_nll=_compute_mean_nll(train_logprobs, train_weights))
        logged.append(metrics)
    _save_checkpoint(training_client, "final", log_path, "both", {"batch": n_train_batches}, None)
    return logged


def rl_loop(service_client, model_name: str, log_path: Path, prompts: list[list[int]], reward_fn, *,
            batch_size: int = 2, group_size: int = 4, max_tokens: int = 8, learning_rate: float = 1e-2,
            lora_rank: int = 8, stop: list[int] | None = None, max_steps: int | None = None) -> list[dict]:
    """GRPO-style: ``group_size`` samples per prompt, advantages = reward - group mean,
    ``importance_sampling`` on the sampled tokens. ``reward_fn(tokens) -> float``."""
    log_path.mkdir(parents=True, exist_ok=True)
    n_train_batches = len(prompts) // batch_size
    training_client, start_batch = _start(service_client, model_name, log_path, lora_rank)
    sampling_params = types.SamplingParams(max_tokens=max_tokens, stop=stop)
    adam_params = types.AdamParams(learning_rate=learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    logged = []
    for batch_idx in range(start_batch, n_train_batches):
        if max_steps is not None and batch_idx >= max_steps:
            break
        metrics: dict[str, float] = {"progress/batch": batch_idx}
        rows = prompts[batch_idx * batch_size:(batch_idx + 1) * batch_size]
        sampling_client = training_client.save_weights_and_get_sampling_client()
        datums_D, rewards_P, futures_P, prompts_P = [], [], [], []
        for row in rows:
            model_input = types.ModelInput.from_ints(row)
            futures_P.append(sampling_client.sample(prompt=model_input, num_samples=group_size,
                                                    sampling_params=sampling_params))
            prompts_P.append(model_input)
        for future, prompt in zip(futures_P, prompts_P):
            sample_result = future.result()
            rewards_G, sampled_tokens_G_T, logprobs_G_T = [], [], []
            for sequence in sample_result.sequences:
                assert sequence.logprobs is not None
                sampled_tokens_G_T.append(sequence.tokens)
                logprobs_G_T.append(sequence.logprobs)
                rewards_G.append(reward_fn(sequence.tokens))
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
                    "target_tokens": TensorData.from_torch(torch.tensor(target_tokens)),
                    "logprobs": TensorData.from_torch(torch.tensor(padded_logprobs)),
                    "advantages": TensorData.from_torch(torch.tensor(padded_advantages))}))
        if datums_D:
            fwd_bwd_future = training_client.forward_backward(datums_D, loss_fn="importance_sampling")
            optim_step_future = training_client.optim_step(adam_params)
            fwd_bwd_future.result()
            optim_result = optim_step_future.result()
            if optim_result.metrics:
                metrics.update(optim_result.metrics)
        metrics["reward/total"] = sum(rewards_P) / len(rewards_P)
        logged.append(metrics)
    _save_checkpoint(training_client, "final", log_path, "both", {"batch": n_train_batches}, None)
    return logged

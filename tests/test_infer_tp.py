"""The inference engine under tensor parallelism: two gloo ranks against tp=1 (CPU, float32).

tp=1 is checked against transformers and peft in test_infer.py; here tp=2 must give the
same tokens and the same logprobs within float32 rounding, through forks (block copies
on every rank), mixed adapters, weight updates, and a sampler sharing a tp=2 trainer."""
import importlib.util

import pytest
import torch

import engine
from engine.infer import InferenceModel, SamplingParams
from engine.models import load_model

VOCAB = 1031  # odd: the two ranks hold vocabulary slices of different sizes
PROMPTS = [[5, 900, 17, 3, 3, 41, 1030], [2] * 11, [77]]


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _workload(eng, prompts, adapters):
    """Everything one engine answers; the futures are all submitted before any is awaited."""
    greedy = SamplingParams(max_tokens=9, temperature=0.0)
    hot = SamplingParams(max_tokens=7, temperature=1.0, top_p=0.95, seed=5)
    # One adapter alone first: its steps run projections that no loaded adapter targets
    # (o, gate/up, k) with adapter ids; on a TP shard every projection is a LoRALinear.
    first = eng.sample(prompts[2], 1, greedy, adapter=adapters[0]).result(timeout=120)
    futs = [eng.sample(p, 2, greedy) for p in prompts]  # forks: copies of the partial last block
    futs += [eng.sample(prompts[0], 1, greedy, adapter=a) for a in adapters]
    futs.append(eng.sample(prompts[1], 3, hot))
    scored = eng.compute_logprobs(prompts[2] + prompts[0])
    res = [f.result(timeout=120) for f in futs]
    tokens = [[s.tokens for s in r.sequences] for r in [first] + res]
    lps = [lp for r in res for s in r.sequences for lp in s.raw_logprobs]
    return tokens, torch.tensor(lps), torch.tensor(scored.result(timeout=120)[1:])


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_tp2_serves_like_tp1(checkpoint, tmp_path, peft_adapters):
    folder = checkpoint("qwen3")  # q/k norms on the local heads
    prompts = _prompts(3, (6, 13, 1, 22))
    adapters = peft_adapters(folder)
    kw = dict(max_batch_size=16, block_size=4, kv_cache_tokens=512)
    with InferenceModel(folder, **kw) as one:
        ref = _workload(one, prompts, adapters)
    model = load_model(folder)
    state = {n: p.detach() * (1.25 if "qkv" in n or "embed" in n else 1.0) for n, p in model.state_dict().items()}
    with InferenceModel(folder, tp=2, **kw) as two:
        assert two.tp == 2 and two.model is None
        got = _workload(two, prompts, adapters)
        # Bad input is refused in this process; the ranks keep serving.
        with pytest.raises(KeyError, match="not a weight"):
            two.update_weights({"layers.0.nope": torch.zeros(1)}).result(timeout=60)
        with pytest.raises(ValueError, match="has shape"):
            two.update_weights({"norm.weight": torch.zeros(3)}).result(timeout=60)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
        from safetensors.torch import save_file
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 5)},
                  str(bad / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match="could not be loaded"):
            two.sample(prompts[0], 1, SamplingParams(max_tokens=2), adapter=bad).result(timeout=60)
        # Full weights updated in place (each rank keeps its slice of every tensor).
        assert two.update_weights(state).result(timeout=60) == 1
        after = two.sample(prompts[1], 1, SamplingParams(max_tokens=6, temperature=0.0)).result(timeout=60)
    assert got[0] == ref[0]
    assert ref[0][5][0] != ref[0][1][0] and ref[0][6][0] != ref[0][1][0]  # the adapters changed the tokens
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=1e-5)
    model.load_state_dict(state)
    with InferenceModel(model, **kw) as one:
        want = one.sample(prompts[1], 1, SamplingParams(max_tokens=6, temperature=0.0)).result(timeout=60)
    assert after.sequences[0].tokens == want.sequences[0].tokens
    assert after.sequences[0].weight_version == 1


def _train_and_sample(folder, tp, prompt, out):
    """A LoRA trainer at ``tp`` with a sampling client sharing its ranks' weights: logprobs
    before and after one step, and the client's weight versions; snapshots taken before and
    after the step keep giving those logprobs; then the saved adapter served by a client of
    its own (at the trainer's tp) gives the same logprobs."""
    datum = engine.Datum(model_input=engine.ModelInput.from_ints(prompt[:-1]),
                         loss_fn_inputs={"target_tokens": prompt[1:]})
    trainer = engine.model(folder).tp(tp).with_adapter(rank=4).spawn_train(max_batch_size=64)
    try:
        sampler = trainer.save_weights_and_get_sampling_client(kind="inflight", kv_cache_tokens=256, block_size=4)
        before = sampler.compute_logprobs(prompt).result(timeout=120)
        snapshots = [trainer.save_weights_and_get_sampling_client()]
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(engine.AdamParams(learning_rate=0.05)).result(timeout=120)
        res = sampler.sample(prompt, 2, SamplingParams(max_tokens=5, temperature=0.0)).result(timeout=120)
        after = sampler.compute_logprobs(prompt).result(timeout=120)
        snapshots.append(trainer.save_weights_and_get_sampling_client())
        saved = trainer.save_weights_for_sampler(out / f"tp{tp}").result(timeout=120)
        with trainer.create_sampling_client(saved, kv_cache_tokens=256) as client:
            assert client.tp == tp
            torch.testing.assert_close(torch.tensor(client.compute_logprobs(prompt).result(timeout=120)[1:]),
                                       torch.tensor(after[1:]), rtol=0, atol=1e-5)
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(engine.AdamParams(learning_rate=0.05)).result(timeout=120)
        for snapshot, want in zip(snapshots, (before, after)):
            torch.testing.assert_close(torch.tensor(snapshot.compute_logprobs(prompt).result(timeout=120)[1:]),
                                       torch.tensor(want[1:]), rtol=0, atol=1e-5)
    finally:
        trainer.close()
    return torch.tensor(before[1:]), torch.tensor(after[1:]), [s.tokens for s in res.sequences], \
        [s.weight_version for s in res.sequences]


def test_sampler_of_a_tp2_trainer_shares_its_weights(checkpoint, tmp_path):
    folder = checkpoint("llama")
    (prompt,) = _prompts(8, (12,))
    ref = _train_and_sample(folder, 1, prompt, tmp_path)
    got = _train_and_sample(folder, 2, prompt, tmp_path)
    assert got[3] == ref[3] == [1, 1]  # sampled after the step, with its version
    assert (got[1] - got[0]).abs().max() > 1e-3  # the step reached the sampler
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-4)
    assert got[2] == ref[2]


def test_serve_tp_under_torchrun(checkpoint, tmp_path):
    """Ranks launched by torchrun: rank 0's engine drives the other rank (serve_tp)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine.parallel.workers import free_port

    folder = checkpoint("mistral")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.pt"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(root / "tests" / "torchrun_infer_script.py"), str(folder), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    with InferenceModel(folder, max_batch_size=16, block_size=4, kv_cache_tokens=256) as one:
        greedy = [one.sample(p, 2, SamplingParams(max_tokens=6, temperature=0.0)) for p in PROMPTS]
        tokens = [[s.tokens for s in f.result(timeout=60).sequences] for f in greedy]
        scored = one.compute_logprobs(PROMPTS[1]).result(timeout=60)[1:]
    assert got["tp"] == 2
    assert got["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(scored), rtol=0, atol=1e-5)

"""The training API end to end on tiny random models (CPU)."""
import asyncio
import math

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.train.batching import pack_micro_batches

VOCAB = 1031  # the tiny presets' vocabulary


def _data(seed=0, lengths=(7, 1, 19, 12), rl=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(0, VOCAB, (n + 1,), generator=g)
        inputs = {"target_tokens": tokens[1:].numpy()}  # numpy on purpose
        if rl:
            inputs["logprobs"] = (-3 - torch.rand(n, generator=g) * 4).tolist()  # lists on purpose
            inputs["advantages"] = torch.randn(n, generator=g)
        else:
            inputs["weights"] = torch.rand(n, generator=g)
        out.append(engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), inputs))
    return out


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


def _reference(loss_fn, cfg, lp, d):
    """Tinker's formulas on float64 logprobs of full logits."""
    t = {k: _arr(v).double() for k, v in d.loss_fn_inputs.items() if k != "target_tokens"}
    if loss_fn == "cross_entropy":
        return -(lp * t["weights"]).sum()
    q, a = t["logprobs"], t["advantages"]
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -(ratio * a).sum()
    if loss_fn == "ppo":
        clipped = ratio.clamp(cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2))
        return -torch.min(ratio * a, clipped * a).sum()
    if loss_fn == "cispo":
        clipped = ratio.clamp(cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0)).detach()
        return -(clipped * lp * a).sum()
    if loss_fn == "dro":
        return -(lp * a - 0.5 * cfg.get("beta", 0.05) * (lp - q) ** 2).sum()
    raise AssertionError(loss_fn)


def _arr(value):
    """A loss input as a tensor (Datum stores arrays as TensorData)."""
    return value.to_torch() if hasattr(value, "to_torch") else torch.as_tensor(value)


def _grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer._trainer.params if p.grad is not None}


@pytest.mark.parametrize("loss_fn,cfg", [
    ("cross_entropy", None), ("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", None), ("dro", {"beta": 0.3}),
])
def test_builtin_losses_match_torch_formula(llama, loss_fn, cfg):
    trainer = engine.model(llama).spawn_train(max_batch_size=64)
    data = _data(seed=1, rl=loss_fn != "cross_entropy")
    if loss_fn != "cross_entropy":  # sampler logprobs near the model's so that clipping both binds and not
        lp = trainer.forward(data, "importance_sampling").result().loss_fn_outputs
        g = torch.Generator().manual_seed(2)
        for d, o in zip(data, lp):
            d.loss_fn_inputs["logprobs"] = o["logprobs"].to_torch() + 0.3 * torch.randn(o["logprobs"].shape, generator=g)
    out = trainer.forward_backward(data, loss_fn, cfg).result()
    ours = _grads(trainer)

    # Reference: float64 copy of the model, full logits, torch formulas.
    model = trainer._trainer.model
    ref = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    total = torch.zeros((), dtype=torch.float64)
    for d, o in zip(data, out.loss_fn_outputs):
        tokens = torch.tensor(d.model_input.to_ints())
        batch = engine.models.PackedBatch.from_sequences([tokens.tolist()])
        h = torch.func.functional_call(model.double(), ref, (batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                                            batch.max_seqlen))
        model.float()
        logits = h @ ref["embed.weight" if model.lm_head is None else "lm_head.weight"].t()
        lp = torch.log_softmax(logits, -1).gather(1, _arr(d.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        torch.testing.assert_close(o["logprobs"].to_torch().double(), lp.detach(), rtol=0, atol=1e-4)
        total = total + _reference(loss_fn, cfg or {}, lp, d)
    total.backward()
    assert math.isclose(out.metrics["loss:sum"], total.item(), rel_tol=1e-4, abs_tol=1e-4)
    for n, g in ours.items():
        torch.testing.assert_close(g.double(), ref[n].grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_micro_batching_equals_one_batch(llama):
    data = _data(seed=3, lengths=(30, 5, 17, 1, 24, 9, 40))
    big = engine.model(llama).spawn_train(max_batch_size=4096)
    small = engine.model(llama).spawn_train(max_batch_size=41)
    a = big.forward_backward(data, "cross_entropy").result()
    b = small.forward_backward(data, "cross_entropy").result()
    assert a.metrics["micro_batches:sum"] == 1 and b.metrics["micro_batches:sum"] >= 4
    assert math.isclose(a.metrics["loss:sum"], b.metrics["loss:sum"], rel_tol=1e-5)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
        torch.testing.assert_close(x["logprobs"].to_torch(), y["logprobs"].to_torch(), rtol=1e-5, atol=1e-5)
    gb, gs = _grads(big), _grads(small)
    for n in gb:
        torch.testing.assert_close(gb[n], gs[n], rtol=1e-4, atol=1e-6)


def test_pack_first_fit_decreasing_and_drop():
    with pytest.warns(UserWarning, match="dropped 1 datum"):
        bins, dropped = pack_micro_batches([5, 9, 3, 12, 4], 10)
    assert dropped == [3]
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 4]
    assert bins == [[1], [0, 4], [2]]  # 9 | 5+4 | 3 (first fit, largest first)
    bins, _ = pack_micro_batches([3, 4, 2, 2], 7, group=2)
    assert bins == [[0, 1], [2, 3]]


def test_long_datum_dropped_and_counted(llama):
    trainer = engine.model(llama).spawn_train(max_batch_size=16)
    with pytest.warns(UserWarning, match="max_batch_size=16"):
        out = trainer.forward_backward(_data(lengths=(7, 19, 12)), "cross_entropy").result()
    assert out.metrics["dropped_data:sum"] == 1 and out.metrics["tokens:sum"] == 19
    assert torch.isnan(out.loss_fn_outputs[1]["logprobs"].to_torch()).all()


def test_forward_backward_custom_matches_builtin(llama):
    data = _data(seed=4)
    a = engine.model(llama).spawn_train(max_batch_size=20)
    b = engine.model(llama).spawn_train(max_batch_size=20)
    ref = a.forward_backward(data, "cross_entropy").result()

    def fn(ds, logprobs):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(ds, logprobs))
        return loss, {"n": len(logprobs)}

    out = b.forward_backward_custom(data, fn).result()
    assert out.metrics["n"] == 4 and math.isclose(out.metrics["loss:sum"], ref.metrics["loss:sum"], rel_tol=1e-5)
    ga, gb = _grads(a), _grads(b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


def test_adamw_identical_to_torch_with_clipping(llama):
    data = _data(seed=5)
    trainer = engine.model(llama).spawn_train(max_batch_size=64)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in trainer._trainer.params}
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for step in range(3):
        trainer.forward_backward(data, "cross_entropy").result()
        for n, p in trainer._trainer.params:
            params[n].grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(params.values(), 0.5)
        opt.step()
        trainer.optim_step(engine.AdamParams(1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1,
                                             grad_clip_norm=0.5)).result()
        for n, p in trainer._trainer.params:
            assert torch.equal(p.detach(), params[n].detach()), n


@pytest.mark.parametrize("kind", ["full", "lora", "bf16"])
def test_resume_reproduces_next_loss_exactly(llama, tmp_path, kind):
    """bf16: full fine-tuning with fp32 master weights, which the state saves and restores."""
    def build():
        b = engine.model(llama)
        b = {"full": b, "lora": b.with_adapter(rank=4, alpha=8), "bf16": b.dtype("bfloat16")}[kind]
        return b.spawn_train(max_batch_size=32)

    data, adam = _data(seed=6), engine.AdamParams(1e-2, weight_decay=0.01)
    a = build()
    a.forward_backward(data, "cross_entropy")
    a.optim_step(adam)
    path = a.save_state(str(tmp_path / "ckpt")).result()
    a.forward_backward(data, "cross_entropy")
    a.optim_step(adam)
    expected = a.forward(data, "cross_entropy").result().metrics["loss:sum"]

    b = build()
    b.load_state_with_optimizer(path).result()
    assert b.get_info().step == 1
    b.forward_backward(data, "cross_entropy")
    b.optim_step(adam)
    assert b.forward(data, "cross_entropy").result().metrics["loss:sum"] == expected
    c = build()  # weights only: the optimizer restarts, so the next loss differs
    c.load_state(path).result()
    c.forward_backward(data, "cross_entropy")
    c.optim_step(adam)
    assert c.forward(data, "cross_entropy").result().metrics["loss:sum"] != expected


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_full_weights_export_loads_in_transformers(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = engine.model(llama).spawn_train(max_batch_size=64)
    data = _data(seed=7)
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(engine.AdamParams(1e-2))
    path = trainer.save_weights_for_sampler(str(tmp_path / "export")).result().path
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = trainer.forward(data, "cross_entropy").result().loss_fn_outputs
    for d, o in zip(data, ours):
        lp = torch.log_softmax(_hf_logits(hf, d.model_input.to_ints()), -1)
        lp = lp.gather(1, _arr(d.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        torch.testing.assert_close(o["logprobs"].to_torch(), lp, rtol=0, atol=1e-4)


def test_peft_adapter_export_loads_with_peft(llama, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    trainer = engine.model(llama).with_adapter(rank=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]) \
        .spawn_train(max_batch_size=64)
    data = _data(seed=8)
    for _ in range(2):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(engine.AdamParams(1e-2))
    path = trainer.save_weights_for_sampler(str(tmp_path / "adapter")).result().path
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(base, path).eval()
    ours = trainer.forward(data, "cross_entropy").result().loss_fn_outputs
    for d, o in zip(data, ours):
        lp = torch.log_softmax(_hf_logits(hf, d.model_input.to_ints()), -1)
        lp = lp.gather(1, _arr(d.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        torch.testing.assert_close(o["logprobs"].to_torch(), lp, rtol=0, atol=1e-4)


def test_futures_run_in_order_and_errors_leave_model_usable(llama):
    trainer = engine.model(llama).spawn_train(max_batch_size=64)
    data = _data(seed=9)
    before = trainer.forward(data, "cross_entropy")
    fb = trainer.forward_backward(data, "cross_entropy")
    bad = trainer.forward_backward(data, "no_such_loss")
    step = trainer.optim_step(engine.AdamParams(1e-2))
    after = trainer.forward(data, "cross_entropy")
    with pytest.raises(ValueError, match="loss_fn must be one of"):
        bad.result()
    assert step.result().metrics["step"] == 1
    assert fb.result().metrics["loss:sum"] == before.result().metrics["loss:sum"]
    assert after.result().metrics["loss:sum"] < before.result().metrics["loss:sum"]

    async def main():
        fut = await trainer.forward_async(data, "cross_entropy")
        return await fut

    assert asyncio.run(main()).metrics["loss:sum"] == after.result().metrics["loss:sum"]


def test_bad_inputs_name_the_argument(llama):
    trainer = engine.model(llama).spawn_train(max_batch_size=64)
    tokens = [1, 2, 3]
    cases = [
        ([engine.Datum(engine.ModelInput.from_ints(tokens), {"target_tokens": [2, 3]})], "cross_entropy", None,
         r"data\[0\].loss_fn_inputs\['target_tokens'\] has length 2"),
        ([engine.Datum(engine.ModelInput.from_ints(tokens), {"target_tokens": [2, 3, 4]})], "ppo", None,
         r"missing \['logprobs', 'advantages'\]"),
        ([engine.Datum(engine.ModelInput.from_ints(tokens), {"target_tokens": [2, 3, 4], "weight": [1, 1, 1]})],
         "cross_entropy", None, r"unknown key\(s\) \['weight'\]"),
        ([engine.Datum(engine.ModelInput.from_ints(tokens), {"target_tokens": [2, 3, VOCAB]})], "cross_entropy", None,
         "outside the vocabulary"),
        (_data(rl=True), "ppo", {"clip_epsilon": 0.2}, r"loss_fn_config: unknown key\(s\) \['clip_epsilon'\]"),
        (_data(), "mse", None, "does not apply to a language model"),
    ]
    for data, loss_fn, cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            trainer.forward_backward(data, loss_fn, cfg).result()
    assert trainer.forward(_data(), "cross_entropy").result().metrics["loss:sum"] > 0


def test_builder_errors_and_registry(llama, tmp_path):
    engine.register_model("tiny-llama", llama)
    trainer = engine.model("model_registry://tiny-llama").spawn_train(max_batch_size=8)
    assert trainer.get_info().model_type == "llama"
    with pytest.raises(ValueError, match="not registered"):
        engine.model("model_registry://nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        engine.model(tmp_path)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        engine.model(llama).spawn_train(max_batch_size=0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        engine.model(llama).with_adapter(rank=0).spawn_train(max_batch_size=8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        engine.model(llama).dtype("int8").spawn_train(max_batch_size=8)
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=4"):
        engine.model(llama).tp(3).spawn_train(max_batch_size=8)
    with pytest.raises(ValueError, match="no tokenizer files"):
        trainer.get_tokenizer()


def test_scoring_model_mse_and_ranking(llama, tmp_path):
    trainer = engine.model(llama).into_scoring_model().with_adapter(rank=4).spawn_train(max_batch_size=64)
    g = torch.Generator().manual_seed(10)
    data = [engine.Datum(engine.ModelInput.from_ints(torch.randint(0, VOCAB, (n,), generator=g).tolist()),
                         {"target_values": torch.randn(n, generator=g)}) for n in (5, 9, 3)]
    losses = []
    for _ in range(5):
        out = trainer.forward_backward(data, "mse").result()
        trainer.optim_step(engine.AdamParams(1e-2))
        losses.append(out.metrics["loss:sum"])
    assert out.loss_fn_outputs[1]["values"].shape == [9] and losses[-1] < losses[0]
    pairs = [engine.Datum(d.model_input, {}) for d in data[:2]] * 2
    out = trainer.forward_backward(pairs, "ranking").result()
    s = [o["values"].to_torch()[-1] for o in out.loss_fn_outputs]
    expected = -2 * F.logsigmoid(s[0] - s[1])
    assert math.isclose(out.metrics["loss:sum"], expected.item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="groups of 2"):
        trainer.forward(pairs[:3], "ranking").result()
    path = trainer.save_state(str(tmp_path / "rm")).result()
    trainer.load_state_with_optimizer(path).result()


def test_activation_checkpointing_same_gradients(llama):
    data = _data(seed=11)
    a = engine.model(llama).spawn_train(max_batch_size=64)
    b = engine.model(llama).activation_checkpointing().spawn_train(max_batch_size=64)
    a.forward_backward(data, "cross_entropy").result()
    b.forward_backward(data, "cross_entropy").result()
    ga, gb = _grads(a), _grads(b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_tp2_training_equals_tp1(checkpoint, tmp_path, lora):
    """The API at tp=2 (two worker processes, gloo) follows tp=1: loss curve with gradient
    clipping, forward_backward_custom, unsharded sampler export, and a sharded save_state
    that resumes."""
    folder = checkpoint("qwen2")
    data, adam = _data(seed=8), engine.AdamParams(5e-3, weight_decay=0.01, grad_clip_norm=0.5)

    def build(tp):
        b = engine.model(folder).tp(tp)
        return (b.with_adapter(rank=4, alpha=8) if lora else b).spawn_train(max_batch_size=24)

    def custom(data, logprobs):
        return sum((lp ** 2).sum() for lp in logprobs) * 1e-3, {}

    curves = {}
    for tp in (1, 2):
        trainer = build(tp)
        try:
            curve = []
            for step in range(3):
                curve.append(trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
                if step == 1:
                    trainer.forward_backward_custom(data, custom).result()
                trainer.optim_step(adam).result()
            export = trainer.save_weights_for_sampler(str(tmp_path / f"sampler{tp}")).result()
            state = trainer.save_state(str(tmp_path / f"state{tp}")).result()
            curve.append(trainer.forward(data, "cross_entropy").result().metrics["loss:sum"])
            trainer.load_state_with_optimizer(state).result()
            assert trainer.get_info().step == 3 and trainer.get_info().tp == tp
            assert trainer.forward(data, "cross_entropy").result().metrics["loss:sum"] == curve[-1]
        finally:
            trainer.close()
        curves[tp] = curve
        files = {f.name for f in __import__("pathlib").Path(export).iterdir()}
        assert files >= ({"adapter_model.safetensors", "adapter_config.json"} if lora else {"model.safetensors", "config.json"})
    torch.testing.assert_close(torch.tensor(curves[2]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-4)
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if lora else "model.safetensors"
    one, two = load_file(str(tmp_path / "sampler1" / name)), load_file(str(tmp_path / "sampler2" / name))
    assert one.keys() == two.keys()
    for key in one:
        # Adam divides by sqrt(v): where a gradient is ~0 its float rounding (which differs
        # between the sharded and unsharded sums) moves the weight by a fraction of lr.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=0.1 * adam.learning_rate)


def test_sampling_clients_follow_training(llama, tmp_path):
    """A client from the TrainingModel shares its weights (adapter included) and follows each
    optim_step with a new weight version; create_sampling_client serves a saved adapter;
    spawn_inference serves the base model."""
    trainer = engine.model(llama).with_adapter(rank=4, alpha=8).spawn_train(max_batch_size=64)
    data = _data(seed=9)
    prompt = engine.ModelInput.from_ints(data[2].model_input.to_ints())
    try:
        sampler = trainer.save_weights_and_get_sampling_client(kind="inflight")
        trained_lp = trainer.forward(data[2:3], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()

        def client_lp(client):
            tokens = prompt.to_ints() + [data[2].loss_fn_inputs["target_tokens"].tolist()[-1]]
            return torch.tensor(client.compute_logprobs(tokens).result()[1:])

        torch.testing.assert_close(client_lp(sampler), trained_lp.float(), rtol=1e-4, atol=1e-4)
        before = sampler.sample(prompt, 1, engine.SamplingParams(max_tokens=3, temperature=0.0)).result()
        for _ in range(2):
            trainer.forward_backward(data, "cross_entropy")
            trainer.optim_step(engine.AdamParams(5e-2)).result()
        after = sampler.sample(prompt, 1, engine.SamplingParams(max_tokens=3, temperature=0.0)).result()
        assert after.sequences[0].weight_version > before.sequences[0].weight_version
        trained_lp = trainer.forward(data[2:3], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        torch.testing.assert_close(client_lp(sampler), trained_lp.float(), rtol=1e-4, atol=1e-4)
        saved = trainer.save_weights_for_sampler(str(tmp_path / "adapter")).result()
        client = trainer.create_sampling_client(saved)
        torch.testing.assert_close(client_lp(client), trained_lp.float(), rtol=1e-4, atol=1e-4)
        client.close()
        # Closing the shared client does not stall training; asking again makes a new one.
        sampler.close()
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(engine.AdamParams(5e-2)).result(timeout=60)
        with pytest.raises(RuntimeError, match="closed"):
            sampler.update_weights().result(timeout=5)
        again = trainer.save_weights_and_get_sampling_client(kind="inflight")
        assert again.result() is not sampler.result()
        trained_lp = trainer.forward(data[2:3], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        torch.testing.assert_close(client_lp(again), trained_lp.float(), rtol=1e-4, atol=1e-4)
    finally:
        trainer.close()
    base = engine.model(llama).spawn_inference(max_batch_size=64)
    try:
        out = base.sample(prompt, 2, engine.SamplingParams(max_tokens=4, seed=1)).result()
        assert len(out.sequences) == 2 and all(len(s.tokens) == 4 for s in out.sequences)
    finally:
        base.close()


def test_shared_sampler_mixes_its_adapter_with_request_adapters(llama, tmp_path):
    """A sampler sharing a LoRA trainer's model that also serves PEFT adapters per request:
    requests naming none keep the trained adapter on every projection; a request naming
    one gets the base model plus that adapter only."""
    trainer = engine.model(llama).with_adapter(rank=4, alpha=8).spawn_train(max_batch_size=64)
    data = _data(seed=5)
    try:
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(engine.AdamParams(5e-2)).result()
        other = engine.model(llama).with_adapter(rank=2, alpha=4, target_modules=["q_proj", "down_proj"]) \
            .spawn_train(max_batch_size=64)
        other.forward_backward(data, "cross_entropy")
        other.optim_step(engine.AdamParams(5e-2)).result()
        path = other.save_weights_for_sampler(str(tmp_path / "other")).result()
        want_other = other.forward(data[2:3], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        other.close()
        sampler = trainer.save_weights_and_get_sampling_client(kind="inflight")
        tokens = data[2].model_input.to_ints() + [data[2].loss_fn_inputs["target_tokens"].tolist()[-1]]
        mine, theirs = sampler.compute_logprobs(tokens), sampler.compute_logprobs(tokens, adapter=path)
        want = trainer.forward(data[2:3], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        torch.testing.assert_close(torch.tensor(mine.result()[1:]), want.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(theirs.result()[1:]), want_other.float(), rtol=1e-4, atol=1e-4)
    finally:
        trainer.close()

"""bf16 full fine-tuning with fp32 master weights (issue 18, item 4): it tracks fp32
training where plain bf16 AdamW drifts; masters are saved and exported rounded (resumed bit
for bit: test_train_api.py's resume test)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine

VOCAB = 1031  # the tiny presets' vocabulary


def _data(seed=0, lengths=(12, 7, 16)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(0, VOCAB, (n + 1,), generator=g)
        out.append(engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), {"target_tokens": tokens[1:]}))
    return out


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


def _final_loss(builder, data, steps, lr):
    trainer = builder.spawn_train(max_batch_size=64)
    for _ in range(steps):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(engine.AdamParams(learning_rate=lr))
    return trainer.forward(data, "cross_entropy").result().metrics["loss:sum"], trainer


def test_bf16_with_master_weights_tracks_fp32_and_plain_bf16_drifts(llama):
    """200 AdamW steps at lr 1e-4: an update is ~1e-4 while a weight of 0.02 moves in bf16
    steps of ~1e-4, so plain bf16 rounds many updates away."""
    data, steps, lr = _data(), 200, 1e-4
    ref, _ = _final_loss(engine.model(llama).dtype("float32"), data, steps, lr)
    master, trainer = _final_loss(engine.model(llama).dtype("bfloat16"), data, steps, lr)
    plain, _ = _final_loss(engine.model(llama).dtype("bfloat16").master_weights(False), data, steps, lr)
    initial = engine.model(llama).spawn_train(max_batch_size=64).forward(data, "cross_entropy").result()
    assert ref < 0.8 * initial.metrics["loss:sum"]  # it trained
    master_gap, plain_gap = abs(master - ref) / ref, abs(plain - ref) / ref
    assert master_gap < 0.02, (master, ref)
    assert plain_gap > 0.04 and plain_gap > 5 * master_gap, (plain, master, ref)

    inner = trainer._trainer
    assert trainer.get_info().master_weights and inner.masters
    for p, m in inner.masters.items():
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32 and p.grad is None
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
        state = inner.optimizer.state[m]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_lora_on_bf16_keeps_fp32_adapters_without_masters(llama):
    trainer = engine.model(llama).dtype("bfloat16").with_adapter(rank=4).spawn_train(max_batch_size=64)
    inner = trainer._trainer
    assert all(p.dtype == torch.float32 for _, p in inner.params) and not inner.masters
    assert not trainer.get_info().master_weights


def test_bf16_export_is_the_masters_rounded(llama, tmp_path):
    """save_state keeps the fp32 masters (the resume test in test_train_api.py checks them
    bit for bit); save_weights_for_sampler writes them rounded to bf16."""
    _, trainer = _final_loss(engine.model(llama).dtype("bfloat16"), _data(seed=3), 2, 3e-4)
    folder = Path(trainer.save_state(str(tmp_path / "ckpt")).result().path)
    saved = load_file(next(folder.glob("state-*.safetensors")))
    inner = trainer._trainer
    for n, m in inner.optim_params:
        assert saved[f"weights.{n}"].dtype == torch.float32 and torch.equal(saved[f"weights.{n}"], m.detach()), n
    out = trainer.save_weights_for_sampler(str(tmp_path / "export")).result().path
    exported = load_file(f"{out}/model.safetensors")
    master = inner.masters[inner.model.embed.weight]
    assert exported["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(exported["model.embed_tokens.weight"], master.to(torch.bfloat16))


def test_tp2_bf16_master_weights_train(llama):
    """The masters' gradient norm under tensor parallelism (sharded and replicated masters)."""
    data = _data(seed=4)
    trainer = engine.model(llama).tp(2).dtype("bfloat16").spawn_train(max_batch_size=64)
    try:
        assert trainer.get_info().master_weights
        first = trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        norm = trainer.optim_step(engine.AdamParams(1e-3)).result().metrics["grad_norm"]
        second = trainer.forward(data, "cross_entropy").result().metrics["loss:sum"]
    finally:
        trainer.close()
    ref = engine.model(llama).dtype("bfloat16").spawn_train(max_batch_size=64)
    ref_first = ref.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    ref_norm = ref.optim_step(engine.AdamParams(1e-3)).result().metrics["grad_norm"]
    assert first == pytest.approx(ref_first, rel=2e-2) and norm == pytest.approx(ref_norm, rel=2e-2)
    assert second < first

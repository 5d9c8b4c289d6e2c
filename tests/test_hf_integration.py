"""engine.integrations.hf.EngineForCausalLM against the transformers model of the same
checkpoint: the same losses under transformers' Trainer (padded and packed batches, float32),
PEFT-format LoRA, and the folders it saves."""
from __future__ import annotations

import pytest
import torch

# The tests call gradient_checkpointing_* / TrainingArguments(gradient_checkpointing=...), the
# names transformers 4.57 and 5 both take (the engine supports both); 5 deprecates them.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning")

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling,  # noqa: E402
                          DataCollatorWithFlattening, Trainer, TrainingArguments, set_seed)

from engine.integrations.hf import EngineForCausalLM, unpad  # noqa: E402
from engine.models.presets import byte_tokenizer  # noqa: E402


class Examples(torch.utils.data.Dataset):
    """Token lists of uneven lengths (3 to 19 tokens), labels = input_ids."""

    def __init__(self, n: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(3, 20, (n,), generator=g).tolist()
        self.rows = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": list(self.rows[i])}


def padded_collator():
    """Right padding; labels -100 on padding (DataCollatorForLanguageModeling with mlm=False)."""
    tok = byte_tokenizer()
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    return lambda feats: collate([{"input_ids": f["input_ids"]} for f in feats])


COLLATORS = {"padded": padded_collator, "packed": DataCollatorWithFlattening}


def train(model, dataset, collator, tmp_path, *, steps: int, seed: int = 0, eval_dataset=None,
          **overrides) -> list[float]:
    """Per-step training losses (then the eval loss when ``eval_dataset`` is given)."""
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=steps, learning_rate=3e-3, logging_steps=1, report_to="none", use_cpu=True,
                             save_strategy="no", seed=seed, disable_tqdm=True, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses + ([trainer.evaluate()["eval_loss"]] if eval_dataset is not None else [])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_trainer_matches_transformers(checkpoint, tmp_path, layout):
    folder = checkpoint("qwen3")
    data = Examples(64, 259)
    collator = COLLATORS[layout]()
    ours = EngineForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers separates packed sequences only without a KV cache (masking_utils); its
    # default use_cache=True would let them attend to each other.
    ref.config.use_cache = False
    batch = collator([data[i] for i in range(8)])
    if layout == "packed":
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    else:
        assert (batch["attention_mask"] == 0).any()
    for num_items in (None, 37):
        a = ours(**batch, num_items_in_batch=num_items).loss
        b = ref(**batch, num_items_in_batch=num_items).loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    held_out = Examples(8, 259, seed=9)
    set_seed(0)
    ours_losses = train(ours, data, collator, tmp_path / "ours", steps=20, eval_dataset=held_out)
    set_seed(0)
    ref_losses = train(ref, data, collator, tmp_path / "ref", steps=20, eval_dataset=held_out)
    assert len(ours_losses) == 21  # 20 steps and the eval loss
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learned something
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)


def test_packed_and_padded_forward_agree(checkpoint):
    """Left and right padding, packed rows (position_ids restarting at 0) and one long row
    give each sequence the same logits and the batch the same summed loss."""
    model = EngineForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 1031, (n,), generator=g) for n in (1, 9, 4)]
    width = max(len(s) for s in seqs)
    right = torch.zeros(3, width, dtype=torch.long)
    left = torch.zeros(3, width, dtype=torch.long)
    mask_r, mask_l = torch.zeros_like(right), torch.zeros_like(left)
    for i, s in enumerate(seqs):
        right[i, :len(s)], mask_r[i, :len(s)] = s, 1
        left[i, width - len(s):], mask_l[i, width - len(s):] = s, 1
    flat = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels_flat = flat.clone()
    labels_flat[0, torch.cat([torch.tensor([0]), torch.tensor([len(s) for s in seqs]).cumsum(0)[:-1]])] = -100
    kw = dict(num_items_in_batch=sum(len(s) - 1 for s in seqs), return_logits=True)
    r = model(right, attention_mask=mask_r, labels=right.masked_fill(mask_r == 0, -100), **kw)
    lo = model(left, attention_mask=mask_l, labels=left.masked_fill(mask_l == 0, -100), **kw)
    p = model(flat, position_ids=pos, labels=labels_flat, **kw)
    p_unmarked = model(flat, position_ids=pos, labels=flat, **kw)  # no -100 at starts: the boundary is still cut
    labels_r = right.masked_fill(mask_r == 0, -100)
    shifted = torch.cat([labels_r[:, 1:], torch.full((3, 1), -100)], dim=1)
    given = model(right, attention_mask=mask_r, shift_labels=shifted, num_items_in_batch=kw["num_items_in_batch"])
    for other in (lo.loss, p.loss, p_unmarked.loss, given.loss):
        torch.testing.assert_close(other, r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.logits[0], r.logits[mask_r.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lo.logits[mask_l.bool()], r.logits[mask_r.bool()], rtol=1e-5, atol=1e-5)
    assert (r.logits[mask_r == 0] == 0).all()
    packed = unpad(flat, None, pos)
    assert packed["cu_seqlens"].tolist() == [0, 1, 10, 14] and packed["max_seqlen"] == 9
    assert model(right, attention_mask=mask_r, logits_to_keep=1).logits.shape == (3, 1, 1031)
    assert model(right, attention_mask=mask_r, labels=right).logits is None


def test_save_pretrained_and_gradient_checkpointing(checkpoint, tmp_path):
    folder = checkpoint("qwen2")
    model = EngineForCausalLM.from_pretrained(folder, dtype="float32", device_map="cpu").train()
    ids = torch.randint(0, 1031, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()  # transformers 4's name; 5 also calls it activation_checkpointing_enable
    assert model.is_gradient_checkpointing and "forward" in model.model.layers[1].__dict__
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7, msg=n)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and "forward" not in model.model.layers[1].__dict__
    with torch.no_grad():
        model.model.layers[0].mlp.down.weight.mul_(1.5)  # a change the saved folder must carry
    model.save_pretrained(tmp_path / "out")
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temporaries left
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # Trainer's resume_from_checkpoint: load_state_dict of the saved (Hugging Face named) file
    from safetensors.torch import load_file

    fresh = EngineForCausalLM.from_pretrained(folder, dtype=torch.float32)
    result = fresh.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), False)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Trainer's bf16=True: computed in the model's dtype
        torch.testing.assert_close(model(**flat).loss, model(ids, labels=ids).loss, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="unsupported keyword"):
        model(ids, some_flag=True)
    with pytest.raises(ValueError, match="device_map"):
        EngineForCausalLM.from_pretrained(folder, device_map={"model.layers.0": 0, "lm_head": 1})


def test_lora_matches_peft(checkpoint, tmp_path):
    """add_adapter(LoraConfig) on q_proj/v_proj trains as peft's get_peft_model on the
    transformers model does (same initial A, gradient checkpointing on), and the adapter it
    saves loads with PeftModel.from_pretrained."""
    peft = pytest.importorskip("peft")
    folder = checkpoint("qwen3")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    set_seed(0)
    ref = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), config)
    ref.save_pretrained(tmp_path / "init")
    ours = EngineForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(ValueError, match="not found"):  # fused q/k/v: no q_proj module for peft (docstring)
        peft.get_peft_model(ours, config)
    ours.add_adapter(config)
    ours.load_adapter(tmp_path / "init")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.attn.qkv.{w}" for i in range(2) for w in ("lora_a", "lora_b")}
    data, collator = Examples(32, 259, seed=1), padded_collator()
    kw = dict(steps=8, gradient_checkpointing=True)  # the name transformers 4 and 5 both take
    set_seed(0)
    ours_losses = train(ours, data, collator, tmp_path / "ours", **kw)
    set_seed(0)
    ref.enable_input_require_grads()  # peft's step for checkpointing a frozen base (transformers 4 is reentrant)
    ref_losses = train(ref, data, collator, tmp_path / "ref", **kw)
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)
    assert ours.is_gradient_checkpointing
    ours.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                            tmp_path / "adapter")
    ids = torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(2))
    ours.eval()
    torch.testing.assert_close(ours(ids).logits, loaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (loaded(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter was trained


def test_bench_hf_smoke(tmp_path, monkeypatch, capsys):
    import json
    import sys
    from pathlib import Path

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_hf import main as bench

    rows = bench(["--smoke"])
    assert {r["impl"] for r in rows} >= {"engine", "transformers"} and all(r["tokens_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "hf.json").read_text())["meta"]["real_tokens"] == 12 + 40 + 64 + 7
    if not torch.cuda.is_available():
        assert bench([]) == [] and "needs a CUDA GPU" in capsys.readouterr().out

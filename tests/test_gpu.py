"""GPU checks (``pytest -m gpu``): bf16 parity with transformers at a larger size, with the
bound relative to transformers' own bf16 error against float32."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.models import PackedBatch, load_model
from engine.models.presets import TINY, save_random_checkpoint

pytestmark = pytest.mark.gpu

LENGTHS = (300, 1, 1024, 77, 513)
MEDIUM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", tuple(TINY))
def test_bf16_parity(tmp_path, family):
    overrides = dict(MEDIUM, head_dim=64) if family == "qwen3" else dict(MEDIUM)
    if family == "mistral":
        overrides["sliding_window"] = 256
    folder = save_random_checkpoint(tmp_path, family, **overrides)
    vocab = MEDIUM["vocab_size"]
    seqs = [torch.randint(0, vocab, (n,)).tolist() for n in LENGTHS]
    batch = PackedBatch.from_sequences(seqs, vocab_size=vocab, device="cuda")

    hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 truth must be true float32
    with torch.no_grad():
        truth = torch.cat([hf32(torch.tensor([s], device="cuda")).logits[0] for s in seqs])
        del hf32
        hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        theirs = torch.cat([hf16(torch.tensor([s], device="cuda")).logits[0] for s in seqs])
        del hf16
        model = load_model(folder, dtype=torch.bfloat16, device="cuda")
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        ours = model.compute_logits(hidden)
    err_ours, err_theirs = _rel(ours, truth), _rel(theirs, truth)
    print(f"{family}: bf16 relative error engine {err_ours:.3e}, transformers {err_theirs:.3e}")
    assert err_ours <= 2 * err_theirs + 1e-4


def test_fp32_parity_on_gpu(checkpoint):
    """The CPU acceptance check (float32, 1e-4) also holds with the model on the GPU."""
    folder = checkpoint("llama")
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(folder, device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    seqs = [torch.randint(0, 1031, (n,)).tolist() for n in (13, 1, 29)]
    batch = PackedBatch.from_sequences(seqs, device="cuda")
    with torch.no_grad():
        ours = model.compute_logits(model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen))
        ref = torch.cat([hf(torch.tensor([s], device="cuda")).logits[0] for s in seqs])
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4

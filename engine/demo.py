"""``python -m engine demo``: the main job until the training API lands.

Builds a random Llama-architecture checkpoint in a temporary folder, loads it through
``engine.models.load_model``, checks its logits on a packed batch against transformers
run sequence by sequence, and reports packed-forward throughput.
"""
from __future__ import annotations

import tempfile
import time

import torch

from .models import PackedBatch, load_model
from .models.presets import TINY, save_random_checkpoint

# On a GPU the demo uses a larger (still random) model so throughput means something.
_GPU_DEMO = dict(TINY["llama"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)


def _random_batch(vocab: int, lengths: list[int], device, seed: int = 0) -> tuple[PackedBatch, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return PackedBatch.from_sequences(seqs, vocab_size=vocab, device=device), seqs


def run(device: str | None = None, seconds: float = 3.0) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = _GPU_DEMO if device.type == "cuda" else TINY["llama"]
    with tempfile.TemporaryDirectory(prefix="engine-demo-") as tmp:
        print(f"[1/3] writing a random {config['model_type']} checkpoint "
              f"(hidden {config['hidden_size']}, {config['num_hidden_layers']} layers) to {tmp}")
        save_random_checkpoint(tmp, config, seed=0)
        model = load_model(tmp, dtype=torch.float32, device=device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"      loaded {n_params / 1e6:.2f}M parameters on {device}")

        print("[2/3] parity with transformers on a packed batch of 4 sequences (lengths 17, 1, 40, 9), float32")
        batch, seqs = _random_batch(model.config.vocab_size, [17, 1, 40, 9], device)
        reference = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            ours = model.compute_logits(model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen))
            ref = torch.cat([reference(torch.tensor([s], device=device)).logits[0] for s in seqs])
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        ok = rel <= 1e-4
        print(f"      max relative error of the logits: {rel:.2e} ({'ok' if ok else 'FAILED'}, bound 1e-4)")

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(dtype)
        model.validate_inputs = False  # the batch was checked when it was packed
        lengths = torch.randint(16, 512 if device.type == "cuda" else 96, (32,), generator=torch.Generator().manual_seed(1)).tolist()
        batch, _ = _random_batch(model.config.vocab_size, lengths, device, seed=2)
        print(f"[3/3] packed forward, {len(lengths)} sequences / {batch.num_tokens} tokens, {dtype}")
        args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        with torch.inference_mode():
            model(*args)
            iters, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(*args)
                iters += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        tps = iters * batch.num_tokens / elapsed
        print(f"      {tps:,.0f} tokens/s ({elapsed / iters * 1e3:.1f} ms per forward, {iters} forwards)")
    if not ok:
        raise SystemExit("demo: logits differ from transformers beyond 1e-4")
    return {"max_rel_error": rel, "tokens_per_s": tps}

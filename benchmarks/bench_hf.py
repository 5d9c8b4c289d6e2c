"""transformers' calling convention, three models behind it: one training step of
``engine.integrations.hf.EngineForCausalLM`` against the transformers model (sdpa) and
Liger-Kernel's patched transformers model (fused linear cross-entropy, RMSNorm, RoPE,
SwiGLU), in the same process.

The batch is what a Trainer with a padding collator hands the model: a Llama-3.2-1B-shaped
random model (engine.models.presets.LLAMA_1B), bf16, 8 sequences of 512 to 4096 tokens
right-padded to the longest, ``labels`` -100 on padding, AdamW. The engine model drops the
padding before any FLOP; transformers and Liger compute on it. Reported per side: ms per
step (forward + backward + optimizer), tokens/s counting real tokens only (the padded
total is in the meta), and the peak memory of one step above what is allocated before it
(weights and, after the warm-up steps, AdamW's state are there already: the peak is the
activations, logits and gradients one step adds).

    python benchmarks/bench_hf.py            # GPU
    python benchmarks/bench_hf.py --smoke    # tiny CPU run of the same code paths
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import gpu_or_smoke, peak_memory_bytes, save, table, time_ms  # noqa: E402
from engine.models.presets import LLAMA_1B, TINY, save_random_checkpoint  # noqa: E402


def make_batch(vocab: int, lengths: list[int], device) -> dict:
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device)}


def load(side: str, ckpt: Path, dtype, device):
    if side == "engine":
        from engine.integrations.hf import EngineForCausalLM

        return EngineForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=device)
    if side == "liger":
        from liger_kernel.transformers import AutoLigerKernelForCausalLM

        return AutoLigerKernelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)


def make_step(model, batch: dict):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)

    def step():
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> list[dict]:
    args = gpu_or_smoke(argv, __doc__, "bench_hf.py")
    if args is None:
        return []
    if args.smoke:
        cfg, lengths, device, dtype = dict(TINY["llama"]), [12, 40, 64, 7], "cpu", torch.float32
    else:
        cfg, device, dtype = dict(LLAMA_1B), "cuda", torch.bfloat16
        lengths = [4096, 512, 2048, 1024, 3072, 768, 1536, 2560]
    sides = ["engine", "transformers"]
    try:
        import liger_kernel  # noqa: F401
        sides.append("liger")  # last: its patch changes transformers' modules for later loads
    except ImportError:
        print("Liger-Kernel: skipped (liger_kernel is not installed)")
    batch = make_batch(cfg["vocab_size"], lengths, device)
    tokens = sum(lengths)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        save_random_checkpoint(tmp, cfg, dtype=dtype)
        for side in sides:
            model = load(side, Path(tmp), dtype, device)
            step = make_step(model, batch)
            ms = time_ms(step, warmup=3 if args.smoke else 500, rep=5 if args.smoke else 2000)
            peak = peak_memory_bytes(step)
            rows.append({"impl": side, "ms_per_step": ms, "tokens_per_s": tokens / (ms / 1e3),
                         "peak_gib": None if peak is None else peak / 2**30})
            del model, step
            if device == "cuda":
                torch.cuda.empty_cache()
    base = next(r for r in rows if r["impl"] == "transformers")
    for r in rows:
        r["speedup_vs_transformers"] = r["tokens_per_s"] / base["tokens_per_s"]
    print(table(rows, ["impl", "ms_per_step", "tokens_per_s", "peak_gib", "speedup_vs_transformers"]))
    meta = {"preset": "tiny" if args.smoke else "llama-3.2-1b", "lengths": lengths, "real_tokens": tokens,
            "padded_tokens": len(lengths) * max(lengths), "dtype": str(dtype),
            "peers_skipped": [] if "liger" in sides else ["liger (not installed)"]}
    save("hf", rows, x="impl", y="tokens_per_s", series="impl", title="HF-shaped training step tokens/s",
         ylabel="tokens/s (real tokens)", meta=meta)
    return rows


if __name__ == "__main__":
    main()

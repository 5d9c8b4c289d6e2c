"""One training step end to end: this engine's TrainingModel against transformers (sdpa)
and transformers + peft, in the same process.

Issue 7's setting: a Llama-3.2-1B-shaped random model (engine.models.presets.LLAMA_1B),
bf16, 4 sequences x 4096 tokens per step, AdamW; full fine-tuning, then LoRA r=16 on every
linear layer. Reported per side: ms per step (forward + backward + optimizer), tokens/s,
MFU against the H100's 989 TFLOP/s dense bf16 peak, and peak memory (all allocations,
weights and optimizer state included).

FLOPs per token: 6·P for full fine-tuning (P = matmul parameters, the tied LM head
included), 4·P under LoRA (no weight gradient for the frozen base; the adapter is noise),
plus causal attention 6·L·S·H forward + backward (S = sequence length).

    python benchmarks/bench_train.py            # GPU
    python benchmarks/bench_train.py --smoke    # tiny CPU run of the same code paths
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.harness import save, table, time_ms  # noqa: E402
from engine.models.presets import LLAMA_1B, TINY, save_random_checkpoint  # noqa: E402

H100_PEAK_TFLOPS = 989.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(cfg: dict, seq: int, lora: bool) -> float:
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    params = layers * per_layer + h * cfg["vocab_size"]
    attention = 6 * layers * seq * q  # QK^T and PV, causal (half), forward + backward (3x)
    return (4 if lora else 6) * params + attention


def _peak(step) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def engine_step(ckpt: Path, seqs: list[list[int]], dtype, device, lora: bool):
    # Plain bf16 AdamW, as transformers_step's below: master weights (the engine's default,
    # 18 B per parameter instead of 8 B) would make the memory columns incomparable.
    b = engine.model(ckpt).dtype(dtype).device(device).master_weights(False)
    if lora:
        b = b.with_adapter(rank=16, alpha=32)
    trainer = b.spawn_train(max_batch_size=sum(len(s) for s in seqs))
    data = [engine.Datum(engine.ModelInput.from_ints(s[:-1]), {"target_tokens": s[1:]}) for s in seqs]
    adam = engine.AdamParams(learning_rate=1e-5, weight_decay=0.01)

    def step():
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(adam).result()
    return step, trainer.close


def transformers_step(ckpt: Path, seqs: list[list[int]], dtype, device, lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    ids = torch.tensor(seqs, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            eps=1e-12, weight_decay=0.01)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
    return step, lambda: None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the code paths)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_train.py measures GPU training throughput and needs a CUDA GPU; use --smoke for a CPU check")
        return []
    if args.smoke:
        cfg, seq, device, dtype = dict(TINY["llama"]), 64, "cpu", torch.float32
    else:
        cfg, seq, device, dtype = dict(LLAMA_1B), 4096, "cuda", torch.bfloat16
    batch = 4
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=g).tolist()
    try:
        import peft  # noqa: F401
        has_peft = True
    except ImportError:
        print("peft: skipped (not installed)")
        has_peft = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        save_random_checkpoint(tmp, cfg, dtype=dtype)
        sides = [("engine full", engine_step, False), ("transformers full", transformers_step, False),
                 ("engine lora r=16", engine_step, True)]
        if has_peft:
            sides.append(("transformers+peft lora r=16", transformers_step, True))
        for impl, make, lora in sides:
            step, close = make(Path(tmp), seqs, dtype, device, lora)
            # The engine's datum is seq tokens (input shifted by one); transformers sees seq + 1.
            ms = time_ms(step, warmup=3 if args.smoke else 2000, rep=5 if args.smoke else 6000)
            peak = _peak(step)
            tokens = batch * seq
            tps = tokens / (ms / 1e3)
            mfu = tps * flops_per_token(cfg, seq, lora) / (H100_PEAK_TFLOPS * 1e12)
            rows.append({"impl": impl, "side": impl.split()[0], "mode": "lora" if lora else "full",
                         "ms_per_step": ms, "tokens_per_s": tps, "mfu": mfu if device == "cuda" else None,
                         "peak_gib": peak})
            close()
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        peer = next((p for p in rows if p["mode"] == r["mode"] and p["side"] != "engine"), None)
        r["speedup_vs_peer"] = r["tokens_per_s"] / peer["tokens_per_s"] if peer and r["side"] == "engine" else None
    print(table(rows, ["impl", "ms_per_step", "tokens_per_s", "mfu", "peak_gib", "speedup_vs_peer"]))
    meta = {"preset": "tiny" if args.smoke else "llama-3.2-1b", "tokens_per_step": batch * seq, "batch": batch,
            "seq": seq, "dtype": str(dtype), "flops_per_token_full": flops_per_token(cfg, seq, False),
            "flops_per_token_lora": flops_per_token(cfg, seq, True)}
    save("train", rows, x="mode", y="tokens_per_s", series="side", title="Training step tokens/s", ylabel="tokens/s",
         meta=meta)
    return rows


if __name__ == "__main__":
    main()

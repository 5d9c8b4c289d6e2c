"""Packed forward of a whole model: this engine against transformers on the same weights.

transformers gets the same documents as one padded batch with an attention mask (what a
user without packing would run) and as a loop of one forward per document. Forward only,
no gradients; tokens/s counts real (unpadded) tokens.

    python benchmarks/bench_forward.py                  # GPU: Llama-3.2-1B shape, bf16
    python benchmarks/bench_forward.py --preset tiny    # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import peak_memory_bytes, save, table, time_ms  # noqa: E402
from engine.models import PackedBatch, load_model  # noqa: E402
from engine.models.presets import LLAMA_1B, TINY, save_random_checkpoint  # noqa: E402

PRESETS = {"llama-1b": LLAMA_1B, "tiny": TINY["llama"]}


def document_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Random document lengths in [lo, hi] that add up to exactly ``total``."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(int(torch.randint(lo, hi + 1, (1,), generator=g)), total - sum(lens)))
    return lens


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="llama-1b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per batch (one row each)")
    p.add_argument("--doc-lengths", type=int, nargs=2, default=(64, 2048), metavar=("MIN", "MAX"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    token_counts = args.tokens or ([4096, 16384, 32768] if cuda else [256, 512])
    lo, hi = args.doc_lengths if cuda else (8, 64)

    from transformers import AutoModel

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        print(f"writing a random {args.preset} checkpoint to {tmp}", flush=True)
        save_random_checkpoint(tmp, PRESETS[args.preset], dtype=dtype)
        ours = load_model(tmp, dtype=dtype, device=device)
        ours.validate_inputs = False  # batches are checked when packed on the host
        theirs = AutoModel.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        vocab = ours.config.vocab_size
        for total in token_counts:
            lens = document_lengths(total, lo, hi, seed=total)
            g = torch.Generator().manual_seed(0)
            docs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
            packed = PackedBatch.from_sequences([d.tolist() for d in docs], vocab_size=vocab, device=device)
            padded = torch.zeros(len(docs), max(lens), dtype=torch.long)
            mask = torch.zeros(len(docs), max(lens), dtype=torch.long)
            for i, d in enumerate(docs):
                padded[i, : len(d)], mask[i, : len(d)] = d, 1
            padded, mask = padded.to(device), mask.to(device)
            docs = [d[None].to(device) for d in docs]
            runs = {
                "engine (packed)": lambda: ours(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen),
                "transformers (padded)": lambda: theirs(input_ids=padded, attention_mask=mask),
                "transformers (per document)": lambda: [theirs(input_ids=d) for d in docs],
            }
            for name, fn in runs.items():
                with torch.inference_mode():
                    ms = time_ms(fn)
                    peak = peak_memory_bytes(fn)
                rows.append({"impl": name, "tokens": total, "documents": len(lens), "ms": ms,
                             "tokens_per_s": total / ms * 1e3, "peak_gib": None if peak is None else peak / 2**30})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    for total in token_counts:
        base = next(r["ms"] for r in rows if r["tokens"] == total and r["impl"] == "engine (packed)")
        for r in rows:
            if r["tokens"] == total:
                r["engine_speedup"] = r["ms"] / base
    save("forward", rows, x="tokens", y="tokens_per_s", series="impl", ylabel="tokens/s (forward)",
         title=f"Packed forward, {args.preset} ({dtype}), documents of {lo}-{hi} tokens",
         meta={"preset": args.preset, "config": PRESETS[args.preset], "dtype": str(dtype), "doc_lengths": [lo, hi]})
    print(table(rows, ["impl", "tokens", "documents", "ms", "tokens_per_s", "peak_gib", "engine_speedup"]))
    return rows


if __name__ == "__main__":
    main()

"""Command line: ``python -m engine {demo,inspect} ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def _inspect(path: str) -> None:
    import torch

    from .models import load_config
    from .models.checkpoint import stored_dtypes
    from .models.transformer import Transformer

    config = load_config(path)
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(config).parameters())
    rope = config.rope_scaling["rope_type"] if config.rope_scaling else "default"
    sliding = sum(t == "sliding_attention" for t in config.layer_types)
    rows = [
        ("path", path),
        ("family", f"{config.model_type} ({type(config).__name__})"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("attention heads", f"{config.num_heads} query / {config.num_kv_heads} key-value, head_dim {config.head_dim}"),
        ("MLP size", config.intermediate_size),
        ("vocabulary", config.vocab_size),
        ("embeddings", "tied" if config.tie_word_embeddings else "untied"),
        ("RoPE", f"{rope}, theta {config.rope_theta:g}"),
        ("sliding window", f"{config.sliding_window} on {sliding} of {config.num_layers} layers" if sliding else "none"),
        ("biases", ", ".join(n for n, on in (("qkv", config.qkv_bias), ("o", config.o_bias), ("mlp", config.mlp_bias)) if on) or "none"),
        ("q/k norm", "yes" if config.qk_norm else "no"),
        ("stored dtypes", ", ".join(f"{k} x{v}" for k, v in stored_dtypes(Path(path)).items())),
        ("parameters", f"{n:,} ({n / 1e9:.3f} B)"),
    ]
    rows += [(f"weights in {name}", _size(n * b)) for name, b in _DTYPE_BYTES.items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")




def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="A kernel-level LLM engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a LoRA adapter on a tiny random Llama to reverse digit strings, "
                                       "report accuracy before and after, save it in PEFT format")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps (32 strings each)")
    demo.add_argument("--out", default=None, help="folder for the PEFT adapter (default: a temporary folder)")
    insp = sub.add_parser("inspect", help="print a checkpoint's architecture, parameter count and memory per dtype")
    insp.add_argument("path", help="a local Hugging Face checkpoint folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run

            run(args.device, steps=args.steps, out=args.out)
        else:
            _inspect(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

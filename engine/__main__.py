"""Command line: ``python -m engine {demo,inspect,serve} ...``."""
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




def _serve(args) -> None:
    try:
        from .serve import serve
    except ImportError as e:
        raise ValueError(f"serve needs the optional extra: pip install 'engine[serve]' ({e})") from None
    models: dict[str, Path] = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {spec!r} must be NAME=PATH (e.g. Qwen/Qwen3-0.6B=/ckpt/Qwen3-0.6B)")
        if name in models:
            raise ValueError(f"--model {name!r} is given twice")
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec!r}: {path!r} is not a checkpoint folder with a config.json")
        models[name] = Path(path)
    for option in ("port", "max_batch_size", "tp"):
        value = getattr(args, option)
        if value < (0 if option == "port" else 1):
            raise ValueError(f"--{option.replace('_', '-')} must be {'>= 0' if option == 'port' else 'positive'}, "
                             f"got {value}")
    serve(models, host=args.host, port=args.port, checkpoint_dir=args.checkpoint_dir, api_key=args.api_key,
          max_batch_size=args.max_batch_size, tp=args.tp)


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
    srv = sub.add_parser("serve", help="serve models over Tinker's HTTP protocol for the tinker SDK "
                                       "(needs pip install 'engine[serve]')")
    srv.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                     help="a base model: NAME is what clients pass as base_model, PATH a local HF folder (repeatable)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--checkpoint-dir", default="checkpoints",
                     help="where tinker:// checkpoints live (default ./checkpoints)")
    srv.add_argument("--api-key", default=None, help="require this key (X-API-Key); others get 401")
    srv.add_argument("--max-batch-size", type=int, default=8192, metavar="TOKENS",
                     help="tokens per training micro-batch and per sampling step (default 8192)")
    srv.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of every model (default 1)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run

            run(args.device, steps=args.steps, out=args.out)
        elif args.command == "serve":
            _serve(args)
        else:
            _inspect(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

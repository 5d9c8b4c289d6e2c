"""``python -m engine demo``: train a LoRA adapter through the training API, then sample
from it through the sampling API.

Builds a random Llama-architecture checkpoint (32-token vocabulary) in a temporary folder,
then teaches it, through ``engine.model(...).with_adapter(...).spawn_train(...)``, to
reverse short digit strings: ``<bos> 3 1 4 1 5 <sep> 5 1 4 1 3 <eos>``. The loss covers
only the answer tokens (per-token weights). Accuracy is the share of held-out answer tokens
predicted with probability above 1/2 (hence greedily right), before and after training.
Then a sampling client of a snapshot of the trained weights
(``save_weights_and_get_sampling_client``) answers held-out prompts greedily, stopping at
``<eos>``; the demo reports how many answers are exactly the reversed string. The adapter
is saved in PEFT's format. On a GPU the same runs on a larger model through the Triton
kernels.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

DIGITS, SEP, BOS, EOS, VOCAB = 10, 10, 11, 12, 32
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # Llama 3's scaled RoPE barely rotates over 12 tokens
_CPU_MODEL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_parameters=_ROPE)
_GPU_MODEL = dict(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=64, rope_parameters=_ROPE)
# LoRA cannot change the frozen LM head; with the random init's std 0.02 the logits of a
# normed hidden state stay within about +-2.5, too flat to ever be confident. Scaling the
# head (as pretraining would have) lets the adapter reach near-certain predictions.
_LM_HEAD_SCALE = 25.0


def _sharpen_lm_head(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] *= _LM_HEAD_SCALE
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def example(rng: random.Random, length: int) -> tuple[list[int], int]:
    """(token sequence, index of the first answer token)."""
    digits = [rng.randrange(DIGITS) for _ in range(length)]
    seq = [BOS, *digits, SEP, *digits[::-1], EOS]
    return seq, length + 2


def datum(seq: list[int], answer_start: int):
    import engine

    n = len(seq) - 1
    weights = [1.0 if i + 1 >= answer_start else 0.0 for i in range(n)]
    return engine.Datum(engine.ModelInput.from_ints(seq[:-1]), {"target_tokens": seq[1:], "weights": weights})


def accuracy(trainer, held_out: list) -> tuple[int, int]:
    """(answer tokens that the model predicts with probability above 1/2 under teacher
    forcing, answer tokens); such a token is necessarily the greedy (argmax) choice."""
    out = trainer.forward(held_out, "cross_entropy").result()
    hit = total = 0
    for d, o in zip(held_out, out.loss_fn_outputs):
        w = d.loss_fn_inputs["weights"].to_torch() > 0
        hit += int((o["logprobs"].to_torch()[w].exp() > 0.5).sum())
        total += int(w.sum())
    return hit, total


def sample_answers(trainer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy answers to ``prompts`` (``<bos> digits <sep>``) from a sampling client of a
    snapshot of the trained weights (under LoRA, a copy of the adapter), each ending at
    ``<eos>`` (kept) or after len(digits) + 1 tokens; all requests are in flight at once
    (continuous batching)."""
    import engine

    sampler = trainer.save_weights_and_get_sampling_client().result()
    futs = [sampler.sample(engine.ModelInput.from_ints(p), 1,
                           engine.SamplingParams(max_tokens=len(p) - 1, temperature=0.0, stop=[EOS]))
            for p in prompts]
    return [f.result().sequences[0].tokens for f in futs]


def _bar(step: int, steps: int, loss: float, width: int = 30) -> str:
    done = int(width * step / steps)
    return f"\r  [{'#' * done}{'.' * (width - done)}] step {step}/{steps}  loss/token {loss:.3f}"


def run(device: str | None = None, steps: int = 300, out: str | None = None, seed: int = 0) -> dict:
    import transformers

    import engine
    from .models.presets import save_random_checkpoint

    transformers.logging.disable_progress_bar()

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = _GPU_MODEL if device.startswith("cuda") else _CPU_MODEL
    rng = random.Random(seed)
    torch.manual_seed(seed)
    train = [datum(*example(rng, rng.randint(3, 5))) for _ in range(2000)]
    held_out = [datum(*example(rng, rng.randint(3, 5))) for _ in range(200)]
    batch_size = 32
    with tempfile.TemporaryDirectory(prefix="engine-demo-") as tmp:
        ckpt = Path(tmp) / "base"
        print(f"[1/5] random Llama checkpoint (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
              f"vocab {VOCAB}) in {ckpt}")
        save_random_checkpoint(ckpt, "llama", seed=seed, **config)
        _sharpen_lm_head(ckpt)
        trainer = (engine.model(ckpt).with_adapter(rank=16, alpha=32).device(device)
                   .spawn_train(max_batch_size=512, checkpoint_dir=Path(tmp) / "checkpoints"))
        info = trainer.get_info()
        print(f"      LoRA r=16 on every linear layer: {info.trainable_parameters:,} trainable of "
              f"{info.parameters:,} parameters, {info.dtype} on {info.device}")
        hits, total = accuracy(trainer, held_out)
        before = hits / total
        print(f"[2/5] task: reverse 3-5 digits; held-out answer-token accuracy (p > 1/2) before training: {before:.1%}")
        print(f"[3/5] training {steps} steps of {batch_size} strings (cross_entropy on answer tokens, AdamW lr 3e-3)")
        adam = engine.AdamParams(learning_rate=3e-3, weight_decay=0.0, grad_clip_norm=1.0)
        start = time.perf_counter()
        loss = float("nan")
        for step in range(1, steps + 1):
            batch = rng.sample(train, batch_size)
            tokens = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in batch)
            fb = trainer.forward_backward(batch, "cross_entropy")
            trainer.optim_step(adam)
            loss = fb.result().metrics["loss:sum"] / tokens
            print(_bar(step, steps, loss), end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        elapsed = time.perf_counter() - start
        hits, total = accuracy(trainer, held_out)
        after = hits / total
        print(f"      {elapsed:.1f} s ({elapsed / steps * 1e3:.0f} ms per step), final loss/token {loss:.3f}")
        print(f"[4/5] held-out answer-token accuracy: {before:.1%} -> {after:.1%} (of {total} tokens)")
        questions = [example(rng, rng.randint(3, 5))[0] for _ in range(100)]
        prompts = [q[:q.index(SEP) + 1] for q in questions]
        start = time.perf_counter()
        answers = sample_answers(trainer, prompts)
        sampled = time.perf_counter() - start
        exact = sum(a == q[len(p):] for a, q, p in zip(answers, questions, prompts)) / len(questions)
        print(f"[5/5] sampling client of the trained weights: {len(prompts)} held-out prompts, greedy, "
              f"stop at <eos>, {sampled:.1f} s")
        for p, a in list(zip(prompts, answers))[:3]:
            print(f"      {' '.join(map(str, p[1:-1]))}  ->  {' '.join('<eos>' if t == EOS else str(t) for t in a)}")
        print(f"      exact reversals: {exact:.0%}")
        path = trainer.save_weights_for_sampler(Path(out or Path(tmp) / "adapter")).result().path  # --out: as given
        files = sorted(p.name for p in Path(path).iterdir())
        print(f"      PEFT adapter saved to {path} ({', '.join(files)})")
        trainer.close()
    return {"accuracy_before": before, "accuracy_after": after, "held_out_tokens": total, "exact_sampled": exact,
            "seconds": elapsed, "final_loss": loss}

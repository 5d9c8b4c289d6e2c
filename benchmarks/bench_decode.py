"""End-to-end decoding: the inference engine (paged KV cache, continuous batching) against
transformers' ``generate`` on the same random weights. Greedy, EOS ignored.

Workloads (GPU, Llama-3.2-1B shape, bf16):
  batch1   one request, 256 new tokens: tokens/s against the weight-bandwidth floor
           (every decode step reads all weights once: floor = bandwidth / weight bytes);
  batch32  32 requests x 128 new tokens: tokens/s, engine vs transformers generate;
  mixed    256 requests, prompts 128-2048, outputs 64-512, all submitted at once:
           output tokens/s and time to first token (median, p90);
  adapters 64 requests over 16 PEFT adapters (r=16, all projections) vs the same
           requests on one adapter: wall-time ratio (target <= 1.3).

    python benchmarks/bench_decode.py           # needs a GPU
    python benchmarks/bench_decode.py --smoke   # CPU: tiny model, small sizes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import save, table  # noqa: E402
from engine.infer import InferenceModel, SamplingParams  # noqa: E402
from engine.models import add_lora, load_model, save_peft_lora  # noqa: E402
from engine.models.presets import LLAMA_1B, TINY, save_random_checkpoint  # noqa: E402

GREEDY = dict(temperature=0.0)


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def _run(engine, prompts, max_tokens, adapters=None):
    """Submit everything at once; (wall seconds, responses)."""
    start = time.perf_counter()
    futs = [engine.sample(p, 1, SamplingParams(max_tokens=m, **GREEDY), adapter=None if adapters is None else a)
            for p, m, a in zip(prompts, max_tokens, adapters or [None] * len(prompts))]
    res = [f.result() for f in futs]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, res


def _steps(engine, before: dict) -> dict:
    """Engine steps of a run, and how many of them overlapped the previous one."""
    return {k: engine.stats[k] - before[k] for k in ("steps", "overlapped_steps")}


def _hf_generate(folder, dtype, device, prompts, new_tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    with torch.no_grad():
        hf.generate(ids[:, :4], do_sample=False, max_new_tokens=4, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        hf.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    secs = time.perf_counter() - start
    del hf
    return secs


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (runs on CPU)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth for the floor (H100 SXM)")
    p.add_argument("--skip", nargs="*", default=[], choices=["batch1", "batch32", "mixed", "adapters", "hf"])
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_decode needs a CUDA GPU (use --smoke for a CPU run of the tiny model)")
        return []
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    smoke = args.smoke
    cfg = TINY["llama"] if smoke else LLAMA_1B
    sizes = dict(b1_new=8 if smoke else 256, b32=4 if smoke else 32, b32_new=6 if smoke else 128,
                 mixed_n=8 if smoke else 256, mixed_prompt=(4, 40) if smoke else (128, 2048),
                 mixed_out=(2, 10) if smoke else (64, 512), n_adapters=2 if smoke else 16,
                 ad_n=4 if smoke else 64, ad_prompt=12 if smoke else 256, ad_new=4 if smoke else 128,
                 budget=64 if smoke else 8192)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        folder = Path(tmp) / "model"
        print(f"writing a random {'tiny' if smoke else 'Llama-3.2-1B-shaped'} checkpoint to {folder}", flush=True)
        save_random_checkpoint(folder, cfg, dtype=dtype)
        # Peers and adapter files first: the engine's KV cache then takes most of the free memory.
        hf_secs = None
        if "batch32" not in args.skip and "hf" not in args.skip:
            hf_secs = _hf_generate(folder, dtype, device, _prompts(sizes["b32"], 16, 16, cfg["vocab_size"], 2),
                                   sizes["b32_new"])
        paths = []
        for k in range(sizes["n_adapters"] if "adapters" not in args.skip else 0):
            m = load_model(folder, dtype=dtype, device=device)
            add_lora(m, rank=16, alpha=32, dtype=dtype)
            with torch.no_grad():
                for name, prm in m.named_parameters():
                    if "lora_" in name:
                        prm.normal_(0.0, 0.01)
            paths.append(str(save_peft_lora(m, Path(tmp) / f"adapter{k}")))
            del m
        if cuda:
            torch.cuda.empty_cache()
        model = load_model(folder, dtype=dtype, device=device)
        vocab = model.config.vocab_size
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        floor = args.bandwidth_gbs * 1e9 / weight_bytes
        engine = InferenceModel(model, max_batch_size=sizes["budget"], kv_cache_tokens=None if cuda else 4096,
                                gpu_memory_fraction=0.8)
        _run(engine, _prompts(2, 8, 8, vocab, 0), [4, 4])  # warm-up (Triton compiles)

        # "engine, steps in turn": each step finished before the next is planned (what the
        # engine does at tp > 1), beside the default that plans step n+1 while n runs.
        for overlap in (False, True):
            engine._core.overlap = overlap
            impl = "engine" if overlap else "engine, steps in turn"
            if "batch1" not in args.skip:
                before = dict(engine.stats)
                secs, _ = _run(engine, _prompts(1, 16, 16, vocab, 1), [sizes["b1_new"]])
                tps = sizes["b1_new"] / secs
                rows.append(dict(workload="batch1", impl=impl, batch=1, tokens_per_s=tps,
                                 floor_tokens_per_s=floor, fraction_of_floor=tps / floor, **_steps(engine, before)))
            if "batch32" not in args.skip:
                prompts = _prompts(sizes["b32"], 16, 16, vocab, 2)
                before = dict(engine.stats)
                secs, _ = _run(engine, prompts, [sizes["b32_new"]] * len(prompts))
                ours = len(prompts) * sizes["b32_new"] / secs
                rows.append(dict(workload="batch32", impl=impl, batch=len(prompts), tokens_per_s=ours,
                                 **_steps(engine, before)))
        if hf_secs is not None:
            theirs = sizes["b32"] * sizes["b32_new"] / hf_secs
            for row in rows:
                if row["workload"] == "batch32":
                    row["speedup_vs_transformers"] = row["tokens_per_s"] / theirs
            rows.append(dict(workload="batch32", impl="transformers generate", batch=sizes["b32"], tokens_per_s=theirs))
        if "mixed" not in args.skip:
            prompts = _prompts(sizes["mixed_n"], *sizes["mixed_prompt"], vocab, 3)
            g = torch.Generator().manual_seed(4)
            outs = torch.randint(sizes["mixed_out"][0], sizes["mixed_out"][1] + 1, (len(prompts),), generator=g).tolist()
            secs, res = _run(engine, prompts, outs)
            ttft = sorted(r.metrics["time_to_first_token_s"] for r in res)
            rows.append(dict(workload="mixed", impl="engine", batch=len(prompts), tokens_per_s=sum(outs) / secs,
                             ttft_median_s=statistics.median(ttft), ttft_p90_s=ttft[int(0.9 * (len(ttft) - 1))],
                             preemptions=engine.stats["preemptions"]))
        engine.close()

        if "adapters" not in args.skip:
            del engine
            if cuda:
                torch.cuda.empty_cache()
            engine = InferenceModel(model, max_batch_size=sizes["budget"], kv_cache_tokens=None if cuda else 4096,
                                    max_adapters=sizes["n_adapters"], gpu_memory_fraction=0.8)
            prompts = _prompts(sizes["ad_n"], sizes["ad_prompt"], sizes["ad_prompt"], vocab, 5)
            new = [sizes["ad_new"]] * len(prompts)
            _run(engine, prompts[:2], [2, 2], [paths[0]] * 2)  # load + warm-up
            one, _ = _run(engine, prompts, new, [paths[0]] * len(prompts))
            _run(engine, prompts[:len(paths)], [2] * len(paths), paths)  # load every adapter first
            mixed, _ = _run(engine, prompts, new, [paths[i % len(paths)] for i in range(len(prompts))])
            engine.close()
            for name, secs in (("1 adapter", one), (f"{len(paths)} adapters", mixed)):
                rows.append(dict(workload="adapters", impl=name, batch=len(prompts),
                                 tokens_per_s=len(prompts) * sizes["ad_new"] / secs, ratio_vs_one=secs / one))

    print(table(rows, ["workload", "impl", "batch", "tokens_per_s", "floor_tokens_per_s", "fraction_of_floor",
                       "speedup_vs_transformers", "ttft_median_s", "ttft_p90_s", "preemptions", "ratio_vs_one",
                       "steps", "overlapped_steps"]))
    save("decode", rows, x="batch", y="tokens_per_s", series="impl", title="decode tokens/s (greedy)",
         ylabel="tokens/s", meta=dict(preset="tiny" if smoke else "llama-1b", dtype=str(dtype), weight_bytes=weight_bytes,
                                      bandwidth_gbs=args.bandwidth_gbs, **sizes),
         plot_rows=[r for r in rows if r["workload"] in ("batch1", "batch32")])
    return rows


if __name__ == "__main__":
    main()

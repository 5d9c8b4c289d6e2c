"""GPU checks of the inference engine (``pytest -m gpu``): the CUDA sampling extension
against its torch twin, CUDA-graph decode against eager decode, and a step launched
without waiting for the device."""
import time

import pytest
import torch

from engine.infer import InferenceModel, SamplingParams
from engine.infer.runner import StepRunner, StepSpec
from engine.infer.sampling import sample_tokens as sample_tokens_torch
from engine.infer.sampling_op import load_extension, sample_tokens
from engine.models import load_model

pytestmark = pytest.mark.gpu


def test_cuda_sampling_extension_matches_twin():
    assert load_extension(), "the CUDA sampling extension did not build or import"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 64, 151_936
    logits = torch.randn(rows, vocab, device="cuda", generator=g) * 4
    temp = torch.rand(rows, device="cuda", generator=g) * 1.5
    temp[::4] = 0.0
    top_k = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    top_p = torch.ones(rows, device="cuda")
    seeds = torch.randint(0, 2 ** 62, (rows,), device="cuda", generator=g)
    steps = torch.arange(rows, device="cuda")
    tok, lp, raw = sample_tokens(logits, temp, top_k, top_p, seeds, steps, truncate=False)
    ref_tok, ref_lp, ref_raw = sample_tokens_torch(logits, temp, top_k, top_p, seeds, steps, truncate=False)
    # Ties within float rounding may flip a token; allow none here (random logits have none).
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(raw, ref_raw, rtol=0, atol=1e-4)
    # Strided logits (a row view of a wider buffer) and a graph-free empty batch.
    wide = torch.cat([logits, logits], 1)[:, :vocab]
    assert torch.equal(sample_tokens(wide, temp, top_k, top_p, seeds, steps, truncate=False)[0], tok)
    empty = sample_tokens(logits[:0], temp[:0], top_k[:0], top_p[:0], seeds[:0], steps[:0], truncate=False)
    assert all(t.shape == (0,) for t in empty)


@pytest.mark.parametrize("family,adapters", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_cuda_graph_decode_equals_eager(checkpoint, peft_adapters, family, adapters):
    """Greedy tokens from graph replays equal eager decoding; with adapters, requests on two
    PEFT adapters and the base model share the steps (the adapter set of graphs)."""
    folder = checkpoint(family)
    paths = peft_adapters(folder) if adapters else []
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1031, (n,), generator=g).tolist() for n in (5, 17, 1, 30, 9)]
    which = [paths[i % 3] if i % 3 < len(paths) else None for i in range(len(prompts))]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    outs = []
    for graphs in (False, True):
        model = load_model(folder, dtype=torch.float32, device="cuda")
        with InferenceModel(model, max_batch_size=64, block_size=4, kv_cache_tokens=1024,
                            use_cuda_graphs=graphs) as engine:
            futs = [engine.sample(p, 2, params, adapter=a) for p, a in zip(prompts, which)]
            outs.append([[s.tokens for s in f.result(timeout=300).sequences] for f in futs])
            graphed = engine._core.executor.runner.graphs
            assert (graphed is not None) == graphs
            if graphs:
                assert any(kind == adapters for kind, _ in graphed._graphs), "no decode step was replayed"
    assert outs[0] == outs[1]


@pytest.mark.parametrize("graphs", [False, True])
def test_a_step_is_launched_without_waiting_for_the_device(checkpoint, graphs):
    """The engine builds and launches step n+1 while step n still runs: ``launch`` must not
    wait for the device (no copy from pageable memory, no host read of a device value),
    and a decode row fed from the previous step's draws gets the token collected later."""
    model = load_model(checkpoint("llama"), dtype=torch.float32, device="cuda")
    runner = StepRunner(model, block_size=4, kv_cache_tokens=256, gpu_memory_fraction=0.5, use_cuda_graphs=graphs)
    greedy = dict(expand=[0], temps=[0.0], top_k=[-1], top_p=[1.0], seeds=[1])
    tokens = [5, 6, 7]
    previous = runner.launch(StepSpec(chunks=[(tokens, 0, [0, 1])], rows=[2], steps=[0], **greedy))
    tokens.append(previous.collect().draws[0][0])
    for step in range(3):  # warm-up: Triton compiles, graphs are captured
        previous = runner.launch(StepSpec(chunks=[([-1], len(tokens) - 1, [0, 1])], rows=[0], steps=[step + 1],
                                          feed=[(0, 0)], **greedy), after=previous)
        tokens.append(previous.collect().draws[0][0])
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued ahead of the step
    start = time.perf_counter()
    handle = runner.launch(StepSpec(chunks=[([-1], len(tokens) - 1, [0, 1])], rows=[0], steps=[4], feed=[(0, 0)],
                                    **greedy), after=previous)
    launched = time.perf_counter() - start
    busy = torch.cuda.current_stream().query()
    out = handle.collect()
    waited = time.perf_counter() - start
    assert not busy and launched < 0.25 * waited, f"launch took {launched:.3f} s of {waited:.3f} s: it waited"
    assert out.draws[0][0] == _greedy_next(model, tokens)


@torch.no_grad()
def _greedy_next(model, tokens: list[int]) -> int:
    """The argmax next token of the model's own forward (eager ops, varlen attention)."""
    n = len(tokens)
    hidden = model(torch.tensor(tokens, device="cuda"), torch.arange(n, device="cuda"),
                   torch.tensor([0, n], dtype=torch.int32, device="cuda"), n)
    return model.compute_logits(hidden[-1:]).argmax(-1).item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_greedy_equals_the_model_forward(checkpoint, family):
    """float32 on CUDA: the engine (fused norms, RoPE and SiLU kernels, paged attention, CUDA
    graphs) decodes the greedy tokens of the model's own forward (eager ops, varlen)."""
    model = load_model(checkpoint(family), dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1031, (n,), generator=g).tolist() for n in (3, 19, 8)]
    with InferenceModel(model, max_batch_size=64, block_size=4, kv_cache_tokens=512) as engine:
        futs = [engine.sample(p, 1, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]
        ours = [f.result(timeout=300).sequences[0].tokens for f in futs]
    for prompt, got in zip(prompts, ours):
        seq = list(prompt)
        for _ in range(12):
            seq.append(_greedy_next(model, seq))
        assert got == seq[len(prompt):]

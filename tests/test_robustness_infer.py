"""The sampling side holds up (issue 15, items 3, 6 and 10): an adapter re-saved to the same
folder is served afresh without mixing versions, no future hangs when ``sample`` races
``close``, and bad arguments fail at once with errors naming them. CPU, tiny random models."""
import json
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch

import engine
from engine.api.types import as_ints
from engine.infer import InferenceModel, SamplingParams
from engine.models import add_lora, load_model, save_peft_lora

PROMPT = [5, 17, 300, 2, 999, 41, 7]
SIZES = dict(max_batch_size=32, block_size=4, kv_cache_tokens=256)


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def lora_model(llama):
    model = load_model(llama)
    add_lora(model, 4, 8, ("qkv", "down"))
    return model


def _save(model, folder, seed: int) -> str:
    """Give the model's adapter random weights drawn from ``seed`` and save it in ``folder``
    (a training step followed by save_weights_for_sampler to the same folder)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(save_peft_lora(model, folder))


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


# ---------------------------------------------------------------------- item 3: adapters reload


def test_resaved_adapter_is_served_afresh(llama, lora_model, tmp_path):
    """The RL loop's pattern: save to one folder after steps 5, 10 and 15, sample after each
    save; each round is served the weights just saved (a copy of them in a folder of its own
    is the reference)."""
    live = tmp_path / "live"
    with InferenceModel(llama, **SIZES) as eng:
        seen = []
        for step in (5, 10, 15):
            _save(lora_model, live, step)
            shutil.copytree(live, tmp_path / f"step{step}")
            got = eng.compute_logprobs(PROMPT, adapter=live).result(60)
            want = eng.compute_logprobs(PROMPT, adapter=tmp_path / f"step{step}").result(60)
            assert got[1:] == pytest.approx(want[1:], abs=1e-5), f"step {step}: stale adapter served"
            seen.append(got[1:])
    assert seen[0] != pytest.approx(seen[1], abs=1e-3) and seen[1] != pytest.approx(seen[2], abs=1e-3)


@pytest.mark.parametrize("max_adapters", [1, 2])
def test_request_admitted_before_a_reload_keeps_its_version(llama, lora_model, tmp_path, max_adapters):
    """A request admitted before the folder is re-saved finishes on the tensors it started
    with (every token, also its logprobs); one submitted after is served entirely by the new
    files (with one slot, once the old version's last request ended)."""
    live = tmp_path / "live"
    _save(lora_model, live, 1)
    shutil.copytree(live, tmp_path / "old")
    with InferenceModel(llama, max_adapters=max_adapters, **SIZES) as eng:
        long = eng.sample(PROMPT, 1, _greedy(40), adapter=live)
        while eng.stats["decode_tokens"] < 4:
            time.sleep(0.001)
        gate = threading.Event()
        eng.run_between_steps(gate.wait)  # hold the engine between two steps, mid-decode
        _save(lora_model, live, 2)
        shutil.copytree(live, tmp_path / "new")
        short = eng.sample(PROMPT, 1, _greedy(6), adapter=live)
        gate.set()
        old, new = long.result(60).sequences[0], short.result(60).sequences[0]
    with InferenceModel(llama, **SIZES) as ref:
        want_old = ref.sample(PROMPT, 1, _greedy(40), adapter=tmp_path / "old").result(60).sequences[0]
        want_new = ref.sample(PROMPT, 1, _greedy(6), adapter=tmp_path / "new").result(60).sequences[0]
    assert want_old.tokens[:6] != want_new.tokens  # the two versions tell apart
    assert old.tokens == want_old.tokens and old.logprobs == pytest.approx(want_old.logprobs, abs=1e-4)
    assert new.tokens == want_new.tokens and new.logprobs == pytest.approx(want_new.logprobs, abs=1e-4)


# ---------------------------------------------------------------------- item 6: sample vs close

RACE_TRIALS = 30


def test_sample_racing_close_leaves_no_future_pending(llama):
    """Two threads call ``sample`` in a loop while the main thread calls ``close()``: every
    future resolves (a result, or the error that the engine is closed). A short switch
    interval makes the threads interleave between the check of ``closed`` and the queueing."""
    model = load_model(llama)
    old_interval = sys.getswitchinterval()
    pending, total, trials_hung = 0, 0, 0
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(RACE_TRIALS):
            eng = InferenceModel(model, max_batch_size=16, block_size=4, kv_cache_tokens=64)
            futs = [[], []]
            go = threading.Event()

            def hammer(out):
                go.wait()
                while not (out and out[-1].done() and isinstance(out[-1].exception(), RuntimeError)):
                    out.append(eng.sample([1, 2, 3], 1, _greedy(1)))

            threads = [threading.Thread(target=hammer, args=(out,)) for out in futs]
            for t in threads:
                t.start()
            go.set()
            time.sleep(0.002 * (trial % 5))
            eng.close()
            for t in threads:
                t.join()
            done = [f for out in futs for f in out]
            total += len(done)
            # The engine thread has ended: a future still pending now never resolves.
            hung = sum(not f.done() for f in done)
            pending, trials_hung = pending + hung, trials_hung + (hung > 0)
            for f in done:
                if f.done() and f.exception() is not None:
                    assert "closed" in str(f.exception())
    finally:
        sys.setswitchinterval(old_interval)
    assert pending == 0, (f"{pending} of {total} futures never resolved, in {trials_hung} of "
                          f"{RACE_TRIALS} trials")


# ---------------------------------------------------------------------- item 10: small ones


class _Digits:
    """A tokenizer good enough for string stops: token t decodes to its digits."""

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(t) for t in ids)


def test_bad_sampling_arguments_fail_naming_them(llama):
    with InferenceModel(llama, tokenizer=_Digits(), **SIZES) as eng:
        bad = [
            ("sampling_params.stop holds an empty string", SamplingParams(max_tokens=4, stop="")),
            ("sampling_params.stop holds an empty string", SamplingParams(max_tokens=4, stop=["7", ""])),
            ("sampling_params.seed must be an int", SamplingParams(seed="abc")),
            ("sampling_params.seed must be an int", SamplingParams(seed=1.5)),
            ("sampling_params.temperature must be", SamplingParams(temperature="hot")),
            ("sampling_params has no field 'max_token'", {"max_token": 3}),
            ("sampling_params must be a SamplingParams", "greedy"),
        ]
        for pattern, params in bad:
            with pytest.raises(ValueError, match=pattern):
                eng.sample(PROMPT, 1, params).result(60)
        # A dict of SamplingParams fields is accepted, as Tinker's SDK does (pydantic).
        as_dict = eng.sample(PROMPT, 1, {"max_tokens": 5, "temperature": 0.0, "seed": 3}).result(60)
        as_params = eng.sample(PROMPT, 1, SamplingParams(max_tokens=5, temperature=0.0, seed=3)).result(60)
        assert as_dict.sequences[0].tokens == as_params.sequences[0].tokens
        assert len(eng.sample(PROMPT, 1, SamplingParams(max_tokens=5, seed=np.int64(3))).result(60).sequences) == 1


def test_float_token_ids_are_refused():
    for tokens in ([1.7, 2.2], [1.0, 2.0], np.array([1.5]), torch.tensor([3.0])):
        with pytest.raises(ValueError, match="tokens holds"):
            engine.ModelInput.from_ints(tokens)
        with pytest.raises(ValueError, match=r"data\[0\].model_input holds"):
            as_ints(tokens, where="data[0].model_input")
    assert engine.ModelInput.from_ints(np.array([4, 5])).to_ints() == [4, 5]
    assert as_ints(torch.tensor([4, 5])) == [4, 5]


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=2.5), "block_size must be a positive int"),
    (dict(kv_cache_tokens=0), "kv_cache_tokens must be a positive int"),
    (dict(max_adapters=0), "max_adapters must be a positive int"),
    (dict(gpu_memory_fraction=0.0), "gpu_memory_fraction must be in"),
])
def test_bad_engine_sizes_fail_naming_them(llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        InferenceModel(llama, max_batch_size=16, **kwargs)


def test_non_finite_and_missing_adapters_are_refused(llama, lora_model, tmp_path):
    """An adapter holding NaN or inf is refused when loaded, naming the tensor; a default
    adapter (``InferenceModel(adapter=...)``) that is missing or bad fails the construction."""
    from safetensors.torch import load_file, save_file

    good = _save(lora_model, tmp_path / "good", 3)
    bad = tmp_path / "nan"
    shutil.copytree(good, bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(state)[1]
    state[name][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    inf = tmp_path / "inf"
    shutil.copytree(bad, inf)
    state[name][0, 0] = float("inf")
    save_file(state, str(inf / "adapter_model.safetensors"))
    with InferenceModel(llama, **SIZES) as eng:
        for folder in (bad, inf):
            with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
                eng.sample(PROMPT, 1, _greedy(3), adapter=folder).result(60)
        assert len(eng.sample(PROMPT, 1, _greedy(3)).result(60).sequences[0].tokens) == 3  # still serving
    with pytest.raises(FileNotFoundError, match="adapter .*missing.*: no such folder"):
        InferenceModel(llama, adapter=tmp_path / "missing", **SIZES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter .*empty.* could not be loaded: .*no adapter_config.json"):
        InferenceModel(llama, adapter=tmp_path / "empty", **SIZES)
    with pytest.raises(ValueError, match=f"adapter .*nan.* could not be loaded: .*{name} holds NaN"):
        InferenceModel(llama, adapter=bad, **SIZES)
    (tmp_path / "wide").mkdir()
    config = json.loads((bad / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(dict(config, r=8)))
    shutil.copy(tmp_path / "good" / "adapter_model.safetensors", tmp_path / "wide")
    with pytest.raises(ValueError, match="adapter .*wide.* could not be loaded: .*has shape"):
        InferenceModel(llama, adapter=tmp_path / "wide", **SIZES)

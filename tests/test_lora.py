"""lora_linear / lora_linear_multi against float64, and LoRA on the model in PEFT's format."""
import importlib.util

import pytest
import torch

import kernels.lora_triton as lora_triton
import kernels.lowrank_gemm as lowrank_gemm
import kernels.triton_base as triton_base
from engine.models import (PackedBatch, add_lora, load_model, load_peft_lora, lora_state_dict_to_peft, peft_config,
                           save_peft_lora, set_adapter_stack)
from kernels import lora_dropout_mask, lora_linear, lora_linear_multi, pack_lora_adapters

N, IN, OUT = 37, 50, 70  # no multiple of any block size
IMPLS = ["torch", "triton"]
HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output buffer the Triton backend allocates starts as NaN."""
    monkeypatch.setattr(triton_base, "POISON", True)


def _tensor(g, *shape, scale=1.0, dtype=torch.float32, grad=False):
    t = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return t.requires_grad_() if grad else t


def _lora_inputs(r, *, lead=(N,), bias=True, dtype=torch.float32, lora_dtype=None, train_weight=False, seed=0,
                 features=(IN, OUT)):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = features
    x = _tensor(g, *lead, n_in, dtype=dtype, grad=True)
    w = _tensor(g, n_out, n_in, scale=0.2, dtype=dtype, grad=train_weight)
    a = _tensor(g, r, n_in, scale=0.3, dtype=lora_dtype or dtype, grad=True)
    b = _tensor(g, n_out, r, scale=0.3, dtype=lora_dtype or dtype, grad=True)
    bias = _tensor(g, n_out, dtype=dtype, grad=True) if bias else None
    return x, w, a, b, bias


def _reference64(x, w, a, b, bias, scale, keep=None, p=0.0):
    xd = x.double() if keep is None else x.double() * keep / (1 - p)
    y = x.double() @ w.double().t() + scale * (xd @ a.double().t()) @ b.double().t()
    return y + bias.double() if bias is not None else y


def _check_all(x, w, a, b, bias, y, ref, *, rtol=1e-5, atol=1e-5, grad_tol=None):
    """Output and the gradient of every input that requires one, for a random upstream."""
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    inputs = [t for t in (x, w, a, b, bias) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, inputs, up.to(y.dtype))
    want = torch.autograd.grad(ref, inputs, up)
    for t, g, r in zip(inputs, got, want):
        assert g.dtype == t.dtype and g.shape == t.shape
        tol = grad_tol or (rtol, atol)
        torch.testing.assert_close(g.double(), r.double(), rtol=tol[0], atol=tol[1] * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r, lead, bias, train_weight", [
    (1, (N,), False, False),
    (16, (N,), True, False),
    (5, (3, 13), True, True),   # leading batch dims, trainable base weight
    (40, (N,), True, False),    # padded rank 64: the backward's dy pass goes to cuBLAS
])
def test_lora_linear_matches_float64(r, lead, bias, train_weight, impl):
    x, w, a, b, bias = _lora_inputs(r, lead=lead, bias=bias, train_weight=train_weight)
    y = lora_linear(x, w, a, b, 0.7, bias=bias, impl=impl)
    assert y.shape == (*lead, OUT) and y.dtype == x.dtype
    _check_all(x, w, a, b, bias, y, _reference64(x, w, a, b, bias, 0.7), grad_tol=(1e-4, 1e-5))


@pytest.mark.parametrize("splits", [3, 2])  # 2: the dy pass's first row split holds two row blocks
def test_triton_small_tiles_and_splits(monkeypatch, splits):
    """Several row / column tiles and split reductions (per-split partials summed in a fixed
    order) per output."""
    monkeypatch.setattr(lora_triton, "TEST_BLOCKS", dict(n=16, k=16, o=16, splits=splits))
    x, w, a, b, bias = _lora_inputs(7, train_weight=True, seed=1)
    y = lora_linear(x, w, a, b, -1.3, bias=bias, impl="triton")
    _check_all(x, w, a, b, bias, y, _reference64(x, w, a, b, bias, -1.3), grad_tol=(1e-4, 1e-5))


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_input_and_adapter_only(impl):
    """Only lora_b requires grad (x is a leaf without grad, A frozen): no dx, no dA."""
    x, w, a, b, _ = _lora_inputs(3, bias=False, seed=2)
    x, a = x.detach(), a.detach()
    y = lora_linear(x, w, a, b, 2.0, impl=impl)
    (gb,) = torch.autograd.grad(y, (b,), torch.ones_like(y))
    (ref,) = torch.autograd.grad(_reference64(x, w, a, b, None, 2.0).sum(), (b,))
    torch.testing.assert_close(gb.double(), ref.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_uses_the_regenerated_mask(impl):
    """With dropout, output and gradients equal the formula under the mask that
    lora_dropout_mask regenerates from the seed; the base path is never dropped."""
    x, w, a, b, bias = _lora_inputs(6, seed=3)
    p = 0.3
    y = lora_linear(x, w, a, b, 1.5, bias=bias, dropout=p, dropout_seed=1234, impl=impl)
    keep = lora_dropout_mask(x.shape, p, 1234, impl=impl)
    assert keep.shape == x.shape and keep.dtype == torch.bool
    _check_all(x, w, a, b, bias, y, _reference64(x, w, a, b, bias, 1.5, keep, p), grad_tol=(1e-4, 1e-5))
    again = lora_linear(x, w, a, b, 1.5, bias=bias, dropout=p, dropout_seed=1234, impl=impl)
    other = lora_linear(x, w, a, b, 1.5, bias=bias, dropout=p, dropout_seed=99, impl=impl)
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    assert not torch.allclose(other, y)
    # No seed: drawn from torch's generator, so manual_seed reproduces the mask.
    torch.manual_seed(5)
    first = lora_linear(x, w, a, b, 1.5, dropout=p, impl=impl)
    torch.manual_seed(5)
    torch.testing.assert_close(lora_linear(x, w, a, b, 1.5, dropout=p, impl=impl), first, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_mask_statistics(impl):
    keep = lora_dropout_mask((64, 300), 0.25, 7, impl=impl)
    assert abs(keep.float().mean().item() - 0.75) < 0.015  # 19200 draws: 5 standard deviations
    rows = keep.float().mean(1)
    assert rows.std() > 0 and not torch.equal(keep[0], keep[1])  # rows do not repeat
    assert lora_dropout_mask((64, 300), 0.0, 7, impl=impl).all()


@pytest.mark.parametrize("dtype, lora_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_low_precision_within_twice_torch_error(dtype, lora_dtype):
    """bf16/fp16 activations (adapters possibly float32, as under PEFT's autocast): the
    Triton backend's error against float64 stays within twice the torch backend's."""
    x, w, a, b, bias = _lora_inputs(16, dtype=dtype, lora_dtype=lora_dtype, seed=4)
    ref = _reference64(x, w, a, b, bias, 0.5)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    truth = (ref, *torch.autograd.grad(ref, (x, a, b, bias), up))
    results = {}
    for impl in IMPLS:
        y = lora_linear(x, w, a, b, 0.5, bias=bias, impl=impl)
        grads = torch.autograd.grad(y, (x, a, b, bias), up.to(dtype))
        assert [g.dtype for g in grads] == [dtype, lora_dtype, lora_dtype, dtype]
        results[impl] = (y, *grads)
    for name, tr, ours, theirs in zip(("y", "dx", "dA", "dB", "dbias"), truth, results["triton"], results["torch"]):
        err = (ours.double() - tr).norm() / tr.norm()
        err_torch = (theirs.double() - tr).norm() / tr.norm()
        assert err <= 2 * err_torch + 1e-3, (name, err.item(), err_torch.item())


@pytest.mark.parametrize("gemm, r, bias, p, dtype, tiles, features", [
    ("fused", 7, True, 0.0, torch.float32, None, (IN, OUT)),
    ("fused", 40, False, 0.0, torch.float32, None, (IN, OUT)),  # rank padded to 64, dyB from cuBLAS
    ("fused", 6, True, 0.3, torch.float32, dict(n=16, k=16, o=16, splits=2), (IN, OUT)),  # dropout, many tiles
    ("fused", 40, False, 0.3, torch.float32, None, (IN, OUT)),  # dropout at padded rank 64
    ("fused", 16, True, 0.0, torch.bfloat16, None, (IN, OUT)),
    # TMA loads: 16-byte aligned rows; K not a multiple of the tile (zero-filled reads)
    ("fused-tma", 5, True, 0.2, torch.float32, dict(n=16, k=16, o=16, splits=2), (52, 72)),
    ("fused-tma", 16, False, 0.0, torch.bfloat16, None, (56, 40)),
])
def test_fused_gemm_epilogue(monkeypatch, gemm, r, bias, p, dtype, tiles, features):
    """The Triton GEMM that adds the rank-r term in its epilogue (forward y, backward dx)
    instead of cuBLAS adding the base onto a pre-written term: same results."""
    monkeypatch.setattr(lowrank_gemm, "GEMM", gemm)
    monkeypatch.setattr(lora_triton, "TEST_BLOCKS", tiles)
    x, w, a, b, bias = _lora_inputs(r, bias=bias, dtype=dtype, train_weight=True, seed=6, features=features)
    y = lora_linear(x, w, a, b, 0.6, bias=bias, dropout=p, dropout_seed=21, impl="triton")
    keep = lora_dropout_mask(x.shape, p, 21, impl="triton") if p else None
    ref = _reference64(x, w, a, b, bias, 0.6, keep, p)
    if dtype == torch.float32:
        _check_all(x, w, a, b, bias, y, ref, grad_tol=(1e-4, 1e-5))
        return
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [t for t in (x, w, a, b, bias) if t is not None and t.requires_grad]
    truth = (ref, *torch.autograd.grad(ref, inputs, up))
    fused = (y, *torch.autograd.grad(y, inputs, up.to(dtype)))
    y2 = lora_linear(x, w, a, b, 0.6, bias=bias, impl="torch")
    eager = (y2, *torch.autograd.grad(y2, inputs, up.to(dtype)))
    for i, (tr, ours, theirs) in enumerate(zip(truth, fused, eager)):
        err = (ours.double() - tr).norm() / tr.norm()
        err_torch = (theirs.double() - tr).norm() / tr.norm()
        assert err <= 2 * err_torch + 1e-3, (i, err.item(), err_torch.item())


def test_empty_batch():
    x, w, a, b, bias = _lora_inputs(4, lead=(0,))
    for impl in IMPLS:
        y = lora_linear(x, w, a, b, 1.0, bias=bias, impl=impl)
        assert y.shape == (0, OUT)
        gx, ga = torch.autograd.grad(y.sum(), (x, a))
        assert gx.shape == x.shape and torch.all(ga == 0)


# ---------------------------------------------------------------------------------------
# multi-adapter


RANKS = (3, 16, 1, 8)


def _adapters(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(_tensor(g, r, IN, scale=0.3), _tensor(g, OUT, r, scale=0.3), 0.5 + i) for i, r in enumerate(RANKS)]


def _multi_reference64(x, w, bias, adapters, ids):
    """One token at a time, each with its own adapter, in float64."""
    x64, ids = x.double().reshape(-1, IN), ids.reshape(-1)
    y = x64 @ w.double().t() + (bias.double() if bias is not None else 0)
    for i in range(x64.shape[0]):
        if ids[i] >= 0:
            a, b, s = adapters[int(ids[i])]
            y[i] += s * (x64[i] @ a.double().t()) @ b.double().t()
    return y.reshape(*x.shape[:-1], OUT)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead, bias", [((23,), True), ((2, 150), False), ((300,), True)])
def test_multi_matches_per_token_loop(lead, bias, impl):
    """Ids mix -1 and four adapters of ranks 3, 16, 1, 8 (padded to 16), interleaved
    (decode-sized batches use one-token blocks, larger ones blocks of tokens)."""
    g = torch.Generator().manual_seed(6)
    x = _tensor(g, *lead, IN)
    w = _tensor(g, OUT, IN, scale=0.2)
    b = _tensor(g, OUT) if bias else None
    adapters = _adapters()
    stack_a, stack_b, scales = pack_lora_adapters(adapters)
    assert stack_a.shape == (4, 16, IN) and stack_b.shape == (4, OUT, 16)
    ids = torch.randint(-1, len(adapters), lead, generator=g, dtype=torch.int32)
    ids.view(-1)[:3] = torch.tensor([-1, 0, 3], dtype=torch.int32)
    with torch.no_grad():
        y = lora_linear_multi(x, w, stack_a, stack_b, scales, ids, bias=b, impl=impl)
    assert y.shape == (*lead, OUT)
    torch.testing.assert_close(y.double(), _multi_reference64(x, w, b, adapters, ids), rtol=1e-5, atol=1e-5)


def test_multi_one_adapter_block_and_all_base(monkeypatch):
    """A whole block on one adapter (prefill), and a batch with no adapter at all."""
    monkeypatch.setattr(lora_triton, "TEST_BLOCKS", dict(n=16, k=16, o=16, splits=2))
    g = torch.Generator().manual_seed(7)
    x, w = _tensor(g, 300, IN), _tensor(g, OUT, IN, scale=0.2)
    adapters = _adapters()
    packed = pack_lora_adapters(adapters, dtype=torch.float32)
    ids = torch.full((300,), 2, dtype=torch.int32)
    ids[150:] = 1
    with torch.no_grad():
        y = lora_linear_multi(x, w, *packed, ids, impl="triton")
        torch.testing.assert_close(y.double(), _multi_reference64(x, w, None, adapters, ids), rtol=1e-5, atol=1e-5)
        base = lora_linear_multi(x, w, *packed, torch.full((300,), -1, dtype=torch.int32), impl="triton")
    torch.testing.assert_close(base, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_multi_triton_is_inference_only():
    g = torch.Generator().manual_seed(8)
    x, w = _tensor(g, 5, IN, grad=True), _tensor(g, OUT, IN)
    with pytest.raises(RuntimeError, match="inference-only"):
        lora_linear_multi(x, w, *pack_lora_adapters(_adapters()), torch.zeros(5, dtype=torch.int32), impl="triton")


def test_bad_arguments():
    x, w, a, b, bias = _lora_inputs(4)
    with pytest.raises(ValueError, match=r"weight must be \[out, in=50\]"):
        lora_linear(x, w[:, :7], a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in=50\]"):
        lora_linear(x, w, a[:, :7], b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b must be \[out=70, r=4\]"):
        lora_linear(x, w, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="bias must be None or"):
        lora_linear(x, w, a, b, 1.0, bias=bias[:5])
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        lora_linear(x, w.double(), a, b, 1.0)
    for bad in (torch.tensor(1.0), True, float("nan"), "2"):
        with pytest.raises(ValueError, match="scale must be a finite Python float"):
            lora_linear(x, w, a, b, bad)
    for bad in (1.0, -0.1, None):
        with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\)"):
            lora_linear(x, w, a, b, 1.0, dropout=bad)
    with pytest.raises(ValueError, match="dropout_seed must be None or an int"):
        lora_linear(x, w, a, b, 1.0, dropout=0.1, dropout_seed=1.5)
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        lora_linear(x, w, a, b, 1.0, impl="cuda")
    packed = pack_lora_adapters(_adapters())
    ids = torch.zeros(N, dtype=torch.int32)
    with pytest.raises(ValueError, match="adapter_ids must be an int32 tensor of shape"):
        lora_linear_multi(x, w, *packed, ids.long())
    with pytest.raises(ValueError, match="adapter_ids must be an int32 tensor of shape"):
        lora_linear_multi(x, w, *packed, ids[:-1])
    for bad in (-2, 4):
        with pytest.raises(ValueError, match=rf"adapter_ids holds {bad}, outside \[-1, n_adapters=4\)"):
            lora_linear_multi(x, w, *packed, torch.full((N,), bad, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"scales must be a floating tensor \[n_adapters=4\]"):
        lora_linear_multi(x, w, packed[0], packed[1], packed[2][:2], ids)
    with pytest.raises(ValueError, match=r"lora_b must be \[n_adapters=4, out=70, r=16\]"):
        lora_linear_multi(x, w, packed[0], packed[1][:, :, :3], packed[2], ids)
    with pytest.raises(ValueError, match=r"adapter 0: lora_a must be \[r <= 2"):
        pack_lora_adapters(_adapters(), rank=2)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x, w, a, b, _ = _lora_inputs(4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        lora_linear(x, w, a, b, 1.0, impl="triton")


# ---------------------------------------------------------------------------------------
# the model: adapters on the projections, PEFT format


SEQS = [[5, 9, 1, 33, 2, 7, 8], [4], [100, 3, 6]]


def _hidden(model, seqs=SEQS, adapter_ids=None):
    batch = PackedBatch.from_sequences(seqs, vocab_size=model.config.vocab_size)
    return model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, adapter_ids)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_add_lora_starts_at_base_and_trains_only_adapters(checkpoint):
    model = load_model(checkpoint("llama", attention_bias=True))
    with torch.no_grad():
        base = _hidden(model)
    config = add_lora(model, rank=4, alpha=8, dropout=0.1)
    assert config.scale == 2.0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_hidden(model), base, rtol=0, atol=0)  # B starts at zero
    model.train()
    _randomize(model)
    h = _hidden(model)
    (h * torch.randn_like(h)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 4 * model.config.num_layers
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name
    # Training mode applies dropout on the adapter path only; eval mode does not.
    with torch.no_grad():
        model.eval()
        ev = _hidden(model)
        model.train()
        assert not torch.allclose(_hidden(model), ev)


def test_fused_blocks_stay_block_diagonal(checkpoint):
    """q's adapter never sees k's rank: the gradient of each B block comes from its own
    rows only, so an untargeted k_proj (zero A and B) stays exactly zero."""
    model = load_model(checkpoint("qwen3"))
    add_lora(model, rank=3, alpha=6, targets=("q_proj", "v_proj", "down"))
    _randomize(model)
    qkv = model.layers[0].attn.qkv
    with torch.no_grad():
        qkv.lora_a[3:6].zero_()
        q = qkv.blocks[0]
        qkv.lora_b[q:q + qkv.blocks[1]].zero_()
    h = _hidden(model)
    (h * torch.randn_like(h)).sum().backward()
    assert torch.all(qkv.lora_a.grad[3:6] == 0) and torch.all(qkv.lora_b.grad[q:q + qkv.blocks[1]] == 0)
    state = lora_state_dict_to_peft(model)
    assert not any("k_proj" in k or "o_proj" in k or "gate_proj" in k for k in state)
    assert state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 64)
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (2 * 24, 3)
    assert peft_config(model)["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_peft_round_trip(checkpoint, tmp_path):
    folder = checkpoint("llama")
    model = load_model(folder)
    add_lora(model, rank=5, alpha=3, targets=("qkv", "o", "gate_up", "down"), use_rslora=True)
    _randomize(model, seed=1)
    save_peft_lora(model, tmp_path / "adapter")
    for source in (tmp_path / "adapter", (lora_state_dict_to_peft(model), peft_config(model))):
        fresh = load_model(folder)
        load_peft_lora(fresh, *(source if isinstance(source, tuple) else (source,)))
        assert fresh.lora_config == model.lora_config
        ours, theirs = dict(model.named_parameters()), dict(fresh.named_parameters())
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="r=5, target_modules"):
        load_peft_lora(model, lora_state_dict_to_peft(model), dict(peft_config(model), r=4))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_peft_lora(load_model(folder), tmp_path / "adapter", dict(peft_config(model), use_dora=True))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_lora(load_model(folder), tmp_path)
    state = lora_state_dict_to_peft(model)
    state["base_model.model.model.layers.7.mlp.down_proj.lora_A.weight"] = torch.zeros(5, 96)
    with pytest.raises(ValueError, match="match no projection"):
        load_peft_lora(load_model(folder), state, peft_config(model))


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
@pytest.mark.parametrize("family, overrides, targets", [
    ("llama", dict(attention_bias=True), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen3", {}, ["q_proj", "v_proj", "up_proj"]),
])
def test_logits_match_peft_on_transformers(checkpoint, tmp_path, family, overrides, targets):
    """Both directions: a PEFT adapter loaded here, and our adapter loaded by PEFT, give
    the logits of a PEFT-wrapped transformers model with the same weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = checkpoint(family, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        ref = torch.cat([peft_model(torch.tensor([s])).logits[0] for s in SEQS])
    model = load_model(folder)
    load_peft_lora(model, tmp_path / "theirs")
    with torch.no_grad():
        ours = model.compute_logits(_hidden(model.eval()))
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4

    save_peft_lora(model, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                         tmp_path / "ours").eval()
    with torch.no_grad():
        back = torch.cat([reloaded(torch.tensor([s])).logits[0] for s in SEQS])
    torch.testing.assert_close(back, ref, rtol=1e-5, atol=1e-5)


def test_multi_adapter_model(checkpoint, tmp_path):
    """Two adapters of different ranks and targets served in one packed batch next to the
    base model: each sequence matches a model carrying only its adapter."""
    folder = checkpoint("llama")
    sources = []
    for k, (rank, targets) in enumerate(((2, ("qkv", "down")), (6, ("q_proj", "v_proj", "o", "gate_up")))):
        m = load_model(folder)
        add_lora(m, rank=rank, alpha=2 * rank + k, targets=targets)
        _randomize(m, seed=10 + k)
        sources.append(save_peft_lora(m, tmp_path / f"a{k}"))
    model = load_model(folder)
    assert set_adapter_stack(model, sources) == 2 and model.num_adapters == 2
    seq_adapter = [1, -1, 0]
    ids = torch.cat([torch.full((len(s),), a, dtype=torch.int32) for s, a in zip(SEQS, seq_adapter)])
    with torch.no_grad():
        mixed = _hidden(model, adapter_ids=ids)
        for i, (seq, a) in enumerate(zip(SEQS, seq_adapter)):
            single = load_model(folder)
            if a >= 0:
                load_peft_lora(single, sources[a])
            start = sum(len(s) for s in SEQS[:i])
            torch.testing.assert_close(mixed[start:start + len(seq)], _hidden(single.eval(), [seq]),
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_hidden(model), _hidden(load_model(folder)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"adapter_ids holds 2, outside \[-1, 2\)"):
        _hidden(model, adapter_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="adapter_ids must be an int32 tensor"):
        _hidden(model, adapter_ids=ids.long())
    with pytest.raises(ValueError, match="no adapter stack"):
        _hidden(load_model(folder), adapter_ids=ids)

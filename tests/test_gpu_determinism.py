"""Determinism on the GPU (``pytest -m gpu``): every op of ``kernels/`` run twice on the same
inputs with impl="triton" gives the same bits, outputs and gradients (torch.equal).

DESIGN.md: "Deterministic by default: no float atomics on a default path". The interpreter
runs programs one after another, so only a GPU shows a reduction whose order depends on
which program finishes first. Shapes are moderate (compilation aside, each test's kernels
run in milliseconds on an H100) but large enough that the split reductions split: LoRA's shrink over in-features,
its dy pass over rows and out-features with several row blocks per row split (N=8192,
out=4096 on 132 SMs), dA over rows, and paged attention's split-K over a long context.
"""
import pytest
import torch

import kernels.lowrank_gemm as lowrank_gemm
from kernels import (append_kv, linear_cross_entropy, linear_logprobs, linear_token_loss, lora_dropout_mask,
                     lora_linear, lora_linear_multi, pack_lora_adapters, paged_attention, rms_norm, rope, silu_mul,
                     varlen_attention)

pytestmark = pytest.mark.gpu


def _same_bits(run, names):
    """run() -> tensors; called twice, every tensor must be bit-identical."""
    first, second = run(), run()
    assert len(first) == len(names) == len(second)
    for name, a, b in zip(names, first, second):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} elements differ between two runs"


def _randn(g, *shape, scale=1.0, dtype=torch.bfloat16, grad=False):
    t = (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)
    return t.requires_grad_() if grad else t


def _with_grads(out, inputs, upstream):
    """(out, d out / d input for each input) for the given upstream gradient."""
    return (out, *torch.autograd.grad(out, inputs, upstream))


# ---------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("gemm", ["cublas", "fused", "fused-tma"])
@pytest.mark.parametrize("r, dropout, bias", [
    (16, 0.0, True),
    (16, 0.1, False),
    (32, 0.1, True),   # padded rank 32: the largest the fused dy pass takes
    (64, 0.0, True),   # the dy pass on cuBLAS, dA still split over rows
])
def test_lora_linear(monkeypatch, gemm, r, dropout, bias):
    monkeypatch.setattr(lowrank_gemm, "GEMM", gemm)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k, m = 8192, 2048, 4096
    x = _randn(g, n, k, grad=True)
    w = _randn(g, m, k, scale=k**-0.5, grad=True)
    a = _randn(g, r, k, scale=k**-0.5, grad=True)
    b = _randn(g, m, r, scale=0.1, grad=True)
    bb = _randn(g, m, scale=0.1, grad=True) if bias else None
    dy = _randn(g, n, m)
    inputs = [t for t in (x, w, a, b, bb) if t is not None]
    names = ["y", "dx", "dW", "dA", "dB", "dbias"][:1 + len(inputs)]
    _same_bits(lambda: _with_grads(lora_linear(x, w, a, b, 2.0, bias=bb, dropout=dropout, dropout_seed=7,
                                               impl="triton"), inputs, dy), names)


def test_lora_float32_adapters_frozen_input():
    """PEFT's float32 adapters under bf16 activations; only the adapter trains."""
    g = torch.Generator(device="cuda").manual_seed(1)
    n, k, m, r = 8192, 4096, 2048, 8
    x, w = _randn(g, n, k), _randn(g, m, k, scale=k**-0.5)
    a = _randn(g, r, k, scale=k**-0.5, dtype=torch.float32, grad=True)
    b = _randn(g, m, r, scale=0.1, dtype=torch.float32, grad=True)
    dy = _randn(g, n, m)
    _same_bits(lambda: _with_grads(lora_linear(x, w, a, b, 0.5, impl="triton"), (a, b), dy), ("y", "dA", "dB"))


@pytest.mark.parametrize("n, layout", [(64, "spread"), (2048, "segments"), (2048, "spread")])
def test_lora_linear_multi(n, layout):
    g = torch.Generator(device="cuda").manual_seed(2)
    k, m, n_adapters = 4096, 4096, 8
    adapters = [(_randn(g, rk, k, scale=k**-0.5), _randn(g, m, rk, scale=0.1), 0.5 + i / 8)
                for i, rk in enumerate([16, 8, 4, 1] * 2)]
    stack = pack_lora_adapters(adapters)
    x, w = _randn(g, n, k), _randn(g, m, k, scale=k**-0.5)
    if layout == "spread":
        ids = torch.randint(-1, n_adapters, (n,), device="cuda", generator=g, dtype=torch.int32)
    else:
        ids = (torch.arange(n, device="cuda") * (n_adapters + 1) // n - 1).to(torch.int32)
    with torch.no_grad():
        _same_bits(lambda: (lora_linear_multi(x, w, *stack, ids, impl="triton"),), ("y",))


def test_lora_dropout_mask():
    _same_bits(lambda: (lora_dropout_mask((4096, 4096), 0.1, 1234, device="cuda", impl="triton"),), ("mask",))


# ---------------------------------------------------------------------------------------
# LM head: logprobs and cross-entropy


def _lm_head(seed, n=4096, h=2048, v=50257, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = _randn(g, n, h, dtype=dtype, grad=True)
    w = _randn(g, v, h, scale=h**-0.5 * 2, dtype=dtype, grad=True)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = -100
    return g, x, w, t


@pytest.mark.parametrize("opts", [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
    dict(temperature=0.7, reduction="sum", fp32_weight_grad=True),
    dict(with_bias=True, with_weights=True),
])
def test_linear_cross_entropy(opts):
    g, x, w, t = _lm_head(3)
    opts = dict(opts)
    bias = _randn(g, w.shape[0], scale=0.1, grad=True) if opts.pop("with_bias", False) else None
    weights = torch.rand(x.shape[0], device="cuda", generator=g) if opts.pop("with_weights", False) else None
    inputs = [t_ for t_ in (x, w, bias) if t_ is not None]

    def run():
        loss = linear_cross_entropy(x, w, t, bias=bias, weights=weights, impl="triton", **opts)
        return _with_grads(loss, inputs, torch.ones_like(loss))

    _same_bits(run, ["loss", "dx", "dW", "dbias"][:1 + len(inputs)])


def test_linear_logprobs_entropy_lse():
    g, x, w, t = _lm_head(4, v=32003)
    up = torch.randn(3, x.shape[0], device="cuda", generator=g)

    def run():
        lp, lse, ent = linear_logprobs(x, w, t, return_lse=True, return_entropy=True, softcap=20.0, impl="triton")
        grads = torch.autograd.grad((lp * up[0] + lse * up[1] + ent * up[2]).sum(), (x, w))
        return lp, lse, ent, *grads

    _same_bits(run, ("logprob", "lse", "entropy", "dx", "dW"))


def test_linear_token_loss():
    g, x, w, t = _lm_head(5, v=32003)
    old = torch.randn(x.shape[0], device="cuda", generator=g) - 8
    adv = torch.randn(x.shape[0], device="cuda", generator=g)

    def ppo(s, old, adv):
        ratio = torch.exp(s.logprob - old)
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) - 0.01 * s.entropy

    def run():
        loss = linear_token_loss(x, w, t, ppo, aux=dict(old=old, adv=adv), with_entropy=True, impl="triton")
        return _with_grads(loss, (x, w), torch.ones_like(loss))

    _same_bits(run, ("loss", "dx", "dW"))


# ---------------------------------------------------------------------------------------
# attention


LENGTHS = [2048, 1, 700, 1500, 33, 1024, 129]


@pytest.mark.parametrize("d, window, softcap", [(128, None, None), (64, 256, 30.0)])
def test_varlen_attention(d, window, softcap):
    g = torch.Generator(device="cuda").manual_seed(6)
    total, hq, hkv = sum(LENGTHS), 16, 4
    q, k, v = (_randn(g, total, h, d, grad=True) for h in (hq, hkv, hkv))
    dout = _randn(g, total, hq, d)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")

    def run():
        out, lse = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=window, softcap=softcap,
                                    return_lse=True, impl="triton")
        return out, lse, *torch.autograd.grad(out, (q, k, v), dout)

    _same_bits(run, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("lens, window, softcap", [
    ([16384], None, None),                        # batch 1: split-K over the context, then the combine
    ([1, 16, 5000, 8192, 300, 2047, 64, 0], 1000, 30.0),  # a zero-length padding row
])
def test_paged_attention_and_append_kv(lens, window, softcap):
    g = torch.Generator(device="cuda").manual_seed(7)
    hq, hkv, d, block_size = 32, 8, 128, 16
    pages = [-(-n // block_size) for n in lens]
    num_blocks, max_blocks = sum(pages) + 3, max(max(pages), 1)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32, device="cuda")
    start = 0
    for i, p in enumerate(pages):
        table[i, :p] = perm[start:start + p]
        start += p
    k_cache, v_cache = (_randn(g, num_blocks, block_size, hkv, d) for _ in range(2))
    q = _randn(g, len(lens), hq, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    new_k, new_v = _randn(g, 40, hkv, d), _randn(g, 40, hkv, d)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:40]
    slots[::9] = -1

    def run():
        kc, vc = k_cache.clone(), v_cache.clone()
        with torch.no_grad():
            append_kv(kc, vc, new_k, new_v, slots, impl="triton")
            out = paged_attention(q, kc, vc, table, seq_lens, window=window, softcap=softcap, impl="triton")
        return out, kc, vc

    _same_bits(run, ("out", "k_cache", "v_cache"))


# ---------------------------------------------------------------------------------------
# small fused ops


@pytest.mark.parametrize("hidden", [2048, 8192])
def test_fused_ops(hidden):
    g = torch.Generator(device="cuda").manual_seed(8)
    x, res = _randn(g, 512, hidden), _randn(g, 512, hidden)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).bfloat16()
    t, hq, hkv, d = 300, 32, 8, 128
    q, k = _randn(g, t, hq, d), _randn(g, t, hkv, d)
    freqs = torch.arange(t, device="cuda").float()[:, None] * (1e4 ** (-torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.cat([freqs, freqs], -1)[:, None]
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    qw, kw = ((torch.rand(d, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(2))
    gate_up = _randn(g, 512, 2 * hidden, scale=4.0)

    def run():
        with torch.no_grad():
            normed = rms_norm(x, w, 1e-5, impl="triton")
            normed_res, h = rms_norm(x, w, 1e-5, residual=res, impl="triton")
            q1, k1 = rope(q, k, cos, sin, impl="triton")
            q2, k2 = rope(q, k, cos, sin, q_weight=qw, k_weight=kw, impl="triton")
            return normed, normed_res, h, q1, k1, q2, k2, silu_mul(gate_up, impl="triton")

    _same_bits(run, ("rms_norm", "rms_norm+res", "residual", "q", "k", "q normed", "k normed", "silu_mul"))

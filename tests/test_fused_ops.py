"""The small fused ops (kernels/fused_ops.py) under the Triton interpreter: float32 against
float64, and in bf16 against the eager torch ops whose roundings they reproduce.

The interpreter truncates float32 -> bf16 conversions where a GPU rounds to nearest, so in
bf16 each of the ops' two or three roundings may land one ulp off here: the bound is 3
ulps. tests/test_gpu_fused_ops.py holds the GPU kernels to one ulp of the eager ops."""
import pytest
import torch

from kernels import rms_norm, rope, silu_mul
from kernels.fused_ops import rms_norm_torch, rope_torch, silu_mul_torch

BF16_ULP = 2.0 ** -7  # relative spacing of bf16 numbers (8 significant bits), at most


def _close_bf16(got, want, ulps=3, scale=0.0):
    """|got - want| within ``ulps`` bf16 ulps of |want| + ``scale`` (the size of the terms
    a sum rounded before cancelling)."""
    diff = (got.float() - want.float()).abs()
    assert (diff <= ulps * BF16_ULP * (want.float().abs() + scale) + 1e-6).all(), f"max diff {diff.max()}"


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 64), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(shape, dtype, residual):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    res = (torch.randn(shape, generator=g)).to(dtype) if residual else None
    got = rms_norm(x, w, 1e-6, residual=res, impl="triton")
    want = rms_norm_torch(x, w, 1e-6, res)
    if residual:
        (got, h), (want, want_h) = got, want
        if dtype == torch.float32:
            assert torch.equal(h, want_h)  # the residual stream is one rounded add
        else:
            _close_bf16(h, want_h, ulps=1)
    assert got.dtype == want.dtype and got.shape == x.shape
    if dtype == torch.float32:
        h64 = x.double() + (res.double() if residual else 0)
        ref = w.double() * h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        _close_bf16(got, want)


def test_rms_norm_promotes_to_the_weight_dtype():
    x = torch.randn(4, 32).bfloat16()
    w = torch.rand(32) + 0.5
    got = rms_norm(x, w, 1e-5, impl="triton")
    assert got.dtype == torch.float32
    _close_bf16(got, rms_norm_torch(x, w, 1e-5), ulps=1)  # the normalised x is rounded to bf16


def _qkv(t, hq, hkv, d, dtype, seed):
    """q and k as views of one fused projection output (strided, like the model's split)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d)


def _cos_sin(t, d, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(3, 3 + t).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("d", [24, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_rope(d, dtype, norm):
    q, k = _qkv(5, 4, 2, d, dtype, seed=d)
    cos, sin = _cos_sin(5, d, dtype)
    weights = {}
    if norm:
        g = torch.Generator().manual_seed(1)
        weights = dict(q_weight=(torch.rand(d, generator=g) + 0.5).to(dtype),
                       k_weight=(torch.rand(d, generator=g) + 0.5).to(dtype))
    got = rope(q, k, cos, sin, eps=1e-6, impl="triton", **weights)
    want = rope_torch(q, k, cos, sin, eps=1e-6, **weights)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            _close_bf16(a, b, scale=b.float().abs().max().item())
    # float64 rotation (no norm): an independent formula
    if dtype == torch.float32 and not norm:
        ang = torch.atan2(sin[:, :, : d // 2].double(), cos[:, :, : d // 2].double())
        x1, x2 = q.double()[..., : d // 2], q.double()[..., d // 2:]
        ref = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
        torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-5)
    # [T, D] cos/sin are accepted too
    flat = rope(q, k, cos[:, 0], sin[:, 0], impl="triton", **weights)
    assert all(torch.equal(a, b) for a, b in zip(flat, got))


@pytest.mark.parametrize("shape", [(5, 74), (2, 3, 2048 + 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(shape, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    got = silu_mul(x, impl="triton")
    want = silu_mul_torch(x)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        gate, up = x.double().chunk(2, -1)
        torch.testing.assert_close(got.double(), gate * torch.sigmoid(gate) * up, rtol=1e-5, atol=1e-5)
    else:
        _close_bf16(got, want)


def test_autograd_takes_the_reference_and_bad_input_is_named():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8)
    out = rms_norm(x, w, 1e-6)  # auto: autograd records, so the torch ops run
    out.sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="forward only"):
        rms_norm(x, w, 1e-6, impl="triton")
    with torch.no_grad():
        rms_norm(x, w, 1e-6, impl="triton")
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, 1e-6, residual=torch.zeros(3, 8, dtype=torch.float64))
    q, k = _qkv(2, 2, 1, 8, torch.float32, 0)
    cos, sin = _cos_sin(2, 8, torch.float32)
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        rope(q, k, cos, sin, q_weight=torch.ones(8))
    with pytest.raises(ValueError, match="cos must be"):
        rope(q, k, cos[:1], sin)
    with pytest.raises(ValueError, match="needs cos, sin"):
        rope(q, k, cos.double(), sin, impl="triton")
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="impl="):
        silu_mul(torch.randn(2, 4), impl="cuda")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_decoder_with_the_fused_kernels(checkpoint, monkeypatch, family):
    """The inference forward (residual adds fused with the norms, RoPE with Qwen3's q/k
    norms, SiLU-mul) on the Triton kernels equals the same forward on the torch ops."""
    import kernels.fused_ops as fused
    from engine.infer import KVCache, StepBatch, forward_with_cache
    from engine.models import load_model

    model = load_model(checkpoint(family))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (6, 11)]
    outs, launched = [], []
    for kernel in (False, True):
        if kernel:  # what impl="auto" picks on CUDA, here under the interpreter
            monkeypatch.setattr(fused, "_pick", lambda op, impl, x, *t: launched.append(op) or "triton")
        cache = KVCache.for_model(model, block_size=4, num_tokens=64)
        blocks = [cache.allocator.allocate(cache.blocks_needed(len(p) + 1)) for p in prompts]
        pre = forward_with_cache(model, cache, StepBatch.build([(p, 0, b) for p, b in zip(prompts, blocks)], 4, "cpu"))
        dec = forward_with_cache(model, cache, StepBatch.build(
            [([7], len(p), b) for p, b in zip(prompts, blocks)], 4, "cpu"))
        outs.append((pre, dec))
    assert set(launched) == {"rms_norm", "rope", "silu_mul"}
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

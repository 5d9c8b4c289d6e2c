"""GPU checks of the small fused ops (``pytest -m gpu``): in bf16 they agree with the eager
torch ops they replace within one ulp (the RMS mean's summation order may flip a rounding)."""
import pytest
import torch

from kernels import rms_norm, rope, silu_mul
from kernels.fused_ops import rms_norm_torch, rope_torch, silu_mul_torch

pytestmark = pytest.mark.gpu
ULP = 2.0 ** -7


def _within_one_ulp(got, want, scale=0.0):
    diff = (got.float() - want.float()).abs()
    bound = ULP * (want.float().abs() + scale) + 1e-6
    assert (diff <= bound).all(), f"max diff {diff.max().item()}, {int((diff > bound).sum())} elements out"


@pytest.mark.parametrize("hidden", [2048, 4096, 5120])
def test_rms_norm_bf16(hidden):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, hidden, device="cuda", generator=g).bfloat16() * 3
    res = torch.randn(64, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).bfloat16()
    with torch.no_grad():
        out, h = rms_norm(x, w, 1e-5, residual=res)
        want, want_h = rms_norm_torch(x, w, 1e-5, res)
    assert torch.equal(h, want_h)
    _within_one_ulp(out, want)


@pytest.mark.parametrize("d,norm", [(64, False), (128, False), (128, True)])
def test_rope_bf16(d, norm):
    g = torch.Generator(device="cuda").manual_seed(1)
    t, hq, hkv = 33, 32, 8
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", generator=g).bfloat16()
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    freqs = torch.arange(t, device="cuda").float()[:, None] * (1e4 ** (-torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.cat([freqs, freqs], -1)[:, None]
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    w = dict(q_weight=torch.rand(d, device="cuda").bfloat16() + 0.5,
             k_weight=torch.rand(d, device="cuda").bfloat16() + 0.5) if norm else {}
    with torch.no_grad():
        got, want = rope(q, k, cos, sin, eps=1e-6, **w), rope_torch(q, k, cos, sin, eps=1e-6, **w)
    for a, b in zip(got, want):
        _within_one_ulp(a, b, scale=b.float().abs().max().item())


def test_silu_mul_bf16():
    x = torch.randn(64, 2 * 8192, device="cuda").bfloat16() * 4
    with torch.no_grad():
        _within_one_ulp(silu_mul(x), silu_mul_torch(x))  # tl.exp is not expf: rare one-ulp flips

"""GPU checks of the attention kernels (``pytest -m gpu``) at real sizes.

bf16: the error against a float32 truth must stay within twice the error of torch's own
bf16 scaled_dot_product_attention (per sequence) against the same truth, for the output and
for dq/dk/dv (STYLE.md: tolerances relative to the reference's own error).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import paged_attention, varlen_attention
from kernels.varlen_attention import attention_mask

pytestmark = pytest.mark.gpu

LENGTHS = [2048, 1, 700, 1500, 33, 1024, 512, 129]
HQ, HKV, D = 32, 8, 128


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _sdpa_per_sequence(q, k, v, lengths, *, scale, window):
    outs, start = [], 0
    for n in lengths:
        qb, kb, vb = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        if window is None:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = attention_mask(n, n, causal=True, window=window, device=q.device)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 256])
def test_varlen_bf16_within_twice_sdpa_error(window):
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the truth must be true float32
    total = sum(LENGTHS)
    q32 = torch.randn(total, HQ, D, device="cuda")
    k32 = torch.randn(total, HKV, D, device="cuda")
    v32 = torch.randn(total, HKV, D, device="cuda")
    dout32 = torch.randn(total, HQ, D, device="cuda")
    cu, scale = _cu(LENGTHS), D**-0.5

    def run(fn, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout32.to(dtype))
        return (out, *grads)

    truth = run(lambda q, k, v: varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), softmax_scale=scale,
                                                 window=window, impl="torch"), torch.float32)
    ours = run(lambda q, k, v: varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), softmax_scale=scale,
                                                window=window, impl="triton"), torch.bfloat16)
    theirs = run(lambda q, k, v: _sdpa_per_sequence(q, k, v, LENGTHS, scale=scale, window=window), torch.bfloat16)
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), ours, theirs, truth):
        err_ours, err_theirs = _rel(a, t), _rel(b, t)
        print(f"{name}: bf16 relative error triton {err_ours:.3e}, sdpa {err_theirs:.3e}")
        assert err_ours <= 2 * err_theirs + 1e-4, name


def test_varlen_float32_softcap_window_against_float64():
    """float32 inputs use IEEE float32 dot products (no TF32): close to a float64 truth."""
    torch.manual_seed(1)
    lens_q, lens_k = [300, 1, 257, 64], [300, 1, 400, 64]
    q = torch.randn(sum(lens_q), 8, D, device="cuda", requires_grad=True)
    k = torch.randn(sum(lens_k), 2, D, device="cuda", requires_grad=True)
    v = torch.randn(sum(lens_k), 2, D, device="cuda", requires_grad=True)
    args = (_cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k))
    opts = dict(softmax_scale=0.1, window=100, softcap=20.0, return_lse=True)
    out, lse = varlen_attention(q, k, v, *args, impl="triton", **opts)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = varlen_attention(q64, k64, v64, *args, impl="torch", **opts)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_varlen_backward_is_deterministic():
    torch.manual_seed(2)
    total = sum(LENGTHS)
    q = torch.randn(total, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = _cu(LENGTHS)
    out = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), impl="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_flash_attn_matches_triton():
    pytest.importorskip("flash_attn")
    torch.manual_seed(3)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    cu = _cu(LENGTHS)
    a, lse_a = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=300, return_lse=True,
                                impl="triton")
    b, lse_b = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=300, return_lse=True,
                                impl="flash_attn")
    assert _rel(a, b) < 1e-2
    torch.testing.assert_close(lse_a, lse_b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("window", [None, 1000])
def test_paged_bf16_within_twice_sdpa_error(window):
    torch.manual_seed(4)
    torch.backends.cuda.matmul.allow_tf32 = False
    lens, block_size = [1, 16, 5000, 8192, 300, 2047, 64, 129], 16
    pages = [-(-n // block_size) for n in lens]
    num_blocks, max_blocks = sum(pages) + 7, max(pages)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_table = torch.zeros(len(lens), max_blocks, dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[start:start + n]
        start += n
    k32 = torch.randn(num_blocks, block_size, HKV, D, device="cuda")
    v32 = torch.randn(num_blocks, block_size, HKV, D, device="cuda")
    q32 = torch.randn(len(lens), HQ, D, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        truth = paged_attention(q32, k32, v32, block_table, seq_lens, window=window, impl="torch")
        ours = paged_attention(q32.bfloat16(), k32.bfloat16(), v32.bfloat16(), block_table, seq_lens, window=window,
                               impl="triton")
        theirs = []
        for b, n in enumerate(lens):
            pos = torch.arange(n, device="cuda")
            phys = block_table[b, pos // block_size].long()
            kb = k32.bfloat16()[phys, pos % block_size].transpose(0, 1)[None]  # [1, Hkv, L, D]
            vb = v32.bfloat16()[phys, pos % block_size].transpose(0, 1)[None]
            mask = None if window is None else (pos > n - 1 - window)[None, :]
            theirs.append(F.scaled_dot_product_attention(q32[b].bfloat16()[None, :, None], kb, vb, attn_mask=mask,
                                                         enable_gqa=True)[0, :, 0])
        theirs = torch.stack(theirs)
    err_ours, err_theirs = _rel(ours, truth), _rel(theirs, truth)
    print(f"paged: bf16 relative error triton {err_ours:.3e}, sdpa {err_theirs:.3e}")
    assert err_ours <= 2 * err_theirs + 1e-4

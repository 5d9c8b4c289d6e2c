"""The varlen attention reference against a dense float64 computation over the whole packed
batch with an explicit block-diagonal mask (a second, independent formulation)."""
import pytest
import torch

from kernels import varlen_attention


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def dense_reference(q, k, v, lens_q, lens_k, *, causal, window, softcap, scale):
    """float64 attention of every query against every key of the batch, with a mask that
    allows a pair only inside one sequence and within the causal/window limits."""
    q, k, v = q.double(), k.double(), v.double()
    seg_q = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q))
    seg_k = torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k))
    pos_q = torch.cat([torch.arange(n) for n in lens_q]) if lens_q else torch.zeros(0, dtype=torch.long)
    pos_k = torch.cat([torch.arange(n) for n in lens_k]) if lens_k else torch.zeros(0, dtype=torch.long)
    # Bottom-right alignment: query i of a sequence sits at key position i + Lk - Lq.
    shift = (torch.tensor(lens_k) - torch.tensor(lens_q))[seg_q]
    abs_q = (pos_q + shift)[:, None]
    allowed = seg_q[:, None] == seg_k[None, :]
    if causal:
        allowed &= pos_k[None, :] <= abs_q
    if window is not None:
        allowed &= pos_k[None, :] > abs_q - window
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, Tk, D]
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = q.transpose(0, 1) @ kk.transpose(1, 2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - lse[..., None]), 0.0)
    return (p @ vv).transpose(0, 1), lse


CASES = [
    # lens_q, lens_k (None: same as q), Hq, Hkv, D, causal, window, softcap
    ([5, 1, 17, 3], None, 4, 2, 16, True, None, None),
    ([5, 1, 17, 3], None, 4, 1, 16, True, 4, None),  # MQA + sliding window
    ([9, 2], None, 2, 2, 24, False, None, 5.0),  # non-causal + softcap, D not a power of two
    ([1], None, 3, 3, 8, True, None, None),  # a single sequence of length 1
    ([40, 1, 1, 2], None, 4, 2, 16, True, 7, 3.0),  # one long among short ones
    ([3, 2, 4], [7, 2, 10], 4, 2, 16, True, None, None),  # prefill on a cached prefix
    ([3, 2, 4], [7, 2, 10], 4, 2, 16, True, 5, None),
    ([4, 3], [2, 3], 2, 1, 16, True, None, None),  # fewer keys than queries: early queries see none
]


@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, causal, window, softcap", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_dense(lens_q, lens_k, hq, hkv, d, causal, window, softcap, dtype):
    lens_k = lens_k or lens_q
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(tk, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(tk, hkv, d, dtype=dtype, requires_grad=True)
    scale = 0.7 / d**0.5
    out, lse = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal,
                                softmax_scale=scale, window=window, softcap=softcap, return_lse=True, impl="torch")
    ref_out, ref_lse = dense_reference(q, k, v, lens_q, lens_k, causal=causal, window=window, softcap=softcap, scale=scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)  # lse is float32 by contract
    assert lse.dtype == torch.float32 and lse.shape == (hq, tq)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (q, k, v), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=10 * tol, atol=10 * tol)


def test_tokens_beyond_cu_seqlens_untouched():
    q = torch.randn(10, 2, 8)
    k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    out = varlen_attention(q, k, v, _cu([3, 4]), _cu([3, 4]), 4, 4, impl="torch")
    assert torch.all(out[7:] == 0)
    assert torch.all(out[:7] != 0)


def test_bad_arguments():
    q, k = torch.randn(6, 4, 8), torch.randn(6, 3, 8)
    cu = _cu([6])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(q, k, k, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32"):
        varlen_attention(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="window must be None or a positive int"):
        varlen_attention(q, q, q, cu, cu, 6, 6, window=0)
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
        varlen_attention(q, q, q, cu, cu, 6, 6, impl="cuda")
    with pytest.raises(ValueError, match="head_dim of q"):
        varlen_attention(q, torch.randn(6, 4, 4), torch.randn(6, 4, 4), cu, cu, 6, 6)

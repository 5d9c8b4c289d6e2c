"""The varlen attention reference against a dense float64 computation over the whole packed
batch with an explicit block-diagonal mask (a second, independent formulation)."""
import importlib

import pytest
import torch

from kernels import configs, varlen_attention


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


# ---------------------------------------------------------------------------------------
# The Triton backend (under the interpreter on CPU), float32 against the float64 truth.

TRITON_CASES = CASES + [
    # a window wider than two 16-blocks: mask-free key blocks inside the band, fwd and bwd
    ([70, 5], None, 2, 1, 16, True, 40, None),
    # head_dim 64, a cached prefix, softcap and GQA 2:1
    ([33, 7], [40, 7], 4, 2, 64, True, None, 2.0),
    # empty sequences between others, and head_dim 128 non-causal
    ([3, 0, 18], [3, 0, 18], 2, 2, 128, False, None, None),
]


def _random_problem(lens_q, lens_k, hq, hkv, d, tail=0, dtype=torch.float32):
    tq, tk = sum(lens_q) + tail, sum(lens_k) + tail
    q = torch.randn(tq, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(tk, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(tk, hkv, d, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, causal, window, softcap", TRITON_CASES)
def test_triton_matches_dense(lens_q, lens_k, hq, hkv, d, causal, window, softcap):
    lens_k = lens_k or lens_q
    q, k, v = _random_problem(lens_q, lens_k, hq, hkv, d)
    scale = 0.7 / d**0.5
    out, lse = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal,
                                softmax_scale=scale, window=window, softcap=softcap, return_lse=True, impl="triton")
    ref_out, ref_lse = dense_reference(q, k, v, lens_q, lens_k, causal=causal, window=window, softcap=softcap, scale=scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (hq, sum(lens_q))
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)  # -inf where a query sees no key
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_triton_writes_every_row():
    """The launchers write into NaN-poisoned buffers: every row of every sequence is
    written (including queries that see no key) and the rows past cu_seqlens[-1] are zero."""
    from kernels.varlen_attention_bwd_triton import varlen_attention_bwd
    from kernels.varlen_attention_triton import varlen_attention_fwd

    lens_q, lens_k, tail = [4, 19, 1], [2, 19, 6], 5  # sequence 0: two queries see no key
    q, k, v = _random_problem(lens_q, lens_k, 4, 2, 24, tail=tail)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    opts = dict(causal=True, softmax_scale=0.3, window=None, softcap=None)
    nan = float("nan")
    out, lse = torch.full_like(q, nan), torch.full((4, q.shape[0]), nan)
    varlen_attention_fwd(q.detach(), k.detach(), v.detach(), cu_q, cu_k, max(lens_q), out=out, lse=lse, **opts)
    ref_out, ref_lse = dense_reference(q[:-tail], k[:-tail], v[:-tail], lens_q, lens_k, causal=True, window=None,
                                       softcap=None, scale=0.3)
    torch.testing.assert_close(out[:-tail].double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse[:, :-tail].double(), ref_lse, rtol=1e-4, atol=1e-4)
    assert torch.all(out[-tail:] == 0) and torch.all(lse[:, -tail:] == float("-inf"))

    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, nan) for t in (q, k, v))
    varlen_attention_bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, cu_q, cu_k, max(lens_q), max(lens_k),
                         dq=dq, dk=dk, dv=dv, **opts)
    want = torch.autograd.grad(ref_out, (q, k, v), dout[:-tail].double())
    for name, g, w in zip("qkv", (dq, dk, dv), want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")
        assert torch.all(g[-tail:] == 0)


def test_triton_tokens_beyond_cu_seqlens():
    q, k, v = _random_problem([3, 4], [3, 4], 2, 2, 8, tail=3)
    cu = _cu([3, 4])
    out, lse = varlen_attention(q, k, v, cu, cu, 4, 4, return_lse=True, impl="triton")
    assert torch.all(out[7:] == 0) and torch.all(lse[:, 7:] == float("-inf"))
    assert torch.all(out[:7] != 0)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, 4, 4, impl="torch"), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.all(t.grad[7:] == 0) and torch.all(torch.isfinite(t.grad))


def test_triton_empty_batches():
    q, k, v = _random_problem([], [], 2, 1, 16, tail=4)  # no sequence at all: every row is tail
    cu = _cu([])
    out, lse = varlen_attention(q, k, v, cu, cu, 0, 0, return_lse=True, impl="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))
    q, k, v = _random_problem([], [], 2, 1, 16)
    out = varlen_attention(q, k, v, cu, cu, 0, 0, impl="triton")
    assert out.shape == (0, 2, 16)


def test_triton_lse_is_not_differentiable():
    q, k, v = _random_problem([5], [5], 2, 1, 16)
    cu = _cu([5])
    out, lse = varlen_attention(q, k, v, cu, cu, 5, 5, return_lse=True, impl="triton")
    assert out.requires_grad and not lse.requires_grad


def test_triton_backend_errors(monkeypatch):
    va = importlib.import_module("kernels.varlen_attention_triton")

    q = torch.randn(6, 2, 8, dtype=torch.float64)
    cu = _cu([6])
    with pytest.raises(ValueError, match="impl='triton' supports"):
        varlen_attention(q, q, q, cu, cu, 6, 6, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        va.varlen_attention_fwd(q.float(), q.float(), q.float(), cu, cu, 6, causal=True, softmax_scale=1.0,
                                window=None, softcap=None)


def test_flash_attn_backend_missing():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        q, cu = torch.randn(6, 2, 8), _cu([6])
        with pytest.raises(RuntimeError, match="flash_attn package is not installed"):
            varlen_attention(q, q, q, cu, cu, 6, 6, impl="flash_attn")
    else:
        pytest.skip("flash_attn is installed; tests/test_gpu_attention.py covers it")


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_triton_unequal_tiles(tiles):
    """The GPU configurations use BLOCK_M != BLOCK_N; the block-range arithmetic must not
    assume square tiles."""
    block_m, block_n = tiles
    tile = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=1, num_stages=1)
    lens_q, lens_k, window = [70, 5, 33], [75, 5, 40], 37
    q, k, v = _random_problem(lens_q, lens_k, 2, 1, 16)
    forced = {f"varlen_attention.{kind}": tile for kind in ("fwd", "dkdv", "dq")}
    for causal, win in ((True, window), (True, None), (False, window)):
        with configs.forced(forced):  # forward and backward
            out = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal,
                                   softmax_scale=0.25, window=win, impl="triton")
            grad = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), grad)
        ref = dense_reference(q, k, v, lens_q, lens_k, causal=causal, window=win, softcap=None, scale=0.25)[0]
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        want = torch.autograd.grad(ref, (q, k, v), grad.double())
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_flash_attn_backend_argument_mapping(monkeypatch):
    """With a stand-in flash_attn module: window/softcap/lse are translated to its API."""
    import sys
    import types

    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(kw)
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))  # flash-attn's value for "no key"
        return (torch.zeros_like(q), lse, None) if kw["return_attn_probs"] else torch.zeros_like(q)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake))
    q, cu = torch.randn(6, 2, 8, dtype=torch.bfloat16), _cu([6])
    out, lse = varlen_attention(q, q, q, cu, cu, 6, 6, window=3, softcap=2.0, return_lse=True, impl="flash_attn")
    assert calls[-1]["window_size"] == (2, 0) and calls[-1]["softcap"] == 2.0 and calls[-1]["causal"]
    assert torch.all(lse == float("-inf"))
    varlen_attention(q, q, q, cu, cu, 6, 6, causal=False, window=4, impl="flash_attn")
    assert calls[-1]["window_size"] == (3, -1) and calls[-1]["softcap"] == 0.0
    varlen_attention(q, q, q, cu, cu, 6, 6, impl="flash_attn")
    assert calls[-1]["window_size"] == (-1, -1)
    with pytest.raises(ValueError, match="needs float16 or bfloat16"):
        varlen_attention(q.float(), q.float(), q.float(), cu, cu, 6, 6, impl="flash_attn")


# bf16/fp16 under the interpreter (triton_base's dot/cast "upcast" mode): the error against
# the float64 truth on the same (rounded) inputs stays within twice the torch backend's in
# the same dtype, for the output and every gradient. bf16 on shapes that cross 16-blocks:
# a window band with mask-free key blocks; a cached prefix with softcap, GQA and D=64.
# fp16 on the cheapest case (softcap, D not a power of two).
LOW_PRECISION_CASES = [
    (TRITON_CASES[8], torch.bfloat16),
    (TRITON_CASES[9], torch.bfloat16),
    (TRITON_CASES[2], torch.float16),
]


@pytest.mark.parametrize("case, dtype", LOW_PRECISION_CASES)
def test_triton_low_precision_within_twice_torch_error(case, dtype):
    lens_q, lens_k, hq, hkv, d, causal, window, softcap = case
    lens_k = lens_k or lens_q
    torch.manual_seed(0)
    q, k, v = _random_problem(lens_q, lens_k, hq, hkv, d, dtype=dtype)
    scale = 0.7 / d**0.5
    ref = dense_reference(q, k, v, lens_q, lens_k, causal=causal, window=window, softcap=softcap, scale=scale)[0]
    up = torch.randn(ref.shape, dtype=torch.float64)
    truth = (ref, *torch.autograd.grad(ref, (q, k, v), up))
    results = {}
    for impl in ("triton", "torch"):
        out = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal,
                               softmax_scale=scale, window=window, softcap=softcap, impl=impl)
        assert out.dtype == dtype
        results[impl] = (out, *torch.autograd.grad(out, (q, k, v), up.to(dtype)))
    for name, tr, ours, theirs in zip(("out", "dq", "dk", "dv"), truth, results["triton"], results["torch"]):
        err = (ours.double() - tr).norm() / tr.norm()
        err_torch = (theirs.double() - tr).norm() / tr.norm()
        assert err <= 2 * err_torch + 1e-4, (name, err.item(), err_torch.item())

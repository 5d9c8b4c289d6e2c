"""Paged decode attention and the cache write, against a float64 computation on each
sequence's contiguous keys/values (never reading the cache), with shuffled physical blocks
and garbage in every cache slot no sequence owns."""
import importlib

import pytest
import torch

from kernels import append_kv, paged_attention, varlen_attention

pa = importlib.import_module("kernels.paged_attention")


def make_cache(lens, hkv, d, block_size, dtype=torch.float32):
    """Random per-sequence keys/values scattered into a shuffled paged cache."""
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages) + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)  # garbage where unowned
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    # Table entries past a sequence's length point at random (other sequences') blocks.
    block_table = torch.randint(0, num_blocks, (len(lens), max(pages, default=0) + 1), dtype=torch.int32)
    perm = torch.randperm(num_blocks).tolist()
    keys, values = [], []
    for b, n in enumerate(lens):
        block_table[b, : pages[b]] = torch.tensor([perm.pop() for _ in range(pages[b])], dtype=torch.int32)
        kb, vb = torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype)
        pos = torch.arange(n)
        phys = block_table[b, pos // block_size].long()
        k_cache[phys, pos % block_size], v_cache[phys, pos % block_size] = kb, vb
        keys.append(kb)
        values.append(vb)
    return k_cache, v_cache, block_table, keys, values


def dense_decode(q, keys, values, *, scale, window, softcap):
    """float64: query b (at position len-1) against sequence b's contiguous keys/values."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, (kb, vb) in enumerate(zip(keys, values)):
        n = kb.shape[0]
        if n == 0:
            continue
        group = q.shape[1] // kb.shape[1]
        kk = kb.double().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        vv = vb.double().repeat_interleave(group, 1).transpose(0, 1)
        s = (kk @ q[b].double()[:, :, None])[..., 0] * scale  # [Hq, L]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if window is not None:
            s[:, : max(0, n - window)] = float("-inf")
        out[b] = (s.softmax(-1)[:, None, :] @ vv)[:, 0]
    return out


CASES = [
    # lens, Hq, Hkv, D, block_size, window, softcap, num_splits (None: heuristic)
    ([1, 16, 100, 37], 4, 2, 16, 16, None, None, None),
    ([1, 16, 100, 37], 4, 2, 16, 16, None, None, 4),  # several chunks per sequence
    ([50, 3, 81], 8, 1, 24, 8, 20, None, 3),  # MQA, D not a power of two, window crossing chunks
    ([129, 7], 4, 4, 16, 5, None, 2.5, 2),  # block_size not a power of two, softcap
    ([0, 33], 6, 2, 64, 16, 9, 4.0, None),  # a padding row (length 0), GQA 3:1, D=64
]


@pytest.mark.parametrize("lens, hq, hkv, d, block_size, window, softcap, num_splits", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_paged_matches_dense(lens, hq, hkv, d, block_size, window, softcap, num_splits, impl):
    k_cache, v_cache, block_table, keys, values = make_cache(lens, hkv, d, block_size)
    q = torch.randn(len(lens), hq, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 0.8 / d**0.5
    if impl == "triton":
        out = pa.paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=scale, window=window,
                                     softcap=softcap, num_splits=num_splits, out=torch.full_like(q, float("nan")))
    else:
        out = paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=scale, window=window,
                              softcap=softcap, impl="torch")
    want = dense_decode(q, keys, values, scale=scale, window=window, softcap=softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_public_op_and_heuristic_splits():
    k_cache, v_cache, block_table, keys, values = make_cache([70, 2], 2, 16, 16)
    q = torch.randn(2, 4, 16)
    seq_lens = torch.tensor([70, 2], dtype=torch.int32)
    out = paged_attention(q, k_cache, v_cache, block_table, seq_lens, impl="triton")
    want = dense_decode(q, keys, values, scale=16**-0.5, window=None, softcap=None)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert pa._default_num_splits(2, 2, 80, q.device) > 1  # this shape did take the split-K path


@pytest.mark.parametrize("num_splits,window", [(None, None), (5, None), (4, 30)])
def test_chunks_follow_each_sequence_not_the_table_width(num_splits, window):
    """A CUDA graph pads the block table to the longest possible context: the chunks are
    cut from each sequence's own length, so a wide table of zeros past the sequences
    changes nothing."""
    lens = [70, 2, 41]
    k_cache, v_cache, block_table, keys, values = make_cache(lens, 2, 16, 8)
    wide = torch.zeros(len(lens), 64, dtype=torch.int32)  # 512 tokens of table
    wide[:, :block_table.shape[1]] = block_table
    for b, n in enumerate(lens):
        wide[b, -(-n // 8):] = 0
    q = torch.randn(len(lens), 4, 16)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = pa.paged_attention_fwd(q, k_cache, v_cache, wide, seq_lens, softmax_scale=0.25, window=window,
                                 softcap=None, num_splits=num_splits, out=torch.full_like(q, float("nan")))
    want = dense_decode(q, keys, values, scale=0.25, window=window, softcap=None)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_append_kv(impl):
    num_blocks, block_size, hkv, d = 6, 4, 3, 24
    k_cache, v_cache = torch.randn(num_blocks, block_size, hkv, d), torch.randn(num_blocks, block_size, hkv, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, -1, 0, 23, 14, -7, 9], dtype=torch.int64)
    k, v = torch.randn(7, hkv, d), torch.randn(7, hkv, d)
    append_kv(k_cache, v_cache, k, v, slots, impl=impl)
    k_want, v_want = k_before.view(-1, hkv, d).clone(), v_before.view(-1, hkv, d).clone()
    keep = slots >= 0
    k_want[slots[keep]], v_want[slots[keep]] = k[keep], v[keep]
    assert torch.equal(k_cache.view(-1, hkv, d), k_want) and torch.equal(v_cache.view(-1, hkv, d), v_want)


def test_prefill_then_decode():
    """The documented flow: append a packed prompt's k/v, attend with varlen_attention; then
    decode one token with append_kv + paged_attention. The decode step must equal the last
    row of varlen_attention over the prompt plus the new token."""
    lens, hq, hkv, d, block_size = [5, 12], 4, 2, 16, 4
    num_blocks = 10
    k_cache, v_cache = torch.randn(num_blocks, block_size, hkv, d), torch.randn(num_blocks, block_size, hkv, d)
    block_table = torch.tensor([[7, 2, 9, 0], [1, 8, 3, 5]], dtype=torch.int32)
    total = [n + 1 for n in lens]  # prompt + one decoded token
    q, k, v = torch.randn(sum(total), hq, d), torch.randn(sum(total), hkv, d), torch.randn(sum(total), hkv, d)
    starts = [0, total[0]]
    pos = torch.cat([torch.arange(n) for n in total])
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor(total))
    slots = block_table[seq, pos // block_size].long() * block_size + pos % block_size
    is_prompt = torch.cat([torch.arange(n) < n - 1 for n in total])
    # Prefill: the prompt tokens only.
    append_kv(k_cache, v_cache, k[is_prompt], v[is_prompt], slots[is_prompt], impl="triton")
    # Decode: the new token of each sequence (one append, one paged attention).
    new = ~is_prompt
    append_kv(k_cache, v_cache, k[new], v[new], slots[new], impl="triton")
    out = paged_attention(q[new], k_cache, v_cache, block_table, torch.tensor(total, dtype=torch.int32), impl="triton")
    cu = torch.tensor([0, total[0], sum(total)], dtype=torch.int32)
    full = varlen_attention(q, k, v, cu, cu, max(total), max(total), impl="torch")
    torch.testing.assert_close(out, full[[s + n - 1 for s, n in zip(starts, total)]], rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    k_cache = torch.randn(4, 8, 2, 16)
    q, table, lens = torch.randn(2, 4, 16), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table must be int32"):
        paged_attention(q, k_cache, k_cache, table.long(), lens)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        paged_attention(q, k_cache, k_cache, table, lens[:1])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        paged_attention(torch.randn(2, 3, 16), k_cache, k_cache, table, lens)
    with pytest.raises(ValueError, match="v_cache"):
        paged_attention(q, k_cache, k_cache[:2], table, lens)
    with pytest.raises(ValueError, match="k_cache must be"):
        paged_attention(q, k_cache[0], k_cache[0], table, lens)
    with pytest.raises(ValueError, match="has no backward"):
        paged_attention(q.requires_grad_(), k_cache, k_cache, table, lens)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        append_kv(k_cache, k_cache.clone(), torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"append_kv: v must be \[T, 2, 16\]"):
        append_kv(k_cache, k_cache.clone(), torch.randn(3, 2, 16), torch.randn(3, 2, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"append_kv: k \(torch.float64"):
        append_kv(k_cache, k_cache.clone(), torch.randn(3, 2, 16).double(), torch.randn(3, 2, 16),
                  torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("case, dtype", [(CASES[1], torch.bfloat16), (CASES[3], torch.bfloat16),
                                         (CASES[1], torch.float16)])
def test_low_precision_within_twice_torch_error(case, dtype):
    """bf16/fp16 under the interpreter (triton_base's dot/cast "upcast" mode), split-K
    included: the error against the float64 truth on the same cache stays within twice the
    torch backend's in the same dtype."""
    lens, hq, hkv, d, block_size, window, softcap, num_splits = case
    torch.manual_seed(0)
    k_cache, v_cache, block_table, keys, values = make_cache(lens, hkv, d, block_size, dtype=dtype)
    q = torch.randn(len(lens), hq, d, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 0.8 / d**0.5
    ours = pa.paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=scale, window=window,
                                  softcap=softcap, num_splits=num_splits, out=torch.full_like(q, float("nan")))
    theirs = paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=scale, window=window,
                             softcap=softcap, impl="torch")
    want = dense_decode(q, keys, values, scale=scale, window=window, softcap=softcap)
    assert ours.dtype == dtype
    err = (ours.double() - want).norm() / want.norm()
    err_torch = (theirs.double() - want).norm() / want.norm()
    assert err <= 2 * err_torch + 1e-4, (err.item(), err_torch.item())

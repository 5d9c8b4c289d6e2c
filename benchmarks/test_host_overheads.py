"""Host-side overheads, timed with pytest-benchmark:
``python -m pytest benchmarks/test_host_overheads.py --benchmark-json=out.json``."""
import torch

from engine.models import PackedBatch


def _documents(n_docs: int, max_len: int, vocab: int = 128256):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, max_len + 1, (n_docs,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_pack_64_documents(benchmark):
    docs = _documents(64, 2048)
    batch = benchmark(PackedBatch.from_sequences, docs, vocab_size=128256)
    assert batch.num_tokens == sum(map(len, docs))


def test_pack_1024_short_documents(benchmark):
    docs = _documents(1024, 64)
    batch = benchmark(PackedBatch.from_sequences, docs, vocab_size=128256)
    assert batch.cu_seqlens.numel() == 1025

"""Run by tests/test_infer_tp.py under torchrun: every rank loads its shard and calls
serve_tp; rank 0 samples and scores, then closes, which releases the other rank.
Usage: torchrun ... SCRIPT CHECKPOINT OUT_FILE"""
import sys

import torch

from engine.infer import SamplingParams, serve_tp
from engine.parallel import init_distributed, load_tp_model
from tests.test_infer_tp import PROMPTS
from tests.test_tensor_parallel import end_torchrun_script

folder, out = sys.argv[1], sys.argv[2]
ctx = init_distributed(timeout_s=60)
engine = serve_tp(load_tp_model(folder, ctx.group), max_batch_size=16, block_size=4, kv_cache_tokens=256)
if ctx.rank == 0:
    with engine:
        greedy = [engine.sample(p, 2, SamplingParams(max_tokens=6, temperature=0.0)) for p in PROMPTS]
        scored = engine.compute_logprobs(PROMPTS[1])
        result = {"tokens": [[s.tokens for s in f.result(timeout=60).sequences] for f in greedy],
                  "logprobs": scored.result(timeout=60)[1:], "tp": engine.tp}
    torch.save(result, out)
else:
    assert engine is None
end_torchrun_script()  # shutdown(): frees the group, joins gloo's threads before the interpreter exits

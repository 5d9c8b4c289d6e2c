"""Run by tests/test_tensor_parallel.py under torchrun: the same setup code as WorkerPool's
workers, with ranks launched by torchrun. Usage: torchrun ... SCRIPT CHECKPOINT OUT_FILE"""
import sys

import torch

from engine.parallel import init_distributed, load_tp_model
from tests.test_tensor_parallel import _batch, _loss, end_torchrun_script

folder, out = sys.argv[1], sys.argv[2]
ctx = init_distributed(timeout_s=60)
model = load_tp_model(folder, ctx.group)
batch, targets = _batch(model.config.vocab_size)
loss = _loss(model, batch, targets)[3]
loss.backward()
if ctx.rank == 0:
    torch.save({"loss": loss.detach(), "world": ctx.world_size}, out)
end_torchrun_script()  # shutdown(): frees the group, joins gloo's threads before the interpreter exits

"""Run by tests/test_data_parallel.py under torchrun (one or several nodes): dp × tp
training with the same per-rank setup code as the builder's workers, each rank launched
by torchrun. Usage: torchrun ... SCRIPT TP CHECKPOINT OUT_FOLDER"""
import sys
from pathlib import Path

import torch

from engine.parallel import init_distributed
from engine.train.remote import setup_rank
from tests.test_data_parallel import ADAM, STEPS, _custom, _data
from tests.test_tensor_parallel import end_torchrun_script

tp, folder, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
ctx = init_distributed(timeout_s=60, tp=tp)  # a (world / tp, tp) DeviceMesh
trainer = setup_rank(ctx, folder, torch.float32, None, False, False, 24)
result = {"loss": [], "grad_norm": [], "world": ctx.world_size, "dp": ctx.dp}


def batch(seed):
    return [(d.model_input.to_ints(), {k: v.to_torch() for k, v in d.loss_fn_inputs.items()}) for d in _data(seed)]


for step in range(STEPS):
    _, metrics = trainer.run(batch(step), "cross_entropy", None, True)
    result["loss"].append(metrics["loss:sum"])
    if step == 1:  # as the test's _train does
        result["loss"].append(trainer.forward_backward_custom(batch(7), _custom)[1]["loss:sum"])
    hyper = (ADAM.learning_rate, ADAM.beta1, ADAM.beta2, ADAM.eps, ADAM.weight_decay, ADAM.grad_clip_norm)
    result["grad_norm"].append(trainer.optim_step(*hyper)["grad_norm"])
trainer.save_for_sampler(Path(folder), out / "export")  # one HF folder, written by the first rank
if ctx.rank == 0:
    torch.save(result, out / "result.pt")
del trainer
end_torchrun_script()  # shutdown(): frees the groups, joins gloo's threads before the interpreter exits

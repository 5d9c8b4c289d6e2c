"""Data × tensor parallelism on CPU (gloo): dp2×tp2 (4 processes) and dp2×tp1 against one
process on the same global batch, an empty share, states resharded between layouts, the
same training script under two torchrun invocations meeting at one rendezvous, and Ray."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.train.data_parallel import owners, split_over_ranks

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1031  # the tiny presets' vocabulary
LENGTHS = (7, 1, 19, 12, 3, 9)
ADAM = engine.AdamParams(5e-3, weight_decay=0.01, grad_clip_norm=0.5)
BF16_ADAM = engine.AdamParams(1e-4, weight_decay=0.01, grad_clip_norm=0.5)
STEPS = 3


def _data(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(0, VOCAB, (n + 1,), generator=g)
        inputs = {"target_tokens": tokens[1:].tolist(), "weights": torch.rand(n, generator=g)}
        out.append(engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), inputs))
    return out


def _train(trainer, folder: Path) -> dict:
    """STEPS AdamW steps on one global batch: losses, gradient norms, the weights after
    (exported for a sampler: one PEFT or HF folder), a save_state, and the outputs of a
    forward of one datum (an empty share on one replica when dp = 2)."""
    out = {"loss": [], "grad_norm": []}
    for step in range(STEPS):
        fb = trainer.forward_backward(_data(step), "cross_entropy").result()
        out["loss"].append(fb.metrics["loss:sum"])
        if step == 1:  # the user's loss runs in the caller, the fused passes on every replica's share
            custom = trainer.forward_backward_custom(_data(7), _custom).result()
            out["loss"].append(custom.metrics["loss:sum"])
        out["grad_norm"].append(trainer.optim_step(ADAM).result().metrics["grad_norm"])
    out["logprobs"] = fb.loss_fn_outputs[2]["logprobs"].to_torch()
    export = Path(trainer.save_weights_for_sampler(folder / "export").result().path)
    out["weights"] = load_file(str(next(export.glob("*.safetensors"))))
    out["state"] = trainer.save_state(folder / "state").result().path
    lone = _data(9, (13,))
    out["lone"] = trainer.forward(lone, "cross_entropy").result()
    out["lone_fb"] = trainer.forward_backward(lone, "cross_entropy").result().metrics["loss:sum"]
    out["lone_norm"] = trainer.optim_step(engine.AdamParams(0.0)).result().metrics["grad_norm"]
    return out


def _custom(data, logprobs):
    return sum((lp ** 2).sum() for lp in logprobs) * 1e-3, {}


def _builder(folder, lora, tp=1, dp=1):
    b = engine.model(folder).tp(tp).dp(dp)
    return b.with_adapter(rank=4, alpha=8) if lora else b


def _close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def _check_sampler(tm):
    """A sampling client of the trainer (an exported snapshot for full weights; the
    trainer's own ranks serving the adapter for LoRA, every replica running each step alike)
    gives the trainer's logprobs and samples."""
    datum = _data(11, (8,))[0]
    tokens = datum.model_input.to_ints() + [datum.loss_fn_inputs["target_tokens"].tolist()[-1]]
    trained = tm.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    client = tm.save_weights_and_get_sampling_client()
    torch.testing.assert_close(torch.tensor(client.compute_logprobs(tokens).result()[1:]), trained.float(),
                               rtol=1e-4, atol=1e-4)
    out = client.sample(datum.model_input, 2, engine.SamplingParams(max_tokens=3, seed=1)).result()
    assert [len(s.tokens) for s in out.sequences] == [3, 3]
    client.close()


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """One process on the same batches, per (lora)."""
    cache = {}

    def get(lora):
        if lora not in cache:
            tm = _builder(checkpoint("qwen3"), lora).spawn_train(max_batch_size=24)
            try:
                cache[lora] = _train(tm, tmp_path_factory.mktemp("ref"))
            finally:
                tm.close()
        return cache[lora]
    return get


def test_split_over_ranks_balances_tokens():
    shares = split_over_ranks([7, 1, 19, 12, 3, 9], 2, 24)
    assert sorted(i for s in shares for i in s) == list(range(6))
    loads = [sum([7, 1, 19, 12, 3, 9][i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 3, loads
    assert split_over_ranks([5], 2, 24) == [[0], []]  # an empty share
    assert split_over_ranks([4, 4, 9, 1], 2, 24, group=2) in ([[0, 1], [2, 3]], [[2, 3], [0, 1]])  # pairs stay
    assert split_over_ranks([30, 5], 2, 24) == [[1], [0]]  # over the budget: dropped by its rank, costs 0
    assert owners([10, 1, 9, 2], 2) == [0, 0, 1, 1]  # 10 | 9, then 2 -> rank 1 (9), 1 -> rank 0 (10)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dp, tp", [(2, 2), (2, 1)], ids=["dp2xtp2", "dp2xtp1"])
def test_dp_tp_equals_one_process(checkpoint, reference, tmp_path, lora, dp, tp):
    """Losses, gradient norms and weights after 3 AdamW steps as one process; a lone datum
    (one replica's share empty); the state resharded both ways: saved at (dp, tp), loaded
    in one process, and saved by one process, loaded at (dp, tp)."""
    folder = checkpoint("qwen3")
    ref = reference(lora)
    tm = _builder(folder, lora, tp, dp).spawn_train(max_batch_size=24)
    try:
        assert (tm.get_info().tp, tm.get_info().dp) == (tp, dp)
        got = _train(tm, tmp_path)
        for key in ("loss", "grad_norm", "logprobs", "lone_fb", "lone_norm"):
            _close(got[key], ref[key], key)
        _close(got["lone"].loss_fn_outputs[0]["logprobs"].to_torch(),
               ref["lone"].loss_fn_outputs[0]["logprobs"].to_torch(), "forward")
        assert got["weights"].keys() == ref["weights"].keys()
        for name, w in ref["weights"].items():
            _close(got["weights"][name], w, name)
        _check_sampler(tm)
        # (1, 1) -> (dp, tp): the reference's state continues here as it did there.
        tm.load_state_with_optimizer(ref["state"]).result()
        after = tm.forward_backward(_data(5), "cross_entropy").result().metrics["loss:sum"]
        norm = tm.optim_step(ADAM).result().metrics["grad_norm"]
    finally:
        tm.close()
    one = _builder(folder, lora).spawn_train(max_batch_size=24)
    try:  # (dp, tp) -> (1, 1)
        one.load_state_with_optimizer(got["state"]).result()
        assert one.get_info().step == STEPS
        ref_after = one.forward_backward(_data(5), "cross_entropy").result().metrics["loss:sum"]
        _close(norm, one.optim_step(ADAM).result().metrics["grad_norm"], "grad_norm after the resharded load")
        _close(after, ref_after, "loss after the resharded load")
    finally:
        one.close()


def _bf16_run(tm, folder: Path) -> tuple[dict, dict]:
    """STEPS AdamW steps of bf16 full fine-tuning: (losses and gradient norms, the saved
    state's tensors: fp32 masters and moments)."""
    out = {"loss": [], "grad_norm": []}
    for step in range(STEPS):  # sequences over half the budget: one micro-batch each, at any dp
        fb = tm.forward_backward(_data(step, (13, 17, 11, 19)), "cross_entropy").result()
        out["loss"].append(fb.metrics["loss:sum"])
        out["grad_norm"].append(tm.optim_step(BF16_ADAM).result().metrics["grad_norm"])
    state = Path(tm.save_state(folder / "state").result().path)
    return out, load_file(str(next(state.glob("state-*.safetensors"))))


def test_dp2_bf16_master_weights_equal_one_process(checkpoint, tmp_path):
    """ZeRO-1 with fp32 masters: the owner steps a master, every replica rounds the same
    one. Losses, gradient norms and the saved masters and moments as one process (each
    micro-batch's bf16 gradient alike; only the fp32 sums' order differs); the one-process
    state loaded at dp=2 continues as it does in one process. At lr 1e-4 (updates near a
    bf16 step, where masters matter) no weight rounds differently; at 5e-3 one rounding
    flipped by the sums' order spreads through the bf16 forward (1e-4 after 3 steps)."""
    b = engine.model(checkpoint("qwen3")).dtype("bfloat16")
    one = b.spawn_train(max_batch_size=20)
    ref, ref_state = _bf16_run(one, tmp_path / "one")
    tm = b.dp(2).spawn_train(max_batch_size=20)
    try:
        assert tm.get_info().master_weights
        got, state = _bf16_run(tm, tmp_path / "dp2")
        _close(got["loss"], ref["loss"], "loss")
        _close(got["grad_norm"], ref["grad_norm"], "grad_norm")
        assert state.keys() == ref_state.keys()
        for key, t in ref_state.items():
            assert state[key].dtype == t.dtype, key
            _close(state[key], t, key)
        assert state["weights.embed.weight"].dtype == torch.float32  # masters, not the bf16 weights
        tm.load_state_with_optimizer(str(tmp_path / "one" / "state")).result()  # (1, 1) -> (2, 1)
        after = [tm.forward_backward(_data(5, (13, 17, 11, 19)), "cross_entropy").result().metrics["loss:sum"],
                 tm.optim_step(BF16_ADAM).result().metrics["grad_norm"]]
    finally:
        tm.close()
    ref_after = [one.forward_backward(_data(5, (13, 17, 11, 19)), "cross_entropy").result().metrics["loss:sum"],
                 one.optim_step(BF16_ADAM).result().metrics["grad_norm"]]
    _close(after, ref_after, "loss and grad_norm after the resharded load")


def _torchrun(node_rank: int, port: int, folder, out: Path) -> subprocess.Popen:
    """One of two torchrun invocations (a "node" of 2 processes) meeting at a loopback
    rendezvous: what ``--nnodes 2`` runs on two machines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
           "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "engine-dp-test", str(ROOT / "tests" / "torchrun_dp_script.py"), "2", str(folder), str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_node_torchrun_dp2_tp2_equals_one_process(checkpoint, reference, tmp_path):
    from engine.parallel.workers import free_port

    port = free_port()
    nodes = [_torchrun(r, port, checkpoint("qwen3"), tmp_path) for r in (0, 1)]
    logs = []
    for proc in nodes:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        finally:
            proc.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    got, ref = torch.load(tmp_path / "result.pt"), reference(False)
    assert (got["world"], got["dp"]) == (4, 2)
    _close(got["loss"], ref["loss"], "loss")
    _close(got["grad_norm"], ref["grad_norm"], "grad_norm")
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert weights.keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        _close(weights[name], w, name)


def test_ray_tp2_equals_one_process(checkpoint, reference, tmp_path):
    """``ray.init`` called: spawn_train places its ranks as Ray actors in a placement group
    (here a local Ray cluster) and trains as one process does; an error on one rank fails
    its call alone, naming the rank."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'engine[ray]'")
    from engine.parallel import RayWorkerPool, WorkerError

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tm = _builder(checkpoint("qwen3"), False, tp=2).spawn_train(max_batch_size=24)
        try:
            pool = tm._trainer.pool
            assert isinstance(pool, RayWorkerPool) and pool.world == 2
            from engine.train.remote import _call

            with pytest.raises(WorkerError, match="rank 1 raised FileNotFoundError: .*no such folder") as err:
                pool.run(_call, "load_state", tmp_path / "missing", False)
            assert not err.value.pool_closed  # every rank answered: that call alone failed
            got = _train(tm, tmp_path)
        finally:
            tm.close()
    finally:
        ray.shutdown()
    ref = reference(False)
    for key in ("loss", "grad_norm", "logprobs", "lone_fb"):
        _close(got[key], ref[key], key)
    for name, w in ref["weights"].items():
        _close(got["weights"][name], w, name)


def test_layout_errors_name_the_option(checkpoint):
    from engine.parallel import check_layout

    folder = checkpoint("qwen3")
    with pytest.raises(ValueError, match="dp must be a positive int, got 0"):
        engine.model(folder).dp(0).spawn_train(max_batch_size=24)
    with pytest.raises(ValueError, match="launcher must be one of"):
        engine.model(folder).dp(2).spawn_train(max_batch_size=24, launcher="mpi")
    with pytest.raises(ValueError, match="dp=2 is for training"):
        engine.model(folder).dp(2).spawn_inference()
    with pytest.raises(ValueError, match="tp=3 does not divide the world size 4"):
        check_layout(4, 3)
    assert check_layout(8, 2) == 4

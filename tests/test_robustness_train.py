"""Training that loses nothing and is poisoned by nothing (CPU; tp=2 over gloo).

An error fails its own call and leaves the model usable, at any tp; non-finite inputs and
bad hyperparameters are refused, a non-finite gradient skips the step; a state on disk is
committed at once (a save killed half-way leaves the previous state or a clear refusal),
loaded all-or-nothing and strictly; checkpoint names stay inside ``checkpoint_dir``; the
temporaries of a crashed save are removed; a dead rank heads its ``WorkerError``.
"""
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import engine
from engine.parallel import WorkerError, WorkerPool

VOCAB = 1031  # the tiny presets' vocabulary
KILL_TRIALS = 3


def _batch(seed=0, lengths=(6, 2, 11), loss="cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(0, VOCAB, (n + 1,), generator=g)
        inputs = {"target_tokens": tokens[1:]}
        if loss == "cross_entropy":
            inputs["weights"] = torch.rand(n, generator=g) + 0.5
        else:
            inputs["logprobs"] = -2 - torch.rand(n, generator=g)
            inputs["advantages"] = torch.randn(n, generator=g)
        out.append(engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), inputs))
    return out


def _loss(tm, data):
    return tm.forward(data, "cross_entropy").result().metrics["loss:sum"]


def _snapshot(tm):
    """Weights, gradients and AdamW state of a tp=1 model."""
    t = tm._trainer
    state = {n: {k: v.clone() for k, v in t.optimizer.state.get(p, {}).items()} for n, p in t.params}
    return ({n: p.detach().clone() for n, p in t.params}, {n: p.grad for n, p in t.params}, state)


def _assert_same_weights(tm, weights):
    for n, p in tm._trainer.params:
        assert torch.equal(p.detach(), weights[n]), n


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def tp2(checkpoint):
    """One tp=2 model (full fine-tuning) shared by the tp=2 checks."""
    tm = engine.model(checkpoint("qwen2")).tp(2).spawn_train(max_batch_size=64)
    yield tm
    tm.close()


# -- item 9 and the pool's rule: a raise on live ranks fails the call, a death the pool -----------------
def _noop_setup(ctx):
    return None


def _raise_everywhere(state):
    raise ValueError(f"bad value on rank {dist.get_rank()}")


def _rank(state):
    return dist.get_rank()


def _rank1_killed_in_barrier(state):
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 waits for a peer that is gone: gloo's "Connection reset"


def test_pool_survives_errors_and_names_the_dead_rank_first():
    pool = WorkerPool(2, _noop_setup, timeout_s=60)
    try:
        with pytest.raises(WorkerError, match="bad value on rank") as err:
            pool.run(_raise_everywhere)
        assert not err.value.pool_closed
        assert pool.run(_rank) == [0, 1]  # the pool is still usable
        with pytest.raises(WorkerError) as err:
            pool.run(_rank1_killed_in_barrier)
        message = str(err.value)
        assert message.startswith("rank 1 died (killed by SIGKILL)"), message
        assert "resource_sharer" not in message and "Traceback" not in message and len(message) < 600, message
        assert err.value.pool_closed
        with pytest.raises(WorkerError, match="closed"):
            pool.run(_rank)
    finally:
        pool.close()


# -- item 1: an error on the ranks fails its call alone -----------------------------------------------
def test_tp2_errors_fail_their_call_and_leave_the_model_usable(tp2, checkpoint, tmp_path):
    data = _batch(1)
    base = _loss(tp2, data)
    one = engine.model(checkpoint("qwen2")).with_adapter(rank=4).spawn_train(max_batch_size=64)
    lora_state = one.save_state(tmp_path / "lora").result()
    one.close()
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        (lambda: tp2.load_state("/typo"), "typo"),
        (lambda: tp2.save_state(tmp_path / "a_file" / "x"), "a_file"),
        (lambda: tp2.load_state(lora_state), "holds a lora .*this model is full"),
        (lambda: tp2.load_state_with_optimizer(str(tmp_path / "a_file")), "a_file"),
        (lambda: tp2.forward_backward(data, "cross_entropy", {"beta": 1.0}), "unknown key"),
    ]
    for call, match in cases:
        with pytest.raises(Exception, match=match):
            call().result()
        assert _loss(tp2, data) == base  # nothing changed, and the ranks still answer
    tp2.forward_backward(data, "cross_entropy").result()
    tp2.optim_step(engine.AdamParams(1e-2)).result()
    assert _loss(tp2, data) < base


def test_tp2_ranking_batch_of_odd_size_fails_alone(checkpoint):
    tm = engine.model(checkpoint("qwen2")).into_scoring_model().with_adapter(rank=2).tp(2).spawn_train(64)
    try:
        g = torch.Generator().manual_seed(3)
        data = [engine.Datum(engine.ModelInput.from_ints(torch.randint(0, VOCAB, (n,), generator=g).tolist()), {})
                for n in (4, 7, 5)]
        with pytest.raises(ValueError, match="groups of 2"):
            tm.forward_backward(data, "ranking").result()
        out = tm.forward_backward(data[:2], "ranking").result()
        assert math.isfinite(out.metrics["loss:sum"])
    finally:
        tm.close()


# -- item 2: non-finite values ----------------------------------------------------------------------
def test_non_finite_inputs_and_bad_hyperparameters_are_refused(llama):
    tm = engine.model(llama).spawn_train(max_batch_size=64)
    data, rl = _batch(2), _batch(3, loss="ppo")
    tm.forward_backward(data, "cross_entropy").result()  # gradients a bad step would apply
    weights, grads, _ = _snapshot(tm)
    nan_weights = _batch(2)
    nan_weights[1].loss_fn_inputs["weights"].to_torch()[1] = float("nan")
    inf_adv = _batch(3, loss="ppo")
    inf_adv[2].loss_fn_inputs["advantages"].to_torch()[4] = float("inf")
    calls = [
        (lambda: tm.forward_backward(nan_weights, "cross_entropy"), r"data\[1\].loss_fn_inputs\['weights'\]"),
        (lambda: tm.forward_backward(inf_adv, "ppo"), r"data\[2\].loss_fn_inputs\['advantages'\]"),
        (lambda: tm.forward_backward(rl, "ppo", {"clip_high_threshold": float("nan")}),
         r"loss_fn_config\['clip_high_threshold'\]"),
        (lambda: tm.forward(rl, "dro", {"beta": float("inf")}), r"loss_fn_config\['beta'\]"),
    ]
    bad_adam = [dict(learning_rate=float("inf")), dict(learning_rate=1e-3, beta2=1.0),
                dict(learning_rate=1e-3, beta2=float("nan")), dict(learning_rate=1e-3, weight_decay=float("nan")),
                dict(learning_rate=1e-3, beta1=1.0), dict(learning_rate=1e-3, eps=-1e-8),
                dict(learning_rate=1e-3, grad_clip_norm=float("nan")), dict(learning_rate=1e-3, grad_clip_norm=-1.0),
                dict(learning_rate=float("nan"))]
    for kwargs in bad_adam:
        field = next(k for k in kwargs if k != "learning_rate" or len(kwargs) == 1)
        calls.append((lambda kw=kwargs: tm.optim_step(engine.AdamParams(**kw)), rf"adam_params\.{field}"))
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call().result()
    _assert_same_weights(tm, weights)
    for n, p in tm._trainer.params:
        assert torch.equal(p.grad, grads[n]), n


def _nan_loss(data, logprobs):
    return sum(lp.sum() for lp in logprobs) * float("nan"), {}


@pytest.mark.parametrize("tp", [1, 2])
def test_non_finite_gradient_skips_the_step(llama, tp2, tp):
    tm = tp2 if tp == 2 else engine.model(llama).spawn_train(max_batch_size=64)
    data = _batch(4)
    tm.forward_backward(data, "cross_entropy").result()
    first = tm.optim_step(engine.AdamParams(1e-2)).result().metrics  # AdamW state exists from here
    assert first["skipped_nonfinite_grad:sum"] == 0.0
    step, base = tm.get_info().step, _loss(tm, data)
    snap = _snapshot(tm) if tp == 1 else None
    tm.forward_backward_custom(data, _nan_loss).result()
    with pytest.warns(RuntimeWarning, match="optim_step skipped"):
        out = tm.optim_step(engine.AdamParams(0.0)).result().metrics  # lr=0 used to write NaN weights
    assert out["skipped_nonfinite_grad:sum"] == 1.0 and not math.isfinite(out["grad_norm"])
    assert tm.get_info().step == step and _loss(tm, data) == base
    if tp == 1:
        weights, _, state = snap
        _assert_same_weights(tm, weights)
        for n, p in tm._trainer.params:
            assert p.grad is None, n  # the poisoned gradient is gone
            for k, v in tm._trainer.optimizer.state[p].items():
                assert torch.equal(v, state[n][k]), (n, k)
    tm.forward_backward(data, "cross_entropy").result()  # training goes on
    tm.optim_step(engine.AdamParams(1e-2)).result()
    assert _loss(tm, data) < base


# -- item 4: a save killed half-way -----------------------------------------------------------------
def _save_loop(tm, data, saved, saving, errors):
    try:
        while True:
            tm.forward_backward(data, "cross_entropy").result()
            tm.optim_step(engine.AdamParams(1e-3)).result()
            saving.set()
            tm.save_state("loop").result()
            saved.append(tm.get_info().step)
    except Exception as e:  # noqa: BLE001 - the kill ends the loop
        errors.append(e)


def test_tp2_save_killed_mid_loop_loads_consistently_or_refuses(tp2, checkpoint, tmp_path):
    folder, data, rng = checkpoint("qwen2"), _batch(5), random.Random(0)
    for trial in range(KILL_TRIALS):
        ckpts = tmp_path / f"trial{trial}"
        tm = engine.model(folder).tp(2).spawn_train(max_batch_size=64, checkpoint_dir=ckpts)
        victim = (1, 0, 1)[trial % 3]
        saved, saving, errors = [], threading.Event(), []
        loop = threading.Thread(target=_save_loop, args=(tm, data, saved, saving, errors))
        loop.start()
        while len(saved) < 1 + trial and loop.is_alive():
            saving.clear()
            saving.wait(5)
        saving.clear()
        saving.wait(5)  # a save is being dispatched now
        threading.Event().wait(rng.uniform(0.0, 0.01))
        os.kill(tm._trainer.pool._procs[victim].pid, signal.SIGKILL)
        loop.join(60)
        tm.close()
        assert errors and str(errors[0]).startswith(f"rank {victim} died (killed by SIGKILL)"), errors
        hidden = [p.name for p in (ckpts / "loop").iterdir() if p.name.startswith(".")]
        assert all(".engine-tmp-" in name for name in hidden), hidden  # only temporaries the engine knows
        try:
            tp2.load_state_with_optimizer(str(ckpts / "loop")).result()
        except (ValueError, WorkerError) as e:
            assert "commit" in str(e) or "interrupted" in str(e), e
        else:
            assert tp2.get_info().step in (saved[-1], saved[-1] + 1), (saved, tp2.get_info())
        assert not any(".engine-tmp-" in p.name for p in (ckpts / "loop").iterdir())  # removed by the load


def test_tp2_state_with_a_file_from_another_save_is_refused(tp2, tmp_path):
    data = _batch(6)
    a = Path(tp2.save_state(tmp_path / "a").result())
    tp2.forward_backward(data, "cross_entropy").result()
    tp2.optim_step(engine.AdamParams(1e-2)).result()
    b = Path(tp2.save_state(tmp_path / "b").result())
    for target in a.glob("state-*.safetensors"):  # a hand-made mix: the file of the later save
        shutil.copyfile(next(b.glob("state-*.safetensors")), target)
    base = _loss(tp2, data)
    with pytest.raises((ValueError, WorkerError), match="belongs to save"):
        tp2.load_state_with_optimizer(str(a)).result()
    assert _loss(tp2, data) == base  # nothing was loaded on either rank
    for marker in a.glob("*.json"):
        marker.unlink()
    with pytest.raises((ValueError, WorkerError), match="commit"):
        tp2.load_state(str(a)).result()
    tp2.load_state_with_optimizer(str(b)).result()
    assert _loss(tp2, data) == base


# -- item 5: load_state validates everything, then copies, then zeroes gradients ------------------------
def _rewrite(folder: Path, change) -> Path:
    """A copy of a saved state whose weights file went through ``change(tensors, metadata)``."""
    out = folder.with_name(folder.name + "-changed")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    (file,) = out.glob("*.safetensors")
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(file), metadata=meta)
    return out


def _last_weight(tensors):
    return sorted(k for k in tensors if k.startswith("weights."))[-1]


def test_load_state_is_strict_and_all_or_nothing(llama, tmp_path):
    data = _batch(7)
    build = lambda **kw: engine.model(llama).with_adapter(rank=4, **kw).spawn_train(max_batch_size=64)  # noqa: E731
    src = build()
    src.forward_backward(data, "cross_entropy").result()
    src.optim_step(engine.AdamParams(1e-2)).result()
    saved = Path(src.save_state(tmp_path / "all").result())

    for other, match in ((build(target_modules=["q_proj", "v_proj"]), "target"),
                         (engine.model(llama).with_adapter(rank=2, alpha=8).spawn_train(64), "rank 4")):
        weights, _, _ = _snapshot(other)
        with pytest.raises(ValueError, match=match):
            other.load_state(str(saved)).result()
        _assert_same_weights(other, weights)

    dst = build(alpha=8)  # a different starting point than src
    dst.forward_backward(data, "cross_entropy").result()
    dst.optim_step(engine.AdamParams(5e-2)).result()
    weights, _, _ = _snapshot(dst)

    def reshape_last(t, m):
        k = _last_weight(t)
        t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])

    def opt_shape(t, m):
        k = sorted(k for k in t if k.endswith(".exp_avg"))[-1]
        t[k] = t[k][:-1].clone()

    def cast_last(t, m):
        t[_last_weight(t)] = t[_last_weight(t)].double()

    changes = [
        (lambda t, m: t.__setitem__("weights.nope", torch.zeros(3)), "weights.nope"),
        (lambda t, m: t.pop(_last_weight(t)), "missing"),
        (reshape_last, "shape"),
        (opt_shape, "exp_avg"),
        (cast_last, "dtype"),
        (lambda t, m: m.__setitem__("step", "-1"), "step"),
        (lambda t, m: t.__setitem__("optimizer.nope.exp_avg", torch.zeros(3)), "optimizer.nope"),
    ]
    for change, match in changes:
        with pytest.raises((ValueError, WorkerError), match=match):
            dst.load_state_with_optimizer(str(_rewrite(saved, change))).result()
        _assert_same_weights(dst, weights)
    assert dst.get_info().step == 1

    dst.forward_backward(data, "cross_entropy").result()  # a stray gradient from before the load
    dst.load_state(str(saved)).result()
    assert all(p.grad is None for _, p in dst._trainer.params)
    weights, _, _ = _snapshot(src)
    _assert_same_weights(dst, weights)


# -- item 7: checkpoint names -----------------------------------------------------------------------
def test_checkpoint_names_stay_inside_checkpoint_dir(llama, tmp_path, monkeypatch):
    work = tmp_path / "work" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    ckpts = tmp_path / "ckpts"
    tm = engine.model(llama).with_adapter(rank=2).spawn_train(max_batch_size=32, checkpoint_dir=ckpts)
    for bad in ("../x", "a/b", "..", "a/../b", "", ".", Path(".."), Path("/"), "/"):  # "/" last: it once wrote /state.safetensors
        for call in (tm.save_state, tm.save_weights_for_sampler):
            with pytest.raises(ValueError, match="name"):
                call(bad).result()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cwd"] and not list(work.iterdir())
    assert Path(tm.save_state("ok").result()) == ckpts / "ok"
    assert Path(tm.save_weights_for_sampler("adapter").result()) == ckpts / "adapter"
    assert Path(tm.save_state(tmp_path / "explicit").result()) == tmp_path / "explicit"
    assert Path(tm.save_state(str(tmp_path / "absolute")).result()) == tmp_path / "absolute"
    tm.load_state("ok").result()  # a bare name is looked up inside checkpoint_dir too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["absolute", "ckpts", "explicit", "work"]


# -- item 8: temporaries of crashed saves ---------------------------------------------------------------
def test_stale_temporaries_are_removed_on_save_and_load(llama, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "state"
    folder.mkdir()

    def plant():
        (folder / f".state.json.engine-tmp-{dead.pid}").write_text("{")
        stale_dir = folder / f".state-x.safetensors.engine-tmp-{dead.pid}"
        stale_dir.mkdir(exist_ok=True)
        (stale_dir / ".tmpQx7b2a").write_bytes(b"\0" * 8)

    live = folder / f".state.json.engine-tmp-{os.getppid()}"  # a writer that is still running
    foreign = folder / ".tmpforeign"  # not the engine's
    plant()
    live.write_text("{")
    foreign.write_text("x")
    tm = engine.model(llama).with_adapter(rank=2).spawn_train(max_batch_size=32)
    tm.save_state(folder).result()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == sorted([live.name, foreign.name])
    plant()
    tm.load_state(str(folder)).result()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == sorted([live.name, foreign.name])


def test_non_numeric_loss_inputs_and_empty_target_modules_are_refused(llama):
    """Issue 15 item 10, training side: ``weights=["a", ...]`` gave "too many dimensions
    'str'"; ``target_modules=[]`` silently adapted every layer."""
    tm = engine.model(llama).spawn_train(max_batch_size=64)
    data = _batch(4)
    data[1].loss_fn_inputs["weights"] = ["a"] * data[1].loss_fn_inputs["target_tokens"].shape[0]
    with pytest.raises(ValueError, match=r"data\[1\].loss_fn_inputs\['weights'\] must hold numbers"):
        tm.forward_backward(data, "cross_entropy").result()
    assert math.isfinite(_loss(tm, _batch(4)))  # still usable
    tm.close()
    with pytest.raises(ValueError, match=r"target_modules=\[\] names no layer"):
        engine.model(llama).with_adapter(rank=4, target_modules=[])

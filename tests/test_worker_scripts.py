"""Workers that forgive user scripts (issue 18, item 3): scripts run as ``python script.py``
need no ``if __name__ == "__main__":`` guard, a worker that cannot start says why, and a
killed rank fails the pool at once, naming it, with no process left behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import engine
from engine.parallel import WorkerError, WorkerPool

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1031  # the tiny presets' vocabulary


def _run_script(tmp_path, source: str, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_script_without_main_guard_trains_at_tp2(checkpoint, tmp_path):
    """The script a new user writes first: top-level spawn_train at tp=2, no guard. Its
    loss and the next step's equal tp=1's in the same script."""
    result = _run_script(tmp_path, """
        import sys
        import torch
        import engine

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 1031, (24,), generator=g)
        data = [engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), {"target_tokens": tokens[1:]})]
        losses = []
        for tp in (2, 1):
            trainer = engine.model(sys.argv[1]).tp(tp).spawn_train(max_batch_size=64)
            first = trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
            trainer.optim_step(engine.AdamParams(learning_rate=1e-2)).result()
            second = trainer.forward(data, "cross_entropy").result().metrics["loss:sum"]
            trainer.close()
            losses.append((first, second))
        print("LOSSES", losses)
        assert abs(losses[0][0] - losses[1][0]) < 1e-4 * abs(losses[1][0]), losses
        assert abs(losses[0][1] - losses[1][1]) < 1e-4 * abs(losses[1][1]), losses
        assert losses[0][1] < losses[0][0], losses
        """, checkpoint("llama"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "LOSSES" in result.stdout


def test_worker_that_cannot_start_says_why(tmp_path, monkeypatch, assert_no_children):
    """A setup function the workers cannot import (here: a module on the caller's path at
    import time only) fails the pool with the worker's own words, and stops every rank."""
    (tmp_path / "vanishing_module.py").write_text("def setup(ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_module

    sys.path.remove(str(tmp_path))
    with pytest.raises(WorkerError) as err:
        WorkerPool(2, vanishing_module.setup, timeout_s=30)
    message = str(err.value)
    assert message.startswith("rank 0 died (exit code 1)"), message
    assert "No module named 'vanishing_module'" in message and "importable module" in message, message
    assert err.value.pool_closed
    assert_no_children()


def _pids(trainer) -> list[int]:
    return [proc.pid for proc in trainer._trainer.pool._procs]


def test_killed_rank_fails_within_seconds_and_a_new_spawn_works(checkpoint, assert_no_children):
    folder = checkpoint("llama")
    trainer = engine.model(folder).tp(2).spawn_train(max_batch_size=64)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    data = [engine.Datum(engine.ModelInput.from_ints(t[:-1].tolist()), {"target_tokens": t[1:]}) for t in tokens]
    before = trainer.forward(data, "cross_entropy").result().metrics["loss:sum"]
    os.kill(_pids(trainer)[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError) as err:
        trainer.forward_backward(data, "cross_entropy").result()
    assert time.monotonic() - start < 10
    assert str(err.value).startswith("rank 1 died (killed by SIGKILL)"), str(err.value)
    assert err.value.pool_closed
    assert_no_children()
    trainer.close()

    again = engine.model(folder).tp(2).spawn_train(max_batch_size=64)
    try:
        after = again.forward(data, "cross_entropy").result().metrics["loss:sum"]
        assert after == pytest.approx(before, rel=1e-6)
    finally:
        again.close()
    assert_no_children()


def test_workers_exit_when_their_caller_is_killed(checkpoint, tmp_path):
    """A caller killed outright closes nothing: its workers notice they are orphaned and exit."""
    (tmp_path / "pids").mkdir()
    script = f"""
        import os, sys, time
        import engine

        trainer = engine.model(sys.argv[1]).tp(2).spawn_train(max_batch_size=64)
        pids = [p.pid for p in trainer._trainer.pool._procs]
        open(sys.argv[2], "w").write(" ".join(map(str, pids)))
        time.sleep(600)
        """
    path = tmp_path / "caller.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "pids" / "workers.txt"
    caller = subprocess.Popen([sys.executable, str(path), str(checkpoint("llama")), str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_file() and out.read_text()) and time.monotonic() < deadline:
            assert caller.poll() is None, caller.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        workers = [psutil.Process(int(pid)) for pid in out.read_text().split()]
    finally:
        caller.kill()
        caller.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive

"""Every Triton kernel the ops launch, compiled for an H100 (sm_90) exactly as its launcher
launches it, within the H100's resources (``python -m kernels.launch_check``): the
interpreter that runs the numeric tests sees no compile errors, shared memory or spills."""
import os
import subprocess
import sys
from pathlib import Path


def test_launch_check(capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "kernels.launch_check"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    with capsys.disabled():  # the table goes to the terminal (CI's log), pass or fail
        print("\n" + proc.stdout)
    failing = [line for line in proc.stdout.splitlines() if "FAIL: " in line]
    assert proc.returncode == 0, "\n".join(failing + proc.stdout.splitlines()[-1:]) + "\n" + proc.stderr[-3000:]

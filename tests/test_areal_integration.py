"""AReaL 1.0.4's own classes driving engine.integrations.areal (the cases are in
tests/areal_cases.py). AReaL pins torch<2.11, so it and the modules it imports are installed
with --no-deps into a folder of their own, once per version of tests/areal_requirements.txt
(``$ENGINE_AREAL_SITE``, default ~/.cache/engine-areal-site: about 900 MB, two minutes from
the package index), and the cases run in a pytest process of their own with that folder first
on sys.path, so that nothing of AReaL's (its antlr4, uvloop's event loop policy) reaches the
rest of the suite."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "tests" / "areal_requirements.txt"


def areal_site() -> Path:
    """The folder holding AReaL and its modules, installed when absent or stale."""
    site = Path(os.environ.get("ENGINE_AREAL_SITE", Path.home() / ".cache" / "engine-areal-site"))
    stamp = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    if (site / ".stamp").is_file() and (site / ".stamp").read_text().strip() == stamp:
        return site
    tmp = site.with_name(site.name + f".engine-tmp-{os.getpid()}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), "-r", str(REQUIREMENTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not install AReaL ({' '.join(cmd[2:])}): {proc.stderr.strip()[-400:]}")
    (tmp / ".stamp").write_text(stamp)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    return site


@pytest.mark.timeout(2400)  # a first run downloads and installs AReaL's ~900 MB (at most 1200 s allowed)
def test_areal_engines():
    site = areal_site()
    env = dict(os.environ, ENGINE_AREAL_SITE=str(site),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/areal_cases.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], \
        proc.stdout[-6000:] + proc.stderr[-3000:]

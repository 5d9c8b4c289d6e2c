"""Decisions outside the step (issue 16, items 4 and 5), on the CPU: the per-device config
table, its forced override and heuristic fallback, as the launchers resolve them; the
sweep plan of benchmarks/tune.py and the step plan of benchmarks/gpu_check.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.lora_triton as lora_triton
import kernels.lowrank_gemm as lowrank_gemm
from kernels import configs, fused_ops, linear_logprobs_triton, lora_linear, varlen_attention_triton
from kernels.lora import lora_linear_torch
from kernels.triton_base import dot_block

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "Test GPU 80GB"
paged = sys.modules["kernels.paged_attention"]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """table(entries) writes a table for DEVICE in a temporary folder and makes every
    device (CPU tensors too) resolve to it."""
    monkeypatch.setenv(configs.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(configs, "device_name", lambda device: DEVICE)

    def write(entries):
        data = {"device": DEVICE, "torch": None, "triton": None, "date": None, "note": "test", "entries": entries}
        (tmp_path / configs.file_name(DEVICE)).write_text(json.dumps(data))
        configs.reload()

    yield write
    configs.reload()


def _cpu_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}


def test_file_names_and_shipped_tables_are_empty():
    assert configs.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert configs.file_name("NVIDIA H200") == "NVIDIA_H200.json"
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        data = json.loads((configs.DIR / configs.file_name(name)).read_text())
        assert data["device"] == name and data["torch"] is None and data["triton"] is None
        assert data["entries"] == {} and "tune.py" in data["note"]


def test_table_entry_changes_the_lora_scheme(table, monkeypatch):
    """Without an entry lora_linear takes the cuBLAS scheme; an entry for the forward's
    class makes it launch the fused GEMM (under the interpreter), with the same result."""
    calls = []
    original = lora_triton.gemm_lowrank
    monkeypatch.setattr(lora_triton, "gemm_lowrank", lambda *a: calls.append(a[-1]) or original(*a))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 48, generator=g), torch.randn(40, 48, generator=g)
    a, b = torch.randn(5, 48, generator=g), torch.randn(40, 5, generator=g)
    ref = lora_linear_torch(x, w, a, b, 0.5)
    table({})
    torch.testing.assert_close(lora_linear(x, w, a, b, 0.5, impl="triton"), ref, rtol=1e-4, atol=1e-4)
    assert calls == []
    cls = lowrank_gemm.shape_class("fwd", 37, 40, 48, dot_block(5), torch.float32, (False,),
                                   lowrank_gemm.tma_ok(x, w))
    assert cls.startswith("kind=fwd,m=64,n=40,k=48,r=16,dtype=float32,flags=0,tma=")
    table({"lora.gemm": {cls: [128, 128, 64, 4, 4, False]}})
    torch.testing.assert_close(lora_linear(x, w, a, b, 0.5, impl="triton"), ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1 and calls[0][5] is False  # the interpreter's small tiles of that config


def test_table_entries_forced_and_heuristics(table):
    heuristic = varlen_attention_triton.config("fwd", 128, torch.bfloat16)
    cpu = torch.device("cpu")
    table({})
    assert varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, True, cpu) == heuristic
    entry = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    cls = varlen_attention_triton.shape_class(128, torch.bfloat16, True)
    assert cls == "d=128,dtype=bfloat16,causal=1"
    table({"varlen_attention.fwd": {cls: entry}})
    assert varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, True, cpu) == entry
    assert varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, False, cpu) == heuristic  # other class
    forced = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    with configs.forced({"varlen_attention.fwd": forced}):
        assert varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, True, cpu) == forced
        with configs.forced({"fused_ops.rms_norm": 2}):
            assert configs.choose("fused_ops.rms_norm", "n=8,dtype=float32", cpu, lambda: 1) == 2
        assert configs.choose("fused_ops.rms_norm", "n=8,dtype=float32", cpu, lambda: 1) == 1
    assert varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, True, cpu) == entry
    # a hand-edited or stale entry fails loudly, naming it
    table({"varlen_attention.fwd": {cls: dict(BLOCK_M=64)}})
    with pytest.raises(ValueError, match=r"varlen_attention.fwd \[d=128"):
        varlen_attention_triton.tuned_config("fwd", 128, torch.bfloat16, True, cpu)


def test_no_table_for_cpu_tensors():
    assert configs.device_name(torch.device("cpu")) is None
    assert configs.lookup("lora.gemm", "anything", torch.device("cpu")) is None
    assert configs.pow2(1) == 1 and configs.pow2(3000) == 4096 and configs.pow2(4096) == 4096


def test_forced_config_launches_under_the_interpreter():
    x = torch.randn(6, 40)
    w = torch.randn(40)
    ref = fused_ops.rms_norm(x, w, 1e-6, impl="torch")
    with configs.forced({"fused_ops.rms_norm": 2}):
        torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6, impl="triton"), ref)


def test_candidates_start_with_the_heuristic_and_share_its_form():
    bf16 = torch.bfloat16
    lists = [(varlen_attention_triton.candidates(k, d, bf16), varlen_attention_triton.config(k, d, bf16))
             for k in ("fwd", "dkdv", "dq") for d in (64, 128)]
    lists.append((paged.decode_candidates(128, bf16), None))
    lists += [(linear_logprobs_triton.candidates(k, 151936), linear_logprobs_triton.launch_config(k, 151936))
              for k in ("stats", "grad")]
    lists += [(lora_triton.block_candidates(k, 16, False), None) for k in ("shrink", "expand", "dy", "dx")]
    lists.append((lowrank_gemm.candidates(True), "cublas"))
    for cands, heuristic in lists:
        assert len(cands) > 1 and len(set(map(repr, cands))) == len(cands)
        if heuristic is not None:
            assert cands[0] == heuristic
        if isinstance(cands[0], dict):
            assert all(set(c) == set(cands[0]) for c in cands)
    assert lowrank_gemm.candidates(False) == ["cublas", *(c for c in lowrank_gemm.CONFIGS if not c[5])]


def test_tune_dry_run_prints_the_plan():
    run = [sys.executable, str(ROOT / "benchmarks" / "tune.py")]
    proc = subprocess.run(run + ["--dry-run"], env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("lora.gemm", "varlen_attention.dkdv", "linear_logprobs.stats", "paged_attention.decode",
                   "lora.shrink", "fused_ops.rope"):
        assert kernel in proc.stdout
    assert "d=128,dtype=bfloat16,causal=1" in proc.stdout
    only = subprocess.run(run + ["--dry-run", "--only", "paged_attention"], env=_cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert only.returncode == 0 and "paged_attention.decode" in only.stdout and "lora.gemm" not in only.stdout
    bad = subprocess.run(run + ["--dry-run", "--only", "nope"], env=_cpu_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "names no tuned kernel" in bad.stderr
    if not torch.cuda.is_available():
        cpu = subprocess.run(run, env=_cpu_env(), capture_output=True, text=True, timeout=300)
        assert cpu.returncode == 2 and "needs a GPU" in cpu.stderr


def test_tune_smoke_writes_a_table_the_launchers_read(tmp_path, monkeypatch):
    """The whole sweep on tiny shapes under the interpreter: every candidate checked and
    timed, the table written; its entries have the form the launchers accept."""
    out = tmp_path / configs.file_name(DEVICE)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--smoke", "--out", str(out),
                           "--only", "fused_ops.rms_norm,lora.dx", "--budget-s", "120"], env=_cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SKIPPED" not in proc.stdout and "chosen" in proc.stdout
    data = json.loads(out.read_text())
    assert data["triton"] and data["torch"] and data["date"]
    assert set(data["entries"]) == {"fused_ops.rms_norm", "lora.dx"}
    monkeypatch.setenv(configs.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(configs, "device_name", lambda device: DEVICE)
    configs.reload()
    try:
        for cls, entry in data["entries"]["lora.dx"].items():
            r = int(cls.split("r=")[1].split(",")[0])
            assert lora_triton.blocks("dx", r, torch.empty(0)) == entry
    finally:
        configs.reload()


def test_gpu_check_dry_run_prints_the_plan():
    steps = [line.split("\t")[0] for line in (ROOT / "benchmarks" / "gpu_steps.tsv").read_text().splitlines()
             if line and not line.startswith("#")]
    assert steps[:4] == ["env", "tests", "determinism", "tune"]
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--budget-s", "780", "--dry-run"],
                          env=_cpu_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:-1]]
    assert rows == steps
    assert "budget: 780 s" in proc.stdout and "skip" in proc.stdout
    cumulative = [int(line.split()[3].rstrip("s")) for line in proc.stdout.splitlines()[1:-1]]
    assert cumulative == sorted(cumulative) and cumulative[-1] <= 780
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "nope"], env=_cpu_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown step" in bad.stderr

"""The command line and the benchmark scripts (CPU smoke runs)."""
import json
import math
import subprocess
import sys

from engine.__main__ import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "inspect" in out and "serve" in out


def test_serve_refuses_bad_options(tmp_path, capsys):
    assert main(["serve", "--model", "no-equals-sign"]) == 1
    assert "must be NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", f"a={tmp_path / 'nope'}"]) == 1
    assert "not a checkpoint folder with a config.json" in capsys.readouterr().err


def test_engine_imports_without_the_serve_extra():
    """The default install has neither the server's stack nor the tinker SDK: engine, its API
    and `python -m engine --help` work without them, and `serve` says which extra to install."""
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('tinker', 'starlette', 'uvicorn', 'fastapi')]"
    code = (f"{blocked}; import engine, engine.api, engine.infer; from engine.__main__ import main; "
            "raise SystemExit(main(['serve', '--model', 'a=b']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and "pip install 'engine[serve]'" in run.stderr, run.stderr


def test_inspect(checkpoint, capsys):
    assert main(["inspect", str(checkpoint("qwen3"))]) == 0
    out = capsys.readouterr().out
    assert "qwen3 (Qwen3Config)" in out
    assert "4 query / 2 key-value, head_dim 24" in out
    assert "140,128" in out  # parameters of the tiny Qwen3 (tied embeddings)
    assert "weights in bfloat16" in out and "F32 x24" in out


def test_inspect_missing_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_demo_learns(capsys, tmp_path):
    """The demo (a short run of it) learns: held-out answer-token accuracy rises over the fixed
    seed's start by far more than sampling noise (a two-proportion z-score above 5, p < 3e-7).
    Sampling through a client that shares the trained weights is test_train_api's subject."""
    assert main(["demo", "--steps", "30", "--out", str(tmp_path / "adapter")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "accuracy:" in l)  # "4.5% -> 40.1% (of 986 tokens)"
    before, after = (float(x.strip(" %")) / 100 for x in line.split(":")[1].split("(")[0].split("->"))
    n = int(line.split("(of ")[1].split()[0])
    pooled = (before + after) / 2
    z = (after - before) / math.sqrt(2 * pooled * (1 - pooled) / n)
    assert z > 5, line
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_bench_forward_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks.bench_forward import main as bench

    rows = bench(["--preset", "tiny", "--tokens", "96"])
    assert {r["impl"] for r in rows} == {"engine (packed)", "transformers (padded)", "transformers (per document)"}
    data = json.loads((tmp_path / "forward.json").read_text())
    assert data["env"]["torch"] and data["meta"]["preset"] == "tiny" and data["rows"]
    assert (tmp_path / "forward.png").stat().st_size > 1000


def test_bench_attention_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks.bench_attention import main as bench

    rows = bench(["--smoke"])
    assert {(r["impl"], r["mode"]) for r in rows if r["bench"] == "varlen"} >= {
        ("engine", "fwd"), ("engine", "fwd+bwd"), ("sdpa per sequence", "fwd+bwd")}
    assert {r["impl"] for r in rows if r["bench"] == "decode"} >= {"engine", "torch gather + sdpa"}
    assert "flash_attn: skipped" in capsys.readouterr().out or any(r["impl"] == "flash_attn" for r in rows)
    for op in ("attention", "attention_decode"):
        data = json.loads((tmp_path / f"{op}.json").read_text())
        assert data["env"]["torch"] and data["rows"] and data["meta"]["Hq"] == 2
        assert (tmp_path / f"{op}.png").stat().st_size > 1000


def test_bench_lora_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks.bench_lora import main as bench

    rows = bench(["--smoke"])
    impls = {r["impl"] for r in rows}
    assert {"base linear (frozen)", "eager LoRA formula", "engine lora_linear", "loop over 3 adapters"} <= impls
    data = json.loads((tmp_path / "lora.json").read_text())
    assert data["env"]["torch"] and data["meta"]["tokens"] == 64 and data["rows"]
    assert (tmp_path / "lora.png").stat().st_size > 1000


def test_bench_train_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks.bench_train import main as bench

    rows = bench(["--smoke"])
    assert {r["impl"] for r in rows} >= {"engine full", "transformers full", "engine lora r=16", "transformers+peft lora r=16"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["env"]["torch"] and data["rows"] and data["meta"]["tokens_per_step"] == 4 * 64


def test_bench_decode_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks.bench_decode import main as bench

    rows = bench(["--smoke"])
    assert {r["workload"] for r in rows} == {"batch1", "batch32", "mixed", "adapters"}
    assert any(r["impl"] == "transformers generate" for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["meta"]["preset"] == "tiny" and data["rows"]
    assert (tmp_path / "decode.png").stat().st_size > 1000

"""GPU checks of the LoRA kernels (``pytest -m gpu``): bf16 at real sizes, with the error
bound relative to torch's own bf16 eager formula against float32."""
import pytest
import torch
import torch.nn.functional as F

import kernels.lora_triton as lora_triton
import kernels.lowrank_gemm as lowrank_gemm
from kernels import lora_dropout_mask, lora_linear, lora_linear_multi, pack_lora_adapters

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _eager(x, w, a, b, bias, scale):
    y = F.linear(x, w, bias) + scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
    return y


@pytest.mark.parametrize("gemm", [None, "cublas", "fused", "fused-tma"])  # None: lora_linear times all, picks
@pytest.mark.parametrize("n, k, m, r, bias", [
    (8192, 4096, 4096, 16, False),
    (8192, 4096, 14336, 64, False),   # the backward's dy pass on cuBLAS (padded rank > 32)
    (3001, 2048, 3072, 48, True),     # fused q/k/v shape: 3 blocks of rank 16, odd N
    (1000, 1536, 8960, 8, True),
])
def test_bf16_within_twice_torch_error(monkeypatch, n, k, m, r, bias, gemm):
    monkeypatch.setattr(lowrank_gemm, "GEMM", gemm)
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(m, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    a = (torch.randn(r, k, device="cuda", generator=g) * k**-0.5).bfloat16().requires_grad_()
    b = (torch.randn(m, r, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_()
    bb = (torch.randn(m, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_() if bias else None
    dy = torch.randn(n, m, device="cuda", generator=g).bfloat16()
    params = [t for t in (x, a, b, bb) if t is not None]
    f32 = [t.detach().float().requires_grad_() for t in params]
    x32, a32, b32 = f32[:3]
    truth_y = _eager(x32, w.float(), a32, b32, f32[3] if bias else None, 2.0)
    truth = (truth_y, *torch.autograd.grad(truth_y, f32, dy.float()))
    y_t = _eager(x, w, a, b, bb, 2.0)
    theirs = (y_t, *torch.autograd.grad(y_t, params, dy))
    y_o = lora_linear(x, w, a, b, 2.0, bias=bb, impl="triton")
    ours = (y_o, *torch.autograd.grad(y_o, params, dy))
    for name, o, th, tr in zip(("y", "dx", "dA", "dB", "dbias"), ours, theirs, truth):
        assert o.dtype == th.dtype, name
        err_ours, err_torch = _rel(o, tr), _rel(th, tr)
        print(f"N={n} {k}->{m} r={r} {name}: relative error engine {err_ours:.3e}, torch bf16 {err_torch:.3e}")
        assert err_ours <= 2 * err_torch + 1e-6, name


def test_trainable_weight_and_fp32_adapters():
    g = torch.Generator(device="cuda").manual_seed(1)
    n, k, m, r = 2048, 1024, 2816, 16
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(m, k, device="cuda", generator=g) * k**-0.5).bfloat16().requires_grad_()
    a = (torch.randn(r, k, device="cuda", generator=g) * k**-0.5).requires_grad_()  # float32, as PEFT autocasts
    b = (torch.randn(m, r, device="cuda", generator=g) * 0.1).requires_grad_()
    dy = torch.randn(n, m, device="cuda", generator=g).bfloat16()
    results = {}
    for impl in ("torch", "triton"):
        y = lora_linear(x, w, a, b, 0.5, impl=impl)
        results[impl] = (y, *torch.autograd.grad(y, (x, w, a, b), dy))
    for name, o, ref in zip(("y", "dx", "dW", "dA", "dB"), results["triton"], results["torch"]):
        assert o.dtype == ref.dtype, name
        assert _rel(o, ref) < 1e-2, name


@pytest.mark.parametrize("gemm", ["cublas", "fused"])
def test_dropout_matches_regenerated_mask(monkeypatch, gemm):
    """float32 on the GPU (true float32 products): the output and gradients equal the
    formula under the mask lora_dropout_mask regenerates, and the mask keeps 1 - p."""
    monkeypatch.setattr(lowrank_gemm, "GEMM", gemm)
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(2)
    n, k, m, r, p = 3000, 1000, 1200, 8, 0.2
    x = torch.randn(n, k, device="cuda", generator=g).requires_grad_()
    w = torch.randn(m, k, device="cuda", generator=g) * k**-0.5
    a = (torch.randn(r, k, device="cuda", generator=g) * k**-0.5).requires_grad_()
    b = torch.randn(m, r, device="cuda", generator=g).requires_grad_()
    y = lora_linear(x, w, a, b, 1.5, dropout=p, dropout_seed=77, impl="triton")
    keep = lora_dropout_mask(x.shape, p, 77, device="cuda", impl="triton")
    assert abs(keep.float().mean().item() - (1 - p)) < 2e-3
    ref = F.linear(x, w) + 1.5 * F.linear(F.linear(x * keep / (1 - p), a), b)
    up = torch.randn_like(y)
    for got, want in zip((y, *torch.autograd.grad(y, (x, a, b), up)), (ref, *torch.autograd.grad(ref, (x, a, b), up))):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("n, layout", [(64, "spread"), (4096, "segments"), (4096, "spread")])
def test_multi_bf16(n, layout):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(3)
    k, m, n_adapters = 4096, 4096, 16
    adapters = [(torch.randn(rk, k, device="cuda", generator=g) * k**-0.5,
                 torch.randn(m, rk, device="cuda", generator=g) * 0.1, 0.5 + i / 8)
                for i, rk in enumerate([16, 8, 4, 1] * 4)]
    a32, b32, scales = pack_lora_adapters(adapters)
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(m, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    if layout == "spread":
        ids = torch.randint(-1, n_adapters, (n,), device="cuda", generator=g, dtype=torch.int32)
    else:
        ids = (torch.arange(n, device="cuda") * (n_adapters + 1) // n - 1).to(torch.int32)
    with torch.no_grad():
        truth = lora_linear_multi(x.float(), w.float(), a32, b32, scales, ids, impl="torch")
        theirs = lora_linear_multi(x, w, a32.bfloat16(), b32.bfloat16(), scales, ids, impl="torch")
        ours = lora_linear_multi(x, w, a32.bfloat16(), b32.bfloat16(), scales, ids, impl="triton")
    err_ours, err_torch = _rel(ours, truth), _rel(theirs, truth)
    print(f"multi N={n} {layout}: relative error engine {err_ours:.3e}, torch bf16 {err_torch:.3e}")
    assert err_ours <= 2 * err_torch + 1e-6


def test_fused_dy_threshold_paths_agree(monkeypatch):
    """The one-pass dy kernel and the two-GEMM fallback give the same gradients."""
    g = torch.Generator(device="cuda").manual_seed(4)
    n, k, m, r = 4096, 2048, 2048, 16
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(m, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    a = (torch.randn(r, k, device="cuda", generator=g) * k**-0.5).bfloat16().requires_grad_()
    b = (torch.randn(m, r, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_()
    dy = torch.randn(n, m, device="cuda", generator=g).bfloat16()
    grads = []
    for limit in (32, 0):
        monkeypatch.setattr(lora_triton, "FUSED_DY_MAX_RANK", limit)
        grads.append(torch.autograd.grad(lora_linear(x, w, a, b, 2.0, impl="triton"), (x, a, b), dy))
    for name, one, two in zip(("dx", "dA", "dB"), *grads):
        assert _rel(one, two) < 1e-2, name


def test_model_adapters_on_gpu(checkpoint, tmp_path):
    """The model's LoRA projections on CUDA (Triton kernels through impl="auto") match the
    CPU model (torch reference), for one trained adapter and for a multi-adapter batch."""
    from engine.models import PackedBatch, add_lora, load_model, save_peft_lora, set_adapter_stack

    torch.backends.cuda.matmul.allow_tf32 = False
    folder = checkpoint("qwen3")
    sources = []
    for k, rank in enumerate((4, 2)):
        m = load_model(folder)
        add_lora(m, rank=rank, alpha=8, targets=("qkv", "o", "gate_up", "down") if k == 0 else ("q_proj", "down"))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        sources.append(save_peft_lora(m, tmp_path / f"a{k}"))
    seqs = [[5, 9, 1, 33, 2, 7, 8], [4], [100, 3, 6]]
    ids = torch.tensor([0] * 7 + [-1] + [1] * 3, dtype=torch.int32)
    outs = {}
    for device in ("cpu", "cuda"):
        from engine.models import load_peft_lora

        single = load_model(folder, device=device)
        load_peft_lora(single, sources[0])
        multi = load_model(folder, device=device)
        set_adapter_stack(multi, sources)
        batch = PackedBatch.from_sequences(seqs, device=device)
        args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        with torch.no_grad():
            outs[device] = (single(*args).cpu(), multi(*args, ids.to(device)).cpu())
    for cpu, gpu in zip(outs["cpu"], outs["cuda"]):
        assert _rel(gpu, cpu) < 1e-5

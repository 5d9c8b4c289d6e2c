"""GPU checks of the Triton linear cross-entropy (``pytest -m gpu``): bf16 at real sizes, with
the error bound relative to torch's own bf16 computation against float32 or float64."""
import pytest
import torch
import torch.nn.functional as F

from kernels import linear_cross_entropy, linear_logprobs

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _loss_and_grads(fn, x, w, t):
    loss = fn(x, w, t)
    return (loss, *torch.autograd.grad(loss, (x, w)))


@pytest.mark.parametrize("n, h, v", [(4096, 4096, 128256), (2048, 2048, 151936), (1000, 1536, 32003)])
def test_bf16_within_twice_torch_error(n, h, v):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5 * 2).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = -100
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    truth = _loss_and_grads(lambda a, b, c: F.cross_entropy(a @ b.t(), c), x32, w32, t)
    torch_bf16 = _loss_and_grads(lambda a, b, c: F.cross_entropy((a @ b.t()).float(), c), x, w, t)
    ours = _loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, impl="triton"), x, w, t)
    for name, o, th, tr in zip(("loss", "dx", "dW"), ours, torch_bf16, truth):
        assert o.dtype == th.dtype, name
        err_ours, err_torch = _rel(o, tr), _rel(th, tr)
        print(f"N={n} H={h} V={v} {name}: relative error engine {err_ours:.3e}, torch bf16 {err_torch:.3e}")
        assert err_ours <= 2 * err_torch + 1e-6, name


def test_logprobs_and_entropy_bf16():
    """Logprobs, entropy and the gradients of an upstream on both, against float64, within
    twice the error of torch's own bf16 computation (logits of a bf16 matmul, softmax in
    float32)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 3000, 2048, 50000
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    up = torch.randn(2, n, device="cuda", generator=g, dtype=torch.float64)

    def eager(a, b):  # logits in a's dtype, softmax in float32 (float64 for the truth)
        logp = torch.log_softmax((a @ b.t()).to(torch.promote_types(a.dtype, torch.float32)), -1)
        return logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    def run(fn, a, b):
        lp, ent = fn(a, b)
        upstream = up.to(lp.dtype)
        return (lp, ent, *torch.autograd.grad((lp * upstream[0] + ent * upstream[1]).sum(), (a, b)))

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = run(eager, x64, w64)
    torch_bf16 = run(eager, x, w)
    ours = run(lambda a, b: linear_logprobs(a, b, t, return_entropy=True, impl="triton"), x, w)
    for name, o, th, tr in zip(("logprob", "entropy", "dx", "dW"), ours, torch_bf16, truth):
        assert o.dtype == th.dtype, name
        err_ours, err_torch = _rel(o, tr), _rel(th, tr)
        print(f"{name}: relative error engine {err_ours:.3e}, torch bf16 {err_torch:.3e}")
        assert err_ours <= 2 * err_torch + 1e-6, name

"""Compile every Triton kernel the ops launch for an sm_90 GPU, without a GPU.

The interpreter runs kernels as numpy code, so it cannot catch what only the compiler sees
(types in tl.dot, scalar control flow, pointer arithmetic widths). This script runs each op
on small CPU tensors with ``JITFunction.run`` replaced by "compile for sm_90 and record",
so every kernel and every specialisation the launchers choose goes through the real
compiler. Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET unset).
Prints one line per compiled kernel and exits 1 if any failed to compile. To check the
GPU image's Triton too: ``pip install --no-deps --target /tmp/t36 triton==3.6.0`` then
``PYTHONPATH=/tmp/t36 python tests/triton_compile_check.py`` (done on 2026-11-23: 0 failed).
"""
import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
compiled, failed = set(), []


def _compile_instead_of_run(self, *args, grid, warmup, **kwargs):
    sig_params = list(inspect.signature(self.fn).parameters.values())
    bound = dict(zip([p.name for p in sig_params], args))
    bound.update({k: v for k, v in kwargs.items() if k in bound or any(p.name == k for p in sig_params)})
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    constexpr = {p.name for p in self.params if p.is_constexpr}
    signature, constants = {}, {}
    for p in sig_params:
        v = bound.get(p.name, p.default)
        if p.name in constexpr or v is None:
            signature[p.name], constants[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[v.dtype]
        elif isinstance(v, TensorDescriptor):
            signature[p.name] = f"tensordesc<{_DTYPES[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i64" if not -2**31 <= v < 2**31 else "i32"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{self.fn.__name__}: cannot type argument {p.name}={v!r}")
    key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constants.items())),
           tuple(sorted(options.items())))
    if key in compiled:
        return None
    compiled.add(key)
    try:
        triton.compile(ASTSource(fn=self, signature=signature, constexprs=constants), target=TARGET, options=options)
        print(f"ok    {self.fn.__name__} {options}")
    except Exception as e:  # noqa: BLE001 - reported below
        failed.append(self.fn.__name__)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"FAIL  {self.fn.__name__} {options} : {type(cause).__name__}: {str(cause)[-700:]}")
    return None


JITFunction.run = _compile_instead_of_run

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import kernels.dispatch as dispatch  # noqa: E402
import kernels.lowrank_gemm as lowrank_gemm  # noqa: E402

# Let impl="triton" take CPU tensors (nothing runs): the device gates (dispatch.resolve_impl
# and dispatch.check_triton_device) read dispatch's own name; the launchers' tile and
# precision choices read triton_base.interpreting, which stays False: the GPU's.
dispatch.interpreting = lambda: True


def attempt(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - outputs are garbage after a fake launch
        print(f"note  {name}: stopped after the launches above ({type(e).__name__}: {str(e)[:120]})")


def cross_entropy():
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(16, 32, dtype=dtype, requires_grad=True)
        w = torch.randn(300, 32, dtype=dtype, requires_grad=True)
        b = torch.randn(300, dtype=dtype, requires_grad=True)
        t = torch.randint(0, 300, (16,))
        lp, ent = kernels.linear_logprobs(x, w, t, bias=b, softcap=3.0, return_entropy=True, impl="triton")
        (lp.sum() + ent.sum()).backward()
        kernels.linear_cross_entropy(x, w, t, label_smoothing=0.1, impl="triton").backward()


def attention():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    for dtype, d in ((torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float32, 24)):
        for window, softcap in ((None, None), (4, 5.0)):
            q = torch.randn(12, 4, d, dtype=dtype, requires_grad=True)
            k = torch.randn(12, 2, d, dtype=dtype, requires_grad=True)
            v = torch.randn(12, 2, d, dtype=dtype, requires_grad=True)
            attempt(f"varlen {dtype} d={d}", lambda: kernels.varlen_attention(
                q, k, v, cu, cu, 7, 7, window=window, softcap=softcap, impl="triton").sum().backward())
    kc, vc = torch.randn(8, 16, 2, 128, dtype=torch.bfloat16), torch.randn(8, 16, 2, 128, dtype=torch.bfloat16)
    attempt("paged", lambda: kernels.paged_attention(torch.randn(2, 4, 128, dtype=torch.bfloat16), kc, vc,
                                                     torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                                                     torch.tensor([20, 5], dtype=torch.int32), impl="triton"))
    attempt("append_kv", lambda: kernels.append_kv(kc, vc, torch.randn(3, 2, 128, dtype=torch.bfloat16),
                                                   torch.randn(3, 2, 128, dtype=torch.bfloat16),
                                                   torch.tensor([0, 17, -1]), impl="triton"))


def lora():
    for dtype in (torch.bfloat16, torch.float32):
        for r in (16, 64):
            x = torch.randn(32, 64, dtype=dtype, requires_grad=True)
            w = torch.randn(96, 64, dtype=dtype)
            a = torch.randn(r, 64, dtype=dtype, requires_grad=True)
            b = torch.randn(96, r, dtype=dtype, requires_grad=True)
            attempt(f"lora {dtype} r={r}", lambda: kernels.lora_linear(x, w, a, b, 0.5, dropout=0.1,
                                                                        impl="triton").sum().backward())
        configs = lowrank_gemm.CONFIGS
        lowrank_gemm.GEMM = "fused"  # the GEMM with the rank-r epilogue, in every tile config
        for config in configs if dtype == torch.bfloat16 else configs[:1]:
            lowrank_gemm.CONFIGS = (config,)
            for p, bias in ((0.0, torch.randn(96, dtype=dtype)), (0.1, None)):
                x = torch.randn(32, 64, dtype=dtype, requires_grad=True)
                a = torch.randn(16, 64, dtype=dtype, requires_grad=True)
                b = torch.randn(96, 16, dtype=dtype, requires_grad=True)
                attempt(f"lora fused {config}", lambda: kernels.lora_linear(
                    x, torch.randn(96, 64, dtype=dtype), a, b, 0.5, bias=bias, dropout=p, impl="triton").sum().backward())
        lowrank_gemm.GEMM, lowrank_gemm.CONFIGS = None, configs
        ids = torch.tensor([0, -1, 1] * 10 + [1, 0], dtype=torch.int32)
        attempt(f"lora_multi {dtype}", lambda: kernels.lora_linear_multi(
            torch.randn(32, 64, dtype=dtype), torch.randn(96, 64, dtype=dtype), torch.randn(2, 16, 64, dtype=dtype),
            torch.randn(2, 96, 16, dtype=dtype), torch.ones(2), ids, impl="triton"))


def fused_ops():
    for dtype in (torch.bfloat16, torch.float32):
        for hidden in (2048, 5120):
            x = torch.randn(4, hidden, dtype=dtype)
            kernels.rms_norm(x, torch.ones(hidden, dtype=dtype), 1e-5, impl="triton")
            kernels.rms_norm(x, torch.ones(hidden, dtype=dtype), 1e-5, residual=x.clone(), impl="triton")
        for d in (64, 128):
            qkv = torch.randn(3, 48 * d, dtype=dtype)
            q, k = qkv[:, :32 * d].view(3, 32, d), qkv[:, 32 * d:40 * d].view(3, 8, d)
            cos, sin = torch.randn(3, 1, d, dtype=dtype), torch.randn(3, 1, d, dtype=dtype)
            kernels.rope(q, k, cos, sin, impl="triton")
            kernels.rope(q, k, cos, sin, q_weight=torch.ones(d, dtype=dtype), k_weight=torch.ones(d, dtype=dtype),
                         impl="triton")
        kernels.silu_mul(torch.randn(4, 2 * 8192, dtype=dtype), impl="triton")


for name, fn in (("cross_entropy", cross_entropy), ("attention", attention), ("lora", lora),
                 ("fused_ops", fused_ops)):
    attempt(name, fn)
print(f"{len(compiled)} kernel specialisations compiled for sm_90, {len(failed)} failed: {sorted(set(failed))}")
sys.exit(1 if failed or not compiled else 0)

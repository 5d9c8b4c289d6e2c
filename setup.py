"""Builds the optional CUDA extension ``kernels._C`` from csrc/ where a CUDA toolkit and a
CUDA build of torch are present (install with ``pip install --no-build-isolation -e .`` so
the build sees the installed torch); everywhere else installs the pure-Python package, whose
ops fall back to their Triton or torch twins."""
import glob
import os

from setuptools import setup


def cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not glob.glob("csrc/*.cpp") or os.environ.get("ENGINE_NO_CUDA_EXT"):
        return {}  # no torch binding yet: the .cu kernels are compiled by the tests only
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("engine: torch is not importable in the build environment; installing without the CUDA extension")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("engine: no CUDA toolkit or CPU-only torch; installing without the CUDA extension")
        return {}
    # No --use_fast_math: the sampling kernel's logf/expf must round like its torch twin.
    nvcc = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension("kernels._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())

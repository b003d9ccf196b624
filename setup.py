"""Builds fdsm_ext._C: C++ CPU kernels always, CUDA kernels when they can be built.

FDSM_EXT_CUDA=1 forces the CUDA kernels (an error if they cannot be built), FDSM_EXT_CUDA=0 skips
them; unset, they are built when torch is a CUDA build and a CUDA toolkit is found.
Build with `pip install --no-build-isolation .` (torch must already be installed).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FDSM_EXT_CUDA", "auto").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "FDSM_EXT_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME} "
                "(install a CUDA build of torch and set CUDA_HOME)"
            )
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return available


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    debug = os.environ.get("FDSM_EXT_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to torch.utils.cpp_extension (C++17 before torch 2.14, C++20 from it).
    # -ffp-contract=off: no FMA contraction (bitwise-equal streams on every device, fd_math.h);
    # -fno-math-errno: sqrt may be a vector instruction (csrc/cpu/directions_cpu.cpp).
    cxx += ["-ffp-contract=off", "-fno-math-errno", "-fdiagnostics-color=always"]
    if _want_cuda() and cuda_sources:
        nvcc = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "fdsm_ext._C",
            sources + cuda_sources,
            define_macros=[("FDSM_EXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return CppExtension("fdsm_ext._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="fdsm_ext",
    version="0.1.0",
    description="Fused finite-difference score matching and Langevin sampling ops for PyTorch",
    packages=find_packages(include=["fdsm_ext", "fdsm_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "hypothesis", "numpy", "expecttest"]},
)

"""Loads the compiled extension, whose import registers the torch.ops.fdsm_ext ops.

A compiled extension runs only with the torch release it was compiled against (another one fails with
an undefined symbol at best). setup.py records that release in ``_build_info.py``; it is compared with
the imported torch before ``_C`` is loaded, so a mismatch is one line saying how to rebuild.
"""

import torch

_REBUILD = "rebuild it with `pip install .` (or `pip install -e .`) from the repository root"


def _public_version(version: str) -> str:
    return version.split("+", 1)[0]  # the local tag (+cpu, +cu130) does not change the C++ ABI


def check_build_matches_torch() -> None:
    """Raises ImportError (one line) when ``_C`` was compiled against another torch release."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # built before the build recorded its torch: the load below still guards
        return
    if _public_version(TORCH_VERSION) != _public_version(torch.__version__):
        raise ImportError(
            f"fdsm_ext's compiled extension was built against torch {TORCH_VERSION} but torch "
            f"{torch.__version__} is imported; {_REBUILD}, or install torch=={_public_version(TORCH_VERSION)}"
        )


check_build_matches_torch()
try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    if "undefined symbol" in str(exc):
        raise ImportError(
            f"fdsm_ext's compiled extension does not match torch {torch.__version__} ({exc}); {_REBUILD}"
        ) from None
    raise ImportError(
        f"fdsm_ext's compiled extension is not built ({exc}); build it with `pip install .` "
        "(or `pip install -e .`) from the repository root, with torch already installed"
    ) from None


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the fdsm_ext ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fdsm_ext::perturb", "CUDA")

"""Loads the compiled extension, whose import registers the torch.ops.fdsm_ext ops."""

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"fdsm_ext's compiled extension is not built ({exc}); build it with "
        "`pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`) "
        "from the repository root, with torch already installed"
    ) from None


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the fdsm_ext ops."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("fdsm_ext::perturb", "CUDA")

import os

import torch

# Without a GPU the Triton tests (tests/triton/) run in Triton's interpreter, which must be switched on
# before triton is first imported: collection imports it (torch.compile, opcheck), so it is done here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk cache of compiled C++ kernels is not keyed by ATen's CPU capability: a kernel
# written under AVX2 and reread under ATEN_CPU_CAPABILITY=default fails to compile ("at::vec has not
# been declared"). A run that sets the capability gets a cache of its own (subprocesses inherit it).
if os.environ.get("ATEN_CPU_CAPABILITY"):
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))

import pytest  # noqa: E402

import fdsm_ext  # noqa: E402
from fdsm_ext import ops  # noqa: E402

# (rtol, atol) of a kernel against its reference, per input dtype (the reference accumulates in the
# same dtype as the kernel, so these bound rounding-order differences, not precision loss).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (3e-4, 1e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (1e-2, 5e-2),
}
DTYPES = list(TOL)
KINDS = list(ops.DIRECTION_KINDS)


def assert_close(actual, expected, dtype=None, scale=1.0):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol * scale, atol=atol * scale)


def make_seed(seed=1234, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


def strided(t):
    """A non-contiguous tensor with t's values (every other column of a wider buffer)."""
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output is NaN-filled before the kernel runs, so an unwritten element fails a test."""
    old = ops.set_poison_outputs(True)
    yield
    ops.set_poison_outputs(old)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: for many tiny evaluations (ODE solves, sampler steps), torch's
    thread pool costs more than their work on a shared machine. Use with ``pytest.mark.usefixtures``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

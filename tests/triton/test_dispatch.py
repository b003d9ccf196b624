"""backend="triton" and "auto" (rules in fdsm_ext/_checks.py): dispatch rules, and the losses through the Triton
ops agreeing with backend="cpp" for the same seed (the same ops on the same random stream)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fdsm_ext  # noqa: E402
from fdsm_ext import _checks  # noqa: E402

from conftest import DEVICE  # noqa: E402


# --------------------------------------------------------------------------- dispatch rules
@pytest.mark.parametrize("dev, cuda_kernels, triton_reason, want", [
    ("cpu", False, None, "cpp"),
    ("cuda", True, None, "cpp"),
    ("cuda", False, None, "triton"),
    ("cuda", False, "triton is not installed", "torch"),
    ("meta", False, "needs CUDA", "torch"),
])
def test_auto(monkeypatch, dev, cuda_kernels, triton_reason, want):
    monkeypatch.setattr(_checks, "has_cuda_kernels", lambda: cuda_kernels)
    monkeypatch.setattr(_checks, "triton_unavailable", lambda d: triton_reason)
    assert _checks.resolve_backend_for("auto", dev) == want


def test_requested_unavailable_backends_raise(monkeypatch):
    monkeypatch.setattr(_checks, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_checks, "triton_unavailable", lambda d: "triton is not installed")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cuda tensors: triton is not installed"):
        _checks.resolve_backend_for("triton", "cuda")
    with pytest.raises(RuntimeError, match="backend='cpp'"):
        _checks.resolve_backend_for("cpp", "cuda")
    assert _checks.resolve_backend_for("torch", "cuda") == "torch"


def test_triton_availability():
    assert _checks.triton_unavailable(DEVICE) is None
    assert "CUDA" in _checks.triton_unavailable("meta")
    assert _checks.resolve_backend_for("triton", DEVICE) == "triton"


# --------------------------------------------------------------------------- same seed, same losses
class MLPEnergy(nn.Module):
    def __init__(self, d=3, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Softplus(), nn.Linear(16, 1)).to(dtype)

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(-1) - 0.5 * x.flatten(1).square().sum(-1)


def _run(loss_name, backend, dtype, device):
    model = MLPEnergy(d=6, dtype=dtype).to(device)
    x = torch.randn(5, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    gen = torch.Generator().manual_seed(7)  # the (seed, offset) token and noise come from the CPU generator
    if loss_name == "fd_ssm":
        loss = fdsm_ext.fd_ssm_loss(model, x, 0.1, n_slices=2, generator=gen, backend=backend, reduction="none")
    elif loss_name == "fd_ssm_vr":
        score = lambda y: model.net(y.flatten(1)).expand(-1, 6).reshape(y.shape) - y  # noqa: E731
        loss = fdsm_ext.fd_ssm_vr_loss(score, x, 0.1, directions="gaussian", generator=gen, backend=backend,
                                       reduction="none")
    elif loss_name == "fd_dsm":
        loss = fdsm_ext.fd_dsm_loss(model, x, 0.3, 0.1, directions="rademacher", generator=gen, backend=backend,
                                    reduction="none")
    elif loss_name == "annealed_fd_ssm_vr":
        score = lambda y, s: (model.net(y.flatten(1)).expand(-1, 6).reshape(y.shape) - y) / s[:, None, None]  # noqa
        loss = fdsm_ext.annealed_fd_ssm_vr_loss(score, x, [1.0, 0.1], 0.1, generator=gen, backend=backend,
                                                reduction="none")
    else:
        loss = fdsm_ext.fd_directional_derivative(model, x, x.flip(0), order=3, eps=0.05, backend=backend)
    return loss, torch.autograd.grad(loss.sum(), list(model.parameters()))


@pytest.mark.parametrize("loss_name", ["fd_ssm", "fd_ssm_vr", "fd_dsm", "annealed_fd_ssm_vr", "fd_derivative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_backend_agrees_with_cpp_for_the_same_seed(loss_name, dtype):
    got, got_g = _run(loss_name, "triton", dtype, DEVICE)
    want, want_g = _run(loss_name, "cpp", dtype, "cpu")
    # Same directions; the per-row sums differ in order only (C++ sums in float64, Triton in the
    # accumulation dtype), and the model's arithmetic is the same on CPU tensors.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.cpu(), want, **tol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a.cpu(), b, **tol)
    if DEVICE == "cpu" and dtype == torch.float32 and loss_name == "fd_ssm":  # every step is bitwise the C++ one
        assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_g, want_g))


def test_half_models_get_fp32_losses():
    model = MLPEnergy(d=3, dtype=torch.bfloat16).to(DEVICE)
    loss = fdsm_ext.fd_ssm_loss(model, torch.randn(6, 3, dtype=torch.bfloat16, device=DEVICE), 0.5, backend="triton")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.slow
def test_compiled_loss_matches_eager():
    # fullgraph: the Triton ops are opaque custom ops to dynamo, traced through their fake kernels, and
    # AOTAutograd puts their backward ops in the backward graph (which regenerates the directions from
    # the saved seed token). aot_eager stops before inductor's codegen, which would add nothing for
    # these opaque ops but minutes of C++ compilation on a CPU-only machine.
    model = MLPEnergy(d=4).to(DEVICE)
    x = torch.randn(8, 4, device=DEVICE)

    def loss_fn(x):
        return fdsm_ext.fd_ssm_vr_loss(lambda y: model.net(y).expand(-1, 4) - y, x, 0.1, n_slices=2, backend="triton")

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(42)  # the direction seed is drawn from torch's generator, as eager does it
        loss = fn(x)
        # the backward through the compiled graph (AOTAutograd) calls the Triton backward ops
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (le, ge), (lc, gc) = results
    torch.testing.assert_close(lc, le)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

"""torch.compile(fullgraph=True) of training steps that use the fused losses.

Compiled and eager steps run the same math in different reduction orders (inductor fuses and
vectorises the model's matmuls and sums differently, and differently again for each
``ATEN_CPU_CAPABILITY``), so they agree only up to the FD error model: a model output carries a
rounding error of a few ``u |f|`` (``u`` the dtype's unit round-off), and each loss amplifies it by
its FD quotient's weight (``AMPLIFICATION``). The tolerances below are that bound times a safety
factor, never a number fitted to one machine. In float64 the bound is ~1e-12, so the float64 run
still catches any compiled graph that computes something else; float32 checks the dtype users train in.
"""

import pytest
import torch
from torch import nn

import fdsm_ext
from fdsm_ext.numerics import unit_roundoff

pytestmark = pytest.mark.slow

D = 4
EPS = {"fd_ssm": 0.1, "fd_ssm_vr": 0.1, "fd_dsm": 0.1, "fd_derivative": 1e-2}
# How much a rounding error of one model output moves the per-sample loss, relative to |f| (or |s|):
# fd_ssm: d/eps^2 (|1|+|1|+|2|) for the second difference and d/eps^2 |f+ - f-|/4 for the square;
# fd_ssm_vr: d/(2 eps^2) |v| (|s+| + |s-|) with |v| = eps; fd_dsm: d/eps^2 |r| with r = O(|f|);
# order-2 stencil: (2 eps)^-2 (1 + 2 + 1), then squared (2 |D| times that).
AMPLIFICATION = {
    "fd_ssm": 6 * D / EPS["fd_ssm"] ** 2,
    "fd_ssm_vr": D ** 1.5 / EPS["fd_ssm_vr"],
    "fd_dsm": 2 * D / EPS["fd_dsm"] ** 2,
    "fd_derivative": 2 * 4 / (2 * EPS["fd_derivative"]) ** 2,
}
# Rounding errors of a width-32 MLP output (~sqrt(32) accumulated roundings) and three SGD steps. With
# default and avx2 kernels the worst case measured here is 0.14x the one-rounding bound for the losses
# and 2.1x for the parameters (fd_ssm_vr), so 32 leaves room for other CPUs' kernels.
SAFETY = 32.0
LR = 1e-3
STEPS = 3


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 32), nn.Softplus(), nn.Linear(32, 1)).to(dtype)


def _loss(loss_name, model, x):
    eps = EPS[loss_name]
    if loss_name == "fd_ssm":
        return fdsm_ext.fd_ssm_loss(lambda y: model(y).squeeze(-1), x, eps, n_slices=2)
    if loss_name == "fd_ssm_vr":
        return fdsm_ext.fd_ssm_vr_loss(lambda y: model(y) * y, x, eps)
    if loss_name == "fd_dsm":
        return fdsm_ext.fd_dsm_loss(lambda y: model(y).squeeze(-1), x, 0.3, eps)
    return fdsm_ext.fd_directional_derivative(lambda y: model(y).squeeze(-1), x, x.flip(0), 2, eps).square().mean()


def _train(loss_name, x, compiled):
    """Losses and final parameters of STEPS SGD steps; the loss (forward and, through AOTAutograd,
    its backward) is one graph when compiled, the optimizer runs eagerly."""
    model = _mlp(x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fn = torch.compile(_loss, fullgraph=True) if compiled else _loss
    torch.manual_seed(42)
    losses = []
    # fallback_random: inductor draws torch.randn/randint exactly as eager does, so the runs compare.
    with torch._inductor.config.patch(fallback_random=True):
        for _ in range(STEPS):
            opt.zero_grad()
            loss = fn(loss_name, model, x)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss_name", list(EPS))
def test_compiled_training_step_matches_eager(loss_name, dtype):
    x = torch.randn(16, D, dtype=dtype)
    (le, pe), (lc, pc) = _train(loss_name, x, False), _train(loss_name, x, True)
    assert torch.isfinite(lc).all()
    with torch.no_grad():
        scale = max(_mlp(dtype)(torch.cat([x, x.flip(0)])).abs().max().item(), 1.0)
    tol = SAFETY * unit_roundoff(dtype) * AMPLIFICATION[loss_name] * scale
    torch.testing.assert_close(lc, le, rtol=0.0, atol=tol)
    # A parameter moves by LR times its gradient each step; the gradient carries the loss's amplified
    # rounding error relative to its own size.
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=0.0, atol=STEPS * LR * tol * max(b.abs().max().item(), 1.0))

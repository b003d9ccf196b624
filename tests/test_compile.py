"""torch.compile(fullgraph=True) of training steps that use the fused losses."""

import pytest
import torch
from torch import nn

import fdsm_ext

pytestmark = pytest.mark.slow


def _mlp(d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 32), nn.Softplus(), nn.Linear(32, 1))


@pytest.mark.parametrize("loss_name", ["fd_ssm", "fd_ssm_vr", "fd_dsm", "fd_derivative"])
def test_compiled_training_step_matches_eager(loss_name):
    d = 4

    def loss_fn(model, x):
        if loss_name == "fd_ssm":
            loss = fdsm_ext.fd_ssm_loss(lambda y: model(y).squeeze(-1), x, 0.1, n_slices=2)
        elif loss_name == "fd_ssm_vr":
            loss = fdsm_ext.fd_ssm_vr_loss(lambda y: model(y) * y, x, 0.1)
        elif loss_name == "fd_dsm":
            loss = fdsm_ext.fd_dsm_loss(lambda y: model(y).squeeze(-1), x, 0.3, 0.1)
        else:
            loss = fdsm_ext.fd_directional_derivative(lambda y: model(y).squeeze(-1), x, x.flip(0), 2).square().mean()
        return loss

    # The loss (forward, and through AOTAutograd its backward) is one graph; the optimizer runs eagerly.
    def step(fn, model, opt, x):
        opt.zero_grad()
        loss = fn(model, x)
        loss.backward()
        opt.step()
        return loss.detach()

    x = torch.randn(16, d)
    results = []
    # fallback_random: inductor draws torch.randn/randint exactly as eager does, so the runs compare.
    for compiled in (False, True):
        model = _mlp(d)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        torch.manual_seed(42)
        with torch._inductor.config.patch(fallback_random=True):
            losses = [step(fn, model, opt, x) for _ in range(3)]
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (le, pe), (lc, pc) = results
    assert torch.isfinite(lc).all()
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

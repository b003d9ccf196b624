"""The public losses: against their references, their expectations, each other, and bad input."""

import math

import pytest
import torch
from torch import nn

import fdsm_ext
from fdsm_ext import reference as R

from conftest import KINDS

BACKENDS = ["cpp", "torch"]


class MLPEnergy(nn.Module):
    """A smooth log-density ``(N, d) -> (N,)``."""

    def __init__(self, d=3, width=16, dtype=torch.float32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Softplus(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 1)).to(dtype)

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(-1) - 0.5 * x.flatten(1).square().sum(-1)


class Quadratic(nn.Module):
    """``f(x) = -1/2 x^T A x``: FD-SSM is exact in expectation, ``1/2 ||A x||^2 - tr A``."""

    def __init__(self, d, dtype=torch.float64):
        super().__init__()
        m = torch.randn(d, d, dtype=dtype)
        self.A = nn.Parameter(m @ m.T / d + torch.eye(d, dtype=dtype))

    def forward(self, x):
        return -0.5 * torch.einsum("ni,ij,nj->n", x, self.A, x)

    def objective(self, x):
        return 0.5 * (x @ self.A).square().sum(-1) - torch.diagonal(self.A).sum()


# Compositions below rebuild the directions with the pure-PyTorch Philox (reference.philox_directions),
# which matches the kernels' polynomial Box-Muller to ~2e-7 relative: hence rtol 2e-5 even in fp64.
def _seed_like_the_loss(gen):
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=gen)


# --------------------------------------------------------------------------- against references
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_slices", [1, 3])
def test_fd_ssm_loss_equals_reference_composition(dtype, n_slices):
    model = MLPEnergy(d=6, dtype=dtype)
    x = torch.randn(7, 2, 3, dtype=dtype)  # event shape (2, 3): flattened to d = 6 for the directions
    loss = fdsm_ext.fd_ssm_loss(model, x, 0.1, n_slices=n_slices, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    seed = _seed_like_the_loss(torch.Generator().manual_seed(3))
    v = R.philox_directions(seed, n_slices * 7, 6, "sphere", 0.1, dtype).reshape(n_slices, 7, 6)
    f = model(R.perturb(x.reshape(7, 6), v, True).reshape(-1, 2, 3))
    nb = n_slices * 7
    ref = R.fd_ssm_quotient(f[:7], f[7:7 + nb].reshape(n_slices, 7), f[7 + nb:].reshape(n_slices, 7), 0.1, 6.0)
    ref_grads = torch.autograd.grad(ref.mean(), list(model.parameters()))
    tol = dict(rtol=2e-5, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss, ref.mean(), **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_fd_ssm_vr_loss_equals_reference_composition():
    d, B, n = 5, 6, 2
    net = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, d)).double()
    x = torch.randn(B, d, dtype=torch.float64)
    loss = fdsm_ext.fd_ssm_vr_loss(net, x, 0.2, n_slices=n, directions="gaussian", reduction="none",
                                   generator=torch.Generator().manual_seed(5))
    seed = _seed_like_the_loss(torch.Generator().manual_seed(5))
    v = R.philox_directions(seed, n * B, d, "gaussian", 0.2, torch.float64).reshape(n, B, d)
    s = net(R.perturb(x, v, False)).reshape(2, n, B, d)
    torch.testing.assert_close(loss, R.fd_ssm_vr(s[0], s[1], v, 0.2, float(d)), rtol=2e-5, atol=1e-8)


def test_fd_dsm_loss_equals_reference_composition():
    d, B = 4, 5
    model = MLPEnergy(d=d, dtype=torch.float64)
    x = torch.randn(B, d, dtype=torch.float64)
    sigma = torch.rand(B, dtype=torch.float64) + 0.1
    loss = fdsm_ext.fd_dsm_loss(model, x, sigma, 0.1, reduction="none", sigma_power=-2.0,
                                generator=torch.Generator().manual_seed(8))
    # the loss draws one seed; the noise z_i is the unscaled gaussian stream row n B + i (here n = 1)
    seed = _seed_like_the_loss(torch.Generator().manual_seed(8))
    noise = sigma[:, None] * R.philox_raw_directions(seed, 2 * B, d, "gaussian")[B:]
    v = R.philox_directions(seed, B, d, "sphere", 0.1, torch.float64).reshape(1, B, d)
    f = model(R.perturb(x + noise, v, False)).reshape(2, 1, B)
    ref = R.fd_dsm_quotient(f[0], f[1], noise, sigma, v, 0.1, float(d)) / sigma**2
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-8)


# --------------------------------------------------------------------------- expectations
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions", KINDS)
def test_fd_ssm_is_unbiased_on_a_quadratic(backend, directions):
    # For f = -1/2 x^T A x the FD quotient has no truncation error: E_v l = 1/2 ||A x||^2 - tr A.
    d, reps = 5, 20000
    q = Quadratic(d)
    x = torch.randn(3, d, dtype=torch.float64)
    per = fdsm_ext.fd_ssm_loss(q, x.repeat(reps, 1), 0.3, directions=directions, backend=backend,
                               reduction="none").reshape(reps, 3)
    mean, se = per.mean(0), per.std(0) / math.sqrt(reps)
    target = q.objective(x).detach()
    assert ((mean - target).abs() < 5 * se + 1e-9).all(), (mean, target, se)


def test_fd_ssm_converges_to_the_sliced_objective_at_second_order():
    # Same seed => the same unit directions u for every eps; the error against the exact per-direction
    # SSM value d [1/2 (u^T s)^2 + u^T (grad s) u] must fall by ~4x when eps halves.
    d, B = 4, 6
    model = MLPEnergy(d=d, dtype=torch.float64)
    x = torch.randn(B, d, dtype=torch.float64)
    seed = _seed_like_the_loss(torch.Generator().manual_seed(0))
    u = fdsm_ext.ops.perturb(torch.zeros(B, d, dtype=torch.float64), seed, 1.0, 1, 0, False)[:B]  # kernel's own u
    xl = x.clone().requires_grad_()
    (s,) = torch.autograd.grad(model(xl).sum(), xl, create_graph=True)
    (hu,) = torch.autograd.grad((s * u).sum(), xl)
    exact = d * (0.5 * (s * u).sum(-1) ** 2 + (hu * u).sum(-1)).detach()
    errs = []
    for eps in (0.4, 0.2, 0.1, 0.05):
        fd = fdsm_ext.fd_ssm_loss(model, x, eps, reduction="none", generator=torch.Generator().manual_seed(0))
        errs.append((fd - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), (errs, ratios)


@pytest.mark.slow
def test_fd_ssm_matches_exact_sm_in_expectation():
    d, reps = 3, 30000
    model = MLPEnergy(d=d, dtype=torch.float64)
    x = torch.randn(2, d, dtype=torch.float64)
    per = fdsm_ext.fd_ssm_loss(model, x.repeat(reps, 1), 0.05, reduction="none").reshape(reps, 2)
    exact = fdsm_ext.exact_sm_loss(model, x, reduction="none").detach()
    se = per.std(0) / math.sqrt(reps)
    assert ((per.mean(0) - exact).abs() < 5 * se + 1e-3 * exact.abs()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_ssm_vr_is_unbiased_on_a_linear_score(backend):
    # s(x) = -A x: l = ||s||^2/2 + d/(2 eps^2) v^T (-2 A v) in expectation = 1/2 ||A x||^2 - tr A.
    d, reps = 4, 20000
    q = Quadratic(d)
    x = torch.randn(2, d, dtype=torch.float64)
    per = fdsm_ext.fd_ssm_vr_loss(lambda y: -y @ q.A, x.repeat(reps, 1), 0.3, backend=backend,
                                  reduction="none").reshape(reps, 2)
    se = per.std(0) / math.sqrt(reps)
    assert ((per.mean(0) - q.objective(x).detach()).abs() < 5 * se + 1e-9).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_dsm_matches_dsm_in_expectation(backend):
    # Same noise (same generator seed, and the noise is drawn first): E_v of FD-DSM = DSM at that noise.
    d, reps = 3, 20000
    q = Quadratic(d)
    x = torch.randn(1, d, dtype=torch.float64).repeat(reps, 1)
    fd = fdsm_ext.fd_dsm_loss(q, x, 0.5, 0.2, backend=backend, reduction="none",
                              generator=torch.Generator().manual_seed(2))
    dsm = fdsm_ext.dsm_loss(q, x, 0.5, reduction="none", generator=torch.Generator().manual_seed(2)).detach()
    diff = fd - dsm
    assert diff.mean().abs() < 5 * diff.std() / math.sqrt(reps)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_directional_derivative_matches_nested_autograd(order, backend):
    d, B = 3, 4
    model = MLPEnergy(d=d, dtype=torch.float64)
    x, v = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    t = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    deriv = model(x + t[:, None] * v)
    for _ in range(order):  # d^k/dt^k f(x + t v) at t = 0, per sample
        (deriv,) = torch.autograd.grad(deriv.sum(), t, create_graph=True)
    # eps balances the O(eps^2) truncation against the O(u / eps^T) round-off of an order-T stencil
    eps = {1: 1e-4, 2: 1e-4, 3: 1e-3, 4: 3e-3}[order]
    fd = fdsm_ext.fd_directional_derivative(model, x, v, order=order, eps=eps, backend=backend)
    torch.testing.assert_close(fd, deriv.detach(), rtol=1e-3, atol=1e-3 * deriv.abs().max().item())


def test_directional_derivative_is_differentiable():
    model = MLPEnergy(d=3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fdsm_ext.fd_directional_derivative(model, a, b, 3, 0.1), (x, v))


# --------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("loss", ["exact", "ssm", "ssm_vr"])
@pytest.mark.parametrize("model_output", ["log_density", "score"])
def test_gradient_based_baselines_on_a_quadratic(loss, model_output):
    d, reps = 4, 4000
    q = Quadratic(d)
    model = q if model_output == "log_density" else (lambda y: -y @ q.A)
    x = torch.randn(2, d, dtype=torch.float64)
    target = q.objective(x).detach()
    if loss == "exact":
        got = fdsm_ext.exact_sm_loss(model, x, reduction="none", model_output=model_output)
        torch.testing.assert_close(got, target)
        return
    fn = fdsm_ext.ssm_loss if loss == "ssm" else fdsm_ext.ssm_vr_loss
    per = fn(model, x.repeat(reps, 1), reduction="none", model_output=model_output).reshape(reps, 2)
    se = per.std(0) / math.sqrt(reps)
    assert ((per.mean(0) - target).abs() < 5 * se + 1e-9).all()


def test_ssm_slices_average():
    q = Quadratic(3)
    x = torch.randn(5, 3, dtype=torch.float64)
    per = fdsm_ext.ssm_loss(q, x, n_slices=4, reduction="none")
    assert per.shape == (5,)


def test_dsm_matches_its_formula():
    q = Quadratic(3)
    x = torch.randn(5, 3, dtype=torch.float64)
    got = fdsm_ext.dsm_loss(q, x, 0.3, reduction="none", generator=torch.Generator().manual_seed(1))
    noise = 0.3 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score = -(x + noise) @ q.A
    torch.testing.assert_close(got, 0.5 * (score + noise / 0.09).square().sum(-1))


def test_annealed_losses_weight_by_sigma_squared():
    sigmas = torch.tensor([1.0, 0.1], dtype=torch.float64)
    q = Quadratic(3)
    score = lambda y, s: -y @ q.A / s[:, None]  # noqa: E731  (T3: s(x)/sigma)
    x = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    for fn in (fdsm_ext.annealed_dsm_loss, fdsm_ext.annealed_ssm_vr_loss, fdsm_ext.annealed_fd_ssm_vr_loss):
        per = fn(score, x, sigmas, labels=labels, reduction="none", generator=torch.Generator().manual_seed(0))
        assert per.shape == (4,) and torch.isfinite(per).all()
    # annealed DSM = sigma^2 * DSM of s(., sigma) at the same noise
    per = fdsm_ext.annealed_dsm_loss(score, x, sigmas, labels=labels, reduction="none",
                                     generator=torch.Generator().manual_seed(0))
    sig = sigmas[labels]
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(per, 0.5 * (sig[:, None] * score(x + sig[:, None] * z, sig) + z).square().sum(-1))


# --------------------------------------------------------------------------- API behaviour
def test_reductions_and_gradients_reach_parameters_and_data():
    model = MLPEnergy(d=3)
    x = torch.randn(4, 3, requires_grad=True)
    per = fdsm_ext.fd_ssm_loss(model, x, reduction="none", generator=torch.Generator().manual_seed(0))
    assert per.shape == (4,)
    total = fdsm_ext.fd_ssm_loss(model, x, reduction="sum", generator=torch.Generator().manual_seed(0))
    mean = fdsm_ext.fd_ssm_loss(model, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(total, per.sum())
    torch.testing.assert_close(mean, per.mean())
    mean.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("loss", ["fd_ssm", "fd_ssm_vr", "fd_dsm"])
def test_same_seed_gives_bitwise_same_loss_and_gradients(loss):
    def run():
        torch.manual_seed(123)
        model = MLPEnergy(d=5)
        x = torch.randn(8, 5)
        if loss == "fd_ssm":
            val = fdsm_ext.fd_ssm_loss(model, x, n_slices=2)
        elif loss == "fd_ssm_vr":
            val = fdsm_ext.fd_ssm_vr_loss(lambda y: model.net(y).expand(-1, 5) - y, x)
        else:
            val = fdsm_ext.fd_dsm_loss(model, x, 0.1)
        return val, torch.autograd.grad(val, list(model.parameters()))

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


# --------------------------------------------------------------------------- eager heads
# Outside torch.compile the fused backends compute the loss from the model's outputs with one op (the
# "eager heads" of csrc/fd_autograd.cpp); under compile, and with losses.EAGER_HEADS off, with the
# blocks' views, the quotient op and the reduction one by one. Both must agree bitwise, values and
# gradients (to the data and to the parameters), for every loss and reduction, on both fused backends.
def _score_of(model, d):
    return lambda y: model.net(y.flatten(1)).expand(-1, d).reshape(y.shape) - y


HEAD_CASES = {
    "fd_ssm": lambda m, x, red, g, be: fdsm_ext.fd_ssm_loss(m, x, 0.1, n_slices=2, reduction=red, generator=g,
                                                            backend=be),
    "fd_ssm_vr": lambda m, x, red, g, be: fdsm_ext.fd_ssm_vr_loss(_score_of(m, 6), x, 0.1, n_slices=2, reduction=red,
                                                                  directions="gaussian", generator=g, backend=be),
    "fd_dsm": lambda m, x, red, g, be: fdsm_ext.fd_dsm_loss(m, x, torch.linspace(0.1, 0.5, 5), 0.1, n_slices=2,
                                                            reduction=red, generator=g, backend=be),
    "fd_dsm(sigma_power)": lambda m, x, red, g, be: fdsm_ext.fd_dsm_loss(m, x, 0.3, 0.1, sigma_power=-2.0,
                                                                         directions="rademacher", reduction=red,
                                                                         generator=g, backend=be),
    # outputs that are views with strides (the heads take their blocks with as_strided)
    "fd_ssm(strided outputs)": lambda m, x, red, g, be: fdsm_ext.fd_ssm_loss(
        lambda y: torch.stack([m(y), -m(y)], 1)[:, 0], x, 0.1, reduction=red, generator=g, backend=be),
    "fd_ssm_vr(strided outputs)": lambda m, x, red, g, be: fdsm_ext.fd_ssm_vr_loss(
        lambda y: _score_of(m, 6)(y.transpose(1, 2)).transpose(1, 2), x, 0.1, reduction=red, generator=g, backend=be),
    "annealed_fd_ssm_vr": lambda m, x, red, g, be: fdsm_ext.annealed_fd_ssm_vr_loss(
        lambda y, sigma: _score_of(m, 6)(y) / sigma.view(-1, 1, 1), x, [1.0, 0.5, 0.1], 0.1, reduction=red,
        generator=g, backend=be),
}
FUSED_BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(
    fdsm_ext._checks.triton_unavailable("cpu") is not None, reason="triton cannot run CPU tensors here"))]


def _node_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {node.name() for node in seen}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_eager_heads_match_the_ops_bitwise(monkeypatch, case, reduction, backend):
    def run(heads: bool):
        monkeypatch.setattr(fdsm_ext.losses, "EAGER_HEADS", heads)
        torch.manual_seed(0)
        model = MLPEnergy(d=6)
        x = torch.randn(5, 2, 3, requires_grad=True)
        val = HEAD_CASES[case](model, x, reduction, torch.Generator().manual_seed(4), backend)
        return val, torch.autograd.grad(val.sum(), [x, *model.parameters()]), _node_names(val)

    (a, ga, nodes_a), (b, gb, nodes_b) = run(True), run(False)
    assert any("Head" in n for n in nodes_a) and not any("Head" in n for n in nodes_b)  # each path was taken
    assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


@pytest.mark.parametrize("case", ["fd_ssm", "fd_ssm_vr", "fd_dsm"])
def test_eager_heads_have_a_double_backward(case):
    # gradcheck and gradgradcheck of the loss w.r.t. the data (a gradient penalty through an FD loss):
    # the heads' backward calls the backward ops, whose own autograd gives the second derivative.
    torch.manual_seed(0)
    model = MLPEnergy(d=6, dtype=torch.float64)

    def loss(x):
        return HEAD_CASES[case](model, x, "mean", torch.Generator().manual_seed(2), "cpp")

    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert any("Head" in n for n in _node_names(loss(x)))
    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_get_fp32_losses(dtype):
    model = MLPEnergy(d=3, dtype=dtype)
    x = torch.randn(6, 3, dtype=dtype)
    loss = fdsm_ext.fd_ssm_loss(model, x, 0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())


def test_model_returning_n_by_1_is_accepted():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    assert fdsm_ext.fd_ssm_loss(net, torch.randn(5, 3)).shape == ()


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, 0.0), ValueError, "eps"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, -0.1), ValueError, "eps"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, float("inf")), ValueError, "eps"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, "big"), ValueError, "eps"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, [0.1]), TypeError, "eps"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, chunk_size=0), ValueError, "chunk_size"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, on_nonfinite="nan"), ValueError, "on_nonfinite"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x[:0]), ValueError, "empty batch"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x[:, 0]), ValueError, "x"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x.long()), TypeError, "x"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x.tolist()), TypeError, "x"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, n_slices=0), ValueError, "n_slices"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, directions="cube"), ValueError, "directions"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, reduction="max"), ValueError, "reduction"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(m, x, backend="cuda"), ValueError, "backend"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(lambda y: y, x), ValueError, "log_density"),
    (lambda m, x: fdsm_ext.fd_ssm_loss(lambda y: y.sum(), x), ValueError, "log_density"),
    (lambda m, x: fdsm_ext.fd_ssm_vr_loss(lambda y: y.sum(-1), x), ValueError, "score"),
    (lambda m, x: fdsm_ext.fd_dsm_loss(m, x, 0.0), ValueError, "sigma"),
    (lambda m, x: fdsm_ext.fd_dsm_loss(m, x, -torch.ones(4)), ValueError, "sigma"),
    (lambda m, x: fdsm_ext.fd_dsm_loss(m, x, torch.ones(3)), ValueError, "sigma"),
    (lambda m, x: fdsm_ext.annealed_dsm_loss(lambda y, s: y, x, []), ValueError, "sigmas"),
    (lambda m, x: fdsm_ext.annealed_dsm_loss(lambda y, s: y, x, [1.0, -1.0]), ValueError, "sigmas"),
    (lambda m, x: fdsm_ext.fd_directional_derivative(m, x, x[:2]), ValueError, "v"),
    (lambda m, x: fdsm_ext.fd_directional_derivative(m, x, x, order=0), ValueError, "order"),
    (lambda m, x: fdsm_ext.ssm_loss(m, x, model_output="energy"), ValueError, "model_output"),
])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call(MLPEnergy(d=3), torch.randn(4, 3))


def test_unavailable_backend_raises_a_clear_error(monkeypatch):
    # (whether triton can run here depends on the machine: tests/triton/test_dispatch.py covers both cases)
    monkeypatch.setattr(fdsm_ext._checks, "triton_unavailable", lambda device_type: "triton is not installed")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu tensors: triton is not installed"):
        fdsm_ext.fd_ssm_loss(MLPEnergy(d=3), torch.randn(4, 3), backend="triton")


def test_baselines_point_to_fd_when_double_backward_is_missing():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    model = lambda y: OnceDifferentiable.apply(y).sum(-1)  # noqa: E731
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="fd_ssm_loss"):
        fdsm_ext.ssm_loss(model, x).backward()
    assert torch.isfinite(fdsm_ext.fd_ssm_loss(model, x))


def test_the_seed_is_drawn_from_the_cpu_generator_whatever_the_default_device():
    from fdsm_ext import _checks

    torch.manual_seed(3)
    want = _checks.draw_seed(None)
    torch.set_default_device("meta")
    try:
        torch.manual_seed(3)
        got = _checks.draw_seed(None)
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and torch.equal(got, want)

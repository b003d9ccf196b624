"""ode_likelihood and its divergence estimators against closed forms (float64, fixed seeds).

For Gaussian data N(mu, C) the VE-perturbed score is known at every sigma, s(x, sigma) = -(C + sigma^2
I)^-1 (x - mu), and so is the probability-flow path: with C = Q diag(lam) Q^T, x(1) - mu = Q
diag(sqrt((lam + sigma_max^2) / (lam + sigma_min^2))) Q^T (x(0) - mu), and the divergence integral is
1/2 sum_j ln((lam_j + sigma_max^2) / (lam_j + sigma_min^2)). ode_likelihood's answer, -(log N(x(1); 0,
sigma_max^2 I) + that integral), is then known exactly for every point. For a Gaussian mixture the
perturbed density is known (each component's variance + sigma^2) but the path is not: the check uses
log p_0(x) = log p_1(z) + integral with the returned z.
"""

import math

import pytest
import torch

from fdsm_ext import numerics
from fdsm_ext.likelihood import (
    LikelihoodResult,
    auto_divergence_eps,
    exact_divergence,
    fd_divergence,
    fused_fd_divergence,
    hutchinson_divergence,
    ode_likelihood,
    stream_probes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SMIN, SMAX = 0.01, 20.0
#: |z| bound of the Monte-Carlo checks (per sample, deterministic seeds: a 5-sigma miss is a bug).
Z_MAX = 5.0


class Gaussian:
    """N(mu, Q diag(lam) Q^T) in d dimensions, with its VE-perturbed score and exact ODE path."""

    def __init__(self, d: int, seed: int, isotropic_basis: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.d = d
        self.mu = torch.randn(d, generator=g, dtype=F64)
        self.lam = torch.rand(d, generator=g, dtype=F64) * 1.5 + 0.2
        self.Q = torch.eye(d, dtype=F64) if isotropic_basis else torch.linalg.qr(torch.randn(d, d, generator=g,
                                                                                              dtype=F64))[0]

    def score(self, x, sigma):
        y = (x.reshape(x.shape[0], -1) - self.mu) @ self.Q
        return (-(y / (self.lam + sigma[:, None] ** 2)) @ self.Q.T).reshape(x.shape)

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        return self.mu + (torch.randn(n, self.d, generator=g, dtype=F64) * self.lam.sqrt()) @ self.Q.T

    def log_density(self, x, sigma):
        y = (x - self.mu) @ self.Q
        var = self.lam + sigma**2
        return -0.5 * (torch.log(2 * math.pi * var).sum() + (y.square() / var).sum(-1))

    def expected(self, x0, smin=SMIN, smax=SMAX):
        """(nll, z) that ode_likelihood must return for x0, with its N(0, smax^2 I) prior."""
        ratio = ((self.lam + smax**2) / (self.lam + smin**2)).sqrt()
        z = self.mu + (((x0 - self.mu) @ self.Q) * ratio) @ self.Q.T
        prior = -0.5 * self.d * math.log(2 * math.pi * smax**2) - z.square().sum(-1) / (2 * smax**2)
        return -(prior + torch.log(ratio).sum()), z


class Mixture:
    """A 2-D mixture of isotropic Gaussians; perturbed at sigma, component k has variance s_k^2 + sigma^2."""

    def __init__(self):
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
        self.m = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
        self.s2 = torch.tensor([0.3, 0.1, 0.5], dtype=F64) ** 2

    def _parts(self, x, sigma):
        var = self.s2 + (sigma[:, None] ** 2 if isinstance(sigma, torch.Tensor) else sigma**2)  # (N, K)
        diff = x[:, None, :] - self.m
        logc = torch.log(self.w) - torch.log(2 * math.pi * var) - diff.square().sum(-1) / (2 * var)
        return var, diff, logc

    def score(self, x, sigma):
        var, diff, logc = self._parts(x, sigma)
        return -(torch.softmax(logc, -1)[..., None] * diff / var[..., None]).sum(1)

    def log_density(self, x, sigma):
        return torch.logsumexp(self._parts(x, sigma)[2], -1)

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        return self.m[k] + torch.randn(n, 2, generator=g, dtype=F64) * self.s2[k].sqrt()[:, None]



def _z(result: LikelihoodResult, expected):
    assert result.nll_se is not None and bool((result.nll_se > 0).all()), "a z-test needs a spread"
    return (result.nll - expected) / result.nll_se


# --------------------------------------------------------------------------- Gaussian data, closed form
def test_exact_divergence_matches_the_closed_form_gaussian_likelihood():
    gauss = Gaussian(4, seed=0)
    x0 = gauss.sample(6, seed=1)
    nll, z = gauss.expected(x0)
    r = ode_likelihood(gauss.score, x0, SMIN, SMAX, divergence="exact", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(r.z, z, rtol=1e-7, atol=1e-6)  # |z| ~ 20-40: solver error
    torch.testing.assert_close(r.nll, nll, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.bpd, r.nll / (4 * math.log(2)), rtol=1e-12, atol=0)
    assert torch.equal(r.nll_se, torch.zeros(6, dtype=F64)) and r.nfe > 0


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
@pytest.mark.parametrize("divergence", ["fd", "hutchinson"])
def test_estimators_are_unbiased_for_the_closed_form_gaussian_likelihood(divergence, probes):
    gauss = Gaussian(4, seed=0)  # a rotated covariance: the Jacobian is not diagonal, so probes have spread
    x0 = gauss.sample(6, seed=1)
    nll, _ = gauss.expected(x0)
    r = ode_likelihood(gauss.score, x0, SMIN, SMAX, divergence=divergence, n_probes=24, probes=probes,
                       generator=torch.Generator().manual_seed(2), rtol=1e-6, atol=1e-6)
    assert bool((_z(r, nll).abs() < Z_MAX).all()), _z(r, nll)
    torch.testing.assert_close(r.bpd_se, r.nll_se / (4 * math.log(2)))


def test_fd_agrees_with_hutchinson_probe_for_probe():
    gauss = Gaussian(4, seed=3)
    x0 = gauss.sample(5, seed=4)
    kw = dict(n_probes=8, rtol=1e-8, atol=1e-8)
    fd = ode_likelihood(gauss.score, x0, SMIN, SMAX, divergence="fd", generator=torch.Generator().manual_seed(5), **kw)
    hu = ode_likelihood(gauss.score, x0, SMIN, SMAX, divergence="hutchinson",
                        generator=torch.Generator().manual_seed(5), **kw)
    # the same probes; a linear score makes the central difference exact up to round-off
    torch.testing.assert_close(fd.nll, hu.nll, rtol=0, atol=1e-7)
    torch.testing.assert_close(fd.nll_se, hu.nll_se, rtol=0, atol=1e-7)


def test_one_probe_has_no_standard_error_and_rademacher_is_exact_for_a_diagonal_jacobian():
    gauss = Gaussian(3, seed=6, isotropic_basis=True)
    x0 = gauss.sample(4, seed=7)
    nll, _ = gauss.expected(x0)
    r = ode_likelihood(gauss.score, x0, SMIN, SMAX, generator=torch.Generator().manual_seed(8), rtol=1e-8, atol=1e-8)
    assert r.nll_se is None and r.bpd_se is None
    torch.testing.assert_close(r.nll, nll, rtol=0, atol=1e-6)  # v_j^2 = 1: v^T diag v = trace


def test_dequantized_bits_per_dim_follow_the_256_level_convention():
    """x = k/255 images; the model sees y = lo + (hi - lo)(k + u)/256; bpd = (-ln p(y) + d ln 256 - d ln(hi - lo))
    / (d ln 2). score_sde's centered data, (lo, hi) = (-1, 1), gives its offset of 7 bits."""
    B, shape = 3, (3, 2, 2)
    d = math.prod(shape)
    gauss = Gaussian(d, seed=9, isotropic_basis=True)
    gauss.mu = torch.zeros(d, dtype=F64)
    gauss.lam = torch.full((d,), 0.25, dtype=F64)
    g = torch.Generator().manual_seed(10)
    k = torch.randint(0, 256, (B, *shape), generator=g).to(F64)
    score = lambda x, sigma: gauss.score(x.reshape(x.shape[0], d), sigma).reshape(x.shape)  # noqa: E731
    r = ode_likelihood(score, k / 255, SMIN, SMAX, dequantize="uniform", data_range=(-1.0, 1.0),
                       generator=torch.Generator().manual_seed(11), rtol=1e-8, atol=1e-8)
    u = torch.rand((B, d), generator=torch.Generator().manual_seed(11), dtype=F64)  # drawn first, before probes
    y = -1 + 2 * (k.reshape(B, d) + u) / 256
    nll_y, z = gauss.expected(y)
    nll = nll_y + d * math.log(256) - d * math.log(2.0)
    torch.testing.assert_close(r.z, z.reshape(B, *shape), rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(r.nll, nll, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.bpd, r.nll / (d * math.log(2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.bpd, nll_y / (d * math.log(2)) + 7.0, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- a mixture: analytic density
def _mixture_truth(mix, x0, r):
    """-log p_0(x0) implied by r: its nll with the N(0, SMAX^2) prior swapped for the true p_1 at its z."""
    prior = -math.log(2 * math.pi * SMAX**2) - r.z.square().sum(-1) / (2 * SMAX**2)
    return r.nll + prior - mix.log_density(r.z, SMAX), -mix.log_density(x0, SMIN)


def test_exact_divergence_matches_the_mixture_density():
    mix = Mixture()
    x0 = mix.sample(8, seed=12)
    r = ode_likelihood(mix.score, x0, SMIN, SMAX, divergence="exact", rtol=1e-7, atol=1e-7)
    got, want = _mixture_truth(mix, x0, r)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("divergence", ["fd", "hutchinson"])
def test_estimators_are_unbiased_for_the_mixture_density(divergence):
    mix = Mixture()
    x0 = mix.sample(8, seed=12)
    r = ode_likelihood(mix.score, x0, SMIN, SMAX, divergence=divergence, n_probes=16,
                       generator=torch.Generator().manual_seed(13), rtol=1e-6, atol=1e-6)
    got, want = _mixture_truth(mix, x0, r)
    assert r.nll_se is not None and bool((r.nll_se > 0).all())
    assert bool((((got - want) / r.nll_se).abs() < Z_MAX).all()), (got - want) / r.nll_se


@pytest.mark.parametrize("eps", ["auto", 1e-4])
def test_fd_agrees_with_hutchinson_on_the_mixture(eps):
    mix = Mixture()
    x0 = mix.sample(6, seed=14)
    kw = dict(n_probes=4, rtol=1e-7, atol=1e-7)
    fd = ode_likelihood(mix.score, x0, SMIN, SMAX, divergence="fd", eps=eps,
                        generator=torch.Generator().manual_seed(15), **kw)
    hu = ode_likelihood(mix.score, x0, SMIN, SMAX, divergence="hutchinson",
                        generator=torch.Generator().manual_seed(15), **kw)
    torch.testing.assert_close(fd.nll, hu.nll, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the FD divergence itself
def _mixture_fn(sigma):
    mix = Mixture()
    return lambda y: mix.score(y, torch.full((y.shape[0],), sigma, dtype=y.dtype))


def test_fd_divergence_error_falls_like_eps_squared():
    fn = _mixture_fn(0.2)
    x = Mixture().sample(256, seed=16)
    v = torch.randint(0, 2, (2, 256, 2), generator=torch.Generator().manual_seed(17)).to(F64) * 2 - 1
    _, exact = hutchinson_divergence(fn, x, v)
    eps = torch.logspace(-3, math.log10(3e-2), 7, dtype=F64)
    err = torch.stack([(fd_divergence(fn, x, v, float(e))[1] - exact).abs().sum() for e in eps])
    slope = torch.linalg.lstsq(torch.stack([eps.log(), torch.ones_like(eps)], 1), err.log()[:, None]).solution[0, 0]
    assert 1.9 < float(slope) < 2.1, (slope, err)


def test_fd_divergence_is_one_stacked_call_whose_mean_is_the_center():
    calls = []
    fn0 = _mixture_fn(0.5)

    def fn(y):
        calls.append(y.shape[0])
        assert not torch.is_grad_enabled()
        return fn0(y)

    x = Mixture().sample(5, seed=18)
    v = torch.randn(3, 5, 2, dtype=F64)
    with torch.no_grad():
        f0, div = fd_divergence(fn, x, v, 1e-4)
    assert calls == [2 * 3 * 5] and div.shape == (3, 5) and f0.shape == (5, 2)
    # the mean of the sides is fn(x) + eps^2/2 mean_k d^2 fn[v_k, v_k]: |fn''| < 30 here, |v|^2 < 20
    torch.testing.assert_close(f0, fn0(x), rtol=0, atol=1e-4**2 * 300)
    assert not torch.equal(f0, fn0(x))
    # per-sample eps as a (B,) tensor gives each row its own step
    _, div_rows = fd_divergence(fn0, x, v, torch.full((5,), 1e-4, dtype=F64))
    torch.testing.assert_close(div_rows, div, rtol=1e-12, atol=0)


def test_exact_divergence_is_the_trace():
    fn = _mixture_fn(0.3)
    x = Mixture().sample(4, seed=19)
    _, tr = exact_divergence(fn, x)
    jac = torch.stack([torch.autograd.functional.jacobian(fn, x[i:i + 1])[0, :, 0, :] for i in range(4)])
    torch.testing.assert_close(tr[0], jac.diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("sigma", [0.01, 0.3, 10.0])
def test_auto_eps_resolves_the_divergence_in_float32(sigma):
    """The FD divergence in float32 at auto_divergence_eps is within 2e-3 of the float64 value (measured:
    1e-5 to 2e-4 for this mixture; the bound leaves room for another CPU's rounding)."""
    fn64 = _mixture_fn(sigma)
    x = Mixture().sample(256, seed=20) + sigma * torch.randn(256, 2, dtype=F64)
    v = torch.randint(0, 2, (1, 256, 2), generator=torch.Generator().manual_seed(21)).to(F64) * 2 - 1
    _, exact = hutchinson_divergence(fn64, x, v)
    eps = auto_divergence_eps(torch.float32, sigma, float(x.square().mean().sqrt()))
    mix32 = Mixture()
    for name in ("w", "m", "s2"):
        setattr(mix32, name, getattr(mix32, name).float())
    _, fd = fd_divergence(lambda y: mix32.score(y, torch.full((y.shape[0],), sigma)), x.float(), v.float(), eps)
    assert float((fd.double() - exact).abs().mean() / exact.abs().mean()) < 2e-3


def test_fd_likelihood_runs_without_autograd_in_float32():
    """divergence='fd' never builds a graph: a score that refuses grad mode works, in float32 too."""
    mix = Mixture()

    def score(x, sigma):
        assert not torch.is_grad_enabled() and not x.requires_grad
        return mix.score(x.double(), sigma.double()).float()

    x0 = mix.sample(8, seed=22)
    r32 = ode_likelihood(score, x0.float(), SMIN, SMAX, n_probes=2, generator=torch.Generator().manual_seed(23))
    r64 = ode_likelihood(mix.score, x0, SMIN, SMAX, n_probes=2, generator=torch.Generator().manual_seed(23),
                         rtol=1e-8, atol=1e-8)
    assert r32.nll.dtype == torch.float32 and r32.z.dtype == torch.float32
    # float32 solve at rtol = atol = 1e-5 against the float64 one with the same probes: measured 1.6e-4
    torch.testing.assert_close(r32.nll.double(), r64.nll, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_data_is_integrated_in_float32(dtype):
    mix = Mixture()
    score = lambda x, sigma: mix.score(x.double(), sigma.double()).to(x.dtype)  # noqa: E731
    x0 = mix.sample(4, seed=24)
    r = ode_likelihood(score, x0.to(dtype), SMIN, SMAX, n_probes=2, generator=torch.Generator().manual_seed(25))
    want = ode_likelihood(mix.score, x0.to(dtype).double(), SMIN, SMAX, n_probes=2,
                          generator=torch.Generator().manual_seed(25))
    assert r.nll.dtype == torch.float32 and r.z.dtype == dtype
    # the score sees x +- eps v (and returns s) rounded to the half dtype, eps following its round-off;
    # measured 2e-3 (float16) and 2e-2 (bfloat16, 8x float16's unit round-off) nats, bounds 10x and 5x that
    torch.testing.assert_close(r.nll.double(), want.nll, rtol=0, atol={torch.float16: 0.02, torch.bfloat16: 0.1}[dtype])


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_autograd_divergences_name_a_score_without_backward(divergence):
    def score(x, sigma):
        return (-x).detach()

    with pytest.raises(RuntimeError, match="divergence='fd' needs no backward"):
        ode_likelihood(score, torch.ones(2, 2, dtype=F64), SMIN, SMAX, divergence=divergence)


def test_non_finite_score_raises():
    def score(x, sigma):
        return torch.where(sigma[:, None] > 1.0, torch.nan, -x)

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        ode_likelihood(score, torch.zeros(2, 2, dtype=F64), SMIN, SMAX)


# --------------------------------------------------------------------------- bad input
def _score(x, sigma):
    return -x


BAD = [
    (dict(score_fn=None), "score_fn"),
    (dict(x=[[0.0]]), "x"),
    (dict(x=torch.zeros(3, dtype=F64)), "x"),
    (dict(x=torch.zeros(0, 2, dtype=F64)), "x"),
    (dict(x=torch.zeros(2, 2, dtype=torch.int64)), "x"),
    (dict(x=torch.full((2, 2), math.nan, dtype=F64)), "x"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=math.nan), "sigma_min"),
    (dict(sigma_max=-1.0), "sigma_max"),
    (dict(sigma_max="5"), "sigma_max"),
    (dict(sigma_min=2.0, sigma_max=1.0), "sigma_min"),
    (dict(divergence="autograd"), "divergence"),
    (dict(n_probes=0), "n_probes"),
    (dict(n_probes=2.0), "n_probes"),
    (dict(n_probes=True), "n_probes"),
    (dict(divergence="exact", n_probes=2), "n_probes"),
    (dict(eps=0.0), "eps"),
    (dict(eps=math.inf), "eps"),
    (dict(eps="small"), "eps"),
    (dict(divergence="hutchinson", eps=1e-3), "eps"),
    (dict(rtol=0.0), "rtol"),
    (dict(atol=-1e-5), "atol"),
    (dict(dequantize="logit"), "dequantize"),
    (dict(dequantize="uniform", x=torch.full((2, 2), 2.0, dtype=F64)), "x"),
    (dict(dequantize="uniform", x=torch.full((2, 2), 0.5, dtype=F64)), "x"),  # not a level k/255
    (dict(data_range=(1.0, -1.0)), "data_range"),
    (dict(data_range=(0.0, math.inf)), "data_range"),
    (dict(data_range=1.0), "data_range"),
    (dict(generator=0), "generator"),
    (dict(probes="sphere"), "probes"),
    (dict(method="euler"), "method"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(score_fn=_score, x=torch.zeros(2, 2, dtype=F64), sigma_min=0.01, sigma_max=1.0)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=name):
        ode_likelihood(args.pop("score_fn"), args.pop("x"), args.pop("sigma_min"), args.pop("sigma_max"), **args)


def test_score_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match="score_fn"):
        ode_likelihood(lambda x, s: x[:, :1], torch.zeros(2, 2, dtype=F64), 0.01, 1.0)


# --------------------------------------------------------------------------- the fused FD divergence
def _backends():
    yield "cpp"
    try:
        from fdsm_ext.triton import unavailable_reason
    except ImportError as exc:
        yield pytest.param("triton", marks=pytest.mark.skip(reason=f"triton: {exc}"))
        return
    reason = unavailable_reason("cpu")
    yield pytest.param("triton", marks=[pytest.mark.skip(reason=reason)] if reason else [])


class Swirl:
    """A smooth nonlinear field f(y) = -y + 1/2 sin(y M) with a known Lipschitz bound L = 1 + ||M||_2 / 2."""

    def __init__(self, d, dtype):
        self.M = torch.randn(d, d, generator=torch.Generator().manual_seed(31), dtype=F64).to(dtype) / math.sqrt(d)
        self.L = 1.0 + 0.5 * float(torch.linalg.matrix_norm(self.M.double(), 2))

    def __call__(self, y):
        return -y + 0.5 * torch.sin(y @ self.M)


@pytest.mark.parametrize("backend", list(_backends()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_fused_and_unfused_fd_divergences_agree_within_round_off(backend, dtype, probes):
    """The fused path (perturb + the fd_divergence op) is fd_divergence on the kernels' probes, up to rounding.

    Error model: the two stacked batches differ only in how x +- eps v is rounded (the fused step eps is
    rounded through h = eps sqrt(d) and h / sqrt(d): a few u), so |dx| <= 4 u (|x| + eps |v|) per coordinate
    and the field's values differ by L |dx|_inf plus their own rounding u |f|; the difference of the sides
    is divided by 2 eps and dotted with v, whose sum both round at (d + 2) u. Hence
    |fused - unfused| <= sum_j |v_j| (u (|f+_j| + |f-_j|) + 8 u L max(|x| + eps |v|)) / (2 eps) + (d + 2) u
    |v|.|f+ - f-| / (2 eps), doubled for the float32 product in the kernels; f0 likewise without the 1/eps.
    """
    n, B, d, eps = 3, 7, 9, 1e-2 if dtype == torch.float32 else 1e-4
    fn = Swirl(d, dtype)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(32), dtype=F64).to(dtype)
    seed = torch.tensor([0xC0FFEE, 9], dtype=torch.int64)
    v = stream_probes(seed, n, B, d, probes, backend=backend, dtype=dtype)
    assert v.dtype == dtype and v.shape == (n, B, d)
    if probes == "rademacher":
        assert bool((v.abs() == 1).all())
    f0_ref, div_ref = fd_divergence(fn, x, v, eps)
    f0, div = fused_fd_divergence(fn, x, seed, eps, n, probes, backend)
    assert div.shape == (n, B) and div.dtype == dtype and f0.shape == (B, d) and f0.dtype == dtype

    u = numerics.unit_roundoff(dtype)
    sp, sm = fn((x + eps * v).reshape(n * B, d)).reshape(n, B, d), fn((x - eps * v).reshape(n * B, d)).reshape(n, B, d)
    dx = 4 * u * (x.abs().max() + eps * v.abs().max())
    per = u * (sp.abs() + sm.abs()) + 2 * fn.L * dx
    div_bound = 2 * ((v.abs() * per).sum(-1) + (d + 2) * u * (v * (sp - sm)).abs().sum(-1)) / (2 * eps)
    assert bool(((div - div_ref).abs() <= div_bound).all()), ((div - div_ref).abs().max(), div_bound.min())
    assert bool(((f0 - f0_ref).abs() <= 2 * per.max(0).values).all())
    # the bound is tight enough to matter: a probe off by one sign, or eps off by 1 %, would break it
    assert float(div_bound.max()) < 0.01 * float(div_ref.abs().mean())


def test_fused_fd_divergence_makes_one_stacked_call_under_no_grad():
    calls, fn0 = [], _mixture_fn(0.5)

    def fn(y):
        calls.append(tuple(y.shape))
        assert not torch.is_grad_enabled()
        return fn0(y)

    x = Mixture().sample(5, seed=33)
    with torch.no_grad():
        f0, div = fused_fd_divergence(fn, x, torch.tensor([1, 2]), 1e-4, 3, "gaussian")
    assert calls == [(2 * 3 * 5, 2)] and div.shape == (3, 5)
    torch.testing.assert_close(f0, fn0(x), rtol=0, atol=1e-4**2 * 300)  # as fd_divergence's center


def test_fused_fd_divergence_names_a_bad_choice():
    x, seed = torch.zeros(2, 3, dtype=F64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="probes"):
        fused_fd_divergence(lambda y: -y, x, seed, 1e-3, 1, "sphere")
    with pytest.raises(ValueError, match="backend"):
        stream_probes(seed, 1, 2, 3, backend="torch")
    with pytest.raises(RuntimeError, match="`eps`"):  # the op's own check
        fused_fd_divergence(lambda y: -y, x, seed, 0.0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fd_and_hutchinson_see_the_same_probes_on_every_backend(backend):
    gauss = Gaussian(4, seed=3)
    x0 = gauss.sample(5, seed=4)
    kw = dict(n_probes=4, rtol=1e-8, atol=1e-8, backend=backend)
    runs = [ode_likelihood(gauss.score, x0, SMIN, SMAX, divergence=div, generator=torch.Generator().manual_seed(5),
                           **kw) for div in ("fd", "hutchinson")]
    torch.testing.assert_close(runs[0].nll, runs[1].nll, rtol=0, atol=1e-7)  # linear score: FD exact but round-off
    again = ode_likelihood(gauss.score, x0, SMIN, SMAX, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(again.nll, runs[0].nll)  # reproducible from the generator
    other = ode_likelihood(gauss.score, x0, SMIN, SMAX, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(other.nll_se, runs[0].nll_se)


def test_unfused_fd_likelihood_is_unbiased_too():
    # backend="torch" keeps the composite path (torch's RNG, torch.cat, einsum): the same estimator
    gauss = Gaussian(4, seed=0)
    x0 = gauss.sample(6, seed=1)
    nll, _ = gauss.expected(x0)
    r = ode_likelihood(gauss.score, x0, SMIN, SMAX, n_probes=24, backend="torch",
                       generator=torch.Generator().manual_seed(2), rtol=1e-6, atol=1e-6)
    assert bool((_z(r, nll).abs() < Z_MAX).all()), _z(r, nll)


@pytest.mark.parametrize("backend", [p for p in _backends() if not isinstance(p, str)])
def test_triton_likelihood_matches_cpp(backend):
    # one seed, the same probes and the same formula: the solves agree to the kernels' rounding
    mix = Mixture()
    x0 = mix.sample(3, seed=34)
    kw = dict(n_probes=2, rtol=1e-4, atol=1e-4)
    got = ode_likelihood(mix.score, x0, SMIN, SMAX, backend=backend, generator=torch.Generator().manual_seed(35), **kw)
    want = ode_likelihood(mix.score, x0, SMIN, SMAX, backend="cpp", generator=torch.Generator().manual_seed(35), **kw)
    assert got.nfe == want.nfe
    torch.testing.assert_close(got.nll, want.nll, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- the benchmark keeps running
def test_bench_likelihood_smoke(monkeypatch):
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import bench_likelihood

    torch.manual_seed(0)
    row = bench_likelihood.run_model("MLP", bench_likelihood.mlp_score(4, 8), torch.rand(3, 4), 0.01, 1.0, pairs=2,
                                     n_probes=2, tol=1e-2, mem_batch=5,
                                     device=torch.device("cpu"))
    assert row["ratio_fd_over_hutchinson"]["median"] > 0 and row["nfe_fd"] > 0
    assert math.isfinite(row["bpd_sd_per_probe_fd"]) and math.isfinite(row["bpd_sd_per_probe_hutchinson"])
    assert "| MLP | 3 x 4 |" in bench_likelihood.table([row])

"""The fused Langevin step against its reference, and the annealed sampler and NCSNv2 recipe helpers."""

import copy
import math
import warnings

import pytest
import torch
from torch.testing._internal.optests import opcheck

import fdsm_ext
from fdsm_ext import ops
from fdsm_ext import reference as R

from conftest import DTYPES, assert_close, make_seed, strided


def _kernel_noise(seed, shape, dtype):
    """The kernel's own z: with x = s = 0 and alpha = 1/2, x_new = sqrt(1) z exactly."""
    zeros = torch.zeros(shape, dtype=R.acc_dtype(dtype))
    return ops.langevin_step(zeros, zeros, 0.5, seed)[0]


# --------------------------------------------------------------------------- the noise stream
@pytest.mark.parametrize("shape", [(6, 37), (3, 2, 5, 3)])
def test_noise_is_the_gaussian_direction_stream(shape):
    seed = make_seed(2024, 9)
    z = _kernel_noise(seed, shape, torch.float32)
    # polynomial ln/sin/cos in the kernel vs exact ones in the reference: a few float32 ulps
    torch.testing.assert_close(z, R.langevin_noise(seed, z), rtol=2e-6, atol=1e-6)


def test_noise_of_a_sample_does_not_depend_on_the_batch():
    # row = sample index: the first rows of a bigger batch are the smaller batch's noise
    seed = make_seed(5)
    assert torch.equal(_kernel_noise(seed, (3, 10), torch.float32), _kernel_noise(seed, (8, 10), torch.float32)[:3])
    assert not torch.equal(_kernel_noise(seed, (3, 10), torch.float32), _kernel_noise(make_seed(5, 1), (3, 10),
                                                                                        torch.float32))


def test_noise_statistics():
    z = _kernel_noise(make_seed(11, 3), (500, 200), torch.float64).flatten()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() / (z**2).mean() ** 2 - 3) < 0.1


# --------------------------------------------------------------------------- values vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (4, 3, 5, 2)])
@pytest.mark.parametrize("alpha_kind", ["float", "per_sample"])
@pytest.mark.parametrize("clamp", [(None, None), (-1.0, 1.5), (None, 0.5)])
def test_langevin_step_matches_reference(dtype, shape, alpha_kind, clamp):
    x, s = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 3
    alpha = 0.07 if alpha_kind == "float" else torch.rand(shape[0]) * 0.2
    seed = make_seed(77, 5)
    z = _kernel_noise(seed, shape, dtype)
    ref, ref_norms = R.langevin_step(x, s, alpha, z, *clamp)
    out, norms = ops.langevin_step(x, s, alpha, seed, *clamp, return_norms=True)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert norms.dtype == R.loss_dtype(dtype) and norms.shape == (3, shape[0])
    assert_close(out, ref)
    assert_close(norms, ref_norms, dtype)
    # strided inputs give the same values
    out_s, norms_s = ops.langevin_step(strided(x), strided(s), alpha, seed, *clamp, return_norms=True)
    assert torch.equal(out_s, out) and torch.equal(norms_s, norms)
    # without norms: the same x_new and an empty (3, 0) norms tensor
    out_n, none = ops.langevin_step(x, s, alpha, seed, *clamp)
    assert torch.equal(out_n, out) and none.shape == (3, 0)


def test_samples_longer_than_a_tile():
    # The CPU kernel splits a sample into tiles of 4096 elements: the norms sum over every tile.
    shape = (2, 3 * 4096 + 5)
    x, s, seed = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64), make_seed(3)
    out, norms = ops.langevin_step(x, s, 0.01, seed, return_norms=True)
    ref, ref_norms = R.langevin_step(x, s, 0.01, _kernel_noise(seed, shape, torch.float64))
    assert_close(out, ref)
    assert_close(norms, ref_norms)


def test_norms_do_not_depend_on_the_thread_count():
    x, s, seed = torch.randn(3, 20000), torch.randn(3, 20000), make_seed(8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.langevin_step(x, s, 0.1, seed, return_norms=True)
        torch.set_num_threads(max(2, old))
        many = ops.langevin_step(x, s, 0.1, seed, return_norms=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_nan_passes_through_the_clamp_and_zero_step_keeps_x():
    x, s = torch.randn(2, 9), torch.randn(2, 9)
    s[1, 4] = float("nan")
    out, norms = ops.langevin_step(x, s, 0.1, make_seed(), -1.0, 1.0, return_norms=True)
    assert out[1, 4].isnan() and out[0].isfinite().all() and out[1].isnan().sum() == 1
    assert norms[0, 1].isnan() and norms[0, 0].isfinite() and norms[1].isfinite().all()
    assert out[torch.isfinite(out)].abs().max() <= 1.0
    assert torch.equal(ops.langevin_step(x, s, 0.0, make_seed())[0][0], x[0])


# --------------------------------------------------------------------------- the noise scale b
def _kernel_sqrt2(alpha, dtype):
    """sqrt(2 alpha) as the kernels compute it when noise_scale is None: from alpha rounded to the
    accumulation dtype, in float64, rounded to the accumulation dtype."""
    acc = R.acc_dtype(dtype)
    a = torch.as_tensor(alpha, dtype=torch.float64).to(acc)
    return torch.sqrt(2.0 * a.double()).to(acc).reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (4, 3, 5, 2)])
@pytest.mark.parametrize("b_kind", ["float", "one", "per_sample", "per_sample_f64_strided"])
@pytest.mark.parametrize("clamp", [(None, None), (-1.0, 1.5)])
def test_noise_scale_matches_reference(dtype, shape, b_kind, clamp):
    # x + a s + b z with b given: the VE predictor's a = delta, b = sqrt(delta), and b independent of a
    x, s = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 3
    alpha = torch.rand(shape[0]) * 0.2
    B = shape[0]
    b = {"float": 0.37, "one": torch.tensor([0.37], dtype=torch.float16),
         "per_sample": torch.rand(B) + 0.1,
         "per_sample_f64_strided": (torch.rand(2 * B, dtype=torch.float64) + 0.1)[::2]}[b_kind]
    seed = make_seed(78, 2)
    z = _kernel_noise(seed, shape, dtype)
    ref, ref_norms = R.langevin_step(x, s, alpha, z, *clamp, noise_scale=b)
    out, norms = ops.langevin_step(x, s, alpha, seed, *clamp, return_norms=True, noise_scale=b)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert_close(out, ref)
    assert_close(norms, ref_norms, dtype)
    # not the plain step: b is used (the plain step's sqrt(2 alpha) differs from every b above)
    assert not torch.equal(out, ops.langevin_step(x, s, alpha, seed, *clamp)[0])
    # strided inputs, and in place (contiguous and strided x): the same bits
    out_s, norms_s = ops.langevin_step(strided(x), strided(s), alpha, seed, *clamp, True, b)
    assert torch.equal(out_s, out) and torch.equal(norms_s, norms)
    for y in (x.clone(), strided(x)):
        n_in = ops.langevin_step_(y, s, alpha, seed, *clamp, return_norms=True, noise_scale=b)
        assert torch.equal(y, out) and torch.equal(n_in, norms)


def test_noise_scale_is_exactly_b_times_z():
    # a = 0: x_new = x + b z with one rounding of b z per element (x = 0: b z itself), b per sample
    x, s, seed = torch.zeros(3, 50, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64), make_seed(9)
    b = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    z = _kernel_noise(seed, x.shape, torch.float64)
    out, _ = ops.langevin_step(x, s, 0.0, seed, noise_scale=b)
    assert torch.equal(out, b[:, None] * z)
    assert torch.equal(out[0], torch.zeros(50, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha_kind", ["float", "one_f64", "per_sample"])
def test_noise_scale_none_is_the_plain_step_bitwise(dtype, alpha_kind):
    # None (or the argument left out, as the samplers' positional calls do) is the step as it was:
    # b = sqrt(2 alpha), the same bits as passing the kernels' own rounding of it
    x, s, seed = torch.randn(6, 21, dtype=dtype), torch.randn(6, 21, dtype=dtype), make_seed(31, 4)
    alpha = {"float": 0.013, "one_f64": torch.tensor([0.3], dtype=torch.float64),
             "per_sample": torch.rand(6) * 0.1}[alpha_kind]
    plain = ops.langevin_step(x, s, alpha, seed, -2.0, 2.0, True)
    a = ops._step_size_tensor(alpha, x)
    positional = ops._ops.langevin_step.default(x, s, a, seed, -2.0, 2.0, True)
    explicit = ops.langevin_step(x, s, alpha, seed, -2.0, 2.0, True, noise_scale=_kernel_sqrt2(a, dtype))
    for got in (positional, explicit):
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    # and the reference's None is the same formula
    ref, _ = R.langevin_step(x, s, alpha, _kernel_noise(seed, x.shape, dtype), -2.0, 2.0)
    assert_close(plain[0], ref)


# --------------------------------------------------------------------------- in place
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_writes_x_new_into_x(dtype):
    x, s, seed = torch.randn(4, 11, dtype=dtype), torch.randn(4, 11, dtype=dtype), make_seed(6)
    want, want_norms = ops.langevin_step(x, s, 0.3, seed, None, 2.0, return_norms=True)
    y = x.clone()
    ptr, version = y.data_ptr(), y._version
    norms = ops.langevin_step_(y, s, 0.3, seed, None, 2.0, return_norms=True)
    assert y.data_ptr() == ptr and torch.equal(y, want) and torch.equal(norms, want_norms)
    assert y._version > version  # a backward that saved y would now fail instead of using new values
    # a strided x is updated through its view; the buffer's other columns are untouched
    buf = torch.zeros(4, 22, dtype=dtype)
    view = buf[:, ::2]
    view.copy_(x)
    ops.langevin_step_(view, s, 0.3, seed, None, 2.0)
    assert torch.equal(view, want) and torch.equal(buf[:, 1::2], torch.zeros(4, 11, dtype=dtype))


def test_not_differentiable():
    x, s, seed = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True), make_seed()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.langevin_step(x, s, 0.1, seed)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.langevin_step_(x, s, 0.1, seed)
    with torch.no_grad():
        out, _ = ops.langevin_step(x, s, 0.1, seed)
    assert not out.requires_grad
    b = torch.full((2,), 0.3, requires_grad=True)
    for step in (ops.langevin_step, ops.langevin_step_):
        with pytest.raises(RuntimeError, match="`noise_scale` requires grad"):
            step(x, s.detach(), 0.1, seed, noise_scale=b)


# --------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    seed = make_seed(8, 1)
    for dtype in (torch.float32, torch.float64):
        t = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
        for norms in (False, True):
            yield ops._ops.langevin_step.default, (t(4, 7), t(4, 7), torch.rand(4), seed, -1.0, 1.0, norms)
            yield ops._ops.langevin_step.default, (t(3, 2, 5), t(3, 2, 5), torch.rand(1), seed, None, None, norms)
            yield ops._ops.langevin_step_.default, (t(4, 7), t(4, 7), torch.rand(1, dtype=dtype), seed, None, 0.5,
                                                    norms)
            yield ops._ops.langevin_step_.default, (strided(t(4, 7)), t(4, 7), torch.rand(4), seed, None, None, norms)
            # with a noise scale b: per sample, and one element of another dtype
            yield ops._ops.langevin_step.default, (t(4, 7), t(4, 7), torch.rand(4), seed, -1.0, 1.0, norms,
                                                   torch.rand(4))
            yield ops._ops.langevin_step_.default, (strided(t(4, 7)), t(4, 7), torch.rand(1), seed, None, None, norms,
                                                    torch.rand(1, dtype=torch.float64))


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = case
    opcheck(op, args)


def test_compiled_in_place_step_matches_eager():
    seed = make_seed(12)

    def step(x, s):
        return ops.langevin_step_(x, s, 0.2, seed, -2.0, 2.0, return_norms=True)

    x, s = torch.randn(4, 9), torch.randn(4, 9)
    y = x.clone()
    norms = torch.compile(step, fullgraph=True, backend="aot_eager")(x, s)
    assert torch.equal(norms, step(y, s)) and torch.equal(x, y)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 4), 0.1, make_seed()), RuntimeError, "score"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 0.1, make_seed()),
     RuntimeError, "score"),
    (lambda: ops.langevin_step(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), 0.1,
                               make_seed()), RuntimeError, "x"),
    (lambda: ops.langevin_step(torch.zeros(()), torch.zeros(()), 0.1, make_seed()), RuntimeError, "x"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), make_seed()), RuntimeError,
     "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.int64), make_seed()),
     RuntimeError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), -0.1, make_seed()), ValueError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), float("nan"), make_seed()), ValueError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, torch.zeros(3, dtype=torch.int64)),
     RuntimeError, "seed"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, torch.zeros(2)), RuntimeError, "seed"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), 1.0, 0.0), RuntimeError,
     "clamp_min"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), float("nan")), RuntimeError,
     "clamp_min"),
    # noise_scale: alpha's rules
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), noise_scale=torch.ones(3)),
     RuntimeError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), noise_scale=torch.ones(2, 1)),
     RuntimeError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(),
                               noise_scale=torch.ones(2, dtype=torch.int64)), RuntimeError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(),
                               noise_scale=torch.ones(2, dtype=torch.bool)), RuntimeError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(),
                               noise_scale=torch.ones(2, device="meta")), RuntimeError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), noise_scale=float("nan")),
     ValueError, "noise_scale"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), noise_scale=-0.5),
     ValueError, "noise_scale"),
    (lambda: ops.langevin_step_(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), noise_scale=float("inf")),
     ValueError, "noise_scale"),
])
def test_bad_op_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        call()


def test_empty_batch_is_a_valid_op_call():
    out, norms = ops.langevin_step(torch.zeros(0, 5), torch.zeros(0, 5), 0.1, make_seed(), return_norms=True)
    assert out.shape == (0, 5) and norms.shape == (3, 0)
    out, norms = ops.langevin_step(torch.zeros(2, 0), torch.zeros(2, 0), 0.1, make_seed(), return_norms=True)
    assert out.shape == (2, 0) and torch.equal(norms, torch.zeros(3, 2))


# =========================================================================== the sampler
def _gaussian_score(mu, cov):
    prec = torch.linalg.inv(cov)
    return lambda x: -(x - mu) @ prec


def _mixture_score(means, weights, std):
    """Exact noise-conditional score of sum_k w_k N(mu_k, std^2 I) convolved with N(0, sigma^2 I)."""
    log_w = torch.log(torch.as_tensor(weights))[:, None]  # (K, 1)

    def score(x, sigma):
        var = std**2 + sigma[:, None, None] ** 2  # (B, 1, 1)
        diff = means[None] - x[:, None]  # (B, K, d)
        logits = log_w - diff.square().sum(-1, keepdim=True) / (2 * var)
        return (torch.softmax(logits, dim=1) * diff / var).sum(1)

    return score


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_langevin_samples_a_gaussian(backend):
    # For a Gaussian target, unadjusted Langevin is a linear AR(1) chain with M = I - eps A, A = cov^-1:
    # from x0 its n-step law has mean mu + M^n (x0 - mu) and covariance C - M^n C M^n with the
    # stationary C = (A - eps A^2 / 2)^-1: compare with these exactly (no burn-in or step-size bias).
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    eps, n, B = 0.05, 150, 10000
    A = torch.linalg.inv(cov)
    M = torch.eye(2, dtype=torch.float64) - eps * A
    Mn = torch.linalg.matrix_power(M, n)
    C = torch.linalg.inv(A - eps * A @ A / 2)
    x0 = torch.zeros(B, 2, dtype=torch.float64)
    out = fdsm_ext.langevin_dynamics(_gaussian_score(mu, cov), x0, n, eps, backend=backend,
                                     generator=torch.Generator().manual_seed(3))
    want_mean, want_cov = mu + Mn @ (x0[0] - mu), C - Mn @ C @ Mn.T
    se_mean = torch.sqrt(torch.diagonal(want_cov) / B)
    assert ((out.mean(0) - want_mean).abs() < 5 * se_mean).all(), (out.mean(0), want_mean)
    # standard error of a covariance entry: sqrt((C_ii C_jj + C_ij^2) / B)
    se_cov = torch.sqrt((torch.diagonal(want_cov)[:, None] * torch.diagonal(want_cov)[None] + want_cov**2) / B)
    assert ((torch.cov(out.T) - want_cov).abs() < 5 * se_cov).all(), (torch.cov(out.T), want_cov)


@pytest.mark.slow
def test_annealing_recovers_mixture_weights_that_plain_langevin_misses():
    # Two well separated modes with weights 0.8 / 0.2 and a uniform start: plain Langevin keeps each
    # chain in the basin it starts in (about half and half); annealing from sigma_1 = 20, where the
    # perturbed density is one bump, hands the chains to the modes in proportion to the weights.
    means = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    score = _mixture_score(means, [0.8, 0.2], 1.0)
    B, T = 3000, 30
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, 2, generator=gen) * 16 - 8
    sigmas = fdsm_ext.geometric_sigmas(20.0, 1.0, 8)
    annealed = fdsm_ext.annealed_langevin(score, x0, sigmas, T, 0.2, generator=gen)
    plain = fdsm_ext.langevin_dynamics(lambda x: score(x, torch.zeros(x.shape[0])), x0, len(sigmas) * T, 0.2,
                                       generator=gen)
    w_annealed = (annealed.sum(1) < 0).float().mean().item()
    w_plain = (plain.sum(1) < 0).float().mean().item()
    # sd of an estimate ~0.007; annealing itself is slightly biased (the modes freeze at a finite sigma,
    # about -0.015 here, measured over seeds)
    assert abs(w_annealed - 0.8) < 0.05, w_annealed
    assert abs(w_plain - 0.8) > 0.2, w_plain
    # the denoised samples sit in the modes: per-mode mean near mu_k
    near_first = annealed[annealed.sum(1) < 0]
    assert (near_first.mean(0) - means[0]).abs().max() < 0.15


def test_same_seed_same_samples_and_what_the_callback_sees():
    score = lambda x, sigma: -x / (1 + sigma[:, None] ** 2)  # noqa: E731
    x0 = torch.rand(6, 3)
    sigmas = [4.0, 2.0, 1.0]
    seen = []

    def callback(info):
        seen.append((info.level, info.step, info.sigma, info.alpha, info.score_norm.clone(), info.x.clone()))

    run = lambda seed, **kw: fdsm_ext.annealed_langevin(  # noqa: E731
        score, x0, sigmas, 2, 0.01, generator=torch.Generator().manual_seed(seed), **kw)
    a = run(1, callback=callback)
    assert torch.equal(a, run(1)) and not torch.equal(a, run(2))
    assert torch.equal(x0, x0.clone())  # the initial state is not modified
    assert [(lv, st) for lv, st, *_ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # alpha_i = step_lr sigma_i^2 / sigma_L^2; the reported ||s|| is that of the score at the step's input
    assert [round(al, 12) for _, _, _, al, _, _ in seen] == [0.16, 0.16, 0.04, 0.04, 0.01, 0.01]
    torch.testing.assert_close(seen[1][4], score(seen[0][5], torch.full((6,), 4.0)).norm(dim=1))
    # denoising: x + sigma_L^2 s(x, sigma_L) from the last step's state
    torch.testing.assert_close(a, seen[-1][5] + score(seen[-1][5], torch.ones(6)))


def test_one_step_is_the_fused_op_with_the_drawn_seed():
    # The sampler draws (seed, offset) from the generator like the losses do, then steps the offset.
    gen = torch.Generator().manual_seed(9)
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(9))
    x0, s = torch.randn(4, 5), torch.randn(4, 5)
    out = fdsm_ext.langevin_dynamics(lambda x: s, x0, 2, 0.3, generator=gen, clamp=(-1.0, None))
    want = ops.langevin_step(x0, s, 0.3, seed, -1.0)[0]
    want = ops.langevin_step(want, s, 0.3, seed + torch.tensor([0, 1]), -1.0)[0]
    assert torch.equal(out, want)


def test_snapshots_clamp_and_dtype():
    score = lambda x, sigma: -x / sigma[:, None, None] ** 2  # noqa: E731
    x0 = torch.rand(5, 2, 3, dtype=torch.bfloat16)
    out, snaps = fdsm_ext.annealed_langevin(score, x0, fdsm_ext.geometric_sigmas(1.0, 0.1, 5), 2, 1e-3,
                                            clamp=(0.0, 1.0), snapshot_every=2)
    assert out.dtype == torch.bfloat16 and out.shape == x0.shape
    assert snaps.shape == (3, 5, 2, 3)  # after levels 2, 4 and the last one (5)
    assert out.min() >= 0 and out.max() <= 1 and snaps.min() >= 0 and snaps.max() <= 1


def test_progress_prints_a_line_per_level(capsys):
    fdsm_ext.annealed_langevin(lambda x, sigma: -x, torch.zeros(3, 2), [1.0, 0.5, 0.25], 2, 0.01, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("annealed_langevin: level 3/3 sigma=0.25")


def test_nan_mid_run_names_the_level_and_step():
    calls = []

    def score(x, sigma):
        calls.append(1)
        return torch.full_like(x, float("nan")) if len(calls) == 8 else -x

    with pytest.raises(FloatingPointError, match=r"level 3/4 \(sigma=0\.5\), step 2/3: the score returned NaN"):
        fdsm_ext.annealed_langevin(score, torch.zeros(3, 2), [2.0, 1.0, 0.5, 0.25], 3, 0.01)
    assert len(calls) == 8  # stopped at once, on the CPU


def test_nan_found_without_host_syncs_names_the_level_and_step(monkeypatch):
    # The GPU's way (first bad step kept in a device tensor, read at the end of the level), run on the CPU.
    from fdsm_ext import sampling

    original = sampling._FiniteWatch
    monkeypatch.setattr(sampling, "_FiniteWatch", lambda device, enabled: original(device, enabled, deferred=True))

    def score(x, sigma):
        return torch.where(sigma[:, None] < 0.3, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"level 3/4 \(sigma=0\.25\), step 1/5: the score returned NaN"):
        fdsm_ext.annealed_langevin(score, torch.zeros(4, 3), [1.0, 0.5, 0.25, 0.125], 5, 1e-3)
    big = lambda x, sigma: torch.full_like(x, 1e38)  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"level 1/1 .*step 1/2: x overflowed"):
        fdsm_ext.annealed_langevin(big, torch.zeros(3, 2), [1.0], 2, 10.0, denoise=False)


def test_overflow_mid_run_is_reported_as_x():
    score = lambda x, sigma: torch.full_like(x, 1e38)  # noqa: E731  finite, but x + alpha s overflows
    with pytest.raises(FloatingPointError, match=r"level 1/1 .*step 1/2: x overflowed"):
        fdsm_ext.annealed_langevin(score, torch.zeros(3, 2), [1.0], 2, 10.0, denoise=False)


@pytest.mark.parametrize("clamp", [(0.0, 1.0), None])
@pytest.mark.parametrize("shape", [(3, 2), (64, 64)])  # the watch reads the step's norms; it sums s and x
def test_cpu_watch_sees_an_infinite_score_that_the_clamp_hides(shape, clamp):
    # With a clamp the CPU's watch checks the score itself, not only x, which the clamp brings back to
    # the range; without one, the infinite score shows in x, and the error still names the score.
    calls = []

    def inf_once(x, sigma):
        calls.append(1)
        return torch.full_like(x, float("inf")) if len(calls) == 3 else -x

    with pytest.raises(FloatingPointError, match=r"level 2/2 .*step 1/2: the score returned NaN or inf"):
        fdsm_ext.annealed_langevin(inf_once, torch.rand(*shape), [1.0, 0.5], 2, 1e-3, clamp=clamp)


def test_cpu_watch_by_sums_settles_an_overflowing_sum_elementwise():
    # From _SUM_WATCH_MIN state elements on, the watch sums s and x: a float32 sum of finite values
    # that overflows is no alarm (the norms, whose squares overflow first, would have raised one).
    from fdsm_ext import sampling

    x = torch.zeros(64, 64)
    assert x.numel() >= sampling._SUM_WATCH_MIN
    huge = lambda y, sigma: torch.full_like(y, 3e38)  # noqa: E731
    out = fdsm_ext.annealed_langevin(huge, x, [1.0], 2, 1e-40, denoise=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sigmas=[]), ValueError, "`sigmas` must be a non-empty"),
    (dict(sigmas=[[1.0, 0.5]]), ValueError, "`sigmas` must be a non-empty 1-D"),
    (dict(sigmas=[1.0, 1.0]), ValueError, r"strictly decreasing.*sigmas\[0\] = 1.0 <= sigmas\[1\] = 1.0"),
    (dict(sigmas=[0.1, 1.0]), ValueError, "strictly decreasing"),
    (dict(sigmas=[1.0, -0.5]), ValueError, "finite and > 0"),
    (dict(sigmas=[1.0, float("nan")]), ValueError, "finite and > 0"),
    (dict(step_lr=0.0), ValueError, "`step_lr` must be finite and > 0"),
    (dict(step_lr=-1e-3), ValueError, "`step_lr`"),
    (dict(n_steps_each=0), ValueError, "`n_steps_each` must be an int >= 1"),
    (dict(n_steps_each=2.5), ValueError, "`n_steps_each`"),
    (dict(score_fn=lambda x, sigma: x[:, :1]), ValueError, r"`score_fn` must return a tensor of its input's shape"),
    (dict(score_fn=lambda x, sigma: 1.0), TypeError, "`score_fn` must return a tensor"),
    (dict(score_fn=None), TypeError, "`score_fn` must be callable"),
    (dict(x=torch.zeros(0, 2)), ValueError, "`x` must be a non-empty batch"),
    (dict(x=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "`x` must be a floating-point tensor"),
    (dict(clamp=(1.0, 0.0)), ValueError, "`clamp`"),
    (dict(clamp=1.0), ValueError, "`clamp`"),
    (dict(cuda_graph=True), RuntimeError, "`cuda_graph`=True needs"),
    (dict(backend="cuda"), ValueError, "`backend` must be one of .auto., .cpp., .triton., .torch."),
    (dict(snapshot_every=0), ValueError, "`snapshot_every`"),
])
def test_sampler_bad_input_raises(kwargs, exc, match):
    args = dict(score_fn=lambda x, sigma: -x, x=torch.zeros(3, 2), sigmas=[1.0, 0.5], n_steps_each=2, step_lr=0.01)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fdsm_ext.annealed_langevin(args.pop("score_fn"), args.pop("x"), args.pop("sigmas"), args.pop("n_steps_each"),
                                   args.pop("step_lr"), **args)


def test_energy_model_sampling_through_the_helper():
    # N(0, I) as an energy model: the sampler's no_grad loop still gets scores by autograd.
    energy = lambda x, sigma: 0.5 * x.square().sum(-1)  # noqa: E731
    out = fdsm_ext.annealed_langevin(fdsm_ext.score_from_energy(energy), torch.zeros(2000, 2), [1.0], 100, 0.1,
                                     denoise=False)
    assert abs(out.var().item() - 1 / (1 - 0.05)) < 0.1


# =========================================================================== the recipe
def test_score_from_energy_and_noise_conditional_score():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    energy = lambda x, sigma: 0.5 * ((x @ A) * x).sum(-1) / sigma  # noqa: E731
    x, sigma = torch.randn(4, 2), torch.rand(4) + 0.5
    with torch.no_grad():  # the helper turns grad mode on for itself
        got = fdsm_ext.score_from_energy(energy)(x, sigma)
    torch.testing.assert_close(got, -(x @ A) / sigma[:, None])
    assert not got.requires_grad
    uncond = fdsm_ext.score_from_log_density(lambda y: -0.5 * y.square().sum(-1), takes_sigma=False)
    torch.testing.assert_close(uncond(x, sigma), -x)
    with pytest.raises(ValueError, match="one value per sample"):
        fdsm_ext.score_from_log_density(lambda y, s: y)(x, sigma)
    net = torch.nn.Linear(2, 2)
    cond = fdsm_ext.NoiseConditionalScore(net)
    torch.testing.assert_close(cond(x, sigma), net(x) / sigma[:, None])
    img = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(fdsm_ext.NoiseConditionalScore(torch.nn.Identity())(img, torch.tensor([1.0, 2.0, 4.0])),
                               img / torch.tensor([1.0, 2.0, 4.0])[:, None, None, None])


def test_ema_model():
    model = torch.nn.Linear(3, 2)
    ema = fdsm_ext.ema_model(model, 0.9)
    w0 = model.weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1))
    with pytest.raises(ValueError, match="`decay`"):
        fdsm_ext.ema_model(model, 1.5)


def test_max_pairwise_distance_matches_cdist_without_the_matrix():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, 4, 2, generator=gen)
    want = torch.cdist(x.flatten(1).double(), x.flatten(1).double()).max().item()
    assert math.isclose(fdsm_ext.max_pairwise_distance(x, block_size=64), want, rel_tol=1e-12)
    assert math.isclose(fdsm_ext.max_pairwise_distance(x.half()), torch.cdist(
        x.half().flatten(1).double(), x.half().flatten(1).double()).max().item(), rel_tol=1e-12)
    assert fdsm_ext.max_pairwise_distance(x[:1]) == 0.0
    # two far points among many: the largest distance is between them
    y = torch.zeros(1000, 5)
    y[17, 0], y[900, 0] = -3.0, 4.0
    assert fdsm_ext.max_pairwise_distance(y, block_size=100) == 7.0


def test_t2_criterion():
    # gamma solves Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma) = 0.5
    ndtr = lambda t: torch.special.ndtr(torch.tensor(t, dtype=torch.float64)).item()  # noqa: E731
    for dim in (5, 100, 3072, 12288):
        g = fdsm_ext.geometric_ratio(dim)
        c = math.sqrt(2 * dim) * (g - 1)
        assert g > 1 and abs(ndtr(c + 3 * g) - ndtr(c - 3 * g) - 0.5) < 1e-9
    # D large: Phi(.. + 3 gamma) ~ 1, so gamma ~ sqrt(2D) / (sqrt(2D) - 3)
    assert math.isclose(fdsm_ext.geometric_ratio(3072), math.sqrt(6144) / (math.sqrt(6144) - 3), rel_tol=1e-4)
    # the published ladders sit near the criterion (their gamma is a little smaller: overlap ~0.57)
    for (s1, L, dim) in [(50.0, 232, 3072), (90.0, 500, 12288)]:
        g = (s1 / 0.01) ** (1 / (L - 1))
        c = math.sqrt(2 * dim) * (g - 1)
        assert 0.5 < ndtr(c + 3 * g) - ndtr(c - 3 * g) < 0.6
    with pytest.raises(ValueError, match="`dim`"):
        fdsm_ext.geometric_ratio(4)


def test_geometric_sigmas():
    s = fdsm_ext.geometric_sigmas(50.0, 0.01, 232)
    assert s.shape == (232,) and s.dtype == torch.float64 and s[0] == 50.0 and s[-1] == 0.01
    ratio = s[:-1] / s[1:]
    torch.testing.assert_close(ratio, torch.full_like(ratio, (5000.0) ** (1 / 231)))
    g = fdsm_ext.geometric_ratio(3072)
    from_gamma = fdsm_ext.geometric_sigmas(50.0, 0.01, gamma=g)
    assert len(from_gamma) == 1 + math.ceil(math.log(5000.0) / math.log(g))
    assert (from_gamma[:-1] / from_gamma[1:]).max() <= g
    for kwargs, match in [(dict(num=1), "`num`"), (dict(), "exactly one"), (dict(num=5, gamma=1.1), "exactly one"),
                          (dict(gamma=1.0), "`gamma`")]:
        with pytest.raises(ValueError, match=match):
            fdsm_ext.geometric_sigmas(1.0, 0.1, **kwargs)
    with pytest.raises(ValueError, match="sigma_min"):
        fdsm_ext.geometric_sigmas(0.1, 1.0, 5)


def test_step_size_reproduces_the_published_configs():
    # CIFAR-10: sigma_1 = 50, L = 232, T = 5 -> step_lr 6.2e-6 where g is about 1.056 (NCSNv2);
    # CelebA 64: sigma_1 = 90, L = 500, T = 5 -> 3.3e-6.
    gamma = (50.0 / 0.01) ** (1 / 231)
    eps = fdsm_ext.solve_step_size(0.01, gamma, 5)
    assert abs(eps - 6.2e-6) < 0.05e-6, eps
    g = fdsm_ext.step_size_objective(eps, 0.01, gamma, 5)
    assert abs(g - 1.056) < 1e-3, g
    # it is the minimiser: g is larger on both sides
    assert fdsm_ext.step_size_objective(0.9 * eps, 0.01, gamma, 5) > g < fdsm_ext.step_size_objective(1.1 * eps,
                                                                                                      0.01, gamma, 5)
    celeba = fdsm_ext.solve_step_size(0.01, (90.0 / 0.01) ** (1 / 499), 5)
    assert abs(celeba - 3.3e-6) < 0.05e-6, celeba
    with pytest.raises(ValueError, match="`gamma`"):
        fdsm_ext.solve_step_size(0.01, 1.0, 5)
    with pytest.raises(ValueError, match="`n_steps_each`"):
        fdsm_ext.solve_step_size(0.01, 1.04, 0)


# =========================================================================== CUDA graphs
def _cuda_langevin():
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fdsm_ext::langevin_step_",
                                                                                        "CUDA")


cuda_langevin = pytest.mark.skipif(not _cuda_langevin(),
                                   reason="needs a CUDA GPU and fdsm_ext's CUDA langevin_step kernel")


@cuda_langevin
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (3, 1000), (2, 3, 17, 5)])
@pytest.mark.parametrize("seed_device", ["cpu", "cuda"])
def test_cuda_kernel_matches_the_cpu_kernel(dtype, shape, seed_device):
    # The contract of the schema: the same z bits from the same (seed, offset), whether the seed
    # tensor is on the CPU (read on the host) or on the GPU (read by the kernel, for CUDA graphs).
    seed = make_seed(4321, 17)
    zeros = torch.zeros(shape, dtype=R.acc_dtype(dtype))
    z_cpu = ops.langevin_step(zeros, zeros, 0.5, seed)[0]
    z_gpu = ops.langevin_step(zeros.cuda(), zeros.cuda(), 0.5, seed.to(seed_device))[0]
    assert torch.equal(z_gpu.cpu(), z_cpu)
    x, s, alpha = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.rand(shape[0]) * 0.1
    cpu = ops.langevin_step(x, s, alpha, seed, -1.0, 1.5, return_norms=True)
    gpu = ops.langevin_step(x.cuda(), s.cuda(), alpha.cuda(), seed.to(seed_device), -1.0, 1.5, return_norms=True)
    for a, b in zip(gpu, cpu):
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape
        assert_close(a.cpu(), b, dtype)
    y = strided(x.cuda())
    norms = ops.langevin_step_(y, s.cuda(), alpha.cuda(), seed.to(seed_device), -1.0, 1.5, return_norms=True)
    assert_close(y.cpu(), cpu[0], dtype)
    assert_close(norms.cpu(), cpu[1], dtype)
    # with a noise scale b (the VE predictor's form): per sample, and one element
    for b in (torch.rand(shape[0]) + 0.1, torch.tensor([0.4], dtype=torch.float64)):
        cpu_b = ops.langevin_step(x, s, alpha, seed, -1.0, 1.5, True, b)
        gpu_b = ops.langevin_step(x.cuda(), s.cuda(), alpha.cuda(), seed.to(seed_device), -1.0, 1.5, True, b.cuda())
        for a, c in zip(gpu_b, cpu_b):
            assert_close(a.cpu(), c, dtype)
        assert not torch.equal(gpu_b[0].cpu(), cpu[0])  # b was used
        y = strided(x.cuda())
        ops.langevin_step_(y, s.cuda(), alpha.cuda(), seed.to(seed_device), -1.0, 1.5, False, b.cuda())
        assert_close(y.cpu(), cpu_b[0], dtype)


@cuda_langevin
def test_opcheck_on_cuda():
    seed = make_seed(8)
    t = lambda *shape: torch.randn(*shape, device="cuda")  # noqa: E731
    for seed_t in (seed, seed.cuda()):
        for norms in (False, True):
            opcheck(ops._ops.langevin_step.default, (t(4, 7), t(4, 7), torch.rand(4, device="cuda"), seed_t, -1.0,
                                                     None, norms))
            opcheck(ops._ops.langevin_step_.default, (t(4, 7), t(4, 7), torch.rand(1, device="cuda"), seed_t, None,
                                                      None, norms))


@cuda_langevin
def test_cuda_graph_sampler_gives_the_eager_samples():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8)).cuda()
    score = fdsm_ext.NoiseConditionalScore(net)
    x0 = torch.rand(32, 8, device="cuda")
    sigmas = fdsm_ext.geometric_sigmas(1.0, 0.05, 6)
    runs = {}
    for graph in (False, True):
        seen = []
        runs[graph] = fdsm_ext.annealed_langevin(
            score, x0, sigmas, 4, 1e-4, generator=torch.Generator().manual_seed(5), cuda_graph=graph,
            snapshot_every=1, callback=lambda info: seen.append(info.x_norm.clone()))
        runs[graph] += (torch.stack(seen),)
    for eager, graphed in zip(runs[False], runs[True]):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    # and the CPU kernel draws the same noise: the samples agree up to the model's rounding
    cpu = fdsm_ext.annealed_langevin(fdsm_ext.NoiseConditionalScore(net.cpu()), x0.cpu(), sigmas, 4, 1e-4,
                                     generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(runs[True][0].cpu(), cpu, rtol=1e-3, atol=1e-4)


@cuda_langevin
def test_cuda_graph_sampler_reports_nan_at_its_level_and_step():
    def score(x, sigma):  # NaN once sigma drops below 0.3, without a host sync
        return torch.where(sigma[:, None] < 0.3, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"level 3/4 .*step 1/5: the score returned NaN"):
        fdsm_ext.annealed_langevin(score, torch.zeros(4, 3, device="cuda"), [1.0, 0.5, 0.25, 0.125], 5, 1e-3,
                                   cuda_graph=True)


# --------------------------------------------------------------------------- the graph runner's device logic
class _FakeCuda:
    """Stands in for torch.cuda in sampling._GraphRunner: records which device every stream, capture and
    step is on, so that the runner's device logic is checked without a GPU."""

    def __init__(self):
        self.active = [torch.device("cuda", 0)]  # the current device; cuda:0 unless a context says otherwise
        self.log = []

    def device(self, dev):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.active.append(torch.device(dev))
            try:
                yield
            finally:
                self.active.pop()

        return ctx()

    def _stream(self, device, kind):
        fake = self

        class Stream:
            def __init__(self):
                self.device, self.kind = torch.device(device), kind

            def wait_stream(self, other):
                fake.log.append(("wait", self.device, other.device))

        return Stream()

    def Stream(self, device=None):  # noqa: N802  (torch.cuda's name)
        self.log.append(("new stream", torch.device(device) if device is not None else self.active[-1]))
        return self._stream(device if device is not None else self.active[-1], "side")

    def current_stream(self, device=None):
        dev = torch.device(device) if device is not None else self.active[-1]
        self.log.append(("current_stream", dev))
        return self._stream(dev, "current")

    def stream(self, s):
        self.log.append(("run on stream", s.device, self.active[-1]))
        return self.device(s.device)

    def CUDAGraph(self):  # noqa: N802
        fake = self

        class Graph:
            def replay(self):
                fake.log.append(("replay", fake.active[-1]))

        return Graph()

    def graph(self, g, stream=None):
        self.log.append(("capture", stream.device if stream is not None else None, self.active[-1]))
        return self.device(stream.device if stream is not None else self.active[-1])


def test_graph_runner_keeps_every_stream_capture_and_step_on_x_device(monkeypatch):
    from fdsm_ext import sampling

    fake = _FakeCuda()
    monkeypatch.setattr(sampling, "_cuda", fake)
    target = torch.device("cuda", 1)

    class Stepper:
        def step(self):
            fake.log.append(("step", fake.active[-1]))
            return torch.zeros(3, 2)

    stepper, watch = Stepper(), sampling._FiniteWatch(torch.device("cpu"), False)
    runner = sampling._GraphRunner(stepper.step, target, check=lambda norms, k: None, record=watch.record, warmup=2,
                                   strict=True, name="test")
    for k in range(5):  # 2 warm-up steps, the capture (and its first replay), 2 replays
        runner.step(k)
    kinds = [entry[0] for entry in fake.log]
    assert kinds.count("step") == 3 and kinds.count("capture") == 1 and kinds.count("replay") == 3
    for entry in fake.log:  # cuda:0 stays current outside the runner, yet everything happens on cuda:1
        assert all(part == target for part in entry[1:]), entry
    assert fake.active == [torch.device("cuda", 0)]


def _two_cuda_langevin():
    return _cuda_langevin() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(not _two_cuda_langevin(), reason="needs two CUDA GPUs and fdsm_ext's CUDA langevin_step kernel")
def test_cuda_graph_sampler_on_a_gpu_other_than_the_current_one():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8))
    sigmas = fdsm_ext.geometric_sigmas(1.0, 0.05, 5)
    x0 = torch.rand(16, 8)
    results = {}
    for dev in ("cuda:0", "cuda:1"):  # cuda:0 then cuda:1 in one process, cuda:0 current throughout
        score = fdsm_ext.NoiseConditionalScore(copy.deepcopy(net).to(dev))
        for graph in (False, True):
            with torch.cuda.device(0):
                results[dev, graph] = fdsm_ext.annealed_langevin(
                    score, x0.to(dev), sigmas, 4, 1e-4, generator=torch.Generator().manual_seed(3),
                    cuda_graph=graph)
        assert results[dev, True].device == torch.device(dev)
        torch.testing.assert_close(results[dev, True], results[dev, False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [4, 1000])  # 12 norms: summed in Python; 3000: through numpy
def test_cpu_nan_watch_flags_a_bad_norm_and_nothing_else(batch):
    from fdsm_ext import sampling

    watch = sampling._FiniteWatch(torch.device("cpu"), True)
    huge = torch.full((3, batch), torch.finfo(torch.float32).max)  # finite, their sum is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert watch.record(huge, 0) is None
    for bad in (float("nan"), float("inf")):
        norms = torch.ones(3, batch)
        norms[2, batch - 1] = bad
        assert watch.record(norms, 7) == 7
    assert sampling._FiniteWatch(torch.device("cpu"), False).record(norms, 3) is None

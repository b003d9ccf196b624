"""The fused Langevin step against its reference, and the annealed sampler and NCSNv2 recipe helpers."""

import math

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


# --------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    seed = make_seed(8, 1)
    for dtype in (torch.float32, torch.float64):
        t = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
        for norms in (False, True):
            yield ops._ops.langevin_step.default, (t(4, 7), t(4, 7), torch.rand(4), seed, -1.0, 1.0, norms)
            yield ops._ops.langevin_step.default, (t(3, 2, 5), t(3, 2, 5), torch.rand(1), seed, None, None, norms)
            yield ops._ops.langevin_step_.default, (t(4, 7), t(4, 7), torch.rand(1, dtype=dtype), seed, None, 0.5, norms)
            yield ops._ops.langevin_step_.default, (strided(t(4, 7)), t(4, 7), torch.rand(4), seed, None, None, norms)


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
])
def test_bad_op_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        call()


def test_empty_batch_is_a_valid_op_call():
    out, norms = ops.langevin_step(torch.zeros(0, 5), torch.zeros(0, 5), 0.1, make_seed(), return_norms=True)
    assert out.shape == (0, 5) and norms.shape == (3, 0)
    out, norms = ops.langevin_step(torch.zeros(2, 0), torch.zeros(2, 0), 0.1, make_seed(), return_norms=True)
    assert out.shape == (2, 0) and torch.equal(norms, torch.zeros(3, 2))


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

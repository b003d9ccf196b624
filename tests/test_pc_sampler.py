"""pc_sampler: each step against a pure-torch reference on the same noise, bitwise reproducibility, and
the law of its samples for Gaussian data, whose VE-perturbed score is analytic and whose PC chain has a
closed-form variance recursion."""

import math

import pytest
import torch

from fdsm_ext import geometric_sigmas, reference
from fdsm_ext._checks import draw_seed as _draw_seed, triton_unavailable as _triton_unavailable
from fdsm_ext.pc_sampling import PCStepInfo, pc_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64



def _score(x, sigma):
    """A nonlinear noise-conditional score (so a step at the wrong sigma or with the wrong sign shows)."""
    sig = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return -x / (0.3 + sig**2) + 0.2 * torch.sin(3 * x) / (1 + sig)


def _reference_chain(x, sigmas, n_corrector, snr, denoise, noise):
    """The PC chain written out: corrector x + e s + sqrt(2 e) z, e = 2 (snr mean||z|| / mean||s||)^2, then
    predictor x + (s_i^2 - s_{i+1}^2) s + sqrt(s_i^2 - s_{i+1}^2) z, s_{L+1} = 0; ``noise(k)`` is step k's z."""
    x, k = x.clone(), 0
    B = x.shape[0]
    for i, sigma in enumerate(sigmas):
        sig = torch.full((B,), sigma, dtype=x.dtype)
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        for _ in range(n_corrector):
            s, z = _score(x, sig), noise(k)
            e = 2 * (snr * z.reshape(B, -1).norm(dim=1).mean() / s.reshape(B, -1).norm(dim=1).mean()) ** 2
            x, k = x + e * s + torch.sqrt(2 * e) * z, k + 1
        if denoise and i == len(sigmas) - 1:
            x = x + sigma**2 * _score(x, sig)
        else:
            delta = sigma**2 - nxt**2
            x, k = x + delta * _score(x, sig) + math.sqrt(delta) * noise(k), k + 1
    return x


@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("n_corrector", [0, 2])
def test_fused_chain_is_the_reference_chain_on_the_kernel_noise(n_corrector, denoise):
    x0 = torch.randn(5, 2, 3, dtype=F64) * 3
    sigmas = [3.0, 1.0, 0.2]
    seed = _draw_seed(torch.Generator().manual_seed(11))  # what pc_sampler draws first from its generator

    def noise(k):  # step k's z: the kernel's Philox stream at offset + k
        return reference.langevin_noise(seed + torch.tensor([0, k]), x0)

    want = _reference_chain(x0, sigmas, n_corrector, 0.2, denoise, noise)
    got = pc_sampler(_score, x0, sigmas, n_corrector=n_corrector, snr=0.2, denoise=denoise,
                     generator=torch.Generator().manual_seed(11), backend="cpp")
    # the reference's z is the exact stream rounded to float32; the kernel's polynomials agree to a few ulps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_corrector", [0, 1])
def test_composite_chain_is_the_reference_chain_on_torch_randn(n_corrector):
    x0 = torch.randn(4, 3, dtype=F64) * 3
    sigmas = [2.0, 0.5, 0.1]
    g = torch.Generator().manual_seed(12)
    draws = [torch.randn(x0.shape, generator=g, dtype=F64) for _ in range(len(sigmas) * (n_corrector + 1))]
    want = _reference_chain(x0, sigmas, n_corrector, 0.16, True, draws.__getitem__)
    got = pc_sampler(_score, x0, sigmas, n_corrector=n_corrector, generator=torch.Generator().manual_seed(12),
                     backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bitwise_reproducible_from_a_seed(backend, dtype):
    x0 = torch.randn(6, 4, dtype=dtype)
    x_before = x0.clone()
    run = lambda seed: pc_sampler(_score, x0, [4.0, 1.0, 0.25], n_corrector=2, clamp=(-5.0, 5.0),  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed), backend=backend)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == dtype
    assert torch.equal(x0, x_before)  # x is not modified
    assert float(a.abs().max()) <= 5.0


@pytest.mark.skipif(_triton_unavailable("cpu") is not None, reason="triton's interpreter is not available")
def test_triton_backend_gives_the_cpp_chain():
    x0 = torch.randn(3, 5, dtype=torch.float32)
    run = lambda backend, n: pc_sampler(_score, x0, [2.0, 0.5], n_corrector=n,  # noqa: E731
                                        generator=torch.Generator().manual_seed(5), backend=backend)
    assert torch.equal(run("triton", 0), run("cpp", 0))  # same stream, same step: bitwise
    # the corrector's step size comes from the kernels' norms, which may differ in the last bits
    torch.testing.assert_close(run("triton", 1), run("cpp", 1), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the law of the samples
def _expected_variance(s0sq, sigmas, n_corrector, snr, denoise):
    """Per-coordinate variance after the PC chain for data N(mu, s0sq I), started at the exact marginal
    N(mu, (s0sq + sigma_1^2) I). Every step is linear in x - mu: with b = s0sq + sigma_i^2 the score is
    -(x - mu)/b, the corrector's e is 2 snr^2 b^2 / v (batch means of ||z|| and ||x - mu|| / b have the
    ratio sqrt(v)/b, up to O(1/B)), and v <- (1 - a/b)^2 v + (noise scale)^2."""
    v = s0sq + sigmas[0] ** 2
    for i, sigma in enumerate(sigmas):
        b = s0sq + sigma**2
        for _ in range(n_corrector):
            e = 2 * snr**2 * b * b / v
            v = (1 - e / b) ** 2 * v + 2 * e
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        delta = sigma**2 - nxt**2
        v = (1 - delta / b) ** 2 * v + (0.0 if denoise and i == len(sigmas) - 1 else delta)
    return v


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("n_corrector,snr", [(0, 0.16), (2, 0.4)])
def test_samples_of_a_gaussian_have_the_chain_mean_and_variance(backend, n_corrector, snr):
    """B = 20000 samples in 2-D: the sample mean and variance against the exact recursion, 5 standard errors
    (the recursion differs from s0^2 by the corrector's Langevin bias, 19 standard errors at snr=0.4;
    half the SNR step moves it by 10, a wrong predictor noise by far more)."""
    mu, s0sq, B = torch.tensor([1.0, -2.0], dtype=F64), 0.25, 20000
    sigmas = geometric_sigmas(10.0, 0.01, 60).tolist()
    score = lambda x, sigma: -(x - mu) / (s0sq + sigma[:, None] ** 2)  # noqa: E731
    g = torch.Generator().manual_seed(21)
    x0 = mu + torch.randn(B, 2, generator=g, dtype=F64) * math.sqrt(s0sq + sigmas[0] ** 2)
    out = pc_sampler(score, x0, sigmas, n_corrector=n_corrector, snr=snr, generator=g, backend=backend)
    v = _expected_variance(s0sq, sigmas, n_corrector, snr, True)
    n = 2 * B
    mean_z = (out.mean(0) - mu) / math.sqrt(v / B)
    var = (out - out.mean(0)).square().sum() / (n - 2)
    var_z = (var - v) / (v * math.sqrt(2 / (n - 2)))
    assert bool((mean_z.abs() < 5).all()), mean_z
    assert abs(float(var_z)) < 5, (float(var), v, float(var_z))
    if n_corrector:  # the test can tell the corrector's bias from the target
        assert abs(v - s0sq) / (v * math.sqrt(2 / n)) > 5


# --------------------------------------------------------------------------- driver behaviour
def test_callback_sees_every_step_with_its_coefficients_and_snapshots():
    infos = []
    x0 = torch.randn(4, 3, dtype=F64)
    sigmas = [2.0, 1.0, 0.5]

    def callback(info):
        assert isinstance(info, PCStepInfo)
        infos.append((info.level, info.step, info.kind, info.sigma, float(info.step_size), float(info.noise_scale),
                      info.score_norm.clone(), info.x.clone()))

    out, snaps = pc_sampler(_score, x0, sigmas, n_corrector=2, callback=callback, snapshot_every=2,
                            generator=torch.Generator().manual_seed(1))
    kinds = [(lv, st, kd) for lv, st, kd, *_ in infos]
    assert kinds == [(0, 0, "corrector"), (0, 1, "corrector"), (0, 2, "predictor"),
                     (1, 0, "corrector"), (1, 1, "corrector"), (1, 2, "predictor"),
                     (2, 0, "corrector"), (2, 1, "corrector")]  # the last predictor is the denoising step
    for lv, st, kd, sigma, a, b, s_norm, _ in infos:
        assert sigma == sigmas[lv]
        if kd == "predictor":
            assert a == pytest.approx(sigmas[lv] ** 2 - sigmas[lv + 1] ** 2) and b == pytest.approx(math.sqrt(a))
        else:
            assert b == pytest.approx(math.sqrt(2 * a))
    # the predictor reports ||s|| of the score it stepped with
    x_before_pred = infos[1][7]
    want = _score(x_before_pred, torch.full((4,), 2.0, dtype=F64)).norm(dim=1)
    torch.testing.assert_close(infos[2][6], want)
    assert snaps.shape == (2, 4, 3) and torch.equal(snaps[-1], out)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.skipif(
    _triton_unavailable("cpu") is not None, reason="triton's interpreter is not available"))])
def test_predictor_is_one_step_call_with_delta_and_sqrt_delta(backend):
    # x + delta s + sqrt(delta) z is one fused call: alpha = delta, noise_scale = sqrt(delta), both 1-element
    # tensors on x's device, on the score itself (no doubled copy); the corrector passes no noise_scale
    from torch.utils._python_dispatch import TorchDispatchMode

    calls, scores = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().endswith("langevin_step_"):  # alpha and noise_scale are buffers the sampler refills
                calls.append([a.clone() if isinstance(a, torch.Tensor) and i in (2, 7) else a
                              for i, a in enumerate(args)])
            return func(*args, **(kwargs or {}))

    def score(x, sigma):
        scores.append(_score(x, sigma))
        return scores[-1]

    x0, sigmas = torch.randn(3, 4, dtype=F64), [3.0, 1.0, 0.2]
    with Record():
        pc_sampler(score, x0, sigmas, n_corrector=1, generator=torch.Generator().manual_seed(2), backend=backend)
    # per level: the corrector's norms-only probe and its step, then the predictor (not at the last level)
    assert len(calls) == 3 * 2 + 2 and len(scores) == 3 + 2 + 1  # + the final denoising score
    predictors = [calls[2], calls[5]]
    for lv, args in enumerate(predictors):
        delta = sigmas[lv] ** 2 - sigmas[lv + 1] ** 2
        x, s, alpha, noise_scale = args[0], args[1], args[2], args[7]
        assert s is scores[2 * lv + 1]  # the score as returned, not a doubled copy
        assert alpha.shape == noise_scale.shape == (1,) and alpha.device == noise_scale.device == x.device
        assert float(alpha) == delta and float(noise_scale) == math.sqrt(delta)  # float64 buffers: exact
    for args in calls[:2] + calls[3:5] + calls[6:]:
        assert len(args) < 8 or args[7] is None  # the corrector: b = sqrt(2 e) in-kernel


def test_predictor_none_is_annealed_langevin_with_the_snr_step():
    x0 = torch.randn(4, 3, dtype=F64)
    g = torch.Generator().manual_seed(2)
    draws = [torch.randn(x0.shape, generator=g, dtype=F64) for _ in range(4)]
    x, k = x0.clone(), 0
    for sigma in [1.0, 0.5]:
        sig = torch.full((4,), sigma, dtype=F64)
        for _ in range(2):
            s, z = _score(x, sig), draws[k]
            e = 2 * (0.16 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
            x, k = x + e * s + torch.sqrt(2 * e) * z, k + 1
    x = x + 0.25 * _score(x, torch.full((4,), 0.5, dtype=F64))
    got = pc_sampler(_score, x0, [1.0, 0.5], n_corrector=2, predictor="none",
                     generator=torch.Generator().manual_seed(2), backend="torch")
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_non_finite_score_stops_naming_the_level(backend):
    def score(x, sigma):
        return torch.where(sigma[:, None] < 1.5, torch.nan, -x)

    with pytest.raises(FloatingPointError, match=r"level 2 \(sigma=1\).*corrector.*score returned NaN"):
        pc_sampler(score, torch.ones(3, 2), [2.0, 1.0], backend=backend)


def test_an_all_zero_score_is_named_as_the_cause():
    with pytest.raises(FloatingPointError, match="score of zero for the whole batch"):
        pc_sampler(lambda x, sigma: torch.zeros_like(x), torch.ones(3, 2), [2.0, 1.0])


def test_progress_bar_runs(capsys):
    pc_sampler(_score, torch.ones(3, 2), [2.0, 1.0], progress=True)
    assert "pc_sampler" in capsys.readouterr().err


BAD = [
    (dict(score_fn=3), "score_fn"),
    (dict(x=[[0.0]]), "x"),
    (dict(x=torch.zeros(0, 2)), "x"),
    (dict(x=torch.zeros(2, 2, dtype=torch.int32)), "x"),
    (dict(sigmas=[1.0, 2.0]), "sigmas"),
    (dict(sigmas=[]), "sigmas"),
    (dict(sigmas=[1.0, -1.0]), "sigmas"),
    (dict(sigmas="big"), "sigmas"),
    (dict(n_corrector=-1), "n_corrector"),
    (dict(n_corrector=1.0), "n_corrector"),
    (dict(predictor="none", n_corrector=0), "n_corrector"),
    (dict(snr=0.0), "snr"),
    (dict(snr=math.nan), "snr"),
    (dict(snr="0.16"), "snr"),
    (dict(predictor="euler"), "predictor"),
    (dict(denoise="yes"), "denoise"),
    (dict(clamp=(1.0, 0.0)), "clamp"),
    (dict(clamp=3.0), "clamp"),
    (dict(generator=1), "generator"),
    (dict(callback=5), "callback"),
    (dict(snapshot_every=0), "snapshot_every"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(score_fn=_score, x=torch.zeros(2, 2), sigmas=[1.0, 0.5])
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=name):
        pc_sampler(args.pop("score_fn"), args.pop("x"), args.pop("sigmas"), **args)


def test_score_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match="score_fn"):
        pc_sampler(lambda x, s: x[:, :1], torch.zeros(2, 2), [1.0])

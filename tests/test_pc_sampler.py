"""pc_sampler: each step against a pure-torch reference on the same noise, bitwise reproducibility, and
the law of its samples for Gaussian data, whose VE-perturbed score is analytic and whose PC chain has a
closed-form variance recursion."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


# --------------------------------------------------------------------------- CUDA-graph capture
class _Tape(TorchDispatchMode):
    """Records every op a captured step dispatches, executing it so the step's Python code can go on,
    and keeps the first value of every tensor an op writes, so that :meth:`_TapeCuda.graph` can undo
    the capture's effects (a real capture records without running). A host read raises, as it does
    during a real capture."""

    def __init__(self):
        super().__init__()
        self.ops, self.written = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise RuntimeError(f"host sync during capture: {func}")
        for i, arg in enumerate(func._schema.arguments):
            t = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(t, torch.Tensor):
                self.written.setdefault(id(t), (t, t.clone()))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _TapeCuda:
    """Stands in for torch.cuda in the samplers' graph runner with a CUDA graph's semantics on the CPU:
    capture records the step's ops and leaves no effect; replay re-runs the recorded ops on the very
    tensors they were recorded with, writing each result into the captured output. So a replay sees
    what a real one sees: the current values of the tensors the step read, and nothing the step's
    Python code computed on the host at capture time (a step size baked in as a number stays baked in)."""

    def __init__(self):
        self.graphs, self.replays = [], 0

    def device(self, dev):
        return contextlib.nullcontext()

    def Stream(self, device=None):  # noqa: N802  (torch.cuda's name)
        return SimpleNamespace(wait_stream=lambda other: None)

    def current_stream(self, device=None):
        return self.Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def CUDAGraph(self):  # noqa: N802
        fake = self

        class Graph:
            def __init__(self):
                self.tape = _Tape()

            def replay(self):
                fake.replays += 1
                for func, args, kwargs, out in self.tape.ops:
                    new = func(*args, **kwargs)
                    for o, n in zip(pytree.tree_leaves(out), pytree.tree_leaves(new)):
                        if isinstance(o, torch.Tensor) and o is not n:
                            o.copy_(n)

        graph = Graph()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, g, stream=None):
        with g.tape:
            yield
        for t, before in reversed(list(g.tape.written.values())):
            t.copy_(before)


@pytest.fixture
def tape_graphs(monkeypatch):
    """Both samplers capture their steps on the CPU into _TapeCuda graphs, with the GPU's deferred NaN watch."""
    from fdsm_ext import pc_sampling, sampling

    fake = _TapeCuda()
    monkeypatch.setattr(sampling, "_cuda", fake)

    def wanted(cuda_graph, stepper):  # as on a GPU with the fused kernel
        if cuda_graph is False or stepper.step_op is None:
            return False
        stepper.seed_in_place()
        return True

    monkeypatch.setattr(sampling, "_graph_wanted", wanted)
    monkeypatch.setattr(pc_sampling, "_graph_wanted", wanted)
    original = sampling._FiniteWatch
    deferred = lambda device, enabled: original(device, enabled, deferred=True)  # noqa: E731
    monkeypatch.setattr(sampling, "_FiniteWatch", deferred)
    monkeypatch.setattr(pc_sampling, "_FiniteWatch", deferred)
    return fake


@pytest.mark.parametrize("clamp", [None, (-2.0, 2.0)])
@pytest.mark.parametrize("n_corrector", [1, 2])
def test_captured_steps_replay_the_eager_chain_bitwise(tape_graphs, n_corrector, clamp):
    # Every input of a captured step is a tensor updated in place: the seed the step advances, the
    # corrector's SNR step size computed inside the graph, and the predictor's delta and sqrt(delta),
    # which change from level to level between replays. A replayed graph gives the eager chain bitwise.
    x0 = torch.randn(5, 2, 3)
    sigmas = geometric_sigmas(4.0, 0.05, 7).tolist()
    seen = {}

    def run(graph):
        seen[graph] = []
        return pc_sampler(_score, x0, sigmas, n_corrector=n_corrector, clamp=clamp, cuda_graph=graph,
                          generator=torch.Generator().manual_seed(8), backend="cpp",
                          callback=lambda info: seen[graph].append((info.kind, float(info.step_size),
                                                                    float(info.noise_scale), info.norms.clone())))

    eager = run(False)
    assert tape_graphs.graphs == []
    graphed = run(True)
    assert len(tape_graphs.graphs) == 2  # one per kind of step
    # 3 eager warm-up steps of each kind, then one capture each; the rest are replays
    assert tape_graphs.replays == 7 * n_corrector - 3 + (7 - 1) - 3
    assert torch.equal(graphed, eager)
    assert len(seen[True]) == len(seen[False])
    for (kind, a, b, norms), (kind2, a2, b2, norms2) in zip(seen[True], seen[False]):
        assert (kind, a, b) == (kind2, a2, b2) and torch.equal(norms, norms2)
    deltas = [a for kind, a, _, _ in seen[True] if kind == "predictor"]
    assert len(set(deltas)) == len(deltas)  # the predictor's step size changed between its replays


def test_captured_annealed_langevin_replays_the_eager_chain_bitwise(tape_graphs):
    from fdsm_ext import annealed_langevin

    x0 = torch.rand(4, 6)
    run = lambda graph: annealed_langevin(_score, x0, geometric_sigmas(1.0, 0.1, 4), 5, 1e-3,  # noqa: E731
                                          clamp=(0.0, 1.0), cuda_graph=graph, generator=torch.Generator().manual_seed(3))
    eager = run(False)
    graphed = run(True)
    assert len(tape_graphs.graphs) == 1 and tape_graphs.replays == 4 * 5 - 3
    assert torch.equal(graphed, eager)


def test_captured_steps_report_nan_at_their_level_and_step(tape_graphs):
    def score(x, sigma):  # NaN once sigma drops below 0.3, without a host sync
        return torch.where(sigma[:, None] < 0.3, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"level 6 \(sigma=0\.25\), corrector step \(step 1 of"):
        pc_sampler(score, torch.ones(4, 3), [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125], cuda_graph=True, backend="cpp")
    assert tape_graphs.replays > 0


def _cuda_backends() -> list[str]:
    """The fused backends with a CUDA kernel here: [] without a GPU (the GPU kit, benchmarks/gpu_check.sh,
    runs the tests below)."""
    if not torch.cuda.is_available():
        return []
    found = []
    if torch._C._dispatch_has_kernel_for_dispatch_key("fdsm_ext::langevin_step_", "CUDA"):
        found.append("cpp")
    if _triton_unavailable("cuda") is None:
        found.append("triton")
    return found


needs_cuda_kernel = pytest.mark.skipif(not _cuda_backends(), reason="needs a CUDA GPU and a fused CUDA langevin_step")


@needs_cuda_kernel
@pytest.mark.parametrize("n_corrector", [1, 2])
def test_cuda_graph_pc_sampler_gives_the_eager_samples_bitwise(n_corrector):
    # The same kernels in the same order, captured or not: the samples, every callback's step sizes and
    # norms agree bitwise (an elementwise score: no library whose algorithm may differ under capture).
    x0 = torch.randn(64, 3, 5, device="cuda")
    sigmas = geometric_sigmas(8.0, 0.02, 9).tolist()
    for backend in _cuda_backends():
        runs = {}
        for graph in (False, True):
            seen = []
            out = pc_sampler(_score, x0, sigmas, n_corrector=n_corrector, clamp=(-20.0, 20.0), cuda_graph=graph,
                             generator=torch.Generator().manual_seed(4), backend=backend,
                             callback=lambda info: seen.append((info.step_size.clone(), info.noise_scale.clone(),
                                                                info.norms.clone())))
            runs[graph] = (out, seen)
        assert torch.equal(runs[True][0], runs[False][0]), backend
        for graphed, eager in zip(runs[True][1], runs[False][1]):
            assert all(torch.equal(a, b) for a, b in zip(graphed, eager)), backend


@needs_cuda_kernel
def test_cuda_graph_pc_sampler_with_a_network_matches_eager_and_the_cpu():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8))
    score = lambda model: (lambda x, sigma: model(x) / sigma[:, None])  # noqa: E731
    x0 = torch.randn(32, 8) * 4
    sigmas = geometric_sigmas(4.0, 0.05, 6).tolist()
    run = lambda model, x, graph, backend: pc_sampler(  # noqa: E731
        score(model), x, sigmas, cuda_graph=graph, backend=backend, generator=torch.Generator().manual_seed(5))
    cpu = run(net, x0, False, "cpp")
    gpu_net = net.cuda()
    for backend in _cuda_backends():
        eager, graphed = run(gpu_net, x0.cuda(), False, backend), run(gpu_net, x0.cuda(), True, backend)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        # the CPU kernel draws the same noise: the samples agree up to the model's rounding
        torch.testing.assert_close(graphed.cpu(), cpu, rtol=1e-3, atol=1e-3)


@needs_cuda_kernel
def test_cuda_graph_pc_sampler_reports_nan_at_its_level_and_step():
    def score(x, sigma):  # NaN once sigma drops below 0.3, without a host sync
        return torch.where(sigma[:, None] < 0.3, torch.full_like(x, float("nan")), -x)

    for backend in _cuda_backends():
        with pytest.raises(FloatingPointError, match=r"level 6 \(sigma=0\.25\), corrector step \(step 1 of"):
            pc_sampler(score, torch.ones(4, 3, device="cuda"), [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125],
                       cuda_graph=True, backend=backend)


def test_cuda_graph_true_without_a_gpu_kernel_raises():
    with pytest.raises(RuntimeError, match="`cuda_graph`=True needs"):
        pc_sampler(_score, torch.ones(2, 2), [1.0, 0.5], cuda_graph=True)
    with pytest.raises(ValueError, match="`cuda_graph`"):
        pc_sampler(_score, torch.ones(2, 2), [1.0, 0.5], cuda_graph="yes")

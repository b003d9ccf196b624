"""No host synchronisation in the default paths (issue 16), checked with a TorchDispatchMode on the CPU.

A device->host read of a tensor value dispatches ``aten::_local_scalar_dense`` (``bool(t)``,
``t.item()``, ``int(t)``, ``float(t)``); on a GPU each one stalls the queue and prevents CUDA-graph
capture. The default loss call (forward and backward, ``on_nonfinite="raise"``) and every sampler
step must dispatch none, while still raising on non-finite values. The CPU reads its finiteness
flags through numpy (no aten op); the GPU's deferred path is run here on the CPU by switching it on.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fdsm_ext
from fdsm_ext import numerics, sampling

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
            torch.ops.aten.is_nonzero.default}


class SyncSpy(TorchDispatchMode):
    """Records every op that reads a tensor value on the host, and every call of the fused Langevin step."""

    def __init__(self):
        super().__init__()
        self.syncs, self.steps = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        if "langevin_step" in str(func):
            self.steps.append(args)
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _clean_state():
    numerics._pending.clear()
    yield
    numerics._pending.clear()


torch.manual_seed(0)
NET = nn.Sequential(nn.Linear(3, 16), nn.Softplus(), nn.Linear(16, 3))


def log_density(y):
    return NET(y).sum(-1)


def score(y):
    return NET(y)


def score2(y, sigma):
    return NET(y) / sigma[:, None]


X = torch.randn(8, 3)
LOSSES = {
    "fd_ssm_loss": lambda: fdsm_ext.fd_ssm_loss(log_density, X),
    "fd_ssm_vr_loss": lambda: fdsm_ext.fd_ssm_vr_loss(score, X, n_slices=2),
    "fd_dsm_loss": lambda: fdsm_ext.fd_dsm_loss(log_density, X, 0.1),
    "fd_dsm_loss(tensor sigma)": lambda: fdsm_ext.fd_dsm_loss(log_density, X, torch.full((8,), 0.1)),
    "annealed_fd_ssm_vr_loss": lambda: fdsm_ext.annealed_fd_ssm_vr_loss(score2, X, [1.0, 0.5, 0.25]),
    "annealed_fd_ssm_vr_loss(tensor)": lambda: fdsm_ext.annealed_fd_ssm_vr_loss(
        score2, X, torch.tensor([1.0, 0.5]), labels=torch.tensor([0, 1] * 4)),
    "fd_ssm_loss(torch)": lambda: fdsm_ext.fd_ssm_loss(log_density, X, backend="torch"),
    "fd_directional_derivative": lambda: fdsm_ext.fd_directional_derivative(log_density, X, torch.ones_like(X), 2),
    "exact_sm_loss": lambda: fdsm_ext.exact_sm_loss(log_density, X),
    "ssm_loss": lambda: fdsm_ext.ssm_loss(log_density, X),
    "ssm_vr_loss": lambda: fdsm_ext.ssm_vr_loss(score, X, model_output="score"),
    "dsm_loss": lambda: fdsm_ext.dsm_loss(log_density, X, 0.1),
    "annealed_dsm_loss": lambda: fdsm_ext.annealed_dsm_loss(score2, X, [1.0, 0.5]),
    "annealed_ssm_vr_loss": lambda: fdsm_ext.annealed_ssm_vr_loss(score2, X, [1.0, 0.5]),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_default_loss_call_and_backward_read_nothing_on_the_host(name):
    LOSSES[name]().sum().backward()  # warm-up: the first call per dtype reads the batch once (precision warning)
    with SyncSpy() as spy:
        LOSSES[name]().sum().backward()
    assert spy.syncs == []


@pytest.mark.parametrize("name", ["fd_ssm_loss", "fd_ssm_vr_loss", "fd_dsm_loss", "dsm_loss", "exact_sm_loss"])
def test_the_guarantee_holds_without_a_sync(name):
    # A NaN parameter makes every output NaN: the call raises, naming the evaluation, without a sync.
    LOSSES[name]()
    with torch.no_grad():
        NET[0].bias[0] = float("nan")
    try:
        with SyncSpy() as spy, pytest.raises(FloatingPointError, match="non-finite values at x"):
            LOSSES[name]()
        assert spy.syncs == []
    finally:
        with torch.no_grad():
            NET[0].bias[0] = 0.0


def test_deferred_checks_raise_at_the_next_call_or_at_check_finite(monkeypatch):
    # The GPU's way, run on the CPU: the flags are copied to the host and judged later.
    monkeypatch.setattr(numerics, "_deferred", lambda t: True)
    bad = lambda y: log_density(y) * float("nan")  # noqa: E731
    with SyncSpy() as spy:
        loss = fdsm_ext.fd_ssm_loss(bad, X)  # returns; the check is pending
        assert len(numerics._pending) == 1 and loss is not None
        with pytest.raises(FloatingPointError, match=r"fd_ssm_loss: .*non-finite values at x .*found after the call"):
            fdsm_ext.fd_ssm_loss(log_density, X)  # the next call judges the landed flags first
        fdsm_ext.fd_ssm_loss(bad, X)
        with pytest.raises(FloatingPointError, match="non-finite values at x"):
            fdsm_ext.check_finite()
        fdsm_ext.check_finite()  # nothing pending: a no-op
    assert spy.syncs == [] and numerics._pending == []


def test_deferred_check_of_a_non_finite_loss_names_the_quotient(monkeypatch):
    monkeypatch.setattr(numerics, "_deferred", lambda t: True)
    fdsm_ext.fd_ssm_loss(log_density, X, 1e-20)
    with pytest.raises(FloatingPointError, match="FD quotient dim_scale/eps"):
        fdsm_ext.check_finite()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (2048, 3)])  # the CPU's watch reads the norms; it sums s and x
def test_sampler_steps_read_nothing_on_the_host(monkeypatch, backend, deferred, shape):
    original = sampling._FiniteWatch
    monkeypatch.setattr(sampling, "_FiniteWatch", lambda device, enabled: original(device, enabled, deferred=deferred))
    x = torch.rand(*shape)
    with torch.no_grad(), SyncSpy() as spy:
        out = fdsm_ext.annealed_langevin(score2, x, [1.0, 0.5, 0.25], 4, 1e-3, backend=backend)
    assert spy.syncs == [] and out.shape == x.shape


@pytest.mark.parametrize("shape", [(4, 3), (2048, 3)])
def test_sampler_nan_watch_still_stops_without_a_sync(shape):
    def nan_at_level_2(y, sigma):
        return torch.where(sigma[:, None] < 0.6, torch.full_like(y, float("nan")), -y)

    with SyncSpy() as spy, pytest.raises(FloatingPointError, match=r"level 2/3 .*step 1/4: the score returned NaN"):
        fdsm_ext.annealed_langevin(nan_at_level_2, torch.rand(*shape), [1.0, 0.5, 0.25], 4, 1e-3)
    assert spy.syncs == []


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (2048, 3)])
def test_fused_step_skips_the_norms_when_nothing_needs_them(monkeypatch, deferred, shape):
    # The deferred (GPU) watch needs the norms; the CPU's sums the score and x itself from
    # sampling._SUM_WATCH_MIN state elements on (and reads the norms of smaller states).
    original = sampling._FiniteWatch
    monkeypatch.setattr(sampling, "_FiniteWatch", lambda device, enabled: original(device, enabled, deferred=deferred))
    x = torch.rand(*shape)
    watch_needs_norms = deferred or x.numel() < sampling._SUM_WATCH_MIN
    for kwargs, want in [(dict(), watch_needs_norms), (dict(check_finite=False), False),
                         (dict(check_finite=False, callback=lambda info: None), True),
                         (dict(callback=lambda info: None), True)]:
        with SyncSpy() as spy:
            fdsm_ext.annealed_langevin(score2, x, [1.0, 0.5], 2, 1e-3, backend="cpp", **kwargs)
        assert spy.steps and all(args[-1] is want for args in spy.steps), kwargs


def test_the_spy_sees_a_host_read():
    # The control: the reads the default paths avoid are the ones this spy catches.
    with SyncSpy() as spy:
        bool(torch.isfinite(X).all())
        float(X.sum())
    assert len(spy.syncs) >= 2


def test_a_ladder_tensor_is_read_once_per_version(monkeypatch):
    # The NCSN trainer passes the same device tensor of noise levels to every step: it is read on the
    # host (a sync on a GPU) the first time only, and again after an in-place change.
    from fdsm_ext import _checks

    reads = []
    original = _checks.host_values
    monkeypatch.setattr(_checks, "host_values", lambda t: reads.append(t.shape) or original(t))
    ladder = torch.tensor([1.0, 0.5, 0.25])
    for _ in range(3):
        fdsm_ext.annealed_dsm_loss(score2, X, ladder)
    assert reads.count(ladder.shape) == 1  # (the other reads are the CPU's free 0-d loss flags)
    ladder[1] = -1.0
    with pytest.raises(ValueError, match="`sigmas` must be finite and > 0"):
        fdsm_ext.annealed_dsm_loss(score2, X, ladder)
    ladder[1] = 0.5
    fdsm_ext.annealed_dsm_loss(lambda y, s: -y / s[:, None], X.double(), ladder)  # another data dtype: read again
    assert reads.count(ladder.shape) == 3

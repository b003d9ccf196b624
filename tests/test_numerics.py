"""Low precision, eps selection, models without double backward, chunked evaluation, guards."""

import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fdsm_ext
from fdsm_ext import numerics

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "docs", "examples"))


def _energy(d=4, dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, 32), nn.Softplus(), nn.Linear(32, 1)).to(dtype)
    return lambda y: net(y).squeeze(-1) - 0.5 * y.square().sum(-1), net


@pytest.fixture(autouse=True)
def _fresh_warning_state():
    numerics._checked.clear()
    numerics.nonfinite_skips.clear()
    yield


# --------------------------------------------------------------------------- eps
def test_auto_eps_follows_the_formula_dtype_and_data_scale():
    x = torch.randn(4096, 6)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        expected = numerics.AUTO_EPS_KAPPA * (torch.finfo(dtype).eps / 2) ** 0.25 * numerics.data_scale(x)
        assert numerics.auto_eps(x, dtype) == pytest.approx(expected)
    assert numerics.auto_eps(x, torch.float64) < numerics.auto_eps(x, torch.float32) < numerics.auto_eps(
        x, torch.float16) < numerics.auto_eps(x, torch.bfloat16)
    assert numerics.auto_eps(10 * x, torch.float32) == pytest.approx(10 * numerics.auto_eps(x, torch.float32))
    assert numerics.data_scale(x) == pytest.approx(1.0, rel=0.05)


def test_evaluation_dtype_sees_autocast_and_parameters():
    x = torch.randn(3, 2)
    assert numerics.evaluation_dtype(x) == torch.float32
    assert numerics.evaluation_dtype(x, nn.Linear(2, 1).double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert numerics.evaluation_dtype(x, nn.Linear(2, 1)) == torch.bfloat16


def test_eps_auto_is_used_and_beats_a_too_small_eps_in_bfloat16():
    # Against the float64 loss with the same directions: eps='auto' in bf16 is far closer than 1e-3.
    f64, net = _energy(dtype=torch.float64)
    x = torch.randn(512, 4, dtype=torch.float64)
    net16 = net.to(torch.bfloat16)
    f16 = lambda y: net16(y).squeeze(-1) - 0.5 * y.square().sum(-1)  # noqa: E731
    errors = {}
    for eps in ("auto", 1e-3):
        e = numerics.auto_eps(x.bfloat16(), torch.bfloat16) if eps == "auto" else eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", numerics.FDPrecisionWarning)
            low = fdsm_ext.fd_ssm_loss(f16, x.bfloat16(), eps, reduction="none", generator=torch.Generator().manual_seed(1))
        net.double()
        ref = fdsm_ext.fd_ssm_loss(f64, x, e, reduction="none", generator=torch.Generator().manual_seed(1))
        net16 = net.to(torch.bfloat16)
        errors[eps] = ((low.double() - ref).abs().mean() / ref.abs().mean()).item()
    assert errors["auto"] < 0.1 < errors[1e-3], errors


def test_a_too_small_eps_warns_once_per_dtype():
    f, _ = _energy()
    x = torch.randn(64, 4)
    with pytest.warns(numerics.FDPrecisionWarning, match="eps=1e-05"):
        fdsm_ext.fd_ssm_loss(f, x, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", numerics.FDPrecisionWarning)
        fdsm_ext.fd_ssm_loss(f, x, 1e-5)  # second call: silent
        f64, _ = _energy(dtype=torch.float64)
        fdsm_ext.fd_ssm_loss(f64, x.double(), 1e-4)  # float64 resolves 1e-4 (auto ~ 4e-4)


def test_eps_auto_is_refused_under_compile():
    f, _ = _energy()
    fn = torch.compile(lambda x: fdsm_ext.fd_ssm_loss(f, x, "auto"), fullgraph=True)
    with pytest.raises(Exception, match="auto_eps"):
        fn(torch.randn(8, 4))


# --------------------------------------------------------------------------- mixed precision
def test_autocast_keeps_the_quotient_in_float32_and_fp32_eval_undoes_autocast():
    f, net = _energy()
    x = torch.randn(32, 4)
    plain = fdsm_ext.fd_ssm_loss(f, x, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fdsm_ext.fd_ssm_loss(f, x, 0.5, generator=torch.Generator().manual_seed(3))
        full = fdsm_ext.fd_ssm_loss(f, x, generator=torch.Generator().manual_seed(3), fp32_eval=True)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert torch.equal(full, plain)
    mixed.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- no double backward
class _OnceDifferentiableSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


def test_fd_ssm_trains_a_once_differentiable_model_that_ssm_cannot():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(2, 32), nn.Linear(32, 1)
    model = lambda y: lin2(_OnceDifferentiableSoftplus.apply(lin1(y))).squeeze(-1) - 0.5 * y.square().sum(-1)  # noqa
    data = torch.randn(2048, 2) * 0.3 + torch.tensor([1.0, -1.0])
    for loss_fn in (fdsm_ext.ssm_loss, fdsm_ext.ssm_vr_loss, fdsm_ext.exact_sm_loss):
        with pytest.raises(RuntimeError, match="fd_ssm_loss"):
            loss_fn(model, data[:16]).backward()
    opt = torch.optim.Adam(list(lin1.parameters()) + list(lin2.parameters()), lr=1e-2)
    exact = lambda: fdsm_ext.exact_sm_loss(  # noqa: E731  (exact SM through a twice-differentiable twin)
        lambda y: lin2(F.softplus(lin1(y))).squeeze(-1) - 0.5 * y.square().sum(-1), data[:512]).item()
    before = exact()
    for _ in range(150):
        loss = fdsm_ext.fd_ssm_loss(model, data[torch.randint(0, 2048, (128,))], 0.1, n_slices=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert exact() < before - 1.0, (before, exact())


def test_the_fused_attention_demo_runs():
    import no_double_backward

    assert math.isfinite(no_double_backward.main(steps=5))


# --------------------------------------------------------------------------- chunked evaluation
@pytest.mark.parametrize("loss", ["fd_ssm", "fd_ssm_vr", "fd_dsm", "annealed", "derivative"])
def test_chunked_evaluation_gives_the_same_loss_and_gradients(loss):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(12, 5, dtype=torch.float64)

    def run(chunk):
        g = torch.Generator().manual_seed(4)
        if loss == "fd_ssm":
            val = fdsm_ext.fd_ssm_loss(lambda y: net(y).sum(-1), x, n_slices=2, generator=g, chunk_size=chunk)
        elif loss == "fd_ssm_vr":
            val = fdsm_ext.fd_ssm_vr_loss(net, x, generator=g, chunk_size=chunk)
        elif loss == "fd_dsm":
            val = fdsm_ext.fd_dsm_loss(lambda y: net(y).sum(-1), x, 0.2, generator=g, chunk_size=chunk)
        elif loss == "annealed":
            val = fdsm_ext.annealed_fd_ssm_vr_loss(lambda y, s: net(y) / s[:, None], x, [1.0, 0.1], generator=g,
                                                   chunk_size=chunk)
        else:
            val = fdsm_ext.fd_directional_derivative(lambda y: net(y).sum(-1), x, x.flip(0), 3, chunk_size=chunk).sum()
        return val, torch.autograd.grad(val, list(net.parameters()))

    ref, ref_grads = run(None)
    for chunk in (7, 12, 1000):
        val, grads = run(chunk)
        torch.testing.assert_close(val, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)


def test_chunking_bounds_the_memory_held_for_backward():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from memory_table import saved_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 256), nn.Softplus(), nn.Linear(256, 256), nn.Softplus(), nn.Linear(256, 1))
    f = lambda y: net(y).squeeze(-1)  # noqa: E731
    x = torch.randn(64, 16)
    params = list(net.parameters())
    held = {c: saved_bytes(lambda c=c: fdsm_ext.fd_ssm_loss(f, x, chunk_size=c), params) for c in (None, 96, 24)}
    per_chunk = {c: saved_bytes(lambda c=c: f(torch.randn(c, 16)), params) for c in (96, 24)}
    assert held[None] > held[96] + per_chunk[96] > held[24] + per_chunk[24]


# --------------------------------------------------------------------------- guards
def _nan_at(rows):
    def model(y):
        out = -0.5 * y.square().sum(-1)
        mask = torch.zeros_like(out, dtype=torch.bool)
        mask[rows] = True
        return out.masked_fill(mask, float("nan"))
    return model


@pytest.mark.parametrize("rows, where", [([2], "at x \\("), ([4 + 1], "x\\+v"), ([4 + 8 + 3], "x-v")])
def test_nonfinite_model_output_raises_naming_the_evaluation(rows, where):
    x = torch.randn(4, 3)
    with pytest.raises(FloatingPointError, match=where):
        fdsm_ext.fd_ssm_loss(_nan_at(rows), x, n_slices=2)


def test_nonfinite_scores_and_dsm_are_named():
    x = torch.randn(4, 3)
    with pytest.raises(FloatingPointError, match="x-v"):
        fdsm_ext.fd_ssm_vr_loss(lambda y: torch.where(torch.arange(8)[:, None] == 6, float("inf"), -y), x)
    with pytest.raises(FloatingPointError, match="x~\\+v"):
        fdsm_ext.fd_dsm_loss(_nan_at([0]), x, 0.1)
    with pytest.raises(FloatingPointError, match="x\\+1\\*eps\\*v"):
        fdsm_ext.fd_directional_derivative(_nan_at([0]), x, x, order=1)


def test_nonfinite_batches_can_be_skipped_and_counted():
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = fdsm_ext.fd_ssm_loss(_nan_at([1]), x, on_nonfinite="skip")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert numerics.nonfinite_skips["fd_ssm_loss"] == 1
    per = fdsm_ext.fd_ssm_loss(_nan_at([1]), x, on_nonfinite="ignore", reduction="none")
    assert torch.isnan(per).any()


GRADIENT_LOSSES = {
    "exact_sm_loss": lambda m, x, **kw: fdsm_ext.exact_sm_loss(m, x, **kw),
    "ssm_loss": lambda m, x, **kw: fdsm_ext.ssm_loss(m, x, **kw),
    "ssm_vr_loss": lambda m, x, **kw: fdsm_ext.ssm_vr_loss(m, x, **kw),
    "dsm_loss": lambda m, x, **kw: fdsm_ext.dsm_loss(m, x, 0.1, **kw),
    "annealed_dsm_loss": lambda m, x, **kw: fdsm_ext.annealed_dsm_loss(lambda y, s: _score_of(m, y), x, [1.0, 0.5],
                                                                         **kw),
    "annealed_ssm_vr_loss": lambda m, x, **kw: fdsm_ext.annealed_ssm_vr_loss(lambda y, s: _score_of(m, y), x,
                                                                               [1.0, 0.5], **kw),
}


def _score_of(log_density, y):
    with torch.enable_grad():
        yg = y if y.requires_grad else y.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(log_density(yg).sum(), yg, create_graph=True)
    return g


@pytest.mark.parametrize("name", list(GRADIENT_LOSSES))
def test_gradient_losses_follow_the_fd_losses_nonfinite_contract(name):
    # One contract for every loss: raise naming the evaluation, skip with a count, or ignore (NaN out).
    x = torch.randn(4, 3)
    nan_row = lambda y: -0.5 * y.square().sum(-1) * torch.where(  # noqa: E731
        torch.arange(y.shape[0]) == 1, float("nan"), 1.0)
    loss = GRADIENT_LOSSES[name]
    where = "x~" if "dsm" in name or "annealed" in name else "x"
    with pytest.raises(FloatingPointError, match=f"{name}: the model returned non-finite values at {where} "):
        loss(nan_row, x)
    with pytest.warns(RuntimeWarning, match="skipped"):
        skipped = loss(nan_row, x, on_nonfinite="skip")
    assert skipped.item() == 0.0 and numerics.nonfinite_skips[name] == 1
    assert torch.isnan(loss(nan_row, x, on_nonfinite="ignore"))
    assert torch.isfinite(loss(lambda y: -0.5 * y.square().sum(-1), x))


# --------------------------------------------------------------------------- the CPU fast path of the guard
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_guard_fast_path_tells_an_overflowing_sum_from_a_non_finite_loss(dtype):
    # The fast path reads the (B,) loss on the host: values whose sum overflows the dtype pass (and
    # warn about nothing), one inf or NaN among them raises and names the evaluation.
    big = torch.finfo(dtype).max / 2
    outputs = torch.zeros(6, dtype=dtype)
    blocks = [("x+v", 3), ("x-v", 3)]
    finite = torch.full((3,), big, dtype=dtype, requires_grad=True) * 1  # a loss with a graph, as the losses'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert numerics.guard_nonfinite("test_loss", outputs, blocks, finite, "raise") is False
    for bad in (float("inf"), float("nan")):
        loss = torch.tensor([1.0, bad, big], dtype=dtype)
        with pytest.raises(FloatingPointError, match="test_loss: the model's outputs were finite but the loss"):
            numerics.guard_nonfinite("test_loss", outputs, blocks, loss, "raise")
        rows = outputs.clone()
        rows[4] = bad
        with pytest.raises(FloatingPointError, match=r"x-v \(1 of 3 rows, first at row 1\)"):
            numerics.guard_nonfinite("test_loss", rows, blocks, loss, "raise")

"""A generated bad-input suite over every public function of fdsm_ext (issue 13).

Each public function has a good call (tiny tensors) and, per argument, a table of bad values; every
(function, argument, bad value) cell, crossed with the data dtypes where the data's dtype changes what
is accepted, is one test case. Each must raise TypeError, ValueError or FloatingPointError whose
message names the argument in backquotes (`eps`), or, for non-finite model outputs, names the
evaluation they came from; none may return. Raw ops (torch.ops.fdsm_ext) have their own table in
tests/test_ops.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fdsm_ext
from fdsm_ext import numerics

B, D = 3, 2
NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.float64)


def _log_density(y):
    return -0.5 * y.square().sum(-1)


def _score(y):
    return -y


def _score2(y, sigma):
    return -y / sigma[:, None]


def _x(dtype=torch.float32):
    return torch.linspace(-1.0, 1.0, B * D, dtype=dtype).reshape(B, D)


# --------------------------------------------------------------------------- bad values by kind
def _tensor_bad():
    """Bad data batches ``x``: not a tensor, not floating, wrong rank, empty, meta."""
    return [[1.0, 2.0], np.zeros((B, D)), torch.zeros(B, D, dtype=torch.int64), torch.zeros(B, D, dtype=torch.bool),
            torch.zeros(B, D, dtype=torch.complex64), torch.zeros(D), torch.zeros(()), torch.zeros(0, D),
            torch.zeros(B, 0), torch.empty(B, D, device="meta"), None, "x"]


POSITIVE = [0, 0.0, -1.0, -1e-30, NAN, INF, -INF, "0.1", True, 1j, [0.1], None, torch.tensor([0.1, 0.2]),
            torch.tensor(NAN), np.float64(-2.0)]
POSITIVE_OR_NONE = [v for v in POSITIVE if v is not None]
INT_GE1 = [0, -1, 1.5, 2.0, "2", True, None, INF, np.float32(2.0), [1]]
INT_GE1_OR_NONE = [v for v in INT_GE1 if v is not None]
CHOICE = ["bogus", "", None, 1, "MEAN", ["mean"], b"mean"]
GENERATOR = [3, "cpu", torch.device("cpu"), object(), 1.5, torch.zeros(2)]
BOOL = ["yes", 1, None, 0.0, "True"]
REAL = [NAN, INF, -INF, "1", None, 1j, True, [1.0], torch.tensor([1.0, 2.0])]
CALLABLE = [None, 3, "f", torch.zeros(2)]
SIGMA = [0, -1.0, NAN, INF, 1e-300, "0.1", True, None, torch.tensor([0.1, 0.2]), torch.zeros(B),
         torch.full((B,), NAN), torch.full((B,), -1.0), torch.ones(B, dtype=torch.complex64),
         torch.ones(B, dtype=torch.bool), torch.ones(B, 2), torch.full((B,), 1e-300, dtype=torch.float64)]
SIGMAS = ["abc", [], [[1.0, 0.5]], [1.0, -1.0], [1.0, NAN], [1.0, INF], [1e-300], None, 5, ["1", "2"], [True],
          torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.complex64), torch.zeros(0),
          torch.tensor([1.0, 0.0]), torch.empty(2, device="meta")]
LABELS = [torch.full((B,), -1), torch.full((B,), 2), torch.full((B,), 99), torch.ones(B, dtype=torch.bool),
          torch.zeros(B), torch.zeros(B, dtype=torch.complex64), torch.zeros(B + 1, dtype=torch.int64),
          torch.zeros(B, 1, dtype=torch.int64), [0, 1, 0], 1, "0"]


# --------------------------------------------------------------------------- the functions
# name: (callable, good keyword arguments (as a function of x), {argument: bad values}, dtype-dependent)
FD_COMMON = {
    "x": _tensor_bad(), "eps": POSITIVE + ["auto2", "AUTO"], "n_slices": INT_GE1 + [2**62],
    "directions": CHOICE + ["normal"], "generator": GENERATOR, "reduction": CHOICE, "backend": CHOICE + ["cuda"],
    "dim_scale": POSITIVE_OR_NONE, "chunk_size": INT_GE1_OR_NONE, "fp32_eval": BOOL, "on_nonfinite": CHOICE,
}
GRADIENT_COMMON = {"x": _tensor_bad(), "reduction": CHOICE, "on_nonfinite": CHOICE, "generator": GENERATOR}
SAMPLER = {
    "x": [[1.0], np.zeros((B, D)), torch.zeros(B, D, dtype=torch.int64), torch.zeros(B, D, dtype=torch.complex64),
          torch.zeros(0, D), torch.empty(B, D, device="meta"), None],
    "clamp": [1.0, (1.0, 0.0), (NAN, 1.0), ("a", 1.0), (1.0,), "ab", (True, None), (0.0, 1.0, 2.0)],
    "generator": GENERATOR, "callback": [3, "print"], "progress": BOOL, "snapshot_every": INT_GE1_OR_NONE,
    "cuda_graph": ["yes", 2, None, True], "check_finite": BOOL, "backend": CHOICE + ["cuda"],
}

SPECS = {
    "fd_ssm_loss": (fdsm_ext.fd_ssm_loss, lambda x: dict(log_density=_log_density, x=x, eps=0.1),
                    {**FD_COMMON, "log_density": CALLABLE}),
    "fd_ssm_vr_loss": (fdsm_ext.fd_ssm_vr_loss, lambda x: dict(score=_score, x=x, eps=0.1),
                       {**FD_COMMON, "score": CALLABLE}),
    "fd_dsm_loss": (fdsm_ext.fd_dsm_loss, lambda x: dict(log_density=_log_density, x=x, sigma=0.5, eps=0.1),
                    {**FD_COMMON, "log_density": CALLABLE, "sigma": SIGMA, "sigma_power": REAL}),
    "annealed_fd_ssm_vr_loss": (fdsm_ext.annealed_fd_ssm_vr_loss,
                                lambda x: dict(score=_score2, x=x, sigmas=[1.0, 0.5], eps=0.1),
                                {**FD_COMMON, "score": CALLABLE, "sigmas": SIGMAS, "labels": LABELS}),
    "fd_directional_derivative": (fdsm_ext.fd_directional_derivative,
                                  lambda x: dict(f=_log_density, x=x, v=torch.ones_like(x), order=2, eps=0.1),
                                  {"f": CALLABLE, "x": _tensor_bad(), "eps": POSITIVE,
                                   "order": INT_GE1 + [17, 2**40], "backend": CHOICE, "chunk_size": INT_GE1_OR_NONE,
                                   "v": [None, [1.0], torch.ones(B, D + 1), torch.ones(B, D, dtype=torch.int64),
                                         torch.ones(B, D, dtype=torch.float16), torch.ones(D)]}),
    "exact_sm_loss": (fdsm_ext.exact_sm_loss, lambda x: dict(model=_log_density, x=x),
                      {**GRADIENT_COMMON, "model": CALLABLE, "model_output": CHOICE, "generator": []}),
    "ssm_loss": (fdsm_ext.ssm_loss, lambda x: dict(model=_log_density, x=x),
                 {**GRADIENT_COMMON, "model": CALLABLE, "model_output": CHOICE, "n_slices": INT_GE1 + [2**62],
                  "directions": CHOICE}),
    "ssm_vr_loss": (fdsm_ext.ssm_vr_loss, lambda x: dict(model=_log_density, x=x),
                    {**GRADIENT_COMMON, "model": CALLABLE, "model_output": CHOICE, "n_slices": INT_GE1 + [2**62],
                     "directions": CHOICE}),
    "dsm_loss": (fdsm_ext.dsm_loss, lambda x: dict(model=_log_density, x=x, sigma=0.5),
                 {**GRADIENT_COMMON, "model": CALLABLE, "model_output": CHOICE, "sigma": SIGMA}),
    "annealed_dsm_loss": (fdsm_ext.annealed_dsm_loss, lambda x: dict(score=_score2, x=x, sigmas=[1.0, 0.5]),
                          {**GRADIENT_COMMON, "score": CALLABLE, "sigmas": SIGMAS, "labels": LABELS}),
    "annealed_ssm_vr_loss": (fdsm_ext.annealed_ssm_vr_loss, lambda x: dict(score=_score2, x=x, sigmas=[1.0, 0.5]),
                             {**GRADIENT_COMMON, "score": CALLABLE, "sigmas": SIGMAS, "labels": LABELS,
                              "n_slices": INT_GE1 + [2**62], "directions": CHOICE}),
    "annealed_langevin": (fdsm_ext.annealed_langevin,
                          lambda x: dict(score_fn=_score2, x=x, sigmas=[1.0, 0.5], n_steps_each=1, step_lr=0.01),
                          {**SAMPLER, "score_fn": CALLABLE, "n_steps_each": INT_GE1, "step_lr": POSITIVE,
                           "denoise": BOOL,
                           "sigmas": SIGMAS + [[1.0, 1.0], [0.5, 1.0], [1.0, 1e-200], [1e300, 1e-300]]}),
    "langevin_dynamics": (fdsm_ext.langevin_dynamics, lambda x: dict(score_fn=_score, x=x, n_steps=1, step_size=0.01),
                          {**SAMPLER, "score_fn": CALLABLE, "n_steps": INT_GE1, "step_size": POSITIVE}),
    "pc_sampler": (fdsm_ext.pc_sampler, lambda x: dict(score_fn=_score2, x=x, sigmas=[1.0, 0.5]),
                   {**{k: v for k, v in SAMPLER.items() if k != "cuda_graph"}, "score_fn": CALLABLE,
                    "sigmas": SIGMAS + [[1.0, 1.0], [0.5, 1.0]], "n_corrector": [-1, 1.5, "2", True, None],
                    "snr": POSITIVE, "predictor": CHOICE, "denoise": BOOL}),
    "ode_likelihood": (fdsm_ext.ode_likelihood,
                       lambda x: dict(score_fn=_score2, x=x, sigma_min=0.01, sigma_max=1.0, rtol=1e-3, atol=1e-3),
                       {"score_fn": CALLABLE, "x": _tensor_bad(), "sigma_min": POSITIVE, "sigma_max": POSITIVE,
                        "divergence": CHOICE, "n_probes": INT_GE1, "eps": POSITIVE + ["auto2"], "rtol": POSITIVE,
                        "atol": POSITIVE, "dequantize": [v for v in CHOICE if v is not None], "generator": GENERATOR, "probes": CHOICE,
                        "method": CHOICE, "backend": CHOICE + ["cuda"]}),
}

# Functions whose accepted values do not depend on the data's dtype: one dtype only.
RECIPE = {
    "max_pairwise_distance": (fdsm_ext.max_pairwise_distance, dict(x=_x()),
                              {"x": [[1.0], None, torch.zeros(B, D, dtype=torch.int64),
                                     torch.zeros(B, dtype=torch.complex64), torch.zeros(()),
                                     torch.empty(B, D, device="meta"),
                                     torch.tensor([[0.0, 0], [1, 0], [NAN, 0], [5, 0]]),
                                     torch.tensor([[0.0, 0], [INF, 0], [5, 0]]),
                                     torch.tensor([[-INF], [0.0]])],
                               "block_size": INT_GE1}),
    "geometric_ratio": (fdsm_ext.geometric_ratio, dict(dim=100),
                        {"dim": INT_GE1 + [4], "target": REAL + [0.0, 1.0, -0.5, 2.0]}),
    "geometric_sigmas": (fdsm_ext.geometric_sigmas, dict(sigma_max=1.0, sigma_min=0.1, num=5),
                         {"sigma_max": POSITIVE, "sigma_min": POSITIVE + [2.0],
                          "num": [v for v in INT_GE1 if v is not None] + [1, 10**12, 2**21],
                          "dtype": [torch.int64, torch.bool, torch.complex64, "float32", None, float]}),
    "geometric_sigmas(gamma)": (fdsm_ext.geometric_sigmas, dict(sigma_max=1.0, sigma_min=0.1, gamma=1.5),
                                {"gamma": POSITIVE + [1.0, 0.5, 1 + 1e-15]}),
    "step_size_objective": (fdsm_ext.step_size_objective, dict(eps=1e-5, sigma_min=0.01, gamma=1.1, n_steps_each=5),
                            {"eps": POSITIVE + [1e-4, 1.0], "sigma_min": POSITIVE + [1e200, 1e-200],
                             "gamma": POSITIVE + [1.0, 0.9, 1e200], "n_steps_each": INT_GE1}),
    "solve_step_size": (fdsm_ext.solve_step_size, dict(sigma_min=0.01, gamma=1.1, n_steps_each=5),
                        {"sigma_min": POSITIVE + [1e200, 1e-200], "gamma": POSITIVE + [1.0, 0.9, 1e200],
                         "n_steps_each": INT_GE1}),
    "NoiseConditionalScore": (fdsm_ext.NoiseConditionalScore, dict(net=nn.Identity()), {"net": CALLABLE}),
    "NoiseConditionalScore.forward": (lambda x, sigma: fdsm_ext.NoiseConditionalScore(nn.Identity())(x, sigma),
                                      dict(x=_x(), sigma=torch.ones(B)),
                                      {"sigma": [0, 0.0, -1.0, NAN, INF, "1", None, True, torch.zeros(B),
                                                 torch.full((B,), NAN), torch.ones(B, dtype=torch.int64),
                                                 torch.ones(B + 1), torch.ones(B, 1)]}),
    "selfcheck": (fdsm_ext.selfcheck, dict(device="cpu", backends=("torch",)),
                  {"device": ["nope", 3.5, None, "meta", torch.zeros(1)],
                   "backends": ["cpp", ("cuda",), ("auto",), [None], 3],
                   "raise_on_failure": BOOL}),
    "ema_model": (fdsm_ext.ema_model, dict(model=nn.Linear(2, 2), decay=0.9),
                  {"model": CALLABLE + [lambda y: y], "decay": REAL + ["0.9", -0.1, 1.5]}),
    "score_from_log_density": (fdsm_ext.score_from_log_density, dict(log_density=_log_density),
                               {"log_density": CALLABLE, "takes_sigma": BOOL}),
    "score_from_energy": (fdsm_ext.score_from_energy, dict(energy=_log_density),
                          {"energy": CALLABLE, "takes_sigma": BOOL}),
    "numerics.unit_roundoff": (numerics.unit_roundoff, dict(dtype=torch.float32),
                               {"dtype": [torch.int64, torch.bool, "float32", None, float, 1.0]}),
    "numerics.usable_eps_range": (numerics.usable_eps_range, dict(dtype=torch.float32),
                                  {"dtype": [torch.int32, "float32", None], "scale": POSITIVE}),
    "numerics.evaluation_dtype": (numerics.evaluation_dtype, dict(x=_x()),
                                  {"x": _tensor_bad()[:5] + [None, torch.empty(B, device="meta")]}),
    "numerics.data_scale": (numerics.data_scale, dict(x=_x()), {"x": [[1.0], None, np.zeros(3),
                                                                     torch.zeros(3, dtype=torch.int64)]}),
    "numerics.auto_eps": (numerics.auto_eps, dict(x=_x()),
                          {"x": [[1.0, 2.0], None, np.zeros(3), torch.zeros(3, dtype=torch.int64),
                                 torch.empty(3, device="meta")],
                           "dtype": [torch.int64, "float32", 1.0]}),
    "numerics.warn_if_unresolvable": (numerics.warn_if_unresolvable, dict(eps=0.1, x=_x()), {"eps": POSITIVE}),
}


def _cases():
    cases = []
    for name, (fn, good, bad) in SPECS.items():
        for dtype in DTYPES:
            for arg, values in bad.items():
                for k, value in enumerate(values):
                    cases.append(pytest.param(fn, good, dtype, arg, value, id=f"{name}-{arg}-{k}-{str(dtype)[6:]}"))
    for name, (fn, good, bad) in RECIPE.items():
        for arg, values in bad.items():
            for k, value in enumerate(values):
                cases.append(pytest.param(fn, (lambda g: lambda x: dict(g))(good), None, arg, value,
                                          id=f"{name}-{arg}-{k}"))
    return cases


CASES = _cases()


def test_the_suite_has_at_least_1000_bad_calls_over_every_public_function():
    assert len(CASES) >= 1000
    covered = {name.split("(")[0].split(".")[-1] for name in [*SPECS, *RECIPE]} - {"forward"}
    public = {n for n in fdsm_ext.__all__ if callable(getattr(fdsm_ext, n))} - {
        "LangevinStepInfo", "PCStepInfo", "LikelihoodResult", "has_cuda_kernels", "check_finite", "ops", "reference"}
    assert public <= covered, public - covered


def _call(fn, good, dtype, arg, value):
    kwargs = good(_x(dtype or torch.float32))
    kwargs[arg] = value
    if arg == "x" and "v" in kwargs and isinstance(value, torch.Tensor) and value.dim() == 2:
        kwargs["v"] = torch.ones_like(value) if value.is_floating_point() else kwargs["v"]
    return fn(**kwargs)


@pytest.mark.parametrize("fn, good, dtype, arg, value", CASES)
def test_bad_argument_is_refused_by_name(fn, good, dtype, arg, value):
    with pytest.raises((TypeError, ValueError, FloatingPointError, RuntimeError), match=f"`{arg}`") as info:
        with np.errstate(all="ignore"):
            result = _call(fn, good, dtype, arg, value)
            pytest.fail(f"returned {result!r} instead of refusing `{arg}`={value!r}")  # pragma: no cover
    assert "pytest" not in type(info.value).__module__


@pytest.mark.parametrize("name", list(SPECS) + [n for n in RECIPE if n not in ("NoiseConditionalScore",)])
def test_the_good_call_of_each_table_works(name):
    # Each table's good call must succeed, or the bad calls would prove nothing.
    fn, good, _ = SPECS[name] if name in SPECS else RECIPE[name]
    kwargs = good(_x()) if callable(good) else dict(good)
    out = fn(**kwargs)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        assert torch.isfinite(out).all()
    elif isinstance(out, float):
        assert math.isfinite(out)


# --------------------------------------------------------------------------- bad model outputs
def _outputs(kind, like):
    """A model output of the wrong kind for ``like``: complex, integer, wrong shape, not a tensor, NaN."""
    return {"complex": like.to(torch.complex64), "int": like.to(torch.int64), "shape": like[:1],
            "tensor": 1.0, "nan": like + NAN, "inf": like + INF}[kind]


OUTPUT_CASES = []
for _loss, _fn, _arg, _model_kind, _extra, _where in [
    ("fd_ssm_loss", fdsm_ext.fd_ssm_loss, "log_density", "ld", {}, "x"),
    ("fd_ssm_vr_loss", fdsm_ext.fd_ssm_vr_loss, "score", "s", {}, "x\\+v"),
    ("fd_dsm_loss", fdsm_ext.fd_dsm_loss, "log_density", "ld", {"sigma": 0.5}, "x~\\+v"),
    ("annealed_fd_ssm_vr_loss", fdsm_ext.annealed_fd_ssm_vr_loss, "score", "s2", {"sigmas": [1.0, 0.5]}, "x\\+v"),
    ("fd_directional_derivative", fdsm_ext.fd_directional_derivative, "f", "ld", {"v": None}, "x\\+1\\*eps\\*v"),
    ("exact_sm_loss", fdsm_ext.exact_sm_loss, "model", "ld", {}, "x"),
    ("ssm_loss", fdsm_ext.ssm_loss, "model", "ld", {}, "x"),
    ("ssm_vr_loss", fdsm_ext.ssm_vr_loss, "model", "ld", {}, "x"),
    ("dsm_loss", fdsm_ext.dsm_loss, "model", "ld", {"sigma": 0.5}, "x~"),
    ("annealed_dsm_loss", fdsm_ext.annealed_dsm_loss, "score", "s2", {"sigmas": [1.0, 0.5]}, "x~"),
    ("annealed_ssm_vr_loss", fdsm_ext.annealed_ssm_vr_loss, "score", "s2", {"sigmas": [1.0, 0.5]}, "x~"),
]:
    for _kind in ("complex", "int", "shape", "tensor", "nan", "inf"):
        if _kind in ("int",) and _loss in ("exact_sm_loss", "ssm_loss", "ssm_vr_loss", "dsm_loss"):
            continue  # an integer log-density cannot even be differentiated; autograd refuses it first
        for _dtype in DTYPES:
            OUTPUT_CASES.append(pytest.param(_fn, _arg, _model_kind, _extra, _kind, _where, _dtype,
                                             id=f"{_loss}-{_kind}-{str(_dtype)[6:]}"))


@pytest.mark.parametrize("fn, arg, model_kind, extra, kind, where, dtype", OUTPUT_CASES)
def test_bad_model_outputs_are_refused(fn, arg, model_kind, extra, kind, where, dtype):
    x = _x(dtype)
    extra = {k: (torch.ones_like(x) if v is None else v) for k, v in extra.items()}
    if model_kind == "ld":
        def model(y):
            out = _log_density(y)
            return _outputs(kind, out) if kind in ("complex", "int", "shape", "tensor") else out * _outputs(kind, out)
    elif model_kind == "s":
        def model(y):
            return _outputs(kind, -y)
    else:
        def model(y, sigma):
            return _outputs(kind, -y)
    if kind in ("nan", "inf"):
        with pytest.raises(FloatingPointError, match=f"non-finite values at {where}"):
            fn(model, x, **extra)
    else:
        with pytest.raises((TypeError, ValueError, RuntimeError), match=f"`{arg}`|{arg}|not differentiable"):
            fn(model, x, **extra)


def test_eps_whose_quotient_the_dtype_cannot_hold_raises_on_every_call():
    x = _x()
    for _ in range(2):  # not once per process: every call
        with pytest.raises(FloatingPointError, match=r"FD quotient .* eps must lie in about \[0\.00024, 1\]"):
            fdsm_ext.fd_ssm_loss(_log_density, x, 1e-20)
    with pytest.raises(FloatingPointError, match="FD quotient"):
        fdsm_ext.fd_dsm_loss(_log_density, x, 0.5, eps=1e-20)
    with pytest.raises(FloatingPointError, match="FD quotient"):
        fdsm_ext.fd_ssm_vr_loss(_score, torch.randn(4, 5) * 1e30)


def test_right_answers_where_the_issue_found_wrong_ones():
    x = torch.tensor([[1e30], [0.0], [-1e30]])
    assert fdsm_ext.max_pairwise_distance(x) == pytest.approx(2 * float(x[0, 0]), rel=1e-12)
    big = torch.tensor([[1e200], [-1e200]], dtype=torch.float64)
    assert fdsm_ext.max_pairwise_distance(big) == pytest.approx(2e200, rel=1e-12)
    # uint8 labels index levels (they used to act as a mask)
    a = fdsm_ext.annealed_dsm_loss(_score2, _x(), [1.0, 0.5], labels=torch.ones(B, dtype=torch.uint8),
                                   generator=torch.Generator().manual_seed(0))
    b = fdsm_ext.annealed_dsm_loss(_score2, _x(), [1.0, 0.5], labels=torch.ones(B, dtype=torch.int64),
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)

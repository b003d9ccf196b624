"""A generated bad-input suite for the raw ops, torch.ops.fdsm_ext.* and torch.ops.fdsm_ext_triton.*.

Each op starts from its example call (:func:`fdsm_ext.ops.example`, B = 3 samples of D = 5 features);
the table below derives the bad ones from its schema: every tensor argument None, on the meta device, of
a non-float dtype, with an extra dimension or a longer first dimension; every scalar argument of the
wrong type or out of range (eps, dim_scale, kind, order, n_slices, the clamp bounds); sizes that
overflow the direction stream; and, for the in-place Langevin step, inputs that overlap ``x`` in
memory. An optional tensor argument (``Tensor?``: the Langevin step's ``noise_scale``) gets the same
cases but None, which is a good value for it. Every call must raise a Python exception whose message
names the argument (or, for a shape, an argument it is checked against; for None as an op's only
tensor, the op, which the dispatcher cannot reach): none may return.
None of these calls crashes the process (each is refused before any kernel runs), so no subprocess
is needed.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from fdsm_ext import ops


B, D = 3, 5


def _good():
    """The good call of every op, {name: {argument: value}}: its example (fdsm_ext.ops.example), float32."""
    return {name: ops.example(name, B, D) for name in ops.OPS}


#: Bad values of each scalar argument, beyond a wrong type (a string) and None, which every one gets.
_BAD_SCALARS = {
    "eps": [0.0, -0.1, math.nan, math.inf, -math.inf],
    "dim_scale": [math.nan, math.inf, -math.inf],
    "kind": [-1, 3, 2**40, 1.5],
    "order": [0, -1, 17, 2**40, 1.5],
    "n_slices": [0, -1, 2**62, 2**31, 1.5],
    "clamp_min": [math.nan, 2.0],  # 2.0 > clamp_max = 1.0
    "clamp_max": [math.nan, -2.0],
    "include_center": [],
    "return_norms": [],
}
#: Op-specific bad eps: the FD quotients' dim_scale / eps^2 (fd_divergence's d / (2 eps^2)) overflows;
#: (2 eps)^order under/overflows; x +- v overflows float32.
_BAD_EPS = {"fd_ssm": [1e-200], "fd_dsm": [1e-200], "stencil": [1e-200, 1e200], "perturb": [1e39],
            "fd_divergence": [1e-200]}


def _tensor_args(name):
    """The op's tensor arguments, its optional ones (Tensor?, e.g. the Langevin step's noise_scale) included."""
    return [a.name for a in getattr(ops._ops, name).default._schema.arguments
            if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())]


def _optional_args(name):
    """The op's Tensor? arguments: None is a good value for them."""
    return [a.name for a in getattr(ops._ops, name).default._schema.arguments
            if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())
            and not a.type.isSubtypeOf(torch._C.TensorType.get())]


def _named(arg: str) -> str:
    """A regex matching a message that names ``arg`` (`arg` in the op's checks, 'arg' in the dispatcher's)."""
    return rf"[`']{re.escape(arg)}[`']"


def _cases():
    """(id, op name, args builder, match) of every bad call."""
    cases = []

    def add(name, tag, mutate, match):
        def build(mutate=mutate, name=name):
            args = ops.example(name, B, D)
            mutate(args)
            return list(args.values())

        cases.append((f"{name}-{tag}", name, build, match))

    for name in ops.OPS:
        tensors = _tensor_args(name)
        shape_group = "|".join(t for t in tensors if t != "seed")
        for t in tensors:
            # None for an op's only tensor leaves the dispatcher nothing to dispatch on: its message names the op
            # and says it got no tensor argument
            alone = len(tensors) == 1
            if t not in _optional_args(name):
                add(name, f"{t}-None", lambda a, t=t: a.__setitem__(t, None),
                    f"no tensor arguments to this function.*{name}" if alone else _named(t))
            if len(tensors) - ("seed" in tensors) > 1 or t == "seed":  # one meta tensor alone is a valid meta call
                add(name, f"{t}-meta", lambda a, t=t: a.__setitem__(t, a[t].to("meta")), _named(t))
            add(name, f"{t}-int64", lambda a, t=t: a.__setitem__(t, a[t].to(torch.int32 if t == "seed" else torch.int64)),
                _named(t))
            if t == "seed":
                add(name, "seed-3-elements", lambda a: a.__setitem__("seed", torch.zeros(3, dtype=torch.int64)),
                    _named("seed"))
                add(name, "seed-float", lambda a: a.__setitem__("seed", torch.zeros(2)), _named("seed"))
                continue
            add(name, f"{t}-complex", lambda a, t=t: a.__setitem__(t, a[t].to(torch.complex64)), _named(t))
            add(name, f"{t}-bool", lambda a, t=t: a.__setitem__(t, a[t] > 0), _named(t))
            if not (name.startswith("langevin") and t == "x"):  # x's event shape is free
                add(name, f"{t}-extra-dim", lambda a, t=t: a.__setitem__(t, a[t].unsqueeze(-1)), _named(t))
            if name != "perturb":  # perturb's x has no shape constraint on its batch
                add(name, f"{t}-longer", lambda a, t=t: a.__setitem__(t, torch.cat([a[t], a[t][:1]])),
                    rf"`({shape_group})`")
            if t not in ("alpha", "noise_scale"):  # one element is a valid step size or noise scale
                add(name, f"{t}-0d", lambda a, t=t: a.__setitem__(t, torch.tensor(1.0)), rf"`({shape_group})`")
        for arg, value in ops.example(name, B, D).items():
            if isinstance(value, torch.Tensor) or value is None:
                continue
            bad = list(_BAD_SCALARS.get(arg, []))
            if arg == "eps":
                bad += next((v for k, v in _BAD_EPS.items() if name.startswith(k)), [])
            # None is a valid clamp bound; torch's argument parser reads None as False for a bool
            bad += ["0.5"] + ([] if arg.startswith("clamp") or isinstance(value, bool) else [None])
            for v in bad:
                add(name, f"{arg}={v!r}", lambda a, arg=arg, v=v: a.__setitem__(arg, v), _named(arg))

    # sizes: too many direction-stream rows, too long a sample (expanded zeros: no memory)
    big = lambda *s: torch.zeros(1).expand(*s)  # noqa: E731
    add("fd_ssm_vr", "rows-overflow", lambda a: a.update(sp=big(2, 2**31, 1), sm=big(2, 2**31, 1)), _named("n_slices"))
    add("fd_ssm_vr", "features-overflow", lambda a: a.update(sp=big(1, 1, 2**34), sm=big(1, 1, 2**34)), _named("sp"))
    add("fd_dsm_quotient", "features-overflow", lambda a: a.update(noise=big(B, 2**34)), _named("noise"))
    add("perturb", "features-overflow", lambda a: a.update(x=big(1, 2**34)), _named("x"))
    add("langevin_step", "batch-overflow", lambda a: a.update(x=big(2**32, 1), score=big(2**32, 1),
                                                              alpha=torch.full((1,), 0.1),
                                                              noise_scale=torch.full((1,), 0.3)), "batch")
    add("langevin_step", "features-overflow", lambda a: a.update(x=big(1, 2**34), score=big(1, 2**34),
                                                                 alpha=torch.full((1,), 0.1),
                                                                 noise_scale=torch.full((1,), 0.3)), _named("x"))

    # the in-place step: x written while score, alpha or seed are read from the same memory
    def overlap(a, what):
        buf = torch.randn(B, 2 * D, dtype=torch.float64)
        a["x"], a["score"], a["alpha"] = buf[:, :D], torch.randn(B, D, dtype=torch.float64), a["alpha"].double()
        if what == "score-same":
            a["score"] = a["x"]
        elif what == "score-partial":
            a["score"] = buf[:, 2:D + 2]
        elif what == "score-interleaved":
            a["x"], a["score"] = buf[:, ::2], buf[:, 1::2]
        elif what == "alpha":
            a["alpha"] = buf[:, 0]
        elif what == "noise_scale":
            a["noise_scale"] = buf[:, 1]
        elif what == "seed":
            a["seed"] = buf.view(torch.int64)[0, :2]
        elif what == "x-expanded":
            a["x"] = torch.zeros(1, D, dtype=torch.float64).expand(B, D)

    for what in ("score-same", "score-partial", "score-interleaved", "alpha", "noise_scale", "seed", "x-expanded"):
        add("langevin_step_", f"overlap-{what}", lambda a, w=what: overlap(a, w), _named(what.split("-")[0]))
    return cases


CASES = _cases()


def _namespaces():
    yield pytest.param(ops._ops, id="cpp")
    try:
        from fdsm_ext.triton import ops as triton_ops, unavailable_reason
    except ImportError as exc:
        yield pytest.param(None, id="triton", marks=pytest.mark.skip(reason=f"triton: {exc}"))
        return
    reason = unavailable_reason("cpu")
    yield pytest.param(triton_ops, id="triton", marks=[pytest.mark.skip(reason=reason)] if reason else [])


def test_the_suite_is_large_and_covers_every_op():
    assert len(CASES) >= 400
    assert {name for _, name, _, _ in CASES} == set(ops.OPS)


def test_the_good_calls_succeed():
    # so that each bad call below fails for its one bad argument
    for name, args in _good().items():
        getattr(ops._ops, name)(*args.values())


@pytest.mark.parametrize("ns", list(_namespaces()))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_call_raises_naming_the_argument(ns, case):
    _, name, build, match = case
    with pytest.raises(Exception, match=match):
        getattr(ns, name)(*build())

"""fdsm_ext.selfcheck: every op of every backend that runs here, against the reference; a broken op is named."""

import importlib

import pytest
import torch

import fdsm_ext

sc = importlib.import_module("fdsm_ext.selfcheck")  # the module (fdsm_ext.selfcheck is the function)


@pytest.fixture(autouse=True)
def _fresh_failures(monkeypatch):
    monkeypatch.setattr(fdsm_ext._checks, "FAILED_BACKENDS", {})


def _forward_ops() -> set[str]:
    """The fdsm_ext ops with a CPU kernel, less the backward ops that the forward checks' backward covers."""
    names = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    return {n.split("::")[1] for n in names if n.startswith("fdsm_ext::") and not n.endswith("_backward")}


class _Broken:
    """An op namespace whose op ``name`` is wrong by ``how`` (a function of the real op's result)."""

    def __init__(self, ns, name, how):
        self._ns, self._name, self._how = ns, name, how

    def __getattr__(self, attr):
        op = getattr(self._ns, attr)
        return (lambda *a: self._how(op, *a)) if attr == self._name else op


def test_selfcheck_on_cpu_covers_every_op_of_every_runnable_backend(monkeypatch):
    # Without Triton's interpreter (as a user's CPU runs): cpp and torch, triton skipped with the reason.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = fdsm_ext.selfcheck("cpu")
    assert report.ok and report.device == "cpu"
    assert set(report.skipped) == {"triton"} and "TRITON_INTERPRET" in report.skipped["triton"]
    checked = {(r.backend, r.op.split("/")[0], r.part) for r in report.rows}
    assert {b for b, _, _ in checked} == {"cpp", "torch"}
    for backend in ("cpp", "torch"):
        for op in _forward_ops():
            assert (backend, op, "forward") in checked, (backend, op)
        for op in fdsm_ext.ops.FUSED_OPS:  # the differentiable ones
            assert (backend, op, "backward") in checked, (backend, op)
    text = str(report)
    assert "fd_ssm_vr" in text and "passed" in text and "triton   skipped" in text
    assert sc.failed_backends("cpu") == frozenset()


@pytest.mark.parametrize("op", ["fd_ssm_vr", "perturb", "langevin_step_", "stencil_combine"])
def test_a_wrong_op_is_reported_by_name_and_auto_passes_over_its_backend(monkeypatch, op):
    real = sc._namespace

    def wrong(real_op, *args):
        out = real_op(*args)
        if op == "langevin_step_":  # an in-place step that forgets to write x
            args[0].add_(0.25)
            return out
        return out * 1.01

    monkeypatch.setattr(sc, "_namespace", lambda b: _Broken(real(b), op, wrong) if b == "cpp" else real(b))
    with pytest.raises(sc.SelfCheckError) as info:
        fdsm_ext.selfcheck("cpu", backends=["cpp", "torch"])
    message = str(info.value).splitlines()[0]
    assert f"backend 'cpp' op {op}" in message, message
    assert "'torch'" not in message
    assert {r.backend for r in info.value.report.failures} == {"cpp"}
    assert sc.failed_backends("cpu") == {"cpp"}
    # backend="auto" passes over it, with a warning; a requested cpp still runs.
    with pytest.warns(RuntimeWarning, match="backend='auto' passes over cpp on cpu"):
        assert fdsm_ext._checks.resolve_backend_for("auto", "cpu") == "torch"
    assert fdsm_ext._checks.resolve_backend_for("cpp", "cpu") == "cpp"
    # A later pass clears it.
    monkeypatch.setattr(sc, "_namespace", real)
    fdsm_ext.selfcheck("cpu", backends=["cpp"])
    assert sc.failed_backends("cpu") == frozenset()


def test_an_op_that_raises_is_a_failed_check_not_a_crash(monkeypatch):
    real = sc._namespace

    def boom(real_op, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sc, "_namespace", lambda b: _Broken(real(b), "fd_dsm_quotient", boom))
    report = fdsm_ext.selfcheck("cpu", backends=["cpp"], raise_on_failure=False)
    # one failed forward per direction kind, and no backward tried after it
    assert [(r.backend, r.op, r.part) for r in report.failures] == [
        ("cpp", f"fd_dsm_quotient/{kind}", "forward") for kind in fdsm_ext.ops.DIRECTION_KINDS]
    row = report.failures[0]
    assert "illegal memory access" in row.detail and "illegal memory access" in str(report)
    assert sc.failed_backends("cpu") == {"cpp"}


def test_a_wrong_backward_is_reported_as_the_backward(monkeypatch):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    real = sc._namespace
    monkeypatch.setattr(sc, "_namespace", lambda b: _Broken(real(b), "stencil_combine",
                                                            lambda op, f, *a: op(WrongGrad.apply(f), *a)))
    report = fdsm_ext.selfcheck("cpu", backends=["cpp"], raise_on_failure=False)
    assert [(r.op, r.part) for r in report.failures] == [("stencil_combine", "backward")]


@pytest.mark.slow
def test_triton_is_checked_when_its_interpreter_is_active(monkeypatch):
    reason = sc._why_not("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    # One check under the interpreter (every check takes ~30 s there; the kernels have their own tests).
    every = sc._checks
    monkeypatch.setattr(sc, "_checks", lambda: [c for c in every() if c.op == "fd_ssm_vr/gaussian"])
    report = fdsm_ext.selfcheck("cpu", backends=["triton"])
    assert [(r.backend, r.op, r.part) for r in report.rows] == [("triton", "fd_ssm_vr/gaussian", "forward"),
                                                                 ("triton", "fd_ssm_vr/gaussian", "backward")]


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="`backends`"):
        fdsm_ext.selfcheck("cpu", backends=["cuda"])
    with pytest.raises(ValueError, match="`device` must be a CPU or CUDA device, got meta"):
        fdsm_ext.selfcheck("meta", backends=["cpp"])
    with pytest.raises(TypeError, match="`backends` must be a sequence"):
        fdsm_ext.selfcheck("cpu", backends="cpp")

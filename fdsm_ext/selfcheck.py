"""A self-check at first contact: every op of every available backend on one device, against the reference.

Until a device has run the test suite, a user's device is the first one. :func:`selfcheck` runs each
forward op of :data:`fdsm_ext.ops.OPS` (and its backward where it is differentiable; in every direction
kind for an op that takes one) of each backend that can run on the device, on the op's example inputs,
and compares it with :mod:`fdsm_ext.reference` evaluated in float64 on the CPU given the same directions
(regenerated from the same Philox seed by the pure-PyTorch stream). It returns a
:class:`SelfCheckReport` (a table) and raises :class:`SelfCheckError` naming every op and backend that
disagree. A backend that failed is remembered for the process: :func:`failed_backends` tells the
backend resolution (``backend="auto"``) to pass it over.

Backends: ``"cpp"`` (the compiled kernels, ``torch.ops.fdsm_ext``: CPU, and CUDA when built),
``"triton"`` (``fdsm_ext.triton.ops``: CUDA, or CPU only when Triton's interpreter is already active,
since starting it costs seconds) and ``"torch"`` (the pure-PyTorch composite, i.e. the reference
formulas run on the device in float32). On the CPU it takes well under a second.

    python -c "import fdsm_ext; print(fdsm_ext.selfcheck('cuda'))"
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops as fd_ops
from . import reference
from . import _checks as api_checks  # (this module's _checks() lists its checks)
from ._checks import check_bool
from ._ext import has_cuda_kernels

__all__ = ["SelfCheckError", "SelfCheckReport", "SelfCheckRow", "failed_backends", "selfcheck"]

BACKENDS = ("cpp", "triton", "torch")

#: Largest error allowed, relative to the largest magnitude of the reference tensor. The inputs are
#: float32 of order one and eps = 0.5, so the FD quotients amplify float32 rounding (2^-24) by at most
#: ~d/eps^2 = 20 and the kernels' polynomial transcendentals differ from the exact ones by a few ulps:
#: the honest error is ~1e-5 of the scale; a wrong kernel is off by far more than 1e-3.
RTOL = 1e-3

_B, _D, _EPS = 3, 5, 0.5  # d = 5: a row that is not a whole number of Philox blocks
_KINDS = fd_ops.DIRECTION_KINDS
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


def failed_backends(device_type: str) -> frozenset[str]:
    """Backends that failed :func:`selfcheck` on ``device_type`` (``"cpu"``, ``"cuda"``) in this process
    and have not passed one since; ``backend="auto"`` passes them over, with a warning."""
    return frozenset(api_checks.FAILED_BACKENDS.get(device_type, ()))


@dataclass(frozen=True)
class SelfCheckRow:
    """One comparison: ``op`` (``part`` = ``"forward"`` or ``"backward"``) of ``backend`` against the reference."""

    backend: str
    op: str
    part: str
    ok: bool
    error: float  # max |backend - reference| / max |reference| over the op's outputs (nan if it raised)
    detail: str = ""  # the exception, when the op raised


@dataclass
class SelfCheckReport:
    """The table :func:`selfcheck` returns; ``str(report)`` prints it."""

    device: str
    rows: list[SelfCheckRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not run
    seconds: float = 0.0

    @property
    def failures(self) -> list[SelfCheckRow]:
        return [r for r in self.rows if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        w = max([18] + [len(r.op) for r in self.rows])
        lines = [f"fdsm_ext.selfcheck({self.device}): {len(self.rows) - len(self.failures)}/{len(self.rows)} "
                 f"checks passed in {self.seconds:.2f} s (tolerance {RTOL:g} of the reference's scale)",
                 f"{'backend':<8} {'op':<{w}} {'part':<9} {'rel. error':>10}  result"]
        for r in sorted(self.rows, key=lambda r: BACKENDS.index(r.backend)):  # stable: ops keep their order
            result = "ok" if r.ok else ("FAILED: " + r.detail if r.detail else "FAILED")
            lines.append(f"{r.backend:<8} {r.op:<{w}} {r.part:<9} {r.error:>10.2e}  {result}")
        lines += [f"{name:<8} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class SelfCheckError(RuntimeError):
    """An op of a backend disagrees with the reference on this device; ``.report`` has the whole table."""

    def __init__(self, message: str, report: SelfCheckReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- the backends' ops


def _namespace(backend: str):
    """The op namespace of a fused backend: ``torch.ops.fdsm_ext`` or the Triton ops."""
    if backend == "cpp":
        return torch.ops.fdsm_ext
    from .triton import ops as triton_ops

    return triton_ops


def _why_not(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` here, else why not (without starting an interpreter)."""
    if backend == "cpp":
        if device.type == "cpu" or (device.type == "cuda" and has_cuda_kernels()):
            return None
        return f"this build has no compiled kernels for {device.type}"
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1), not active"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got {device.type}"
        try:
            from .triton import unavailable_reason
        except ImportError as exc:
            return f"fdsm_ext.triton cannot be imported ({exc})"
        return unavailable_reason(device.type)
    return None  # the composite runs wherever torch does


# --------------------------------------------------------------------------- the checks
# One check per forward op of fdsm_ext.ops.OPS (per direction kind, for an op that takes one), from the
# op's example call (ops.example: float32 inputs on the CPU, eps = _EPS). The backends' op is called
# through their namespace; the reference (ops._reference) runs on the device for the "torch" backend and,
# in float64 on the CPU, is the oracle, both given the pure-PyTorch Philox stream (_PyTorchStream).
# Differentiable ops are also checked backward, w.r.t. the inputs they differentiate.


class _PyTorchStream:
    """Stands in for an op namespace in ops._reference, which takes an op's directions (and the
    Langevin noise) from its namespace: here the pure-PyTorch Philox stream of fdsm_ext.reference, so
    that the oracle and the "torch" backend run no kernel."""

    class perturb:  # noqa: N801 - the op's name
        @staticmethod
        def default(zeros: Tensor, seed: Tensor, eps: float, n: int, kind: int, include_center: bool) -> Tensor:
            (B, d), name = zeros.shape, _KIND_NAMES[kind]
            return reference.philox_directions(seed, n * B, d, name, eps, zeros.dtype).to(zeros.device)

    class langevin_step:  # noqa: N801
        @staticmethod
        def default(zeros: Tensor, *args) -> tuple[Tensor, None]:
            return reference.langevin_noise(args[2], zeros).to(zeros.device), None


@dataclass(frozen=True)
class _Check:
    op: str  # the op's name, and "/<kind>" for an op that takes a direction kind
    name: str
    overrides: dict = field(default_factory=dict)  # for ops.example

    @property
    def grads(self) -> tuple[str, ...]:
        """The inputs the backward differentiates (empty: forward only)."""
        names = fd_ops.arg_names(self.name)
        return tuple(names[i] for i in fd_ops.FORWARD_DIFFERENTIABLE.get(self.name, ()))

    def inputs(self, g: torch.Generator) -> dict:
        return fd_ops.example(self.name, _B, _D, generator=g, **self.overrides)

    def fused(self, ns, args: dict) -> tuple[Tensor, ...]:
        """The backend's op: the arguments it writes (it writes copies), then what it returns."""
        written = _written(self.name)
        args = {k: v.clone() if k in written else v for k, v in args.items()}
        out = getattr(ns, self.name)(*args.values())
        return tuple(args[w] for w in written) + (out if isinstance(out, tuple) else (out,))

    def composite(self, args: dict) -> tuple[Tensor, ...]:
        out = fd_ops._reference(_PyTorchStream, self.name, list(args.values()))
        return out if isinstance(out, tuple) else (out,)


def _written(name: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.fdsm_ext, name).default._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


def _checks() -> list[_Check]:
    checks = []
    for name in fd_ops.forward_ops():
        args = fd_ops.arg_names(name)
        eps = {"eps": _EPS} if "eps" in args else {}
        for kind in (_KINDS if "kind" in args else [None]):
            if kind is None:
                checks.append(_Check(name, name, eps))
            else:
                checks.append(_Check(f"{name}/{kind}", name, {**eps, "kind": _KINDS[kind]}))
    return checks


def _floating(args: dict, fn: Callable[[Tensor], Tensor]) -> dict:
    """``args`` with ``fn`` applied to its floating tensors (the seed and the scalars as they are)."""
    return {k: fn(v) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in args.items()}


def _run(fn: Callable[[dict], tuple[Tensor, ...]], inputs: dict, grads: Sequence[str]):
    """Forward outputs, and the gradients of a fixed weighted sum of them w.r.t. ``grads`` (if any)."""
    inputs = _floating(inputs, lambda t: t.detach())
    inputs = {k: v.requires_grad_() if k in grads else v for k, v in inputs.items()}
    outs = fn(inputs)
    if not grads:
        return tuple(o.detach() for o in outs), ()
    # Weights that are not all equal, so that a backward that mixes up its entries shows.
    total = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).reshape(o.shape)).sum()
                for o in outs)
    g = torch.autograd.grad(total, [inputs[k] for k in grads])
    return tuple(o.detach() for o in outs), tuple(g)


def _error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return math.inf
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        worst = max(worst, diff / scale if diff == diff else math.inf)
    return worst


def selfcheck(device: str | torch.device = "cpu", *, backends: Sequence[str] | None = None,
              raise_on_failure: bool = True) -> SelfCheckReport:
    """Run every op of every available backend on ``device`` against :mod:`fdsm_ext.reference`.

    Each op of each backend runs on small float32 inputs (3 samples of 5 features, 2 slices, eps 0.5)
    on ``device``, forward and (for differentiable ops) backward, and is compared with the reference
    formula in float64 on the CPU given the same directions; it passes when its largest error is at
    most :data:`RTOL` of the reference's largest magnitude. ``backends`` defaults to every backend that
    can run on ``device`` (see the module docstring); a named backend that cannot run is an error.

    Returns the :class:`SelfCheckReport`. Raises :class:`SelfCheckError` naming each op and backend
    that disagree (unless ``raise_on_failure=False``); either way a failing backend is recorded for
    :func:`failed_backends` and a passing one is cleared.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`device` must be a torch.device or a device string such as 'cpu' or 'cuda:0', got "
                         f"{device!r} ({str(exc).splitlines()[0]})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be a CPU or CUDA device, got {device}")
    if isinstance(backends, str) or not (backends is None or isinstance(backends, Sequence)):
        raise TypeError(f"`backends` must be a sequence of backend names such as ('cpp',), got {backends!r}")
    check_bool(raise_on_failure, "raise_on_failure")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    report = SelfCheckReport(str(device))
    start = time.perf_counter()
    names = BACKENDS if backends is None else tuple(backends)
    for name in names:
        if not isinstance(name, str) or name not in BACKENDS:
            raise ValueError(f"`backends` must name some of {BACKENDS}, got {name!r}")
    runnable = []
    for name in names:
        why = _why_not(name, device)
        if why is None:
            runnable.append(name)
        elif backends is not None:
            raise RuntimeError(f"selfcheck: backend {name!r} cannot run on {device}: {why}")
        else:
            report.skipped[name] = why

    g = torch.Generator().manual_seed(20200601)
    for check in _checks():
        inputs = check.inputs(g)
        want = _run(check.composite, _floating(inputs, lambda t: t.double()), check.grads)
        on_device = _floating(inputs, lambda t: t.to(device))
        for name in runnable:
            for part, index in (("forward", 0), ("backward", 1)):
                if part == "backward" and not check.grads:
                    continue
                try:
                    if name == "torch":
                        got = _run(check.composite, on_device, check.grads)
                    else:
                        ns = _namespace(name)
                        got = _run(lambda i: check.fused(ns, i), on_device, check.grads)
                    err = _error(got[index], want[index])
                    row = SelfCheckRow(name, check.op, part, err <= RTOL, err)
                except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed check, reported by name
                    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    row = SelfCheckRow(name, check.op, part, False, math.nan, detail)
                    report.rows.append(row)
                    break  # the backward of an op whose forward raised would raise again
                report.rows.append(row)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start

    failed = {r.backend for r in report.failures}
    recorded = api_checks.FAILED_BACKENDS.setdefault(device.type, set())
    recorded.difference_update(set(runnable) - failed)
    recorded.update(failed)
    if failed and raise_on_failure:
        parts = [f"backend {r.backend!r} op {r.op} ({r.part}: "
                 + (r.detail if r.detail else f"error {r.error:.2e} > {RTOL:g}") + ")" for r in report.failures]
        raise SelfCheckError(
            f"fdsm_ext.selfcheck({device}): {'; '.join(parts)} disagree with fdsm_ext.reference; backend='auto' "
            f"passes over {sorted(failed)} in this process. Table:\n{report}", report)
    return report


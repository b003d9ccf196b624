"""Micro-benchmarks: every fused op of fdsm_ext.ops against its eager composite and torch.compile of it.

For each op and size (the element count of the op's main tensor; feature dimension ``preset.micro_dim``)
and for the forward alone and forward + backward, the variants are

- ``fused``: the op of :mod:`fdsm_ext.ops` (directions drawn in-kernel from a Philox seed);
- ``eager``: the :mod:`fdsm_ext.reference` function, fed pre-drawn directions ``v`` (the same
  distribution; at the first size the fused output is checked against the reference fed exactly the
  kernel's directions);
- ``eager+draw``: the eager composite drawing ``v`` with torch's RNG each call, as ``backend="torch"``
  does (ops that use random directions only);
- ``compile``: ``torch.compile(eager, dynamic=True)`` (one compilation per op and mode, all sizes);
- ``copy``: ``dst.copy_(src)`` moving the same number of bytes, the bandwidth the op can hope for.

Bytes moved are the op's compulsory traffic, every input read once and every output written once
(forward + backward: plus the incoming gradient, the tensors the backward reads, the gradients it
writes); the same count divides every variant's time, so GB/s compares like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench_common import Preset, Timing, compare, fmt_time, paired_ratio
from fdsm_ext import ops, reference

EPS = 0.1
ORDER = 4  # stencil order of the stencil_* ops (the order-scaling goal's T)
SPHERE = ops.DIRECTION_KINDS["sphere"]
F32 = 4  # bytes per float32 element


@dataclass
class Case:
    """One op at one size. Every variant takes ``args`` (differentiable tensors first, ``n_grad`` of
    them); ``eager`` also takes ``v`` when the op draws random directions."""

    elements: int  # of the op's main tensor (the size the tables show)
    args: tuple
    n_grad: int
    fused: object
    eager: object
    v: torch.Tensor | None
    eager_draw: object | None
    fwd_bytes: int
    bwd_bytes: int
    exact_v: torch.Tensor | None = None  # the kernel's own directions, for the check


def _seed():
    return torch.tensor([20240601, 0], dtype=torch.int64)


def _draw(B, d, device):
    return reference.sample_directions(1, B, d, "sphere", device=device) * (EPS / math.sqrt(d))


def _kernel_v(seed, B, d, device):
    return reference.philox_directions(seed, B, d, "sphere", EPS, torch.float32).reshape(1, B, d).to(device)


def case_perturb(n, d, dev, check):
    B = max(1, n // d)
    e, seed = B * d, _seed()
    x = torch.randn(B, d, device=dev)
    return Case(
        e, (x,), 1,
        fused=lambda x: ops.perturb(x, seed, EPS, 1, SPHERE, True),
        eager=lambda x, v: reference.perturb(x, v, True),
        v=_draw(B, d, dev),
        eager_draw=lambda x: reference.perturb(x, _draw(B, d, dev), True),
        fwd_bytes=F32 * (e + 3 * e), bwd_bytes=F32 * (3 * e + e),
        exact_v=_kernel_v(seed, B, d, dev) if check else None,
    )


def case_fd_ssm_quotient(n, d, dev, check):
    B = n
    f0, fp, fm = torch.randn(B, device=dev), torch.randn(1, B, device=dev), torch.randn(1, B, device=dev)
    return Case(
        B, (f0, fp, fm), 3,
        fused=lambda f0, fp, fm: ops.fd_ssm_quotient(f0, fp, fm, EPS, float(d)),
        eager=lambda f0, fp, fm: reference.fd_ssm_quotient(f0, fp, fm, EPS, float(d)),
        v=None, eager_draw=None,
        fwd_bytes=F32 * (3 * B + B), bwd_bytes=F32 * (B + 3 * B + 3 * B),
    )


def case_fd_ssm_vr(n, d, dev, check):
    B = max(1, n // d)
    e, seed = B * d, _seed()
    sp, sm = torch.randn(1, B, d, device=dev), torch.randn(1, B, d, device=dev)
    return Case(
        e, (sp, sm), 2,
        fused=lambda sp, sm: ops.fd_ssm_vr(sp, sm, seed, EPS, SPHERE, float(d)),
        eager=lambda sp, sm, v: reference.fd_ssm_vr(sp, sm, v, EPS, float(d)),
        v=_draw(B, d, dev),
        eager_draw=lambda sp, sm: reference.fd_ssm_vr(sp, sm, _draw(B, d, dev), EPS, float(d)),
        fwd_bytes=F32 * (2 * e + B), bwd_bytes=F32 * (B + 2 * e + 2 * e),
        exact_v=_kernel_v(seed, B, d, dev) if check else None,
    )


def case_fd_dsm_quotient(n, d, dev, check):
    B = max(1, n // d)
    e, seed = B * d, _seed()
    fp, fm = torch.randn(1, B, device=dev), torch.randn(1, B, device=dev)
    noise, sigma = 0.1 * torch.randn(B, d, device=dev), torch.full((B,), 0.1, device=dev)
    return Case(
        e, (fp, fm, noise, sigma), 2,
        fused=lambda fp, fm, noise, sigma: ops.fd_dsm_quotient(fp, fm, noise, sigma, seed, EPS, SPHERE, float(d)),
        eager=lambda fp, fm, noise, sigma, v: reference.fd_dsm_quotient(fp, fm, noise, sigma, v, EPS, float(d)),
        v=_draw(B, d, dev),
        eager_draw=lambda fp, fm, noise, sigma: reference.fd_dsm_quotient(fp, fm, noise, sigma, _draw(B, d, dev),
                                                                          EPS, float(d)),
        fwd_bytes=F32 * (2 * B + e + B + B), bwd_bytes=F32 * (B + 2 * B + e + B + 2 * B),
        exact_v=_kernel_v(seed, B, d, dev) if check else None,
    )


def case_dsm_perturb(n, d, dev, check):
    # timed on the stacked output (what the model reads); eager takes pre-drawn (noise, directions), and
    # eager+draw draws both with torch.randn as backend="torch" does
    B = max(1, n // d)
    e, seed = B * d, _seed()
    x, sigma = torch.randn(B, d, device=dev), torch.full((B,), 0.1, device=dev)
    exact = None
    if check:
        z = reference.philox_raw_directions(seed, 2 * B, d, "gaussian")[B:].float().to(dev)
        exact = (z, _kernel_v(seed, B, d, dev))
    # (sigma an argument, not a closure: one torch.compile of eager serves every size)
    return Case(
        e, (x, sigma), 1,
        fused=lambda x, sigma: ops.dsm_perturb(x, sigma, seed, EPS, 1, SPHERE)[0],
        eager=lambda x, sigma, zv: reference.dsm_perturb(x, sigma, *zv)[0],
        v=(torch.randn(B, d, device=dev), _draw(B, d, dev)),
        eager_draw=lambda x, sigma: reference.dsm_perturb(x, sigma, torch.randn(B, d, device=dev),
                                                          _draw(B, d, dev))[0],
        fwd_bytes=F32 * (e + B + 2 * e + B), bwd_bytes=F32 * (2 * e + e),
        exact_v=exact,
    )


def case_stencil_perturb(n, d, dev, check):
    B = max(1, n // d)
    e = B * d
    x, v = torch.randn(B, d, device=dev), torch.randn(B, d, device=dev)
    return Case(
        e, (x, v), 2,
        fused=lambda x, v: ops.stencil_perturb(x, v, EPS, ORDER),
        eager=lambda x, v: reference.stencil_perturb(x, v, EPS, ORDER),
        v=None, eager_draw=None,
        fwd_bytes=F32 * (2 * e + (ORDER + 1) * e), bwd_bytes=F32 * ((ORDER + 1) * e + 2 * e),
    )


def case_stencil_combine(n, d, dev, check):
    B = n
    f = torch.randn(ORDER + 1, B, device=dev)
    return Case(
        B, (f,), 1,
        fused=lambda f: ops.stencil_combine(f, EPS, ORDER),
        eager=lambda f: reference.stencil_combine(f, EPS, ORDER),
        v=None, eager_draw=None,
        fwd_bytes=F32 * ((ORDER + 1) * B + B), bwd_bytes=F32 * (B + (ORDER + 1) * B),
    )


def case_fd_divergence(n, d, dev, check):
    B = max(1, n // d)
    e, seed = B * d, _seed()
    sp, sm = torch.randn(1, B, d, device=dev), torch.randn(1, B, d, device=dev)
    return Case(
        e, (sp, sm), 2,
        fused=lambda sp, sm: ops.fd_divergence(sp, sm, seed, EPS, SPHERE),
        eager=lambda sp, sm, v: reference.fd_divergence(sp, sm, v, EPS),
        v=_draw(B, d, dev),
        eager_draw=lambda sp, sm: reference.fd_divergence(sp, sm, _draw(B, d, dev), EPS),
        fwd_bytes=F32 * (2 * e + B), bwd_bytes=F32 * (B + 2 * e),
        exact_v=_kernel_v(seed, B, d, dev) if check else None,
    )


def case_from_example(op):
    """The case builder of an op without a hand-written one: its example (fdsm_ext.ops.example) at ``B = n // d``
    samples of ``d`` features (one slice, sphere directions, eps EPS, order ORDER where it takes them);
    ``eager`` is its reference (ops._reference, which regenerates the kernels' directions each call: a
    slower eager than the hand-written cases' pre-drawn ``v``). Bytes: every floating input and output
    once; the backward adds the incoming gradient, the inputs it saves and the gradients it writes."""
    names = ops.arg_names(op)
    grads = [names[i] for i in ops.FORWARD_DIFFERENTIABLE.get(op, ())]
    # what the backward reads besides the incoming gradient: its backward op's other arguments (whether
    # the autograd formula is in C++ or in ops.OPS)
    backward = next((b for b, d in ops.OPS.items() if d.of is not None and d.of[0] == op), None)
    saved = [a for a in ops.arg_names(backward) if a != "grad" and a in names] if backward else []
    kw = {k: v for k, v in dict(eps=EPS, kind=SPHERE, n=1, n_slices=1, order=ORDER).items() if k in names or k == "n"}

    def build(n, d, dev, check):
        B = max(1, n // d)
        try:
            args = ops.example(op, B, d, device=dev, **kw)
        except TypeError:  # an example without an `n` (slices) keyword
            args = ops.example(op, B, d, device=dev, **{k: v for k, v in kw.items() if k != "n"})
        order = grads + [k for k in args if k not in grads]  # differentiable tensors first, as Case wants
        in_schema_order = lambda a: [dict(zip(order, a))[k] for k in args]  # noqa: E731
        # an op of several outputs is timed on its first, the one its gradient flows through
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        call = lambda *a: first(getattr(ops._ops, op)(*in_schema_order(a)))  # noqa: E731
        eager = lambda *a: first(ops._reference(ops._ops, op, in_schema_order(a)))  # noqa: E731
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts  # noqa: E731
                                if isinstance(t, torch.Tensor) and t.is_floating_point())
        out = ops.OPS[op].fake(*args.values())
        outs = out if isinstance(out, tuple) else (out,)
        fwd = nbytes(args.values()) + nbytes(outs)
        bwd = nbytes(outs[:1]) + nbytes(args[k] for k in saved) + nbytes(args[k] for k in grads)
        return Case(args[names[0]].numel(), tuple(args[k] for k in order), len(grads), fused=call, eager=eager,
                    v=None, eager_draw=None, fwd_bytes=fwd, bwd_bytes=bwd)

    return build


# op name -> (case builder, what the size counts): hand-written cases (their eager variants take pre-drawn
# directions); a fused op without one is benchmarked from its example (case_from_example).
OPS = {
    "perturb": (case_perturb, "x (B, d)"),
    "fd_ssm_quotient": (case_fd_ssm_quotient, "f0 (B,)"),
    "fd_ssm_vr": (case_fd_ssm_vr, "s+ (1, B, d)"),
    "fd_dsm_quotient": (case_fd_dsm_quotient, "noise (B, d)"),
    "dsm_perturb": (case_dsm_perturb, "x (B, d)"),
    "stencil_perturb": (case_stencil_perturb, f"x (B, d), T={ORDER}"),
    "stencil_combine": (case_stencil_combine, f"f (T+1, B), T={ORDER}"),
    "fd_divergence": (case_fd_divergence, "s+ (1, B, d)"),
}
assert set(OPS) <= set(ops.FUSED_OPS), "micro-benchmark cases name fused ops (fdsm_ext.ops.FUSED_OPS)"
OPS.update({op: (case_from_example(op), f"{ops.arg_names(op)[0]}, from its example")
            for op in ops.FUSED_OPS if op not in OPS})
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("fused", "eager", "eager+draw", "compile", "copy")


def _check(case: Case) -> float:
    """Relative max difference between the fused op and the reference fed the kernel's directions."""
    extra = () if case.v is None else (case.exact_v,)
    got, want = case.fused(*case.args), case.eager(*case.args, *extra)
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0))
    if not err < 1e-3:
        raise AssertionError(f"fused op disagrees with its reference: relative error {err:.3g}")
    return err


def _runner(fn, case: Case, mode: str, with_v: bool):
    """A no-argument callable running ``fn`` on the case's inputs (and its backward for fwd+bwd)."""
    args = case.args + ((case.v,) if with_v else ())
    if mode == "fwd":
        return lambda: fn(*args)
    leaves = tuple(a.detach().requires_grad_(True) for a in case.args[:case.n_grad])
    args = leaves + args[case.n_grad:]
    grad_out = torch.randn_like(fn(*args).detach())

    def fwd_bwd():
        torch.autograd.grad(fn(*args), leaves, grad_out)

    return fwd_bwd


def _copy_runner(nbytes: int, device):
    src = torch.empty(max(1, nbytes // 2 // F32), device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def variants(case: Case, mode: str, nbytes: int, compiled: dict, device) -> dict:
    """name -> no-argument callable of every variant of one case (``compile`` only where it compiled)."""
    fns = {}
    for variant in VARIANTS:
        if variant == "eager+draw" and case.eager_draw is None:
            continue
        if variant == "compile" and mode not in compiled:
            continue
        if variant == "copy":
            fns[variant] = _copy_runner(nbytes, device)
            continue
        impl = {"fused": case.fused, "eager": case.eager, "eager+draw": case.eager_draw,
                "compile": compiled.get(mode)}[variant]
        fns[variant] = _runner(impl, case, mode, variant in ("eager", "compile") and case.v is not None)
    return fns


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    for op, (build, size_of) in OPS.items():
        compiled = {}
        if p.compile:
            for mode in p.compile_modes:
                compiled[mode] = torch.compile(build(p.micro_sizes[0], p.micro_dim, device, False).eager,
                                               dynamic=True)
        else:
            skipped.append(f"micro {op}: torch.compile column not measured in this preset")
        for i, n in enumerate(p.micro_sizes):
            case = build(n, p.micro_dim, device, i == 0)
            check = _check(case) if i == 0 else None
            for mode in MODES:
                nbytes = case.fwd_bytes + (case.bwd_bytes if mode == "fwd+bwd" else 0)
                row = {"op": op, "size": case.elements, "size_of": size_of, "dim": p.micro_dim, "mode": mode,
                       "bytes": nbytes, "check_rel_err": check}
                fns = variants(case, mode, nbytes, compiled, device)
                if "compile" in fns:
                    try:  # a compile failure must not sink the whole run
                        fns["compile"]()
                    except Exception as exc:
                        skipped.append(f"micro {op} {mode} compile: {type(exc).__name__}: {exc}".splitlines()[0])
                        compiled.pop(mode, None)
                        del fns["compile"]
                timings = compare(fns, device, p)
                for variant, t in timings.items():
                    # ratio: this variant's time over the fused op's, per round (above 1: fused is faster)
                    records.append({**row, "variant": variant, **_timing(t, nbytes),
                                    **paired_ratio(t, timings["fused"])})
                log(f"micro {op:16s} n={case.elements:>10,d} {mode:7s} "
                    + "  ".join(f"{v}={fmt_time(t.median_s)}" for v, t in timings.items()))
            del case
    return {"records": records, "skipped": skipped}


def _timing(t: Timing, nbytes: int) -> dict:
    return {**t.as_dict(), "gbps": nbytes / t.median_s / 1e9}

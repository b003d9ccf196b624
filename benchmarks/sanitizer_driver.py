"""A compact driver for compute-sanitizer: every fdsm_ext op, forward and backward, on odd shapes and dtypes.

    python benchmarks/sanitizer_driver.py [--device cuda] [--only perturb,fd_ssm_vr] [--dtypes float32]

Run under ``compute-sanitizer --tool memcheck|racecheck|synccheck`` by benchmarks/gpu_check.sh. Each
forward op of the ``fdsm_ext::`` namespace is called on shapes that hit the kernels' edges: one row,
one element, tails (sizes not a multiple of any vector width or block), long rows (one row of 70,001
elements), many short rows (d <= 4), zero rows, and strided inputs (a transposed view, every other
column); in float16, bfloat16, float32 and float64; then its backward through autograd with a random
incoming gradient. Every result on ``--device`` is compared with the CPU kernels on the same inputs
and seed (the Philox streams are the same on every device), so a kernel that reads or writes the wrong
element fails here even where the sanitizer sees nothing. The set of ops is derived from the
registered ``fdsm_ext::`` operators: an op this driver does not cover fails the run, naming it.

Exit status: 0 when every case ran and agreed, 1 otherwise (each failure printed on one line).
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from fdsm_ext import ops

# float32 first: a run cut short by its time budget has still called every op once in the main dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# relative tolerance (to the largest magnitude of the CPU result, at least 1) per dtype: the device and CPU
# kernels share their formulas (fd_math.h) but not the order of their reductions
RTOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4, torch.float64: 1e-10}
EPS = 0.5  # large enough that the FD quotients' 1/eps^2 does not swamp the dtype's rounding
# (B, d): one row; one element; tails; a long row; many short rows (the 2-D toy); no rows
SHAPES = [(1, 1027), (1, 1), (3, 5), (7, 33), (1, 70_001), (257, 3), (64, 4), (0, 5)]
KINDS = ops.DIRECTION_KINDS
SEED = (20240601, 7)


def layouts(t: torch.Tensor):
    """``t`` contiguous, as a transposed view, and as every other column of a wider tensor."""
    yield "contiguous", t
    if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
        yield "transposed", t.t().contiguous().t()
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        yield "strided", wide[:, ::2]


def seed(device=None) -> torch.Tensor:
    return torch.tensor(SEED, dtype=torch.int64, device=device)


# op -> function(B, d, dtype) yielding (label, inputs, differentiable input count, call(*inputs, seed))
def cases_perturb(B, d, dtype):
    for kind_name, kind in KINDS.items():
        for n, center in ((1, True), (2, False)):
            for lay, x in layouts(torch.randn(B, d, dtype=torch.float64).to(dtype)):
                yield (f"{kind_name} n={n} center={center} {lay}", [x], 1,
                       lambda x, s, kind=kind, n=n, center=center: ops.perturb(x, s, EPS, n, kind, center))


def cases_fd_ssm_quotient(B, d, dtype):
    for n in (1, 3):
        f0, fp, fm = (torch.randn(*shape, dtype=torch.float64).to(dtype) for shape in ((B,), (n, B), (n, B)))
        yield f"n={n}", [f0, fp, fm], 3, lambda f0, fp, fm, s: ops.fd_ssm_quotient(f0, fp, fm, EPS, float(d))


def cases_fd_ssm_vr(B, d, dtype):
    for kind_name, kind in KINDS.items():
        sp, sm = (torch.randn(1, B, d, dtype=torch.float64).to(dtype) for _ in range(2))
        yield kind_name, [sp, sm], 2, lambda sp, sm, s, kind=kind: ops.fd_ssm_vr(sp, sm, s, EPS, kind, float(d))
        if d > 1 and B > 1:  # a strided (transposed inner dims) input
            yield (f"{kind_name} strided", [sp.transpose(1, 2).contiguous().transpose(1, 2), sm], 2,
                   lambda sp, sm, s, kind=kind: ops.fd_ssm_vr(sp, sm, s, EPS, kind, float(d)))


def cases_fd_divergence(B, d, dtype):
    for kind_name, kind in KINDS.items():
        for n in (1, 2):
            sp, sm = (torch.randn(n, B, d, dtype=torch.float64).to(dtype) for _ in range(2))
            yield (f"{kind_name} n={n}", [sp, sm], 2,
                   lambda sp, sm, s, kind=kind: ops.fd_divergence(sp, sm, s, EPS, kind))
            if d > 1 and B > 1:  # a strided (transposed inner dims) input
                yield (f"{kind_name} n={n} strided", [sp.transpose(1, 2).contiguous().transpose(1, 2), sm], 2,
                       lambda sp, sm, s, kind=kind: ops.fd_divergence(sp, sm, s, EPS, kind))


def cases_fd_dsm_quotient(B, d, dtype):
    for kind_name, kind in KINDS.items():
        for n in (1, 2):
            fp, fm = (torch.randn(n, B, dtype=torch.float64).to(dtype) for _ in range(2))
            for lay, noise in layouts((0.1 * torch.randn(B, d, dtype=torch.float64)).to(dtype)):
                sigma = torch.full((B,), 0.3, dtype=dtype)
                yield (f"{kind_name} n={n} {lay}", [fp, fm, noise, sigma], 3,
                       lambda fp, fm, noise, sigma, s, kind=kind: ops.fd_dsm_quotient(fp, fm, noise, sigma, s, EPS,
                                                                                    kind, float(d)))


def cases_stencil_perturb(B, d, dtype):
    for order in (1, 4):
        for lay, x in layouts(torch.randn(B, d, dtype=torch.float64).to(dtype)):
            v = torch.randn(B, d, dtype=torch.float64).to(dtype)
            yield f"T={order} {lay}", [x, v], 2, lambda x, v, s, order=order: ops.stencil_perturb(x, v, EPS, order)


def cases_stencil_combine(B, d, dtype):
    for order in (1, 2, 5):
        f = torch.randn(order + 1, B, dtype=torch.float64).to(dtype)
        yield f"T={order}", [f], 1, lambda f, s, order=order: ops.stencil_combine(f, EPS, order)
        if B > 1:
            yield (f"T={order} strided", [f.t().contiguous().t()], 1,
                   lambda f, s, order=order: ops.stencil_combine(f, EPS, order))


def cases_langevin_step(B, d, dtype):
    for clamp in ((None, None), (-1.0, 1.0)):
        for norms in (False, True):
            for lay, x in layouts(torch.rand(B, d, dtype=torch.float64).to(dtype)):
                sc = torch.randn(B, d, dtype=torch.float64).to(dtype)
                yield (f"clamp={clamp} norms={norms} {lay}", [x, sc], 0,
                       lambda x, sc, s, clamp=clamp, norms=norms: ops.langevin_step(x, sc, 1e-2, s, *clamp, norms))
                # with a per-sample noise scale b (x + a s + b z: the PC sampler's predictor)
                b = torch.rand(B, dtype=torch.float64) + 0.1
                yield (f"clamp={clamp} norms={norms} {lay} noise_scale", [x, sc, b], 0,
                       lambda x, sc, b, s, clamp=clamp, norms=norms: ops.langevin_step(x, sc, 1e-2, s, *clamp, norms,
                                                                                       b))


def cases_langevin_step_(B, d, dtype):
    for norms in (False, True):
        for lay, x in layouts(torch.rand(B, d, dtype=torch.float64).to(dtype)):
            sc = torch.randn(B, d, dtype=torch.float64).to(dtype)

            def step(x, sc, s, norms=norms):
                x = x.clone() if x.is_contiguous() else x.t().clone().t()  # in place on a copy, layout kept
                out = ops.langevin_step_(x, sc, 1e-2, s, -1.0, 1.0, norms)
                return x, out

            yield f"norms={norms} {lay}", [x, sc], 0, step

            def step_b(x, sc, b, s, norms=norms):  # with a per-sample noise scale
                x = x.clone() if x.is_contiguous() else x.t().clone().t()
                out = ops.langevin_step_(x, sc, 1e-2, s, -1.0, 1.0, norms, b)
                return x, out

            yield f"norms={norms} {lay} noise_scale", [x, sc, torch.rand(B, dtype=torch.float64) + 0.1], 0, step_b


CASES = {
    "perturb": cases_perturb,
    "fd_ssm_quotient": cases_fd_ssm_quotient,
    "fd_ssm_vr": cases_fd_ssm_vr,
    "fd_dsm_quotient": cases_fd_dsm_quotient,
    "stencil_perturb": cases_stencil_perturb,
    "stencil_combine": cases_stencil_combine,
    "fd_divergence": cases_fd_divergence,
    "langevin_step": cases_langevin_step,
    "langevin_step_": cases_langevin_step_,
}
# Registered operators the driver reaches through the ones above (autograd) or that are switches.
REACHED_INDIRECTLY = {"_set_poison_outputs", "_set_vector_stream"}


def registered_ops() -> set[str]:
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("fdsm_ext::")}
    # _check_<op>: each op's argument checks, exposed for the Triton ops; they launch nothing
    return {n for n in names
            if not n.endswith("_backward") and not n.startswith("_check_") and n not in REACHED_INDIRECTLY}


def _flat(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return None
    g, w = got.detach().double().cpu(), want.detach().double()
    if not torch.equal(torch.isfinite(g), torch.isfinite(w)):
        return "non-finite values differ"
    fin = torch.isfinite(w)
    err = float((g[fin] - w[fin]).abs().max()) if fin.any() else 0.0
    scale = max(1.0, float(w[fin].abs().max())) if fin.any() else 1.0
    return None if err <= RTOL[dtype] * scale else f"max abs diff {err:.3g} > {RTOL[dtype]:.0e} x {scale:.3g}"


def run_case(call, inputs, n_grad, device, dtype) -> list[str]:
    """Forward (and backward when ``n_grad``) on ``device`` and on the CPU; the mismatches found."""
    problems = []
    results = {}
    for dev in dict.fromkeys((device, torch.device("cpu"))):
        # move keeping strides: a transposed or sliced input stays so on the device
        args = [t if dev.type == "cpu" else torch.empty_strided(t.size(), t.stride(), dtype=t.dtype,
                                                                device=dev).copy_(t) for t in inputs]
        leaves = [a.detach().requires_grad_(True) for a in args[:n_grad]]
        args = leaves + args[n_grad:]
        outs = _flat(call(*args, seed()))
        grads = []
        if n_grad:
            torch.manual_seed(1)
            main = outs[0]
            g = torch.randn(main.shape, dtype=torch.float64).to(main.dtype).to(dev)
            grads = list(torch.autograd.grad(main, leaves, g, allow_unused=True))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        results[dev.type] = (outs, grads)
    if device.type == "cpu":
        return problems
    (outs_d, grads_d), (outs_c, grads_c) = results[device.type], results["cpu"]
    for i, (a, b) in enumerate(zip(outs_d, outs_c)):
        if (why := _close(a, b, dtype)) is not None:
            problems.append(f"output {i}: {why}")
    for i, (a, b) in enumerate(zip(grads_d, grads_c)):
        if (a is None) != (b is None):
            problems.append(f"grad {i}: defined on one device only")
        elif a is not None and (why := _close(a, b, dtype)) is not None:
            problems.append(f"grad {i}: {why}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated ops (default: every op)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, out of {','.join(DTYPES)}")
    ap.add_argument("--max-shapes", type=int, default=None, help="the first N shapes only (a quick dry run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    missing = registered_ops() - set(CASES)
    failures = [f"op {name}: registered but not covered by benchmarks/sanitizer_driver.py CASES"
                for name in sorted(missing)]
    selected = args.only.split(",") if args.only else list(CASES)
    unknown = set(selected) - set(CASES)
    if unknown:
        ap.error(f"--only: unknown ops {sorted(unknown)}")
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    shapes = SHAPES[:args.max_shapes] if args.max_shapes else SHAPES
    torch.manual_seed(0)
    n_cases, interrupted = 0, False
    try:
        for dtype in dtypes:  # dtype-major: every op in the first dtype before any op in the next
            for op in selected:
                for B, d in shapes:
                    for label, inputs, n_grad, call in CASES[op](B, d, dtype):
                        where = f"{op} {str(dtype).removeprefix('torch.')} B={B} d={d} {label}"
                        n_cases += 1
                        try:
                            problems = run_case(call, inputs, n_grad, device, dtype)
                        except Exception as exc:  # a refusal is a finding too: every case here is valid input
                            problems = [f"raised {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}"]
                            if "--verbose" in sys.argv:
                                traceback.print_exc()
                        failures += [f"{where}: {p}" for p in problems]
    except KeyboardInterrupt:  # the kit's time budget (SIGINT): say how far it got
        interrupted = True
    print(f"sanitizer_driver: {n_cases} cases of {len(selected)} ops on {device} "
          f"({', '.join(args.dtypes.split(','))}): {len(failures)} failures"
          + (" (INTERRUPTED by its time budget: the later cases did not run)" if interrupted else ""))
    for f in failures:
        print(f"FAIL {f}")
    return 130 if interrupted else 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

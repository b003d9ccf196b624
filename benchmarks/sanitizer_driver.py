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


def layouts(t: torch.Tensor):
    """``t`` contiguous, as a transposed view, and as every other column of a wider tensor."""
    yield "contiguous", t
    if t.dim() >= 2 and t.shape[-2] > 1 and t.shape[-1] > 1:
        yield "transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        yield "strided", wide[..., ::2]


# Options each op also runs with beyond its example's (op-specific, optional: an op not named here runs
# its example as it is): slice counts, stencil orders, the Langevin step's clamp, norms and noise scale.
VARIANTS = {
    "perturb": [dict(n_slices=1), dict(n_slices=2, include_center=False)],
    "fd_ssm_quotient": [dict(n=1), dict(n=3)],
    "fd_ssm_vr": [dict(n=1)],
    "fd_dsm_quotient": [dict(n=1), dict(n=2)],
    "stencil_perturb": [dict(order=1), dict(order=4)],
    "stencil_combine": [dict(order=1), dict(order=2), dict(order=5)],
    # (alpha and the noise scale per sample; one element each in the last two)
    **{op: [*(dict(clamp_min=lo, clamp_max=hi, return_norms=norms, noise_scale=b)
              for lo, hi in ((None, None), (-1.0, 1.0)) for norms in (False, True) for b in (False, True)),
            *(dict(return_norms=True, noise_scale=b, per_sample=False) for b in (False, True))]
       for op in ops.LANGEVIN_OPS},
}


def written(op: str) -> list[str]:
    """The arguments op ``op`` writes (``Tensor(a!)``): each run writes a copy."""
    return [a.name for a in getattr(ops._ops, op).default._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


def cases(op, B, d, dtype):
    """``(label, args, grads)`` of op ``op`` at ``(B, d)``: its example (ops.example, with eps = EPS) in every
    direction kind and variant, its first tensor argument in every layout; ``grads`` names the inputs its
    backward differentiates (none for an op without one)."""
    names = ops.arg_names(op)
    grads = [names[i] for i in ops.FORWARD_DIFFERENTIABLE.get(op, ())]
    eps = {"eps": EPS} if "eps" in names else {}
    for kind_name, kind in (KINDS.items() if "kind" in names else [("", None)]):
        for over in VARIANTS.get(op, [{}]):
            kw = {**eps, **over, **({} if kind is None else {"kind": kind})}
            label = " ".join([kind_name] + [f"{k}={v}" for k, v in over.items()]).strip()
            args = ops.example(op, B, d, dtype=dtype, **kw)
            main = next(k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
            for lay, t in layouts(args[main]):
                yield f"{label} {main}:{lay}".strip(), {**args, main: t}, grads


CASES = {op: (lambda B, d, dtype, op=op: cases(op, B, d, dtype)) for op in ops.forward_ops()}
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


def run_case(op, args, grads, device, dtype) -> list[str]:
    """Forward (and backward when ``grads``) on ``device`` and on the CPU; the mismatches found."""
    problems = []
    results = {}
    for dev in dict.fromkeys((device, torch.device("cpu"))):
        # move keeping strides: a transposed or sliced input stays so on the device (the seed stays on the CPU)
        on_dev = {k: torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=dev).copy_(v)
                  if isinstance(v, torch.Tensor) and (k != "seed") and (dev.type != "cpu" or k in written(op)) else v
                  for k, v in args.items()}
        on_dev = {k: v.detach().requires_grad_(True) if k in grads else v for k, v in on_dev.items()}
        out = getattr(ops._ops, op)(*on_dev.values())
        outs = [on_dev[w] for w in written(op)] + _flat(out)
        got_grads = []
        if grads:
            torch.manual_seed(1)
            main = outs[0]
            g = torch.randn(main.shape, dtype=torch.float64).to(main.dtype).to(dev)
            got_grads = list(torch.autograd.grad(main, [on_dev[k] for k in grads], g, allow_unused=True))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        results[dev.type] = (outs, got_grads)
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
                    for label, case_args, grads in CASES[op](B, d, dtype):
                        where = f"{op} {str(dtype).removeprefix('torch.')} B={B} d={d} {label}"
                        n_cases += 1
                        try:
                            problems = run_case(op, case_args, grads, device, dtype)
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

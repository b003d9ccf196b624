"""CUDA kernels against the CPU kernels (which test_ops.py checks against the references).

Skipped unless a GPU is visible and this build has CUDA kernels.
"""

import pytest
import torch
from torch.testing._internal.optests import opcheck

import fdsm_ext
from fdsm_ext import ops

from conftest import DTYPES, KINDS, TOL, make_seed, strided

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fdsm_ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and fdsm_ext built with CUDA kernels",
)

# Rows short enough for the warp-per-row kernels and long enough for the block-per-row ones.
SHAPES = [(5, 13), (3, 64), (4, 1000)]


def _close(a, b, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.cpu(), b.to(a.dtype), rtol=rtol * scale, atol=atol * scale * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES + [(2, 4096), (7, 3)])
def test_directions_are_bitwise_those_of_the_cpu(kind, shape):
    seed = make_seed(31337, 5)
    x = torch.zeros(shape)
    cpu = ops.perturb(x, seed, 0.7, 3, ops.DIRECTION_KINDS[kind], True)
    gpu = ops.perturb(x.cuda(), seed, 0.7, 3, ops.DIRECTION_KINDS[kind], True)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_op_matches_the_cpu_kernel(dtype, shape):
    B, d = shape
    n, seed = 2, make_seed(77)
    t = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, v = t(B, d), t(B, d)
    f0, fp, fm = t(B), t(n, B), t(n, B)
    sp, sm = t(n, B, d), t(n, B, d)
    noise, sigma = t(B, d) * 0.2, torch.rand(B, dtype=dtype) + 0.5
    cases = [
        (ops.perturb, (strided(x), seed, 0.1, n, 0, True)),
        (ops.perturb, (x, seed, 0.1, n, 1, False)),
        (ops.dsm_perturb, (strided(x), sigma, seed, 0.1, n, 0)),
        (ops.dsm_perturb, (x, sigma, seed, 0.1, n, 2)),
        (ops.fd_ssm_quotient, (f0, fp, fm, 0.1, float(d))),
        (ops.fd_ssm_vr, (sp, sm, seed, 0.1, 0, float(d))),
        (ops.fd_ssm_vr, (strided(sp), sm, seed, 0.1, 2, float(d))),
        (ops.fd_dsm_quotient, (fp, fm, noise, sigma, seed, 0.1, 0, float(d))),
        (ops.stencil_perturb, (x, v, 0.1, 3)),
        (ops.stencil_combine, (t(4, B), 0.1, 3)),
        (ops.fd_divergence, (strided(sp), sm, seed, 0.1, 0)),
        (ops.fd_divergence, (sp, sm, seed, 0.1, 1)),
    ]
    for fn, args in cases:
        cpu = fn(*args)
        gpu = fn(*(a.cuda() if isinstance(a, torch.Tensor) and a is not seed else a for a in args))
        for g, c in zip(*((o if isinstance(o, tuple) else (o,)) for o in (gpu, cpu)), strict=True):
            assert g.is_cuda and g.dtype == c.dtype
            _close(g, c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_the_cpu_kernel(dtype, shape):
    B, d = shape
    n, seed = 2, make_seed(5)
    t = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    sigma = torch.rand(B, dtype=dtype) + 0.5
    cases = [
        (lambda a, s: ops.dsm_perturb(a, s, seed, 0.1, n, 0)[0], (t(B, d), sigma)),
        (lambda a, b, c: ops.fd_ssm_quotient(a, b, c, 0.1, float(d)), (t(B), t(n, B), t(n, B))),
        (lambda a, b: ops.fd_ssm_vr(a, b, seed, 0.1, 0, float(d)), (t(n, B, d), t(n, B, d))),
        (lambda a, b, w, s: ops.fd_dsm_quotient(a, b, w, s, seed, 0.1, 0, float(d)), (t(n, B), t(n, B), t(B, d), sigma)),
        (lambda a, b: ops.stencil_perturb(a, b, 0.1, 2), (t(B, d), t(B, d))),
        (lambda f: ops.stencil_combine(f, 0.1, 2), (t(3, B),)),
        (lambda a, b: ops.fd_divergence(a, b, seed, 0.1, 2), (t(n, B, d), t(n, B, d))),
    ]
    for fn, args in cases:
        grads = []
        for device in ("cpu", "cuda"):
            inp = [a.detach().to(device).requires_grad_(a is not sigma) for a in args]
            out = fn(*inp)
            g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).to(device)
            grads.append(torch.autograd.grad(out, [a for a in inp if a.requires_grad], g))
        for a, b in zip(grads[1], grads[0]):
            _close(a, b, dtype)


def test_opcheck_on_cuda():
    seed = make_seed(8)
    for rg in (False, True):
        t = lambda *s: torch.randn(*s, device="cuda", requires_grad=rg)  # noqa: E731
        opcheck(ops._ops.perturb.default, (t(4, 7), seed, 0.1, 2, 0, True))
        opcheck(ops._ops.dsm_perturb.default, (t(4, 7), torch.rand(4, device="cuda") + 0.5, seed, 0.1, 2, 0))
        opcheck(ops._ops.fd_ssm_quotient.default, (t(4), t(2, 4), t(2, 4), 0.1, 7.0))
        opcheck(ops._ops.fd_ssm_vr.default, (t(2, 4, 7), t(2, 4, 7), seed, 0.1, 0, 7.0))
        opcheck(ops._ops.fd_dsm_quotient.default,
                (t(2, 4), t(2, 4), t(4, 7), torch.rand(4, device="cuda") + 0.5, seed, 0.1, 2, 7.0))
        opcheck(ops._ops.stencil_perturb.default, (t(4, 7), t(4, 7), 0.1, 3))
        opcheck(ops._ops.fd_divergence.default, (t(2, 4, 7), t(2, 4, 7), seed, 0.1, 1))
        opcheck(ops._ops.stencil_combine.default, (t(4, 4), 0.1, 3))


def test_losses_on_cuda_match_cpu_for_the_same_seed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Softplus(), torch.nn.Linear(32, 1)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    vals = []
    for device in ("cpu", "cuda"):
        model = net.to(device)
        vals.append(fdsm_ext.fd_ssm_loss(lambda y: model(y).squeeze(-1), x.to(device), n_slices=2,
                                         generator=torch.Generator().manual_seed(1), backend="cpp"))
    torch.testing.assert_close(vals[1].cpu(), vals[0])


def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="device"):
        ops.fd_ssm_quotient(torch.zeros(3, device="cuda"), torch.zeros(1, 3), torch.zeros(1, 3), 0.1, 1.0)


def test_large_rows_use_64_bit_indexing():
    # 2^31 + a bit elements in the stacked output: offsets past int32 must be right.
    free, _ = torch.cuda.mem_get_info()
    B, d = 3, (2**31) // 6 + 64
    if free < 3 * 4 * B * d * 3:
        pytest.skip("not enough GPU memory")
    x = torch.zeros(B, d, device="cuda")
    out = ops.perturb(x, make_seed(), 0.1, 1, 1, True)
    tail = out[-1, -8:].cpu()
    assert torch.isfinite(tail).all() and (tail.abs() > 0).all()


def test_sphere_known_answer_and_float64_directions_are_bitwise_the_cpus():
    # Issue 15's known answer: row 1's sum of squares rounds differently in the butterfly and the
    # sequential order; the fixed-point sum gives the CPU's scale.
    seed, eps = make_seed(31337, 5), 0.70000002197243705
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(2, 64, dtype=dtype)
        assert torch.equal(ops.perturb(x.cuda(), seed, eps, 1, 0, False).cpu(), ops.perturb(x, seed, eps, 1, 0, False))


@pytest.mark.parametrize("n", [1, 5])
def test_slice_sums_in_double_as_the_cpu(n):
    # FD-SSM-VR total, FD-DSM projection and noise gradient are summed across slices in double on both
    # devices: float32 results agree to a few float32 ulps, not to float accumulation's error.
    seed, B, d = make_seed(3), 4, 1000
    sp, sm = torch.randn(n, B, d), torch.randn(n, B, d)
    torch.testing.assert_close(ops.fd_ssm_vr(sp.cuda(), sm.cuda(), seed, 0.1, 0, float(d)).cpu(),
                               ops.fd_ssm_vr(sp, sm, seed, 0.1, 0, float(d)), rtol=1e-6, atol=0)
    fp, fm, noise, sigma = torch.randn(n, B), torch.randn(n, B), torch.randn(B, d), torch.rand(B) + 0.5
    args = (torch.ones(B), fp, fm, noise, sigma)
    want = ops._ops.fd_dsm_noise_backward(*args, seed, 0.1, 0, float(d))
    got = ops._ops.fd_dsm_noise_backward(*(t.cuda() for t in args), seed, 0.1, 0, float(d)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 13), (3, 64), (2, 4096)])
def test_dsm_perturb_stack_is_bitwise_the_cpus_and_proj_sums_in_double(kind, shape):
    # The stacked batch is elementwise from the shared streams (x + sigma z, then +- v, no FMA): the
    # CPU's bits. proj is summed in double on both devices, in another order: a few ulps of the result.
    seed, (B, d) = make_seed(31337, 5), shape
    for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        x, sigma = torch.randn(B, d, dtype=dtype), torch.rand(B, dtype=dtype) + 0.5
        want = ops.dsm_perturb(x, sigma, seed, 0.7, 3, ops.DIRECTION_KINDS[kind])
        got = [t.cpu() for t in ops.dsm_perturb(x.cuda(), sigma.cuda(), seed, 0.7, 3, ops.DIRECTION_KINDS[kind])]
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * 1e-2)


def test_grad_on_another_device_is_refused_before_any_launch():
    f0, fp = torch.randn(4).cuda(), torch.randn(2, 4).cuda()
    with pytest.raises(RuntimeError, match="`grad` is on cpu"):
        ops._ops.fd_ssm_quotient_backward(torch.ones(4), f0, fp, fp, 0.1, 5.0)
    torch.cuda.synchronize()  # the context is still usable


def test_in_place_step_refuses_a_score_overlapping_x():
    buf = torch.randn(3, 10, device="cuda")
    with pytest.raises(RuntimeError, match="`score` overlaps `x`"):
        ops.langevin_step_(buf[:, :5], buf[:, 2:7], 0.1, make_seed())

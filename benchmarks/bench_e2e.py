"""End to end: one optimizer step (forward + backward + Adam step) and its peak memory, per score-matching
method, model family, configuration and batch size.

A model family is one entry of :data:`FAMILIES`: how to build the model for a configuration, what
it outputs (a log-density, a score, or a noise-conditional score) and how to draw a batch. The
methods compared for each kind are in :data:`METHODS`; ``fd_fused`` is the FD loss on the compiled
kernels (``backend="cpp"``), ``fd_torch`` the same loss as the authors' code computes it
(``backend="torch"``). Exact SM needs one backward per input dimension and is skipped above
``preset.exact_sm_max_dim``.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` during the loss and its backward, above what
was allocated before (parameters, gradients, optimizer state); on the CPU, the bytes of the tensors
autograd saves for the backward (``saved_tensors_hooks``), parameters excluded: the activation
memory that differs between methods (benchmarks/memory_table.py, where both methods live).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fdsm_ext
from bench_common import Preset, Skip, compare, paired_ratio
from memory_table import cuda_peak, saved_bytes

EPS = 0.1  # paper Sec. 6.1
SIGMA = 0.1  # DSM noise level
NCSN_SIGMAS = torch.logspace(0, -2, 10).tolist()  # FD paper's annealing ladder, 1 -> 0.01


@dataclass
class Built:
    """A model ready to train: ``fn`` is what the loss calls (``log_density(x)``, ``score(x)`` or
    ``score(x, sigma)``), ``module`` holds the parameters, ``make_x(B)`` draws a batch."""

    module: nn.Module
    fn: Callable
    make_x: Callable[[int], torch.Tensor]
    dim: int


@dataclass
class Family:
    name: str
    kind: str  # "log_density" | "score" | "noise_conditional_score"
    build: Callable[[dict, torch.device], Built]  # raises Skip when the model is not available
    describe: Callable[[dict], str]


# --------------------------------------------------------------------------- families
def build_mlp(cfg: dict, device: torch.device) -> Built:
    """Softplus MLP energy ``R^d -> R`` (log-density ``-E``; the sign does not change the cost)."""
    d, width, depth = cfg["dim"], cfg["width"], cfg["depth"]
    layers, w_in = [], d
    for _ in range(depth):
        layers += [nn.Linear(w_in, width), nn.Softplus()]
        w_in = width
    net = nn.Sequential(*layers, nn.Linear(w_in, 1)).to(device)
    return Built(net, lambda y: net(y).squeeze(-1), lambda B: torch.randn(B, d, device=device), d)


def _fdsm_train_model(module: str, name: str):
    """``fdsm_train.models.<module>.<name>``, or Skip saying why not."""
    try:
        importlib.import_module("fdsm_train")
    except ImportError as exc:
        raise Skip(f"fdsm_train is not importable ({exc}); it is being built on branch `trainers`: "
                   "`pip install -e python/` from a checkout that has it") from None
    try:
        return getattr(importlib.import_module(f"fdsm_train.models.{module}"), name)
    except (ImportError, AttributeError):
        raise Skip(f"fdsm_train has no models.{module}.{name} yet") from None


# DKEF, NICE and NCSN come from fdsm_train.models (python/).
def build_dkef(cfg: dict, device: torch.device) -> Built:
    """DKEF log-density (3 Gaussian kernels on width-30 softplus feature MLPs, ``M`` inducing points).

    Timed with a fixed ``alpha`` (random, not zero, so every kernel row matters): the closed-form
    alpha solve of DKEF training is the same for every method and is not part of the loss."""
    d, M = cfg["dim"], cfg.get("inducing", 200)
    model = _fdsm_train_model("dkef", "DKEF")(torch.randn(M, d)).to(device)
    with torch.no_grad():
        model.alpha.normal_(0, 1 / M)
    return Built(model, model, lambda B: torch.randn(B, d, device=device), d)


def build_nice(cfg: dict, device: torch.device) -> Built:
    """NICE log-density (4 additive couplings of 5-layer width-1000 MLPs) on logit-space MNIST."""
    d = cfg["dim"]
    model = _fdsm_train_model("nice", "NICE")(d).to(device)
    return Built(model, model, lambda B: torch.randn(B, d, device=device), d)


def build_ncsn(cfg: dict, device: torch.device) -> Built:
    """NCSNv2's noise-conditional RefineNet ``s(x, sigma) = net(x) / sigma`` (the ``tiny`` preset unless
    ``cfg["preset"]`` says otherwise) on ``(C, H, W)`` images."""
    shape = tuple(cfg["shape"])
    model = _fdsm_train_model("ncsnv2", "ncsnv2_score_model")(cfg.get("preset", "tiny"), channels=shape[0]).to(device)
    return Built(model, model, lambda B: torch.rand(B, *shape, device=device), math.prod(shape))


FAMILIES = {
    "mlp": Family("mlp", "log_density", build_mlp,
                  lambda c: f"MLP energy d={c['dim']}, {c['depth']}x{c['width']} softplus"),
    "dkef": Family("dkef", "log_density", build_dkef, lambda c: f"DKEF d={c['dim']}, M={c.get('inducing', 200)}"),
    "nice": Family("nice", "log_density", build_nice, lambda c: f"NICE d={c['dim']}"),
    "ncsn": Family("ncsn", "noise_conditional_score", build_ncsn, lambda c: f"NCSN {c.get('preset', 'tiny')} {'x'.join(map(str, c['shape']))}"),
}


# --------------------------------------------------------------------------- methods
def _log_density_methods():
    L = fdsm_ext
    return {
        "fd_fused": ("FD-SSM fused", lambda f, x: L.fd_ssm_loss(f, x, EPS, backend="cpp")),
        "fd_torch": ("FD-SSM eager", lambda f, x: L.fd_ssm_loss(f, x, EPS, backend="torch")),
        "ssm": ("SSM", lambda f, x: L.ssm_loss(f, x)),
        "ssm_vr": ("SSM-VR", lambda f, x: L.ssm_vr_loss(f, x)),
        "exact_sm": ("exact SM", lambda f, x: L.exact_sm_loss(f, x)),
        "dsm": ("DSM", lambda f, x: L.dsm_loss(f, x, SIGMA)),
    }


def _score_methods():
    L = fdsm_ext
    return {
        "fd_fused": ("FD-SSM-VR fused", lambda s, x: L.fd_ssm_vr_loss(s, x, EPS, backend="cpp")),
        "fd_torch": ("FD-SSM-VR eager", lambda s, x: L.fd_ssm_vr_loss(s, x, EPS, backend="torch")),
        "ssm": ("SSM", lambda s, x: L.ssm_loss(s, x, model_output="score")),
        "ssm_vr": ("SSM-VR", lambda s, x: L.ssm_vr_loss(s, x, model_output="score")),
        "exact_sm": ("exact SM", lambda s, x: L.exact_sm_loss(s, x, model_output="score")),
        "dsm": ("DSM", lambda s, x: L.dsm_loss(s, x, SIGMA, model_output="score")),
    }


def _noise_conditional_methods():
    L = fdsm_ext
    sig = NCSN_SIGMAS
    return {
        "fd_fused": ("FD-SSM-VR fused", lambda s, x: L.annealed_fd_ssm_vr_loss(s, x, sig, EPS, backend="cpp")),
        "fd_torch": ("FD-SSM-VR eager", lambda s, x: L.annealed_fd_ssm_vr_loss(s, x, sig, EPS, backend="torch")),
        "ssm_vr": ("SSM-VR", lambda s, x: L.annealed_ssm_vr_loss(s, x, sig)),
        "dsm": ("DSM", lambda s, x: L.annealed_dsm_loss(s, x, sig)),
    }


METHODS = {"log_density": _log_density_methods, "score": _score_methods,
           "noise_conditional_score": _noise_conditional_methods}


def _fd_backend_skip(device: torch.device) -> str | None:
    if device.type == "cuda" and not fdsm_ext.has_cuda_kernels():
        return "this build of fdsm_ext has no CUDA kernels (build with a CUDA toolkit)"
    return None


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    configs = {name: list(p.e2e_configs.get(name, [])) for name in FAMILIES}
    for fam_name, fam_configs in configs.items():
        fam = FAMILIES[fam_name]
        for cfg in fam_configs:
            try:
                fam.build(cfg, device)
            except Skip as exc:
                skipped.append(f"e2e {fam.describe(cfg)}: {exc}")
                log(f"e2e {fam.describe(cfg)}: skipped: {exc}")
                continue
            for B in cfg.get("batches", p.e2e_batches):
                for rec in _run_batch(p, device, fam, cfg, B, skipped):
                    records.append(rec)
                    log(f"e2e {fam.describe(cfg):34s} B={B:5d} {rec['label']:18s} step={rec['median_s'] * 1e3:9.2f} ms"
                        f" mem={rec['mem_bytes'] / 2**20:8.1f} MiB"
                        + (f"  t/t(FD fused)={rec['ratio']:.2f}" if rec["ratio"] is not None else ""))
    return {"records": records, "skipped": skipped}


def _run_batch(p, device, fam, cfg, B, skipped) -> list[dict]:
    """Every method of the family's kind on one model and batch, timed in one :func:`compare` (each
    method trains its own copy of the model, from the same initial weights)."""
    steps, memory, meta = {}, {}, {}
    for key, (label, loss) in METHODS[fam.kind]().items():
        desc = f"e2e {fam.describe(cfg)} {label}"  # without the batch: the reason holds for every batch
        torch.manual_seed(0)
        built = fam.build(cfg, device)
        if key == "exact_sm" and built.dim > p.exact_sm_max_dim:
            skipped.append(f"{desc}: skipped for d > {p.exact_sm_max_dim} (one backward pass per dimension)")
            continue
        if key == "fd_fused" and (why := _fd_backend_skip(device)):
            skipped.append(f"{desc}: {why}")
            continue
        torch.manual_seed(0)
        x = built.make_x(B)
        params = list(built.module.parameters())
        opt = torch.optim.Adam(params, lr=1e-4)

        def step(built=built, x=x, opt=opt, loss=loss):
            opt.zero_grad(set_to_none=False)
            loss(built.fn, x).backward()
            opt.step()

        steps[key] = step
        if device.type == "cuda":
            memory[key] = cuda_peak(lambda built=built, x=x, loss=loss: loss(built.fn, x))
        else:
            memory[key] = saved_bytes(lambda built=built, x=x, loss=loss: loss(built.fn, x), params)
        meta[key] = (label, built, params)
    if not steps:
        return []
    timings = compare(steps, device, p)
    base = timings.get("fd_fused")
    config = {k: v for k, v in cfg.items() if k != "batches"}
    out = []
    for key, t in timings.items():
        label, built, params = meta[key]
        out.append({"family": fam.name, "config": config, "model": fam.describe(cfg), "kind": fam.kind,
                    "params": sum(q.numel() for q in params), "dim": built.dim, "batch": B, "method": key,
                    "label": label, "mem_bytes": memory[key],
                    "mem_method": "cuda_max_allocated" if device.type == "cuda" else "saved_tensors",
                    **t.as_dict(), **(paired_ratio(t, base) if base else {"ratio": None})})
    return out

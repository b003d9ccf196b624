"""Argument checks and backend rules shared by the public API (losses, samplers, recipe, numerics).

Every check names the public argument it refuses and says what is accepted, in one message style:
"`name` must be ..., got ...". Type errors raise TypeError, out-of-range values ValueError (integer
arguments raise ValueError for both, as they always have). Nothing here reads a tensor's values on
a device other than the CPU (no host synchronisation); the few value checks of tensor arguments
read CPU tensors through numpy, which dispatches no aten op.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._ext import has_cuda_kernels
from .reference import loss_dtype

#: The backends of the losses and samplers, ``backend=`` values, in the order the docs list them.
BACKENDS = ("auto", "cpp", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
MODEL_OUTPUTS = ("log_density", "score")
NONFINITE_POLICIES = ("raise", "skip", "ignore")

#: Largest element count a stacked batch may have: int64 indexing in every kernel.
MAX_NUMEL = 2**62


def eager() -> bool:
    """Whether data-dependent checks (which would read tensor values) may run: not under torch.compile."""
    return not torch.compiler.is_compiling()


def _got(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- scalars
def check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    """A Python int (or integer numpy/torch scalar, not bool) in ``[minimum, maximum]``."""
    if isinstance(value, (np.integer,)):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {_got(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"`{name}` must be an int {bound}, got {value!r}")
    return value


def check_real(value, name: str, what: str = "a finite real number (a float)") -> float:
    """A finite real Python number (int or float, numpy scalar or one-element real tensor; not bool)."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC check below (not bool)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value!r}")
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"`{name}` must be {what}, got {_got(value)}")
        if value.device.type == "meta":
            raise TypeError(f"`{name}` must be {what} with a value, got a meta tensor")
        value = float(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.bool_, np.complexfloating)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {what}, got {_got(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return value


def check_positive(value, name: str) -> float:
    """A finite real number > 0."""
    value = check_real(value, name, "a finite float > 0")
    if value <= 0:
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}")
    return value


def check_eps(eps, name: str = "eps") -> float:
    return check_positive(eps, name)


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {_got(value)}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {_got(value)}")
    return bool(value)


def check_callable(value, name: str, how: str) -> None:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable as {how}, got {_got(value)}")


def check_generator(generator, name: str = "generator") -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`{name}` must be a torch.Generator or None, got {_got(generator)}")


def check_float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`{name}` must be a torch.dtype, got {_got(dtype)}")
    if not dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    return dtype


# --------------------------------------------------------------------------- tensors
def check_tensor(x, name: str = "x", min_dim: int = 1) -> Tensor:
    """A real floating tensor with values (not on the meta device) and at least ``min_dim`` dims."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if x.is_meta and eager():
        raise ValueError(f"`{name}` is on the meta device (shapes without values); pass a CPU or CUDA tensor")
    if x.dim() < min_dim:
        raise ValueError(f"`{name}` must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_state(x, name: str = "x") -> Tensor:
    """A sampler's state: a floating tensor ``(B, *shape)`` with ``B >= 1``."""
    check_tensor(x, name)
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty batch (batch, *shape), got shape {tuple(x.shape)}")
    return x


def check_batch(x, name: str = "x") -> Tensor:
    """``x`` as ``(B, d)``: a floating tensor ``(B, *event_shape)`` with ``B >= 1`` and ``d >= 1``."""
    check_tensor(x, name)
    shape = x.shape  # (read once: every loss call checks its batch)
    if len(shape) < 2:
        raise ValueError(f"`{name}` must have shape (batch, *event_shape) with at least one event dimension, "
                         f"got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(shape)})")
    if 0 in shape[1:]:  # from the shape: indexing x[0] would dispatch an op
        raise ValueError(f"`{name}` has an empty event shape {tuple(shape[1:])}")
    return x if len(shape) == 2 else x.reshape(shape[0], -1)  # (a reshape to its own shape is still an op)


def check_stack_size(rows_per_sample: int, xf: Tensor, name: str, value: int) -> None:
    """Refuse a stacked batch of ``rows_per_sample * B`` rows whose element count int64 cannot index."""
    B, d = xf.shape
    if rows_per_sample * B * d > MAX_NUMEL:
        raise ValueError(f"`{name}`={value} makes a stacked batch of {rows_per_sample} x {B} rows x {d} features, "
                         f"more than the {MAX_NUMEL} elements a tensor can index; use a smaller `{name}`")


def host_values(t: Tensor) -> np.ndarray:
    """The values of ``t`` on the host: read through numpy for CPU tensors (no aten op, no sync), copied
    (one device sync) otherwise. Only for checks outside the default hot paths."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().numpy() if t.dtype not in (torch.bfloat16, torch.float16) \
        else t.float().numpy()


def host_copy(t: Tensor) -> tuple[Tensor, object]:
    """A host copy of ``t`` that does not block: into pinned memory behind a recorded CUDA event on a
    GPU (read it once ``event.query()`` says so), a plain copy (and no event) elsewhere. How the loss
    and sampler NaN checks leave a GPU without a host sync."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
        return host, event
    return t.to("cpu", copy=True), None  # other devices (and tests of this path on the CPU)


_validated: dict[tuple, tuple[weakref.ref, int]] = {}


def check_once(t: Tensor, check: Callable[[], None], tag=None) -> None:
    """Run ``check()`` (which reads ``t``'s values) unless it already passed for this very tensor in its
    current version: a noise ladder on a GPU, passed to every training step, is read (one device sync)
    once, not at every step. An in-place change of ``t`` bumps its version and brings the check back;
    ``tag`` distinguishes checks of one tensor against different rules (e.g. the data dtype)."""
    key = (id(t), tag)
    seen = _validated.get(key)
    if seen is not None and seen[0]() is t and seen[1] == t._version:
        return
    check()
    if len(_validated) > 64:
        _validated.clear()
    _validated[key] = (weakref.ref(t), t._version)


def min_sigma(dtype: torch.dtype) -> float:
    """Smallest noise level the DSM losses accept for inputs of ``dtype``: ``tiny^(1/4)`` of the loss
    dtype (3.3e-10 for float32 and bfloat16, 1.2e-77 for float64), and for float16 its smallest normal
    number (6.1e-5: the noise ``sigma z`` is drawn in the input's dtype). Below it ``1/sigma^2`` times a
    squared residual overflows."""
    known = _MIN_SIGMA.get(dtype)
    if known is not None:
        return known
    return max(torch.finfo(loss_dtype(dtype)).tiny ** 0.25, torch.finfo(dtype).tiny if dtype == torch.float16 else 0.0)


# min_sigma of the floating dtypes, computed once (a DSM loss checks its sigma on every call)
_MIN_SIGMA: dict[torch.dtype, float] = {}
_MIN_SIGMA.update({dt: min_sigma(dt) for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)})


def check_sigma_values(values, name: str, dtype: torch.dtype) -> None:
    """Every noise level finite, > 0 and at least :func:`min_sigma` for ``dtype``. ``values``: a Python
    float or list (plain Python, so it also runs while torch.compile traces) or a host numpy array."""
    lowest = min_sigma(dtype)
    if not isinstance(values, np.ndarray):
        if isinstance(values, float):
            if math.isfinite(values) and values > 0 and values >= lowest:  # one level, the DSM losses' every call
                return
            values = [values]
        values = list(values)
        bad = [k for k, v in enumerate(values) if not (math.isfinite(v) and v > 0)]
        low = [k for k, v in enumerate(values) if v < lowest]
    else:
        values = values.astype(np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0)).tolist()
        low = np.flatnonzero(values < lowest).tolist()
    if bad:
        k = bad[0]
        raise ValueError(f"`{name}` must be finite and > 0 for every sample, got {float(values[k])!r} at index {k}")
    if low:
        k = low[0]
        raise ValueError(f"`{name}` must be >= {lowest:.3g} for {dtype} inputs (1/sigma^2 overflows below "
                         f"it), got {float(values[k])!r} at index {k}")


# --------------------------------------------------------------------------- backends
def triton_unavailable(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on ``device_type`` tensors, or None if they can.

    They need triton installed and CUDA tensors, or CPU tensors under Triton's interpreter
    (``TRITON_INTERPRET=1`` before fdsm_ext.triton is first imported; how the tests run on CPU).
    """
    try:
        from .triton import unavailable_reason  # registers torch.ops.fdsm_ext_triton
    except ImportError as exc:
        return f"triton cannot be imported ({exc}); install it with `pip install triton`"
    return unavailable_reason(device_type)


#: device type -> the fused backends that disagreed with the references in this process's last
#: :func:`fdsm_ext.selfcheck` on that device type (it keeps this up to date); ``auto`` passes over them.
FAILED_BACKENDS: dict[str, set[str]] = {}


def resolve_backend_for(backend: str, dev: str) -> str:
    """``auto``: the compiled kernels where built (always for CPU), else Triton for CUDA tensors, else
    the torch composite, passing over (with a warning) a backend that failed :func:`fdsm_ext.selfcheck`
    in this process; a requested backend that cannot run on ``dev`` tensors raises."""
    failed = FAILED_BACKENDS.get(dev)
    if dev == "cpu" and not failed and (backend == "auto" or backend == "cpp"):  # every loss call's case
        return "cpp"
    check_choice(backend, "backend", BACKENDS)
    compiled = dev == "cpu" or (dev == "cuda" and has_cuda_kernels())
    if backend == "auto":
        candidates = ["cpp"] if compiled else []
        if dev == "cuda" and triton_unavailable(dev) is None:
            candidates.append("triton")
        candidates.append("torch")
        usable = [name for name in candidates if not failed or name not in failed]
        if not usable:
            raise RuntimeError(f"backend='auto': every backend for {dev} tensors ({', '.join(candidates)}) failed "
                               "fdsm_ext.selfcheck in this process; see its table")
        if usable[0] != candidates[0]:
            warnings.warn(f"backend='auto' passes over {', '.join(n for n in candidates if n in failed)} on {dev}: "
                          f"it failed fdsm_ext.selfcheck in this process; using {usable[0]!r}", RuntimeWarning,
                          stacklevel=3)
        return usable[0]
    if backend == "cpp" and not compiled:
        raise RuntimeError(f"backend='cpp' has no kernels for {dev} tensors in this build of fdsm_ext "
                           "(CUDA kernels are built only with a CUDA build of torch and a CUDA toolkit); "
                           "use backend='torch' or 'auto'")
    if backend == "triton":
        reason = triton_unavailable(dev)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {dev} tensors: {reason}; "
                               "use backend='auto', 'cpp' or 'torch'")
    return backend


def draw_seed(generator) -> Tensor:
    """A fresh ``(seed, offset)`` pair from ``generator`` (torch's default CPU generator if None)."""
    if generator is None or generator.device.type == "cpu":  # (device named: torch.set_default_device may differ)
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device="cpu")
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=generator.device).cpu()

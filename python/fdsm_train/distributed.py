"""torch.distributed set-up for ``torchrun --nproc_per_node N fdsm-train ...`` (gloo on CPU, NCCL on CUDA).

A single process (no ``WORLD_SIZE`` in the environment) is rank 0 of 1 and never touches
torch.distributed, so every helper here is a no-op there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (more than one process)."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; other names as given.

    Raises :class:`~fdsm_train.config.ConfigError` (naming ``--device``) for a name torch does not
    know, CUDA asked for where it is not available, or a CUDA index past the visible devices.
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                          f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'}); "
                          "use --device cpu or auto")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the trainers run on cpu or cuda")
    return device


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all processes (the value itself in a single process)."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def any_across(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on any process (so every process takes the same branch)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` on every process."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every process (all start from the same weights)."""
    if not info.distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def average_gradients(module: torch.nn.Module, info: DistInfo) -> None:
    """Replace every parameter's ``.grad`` by its mean over the processes, in one all-reduce.

    This is what DistributedDataParallel's reducer does, done after ``backward()`` instead of inside
    it: DDP's autograd hooks give wrong gradients when a double-backward loss (exact SM, SSM, DSM of a
    log-density) leaves a parameter without a gradient (pytorch/pytorch#47562), and score matching
    always does (an output bias does not change the score). A parameter with no gradient on any
    process keeps ``grad=None``; one with a gradient on some processes only counts zeros elsewhere.
    """
    if not info.distributed:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=info.device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p, h in zip(params, has_grad.tolist()) if h]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    chunks = iter(flat.split([g.numel() for g in grads]))
    for p, h in zip(params, has_grad.tolist()):
        if h:
            p.grad = next(chunks).view_as(p).clone()

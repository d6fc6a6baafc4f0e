"""What every wrapper checks and builds when it wraps a module: torch.distributed is ready, the
module sits on one device that matches the backend (and DDP's ``device_ids``), every rank holds
the same architecture, DDP's constructor keywords are understood, and extra connections.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gossipgrad.collectives import gather_object

# DDP's constructor keywords (torch's own signature), which the gossip wrappers accept so that a
# DDP script switches by changing the class name (see ``ddp_keywords``); ``process_group`` and
# ``bucket_cap_mb`` are the wrappers' own arguments.
DDP_KEYWORDS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {
    "self",
    "module",
    "process_group",
    "bucket_cap_mb",
}


def check_initialised(wrapper: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{wrapper} needs torch.distributed initialised: call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first, "
            "or launch with torchrun or `gossipgrad train`"
        )


def ddp_keywords(module: nn.Module, keywords: dict[str, Any]) -> dict[str, Any]:
    """Check DDP's keywords given to a gossip wrapper; return those that mean something to it
    (``broadcast_buffers``, ``init_sync``). ``device_ids`` and ``output_device`` must name the
    module's device; the others (``find_unused_parameters``, ``static_graph``,
    ``gradient_as_bucket_view``, ...) concern DDP's reducer and have no effect: gossip handles
    unused parameters and changing graphs always. ``process_group`` and ``bucket_cap_mb`` are
    the wrappers' own arguments and never reach here."""
    device = _device(module)
    for name in ("device_ids", "output_device"):
        value = keywords.get(name)
        wanted = list(value) if name == "device_ids" and value is not None else [value]
        for v in wanted:
            if (
                v is not None
                and torch.device(v if not isinstance(v, int) else f"cuda:{v}") != device
            ):
                raise ValueError(
                    f"{name}={value!r} does not match the module's device {device}: move the "
                    "module there before wrapping, or leave the argument out"
                )
    return {k: keywords[k] for k in ("broadcast_buffers", "init_sync") if k in keywords}


def _device(module: nn.Module) -> torch.device:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def check_device(module: nn.Module, group: dist.ProcessGroup) -> None:
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    if len(devices) > 1:
        raise ValueError(
            f"the module's tensors are on several devices ({sorted(map(str, devices))}); "
            "move it to one device (model.to(device)) before wrapping"
        )
    if dist.get_backend(group) == "nccl" and any(d.type != "cuda" for d in devices):
        raise ValueError(
            "the process group uses NCCL but the module is not on a CUDA device: call "
            "module.to(f'cuda:{local_rank}') before wrapping, or use the 'gloo' backend on CPU"
        )


def check_same_model(module: nn.Module, group: dist.ProcessGroup, timeout: timedelta) -> None:
    """Every rank must hold the same architecture: same tensors, shapes and dtypes."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_parameters()]
    mine += [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers()]
    everyone = gather_object(mine, group, world, timeout)
    ref = everyone[0]
    for r, theirs in enumerate(everyone):
        if theirs == ref:
            continue
        if len(theirs) != len(ref):
            detail = f"rank 0 has {len(ref)} parameters and buffers, rank {r} has {len(theirs)}"
        else:
            a, b = next((a, b) for a, b in zip(ref, theirs, strict=True) if a != b)
            detail = f"rank 0 has {a[0]} {a[1]} {a[2]}, rank {r} has {b[0]} {b[1]} {b[2]}"
        raise ValueError(
            f"the replicas differ across ranks ({detail}): every rank must build the same model "
            "with the same dtype before wrapping"
        )


def extra_groups(group: dist.ProcessGroup, streams: int) -> list[dist.ProcessGroup] | None:
    """``streams`` groups over the same ranks (the first is ``group``); collective."""
    if streams == 1 or dist.get_world_size(group) == 1:
        return None
    ranks = dist.get_process_group_ranks(group)
    return [group] + [dist.new_group(ranks) for _ in range(streams - 1)]


class WeakHook:
    """A hook that calls a wrapper's method without holding the wrapper: the hooks a wrapper puts
    on its module's tensors must not make ``copy.deepcopy(model.module)`` (an EMA copy, a scratch
    copy for evaluation) or pickling copy the wrapper and its process group. A copy gets an inert
    hook."""

    def __init__(self, method: Callable[..., Any] | None) -> None:
        self._method = None if method is None else weakref.WeakMethod(method)  # type: ignore[arg-type]

    def __call__(self, *args: Any) -> Any:
        method = None if self._method is None else self._method()
        return None if method is None else method(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> WeakHook:
        return WeakHook(None)

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return WeakHook, (None,)

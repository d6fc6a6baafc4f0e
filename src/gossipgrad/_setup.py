"""What every wrapper checks and builds when it wraps a module: torch.distributed is ready, the
module sits on one device that matches the backend (and DDP's ``device_ids``), every rank holds
the same architecture and was given the same options (one gather for both), DDP's constructor
keywords are understood, and extra connections.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gossipgrad.collectives import arrive, gather_object
from gossipgrad.options import GossipOptions

# DDP's constructor keywords (torch's own signature), which the gossip wrappers accept so that a
# DDP script switches by changing the class name (see ``ddp_keywords``); ``process_group`` and
# ``bucket_cap_mb`` are the wrappers' own arguments.
DDP_KEYWORDS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {
    "self",
    "module",
    "process_group",
    "bucket_cap_mb",
}

# Options that may differ between ranks: ``timeout`` is how long this rank waits for the others
# before naming them; no message, buffer, schedule or arithmetic depends on it, and a rank on a
# slower host (or one that compiles its first step) may need longer. Every other option decides
# what is sent, when, to whom, in which layout, or how it is mixed: ranks that differ there wait
# for messages that never come, or mix mismatched payloads, so they must agree.
MAY_DIFFER: frozenset[str] = frozenset({"timeout"})
# DDP keywords that name this rank's own device, different on every rank by nature
_PER_RANK_KEYWORDS = frozenset({"device_ids", "output_device"})
_DDP_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(DistributedDataParallel.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
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


def settings(options: GossipOptions, keywords: dict[str, Any] | None = None) -> dict[str, str]:
    """What every rank must be given alike, as printable values: every engine option (the
    schedule's inputs among them: ``schedule``, ``seed``, ``gossip_every``, ``max_staleness``)
    but those in ``MAY_DIFFER``, and DDP's keywords ``keywords`` (``ddp_settings``)."""
    mine = {f.name: _shown(getattr(options, f.name)) for f in fields(options)}
    mine |= {name: _shown(value) for name, value in (keywords or {}).items()}
    return {k: v for k, v in mine.items() if k not in MAY_DIFFER}


def ddp_settings(keywords: dict[str, Any], names: Sequence[str] | None = None) -> dict[str, Any]:
    """DDP's keywords ``names`` (default: all but those naming this rank's device) as given,
    or DDP's defaults where not given, so that leaving one out equals passing its default."""
    names = names if names is not None else sorted(DDP_KEYWORDS - _PER_RANK_KEYWORDS)
    return {n: keywords.get(n, _DDP_DEFAULTS.get(n)) for n in names}


def _shown(value: Any) -> str:
    """A value as compared across ranks: plain values by ``repr`` (a whole float as an int:
    ``25.0`` equals ``25``), others by type (a repr with an address differs on every rank)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return repr(int(value))
    plain = value is None or isinstance(value, (bool, int, float, str, torch.dtype, timedelta))
    return repr(value) if plain else type(value).__name__


def check_same_settings(everyone: Sequence[dict[str, str]]) -> None:
    """Raise ``ValueError`` naming every setting whose value differs across ranks, with each
    value and the ranks that have it (``everyone[r]``: group rank ``r``'s ``settings``)."""
    names = sorted({k for mine in everyone for k in mine}, key=_field_order)
    seen = {k: [mine.get(k, "(not given)") for mine in everyone] for k in names}
    differ = {k: values for k, values in seen.items() if len(set(values)) > 1}
    if not differ:
        return
    detail = "; ".join(f"{k}: {_by_value(values)}" for k, values in differ.items())
    raise ValueError(
        f"the ranks were given different options ({detail}): every rank must wrap with the same "
        f"options (only {', '.join(sorted(MAY_DIFFER))} may differ); give every rank the same "
        "arguments, flags or config file"
    )


def _field_order(name: str) -> tuple[int, str]:
    order = GossipOptions.names()
    return (order.index(name), "") if name in order else (len(order), name)


def _by_value(values: Sequence[str]) -> str:
    """``1 on ranks 0 and 2-3, 4 on rank 1``: each value and the ranks that have it."""
    ranks: dict[str, list[int]] = {}
    for r, value in enumerate(values):
        ranks.setdefault(value, []).append(r)
    return ", ".join(f"{value} on {_ranks_text(rs)}" for value, rs in ranks.items())


def _ranks_text(ranks: list[int]) -> str:
    spans: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    if len(ranks) == 1:
        return f"rank {spans[0]}"
    listed = spans[0] if len(spans) == 1 else f"{', '.join(spans[:-1])} and {spans[-1]}"
    return f"ranks {listed}"


def check_same_setup(
    module: nn.Module,
    group: dist.ProcessGroup,
    timeout: timedelta,
    options: dict[str, str] | None = None,
) -> None:
    """Every rank must hold the same architecture (same tensors, shapes and dtypes) and, with
    ``options`` (``settings(...)``), have been given the same options: one gather for both."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    mine = (_architecture(module), options or {})
    everyone = gather_object(mine, group, world, timeout)
    check_same_settings([theirs for _, theirs in everyone])
    _check_architectures([theirs for theirs, _ in everyone])


def check_same_model(module: nn.Module, group: dist.ProcessGroup, timeout: timedelta) -> None:
    """Every rank must hold the same architecture: same tensors, shapes and dtypes."""
    check_same_setup(module, group, timeout)


def _architecture(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_parameters()]
    return mine + [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers()]


def _check_architectures(everyone: list[list[tuple[str, tuple[int, ...], str]]]) -> None:
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


def extra_groups(
    group: dist.ProcessGroup, streams: int, timeout: timedelta | None = None
) -> list[dist.ProcessGroup] | None:
    """``streams`` groups over the same ranks (the first is ``group``); collective (every rank
    of the world creates them), after the group's ranks arrived (``arrive``)."""
    if streams == 1 or dist.get_world_size(group) == 1:
        return None
    arrive(group, timeout, "wrapping the model (the extra streams' groups)")
    ranks = dist.get_process_group_ranks(group)
    return [group] + [dist.new_group(ranks) for _ in range(streams - 1)]


class WeakHook:
    """A hook that calls a wrapper's method without holding the wrapper: the hooks a wrapper puts
    on its module's tensors must not make ``copy.deepcopy(model.module)`` (an EMA copy, a scratch
    copy for evaluation) or pickling copy the wrapper and its process group. A copy gets an inert
    hook."""

    def __init__(self, method: Callable[..., Any] | None) -> None:
        self._method = None if method is None else weakref.WeakMethod(method)

    def __call__(self, *args: Any) -> Any:
        method = None if self._method is None else self._method()
        return None if method is None else method(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> WeakHook:
        return WeakHook(None)

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return WeakHook, (None,)

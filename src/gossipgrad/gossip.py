"""``GossipDataParallel``: data parallelism where each rank talks to one partner per step.

Used exactly like ``DistributedDataParallel``::

    model = GossipDataParallel(module)          # parameters broadcast from rank 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
    model.average_replicas()                     # one all-reduce: every rank holds the mean

Each training forward is one gossip step ``t``. In the default ``params`` mode, the forward first
snapshots the parameters (the result of the previous optimizer step) into flat buffers and starts
sending them to ``send_to`` while receiving ``recv_from``'s snapshot (``gossipgrad.schedule``).

- overlapped (default): the exchange runs while this step's forward, backward and optimizer step
  compute; the next forward waits for it and mixes in residual form, ``x <- x + w (r - s)``
  (staleness 1, see ``gossipgrad.mixing``).
- ``sync=True``: the forward waits for the exchange and mixes ``x <- (1 - w) x + w r`` before
  computing.
- ``mode="gradients"`` (for comparison only: replicas drift apart): after backward, gradients are
  averaged with the partner's, ``g <- (1 - w) g + w g_r``, before the optimizer step.

Per step a rank sends one message stream to one rank and receives one from one rank (several
buckets, same partner), with no collective. Forwards under ``torch.no_grad()``, in ``eval()``
mode, or inside ``no_sync()`` do not gossip.

Buffers: floating-point buffers (BatchNorm running statistics) are mixed with the parameters in
``params`` mode and averaged by ``average_replicas``; integer buffers (``num_batches_tracked``)
stay local. All buffers are broadcast from rank 0 when wrapping. In ``gradients`` mode buffers stay
local until ``average_replicas``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gossipgrad import _p2p
from gossipgrad.collectives import average_, broadcast_, consensus_distance, gather_object
from gossipgrad.errors import NonFiniteError, PeerError
from gossipgrad.mixing import (
    Bucket,
    is_finite,
    make_buckets,
    mix_,
    mix_residual_,
    pack_,
    replica_tensors,
)
from gossipgrad.options import GossipOptions
from gossipgrad.schedule import Exchange, plan


class GossipDataParallel(nn.Module):
    """Wrap ``module`` for GossipGraD data-parallel training (see the module docstring).

    Args:
        module: the model, on the device its rank trains on (CUDA for NCCL, CPU for gloo).
        options: the engine's options (``gossipgrad.options.GossipOptions``); default: the
            defaults. Keywords (``sync=True``, ...) override single options.
        process_group: the group to gossip in (default: the world). With ``streams > 1`` the
            extra groups come from ``torch.distributed.new_group``, which every rank of the world
            must call: with a group smaller than the world, the ranks outside it must call
            ``new_group(ranks)`` ``streams - 1`` times too.
    """

    def __init__(
        self,
        module: nn.Module,
        options: GossipOptions | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.options = GossipOptions.build(options, **overrides)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GossipDataParallel needs torch.distributed initialised: call "
                "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first, "
                "or launch with torchrun or `gossipgrad train`"
            )
        self.module = module
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.step = 0
        self.bytes_sent_last_step = 0
        self._gossip_enabled = True
        # the exchange in flight: one InFlight per bucket, and the plan it follows
        self._pending: tuple[list[_p2p.InFlight], Exchange] | None = None
        self._grad_due = False  # gradients mode: this forward's backward must exchange

        _check_device(module, self.group)
        _check_same_model(module, self.group)
        o = self.options
        cap = o.bucket_cap_bytes
        everything = list(module.parameters()) + list(module.buffers())
        broadcast_(everything, make_buckets(everything, cap), self.group)
        self._buckets: list[Bucket] = make_buckets(self._mixed_tensors(), cap, o.wire_dtype)
        self._streams = _extra_groups(self.group, o.streams)
        # full-precision scratch for the collectives (the gossip buffers may be compressed)
        same = o.mode == "params" and o.wire_dtype is None
        floats = replica_tensors(module)
        self._avg_buckets = self._buckets if same else make_buckets(floats, cap)
        if o.mode == "gradients" and self.world_size > 1:
            for p in module.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)

    # --- the training step -------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._should_gossip():
            self.gossip_step()
        return self.module(*args, **kwargs)

    def gossip_step(self) -> None:
        """One gossip step, as a training forward does before computing: in ``params`` mode,
        mix the previous exchange in and start this step's; in ``gradients`` mode, arm the
        exchange of the coming backward. For wrappers that compose the engine with other
        parallelism (``gossipgrad.hierarchical``); a plain training loop never calls it."""
        if self.options.mode == "params":
            self._gossip_params()
        else:
            self._grad_due = True
        self.step += 1

    def _should_gossip(self) -> bool:
        return (
            self.world_size > 1
            and self._gossip_enabled
            and self.module.training
            and torch.is_grad_enabled()
        )

    def _gossip_params(self) -> None:
        self.flush()
        tensors = self._mixed_tensors()
        ex = self._plan(self.step)
        inflights = []
        for index, b in enumerate(self._buckets):  # bucket 0 is on the wire while 1 is packed
            pack_(b.send, [tensors[i] for i in b.indices])
            inflights.append(self._start([b], ex, index))
        self.bytes_sent_last_step = self._payload_bytes(ex)
        self._pending = (inflights, ex)
        if self.options.sync:
            self.flush()

    def _start(self, buckets: list[Bucket], ex: Exchange, index: int = 0) -> _p2p.InFlight:
        return _p2p.start(
            [b.send for b in buckets],
            [b.recv for b in buckets],
            ex.send_to,
            ex.recv_from,
            self.step,
            self.group,
            streams=self._streams,
            index=index,
        )

    def _payload_bytes(self, ex: Exchange) -> int:
        return sum(b.nbytes for b in self._buckets) if ex.send_to is not None else 0

    def flush(self) -> None:
        """Complete the exchange in flight, if any, and mix it in now rather than at the next
        forward (the result is the same). Call before evaluating or saving a replica.

        Buckets are mixed as they arrive, while later ones are still on the wire. Mixing is
        always in residual form ``x <- x + w (r - s)``: right after the snapshot (``sync=True``)
        ``x == s`` and it equals ``(1 - w) x + w r``; with a compressed wire dtype it still keeps
        the average exactly."""
        if self._pending is None:
            return
        inflights, ex = self._pending
        self._pending = None
        tensors = self._mixed_tensors()
        for b, inflight in zip(self._buckets, inflights, strict=True):
            self._wait(inflight)
            if ex.recv_from is None:
                continue
            own = [tensors[i] for i in b.indices]
            if not mix_residual_(own, b.send, b.recv, ex.weight, require_finite=True):
                # s - r is not finite: the received buffer, or else this rank's own snapshot
                what = "local" if is_finite(b.recv) else "received"
                self._nonfinite(what, ex.recv_from, inflight.step)

    def _wait(self, inflight: _p2p.InFlight) -> None:
        try:
            inflight.wait(self.options.timeout, self.rank)
        except PeerError as exc:
            raise PeerError(_first_loss(exc, self.rank, inflight.step), exc.peer) from exc

    # --- gradients mode ----------------------------------------------------------------------

    def _on_grad_ready(self, _param: torch.Tensor) -> None:
        if self._grad_due:
            self._grad_due = False
            torch.autograd.Variable._execution_engine.queue_callback(self._exchange_grads)

    def _exchange_grads(self) -> None:
        params = list(self.module.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ex = self._plan(self.step - 1)
        for b in self._buckets:
            pack_(b.send, [grads[i] for i in b.indices])
        self._wait(self._start(self._buckets, ex))
        self.bytes_sent_last_step = self._payload_bytes(ex)
        if ex.recv_from is None:
            return
        for b in self._buckets:
            if self._check_finite(b.recv, ex.recv_from, self.step - 1):
                mix_([grads[i] for i in b.indices], b.recv, ex.weight)
        for p, g in zip(params, grads, strict=True):
            if p.grad is None and p.requires_grad:
                p.grad = g

    # --- replicas ------------------------------------------------------------------------------

    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over parameters and float buffers (collective:
        every rank must call it at the same point)."""
        self.flush()
        return consensus_distance(replica_tensors(self.module), self._avg_buckets, self.group)

    def average_replicas(self, into: nn.Module | None = None) -> None:
        """Set every replica to the exact average of all replicas (collective, one all-reduce);
        with ``into`` (a module like this one), write the average there and leave the replicas."""
        self.flush()
        target = None if into is None else replica_tensors(into)
        average_(replica_tensors(self.module), self._avg_buckets, self.group, into=target)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forwards inside do not gossip (gradient accumulation, like DDP's ``no_sync``)."""
        previous, self._gossip_enabled = self._gossip_enabled, False
        try:
            yield
        finally:
            self._gossip_enabled = previous

    def gossip_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the schedule exactly (call after ``flush``)."""
        return schedule_state(self.step, self.options)

    def load_gossip_state(self, state: dict[str, Any]) -> None:
        self.step = load_schedule_state(state, self.options)

    # --- helpers ------------------------------------------------------------------------------

    def _plan(self, step: int) -> Exchange:
        return plan(self.rank, step, self.world_size, self.options.seed, self.options.schedule)

    def _mixed_tensors(self) -> list[torch.Tensor]:
        """What gossip mixes: parameters and float buffers, or only parameters (gradients)."""
        if self.options.mode == "gradients":
            return list(self.module.parameters())
        return replica_tensors(self.module)

    def _check_finite(self, flat: torch.Tensor, source: int, step: int) -> bool:
        """Whether ``flat``, received from ``source``, is finite (else raise or warn)."""
        if is_finite(flat):
            return True
        self._nonfinite("received", source, step)
        return False

    def _nonfinite(self, what: str, source: int, step: int) -> None:
        """Raise ``NonFiniteError``, or warn (``on_nonfinite="skip"``: the caller skips)."""
        where = (
            "its own parameters" if what == "local" else f"parameters received from rank {source}"
        )
        message = (
            f"rank {self.rank} found NaN or inf in {where} at gossip step {step}: training has "
            "diverged (lower the learning rate, add gradient clipping, or check the data)"
        )
        if self.options.on_nonfinite == "raise":
            raise NonFiniteError(message + "; on_nonfinite='skip' would skip such exchanges")
        warnings.warn(message + "; skipping this exchange", RuntimeWarning, stacklevel=4)


def schedule_state(step: int, options: GossipOptions) -> dict[str, Any]:
    """The gossip step and what the schedule depends on, for a checkpoint."""
    return {"step": step, "schedule": options.schedule, "seed": options.seed}


def load_schedule_state(state: dict[str, Any], options: GossipOptions) -> int:
    """The step to resume at, after checking that ``state`` follows the same schedule."""
    for key in ("schedule", "seed"):
        mine = getattr(options, key)
        if state.get(key, mine) != mine:
            raise ValueError(
                f"checkpoint was made with {key}={state[key]!r} but this run uses "
                f"{key}={mine!r}: resume with the same {key}"
            )
    return int(state["step"])


def _extra_groups(group: dist.ProcessGroup, streams: int) -> list[dist.ProcessGroup] | None:
    """``streams`` groups over the same ranks (the first is ``group``); collective."""
    if streams == 1 or dist.get_world_size(group) == 1:
        return None
    ranks = dist.get_process_group_ranks(group)
    return [group] + [dist.new_group(ranks) for _ in range(streams - 1)]


def _first_loss(exc: PeerError, rank: int, step: int) -> str:
    """Record in the job's store that this rank lost ``exc.peer`` (unless a loss was already
    recorded), and add the first recorded loss to the message: when one rank dies, the ranks
    that fail after it, in cascade, still name the rank that was lost first."""
    mine = f"{exc.peer}:{rank}:{step}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        first = store.compare_set("gossipgrad/first_loss", "", mine).decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the job; the message stands
        return str(exc)
    lost, seen_by, at = first.split(":") if first.count(":") == 2 else (exc.peer, rank, step)
    return f"{exc} [first loss in this job: rank {lost}, seen by rank {seen_by} at step {at}]"


def _check_device(module: nn.Module, group: dist.ProcessGroup) -> None:
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


def _check_same_model(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Every rank must hold the same architecture: same tensors, shapes and dtypes."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_parameters()]
    mine += [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers()]
    everyone = gather_object(mine, group, world)
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

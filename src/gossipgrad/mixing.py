"""Flat buffers and the mixing arithmetic, shared by the engine and the virtual cluster.

Nothing here communicates: these are plain tensor operations, so that the same code mixes replicas
across processes (``gossipgrad.gossip``) and inside one process (``gossipgrad.sim.virtual``).

Mixing with weight ``w`` (``w = 1/2`` for every schedule but ``exact``):

- synchronous:  ``x <- (1 - w) x + w r``                 (``r`` the partner's replica)
- residual:     ``x <- x + w (r - s)``                    (``s`` the snapshot this rank sent)
- outer step:   ``x <- x + (phi' - s)``, ``phi'`` one Nesterov step of the slow weights ``phi``
  on the replica's pseudo-gradient ``phi - s``, plus the pull ``w (r - s)`` (``outer_step_``)

The residual form is what overlap needs: the snapshot ``s`` left when the exchange began, a local
optimizer step moved ``x`` meanwhile, and the residual keeps that step while pulling toward the
partner (staleness 1). When nothing moved, ``x == s`` and both forms agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gossipgrad import _quantize


@dataclass
class Bucket:
    """A group of same-dtype, same-device tensors and two flat buffers the size of their sum:
    ``send`` holds the snapshot that goes out, ``recv`` what comes in. With a compressed wire
    they hold the wire's dtype, and ``stage`` (in the tensors' dtype, the same size) holds the
    values before encoding (int8: the encoding is ``gossipgrad._quantize``'s) or the difference
    that ``mix_residual_`` computes (bfloat16, float16: the buckets of one ``make_buckets`` call
    share one stage, the size of the largest, used by one bucket at a time). ``snapshot``: the
    stage is the bucket's own and holds the values sent, before rounding (int8, and a compressed
    wire with ``make_buckets(..., keep_snapshot=True)``), until the bucket is encoded again."""

    indices: list[int]
    send: torch.Tensor
    recv: torch.Tensor
    numels: list[int] = field(default_factory=list)
    stage: torch.Tensor | None = None
    snapshot: bool = False

    @property
    def nbytes(self) -> int:
        return self.send.numel() * self.send.element_size()


def replica_tensors(
    module: nn.Module, constants: frozenset[str] = frozenset()
) -> list[torch.Tensor]:
    """Floating-point parameters, then floating-point buffers (BatchNorm running statistics)
    except the ``constants`` (names, see ``constant_buffers``): what parameter gossip mixes and
    what consensus and averaging cover. Integer parameters and buffers stay local; a complex
    tensor appears as its real view (``torch.view_as_real``: same storage, last dimension 2), so
    that mixing, NaN checks and averages see both parts. Read afresh at each use, so a module
    that reassigns a buffer is still covered."""
    params = [_real(p) for p in module.parameters() if _is_float(p)]
    buffers = [_real(b) for n, b in module.named_buffers() if _is_float(b) and n not in constants]
    return params + buffers


def constant_buffers(module: nn.Module) -> frozenset[str]:
    """Names of the floating-point buffers that hold NaN or inf, such as a causal mask of
    ``-inf``: constants, which every rank holds equal from wrapping on (``inf - inf`` is NaN, so
    they cannot be mixed or averaged). Call it when wrapping, before training can diverge."""
    return frozenset(
        n for n, b in module.named_buffers() if _is_float(b) and not bool(_real(b).isfinite().all())
    )


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def make_buckets(
    tensors: Sequence[torch.Tensor],
    cap_bytes: int,
    wire_dtype: torch.dtype | None = None,
    *,
    at_least: torch.dtype | None = None,
    zeroed: bool = False,
    keep_snapshot: bool = False,
) -> list[Bucket]:
    """Group ``tensors`` (in order) into buckets of at most ``cap_bytes`` (a single larger tensor
    gets a bucket of its own), never mixing dtypes or devices within a bucket. With
    ``wire_dtype``, the buffers of floating-point tensors hold that dtype (compressed payloads;
    ``torch.int8``: blockwise quantized, see ``gossipgrad._quantize``);
    with ``at_least`` (``torch.float32`` for collectives), narrower floating-point tensors get
    buffers of that dtype, so that sums accumulate in it. ``zeroed``: fill the buffers now, so
    that their memory is touched (one page fault per page) here rather than in the first step
    that uses them. ``keep_snapshot``: with a bfloat16 or float16 wire, each bucket gets a stage
    of its own that keeps the values sent, unrounded (``Bucket.snapshot``; the outer step needs
    them), instead of the shared one."""
    new = torch.zeros if zeroed else torch.empty
    groups, keys = _group(tensors, cap_bytes)
    shared = {} if keep_snapshot else _shared_stages(tensors, groups, keys, wire_dtype, new)
    buckets = []
    for idx, (dtype, device) in zip(groups, keys, strict=True):
        numels = [tensors[i].numel() for i in idx]
        total, stage, kept = sum(numels), None, False
        if wire_dtype is torch.int8 and dtype.is_floating_point:
            stage, kept = new(total, dtype=dtype, device=device), True
            dtype, total = torch.int8, _quantize.encoded_size(total)
        elif wire_dtype is not None and dtype.is_floating_point:
            if keep_snapshot:
                stage, kept = new(total, dtype=dtype, device=device), True
            else:
                stage = shared[(dtype, device)][:total]
            dtype = wire_dtype
        elif (
            at_least is not None and dtype.is_floating_point and dtype.itemsize < at_least.itemsize
        ):
            dtype = at_least
        buckets.append(
            Bucket(
                indices=idx,
                send=new(total, dtype=dtype, device=device),
                recv=new(total, dtype=dtype, device=device),
                numels=numels,
                stage=stage,
                snapshot=kept,
            )
        )
    return buckets


_Key = tuple[torch.dtype, torch.device]


def _group(tensors: Sequence[torch.Tensor], cap_bytes: int) -> tuple[list[list[int]], list[_Key]]:
    """The indices of each bucket's tensors, and each bucket's dtype and device."""
    groups: list[list[int]] = []
    sizes: list[int] = []
    keys: list[_Key] = []
    open_group: dict[_Key, int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        g = open_group.get(key)
        if g is None or sizes[g] + nbytes > cap_bytes:
            g = len(groups)
            groups.append([])
            sizes.append(0)
            keys.append(key)
            open_group[key] = g
        groups[g].append(i)
        sizes[g] += nbytes
    return groups, keys


def _shared_stages(
    tensors: Sequence[torch.Tensor],
    groups: list[list[int]],
    keys: list[_Key],
    wire_dtype: torch.dtype | None,
    new: Callable[..., torch.Tensor],
) -> dict[_Key, torch.Tensor]:
    """With a bfloat16 or float16 wire: per dtype and device, one buffer the size of the largest
    bucket, where residual mixing computes the difference (allocated once here rather than at
    every exchange: fresh memory costs a page fault per page)."""
    if wire_dtype is None or wire_dtype is torch.int8:
        return {}
    largest: dict[_Key, int] = {}
    for idx, key in zip(groups, keys, strict=True):
        if key[0].is_floating_point:
            largest[key] = max(largest.get(key, 0), sum(tensors[i].numel() for i in idx))
    return {key: new(n, dtype=key[0], device=key[1]) for key, n in largest.items()}


def views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like`` (no copy)."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


@torch.no_grad()
def pack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Copy ``tensors`` into ``flat`` and return it."""
    torch._foreach_copy_(views(flat, tensors), list(tensors))
    return flat


@torch.no_grad()
def encode_(bucket: Bucket, tensors: Sequence[torch.Tensor]) -> None:
    """Put ``tensors``, the bucket's own, in its ``send`` buffer, in the wire's format (and in
    its stage first, unrounded, when the stage keeps the snapshot)."""
    if not bucket.snapshot or bucket.stage is None:
        pack_(bucket.send, tensors)
    elif bucket.send.dtype is torch.int8:
        _quantize.encode_(bucket.send, pack_(bucket.stage, tensors))
    else:
        bucket.send.copy_(pack_(bucket.stage, tensors))


def sent_values(bucket: Bucket) -> torch.Tensor:
    """The values the bucket's last encoding sent, before any rounding, in the tensors' dtype:
    its stage when it keeps the snapshot, else its ``send`` buffer (an uncompressed wire; a
    compressed one needs ``make_buckets(..., keep_snapshot=True)``)."""
    return bucket.stage if bucket.snapshot and bucket.stage is not None else bucket.send


@torch.no_grad()
def mix_(tensors: Sequence[torch.Tensor], received: torch.Tensor, weight: float) -> None:
    """Synchronous mixing: ``x <- (1 - w) x + w r`` for each tensor ``x``."""
    if tensors and received.dtype != tensors[0].dtype:
        received = received.to(tensors[0].dtype)
    torch._foreach_lerp_(list(tensors), views(received, tensors), weight)


@torch.no_grad()
def mix_residual_(
    tensors: Sequence[torch.Tensor],
    sent: torch.Tensor,
    received: torch.Tensor,
    weight: float,
    *,
    require_finite: bool = False,
    scratch: torch.Tensor | None = None,
) -> bool:
    """Overlapped mixing: ``x <- x + w (r - s)``; ``sent`` may be overwritten. Returns whether
    it mixed: with ``require_finite``, a NaN or inf in ``s - r`` (so in ``s`` or in ``r``) leaves
    ``tensors`` unchanged and returns False. That one check on the difference stands for checking
    the snapshot and the received buffer apart, at the cost of one pass instead of two.
    ``scratch`` (the bucket's ``stage``): where a bfloat16 or float16 payload's difference is
    computed, instead of a temporary allocated at every call.

    Summed over ranks the changes cancel (every snapshot is sent once and received once), so the
    average is kept even when ``s`` and ``r`` were rounded to a narrower wire dtype."""
    dtype = tensors[0].dtype if tensors else sent.dtype
    # Two passes over memory: s <- s - r, then x <- x - w s. Compressed payloads are subtracted
    # in the parameters' precision, where the difference is exact.
    if sent.dtype == torch.int8:  # decoded as the partner decodes them
        n = sum(t.numel() for t in tensors)
        diff = _quantize.decode(sent, n, dtype).sub_(_quantize.decode(received, n, dtype))
    elif sent.dtype == dtype:
        diff = sent.sub_(received)
    else:  # in the parameters' dtype (scratch, or one temporary)
        diff = _widened_difference(sent, received, dtype, scratch)
    if require_finite and not is_finite(diff):
        return False
    torch._foreach_add_(list(tensors), views(diff, tensors), alpha=-weight)
    return True


@torch.no_grad()
def outer_step_(
    tensors: Sequence[torch.Tensor],
    slow: Sequence[torch.Tensor],
    momentum_buffer: Sequence[torch.Tensor],
    snapshot: torch.Tensor,
    difference: torch.Tensor | None,
    weight: float,
    lr: float,
    momentum: float,
) -> None:
    """The outer step of one exchange, in place on ``tensors`` (the replica ``x``), ``slow`` (its
    slow weights ``phi``) and ``momentum_buffer`` (``u``); NoLoCo's split of the update into a
    momentum step on the replica's own pseudo-gradient and a pull toward the partner:

        d   = phi - s                          this replica's pseudo-gradient
        u  <- mu u + d                         Nesterov, as ``torch.optim.SGD(nesterov=True)``
        phi' = phi - lr (d + mu u) - w (s_wire - r_wire)     the pull: the pair's mean minus s
        x  <- x + (phi' - s)                   the local steps taken since ``s`` are kept
        phi <- phi'

    ``snapshot``: ``s``, the values sent, unrounded (flat, the tensors' dtype); ``difference``:
    ``s - r`` as the wire carried them (flat, the tensors' dtype), ``None`` without a partner
    (no pull). The pull stays out of the momentum and the learning rate: the partner changes at
    every exchange (rotation), so a momentum of past pulls would push toward former partners,
    and an ``lr`` other than 1 would over- or under-shoot the pair's mean (measured: both
    learn less per step, benchmarks/virtual_lm.py). ``slow`` and ``momentum_buffer`` may be
    wider than ``tensors`` (float32 for bfloat16 parameters), where the arithmetic runs. With
    ``lr = 1, mu = 0``, ``phi' = s - w (s - r)`` and this is residual mixing
    ``x <- x + w (r - s)``. Summed over ranks the pulls cancel (each payload is sent once and
    received once, as the wire rounded it), so the mean of the ``phi`` takes exactly one DiLoCo
    outer step on ``mean(phi) - mean(s)`` (with the mean of the ``u``). Temporaries: two the size
    of the tensors (the pseudo-gradient, and ``s`` widened when ``slow`` is wider)."""
    if not tensors:
        return
    sent = [_cast(v, p.dtype) for v, p in zip(views(snapshot, tensors), slow, strict=True)]
    step = torch._foreach_sub(list(slow), sent)  # d = phi - s
    torch._foreach_mul_(list(momentum_buffer), momentum)
    torch._foreach_add_(list(momentum_buffer), step)  # u <- mu u + d
    torch._foreach_add_(step, list(momentum_buffer), alpha=momentum)  # d + mu u
    torch._foreach_add_(list(slow), step, alpha=-lr)
    if difference is not None:
        diffs = [_cast(v, p.dtype) for v, p in zip(views(difference, tensors), slow, strict=True)]
        torch._foreach_add_(list(slow), diffs, alpha=-weight)  # phi'
    torch._foreach_copy_(step, list(slow))
    torch._foreach_sub_(step, sent)  # phi' - s
    back = [_cast(v, t.dtype) for v, t in zip(step, tensors, strict=True)]
    torch._foreach_add_(list(tensors), back)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@torch.no_grad()
def difference(
    sent: torch.Tensor, received: torch.Tensor, dtype: torch.dtype, numel: int
) -> torch.Tensor:
    """A new tensor ``s - r`` in ``dtype`` (``numel`` elements), decoded as ``mix_residual_``
    decodes them, leaving both buffers as they are (to save an exchange in flight)."""
    if sent.dtype == torch.int8:
        return _quantize.decode(sent, numel, dtype).sub_(_quantize.decode(received, numel, dtype))
    return sent.to(dtype, copy=True).sub_(received.to(dtype))


# Elements widened at a time by ``_widened_difference`` (1 MiB of float32: stays in cache).
_WIDEN_CHUNK = 1 << 18


def _widened_difference(
    sent: torch.Tensor, received: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    """``s - r`` in ``dtype`` for payloads of a narrower dtype, in ``out`` if given. On CPU a
    mixed-dtype subtraction over a whole buffer runs 3-4x slower than widening ``r`` a cache-sized
    chunk at a time and subtracting in ``dtype`` (same values, bit for bit)."""
    diff = sent.to(dtype) if out is None else out.copy_(sent)
    if sent.device.type != "cpu":
        return diff.sub_(received)
    n = diff.numel()
    chunk = torch.empty(min(n, _WIDEN_CHUNK), dtype=dtype)
    for i in range(0, n, _WIDEN_CHUNK):
        j = min(n, i + _WIDEN_CHUNK)
        diff[i:j].sub_(chunk[: j - i].copy_(received[i:j]))
    return diff


def delayed_weight(weight: float, delay: int) -> float:
    """The mixing weight for an exchange mixed ``delay`` steps late (``max_staleness``).

    Residual mixing ``x <- x + w (r - s)`` with ``s``, ``r`` taken ``d`` steps ago pulls each
    pair's difference as ``e(t + 1) = e(t) - 2w e(t - d)``, which diverges for ``w = 1/2`` and
    ``d >= 2`` (stable iff ``2w < 2 cos(d pi / (2d + 1))``, Levin and May 1976). Scaling ``w``
    by ``cos(d pi / (2d + 1))`` keeps half of that margin: ``1/2`` at ``d = 0``, ``1/4`` at 1,
    ``0.15`` at 2, ``0.09`` at 4. The average is kept whatever the weight."""
    return weight * math.cos(delay * math.pi / (2 * delay + 1))


def tracked_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The parameters gradient tracking follows: floating-point ones that require grad."""
    return [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]


def is_finite(flat: torch.Tensor) -> bool:
    """True when ``flat`` has no NaN or inf (one reduction; accumulates in float32 at least)."""
    if flat.is_complex():
        flat = torch.view_as_real(flat)
    acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(flat.sum(dtype=acc)))

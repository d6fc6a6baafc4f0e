"""Point-to-point exchange of flat buffers with one partner, on torch.distributed.

gloo: plain ``isend``/``irecv`` with a per-step tag (``batch_isend_irecv`` is a loop of the same
calls on gloo and has been reported to hang). NCCL ignores tags and matches by call order, so there
the pair goes through ``batch_isend_irecv``, which groups the send and the receive into one NCCL
call and cannot deadlock on the order of the two.

The functions are looked up on ``torch.distributed`` at call time, so tests can wrap them to count
traffic and record the order of calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gossipgrad.errors import PeerError

# A gloo tag (31 bits) = salt (7 bits) | step mod 4096 (12 bits) | bucket (12 bits): messages of
# nearby steps never match each other, nor messages packed from different replica layouts (the
# salt). Other users of point-to-point (the sampler) use a group of their own.
_SALT_BITS, _STEP_BITS, _BUCKET_BITS = 7, 12, 12


@dataclass
class InFlight:
    """The works of one step's exchange, with what is needed to explain a failure."""

    works: list[tuple[dist.Work, str, int]]  # (work, "send to" | "receive from", group rank)
    step: int
    done: bool = False
    where: str = ""  # how errors name the exchange ("exchange 3 (step 5)"); default "step N"

    def wait(self, timeout: timedelta, rank: int) -> None:
        """Complete every work (once: a gloo receive waited twice blocks until the timeout)."""
        if self.done:
            return
        self.done = True
        for work, what, peer in self.works:
            try:
                ok = work.wait(timeout)
            except RuntimeError as exc:
                raise PeerError(_explain(exc, what, peer, rank, self.label, timeout), peer) from exc
            if ok is False:  # some backends report a timeout by returning False
                raise PeerError(_explain(None, what, peer, rank, self.label, timeout), peer)

    @property
    def label(self) -> str:
        return self.where or f"step {self.step}"


def start(
    sends: list[torch.Tensor],
    recvs: list[torch.Tensor],
    send_to: int | None,
    recv_from: int | None,
    step: int,
    group: dist.ProcessGroup,
    streams: list[dist.ProcessGroup] | None = None,
    index: int = 0,
    salt: int = 0,
    where: str = "",
) -> InFlight:
    """Start sending each of ``sends`` to ``send_to`` and receiving ``recvs`` from ``recv_from``
    (group ranks; ``None`` for no message). Returns at once; ``InFlight.wait`` completes it.

    ``streams``: groups with the same ranks as ``group`` (each has its own connections, so its own
    TCP stream per pair on gloo); buffer ``b`` travels on ``streams[(index + b) % len(streams)]``.
    ``index``: the position of ``sends[0]`` among the step's buffers, when a step's buffers are
    started one call at a time (it keeps their tags apart). ``salt`` (< 128): messages posted with
    different salts never match (gloo). ``where``: how errors name the exchange."""
    if index + len(sends) > 1 << _BUCKET_BITS:
        raise ValueError(f"at most {1 << _BUCKET_BITS} buffers per exchange, got {len(sends)}")
    lanes = streams or [group]
    dst = None if send_to is None else dist.get_global_rank(group, send_to)
    src = None if recv_from is None else dist.get_global_rank(group, recv_from)
    works: list[tuple[dist.Work, str, int]] = []
    if dist.get_backend(group) == "nccl":
        ops = []
        for s, r in zip(sends, recvs, strict=True):
            if dst is not None:
                ops.append(dist.P2POp(dist.isend, s, dst, group))
            if src is not None:
                ops.append(dist.P2POp(dist.irecv, r, src, group))
        if ops:
            peer = send_to if send_to is not None else recv_from
            assert peer is not None
            works = [(w, "exchange with", peer) for w in dist.batch_isend_irecv(ops)]
        return InFlight(works, step, where=where)
    base = ((salt % (1 << _SALT_BITS)) << (_STEP_BITS + _BUCKET_BITS)) | (
        (step % (1 << _STEP_BITS)) << _BUCKET_BITS
    )
    for b, (s, r) in enumerate(zip(sends, recvs, strict=True), start=index):
        lane = lanes[b % len(lanes)]
        posts: list[tuple[Callable[..., dist.Work | None], torch.Tensor, int, str, int]] = []
        if src is not None and recv_from is not None:
            posts.append((dist.irecv, r, src, "receive from", recv_from))
        if dst is not None and send_to is not None:
            posts.append((dist.isend, s, dst, "send to", send_to))
        for post, tensor, peer_global, what, peer in posts:
            try:
                work = post(tensor, peer_global, group=lane, tag=base + b)
            except RuntimeError as exc:  # the connection was already gone
                rank = dist.get_rank(group)
                label = where or f"step {step}"
                raise PeerError(_explain(exc, what, peer, rank, label, None), peer) from exc
            assert work is not None, "a lane holds both ranks of every exchange"
            works.append((work, what, peer))
    return InFlight(works, step, where=where)


def _explain(
    exc: Exception | None, what: str, peer: int, rank: int, where: str, timeout: timedelta | None
) -> str:
    cause = f" ({exc})" if exc is not None else ""
    text = str(exc or "").lower()
    if timeout is not None and ("timeout" in text or "timed out" in text or exc is None):
        why = f"rank {peer} did not answer within {timeout.total_seconds():.0f} s"
        fix = (
            f"check that rank {peer} is alive and at the same step, and that both ranks' models "
            "have the same tensors (a buffer created or resized on some ranks only never "
            "matches); raise the timeout (timeout=... / --timeout-s) if its steps are "
            "legitimately that slow"
        )
    else:
        why = f"the connection to rank {peer} broke, so rank {peer} has probably died"
        fix = f"look at rank {peer}'s log for the cause; restart from the last checkpoint"
    return (
        f"gossip exchange failed on rank {rank} at {where}: could not {what} rank {peer}: "
        f"{why}. Fix: {fix}.{cause}"
    )

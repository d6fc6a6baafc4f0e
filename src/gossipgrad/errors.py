"""Errors raised by gossipgrad. Each message says what went wrong and how to fix it."""

from __future__ import annotations


class GossipError(RuntimeError):
    """Base class of gossipgrad's runtime errors."""


class PeerError(GossipError):
    """A gossip partner did not answer in time, or its connection broke (it probably died)."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


class NonFiniteError(GossipError):
    """NaN or inf found in local or received parameters (training diverged). ``source`` is the
    rank the bad values came from (``None``: this rank's own parameters), ``step`` the gossip
    exchange where they were found."""

    def __init__(self, message: str, source: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.step = step

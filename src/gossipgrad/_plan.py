"""What one rank does in one step (``Exchange``) and the seeded permutation that rotates partners.

The building blocks every schedule shares (``gossipgrad.schedule``, ``gossipgrad._exact``); pure,
no torch.distributed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Exchange:
    """One rank's part of one step: where its message goes, where its input comes from, and the
    weight given to the received replica when mixing (``x <- (1 - weight) x + weight x_recv``)."""

    send_to: int | None
    recv_from: int | None
    weight: float = 0.5


@lru_cache(maxsize=64)
def permutation(world_size: int, seed: int, rnd: int) -> tuple[int, ...]:
    # Seeded from a string, which random.Random hashes deterministically (SHA-512), so the
    # permutation is the same on every rank, machine and Python version.
    perm = list(range(world_size))
    random.Random(f"gossipgrad:{seed}:{rnd}").shuffle(perm)
    return tuple(perm)

"""A rank killed mid-training: every other rank stops with an error naming it, never hangs."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch
from _dist import run_world
from torch import nn

from gossipgrad import GossipDataParallel, PeerError


def _train_until_rank_1_dies(rank: int, world: int, sync: bool) -> tuple[float, str]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    model = GossipDataParallel(module, sync=sync, timeout=timedelta(seconds=50))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    started = time.monotonic()
    try:
        for step in range(10_000):
            if rank == 1 and step == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        model.flush()
    except PeerError as exc:
        return time.monotonic() - started, str(exc)
    return time.monotonic() - started, "finished without noticing"


@pytest.mark.parametrize("sync", [False, True])
def test_survivors_name_the_killed_rank_within_60_s(sync: bool) -> None:
    results = run_world(_train_until_rank_1_dies, 3, sync, timeout=90, may_die=(1,))
    assert results[1] is None, "rank 1 was killed"
    for rank in (0, 2):
        elapsed, message = results[rank]
        assert elapsed < 60, f"rank {rank} took {elapsed:.0f} s"
        assert "gossip exchange failed" in message, message
        lost = "rank 1" in message.split("[")[0] or "first loss in this job: rank 1" in message
        assert lost, f"rank {rank} does not name rank 1: {message}"

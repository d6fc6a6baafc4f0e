"""A user model for tests/train/test_elastic_launch.py: the first worker process to claim the
flag file (``GOSSIPGRAD_TEST_DIE_FLAG``) SIGKILLs itself at its 20th forward; every other one,
restarted ones included, trains normally. Each forward takes at least 40 ms, so that the run
lasts long enough for the restarted worker to join it."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from torch import nn


class _DiesOnce(nn.Module):
    def __init__(self, doomed: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.doomed, self.calls = doomed, 0

    def forward(self, x: Any) -> Any:
        self.calls += 1
        if self.doomed and self.calls == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.04)
        return self.net(x)


def build(info: Any) -> nn.Module:
    try:
        os.close(os.open(os.environ["GOSSIPGRAD_TEST_DIE_FLAG"], os.O_CREAT | os.O_EXCL))
        doomed = True
    except FileExistsError:
        doomed = False
    return _DiesOnce(doomed)

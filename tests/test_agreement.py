"""Options that differ between ranks are named when wrapping (issue 26, case 3): every engine
option (``GossipOptions``: the schedule's inputs among them) and the DDP keywords that change what
is exchanged, in ``GossipDataParallel`` and ``HierarchicalDataParallel``, in the one gather that
wrapping already makes; only ``timeout`` may differ. Also through ``gossipgrad.train``'s worker
under torchrun, with one rank given ``--gossip-every 4``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from _dist import run_world
from _toy import Recorder, toy_model

from gossipgrad import GossipDataParallel, HierarchicalDataParallel, _setup
from gossipgrad._setup import MAY_DIFFER
from gossipgrad.options import GossipOptions

# A valid value other than the default, for every option that must agree
OTHER: dict[str, Any] = {
    "sync": True,
    "mode": "gradients",
    "schedule": "ring",
    "seed": 7,
    "bucket_cap_mb": 1.0,
    "on_nonfinite": "skip",
    "wire_dtype": torch.bfloat16,
    "streams": 2,
    "gossip_every": 4,
    "average_every": 3,
    "tracking": True,
    "max_staleness": 2,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
}


def _wrap_error(make: Any) -> str:
    try:
        model = make()
    except ValueError as exc:
        return str(exc)
    model.close()
    return "no error"


def _each_option_on_rank_1(rank: int, world: int) -> dict[str, str]:
    """Rank 1 alone passes another value of each option in turn (ranks stay in step: every
    rank raises at the same gather)."""
    messages = {}
    for name, value in OTHER.items():
        given = {name: value} if rank == 1 else {}
        messages[name] = _wrap_error(lambda given=given: GossipDataParallel(toy_model(), **given))
    return messages


def test_every_option_must_agree_and_is_named_with_each_ranks_value() -> None:
    assert set(OTHER) == set(GossipOptions.names()) - MAY_DIFFER  # a new option is checked too
    defaults = GossipOptions()
    for messages in run_world(_each_option_on_rank_1, 3):
        for name, value in OTHER.items():
            message = messages[name]
            default = _setup._shown(getattr(defaults, name))
            mine = f"{name}: {default} on ranks 0 and 2, {_setup._shown(value)} on rank 1"
            assert "the ranks were given different options" in message, message
            assert mine in message, message


def _several_at_once(rank: int, world: int) -> str:
    given = {"gossip_every": 2 + rank, "seed": rank, "init_sync": rank == 0}
    return _wrap_error(lambda: GossipDataParallel(toy_model(), **given))


def test_all_differing_options_are_named_in_one_line() -> None:
    for message in run_world(_several_at_once, 2):
        assert "\n" not in message
        assert "seed: 0 on rank 0, 1 on rank 1" in message, message
        assert "gossip_every: 2 on rank 0, 3 on rank 1" in message, message
        assert "init_sync: True on rank 0, False on rank 1" in message, message
        assert "only timeout may differ" in message, message


def _timeouts_differ(rank: int, world: int) -> tuple[int, str]:
    model = GossipDataParallel(toy_model(), timeout=timedelta(seconds=30 + rank))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    model.close()
    given = {"init_sync": True, "bucket_cap_mb": 25} if rank == 0 else {"bucket_cap_mb": 25.0}
    return model.step, _wrap_error(lambda: GossipDataParallel(toy_model(), **given))


def test_timeout_may_differ_and_a_default_given_explicitly_agrees() -> None:
    for steps, message in run_world(_timeouts_differ, 2):
        assert steps == 1
        assert message == "no error"  # init_sync=True equals leaving it out; 25 equals 25.0


def _gathers_when_wrapping(rank: int, world: int) -> int:
    events: list[tuple] = []
    with Recorder(events):
        GossipDataParallel(toy_model(), gossip_every=2).close()
    return sum(e[0] == "all_gather_object" for e in events)


def test_the_check_reuses_the_one_gather_of_wrapping() -> None:
    assert run_world(_gathers_when_wrapping, 2) == [1, 1]


def _hierarchical(rank: int, world: int) -> list[str]:
    messages = []
    for per_node in (1, 2):  # two nodes of one rank, one node of two ranks
        given = {"gossip_every": 4} if rank == 1 else {}
        messages.append(
            _wrap_error(
                lambda per_node=per_node, given=given: HierarchicalDataParallel(
                    toy_model(), ranks_per_node=per_node, **given
                )
            )
        )
    given = {"find_unused_parameters": True} if rank == 1 else {}
    messages.append(
        _wrap_error(lambda: HierarchicalDataParallel(toy_model(), ranks_per_node=2, **given))
    )
    return messages


def test_hierarchical_names_options_that_differ_on_any_rank() -> None:
    for messages in run_world(_hierarchical, 2):
        assert "gossip_every: 1 on rank 0, 4 on rank 1" in messages[0], messages[0]
        assert "gossip_every: 1 on rank 0, 4 on rank 1" in messages[1], messages[1]
        assert "find_unused_parameters: False on rank 0, True on rank 1" in messages[2]


_ONE_RANK_DIFFERS = """
import os, sys
from gossipgrad.train.worker import main
main(sys.argv[1:] + (["--gossip-every", "4"] if os.environ["RANK"] == "1" else []))
"""


def test_torchrun_job_names_the_option_one_rank_was_given(tmp_path: Path) -> None:
    # issue 26 case 3: this waited 25 s for "rank 1 did not answer within 15 s", rank 1 alive
    script = tmp_path / "one_rank_differs.py"
    script.write_text(_ONE_RANK_DIFFERS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    launcher += ["--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", "127.0.0.1:0", str(script)]
    job = ["--algo", "gossip", "--dataset", "digits", "--model", "mlp", "--batch-size", "8"]
    job += ["--max-steps", "5", "--quiet", "--timeout-s", "15", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    done = subprocess.run(launcher + job, env=env, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - began
    assert done.returncode != 0, done.stderr[-3000:]
    assert "gossip_every: 1 on rank 0, 4 on rank 1" in done.stderr, done.stderr[-3000:]
    assert "did not answer" not in done.stderr, done.stderr[-3000:]
    assert took < 15 + 60, f"{took:.0f} s"  # named when wrapping, not after a timeout

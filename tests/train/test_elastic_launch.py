"""``gossipgrad train --elastic``: one worker is SIGKILLed mid-run, the others go on, its agent
restarts it and it joins back from a live peer; flags it does not take answer in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_COMMAND = [sys.executable, "-m", "gossipgrad.train.cli", "train", "--elastic", "--algo", "gossip"]


def _run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "GOSSIPGRAD_TEST_DIE_FLAG": str(tmp_path / "died"),
    }
    return subprocess.run(
        [*_COMMAND, "--out", str(tmp_path / "out"), "--timeout-s", "20", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )


def test_a_killed_worker_is_restarted_and_joins_while_the_others_go_on(tmp_path: Path) -> None:
    done = _run(tmp_path, "--nproc", "3", "--max-restarts", "1", "--max-steps", "250",
                "--model", "_dies_once:build")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "died").exists(), "no worker was killed: the test proves nothing"
    summary = json.loads((tmp_path / "out" / "gossip-elastic" / "summary.json").read_text())
    assert summary["steps"] == 250 and summary["world_size"] == 3, summary
    sizes = [change["world_size"] for change in summary["changes"]]
    assert sizes[:1] == [2] and 3 in sizes, summary["changes"]  # left, then joined back
    assert summary["accuracy"] > 0.5, summary


def test_flags_it_does_not_take_answer_in_one_line(tmp_path: Path) -> None:
    done = _run(tmp_path, "--checkpoint-every", "5")
    assert done.returncode == 2
    assert done.stderr.strip() == "gossipgrad: error: --elastic does not take --checkpoint-every 5"

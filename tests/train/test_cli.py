"""`gossipgrad train` end to end at p = 2 through torch's elastic launcher, and its errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gossipgrad.train import cli, worker
from gossipgrad.train.data import DatasetInfo

_SMALL = ["--nproc", "2", "--epochs", "1", "--max-steps", "12", "--quiet"]
_SMALL += ["--log-every", "4", "--consensus-every", "4"]


def test_train_both_algorithms_end_to_end(tmp_path: Path, capsys) -> None:
    assert cli.main(["train", *_SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("digits, mlp, 2 ranks") :]
    assert "gossip" in table and "all-reduce" in table
    for row in ("test accuracy (averaged model)", "wall time", "bytes sent / rank / step"):
        assert row in table
    assert "consensus distance" in table
    for name in ("report.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"gossip", "allreduce"}
    for algo in ("gossip", "allreduce"):
        run = tmp_path / algo
        model = torch.load(run / "model.pt", weights_only=True)
        assert model["1.weight"].shape == (128, 64)
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # steps 4, 8, 12
        assert summary["runs"][algo]["steps"] == 12


def crashing_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP whose rank 1 dies at its 8th forward in the first attempt of an elastic run."""

    class _Crashing(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            first = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
            if first and os.environ.get("RANK") == "1" and self.training and self.calls == 8:
                os._exit(17)  # as abrupt as a killed process
            return super().forward(x)

    return _Crashing(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes))


def test_restarted_workers_resume_from_the_last_checkpoint(tmp_path: Path) -> None:
    argv = [*_SMALL, "--algo", "gossip", "--checkpoint-every", "5", "--resume", "auto"]
    argv += ["--max-restarts", "1", "--model", f"{__file__}:crashing_mlp"]
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gossip" / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["resumed_from"].endswith("step_00000005")


def test_worker_failure_is_reported_in_a_line(tmp_path: Path, capsys) -> None:
    argv = [*_SMALL, "--algo", "allreduce", "--resume", str(tmp_path / "nothing")]
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    # every rank fails the same way; whichever the launcher reports first is named
    expected = r"gossipgrad: error: allreduce run failed: rank \d: CheckpointError: --resume"
    assert re.search(expected, err), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "gossipgrad: error: --lr must be > 0, got -1\n"),
        (["--dataset", "mnist"], "gossipgrad: error: --dataset must be one of digits, pytext"),
        (["--model", "gpt"], "gossipgrad: error: --model gpt: model 'gpt' is for lm data"),
        (["--config", "TOML"], "gossipgrad: error: --config: unknown key 'learning_rate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys, argv, message) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("learning_rate = 0.1\n")
    argv = [str(toml) if a == "TOML" else a for a in argv]
    try:
        status = cli.main(["train", *argv])
    except SystemExit as exit:
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_commands_and_help(capsys) -> None:
    assert cli.main([]) == 2
    assert cli.main(["fly"]) == 2
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "--batch-size BATCH_SIZE" in text and "(default: 32)" in text


def test_console_script_and_worker_module(capsys) -> None:
    script = Path(sys.executable).with_name("gossipgrad")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gossipgrad.train.cli"]
    done = subprocess.run([*command, "train", "--lr", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "gossipgrad: error: --lr must be > 0, got 0\n"
    with pytest.raises(SystemExit) as exit:
        worker.main(["--help"])  # what `python -m gossipgrad.train --help` runs
    assert exit.value.code == 0
    assert "usage: python -m gossipgrad.train" in capsys.readouterr().out


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))  # no packet is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_rendezvous_and_worker_stores_listen_on_loopback_only(monkeypatch) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to probe")
    with cli._loopback_store(5.0) as port:
        assert socket.socket().connect_ex(("127.0.0.1", port)) == 0
        assert socket.socket().connect_ex((outside, port)) != 0
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    store = worker._elastic_store(0, 1, __import__("datetime").timedelta(seconds=5))
    assert socket.socket().connect_ex(("127.0.0.1", port)) == 0
    assert socket.socket().connect_ex((outside, port)) != 0
    del store

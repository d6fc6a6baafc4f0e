"""`gossipgrad train` end to end at p = 2 through torch's elastic launcher, its errors and the
checks made before any worker starts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from gossipgrad.train import cli, launch, worker
from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.lock import run_lock

_SMALL = ["--nproc", "2", "--epochs", "1", "--max-steps", "12", "--quiet"]
_SMALL += ["--log-every", "4", "--consensus-every", "4"]


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch) -> Path:
    """A temporary folder of its own for what the launcher writes there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_train_both_algorithms_end_to_end(tmp_path: Path, temp_dir: Path, capsys) -> None:
    assert cli.main(["train", *_SMALL, "--out", str(tmp_path / "run")]) == 0
    assert list(temp_dir.iterdir()) == []  # the launcher's log folders are gone
    tmp_path = tmp_path / "run"
    out = capsys.readouterr().out
    table = out[out.index("digits, mlp, 2 ranks") :]
    assert "gossip" in table and "all-reduce" in table
    rows = ("test accuracy (averaged model)", "training time", "bytes sent / rank / step")
    rows += ("messages / rank / step", "rounds of latency / step", "benchmarks/network_bench.py")
    for row in rows:
        assert row in table
    assert "1 send + 1 recv" in table and "2 (2(p-1))" in table
    assert "consensus distance" in table
    assert "wall time" in out and "of which training" in out
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


def failing_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP whose rank 1 raises at its 3rd training forward (rank 0 then loses its partner)."""

    class _Failing(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if os.environ.get("RANK") == "1" and self.training and self.calls == 3:
                raise ValueError("rank 1's own model broke")
            return super().forward(x)

    return _Failing(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes))


def nan_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP whose rank 1 outputs NaN from its 3rd training forward on (its loss turns NaN)."""

    class _Diverging(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            if os.environ.get("RANK") == "1" and self.calls >= 3:
                x = x * float("nan")
            return super().forward(x)

    return _Diverging(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes))


def full_disk_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP on a rank 1 whose disk is full: its checkpoint writes fail with ENOSPC."""
    import errno

    import torch.distributed.checkpoint as dcp

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    if os.environ.get("RANK") == "1":
        dcp.FileSystemWriter.write_data = full
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes)
    )


@pytest.mark.parametrize(
    ("model", "extra", "cause"),
    [
        ("failing_mlp", [], "rank 1: ValueError: rank 1's own model broke"),
        ("failing_mlp", ["--sync"], "rank 1: ValueError: rank 1's own model broke"),
        ("nan_mlp", [], "rank 1: NonFiniteError: rank 1 found NaN or inf in its own parameters"),
        (
            "full_disk_mlp",
            ["--checkpoint-every", "4"],
            "OSError: [Errno 28] No space left on device",
        ),
    ],
)
def test_the_error_names_the_rank_whose_own_code_failed(
    tmp_path: Path, temp_dir: Path, capsys, model: str, extra: list[str], cause: str
) -> None:
    argv = [*_SMALL, "--algo", "gossip", "--model", f"{__file__}:{model}", *extra]
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gossipgrad: error: gossip run failed: rank "), err
    assert cause in err and err.count("\n") == 1, err
    logs = re.search(r"\(worker log: (\S+)\)", err)
    assert logs and Path(logs.group(1)).is_file(), err  # kept after a failure, and named


def killed_rank_0_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP whose rank 0 (the host of the workers' store) is SIGKILLed at its 5th forward."""

    class _Killed(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            if os.environ.get("RANK") == "0" and self.calls == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().forward(x)

    return _Killed(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes))


def test_a_killed_rank_is_named(tmp_path: Path, temp_dir, capsys) -> None:
    argv = [*_SMALL, "--nproc", "3", "--algo", "gossip", "--model", f"{__file__}:killed_rank_0_mlp"]
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "gossipgrad: error: gossip run failed: rank 0: killed by SIGKILL\n"


def test_a_killed_store_host_prints_no_cpp_stack_traces(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    argv = [*_SMALL, "--nproc", "3", "--algo", "gossip", "--model", f"{__file__}:killed_rank_0_mlp"]
    command = [sys.executable, "-m", "gossipgrad.train.cli", "train", *argv, "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "rank 0: killed by SIGKILL" in done.stderr
    assert "frame #" not in done.stderr and "Exception raised from" not in done.stderr


def test_checks_before_launch_exit_2_in_one_line(tmp_path: Path, capsys) -> None:
    cases = [
        (["--algo", "gossip", "--schedule", "hypercube", "--nproc", "3"], "--schedule hypercube"),
        (["--resume", str(tmp_path / "missing")], "no such file or folder"),
        (["--wire-dtype", "int8", "--mode", "gradients"], "needs mode='params'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device"))
    for argv, message in cases:
        out = tmp_path / "run"
        assert cli.main(["train", *argv, "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gossipgrad: error: {argv[0]} ") or message in err, err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()  # no worker started


def test_a_second_run_on_the_same_folder_exits_at_once(tmp_path: Path, capsys) -> None:
    with run_lock(tmp_path):
        assert cli.main(["train", *_SMALL, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gossipgrad: error: {tmp_path} is in use by another run (pid {os.getpid()}): wait for "
        "it to finish, or choose another --out\n"
    )
    assert not (tmp_path / "gossip").exists()


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


def _accepts(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex((address, port)) == 0


def test_rendezvous_and_worker_stores_listen_on_loopback_only(monkeypatch) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to probe")
    with launch.loopback_store(5.0) as (_, port):
        assert _accepts("127.0.0.1", port)
        assert not _accepts(outside, port)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    store = worker.elastic_store(0, 1, timedelta(seconds=5))
    assert _accepts("127.0.0.1", port)
    assert not _accepts(outside, port)
    del store

"""The run folder through the real CLI: a folder that cannot be used, links planted in it, files of
an earlier run that are damaged, and bad input each end in one line (exit 2) or a one-line warning,
never a traceback, and nothing is written through a link (issue 26, cases 4, 5, 7 and 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gossipgrad.train import cli

_TINY = ["--nproc", "2", "--dataset", "digits", "--model", "mlp", "--batch-size", "8"]
_TINY += ["--epochs", "1", "--max-steps", "4", "--log-every", "2", "--consensus-every", "2"]
_TINY += ["--quiet"]
_GOSSIP = ["--algo", "gossip", *_TINY]


@pytest.fixture(autouse=True)
def temp_dir(tmp_path: Path, monkeypatch) -> Path:
    """A temporary folder of its own for what the launcher writes there."""
    folder = tmp_path / "launcher-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _train(argv: list[str]) -> int:
    """``gossipgrad train ARGV``'s exit status, whether returned or raised by argparse."""
    try:
        return cli.main(["train", *argv])
    except SystemExit as exit:
        return int(exit.code or 0)


def _one_error_line(err: str) -> str:
    assert err.startswith("gossipgrad: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- case 4: an --out that cannot be used ---------------------------------------------------------


@pytest.mark.parametrize(
    ("make_out", "reason"),
    [
        (lambda tmp: tmp / "a-file", "exists and is not a folder"),
        (lambda tmp: tmp / "a-file" / "run", "a part of it is a file, not a folder"),
        (lambda tmp: tmp / ("x" * 300), "file name too long (a name of 300 bytes"),
    ],
    ids=["existing-file", "under-a-file", "name-too-long"],
)
def test_an_out_that_cannot_be_used_exits_2_in_one_line(
    tmp_path: Path, capsys, make_out, reason: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder\n")
    out = make_out(tmp_path)
    assert _train([*_GOSSIP, "--out", str(out)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"'{out}" in err and reason in err and err.endswith("; choose another --out\n"), err
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def _can_mount_in_a_namespace() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "ro,size=64k", "none", "/mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _can_mount_in_a_namespace(),
    reason="needs root and `unshare -m` to mount a read-only tmpfs in a private mount namespace "
    "(chmod does not stop root from writing)",
)
def test_an_out_on_a_read_only_file_system_exits_2_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    out = folder / "run"
    train = [sys.executable, "-m", "gossipgrad.train.cli", "train", *_GOSSIP, "--out", str(out)]
    script = 'mount -t tmpfs -o ro,size=64k none "$1" || exit 99; shift; exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *train]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"gossipgrad: error: '{out}': is on a read-only file system; choose another --out\n"
    )


# --- case 5: links planted in the run folder ------------------------------------------------------


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_a_link_planted_at_the_lock_is_refused(tmp_path: Path, capsys, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    if kind == "symbolic":
        (out / ".lock").symlink_to(outside)
    else:
        os.link(outside, out / ".lock")
    assert _train([*_GOSSIP, "--out", str(out)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"'{out / '.lock'}': is a {kind} link" in err, err
    assert err.endswith("; remove it, or choose another --out\n"), err
    assert outside.read_text() == "precious\n"
    assert not (out / "gossip").exists()  # no worker started


def test_links_planted_in_the_run_folder_are_replaced_not_written_through(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    (out / "gossip").mkdir(parents=True)
    planted = ["gossip/metrics.jsonl", "gossip/summary.json", "report.png", "summary.json"]
    for name in [*planted, "gossip/model.pt"]:
        outside = tmp_path / f"outside-{name.replace('/', '-')}"
        outside.write_text("precious\n")
        (out / name).symlink_to(outside)
    assert _train([*_GOSSIP, "--out", str(out)]) == 0, capsys.readouterr().err
    for name in planted:
        assert (tmp_path / f"outside-{name.replace('/', '-')}").read_text() == "precious\n", name
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert len((out / "gossip" / "metrics.jsonl").read_text().splitlines()) == 2  # steps 2, 4
    assert not list(out.rglob(".*.tmp"))  # no temporary file left
    assert (tmp_path / "outside-gossip-model.pt").read_bytes() == b"precious\n"
    assert not (out / "gossip" / "model.pt").is_symlink()


# --- case 7: damaged files of an earlier run in the same --out ----------------------------------


def _earlier_summary() -> dict[str, object]:
    """A finished gossip run's summary, as far as the comparison table reads it."""
    numbers = ("test_accuracy", "test_loss", "train_time_s", "bytes_per_rank_per_step")
    numbers += ("consensus_distance", "samples_per_s")
    texts = {"algo": "gossip", "dataset": "digits", "model": "mlp"}
    return {**texts, "world_size": 2, "steps": 4, **dict.fromkeys(numbers, 0.5)}


def test_damaged_files_of_an_earlier_run_are_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for algo in ("gossip", "hierarchical"):
        (out / algo).mkdir(parents=True)
    (out / "gossip" / "summary.json").write_text(json.dumps(_earlier_summary()))
    line = json.dumps({"step": 2, "time": 0.1, "loss": 1.0})
    (out / "gossip" / "metrics.jsonl").write_text(f'{line}\n{{"step": 4, "ti')  # disk full
    (out / "hierarchical" / "summary.json").write_text('{"algo": "hier')  # truncated
    assert _train(["--algo", "allreduce", *_TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err, err
    hierarchical, gossip = err.splitlines()
    summary = out / "hierarchical" / "summary.json"
    assert hierarchical.startswith(f"gossipgrad: warning: '{summary}' is not valid JSON: ")
    assert hierarchical.endswith("; skipped")
    metrics = out / "gossip" / "metrics.jsonl"
    warning = f"gossipgrad: warning: '{metrics}' has 1 damaged line, skipped (line 2: "
    assert gossip.startswith(warning), gossip
    report = json.loads((out / "summary.json").read_text())
    assert list(report["runs"]) == ["gossip", "allreduce"]


# --- case 8: bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--config", "NOT-UTF-8"],
            "is not UTF-8 text (byte 0xe9 at offset 5): save it as UTF-8\n",
        ),
        (
            ["--nproc", "99999999999999999999"],
            "--nproc must be in [1, 1024] (worker processes on this machine), got "
            "99999999999999999999: for more ranks, start workers on several machines with "
            "torchrun\n",
        ),
        (["--nproc", "100000000"], "--nproc must be in [1, 1024]"),
    ],
    ids=["config-not-utf8", "nproc-overflow", "nproc-too-many"],
)
def test_bad_input_exits_2_in_one_line(tmp_path: Path, capsys, argv, message) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("# café\nlr = 0.1\n".encode("latin-1"))  # not UTF-8
    argv = [str(config) if a == "NOT-UTF-8" else a for a in argv]
    out = tmp_path / "run"
    assert _train([*argv, "--quiet", "--out", str(out)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert message in err, err
    assert not out.exists()

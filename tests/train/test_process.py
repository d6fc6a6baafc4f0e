"""`gossipgrad` as a process, the way a user runs it: in a clean environment, stopped by SIGTERM
or Ctrl-C, and answering --help, --version and bad options without importing torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gossipgrad

_SCRIPT = Path(sys.executable).with_name("gossipgrad")
_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gossipgrad.train.cli"]
_SHORT = ["--algo", "gossip", "--epochs", "1", "--max-steps", "5", "--quiet"]


def _clean_env() -> dict[str, str]:
    """This environment without the thread settings a user would not have set."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.parametrize("nproc", [1, 2])
def test_any_worker_count_runs_without_omp_num_threads(tmp_path: Path, nproc: int) -> None:
    # --nproc 1 used to hang for ever in an OpenMP futex inherited across fork
    argv = [*_COMMAND, "train", *_SHORT, "--nproc", str(nproc), "--out", str(tmp_path)]
    done = subprocess.run(argv, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "gossip" / "model.pt").is_file()


def _start_long_run(out: Path) -> subprocess.Popen[str]:
    argv = [*_COMMAND, "train", "--algo", "gossip", "--nproc", "2", "--epochs", "200"]
    argv += ["--quiet", "--log-every", "1", "--out", str(out)]
    run = subprocess.Popen(
        argv,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = out / "gossip" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.stat().st_size) and run.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    return run


@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_ends_the_run_with_128_plus_its_number_and_no_traceback(
    tmp_path: Path, signum: int, status: int, said: str
) -> None:
    run = _start_long_run(tmp_path)
    if signum == signal.SIGINT:
        os.killpg(run.pid, signum)  # Ctrl-C reaches the whole foreground process group
    else:
        run.send_signal(signum)  # what a scheduler sends to the command it started
    try:
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == status, err
    assert said in err and "Traceback" not in err, err


_FAST_PATH = """
import sys, time, types
began = time.perf_counter()
package = types.ModuleType("gossipgrad")
package.__path__ = [{package!r}]
sys.modules["gossipgrad"] = package  # without the core's __init__, which imports torch
from gossipgrad.train import cli
for argv in {cases!r}:
    try:
        status = cli.main(argv)
    except SystemExit as exit:
        status = exit.code
    print(status, flush=True)
print("torch" in sys.modules, round(time.perf_counter() - began, 3), file=sys.stderr)
"""
_CASES = [["--version"], ["train", "--help"], ["train", "--algo", "foo"], ["train", "--lr", "0"]]
_CASES += [["train", "--nproc", "3", "--schedule", "hypercube"]]  # a schedule that does not fit


def test_help_version_and_option_errors_import_no_torch() -> None:
    code = _FAST_PATH.format(package=str(Path(gossipgrad.__file__).parent), cases=_CASES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    statuses = [line for line in done.stdout.splitlines() if line in ("0", "2")]
    assert statuses == ["0", "0", "2", "2", "2"], done.stdout
    loaded_torch, _seconds = done.stderr.split()[-2:]
    assert loaded_torch == "False", done.stderr  # what keeps them fast (timed: the closing note)


def test_the_installed_command_answers_each_case_with_its_status() -> None:
    for argv, status in zip(_CASES, (0, 0, 2, 2, 2), strict=True):
        done = subprocess.run([*_COMMAND, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == status, done.stderr

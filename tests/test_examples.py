"""Every script in ``examples/`` runs as its docstring says, and leaves the clone clean.

Each example's docstring shows the command of a short run (the one with ``--max-steps``); the test
runs exactly that command (``torchrun`` as ``python -m torch.distributed.run``) in a scratch git
repository holding a copy of ``examples/`` and ``.gitignore``, then checks what it wrote (under
``runs/``) and that ``git status`` there is still clean. The guide snippets
(``examples/snippets/*.py``, each documented as ``torchrun --standalone --nproc-per-node 2 ...``)
run the same way, but on 2 ranks forked from this process with torchrun's environment, which
spares each one torchrun's own start (a fresh interpreter per rank importing torch).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SNIPPETS = sorted((EXAMPLES / "snippets").glob("*.py"))
TIMEOUT_S = 300
SNIPPET_TIMEOUT_S = 120


def short_run_command(script: str) -> list[str]:
    """The documented command with ``--max-steps`` (continuation lines joined)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text())) or ""
    for line in doc.replace("\\\n", " ").splitlines():
        if line.strip().startswith(("torchrun ", "python ")) and "--max-steps" in line:
            return shlex.split(line)
    raise AssertionError(f"{script}: its docstring shows no command with --max-steps")


def _git(clone: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A git repository with the examples and the repository's .gitignore, committed."""
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES, repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(EXAMPLES.parent / ".gitignore", repo / ".gitignore")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "examples")
    return repo


def assert_clean(clone: Path) -> None:
    status = _git(clone, "status", "--porcelain", "--untracked-files=all")
    assert status == "", f"the example left files that git sees:\n{status}"


def run(words: list[str], clone: Path) -> str:
    """Run a documented command in ``clone``, as from the repository's root."""
    launcher = [sys.executable, "-m", "torch.distributed.run"] if words[0] == "torchrun" else []
    args = launcher + ([sys.executable] if words[0] == "python" else []) + words[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        args, cwd=clone, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(words)} failed:\n{output[-4000:]}"
    return output


def test_every_example_is_tested() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["ddp_style.py", "lightning_gossip.py", "resnet50_imagenet.py"]


def test_ddp_style(clone: Path) -> None:
    output = run(short_run_command("ddp_style.py"), clone)
    assert "epoch 0: last loss" in output and "test accuracy" in output
    state = torch.load(clone / "runs" / "ddp_style" / "model.pt")
    assert state["0.weight"].shape == (256, 32) and state["2.weight"].shape == (10, 256)
    assert_clean(clone)


def test_ddp_style_with_torchs_distributed_sampler(clone: Path) -> None:
    """The README's hint: the same script with ``DistributedSampler`` (it has no ``flush``);
    on forked ranks (``run_snippet``), the launch being tested above."""
    script = clone / "examples" / "ddp_style.py"
    (output, _) = run_snippet(script, clone, ["--max-steps", "10", "--sampler", "distributed"])
    assert "test accuracy" in output
    assert (clone / "runs" / "ddp_style" / "model.pt").is_file()
    assert_clean(clone)


def test_ddp_style_says_how_to_launch_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_style.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "torchrun --standalone --nproc-per-node" in done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="pip install 'gossipgrad[lightning]'"
)
def test_lightning_gossip(clone: Path) -> None:
    output = run(short_run_command("lightning_gossip.py"), clone)
    assert "test_accuracy" in output
    (checkpoint,) = (clone / "runs" / "lightning_gossip").rglob("*.ckpt")
    assert "step=4" in checkpoint.name
    assert_clean(clone)


def test_resnet50_imagenet_on_random_images(clone: Path) -> None:
    output = run(short_run_command("resnet50_imagenet.py"), clone)
    assert "ResNet-50, 2 ranks on cpu" in output and "step 2: loss" in output
    assert "top-1" not in output and "no accuracy to report" in output  # random labels
    state = torch.load(clone / "runs" / "resnet50" / "model.pt")
    weights = [t for t in state.values() if t.is_floating_point()]
    assert (1000, 2048) in [tuple(t.shape) for t in weights]  # the classifier of a ResNet-50
    parameters = sum(
        t.numel() for k, t in state.items() if "running" not in k and t.dtype.is_floating_point
    )
    assert 25.5e6 < parameters < 25.6e6
    assert_clean(clone)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="pip install 'gossipgrad[vision]'"
)
def test_resnet50_imagenet_reads_an_image_folder(clone: Path, tmp_path: Path) -> None:
    from torchvision.io import write_png

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                write_png(
                    torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8), f"{folder}/{i}.png"
                )
    words = short_run_command("resnet50_imagenet.py") + ["--data", str(tmp_path / "data")]
    output = run(words, clone)
    assert f"data: {tmp_path / 'data'}" in output and "top-1" in output
    classifier = torch.load(clone / "runs" / "resnet50" / "model.pt")["fc.weight"]
    assert classifier.shape == (2, 2048)
    assert_clean(clone)


# --- the guide snippets ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(script: Path, args: list[str], rank: int, world: int, port: int, log: Path) -> int:
    """One rank of ``torchrun --standalone --nproc-per-node world script``, in a forked child."""
    out = open(log, "w", buffering=1)  # noqa: SIM115 - the child's stdout until it exits
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_WORLD_SIZE="1",
        ROLE_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="snippets",
        TORCHELASTIC_RESTART_COUNT="0",
        TORCHELASTIC_MAX_RESTARTS="0",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
        return 1
    return 0


def run_snippet(script: Path, clone: Path, args: list[str] | None = None) -> list[str]:
    """Run ``script`` with ``args`` on 2 ranks forked from this process, in ``clone``; the ranks'
    output. A rank that fails or outlives ``SNIPPET_TIMEOUT_S`` fails the test."""
    world = 2
    port, pids, logs = _free_port(), [], [clone.parent / f"rank{r}.log" for r in range(world)]
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 1
            try:
                os.chdir(clone)
                code = _rank_main(script, args or [], rank, world, port, logs[rank])
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + SNIPPET_TIMEOUT_S
    while len(codes) < world and time.monotonic() < deadline:
        for rank, pid in enumerate(pids):
            if rank not in codes and (done := os.waitpid(pid, os.WNOHANG))[0]:
                codes[rank] = os.waitstatus_to_exitcode(done[1])
        time.sleep(0.05)
    for rank, pid in enumerate(pids):
        if rank not in codes:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    outputs = [log.read_text() for log in logs]
    failed = {r: codes.get(r, "killed after the timeout") for r in range(world)}
    failed = {r: c for r, c in failed.items() if c != 0}
    assert not failed, f"{script.name}: ranks {failed}:\n" + "\n".join(
        f"--- rank {r}\n{outputs[r][-3000:]}" for r in failed
    )
    return outputs


@pytest.mark.skipif(not SNIPPETS, reason="no snippets in examples/snippets")
@pytest.mark.parametrize("script", SNIPPETS, ids=[p.stem for p in SNIPPETS])
def test_guide_snippet(script: Path, clone: Path) -> None:
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    command = f"torchrun --standalone --nproc-per-node 2 examples/snippets/{script.name}"
    assert command in doc, f"{script.name}: its docstring should show `{command}`"
    run_snippet(clone / "examples" / "snippets" / script.name, clone)
    assert_clean(clone)

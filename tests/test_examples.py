"""Every script in ``examples/`` runs, for a few steps, as its docstring says.

Each example's docstring shows the command of a short run (the one with ``--max-steps``); the test
runs exactly that command (``torchrun`` as ``python -m torch.distributed.run``, ``--out`` moved
into a temporary folder), so the documented command cannot drift from the script.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 300


def short_run_command(script: str) -> list[str]:
    """The documented command with ``--max-steps`` (continuation lines joined)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text())) or ""
    for line in doc.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words and words[0] in ("torchrun", "python") and "--max-steps" in words:
            return words
    raise AssertionError(f"{script}: its docstring shows no command with --max-steps")


def run(words: list[str], out: Path) -> str:
    """Run a documented command from the repository root, with ``--out`` under ``out``."""
    launcher = [sys.executable, "-m", "torch.distributed.run"] if words[0] == "torchrun" else []
    args = launcher + ([sys.executable] if words[0] == "python" else []) + words[1:]
    i = args.index("--out")
    args[i + 1] = str(out / Path(args[i + 1]).name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        args, cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(words)} failed:\n{output[-4000:]}"
    return output


def test_every_example_is_tested() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["ddp_style.py", "lightning_gossip.py", "resnet50_imagenet.py"]


def test_ddp_style(tmp_path: Path) -> None:
    output = run(short_run_command("ddp_style.py"), tmp_path)
    assert "2 ranks on cpu" in output and "test accuracy" in output
    state = torch.load(tmp_path / "ddp.pt")
    assert state["0.weight"].shape == (256, 32) and state["4.weight"].shape == (10, 256)


def test_ddp_style_says_how_to_launch_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_style.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "torchrun --standalone --nproc-per-node" in done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="pip install 'gossipgrad[lightning]'"
)
def test_lightning_gossip(tmp_path: Path) -> None:
    output = run(short_run_command("lightning_gossip.py"), tmp_path)
    assert "test_accuracy" in output
    (checkpoint,) = (tmp_path / "lightning_run" / "checkpoints").glob("*.ckpt")
    assert "step=4" in checkpoint.name


def test_resnet50_imagenet_on_random_images(tmp_path: Path) -> None:
    output = run(short_run_command("resnet50_imagenet.py"), tmp_path)
    assert "ResNet-50, 2 ranks on cpu" in output and "step 2: loss" in output
    state = torch.load(tmp_path / "resnet50.pt")
    weights = [t for t in state.values() if t.is_floating_point()]
    assert (1000, 2048) in [tuple(t.shape) for t in weights]  # the classifier of a ResNet-50
    parameters = sum(
        t.numel() for k, t in state.items() if "running" not in k and t.dtype.is_floating_point
    )
    assert 25.5e6 < parameters < 25.6e6


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="pip install 'gossipgrad[vision]'"
)
def test_resnet50_imagenet_reads_an_image_folder(tmp_path: Path) -> None:
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
    output = run(words, tmp_path)
    assert f"data: {tmp_path / 'data'}" in output
    classifier = torch.load(tmp_path / "resnet50.pt")["fc.weight"]
    assert classifier.shape == (2, 2048)

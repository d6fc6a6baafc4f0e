"""What a training run carries across a restart: its progress counters, and the save and resume of
every object's state (model, optimizer, sampler, gossip step, random generators) through
``gossipgrad.checkpoint``. ``gossipgrad.train`` runs the loop; this module only stores it."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gossipgrad import checkpoint
from gossipgrad.train.config import TrainConfig


@dataclass
class Window:
    """Sums since the last record (loss over samples, correct predictions, targets, samples)."""

    loss: torch.Tensor
    correct: torch.Tensor
    targets: int = 0
    samples: int = 0
    began: float = field(default_factory=time.perf_counter)


@dataclass
class Progress:
    """Counters that a checkpoint carries over (besides the model, optimizer and sampler)."""

    window: Window  # this rank's sums since the last record
    step: int = 0
    epoch: int = 0
    elapsed_s: float = 0.0
    bytes_sent: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def new_window(device: torch.device) -> Window:
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return Window(loss=zero.clone(), correct=zero.clone())


def save(
    cfg: TrainConfig,
    run_dir: Path,
    identity: dict[str, str],
    model: Any,
    optimizer: torch.optim.Optimizer,
    sampler: Any,
    progress: Progress,
) -> None:
    model.flush()  # the exchange in flight belongs to this step
    window = progress.window
    state = {
        "run": identity,
        "model": model.module.state_dict(),
        "optim": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "gossip": model.gossip_state(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": list(np.random.get_state()),
            "python": random.getstate(),
        },
        "progress": {
            "step": progress.step,
            "epoch": progress.epoch,
            "elapsed_s": progress.elapsed_s,
            "bytes_sent": progress.bytes_sent,
            "history": progress.history if dist.get_rank() == 0 else [],
            "window": {
                "loss": window.loss,
                "correct": window.correct,
                "targets": window.targets,
                "samples": window.samples,
            },
        },
    }
    checkpoint.save(run_dir / "checkpoints", progress.step, state, keep=cfg.keep_checkpoints)


def resume(
    cfg: TrainConfig,
    folder: Path,
    identity: dict[str, str],
    model: Any,
    optimizer: torch.optim.Optimizer,
    sampler: Any,
    progress: Progress,
) -> Path | None:
    """Load the checkpoint that ``cfg.resume`` names into the run's objects; return its path."""
    found = find_checkpoint(cfg.resume, folder, identity["algo"])
    if found is None:
        return None
    state, path = found
    for key, value in identity.items():
        if state["run"][key] != value:
            raise checkpoint.CheckpointError(
                f"checkpoint {str(path)!r} is from a run with {key} {state['run'][key]!r}, but "
                f"this run has {key} {value!r}: resume with --{key} {state['run'][key]}"
            )
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    sampler.load_state_dict(state["sampler"])
    model.load_gossip_state(state["gossip"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(tuple(rng["numpy"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["progress"]
    progress.step, progress.epoch = int(saved["step"]), int(saved["epoch"])
    progress.elapsed_s, progress.bytes_sent = float(saved["elapsed_s"]), int(saved["bytes_sent"])
    progress.history = list(saved["history"])
    window = progress.window
    window.loss.copy_(saved["window"]["loss"])
    window.correct.copy_(saved["window"]["correct"])
    window.targets, window.samples = saved["window"]["targets"], saved["window"]["samples"]
    return path


def find_checkpoint(resume: str, folder: Path, algo: str) -> tuple[dict[str, Any], Path] | None:
    """``--resume auto``: the newest intact checkpoint of this run, if any. ``--resume PATH``: that
    checkpoint, or the newest intact one in PATH (a checkpoints folder or a run folder)."""
    if not resume:
        return None
    if resume == "auto":
        return checkpoint.load_latest(folder)
    path = Path(resume)
    if (path / checkpoint.MANIFEST).exists() or path.name.startswith("step_"):
        return checkpoint.load(path), path
    for candidate in (path / algo / "checkpoints", path / "checkpoints", path):
        if checkpoint.list_checkpoints(candidate):
            found = checkpoint.load_latest(candidate)
            if found is not None:
                return found
    raise checkpoint.CheckpointError(
        f"--resume {resume}: no intact checkpoint there (give a step_* folder, a checkpoints "
        "folder, or a run folder), or use --resume auto"
    )

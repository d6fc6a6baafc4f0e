"""What a training run carries across a restart: its progress counters, and the save and resume of
every object's state (model, optimizer, sampler, gossip step, random generators) through
``gossipgrad.checkpoint``. ``gossipgrad.train.loop`` runs the loop; this module only stores it.

    run_state.save(loop)             # collective: every rank's state, at loop.progress.step
    resumed = run_state.resume(loop)  # collective: load what --resume names into loop (or None)
    run_state.check_resume(cfg, algo, model)  # before launch: what resume would refuse

Resuming:

- ``--resume auto`` takes the newest checkpoint that loads; a damaged one (a file missing,
  truncated, not JSON, nested too deep, a state that does not fit) is skipped with a warning
  naming it and why, on every rank alike. When checkpoints exist but none can be used, the run
  stops with a ``ResumeError`` naming each: it never trains from step 0 over them. When there is
  no checkpoint yet, rank 0 says in one line that the run starts from step 0.
- The algorithm, dataset, model, optimizer, seed, schedule and shuffle fraction of a run are
  fixed (``FIXED``): a resume that changes one is refused up front, naming the flag and both
  values. Every other flag may change (lr, epochs, max steps, logging, evaluation and checkpoint
  cadence, engine options, the recipe: --lr-schedule, --warmup-epochs, --amp, --grad-clip,
  --label-smoothing, which are hyperparameters like --lr, applied from the resumed step on; the
  schedule's position is the step, and the GradScaler's scale is kept while --amp stays fp16):
  it is applied (the optimizer's hyperparameters are set from the flags after its state is
  loaded) and recorded as ``{flag: [checkpoint's, this run's]}``.
- On the same number of ranks the run continues bit for bit. On another number (``q`` ranks from
  a checkpoint of ``p``), every rank starts from the exact average of the ``p`` saved replicas;
  the optimizer state (momentum, Adam moments) and the gradient trackers (--tracking) are averaged
  the same way, element by element; the sampler is re-sharded for ``q`` ranks and the epoch
  continues after the samples already seen (``yielded * p / q`` per rank, rounded down to whole
  batches); each rank's random generators restart from its own seed; the step, epoch, training
  time, samples trained and metrics history carry on.

The summary's figures count samples (``Progress.samples``, ``epochs_trained``), not steps: a
resumed run may change --batch-size, and with --balance a rank's batches differ in size.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from gossipgrad import checkpoint
from gossipgrad.train.config import TrainConfig, flag
from gossipgrad.train.metrics import Meter
from gossipgrad.train.sampling import move_to

if TYPE_CHECKING:
    from gossipgrad.train.loop import TrainingLoop

# Flags a resumed run cannot change (besides the algorithm, compared as the run's identity).
FIXED = ("dataset", "model", "optimizer", "seed", "schedule", "shuffle_fraction")
_FIXED_TEXT = "the algorithm, dataset, model, optimizer, seed, schedule and shuffle fraction"
_UNRECORDED = ("algo", "resume", "out", "nproc")  # the world size is recorded on its own
# averaged over the saved ranks on another world size (gossip: the gradient trackers)
AVERAGED = ("model", "optim", "gossip", "progress")


class ResumeError(checkpoint.CheckpointError):
    """What ``--resume`` names cannot be used; the message names each checkpoint and why."""


@dataclass
class Progress:
    """Counters that a checkpoint carries over (besides the model, optimizer and sampler)."""

    meter: Meter  # this rank's sums since the last record
    step: int = 0
    epoch: int = 0
    elapsed_s: float = 0.0
    bytes_sent: int = 0
    samples: int = 0  # this rank's training samples so far (the loop adds each batch's)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Resumed:
    """Where a run resumed from: the checkpoint, how many ranks wrote it, the flags changed, the
    newer checkpoints that could not be used."""

    path: Path
    world_size: int
    changes: dict[str, list[Any]]
    skipped: list[str] = field(default_factory=list)


# --- before the run -----------------------------------------------------------------------------


def check_fresh_start(cfg: TrainConfig, folder: Path) -> None:
    """Without ``--resume``, refuse a checkpoints folder that an earlier run left: its rotation
    would mix the two runs."""
    if not cfg.resume and checkpoint.list_checkpoints(folder, incomplete=True):
        raise ResumeError(
            f"{folder.parent} already holds checkpoints of an earlier run: continue it with "
            "--resume auto, or choose another --out"
        )


def check_resume(cfg: TrainConfig, algo: str, model: str) -> None:
    """What can be checked before any worker starts (no collectives, no tensors read): a run
    folder that already holds checkpoints without ``--resume``, a ``--resume`` path that does
    not exist or holds no checkpoint, checkpoints none of which is complete with a readable run
    record, and flags that the newest such checkpoint's run does not allow to change (a damaged
    newer one is skipped, as the workers will skip it). Raises ``ResumeError``."""
    folder = Path(cfg.out) / algo / "checkpoints"
    check_fresh_start(cfg, folder)
    if not cfg.resume:
        return
    identity = {"algo": algo, "dataset": cfg.dataset, "model": model}
    unusable: list[tuple[Path, str]] = []
    for path in _candidates(cfg.resume, folder, algo):  # newest first; the workers skip the same
        try:
            if not (path / checkpoint.MANIFEST).is_file():
                raise ResumeError(f"{str(path)!r} has no {checkpoint.MANIFEST}")
            run = _saved_run(path)
        except ResumeError as error:
            unusable.append((path, checkpoint.validate(path, any_world=True) or str(error)))
            continue
        check_flags(cfg, identity, run, path)
        return
    if unusable:
        _refuse_all(unusable)


def check_flags(
    cfg: TrainConfig, identity: dict[str, str], run: dict[str, Any], path: Path
) -> dict[str, list[Any]]:
    """Refuse a change of a fixed flag (``ResumeError`` naming it and both values); return the
    other flags that differ from the checkpoint's run, as ``{flag: [old, new]}``."""
    saved = dict(run.get("config") or {})
    ours = cfg.to_dict()
    pairs = [(key, run.get(key), value) for key, value in identity.items()]
    pairs += [(n, saved[n], ours[n]) for n in FIXED if n not in identity and n in saved]
    for name, old, new in pairs:
        if old != new:
            raise ResumeError(
                f"checkpoint {str(path)!r} is from a run with {name} {old!r}, but this run has "
                f"{name} {new!r}; {_FIXED_TEXT} of a run cannot change: resume with "
                f"{flag(name)} {old}, or choose another --out"
            )
    return {
        f.name: [saved[f.name], ours[f.name]]
        for f in fields(TrainConfig)
        if f.name in saved
        and f.name not in FIXED
        and f.name not in _UNRECORDED
        and saved[f.name] != ours[f.name]
    }


# --- save and resume ----------------------------------------------------------------------------


def save(loop: TrainingLoop) -> None:
    """Checkpoint ``loop`` at its current step (collective)."""
    # no flush: gossip_state() holds the exchange in flight (waited for, not mixed), so that a
    # checkpoint changes nothing in the run (a wrapper that cannot hold it completes it)
    progress = loop.progress
    state = {
        "run": {**loop.identity, "config": loop.cfg.to_dict()},
        "model": loop.model.module.state_dict(),
        "optim": loop.optimizer.state_dict(),
        "sampler": loop.sampler.state_dict(),
        "gossip": loop.model.gossip_state(),
        "recipe": loop.recipe.state_dict(),  # the learning-rate schedule and the GradScaler
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
            # a tensor, so that a resume on another world size averages it like the replicas
            "bytes_sent": torch.tensor(float(progress.bytes_sent), dtype=torch.float64),
            "samples": torch.tensor(float(progress.samples), dtype=torch.float64),
            "history": progress.history if dist.get_rank() == 0 else [],
            "meter": progress.meter.state_dict(),
        },
    }
    checkpoint.save(loop.checkpoints, progress.step, state, keep=loop.cfg.keep_checkpoints)


def resume(loop: TrainingLoop) -> Resumed | None:
    """Load the checkpoint that ``--resume`` names into ``loop``'s objects (module docstring);
    None when there is nothing to resume (collective)."""
    skipped: list[tuple[Path, str]] = []
    candidates = _candidates(loop.cfg.resume, loop.checkpoints, loop.algo)
    for path in candidates:
        try:
            run = _saved_run(path)
        except ResumeError as error:
            skipped.append((path, str(error)))
            continue
        changes = check_flags(loop.cfg, loop.identity, run, path)
        try:
            world = _load(loop, path)
        except checkpoint.CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        if dist.get_rank() == 0:
            for where, why in skipped:
                sys.stderr.write(f"gossipgrad: warning: skipped checkpoint {str(where)!r}: {why}\n")
        return Resumed(path, world, changes, [str(where) for where, _ in skipped])
    if skipped:
        _refuse_all(skipped)
    if loop.cfg.resume and not candidates and dist.get_rank() == 0:
        sys.stderr.write(
            f"gossipgrad: note: --resume {loop.cfg.resume}: no checkpoint in "
            f"{str(loop.checkpoints)!r} yet, so the {loop.algo} run starts from step 0\n"
        )
    return None


def _load(loop: TrainingLoop, path: Path) -> int:
    """Load checkpoint ``path`` into ``loop``; returns the number of ranks that wrote it. A state
    that does not fit (a damaged file) raises ``CheckpointError`` on every rank alike, so that
    every rank goes on to the same next checkpoint (collective)."""
    saved = checkpoint.saved_world_size(path)
    if saved == loop.world:
        state = checkpoint.load(path)
    else:
        state = checkpoint.load_resharded(path, AVERAGED)
    problem = None
    try:
        _apply(loop, state, saved)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        lines = str(error).strip().splitlines() or [""]
        problem = f"rank {loop.rank}: {type(error).__name__}: {lines[0]}"
    problems = checkpoint.gather_errors(problem)
    if problems:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} does not fit this run ({'; '.join(problems)}): it is "
            "damaged, or from another version of the model"
        )
    return saved


def _apply(loop: TrainingLoop, state: dict[str, Any], saved: int) -> None:
    """Put a loaded ``state`` into ``loop``'s objects."""
    if saved == loop.world:
        loop.sampler.load_state_dict(state["sampler"])
        _load_rng(state["rng"])
    else:
        _reshard_sampler(loop, state, saved)
    loop.model.module.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optim"])
    loop.model.load_gossip_state(state["gossip"])
    loop.saved_recipe = state.get("recipe")  # loaded once the recipe is built (after this)
    _load_progress(loop.progress, state["progress"], saved / loop.world, state["run"])


def _reshard_sampler(loop: TrainingLoop, state: dict[str, Any], saved: int) -> None:
    """Continue the saved epoch on this world's shards, after the samples already seen."""
    seen = int(state["sampler"]["yielded"]) * saved // loop.world
    batch = loop.cfg.batch_size
    position = min(seen, len(loop.sampler)) // batch * batch
    move_to(loop.sampler, int(state["progress"]["epoch"]), position)


def _load_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(tuple(rng["numpy"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _load_progress(
    progress: Progress, saved: dict[str, Any], share: float, run: dict[str, Any]
) -> None:
    """``share``: saved ranks / this run's ranks (the samples are averaged over the saved ranks
    on another world size: each rank takes its share of their total)."""
    progress.step, progress.epoch = int(saved["step"]), int(saved["epoch"])
    progress.elapsed_s = float(saved["elapsed_s"])
    progress.bytes_sent = round(float(saved["bytes_sent"]))
    if "samples" in saved:
        progress.samples = round(float(saved["samples"]) * share)
    else:  # a checkpoint from before samples were counted: its steps were of its batch size
        batch = int(dict(run.get("config") or {}).get("batch_size", 0))
        progress.samples = round(progress.step * batch * share)
    progress.history = list(saved["history"])
    progress.meter.load_state_dict(saved["meter"])


def epochs_trained(loop: TrainingLoop) -> float:
    """The epochs done: the finished ones plus the share of the current epoch's samples that this
    rank has trained (right whatever --batch-size each resumed part of the run had)."""
    yielded = int(loop.sampler.state_dict()["yielded"])
    left = max(len(loop.sampler) - yielded, 0)
    if loop.batches is None:  # what whole batches can still take (the rest is dropped)
        left = left // loop.cfg.batch_size * loop.cfg.batch_size
    share = yielded / (yielded + left) if yielded + left else 0.0
    return loop.progress.epoch + share


def after_interrupt(cfg: TrainConfig, algo: str) -> str:
    """What an interrupted run of ``algo`` can still be continued from, as a sentence for the
    line that says it was interrupted: the newest checkpoint, or how to have one next time."""
    folder = Path(cfg.out) / algo / "checkpoints"
    saved = checkpoint.list_checkpoints(folder)
    if saved:
        return (
            f"continue from step {checkpoint.step_of(saved[-1])} with the same command and "
            f"--resume auto --out {cfg.out}"
        )
    if cfg.checkpoint_every:
        return f"no checkpoint was written yet (--checkpoint-every {cfg.checkpoint_every})"
    return (
        "nothing was saved, as no --checkpoint-every was given: add --checkpoint-every N to "
        "write a checkpoint every N steps, which --resume auto continues from"
    )


# --- finding checkpoints ------------------------------------------------------------------------


def _candidates(resume: str, folder: Path, algo: str) -> list[Path]:
    """The checkpoints ``--resume`` names, newest first: ``auto``, every ``step_*`` folder of
    this run; a ``step_*`` folder, that one; a checkpoints or run folder, its ``step_*``
    folders. Raises ``ResumeError`` for a path that does not exist or holds no checkpoint."""
    if not resume:
        return []
    if resume == "auto":
        return checkpoint.list_checkpoints(folder, incomplete=True)[::-1]
    path = Path(resume)
    if not path.exists():
        raise ResumeError(
            f"--resume {resume}: no such file or folder; give a step_* folder, a checkpoints "
            "folder or a run folder, or use --resume auto"
        )
    if (path / checkpoint.MANIFEST).exists() or path.name.startswith("step_"):
        return [path]
    for candidate in (path / algo / "checkpoints", path / "checkpoints", path):
        found = checkpoint.list_checkpoints(candidate, incomplete=True)
        if found:
            return found[::-1]
    raise ResumeError(
        f"--resume {resume}: no checkpoint there (give a step_* folder, a checkpoints folder, or "
        "a run folder), or use --resume auto"
    )


def _saved_run(path: Path) -> dict[str, Any]:
    """What rank 0 of checkpoint ``path`` recorded about its run (JSON: no tensor is read).
    Raises ``ResumeError`` saying what is wrong with the checkpoint."""
    file = path / "rank0.json"
    try:
        tree = checkpoint.read_json(file)
    except checkpoint.CheckpointError as error:
        raise ResumeError(checkpoint.validate(path, any_world=True) or str(error)) from None
    run = tree.get("run") if isinstance(tree, dict) else None
    if not isinstance(run, dict) or not isinstance(run.get("config", {}), dict):
        problem = checkpoint.validate(path, any_world=True)
        raise ResumeError(problem or f"{str(file)!r} is damaged: it names no run")
    return run


def _refuse_all(skipped: list[tuple[Path, str]]) -> None:
    listed = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise ResumeError(
        f"--resume: none of the {len(skipped)} checkpoints in {str(skipped[0][0].parent)!r} can "
        f"be used ({listed}); nothing was trained over them: fix or move them away, or choose "
        "another --out"
    )

"""Checkpoints of every replica, written atomically and checked on load.

    path = save(folder, step, state, keep=3)   # collective: every rank passes its own state
    state = load(path)                          # collective: every rank gets its own state back
    state, path = load_latest(folder)           # the newest checkpoint that is intact

``state`` is any nested tree of dicts, lists, tensors, numpy arrays and JSON values (one per rank:
model, optimizer, sampler, gossip step, RNG states...). Tensors go through
``torch.distributed.checkpoint`` under rank-prefixed keys (``rank3/model/fc.weight``: DCP silently
keeps one of several equal keys, and gossip replicas differ); everything else goes into a
``rank<r>.json`` beside them, so loading never unpickles anything (tensors are read with
``weights_only``).

Layout: ``folder/step_00000100/`` holds the DCP files, one JSON per rank and ``manifest.json``
(size and SHA-256 of every file). A checkpoint is written to ``folder/.tmp-step_00000100`` and
renamed after every rank has finished, so a crash mid-write leaves the previous checkpoints
intact; only the ``keep`` newest are kept. ``load`` verifies the manifest first and raises
``CheckpointError`` naming the damaged file. The folder must be visible to every rank (a shared
filesystem when training on several nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MANIFEST = "manifest.json"
_PREFIX = "step_"
_TMP = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the fix."""


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete-looking checkpoints in ``folder`` (those with a manifest), oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def save(folder: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write this rank's ``state`` as checkpoint ``step`` in ``folder`` (every rank must call it)
    and delete all but the ``keep`` newest checkpoints. Returns the checkpoint's path."""
    rank, world = _rank(), _world()
    root = Path(folder)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, f"rank{rank}", tensors)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: fine
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)))
    _write_json(tmp / f"rank{rank}.json", tree)
    _barrier()

    if rank == 0:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "format": 1,
            "step": step,
            "world_size": world,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        _write_json(tmp / MANIFEST, manifest)
        old = root / f"{_TMP}old-{final.name}"
        if final.exists():  # re-saving a step: move the old copy aside, then drop it
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path) -> dict[str, Any]:
    """This rank's state from checkpoint ``path`` (every rank must call it). Raises
    ``CheckpointError`` if the checkpoint is damaged or was written by another number of ranks."""
    path = Path(path)
    error = validate(path) if _rank() == 0 else None
    error = _broadcast(error)
    if error is not None:
        raise CheckpointError(error)
    tree = json.loads((path / f"rank{_rank()}.json").read_text())
    templates: dict[str, torch.Tensor] = {}
    _templates(tree, templates)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(templates, storage_reader=dcp.FileSystemReader(str(path)))
    return _join(tree, templates)


def load_latest(folder: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint in ``folder`` and its path, or None if there is none. A
    damaged one is skipped with a warning (the previous one is loaded instead)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load(path), path
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint: {error}", RuntimeWarning, stacklevel=2)
    return None


def validate(path: str | Path) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact for this world size, else a
    one-line description of what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        return f"no checkpoint at {str(path)!r}"
    if not manifest_path.is_file():
        return (
            f"{str(path)!r} has no {MANIFEST}: it is not a gossipgrad checkpoint, or its "
            "writing did not finish; resume from an earlier one"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files, world = manifest["files"], int(manifest["world_size"])
    except (ValueError, KeyError, TypeError):
        return f"{str(manifest_path)!r} is corrupt; resume from an earlier checkpoint"
    if world != _world():
        return (
            f"checkpoint {str(path)!r} was written by {world} ranks but this run has {_world()}: "
            f"resume with the same number of ranks (--nproc {world})"
        )
    for name, expected in files.items():
        file = path / name
        problem = None
        if not file.is_file():
            problem = "is missing"
        elif file.stat().st_size != expected["bytes"]:
            problem = f"has {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        elif _sha256(file) != expected["sha256"]:
            problem = "does not match its checksum"
        if problem:
            return (
                f"checkpoint {str(path)!r} is corrupt: {name} {problem}; "
                "resume from an earlier checkpoint (--resume PATH) or start afresh"
            )
    return None


# --- the tree: tensors to DCP, the rest to JSON -------------------------------------------------


def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``; its tensors are moved to ``tensors`` under keys rooted at ``key``."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach()
        return {"__tensor__": key, "shape": list(obj.shape), "dtype": str(obj.dtype)[6:]}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj)
        held = str(tensors[key].dtype)[6:]
        return {"__ndarray__": key, "shape": list(obj.shape), "dtype": held, "np": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key!r}")


def _templates(tree: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(tree, dict):
        key = tree.get("__tensor__", tree.get("__ndarray__"))
        if isinstance(key, str):
            out[key] = torch.empty(tree["shape"], dtype=getattr(torch, tree["dtype"]))
            return
        for value in tree.get("__items__", tree.items()):
            _templates(value[1], out)
    elif isinstance(tree, list):
        for value in tree:
            _templates(value, out)


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["np"]))
        if "__items__" in tree:
            return {k: _join(v, tensors) for k, v in tree["__items__"]}
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


# --- files and ranks ----------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed() and _world() > 1:
        dist.barrier()


def _broadcast(value: Any) -> Any:
    if not _distributed() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

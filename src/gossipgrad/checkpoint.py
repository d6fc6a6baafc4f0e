"""Checkpoints of every replica, written atomically and checked on load.

    path = save(folder, step, state, keep=3)   # collective: every rank passes its own state
    state = load(path)                          # collective: every rank gets its own state back
    state, path = load_latest(folder)           # the newest checkpoint that is intact
    state = load_resharded(path, average=["model"])   # saved by p ranks, loaded by q

``state`` is any nested tree of dicts, lists, tensors, numpy arrays and JSON values (one per rank:
model, optimizer, sampler, gossip step, RNG states...). Tensors go through
``torch.distributed.checkpoint`` under rank-prefixed keys (``rank3/model/fc.weight``: DCP silently
keeps one of several equal keys, and gossip replicas differ); everything else goes into a
``rank<r>.json`` beside them. Loading runs no code from the checkpoint: tensors are read with
``weights_only``, and DCP's ``.metadata`` (a pickle) goes through an unpickler that admits only
DCP's own metadata classes, torch sizes and dtypes (``SafeFileSystemReader``), and tensor entries
only; anything else is refused with a ``CheckpointError``.

Layout: ``folder/step_00000100/`` holds the DCP files, one JSON per rank and ``manifest.json``
(size and SHA-256 of every file). A checkpoint is written to ``folder/.tmp-step_00000100`` and
renamed after every rank has finished, so a crash mid-write leaves the previous checkpoints
intact; once it is complete, all but the ``keep`` newest checkpoints older than it are deleted
(a newer folder, left by an abandoned attempt, is not this save's to delete).
``remove_partial`` clears what an interrupted save left. ``load`` verifies the manifest first and
raises ``CheckpointError`` naming the damaged file. A failure of torch's checkpoint code (its
``CheckpointException`` is a ``BaseException``) becomes a ``CheckpointError`` that carries each
rank's cause ("No space left on device"). The folder must be visible to every rank (a shared
filesystem when training on several nodes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

MANIFEST = "manifest.json"
_PREFIX = "step_"
_TMP = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the fix."""


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(folder: str | Path, *, incomplete: bool = False) -> list[Path]:
    """Complete-looking checkpoints in ``folder`` (those with a manifest), oldest first; with
    ``incomplete``, every ``step_*`` folder, manifest or not."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.removeprefix(_PREFIX).isdigit()
        and p.is_dir()
        and (incomplete or (p / MANIFEST).is_file())
    ]
    return sorted(found, key=lambda p: p.name)


def step_of(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (``step_00000100``: 100)."""
    return int(Path(path).name.removeprefix(_PREFIX))


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete what interrupted saves left in ``folder`` (``.tmp-step_*``); only while no save is
    running there (a run holds its folder's lock). Returns what was removed."""
    root = Path(folder)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith(_TMP))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def saved_world_size(path: str | Path) -> int:
    """How many ranks wrote checkpoint ``path`` (from its manifest)."""
    try:
        return int(json.loads((Path(path) / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {str(Path(path) / MANIFEST)!r}: {error}") from None


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
    with _torch_errors(f"cannot write checkpoint {str(final)!r}", tmp if rank == 0 else None):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process
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
        _rotate(root, step, keep)
    _barrier()
    return final


def _rotate(root: Path, step: int, keep: int) -> None:
    """Now that checkpoint ``step`` is complete, keep it and the ``keep - 1`` newest older ones."""
    older = [p for p in list_checkpoints(root, incomplete=True) if step_of(p) < step]
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)


def load(path: str | Path) -> dict[str, Any]:
    """This rank's state from checkpoint ``path`` (every rank must call it). Raises
    ``CheckpointError`` if the checkpoint is damaged or was written by another number of ranks."""
    path = Path(path)
    error = validate(path) if _rank() == 0 else None
    error = _broadcast(error)
    if error is not None:
        raise CheckpointError(error)
    tree = _read_tree(path, _rank())
    templates: dict[str, torch.Tensor] = {}
    _templates(tree, templates)
    _dcp_load(templates, path)
    return _join(tree, templates)


def load_resharded(path: str | Path, average: Collection[str]) -> dict[str, Any]:
    """A state for this rank from checkpoint ``path`` written by any number ``p`` of ranks
    (collective over the ``q`` ranks loading it): rank ``r`` gets what rank ``r % p`` saved,
    except that every floating-point tensor under the top-level keys in ``average`` is the
    exact mean over the ``p`` saved ranks (summed in float64: rank ``r`` reads the replicas
    ``i`` with ``i % q == r``, one all-reduce adds them up)."""
    path = Path(path)
    error = validate(path, any_world=True) if _rank() == 0 else None
    error = _broadcast(error)
    if error is not None:
        raise CheckpointError(error)
    saved, rank, world = saved_world_size(path), _rank(), _world()
    tree = _read_tree(path, rank % saved)
    summed = {i: _read_tree(path, i) for i in range(rank % world, saved, world)}
    templates: dict[str, torch.Tensor] = {}
    _templates(tree, templates)
    for other in summed.values():
        _templates({k: other.get(k) for k in average}, templates)
    _dcp_load(templates, path)
    for key in average:
        _average_into(key, tree, summed, templates, saved, path)
    return _join(tree, templates)


def _average_into(
    key: str,
    tree: dict[str, Any],
    summed: dict[int, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    saved: int,
    path: Path,
) -> None:
    """Overwrite the floating-point tensors of ``tree[key]`` with the mean over the saved
    ranks (this rank contributes the replicas in ``summed``)."""
    mine = list(_float_leaves(tree.get(key)))
    layout = [(name, tensors[k].shape, tensors[k].dtype) for name, k in mine]
    total = torch.zeros(sum(tensors[k].numel() for _, k in mine), dtype=torch.float64)
    for i, other in summed.items():
        theirs = list(_float_leaves(other.get(key)))
        if [(name, tensors[k].shape, tensors[k].dtype) for name, k in theirs] != layout:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: rank {i} saved a different {key!r} than rank "
                f"{_rank() % saved}, so the replicas cannot be averaged; resume with --nproc "
                f"{saved}"
            )
        if theirs:
            total += torch.cat([tensors[k].reshape(-1).double() for _, k in theirs])
    if _distributed() and _world() > 1:
        on_device = total.to(_collective_device())
        dist.all_reduce(on_device)
        total = on_device.cpu()
    total /= saved
    offset = 0
    for _, k in mine:
        target = tensors[k]
        target.copy_(total[offset : offset + target.numel()].view(target.shape))
        offset += target.numel()


def _float_leaves(tree: Any) -> Iterator[tuple[str, str]]:
    """``(name without the rank prefix, tensor key)`` of each floating-point tensor in ``tree``,
    in a fixed order."""
    if isinstance(tree, dict):
        key = tree.get("__tensor__")
        if isinstance(key, str):
            if getattr(torch, tree["dtype"]).is_floating_point:
                yield key.split("/", 1)[-1], key
            return
        for value in tree.get("__items__", tree.items()):
            yield from _float_leaves(value[1])
    elif isinstance(tree, list):
        for value in tree:
            yield from _float_leaves(value)


def load_latest(folder: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint in ``folder`` and its path, or None if there is none. A
    damaged one is skipped with a warning (the previous one is loaded instead)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load(path), path
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint: {error}", RuntimeWarning, stacklevel=2)
    return None


def validate(path: str | Path, *, any_world: bool = False) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact for this world size (for any
    world size with ``any_world``), else a one-line description of what is wrong."""
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
    if world != _world() and not any_world:
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


# --- reading and writing through DCP ------------------------------------------------------------


def _read_tree(path: Path, rank: int) -> Any:
    file = path / f"rank{rank}.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {str(file)!r}: {error}") from None


def _dcp_load(templates: dict[str, torch.Tensor], path: Path) -> None:
    with _torch_errors(f"cannot read checkpoint {str(path)!r}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(templates, storage_reader=SafeFileSystemReader(str(path)))


@contextlib.contextmanager
def _torch_errors(what: str, cleanup: Path | None = None) -> Iterator[None]:
    """Turn torch's ``CheckpointException`` (a ``BaseException``) and ``OSError`` into a
    ``CheckpointError`` that says what failed on which rank; remove ``cleanup`` if given."""
    try:
        yield
    except (CheckpointException, OSError) as error:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise CheckpointError(f"{what}: {_causes(error)}") from error


def _causes(error: BaseException) -> str:
    """Each rank's cause in a ``CheckpointException``, on one line."""
    if not isinstance(error, CheckpointException):
        return _first_line(error)
    parts = [f"rank {rank}: {_first_line(cause)}" for rank, (cause, _) in error.failures.items()]
    return "; ".join(sorted(parts)) or "torch.distributed.checkpoint failed"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# What DCP's ``.metadata`` pickle may name: its own classes, torch sizes, dtypes and layouts.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only what DCP's metadata is made of, and refuses any other
    global (a function to call, a class that runs code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}, which DCP metadata never holds: "
            "refused (the checkpoint may have been tampered with)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read with ``_MetadataUnpickler`` (torch's own
    reader uses ``pickle.load``, which runs whatever the file names), and whose entries must all
    be tensors (a planted "bytes" entry would be read with a general unpickler)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        file = Path(str(self.path)) / ".metadata"
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{str(file)!r} does not hold DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise pickle.UnpicklingError(
                    f"{str(file)!r}: entry {key!r} is a {type(entry).__name__}, not a tensor: "
                    "refused (gossipgrad checkpoints hold tensors only)"
                )
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None:
            storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


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
            out[key] = torch.empty(tree["shape"], dtype=_dtype(tree["dtype"]))
            return
        for value in tree.get("__items__", tree.items()):
            _templates(value[1], out)
    elif isinstance(tree, list):
        for value in tree:
            _templates(value, out)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"a checkpoint's tensor has dtype {name!r}, which is not a dtype")
    return dtype


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


def _collective_device() -> torch.device:
    """Where the default group's collectives take tensors (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(value: Any) -> Any:
    if not _distributed() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

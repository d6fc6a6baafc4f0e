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
raises ``CheckpointError`` naming the damaged file; a JSON file that is not JSON, or is nested
deeper than a checkpoint ever is (``MAX_DEPTH``), is damaged too (``read_json``), never a
``RecursionError``. A failed write on any rank (torch's ``CheckpointException`` is a
``BaseException``) becomes the same ``CheckpointError`` on every rank, with each rank's cause and
the free space of the file system ("the disk is full: 96 KiB free, the checkpoint needs about 180
KiB"), and removes what was written. The folder must be visible to every rank (a shared
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
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

MANIFEST = "manifest.json"
MAX_DEPTH = 64  # JSON nesting of a checkpoint's files (a training run's is under 10)
_PREFIX = "step_"
_TMP = ".tmp-"
_NO_SPACE = ("No space left", "Disk quota exceeded", "Errno 28", "Errno 122")


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
    file = Path(path) / MANIFEST
    manifest = read_json(file)
    world = manifest.get("world_size") if isinstance(manifest, dict) else None
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{str(file)!r} is corrupt: no world_size; resume from another one")
    return world


def save(folder: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write this rank's ``state`` as checkpoint ``step`` in ``folder`` (every rank must call it)
    and delete all but the ``keep`` newest checkpoints. Returns the checkpoint's path. Raises
    ``CheckpointError`` on every rank when any rank's write fails (module docstring)."""
    rank, world = _rank(), _world()
    root = Path(folder)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP}{final.name}"
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, f"rank{rank}", tensors)
    write = _Write(final, tmp, sum(t.numel() * t.element_size() for t in tensors.values()) * world)
    write.phase(lambda: _prepare(root, tmp) if rank == 0 else None)
    write.phase(lambda: _write_rank(tmp, rank, tensors, tree))
    write.phase(lambda: _publish(root, tmp, final, step, world, keep) if rank == 0 else None)
    return final


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def _write_rank(tmp: Path, rank: int, tensors: dict[str, torch.Tensor], tree: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)))
    _write_json(tmp / f"rank{rank}.json", tree)


def _publish(root: Path, tmp: Path, final: Path, step: int, world: int, keep: int) -> None:
    """Rank 0, once every rank has written: the manifest, the rename, the rotation."""
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


class _Write:
    """One checkpoint being written: its phases, each ended by every rank learning whether any
    rank failed (so that no rank waits for one that gave up), and the error they all raise."""

    def __init__(self, final: Path, tmp: Path, nbytes: int) -> None:
        self.final, self.tmp, self.nbytes = final, tmp, nbytes

    def phase(self, action: Callable[[], None]) -> None:
        causes: dict[int, str] = {}
        failure: BaseException | None = None
        try:
            action()
        except (CheckpointException, Exception) as error:  # noqa: BLE001 - every rank raises
            causes, failure = _rank_causes(error), error
        everyone = gather_errors(causes or None)
        if not everyone:
            return
        merged = {rank: cause for each in everyone for rank, cause in each.items()}
        if _rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        _barrier()  # removed before anyone measures the free space
        raise CheckpointError(self.message(merged)) from failure

    def message(self, causes: dict[int, str]) -> str:
        """One line: what failed, the free space (and whether that is why), each rank's cause.
        A disk too full for the checkpoint shows as torch's "unexpected pos" on some ranks (a
        short write), so the free space decides, not the causes alone."""
        listed = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(causes.items()))
        head = f"cannot write checkpoint {str(self.final)!r}"
        free = _free_bytes(self.final.parent)
        if free is None:
            return f"{head}: {listed}"
        space = f"{_size(free)} free, and the checkpoint needs about {_size(self.nbytes)}"
        fix = "free space there, keep fewer checkpoints, or save them on another file system"
        if free < self.nbytes + self.nbytes // 4 + (64 << 10):  # files take whole blocks
            return f"{head}: the disk is full: its file system has {space}; {fix} ({listed})"
        if any(s in listed for s in _NO_SPACE):
            return f"{head}: no space left on the device (now {space}: a quota?); {fix} ({listed})"
        return f"{head}: {listed} ({_size(free)} free on its file system)"


def _rank_causes(error: BaseException) -> dict[int, str]:
    """``{rank: cause}``: each rank's in torch's ``CheckpointException``, else this rank's."""
    if isinstance(error, CheckpointException) and error.failures:
        return {rank: _first_line(cause) for rank, (cause, _) in error.failures.items()}
    return {_rank(): _first_line(error)}


def _free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the file system of ``folder`` (or of its nearest parent)."""
    for path in (folder, *folder.parents):
        try:
            return shutil.disk_usage(path).free
        except OSError:
            continue
    return None


def _size(nbytes: float) -> str:
    """``nbytes`` for a person: 512 bytes, 96.0 KiB, 1.5 GiB."""
    if nbytes < 1024:
        return f"{nbytes:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "TiB":
            break
    return f"{nbytes:.1f} {unit}"


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
    tree, _, templates = _agreed(lambda: _prepare_load(path, _rank(), [], ()))
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
    others = list(range(rank % world, saved, world))
    tree, summed, templates = _agreed(lambda: _prepare_load(path, rank % saved, others, average))
    _dcp_load(templates, path)
    for key in average:
        _average_into(key, tree, summed, templates, saved)
    return _join(tree, templates)


def _prepare_load(
    path: Path, rank: int, others: list[int], average: Collection[str]
) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    """What this rank reads before the collective read of the tensors: saved rank ``rank``'s
    tree, the trees of the saved ranks ``others`` whose ``average`` keys it sums, and an empty
    tensor for each tensor to read. Raises ``CheckpointError`` for anything malformed."""
    tree = _read_tree(path, rank)
    summed = {i: _read_tree(path, i) for i in others}
    templates: dict[str, torch.Tensor] = {}
    _templates(tree, templates, path)
    for other in summed.values():
        _templates({k: other.get(k) for k in average}, templates, path)
    for key in average:
        layout = _layout(tree.get(key), templates)
        for i, other in summed.items():
            if _layout(other.get(key), templates) != layout:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: rank {i} saved a different {key!r} than rank "
                    f"{rank}, so the replicas cannot be averaged; resume with --nproc "
                    f"{saved_world_size(path)}"
                )
    return tree, summed, templates


def _layout(tree: Any, tensors: dict[str, torch.Tensor]) -> list[tuple[str, Any, Any]]:
    return [(name, tensors[k].shape, tensors[k].dtype) for name, k in _float_leaves(tree)]


def _average_into(
    key: str,
    tree: dict[str, Any],
    summed: dict[int, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    saved: int,
) -> None:
    """Overwrite the floating-point tensors of ``tree[key]`` with the mean over the saved
    ranks (this rank contributes the replicas in ``summed``, whose layout ``_prepare_load``
    checked)."""
    mine = list(_float_leaves(tree.get(key)))
    total = torch.zeros(sum(tensors[k].numel() for _, k in mine), dtype=torch.float64)
    for other in summed.values():
        theirs = list(_float_leaves(other.get(key)))
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
        manifest = read_json(manifest_path)
    except CheckpointError as error:
        return f"{error}; resume from an earlier checkpoint"
    files, world = _manifest_files(manifest)
    if files is None or world is None:
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


def _manifest_files(manifest: Any) -> tuple[dict[str, dict[str, Any]] | None, int | None]:
    """The manifest's files (plain names, each with its size and checksum) and world size, or
    None for what is malformed."""
    if not isinstance(manifest, dict):
        return None, None
    files, world = manifest.get("files"), manifest.get("world_size")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        world = None
    if not isinstance(files, dict) or not all(
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        for name, entry in files.items()
    ):
        files = None
    return files, world


# --- reading and writing through DCP ------------------------------------------------------------


def read_json(file: Path) -> Any:
    """The JSON value in ``file``, or ``CheckpointError`` naming the file and what is wrong with
    it: unreadable, not JSON, or nested more than ``MAX_DEPTH`` levels (never a
    ``RecursionError``)."""
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {str(file)!r}: {error.strerror or error}") from None
    except RecursionError:
        raise CheckpointError(
            f"{str(file)!r} is damaged: nested too deep to read (a checkpoint's JSON is at most "
            f"{MAX_DEPTH} levels deep)"
        ) from None
    except ValueError as error:  # not UTF-8, not JSON
        raise CheckpointError(f"{str(file)!r} is damaged: not JSON ({error})") from None
    if _deeper_than(value, MAX_DEPTH):
        raise CheckpointError(
            f"{str(file)!r} is damaged: nested more than {MAX_DEPTH} levels deep, which no "
            "checkpoint is"
        )
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value``'s lists and dicts nest more than ``limit`` levels (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _read_tree(path: Path, rank: int) -> Any:
    tree = read_json(path / f"rank{rank}.json")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{str(path / f'rank{rank}.json')!r} is damaged: not a state")
    return tree


def _agreed(read: Callable[[], Any]) -> Any:
    """``read()`` on every rank, and then, if it failed on any, the same ``CheckpointError`` on
    every rank (before a collective read that the failed rank would not join)."""
    value, error = None, None
    try:
        value = read()
    except CheckpointError as failure:
        error = str(failure)
    errors = gather_errors(error)
    if errors:
        raise CheckpointError("; ".join(dict.fromkeys(errors)))
    return value


def _dcp_load(templates: dict[str, torch.Tensor], path: Path) -> None:
    with _torch_errors(f"cannot read checkpoint {str(path)!r}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(templates, storage_reader=SafeFileSystemReader(str(path)))


@contextlib.contextmanager
def _torch_errors(what: str) -> Iterator[None]:
    """Turn torch's ``CheckpointException`` (a ``BaseException``) and ``OSError`` into a
    ``CheckpointError`` that says what failed on which rank."""
    try:
        yield
    except (CheckpointException, OSError) as error:
        listed = "; ".join(f"rank {r}: {c}" for r, c in sorted(_rank_causes(error).items()))
        raise CheckpointError(f"{what}: {listed}") from error


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


def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor], depth: int = 1) -> Any:
    """JSON for ``obj``; its tensors are moved to ``tensors`` under keys rooted at ``key``."""
    if depth > MAX_DEPTH - 2:  # a dict of non-string keys adds two levels
        raise ValueError(
            f"cannot checkpoint {key!r}: the state nests more than {MAX_DEPTH - 2} levels deep"
        )
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach()
        return {"__tensor__": key, "shape": list(obj.shape), "dtype": str(obj.dtype)[6:]}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj)
        held = str(tensors[key].dtype)[6:]
        return {"__ndarray__": key, "shape": list(obj.shape), "dtype": held, "np": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, f"{key}/{k}", tensors, depth + 1) for k, v in obj.items()}
        items = [[k, _split(v, f"{key}/{k}", tensors, depth + 1)] for k, v in obj.items()]
        return {"__items__": items}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors, depth + 1) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key!r}")


def _templates(tree: Any, out: dict[str, torch.Tensor], path: Path) -> None:
    """An empty tensor in ``out`` for each tensor leaf of ``tree``; ``CheckpointError`` for a
    leaf or a pair of ``__items__`` that the file could not have been written with."""
    if isinstance(tree, dict):
        key = tree.get("__tensor__", tree.get("__ndarray__"))
        if isinstance(key, str):
            out[key] = _template(tree, path)
            return
        items = tree.get("__items__", tree.items())
        if not isinstance(items, (list, type(tree.items()))) or not all(
            isinstance(item, (list, tuple)) and len(item) == 2 and _is_key(item[0])
            for item in items
        ):
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: a malformed mapping")
        for value in items:
            _templates(value[1], out, path)
    elif isinstance(tree, list):
        for value in tree:
            _templates(value, out, path)


def _is_key(key: Any) -> bool:
    return key is None or isinstance(key, (str, int, float, bool))


def _template(leaf: dict[str, Any], path: Path) -> torch.Tensor:
    shape: Any = leaf.get("shape")
    ok = isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    if "__ndarray__" in leaf:
        try:
            ok = ok and isinstance(leaf.get("np"), str) and np.dtype(leaf["np"]) is not None
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: a malformed tensor entry")
    try:
        return torch.empty(shape, dtype=_dtype(leaf.get("dtype")))
    except RuntimeError as error:  # e.g. a shape too big to allocate
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: a tensor of shape {shape}: {error}"
        ) from None


def _dtype(name: Any) -> torch.dtype:
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


def gather_errors(error: Any) -> list[Any]:
    """Every rank's ``error`` that is not None, in rank order, on every rank (collective): so
    that a failure on one rank is raised on all, and none waits for a rank that gave up."""
    if not _distributed() or _world() == 1:
        return [] if error is None else [error]
    box: list[Any] = [None] * _world()
    dist.all_gather_object(box, error)
    return [e for e in box if e is not None]


def _broadcast(value: Any) -> Any:
    if not _distributed() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

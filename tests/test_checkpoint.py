"""Checkpoints: every rank's state round-trips, writes are atomic, damage is caught on load
(malformed or too deeply nested JSON included: never a traceback), loading runs no planted code,
torch's failures keep their cause, a failed write fails every rank alike and says the free space,
and a checkpoint of p ranks loads on q as the exact average of its replicas."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _dist import run_world
from _manifest import rewrite_manifest

from gossipgrad import checkpoint
from gossipgrad.checkpoint import CheckpointError


def _state(seed: int) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        x = torch.randn(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),  # int keys, tuples, None
        "numpy": np.random.default_rng(seed).integers(0, 2**32, 5, dtype=np.uint32),
        "python": random.Random(seed).getstate(),
        "tensors": [torch.arange(seed, seed + 4)],
        "nothing": None,
        "step": seed,
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and (a == b).all()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_and_keep_last(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        path = checkpoint.save(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step_00000020",
        "step_00000030",
    ]
    loaded = checkpoint.load(path)
    _assert_same(_state(30), loaded)
    opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(loaded["optim"])  # int keys came back as ints
    assert set(opt.state_dict()["state"]) == {0, 1}


def test_crash_mid_write_leaves_previous_intact(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 10, _state(10))
    partial = tmp_path / ".tmp-step_00000020"  # what a crash during save(step 20) leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    state, path = checkpoint.load_latest(tmp_path)
    assert path.name == "step_00000010"
    _assert_same(_state(10), state)
    checkpoint.save(tmp_path, 20, _state(20))  # the next save clears the debris
    assert not partial.exists()
    assert checkpoint.load_latest(tmp_path)[1].name == "step_00000020"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_refused_and_previous_loads(tmp_path: Path, damage: str) -> None:
    checkpoint.save(tmp_path, 10, _state(10))
    latest = checkpoint.save(tmp_path, 20, _state(20))
    data = next(latest.glob("*.distcp"))
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        data.unlink()
    with pytest.raises(CheckpointError, match=rf"step_00000020.* is corrupt: {data.name} "):
        checkpoint.load(latest)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        state, path = checkpoint.load_latest(tmp_path)
    assert path.name == "step_00000010"
    _assert_same(_state(10), state)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint.load(tmp_path)
    assert checkpoint.load_latest(tmp_path / "missing") is None


def _ranks_save_and_load(rank: int, world: int, folder: str) -> list[float]:
    # Same keys on every rank, different values: DCP alone would keep only one of them.
    state = {"model": {"w": torch.full((4,), float(rank))}, "rank": rank}
    checkpoint.save(folder, 5, state)
    back = checkpoint.load(Path(folder) / "step_00000005")
    assert back["rank"] == rank
    return back["model"]["w"].tolist()


def test_every_rank_gets_its_own_replica_back(tmp_path: Path) -> None:
    results = run_world(_ranks_save_and_load, 2, str(tmp_path))
    assert results == [[0.0] * 4, [1.0] * 4]
    with pytest.raises(CheckpointError, match="written by 2 ranks but this run has 1"):
        checkpoint.load(tmp_path / "step_00000005")


class _Payload:
    """Unpickling this runs ``os.system`` (a planted checkpoint's payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_metadata_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    older = checkpoint.save(tmp_path / "ckpt", 10, _state(10))
    planted = checkpoint.save(tmp_path / "ckpt", 20, _state(20))
    marker = tmp_path / "payload-ran"
    (planted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    rewrite_manifest(planted)
    assert checkpoint.validate(planted) is None  # the manifest alone cannot tell
    with pytest.raises(CheckpointError, match=r"names posix\.system.*refused"):
        checkpoint.load(planted)
    assert not marker.exists()
    with pytest.warns(RuntimeWarning, match="refused"):
        state, path = checkpoint.load_latest(tmp_path / "ckpt")
    assert path == older and not marker.exists()
    _assert_same(_state(10), state)


def test_metadata_entries_must_be_tensors(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, 10, _state(10))
    # a well-formed DCP entry that is not a tensor would be read with torch.load(weights_only=False)
    dcp.save({"rank0/extra": io.BytesIO(b"x")}, storage_writer=dcp.FileSystemWriter(str(path)))
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="BytesStorageMetadata.*refused"):
        checkpoint.load(path)


def test_a_full_disk_is_named_in_the_error(tmp_path: Path, monkeypatch) -> None:
    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(tmp_path, 10, _state(10))
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {str(tmp_path / 'step_00000010')!r}: ")
    assert "OSError: [Errno 28] No space left on device" in message and "\n" not in message
    assert isinstance(info.value.__cause__, BaseException)  # torch's CheckpointException, kept
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_rotation_deletes_only_older_checkpoints(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    (tmp_path / "step_00000030" / checkpoint.MANIFEST).unlink()  # a damaged newest one
    checkpoint.save(tmp_path, 25, _state(25), keep=1)  # a run resumed from 20 saves 25
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path, incomplete=True)]
    assert names == ["step_00000025", "step_00000030"]  # 30 is newer: not this save's to delete


def test_remove_partial_clears_interrupted_saves(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 10, _state(10))
    (tmp_path / ".tmp-step_00000020").mkdir()
    (tmp_path / ".tmp-step_00000020" / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in checkpoint.remove_partial(tmp_path)] == [".tmp-step_00000020"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


def _average_on(rank: int, world: int, folder: str) -> list[float]:
    state = checkpoint.load_resharded(Path(folder) / "step_00000005", average=["model"])
    assert state["rank"] == rank % 3  # what is not averaged comes from rank r % p
    return state["model"]["w"].tolist() + state["model"]["n"].tolist()


def test_load_resharded_averages_the_saved_replicas_for_any_world(tmp_path: Path) -> None:
    def saved(rank: int, world: int, folder: str) -> None:
        state = {"model": {"w": torch.full((2,), 2.0**rank), "n": torch.tensor([rank])}}
        checkpoint.save(folder, 5, {**state, "rank": rank})

    run_world(saved, 3, str(tmp_path))
    mean = torch.tensor((1 + 2 + 4) / 3, dtype=torch.float32).item()  # exact, then rounded
    for world in (1, 2, 4):
        results = run_world(_average_on, world, str(tmp_path))
        assert [r[:2] for r in results] == [[mean, mean]] * world
        assert [r[2] for r in results] == [r % 3 for r in range(world)]  # integers: not averaged


class _Usage:
    """What ``shutil.disk_usage`` answers on a nearly full disk."""

    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 2 << 20, (2 << 20) - free, free


def test_a_full_disk_is_named_when_torch_only_says_unexpected_pos(
    tmp_path: Path, monkeypatch
) -> None:
    """torch's short write on a full disk (issue 26, case 10): the free space names the cause.
    The full disk is emulated in-process (the real one: tests/train/test_restart.py)."""

    def short_write(self, plan, planner):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _path: _Usage(16 << 10))
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(tmp_path, 10, _state(10))
    message = str(info.value)
    assert message.startswith(
        f"cannot write checkpoint {str(tmp_path / 'step_00000010')!r}: the disk is full: its "
        "file system has 16.0 KiB free, and the checkpoint needs about "
    ), message
    assert "free space there, keep fewer checkpoints" in message and "\n" not in message
    assert "(rank 0: RuntimeError: [enforce fail at inline_container.cc:672]" in message
    assert not list(tmp_path.iterdir())


def test_any_other_write_failure_still_says_the_free_space(tmp_path: Path, monkeypatch) -> None:
    def denied(self, plan, planner):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", denied)
    with pytest.raises(CheckpointError, match=r": rank 0: PermissionError: .*\(.* free on its"):
        checkpoint.save(tmp_path, 10, _state(10))


def _one_rank_cannot_write(rank: int, world: int, folder: str) -> str:
    if rank == 1:  # its own JSON fails after DCP's collective write succeeded everywhere
        written = checkpoint._write_json

        def full(path: Path, obj) -> None:
            if path.name == "rank1.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            written(path, obj)

        checkpoint._write_json = full
    try:
        checkpoint.save(folder, 5, {"w": torch.full((4,), float(rank))})
    except CheckpointError as error:
        return str(error)
    return "saved"


def test_a_write_failing_on_one_rank_fails_every_rank_alike(tmp_path: Path) -> None:
    """No rank waits for one that gave up: every rank raises the same error at once."""
    messages = run_world(_one_rank_cannot_write, 2, str(tmp_path), timeout=60)
    assert messages[0] == messages[1], messages
    assert "rank 1: OSError: [Errno 28] No space left on device" in messages[0]
    assert not list(tmp_path.iterdir())  # nothing half-written is left


@pytest.mark.parametrize("depth", [100, 100_000])
def test_json_nested_too_deep_is_damaged_and_skipped(tmp_path: Path, depth: int) -> None:
    """Issue 26, case 6: a rank's JSON nested 100,000 deep (manifest recomputed) is a damaged
    checkpoint, never a RecursionError; so is one deeper than any checkpoint (100)."""
    older = checkpoint.save(tmp_path, 10, _state(10))
    newest = checkpoint.save(tmp_path, 20, _state(20))
    (newest / "rank0.json").write_text("[" * depth + "]" * depth)
    rewrite_manifest(newest)
    said = "nested too deep to read" if depth > 1000 else "nested more than 64 levels deep"
    with pytest.raises(CheckpointError, match=f"rank0.json' is damaged: {said}"):
        checkpoint.load(newest)
    with pytest.warns(RuntimeWarning, match="is damaged"):
        state, path = checkpoint.load_latest(tmp_path)
    assert path == older
    _assert_same(_state(10), state)


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        '{"files": [], "world_size": 1}',
        '{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}, "world_size": 1}',
        '{"files": {"rank0.json": 3}, "world_size": 1}',
        '{"files": {}, "world_size": "one"}',
        "\xff\xfe not utf-8",
    ],
)
def test_a_malformed_manifest_is_named_in_one_line(tmp_path: Path, manifest: str) -> None:
    path = checkpoint.save(tmp_path, 10, _state(10))
    (path / checkpoint.MANIFEST).write_bytes(manifest.encode("latin-1"))
    problem = checkpoint.validate(path)
    assert problem is not None and "manifest.json" in problem and "\n" not in problem, problem
    with pytest.raises(CheckpointError, match="manifest.json"):
        checkpoint.load(path)


def _tampered_leaf(path: Path, leaf: dict) -> None:
    tree = json.loads((path / "rank0.json").read_text())
    tree["model"]["weight"] = leaf
    (path / "rank0.json").write_text(json.dumps(tree))
    rewrite_manifest(path)


@pytest.mark.parametrize(
    "leaf",
    [
        {"__tensor__": "rank0/model/weight", "shape": "two", "dtype": "float32"},
        {"__tensor__": "rank0/model/weight", "shape": [2, 3], "dtype": "os.system"},
        {"__ndarray__": "rank0/model/weight", "shape": [2, 3], "dtype": "float32"},
        {"__items__": [[["a list as a key"], 1]]},
    ],
)
def test_a_malformed_tensor_entry_is_damage_not_a_traceback(tmp_path: Path, leaf: dict) -> None:
    path = checkpoint.save(tmp_path, 10, _state(10))
    _tampered_leaf(path, leaf)
    with pytest.raises(CheckpointError, match="is damaged|not a dtype"):
        checkpoint.load(path)

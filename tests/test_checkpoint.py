"""Checkpoints: every rank's state round-trips, writes are atomic, damage is caught on load,
loading runs no planted code, torch's failures keep their cause, and a checkpoint of p ranks loads
on q as the exact average of its replicas."""

from __future__ import annotations

import errno
import hashlib
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


def _rewrite_manifest(path: Path) -> None:
    """Recompute the manifest, as whoever planted a file would (it has no key)."""
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_a_planted_metadata_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    older = checkpoint.save(tmp_path / "ckpt", 10, _state(10))
    planted = checkpoint.save(tmp_path / "ckpt", 20, _state(20))
    marker = tmp_path / "payload-ran"
    (planted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(planted)
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
    _rewrite_manifest(path)
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

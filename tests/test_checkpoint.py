"""Checkpoints: every rank's state round-trips, writes are atomic, damage is caught on load."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
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

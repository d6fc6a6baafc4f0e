"""The gossip shuffle: pure planning for every world size (no processes), then real exchanges of
ids and samples over gloo, resume, and bad input."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
import torch
from _dist import run_world
from torch.utils.data import DataLoader, DistributedSampler

from gossipgrad._shuffle_plan import (
    check_shards,
    exchange_count,
    label_skew_shards,
    plan_epoch,
    simulate,
    strided_shard,
)
from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler


def _odd_length(world: int) -> int:
    """A dataset length that ``world`` (> 1) does not divide."""
    return 5 * world + max(1, world // 2)


def _uneven_shards(n: int, world: int, seed: int) -> list[np.ndarray]:
    """A random partition with shard sizes far from equal (each at least 1)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), world - 1, replace=False))
    return np.split(rng.permutation(n), cuts)


# --- pure planning -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("start", ["strided", "label_skew", "uneven"])
def test_shards_stay_a_partition_and_each_epoch_visits_every_sample(
    world: int, drop_last: bool, start: str
) -> None:
    n = _odd_length(world)
    if start == "strided":
        shards = [strided_shard(n, r, world) for r in range(world)]
    elif start == "label_skew":
        shards = label_skew_shards(np.arange(n) % 3, world)
    else:
        shards = _uneven_shards(n, world, seed=world) if world > 1 else [np.arange(n)]
    sizes = [s.size for s in shards]
    length = min(sizes) if drop_last else max(sizes)
    for epoch in simulate(shards, 15, seed=7, fraction=0.4, drop_last=drop_last):
        held = [shard for shard, _ in epoch]
        assert [s.size for s in held] == sizes  # exchanged counts keep every shard's size
        assert np.array_equal(np.sort(np.concatenate(held)), np.arange(n))  # disjoint, complete
        visits = Counter()
        for shard, visited in epoch:
            assert visited.size == length
            assert set(visited.tolist()) <= set(shard.tolist())
            visits.update(visited.tolist())
        if drop_last:
            assert max(visits.values()) == 1 and len(visits) == world * length
        else:
            assert set(visits) == set(range(n))  # every sample once, plus the padding
            assert sum(visits.values()) - n == world * length - n


def test_samples_travel_between_ranks_and_stay_put_with_fraction_zero() -> None:
    world, n, epochs = 4, 42, 10
    shards = [strided_shard(n, r, world) for r in range(world)]

    def homes(fraction: float) -> dict[int, set[int]]:
        where: dict[int, set[int]] = {i: set() for i in range(n)}
        for epoch in simulate(shards, epochs, seed=1, fraction=fraction):
            for rank, (shard, _) in enumerate(epoch):
                for i in shard.tolist():
                    where[i].add(rank)
        return where

    moved = [len(ranks) for ranks in homes(0.25).values()]
    assert sum(m >= 2 for m in moved) >= 0.8 * n  # ~94% expected: 1 - 0.75**10
    assert max(moved) >= 3
    assert all(len(ranks) == 1 for ranks in homes(0.0).values())


def test_fraction_one_moves_the_whole_shard_each_epoch() -> None:
    shards = [strided_shard(24, r, 4) for r in range(4)]
    epochs = list(simulate(shards, 3, fraction=1.0))
    for before, after in zip(epochs, epochs[1:], strict=False):
        for (old, _), (new, _) in zip(before, after, strict=True):
            assert not set(old.tolist()) & set(new.tolist())


def test_plan_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    def plan(seed: int, epoch: int) -> tuple[list[int], list[int]]:
        p = plan_epoch(2, epoch, 50, world_size=4, seed=seed, count=12, length=50)
        return p.order.tolist(), p.leaving.tolist()

    assert plan(5, 3) == plan(5, 3)
    assert plan(5, 3) != plan(6, 3)
    assert plan(5, 3) != plan(5, 4)
    order, leaving = plan(5, 3)
    assert sorted(order) == list(range(50)) and len(set(leaving)) == 12


def test_exchange_count_uses_the_smallest_shard() -> None:
    assert exchange_count([6, 5, 6], 0.5) == 2
    assert exchange_count([6, 5], 1.0) == 5
    assert exchange_count([9], 1.0) == 0  # one rank: nothing to exchange


def test_label_skew_shards_give_each_rank_few_classes() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 18))  # 10 classes
    shards = label_skew_shards(labels, 4)
    check_shards(shards, 180, 4)
    assert [s.size for s in shards] == [45] * 4
    assert [len(set(labels[s].tolist())) for s in shards] == [3, 3, 3, 3]


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ([[0, 1], [1, 2, 3]], "disjoint"),
        ([[0, 1], [2]], "cover"),
        ([[0, 1, 2, 3]], "world size is 2"),
        ([[0, 1, 2, 3], []], "rank 1 no samples"),
    ],
)
def test_check_shards_rejects_bad_partitions(shards: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_shards(shards, 4, 2)


@pytest.mark.parametrize("world", range(1, 6))
@pytest.mark.parametrize("n", [20, 23])
def test_without_shuffling_epoch_zero_is_distributed_samplers_order(world: int, n: int) -> None:
    shards = [strided_shard(n, r, world) for r in range(world)]
    for drop_last in (True, False) if n % world == 0 else (True,):
        first = next(simulate(shards, 1, fraction=0.0, shuffle=False, drop_last=drop_last))
        for rank, (_, visited) in enumerate(first):
            reference = DistributedSampler(range(n), world, rank, False, drop_last=drop_last)
            assert visited.tolist() == list(reference)


# --- one process, no process group ------------------------------------------------------------


def test_single_process_needs_no_communication() -> None:
    sampler = GossipShuffleSampler(range(10), seed=4)
    assert len(sampler) == 10 and sampler.exchange_count == 0
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != first


def _checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_resume_mid_epoch_in_one_process() -> None:
    whole = GossipShuffleSampler(range(13), seed=2)
    expected = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        expected += list(whole)
    first = GossipShuffleSampler(range(13), seed=2)
    seen = list(first)
    first.set_epoch(1)
    it = iter(first)
    seen += [next(it) for _ in range(5)]
    resumed = GossipShuffleSampler(range(13), seed=2)
    resumed.load_state_dict(_checkpoint(first.state_dict()))
    resumed.set_epoch(1)
    seen += list(resumed)
    resumed.set_epoch(2)
    seen += list(resumed)
    assert seen == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shuffle_fraction": -0.1}, r"shuffle_fraction must be in \[0, 1\]"),
        ({"shuffle_fraction": 1.5}, r"shuffle_fraction must be in \[0, 1\]"),
        ({"shuffle_fraction": "half"}, "shuffle_fraction must be a number"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"schedule": "star"}, "schedule must be one of"),
        ({"num_replicas": 2}, "needs torch.distributed initialised"),
        ({"initial_shards": [[0, 1], [2, 3]]}, "world size is 1"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GossipShuffleSampler(range(4), **options)


def test_bad_use_is_explained() -> None:
    with pytest.raises(ValueError, match="fewer than the world size 1"):
        GossipShuffleSampler([])
    sampler = GossipShuffleSampler(range(6), seed=1)
    sampler.set_epoch(3)
    with pytest.raises(ValueError, match="only moves forward"):
        sampler.set_epoch(2)
    other = GossipShuffleSampler(range(6), seed=2)
    with pytest.raises(ValueError, match="seed=1"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="one row per sample"):
        GossipShuffleDataset(torch.zeros(5, 2), torch.zeros(4))


# --- several ranks over gloo ------------------------------------------------------------------


def _gossip(rank: int, world: int, n: int, epochs: int, drop_last: bool) -> dict:
    """Ids through a DataLoader, and samples (rows that encode their ids) through the dataset."""
    sampler = GossipShuffleSampler(range(n), seed=3, drop_last=drop_last, shuffle_fraction=0.3)
    loader = DataLoader(range(n), batch_size=4, sampler=sampler)
    mine = strided_shard(n, rank, world)
    x = torch.from_numpy(mine).double()[:, None] * torch.tensor([1.0, -2.0])
    ids = torch.from_numpy(mine)
    data = GossipShuffleDataset(
        x, ids % 7, ids=ids, seed=3, drop_last=drop_last, shuffle_fraction=0.3
    )
    data_loader = DataLoader(data, batch_size=3, sampler=data.sampler)
    out: dict = {"len": len(sampler), "shards": [], "visited": [], "rows_ok": True, "rows": []}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        out["shards"].append(sampler.shard.tolist())
        out["visited"].append(torch.cat(list(loader)).tolist())
        out["rows"].append(torch.cat([xb[:, 0] for xb, _ in data_loader]).long().tolist())
        ids, (xs, ys) = data.ids, data.tensors
        out["rows_ok"] &= bool((xs[:, 1] == -2 * ids).all() and (ys == ids % 7).all())
    sampler.flush()
    data.flush()
    out["final_ids"] = data.ids.tolist()
    return out


@pytest.mark.parametrize(("world", "drop_last"), [(2, False), (3, True), (4, False)])
def test_ranks_exchange_ids_and_samples_as_planned(world: int, drop_last: bool) -> None:
    n, epochs = _odd_length(world), 6
    results = run_world(_gossip, world, n, epochs, drop_last)
    shards = [strided_shard(n, r, world) for r in range(world)]
    reference = list(simulate(shards, epochs, seed=3, fraction=0.3, drop_last=drop_last))
    assert len({r["len"] for r in results}) == 1
    for epoch in range(epochs):
        for rank, result in enumerate(results):
            shard, visited = reference[epoch][rank]
            assert result["shards"][epoch] == shard.tolist()
            assert result["visited"][epoch] == visited.tolist()
            # the samples travelled with their ids and come out in the same order as the ids
            assert result["rows"][epoch] == visited.tolist()
    assert all(r["rows_ok"] for r in results)
    arrived = [set(r["final_ids"]) - set(s.tolist()) for r, s in zip(results, shards, strict=True)]
    assert all(arrived)  # every rank holds samples it never had locally
    assert sorted(i for r in results for i in r["final_ids"]) == list(range(n))


def _resume(rank: int, world: int, n: int) -> dict:
    def ids(sampler: GossipShuffleSampler, epochs: range) -> list[int]:
        seen = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            seen += list(sampler)
        return seen

    whole = GossipShuffleSampler(range(n), seed=9)
    expected = ids(whole, range(4))
    first = GossipShuffleSampler(range(n), seed=9)
    seen = ids(first, range(2))
    end_of_epoch_1 = _checkpoint(first.state_dict())
    first.set_epoch(2)
    it = iter(first)
    seen += [next(it) for _ in range(3)]
    mid_epoch_2 = _checkpoint(first.state_dict())
    resumed = GossipShuffleSampler(range(n), seed=9)
    resumed.load_state_dict(mid_epoch_2)
    resumed.set_epoch(2)
    mid = seen + list(resumed) + ids(resumed, range(3, 4))
    late = GossipShuffleSampler(range(n), seed=9)
    late.load_state_dict(end_of_epoch_1)  # the exchange of epoch 1 is redone at set_epoch(2)
    late_seen = seen[: 2 * len(late)] + ids(late, range(2, 4))
    for s in (whole, first, resumed, late):
        s.flush()
    return {"expected": expected, "mid": mid, "late": late_seen}


def test_resume_from_a_checkpoint_gives_the_uninterrupted_sequence() -> None:
    for result in run_world(_resume, 3, 20):
        assert result["mid"] == result["expected"]
        assert result["late"] == result["expected"]


def _mismatch(rank: int, world: int, case: str) -> str:
    try:
        if case == "length":
            GossipShuffleSampler(range(10 + rank))
        elif case == "seed":
            GossipShuffleSampler(range(10), seed=rank)
        elif case == "small":
            GossipShuffleSampler(range(1))
        elif case == "empty":
            GossipShuffleDataset(torch.zeros(3 * rank, 2))
        else:
            GossipShuffleDataset(torch.zeros(3, 2 + rank))
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("length", r"len\(dataset\) differs across ranks \(\[10, 11\], by rank\)"),
        ("seed", "seed differs across ranks"),
        ("small", "1 samples, fewer than the world size 2"),
        ("empty", "rank 0 holds no samples"),
        ("shapes", "row shapes and dtypes differs across ranks"),
    ],
)
def test_ranks_that_disagree_all_get_a_clear_error(case: str, message: str) -> None:
    for text in run_world(_mismatch, 2, case):
        assert re.search(message, text), text

"""Work balancing in the gossip shuffle: the pure count rule and its reference model, then real
gloo ranks that report fixed speeds and must match the reference exactly, the batch sampler's
lockstep, resume, and bad input."""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from _dist import run_world
from _toy import flat, toy_model
from torch.utils.data import DataLoader

from gossipgrad import GossipDataParallel
from gossipgrad._shuffle_plan import (
    balanced_count,
    exchange_count,
    min_shard,
    simulate,
    strided_shard,
)
from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler

# --- pure ---------------------------------------------------------------------------------------


def test_at_most_one_direction_of_a_pair_moves_extra_rows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n_a, n_b = (int(x) for x in rng.integers(1, 500, 2))
        v_a, v_b = (float(x) for x in rng.uniform(0.01, 10.0, 2))
        extra_ab = balanced_count(n_a, v_a, n_b, v_b, 0, 0)
        extra_ba = balanced_count(n_b, v_b, n_a, v_a, 0, 0)
        assert extra_ab == 0 or extra_ba == 0
        assert extra_ab <= n_a and extra_ba <= n_b
    # slow to fast: half of the 20 rows after which 40/1 == 80/2 (each rank is in two transfers)
    assert balanced_count(60, 1.0, 60, 2.0, 0, 0) == 10
    assert balanced_count(60, 2.0, 60, 1.0, 0, 0) == 0  # the fast one sends nothing extra
    assert balanced_count(60, 1.0, 60, 2.0, 5, 0) == 15  # on top of the plain shuffle
    assert balanced_count(60, 2.0, 60, 1.0, 15, 0) == 5  # fewer than the plain shuffle's 15
    assert balanced_count(50, 1.0, 50, 1.0, 7, 3) == 7  # equal: the plain shuffle only


def test_clamping_keeps_every_shard_at_the_minimum() -> None:
    n, world = 400, 4
    minimum = min_shard(n, world)
    assert minimum == math.ceil(n / (8 * world)) == 13
    assert balanced_count(20, 1.0, 100, 1e9, 10, minimum) == 20 - minimum
    assert balanced_count(minimum, 1.0, 100, 1e9, 10, minimum) == 0
    assert balanced_count(5, 1.0, 100, 1.0, 10, minimum) == 0  # under the minimum: sends nothing
    shards = [strided_shard(n, r, world) for r in range(world)]
    for epoch in simulate(shards, 12, seed=1, fraction=0.1, speeds=[1.0, 1e6, 1e6, 3.0]):
        assert min(shard.size for shard, _ in epoch) >= minimum
    assert epoch[0][0].size < 2 * minimum  # the slow rank did shrink to about the minimum


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_simulated_balance_visits_everything_once_and_converges(fraction: float) -> None:
    n, world, speeds = 400, 4, [1.0, 2.0, 2.0, 2.0]
    shards = [strided_shard(n, r, world) for r in range(world)]
    epochs = list(simulate(shards, 8, seed=5, fraction=fraction, speeds=speeds))
    for epoch in epochs:
        held = np.concatenate([shard for shard, _ in epoch])
        visited = np.concatenate([v for _, v in epoch])
        assert np.array_equal(np.sort(held), np.arange(n))  # disjoint, covering
        assert np.array_equal(np.sort(visited), np.arange(n))  # every sample exactly once
        for shard, v in epoch:
            assert np.array_equal(np.sort(shard), np.sort(v))
    sizes = [shard.size for shard, _ in epochs[-1]]
    ideal = n / sum(speeds)
    assert max(s / v for s, v in zip(sizes, speeds, strict=True)) <= 1.1 * ideal
    assert sizes[0] < min(sizes[1:])


def test_a_very_slow_rank_is_not_refilled_by_the_plain_shuffle() -> None:
    # one rank 4x slower: its ideal share (N / 13 = 473) is below the minimum plus what the plain
    # shuffle brings in each epoch (192 + 384), where it would stay if its source kept sending
    # the plain shuffle's rows; sending a loaded partner fewer lets it shed them
    n, world, speeds = 6144, 4, [4.0, 4.0, 4.0, 1.0]
    shards = [strided_shard(n, r, world) for r in range(world)]
    *_, last = simulate(shards, 10, seed=0, fraction=0.25, speeds=speeds)
    sizes = [shard.size for shard, _ in last]
    assert sizes[3] < min_shard(n, world) + exchange_count([n // world] * world, 0.25)
    assert max(s / v for s, v in zip(sizes, speeds, strict=True)) <= 1.2 * n / sum(speeds)


def test_equal_speeds_keep_sizes_equal() -> None:
    for n, world in [(400, 4), (203, 4), (90, 3)]:
        shards = [strided_shard(n, r, world) for r in range(world)]
        sizes = [s.size for s in shards]
        for epoch in simulate(shards, 8, seed=2, speeds=[1.5] * world):
            assert [shard.size for shard, _ in epoch] == sizes


def test_balance_without_speeds_is_the_plain_shuffle() -> None:
    shards = [strided_shard(40, r, 4) for r in range(4)]
    assert exchange_count([s.size for s in shards], 0.25) == 2
    plain = list(simulate(shards, 4, seed=3))
    balanced = list(simulate(shards, 4, seed=3, speeds=[1.0] * 4))
    for a, b in zip(plain, balanced, strict=True):
        for (sa, va), (sb, vb) in zip(a, b, strict=True):
            assert np.array_equal(sa, sb) and np.array_equal(va, vb)


# --- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 1.0), r"samples=-1\) must be finite and >= 0"),
        ((1, -0.5), r"seconds=-0.5\) must be finite and >= 0"),
        ((1, float("nan")), r"seconds=nan\) must be finite"),
        ((float("inf"), 1.0), r"samples=inf\) must be finite"),
        (("10", 1.0), r"samples=...\) must be a number"),
        ((1, None), r"seconds=...\) must be a number"),
    ],
)
def test_bad_speed_reports_are_explained(args: tuple, message: str) -> None:
    sampler = GossipShuffleSampler(range(10), balance=True)
    with pytest.raises(ValueError, match=message):
        sampler.report_speed(*args)
    sampler.report_speed(np.int64(3), np.float32(0.5))  # numpy numbers are fine
    sampler.report_speed(0, 0.0)


def test_bad_batch_samplers_and_options_are_explained() -> None:
    balanced = GossipShuffleSampler(range(100), balance=True)
    with pytest.raises(ValueError, match="use batch_size >= 8"):
        balanced.batch_sampler(4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            balanced.batch_sampler(bad)
    plain = GossipShuffleSampler(range(100))
    assert len(plain.batch_sampler(4)) == 25  # any size without balance
    with pytest.raises(ValueError, match="balance=True visits every sample exactly once"):
        GossipShuffleSampler(range(100), balance=True, drop_last=True)
    with pytest.raises(ValueError, match="balance must be True or False"):
        GossipShuffleSampler(range(100), balance=1)
    with pytest.raises(ValueError, match="non-negative integer"):
        balanced.batch_sampler(8).weight(-1)
    with pytest.raises(ValueError, match="resume with the same balance"):
        plain.load_state_dict(balanced.state_dict())


def test_one_process_batches_cover_the_dataset() -> None:
    sampler = GossipShuffleSampler(range(50), seed=1, balance=True)
    batches = sampler.batch_sampler(batch_size=8)
    assert len(batches) == 7
    for epoch in range(3):
        batches.set_epoch(epoch)
        seen = list(batches)
        assert len(seen) == 7 and {len(b) for b in seen} <= {7, 8}
        assert sorted(i for b in seen for i in b) == list(range(50))
        assert sum(batches.weight(len(b)) for b in seen) == pytest.approx(7)


# --- several ranks over gloo ------------------------------------------------------------------


def _speed(rank: int) -> float:
    return 1.0 if rank == 0 else 2.0


def _balanced(rank: int, world: int, n: int, epochs: int, batch_size: int) -> dict:
    """Report a fixed speed per rank; record shards, batches (ids), and the dataset form's rows."""
    sampler = GossipShuffleSampler(range(n), seed=3, shuffle_fraction=0.2, balance=True)
    batches = sampler.batch_sampler(batch_size)
    loader = DataLoader(range(n), batch_sampler=batches)
    mine = torch.from_numpy(strided_shard(n, rank, world))
    data = GossipShuffleDataset(
        mine.double()[:, None] * 3.0, ids=mine, seed=3, shuffle_fraction=0.2, balance=True
    )
    data_batches = data.batch_sampler(batch_size)
    data_loader = DataLoader(data, batch_sampler=data_batches)
    out: dict = {"L": len(batches), "shards": [], "batches": [], "rows": [], "weights": []}
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        data.set_epoch(epoch)
        out["shards"].append(sampler.shard.tolist())
        got = [b.tolist() for b in loader]
        out["batches"].append(got)
        out["weights"].append(sum(batches.weight(len(b)) for b in got))
        out["rows"].append([(xb[:, 0] / 3.0).long().tolist() for (xb,) in data_loader])
        for b in got:  # every step: this rank's samples at its fixed speed
            sampler.report_speed(len(b), len(b) / _speed(rank))
        total = sum(map(len, got))
        data.report_speed(total, total / _speed(rank))  # or once per epoch, with the totals
    sampler.flush()
    data.flush()
    return out


@pytest.mark.parametrize(("world", "n"), [(2, 90), (4, 203)])
def test_balanced_ranks_match_the_reference_and_step_in_lockstep(world: int, n: int) -> None:
    epochs, batch_size = 6, 8
    results = run_world(_balanced, world, n, epochs, batch_size)
    shards = [strided_shard(n, r, world) for r in range(world)]
    speeds = [_speed(r) for r in range(world)]
    reference = list(simulate(shards, epochs, seed=3, fraction=0.2, speeds=speeds))
    steps = math.ceil(n / (world * batch_size))
    for epoch in range(epochs):
        visits: Counter[int] = Counter()
        for rank, result in enumerate(results):
            shard, visited = reference[epoch][rank]
            got = result["batches"][epoch]
            assert result["L"] == steps and len(got) == steps  # lockstep
            assert all(got) and max(map(len, got)) - min(map(len, got)) <= 1
            assert result["shards"][epoch] == shard.tolist()
            assert [i for b in got for i in b] == visited.tolist()
            assert result["rows"][epoch] == got  # the samples travelled the same way
            visits.update(i for b in got for i in b)
        assert visits == Counter(range(n))  # every sample exactly once per epoch
        assert sum(r["weights"][epoch] for r in results) == pytest.approx(steps * world)
    last = [len(r["shards"][-1]) for r in results]
    assert last[0] < min(last[1:])  # the slow rank ended with the smallest shard


def _checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _resume(rank: int, world: int, n: int) -> dict:
    def make() -> tuple[GossipShuffleSampler, object]:
        sampler = GossipShuffleSampler(range(n), seed=4, balance=True)
        return sampler, sampler.batch_sampler(8)

    def run(sampler: GossipShuffleSampler, batches, epochs: range) -> list[list[int]]:
        seen = []
        for epoch in epochs:
            batches.set_epoch(epoch)
            for b in batches:
                seen.append(b)
                sampler.report_speed(len(b), len(b) / _speed(rank))
        return seen

    whole, whole_batches = make()
    expected = run(whole, whole_batches, range(4))
    first, first_batches = make()
    seen = run(first, first_batches, range(2))
    end_of_epoch_1 = _checkpoint(first.state_dict())
    first_batches.set_epoch(2)
    it = iter(first_batches)
    for _ in range(2):
        seen.append(next(it))
        first.report_speed(len(seen[-1]), len(seen[-1]) / _speed(rank))
    state = _checkpoint(first.state_dict())
    resumed, resumed_batches = make()
    resumed.load_state_dict(state)
    resumed_batches.set_epoch(2)
    rest = []
    for b in resumed_batches:
        rest.append(b)
        resumed.report_speed(len(b), len(b) / _speed(rank))
    seen += rest + run(resumed, resumed_batches, range(3, 4))
    late, late_batches = make()
    late.load_state_dict(end_of_epoch_1)  # epoch 1's exchange and measured speed are redone
    late_seen = expected[: 2 * len(late_batches)] + run(late, late_batches, range(2, 4))
    for s in (whole, first, resumed, late):
        s.flush()
    return {"expected": expected, "seen": seen, "late": late_seen}


def test_resume_mid_epoch_gives_the_same_remaining_batches() -> None:
    for result in run_world(_resume, 3, 120):
        assert result["seen"] == result["expected"]
        assert result["late"] == result["expected"]
        assert len(result["expected"]) == 4 * math.ceil(120 / (3 * 8))


def _mismatch(rank: int, world: int) -> str:
    try:
        GossipShuffleSampler(range(20), balance=rank == 0)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_disagree_on_balance_get_a_clear_error() -> None:
    for text in run_world(_mismatch, 2):
        assert "balance differs across ranks ([1, 0], by rank)" in text


def test_resuming_a_batch_sampler_off_a_batch_boundary_is_explained() -> None:
    sampler = GossipShuffleSampler(range(50), seed=1, balance=True)
    it = iter(sampler)  # plain iteration: stops 3 indices in, inside the first batch
    for _ in range(3):
        next(it)
    resumed = GossipShuffleSampler(range(50), seed=1, balance=True)
    resumed.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="not the end of a batch"):
        iter(resumed.batch_sampler(8))


# --- the weighted step against a single process ----------------------------------------------

_N, _BATCH = 100, 25  # L = ceil(100 / (2 * 25)) = 2 batches per rank, summing to N / L = 50


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(_N, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _weighted_step(rank: int, world: int) -> tuple[list[int], torch.Tensor]:
    x, y = _data()
    shards = [np.arange(0, 30), np.arange(30, _N)]  # uneven, as balancing leaves them
    sampler = GossipShuffleSampler(
        range(_N), balance=True, shuffle_fraction=0.0, initial_shards=shards
    )
    batches = sampler.batch_sampler(_BATCH)
    model = GossipDataParallel(toy_model(batchnorm=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = next(iter(batches))
    loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids]) * batches.weight(len(ids))
    loss.backward()
    opt.step()
    model.average_replicas()
    sampler.flush()
    return ids, flat(model.module)


def test_weighted_uneven_batches_step_the_mean_like_one_process_on_their_union() -> None:
    """Losses weighted by ``batches.weight`` make the replicas' mean take the step of one
    process on the union of the step's batches (15 and 35 samples here), as all-reduce would."""
    results = run_world(_weighted_step, 2)
    union = results[0][0] + results[1][0]
    assert (len(results[0][0]), len(results[1][0])) == (15, 35)
    x, y = _data()
    single = toy_model(batchnorm=False)
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(single(x[union]), y[union]).backward()
    opt.step()
    for _, mean in results:
        assert torch.allclose(mean, flat(single), atol=1e-6)
    unweighted = flat(toy_model(batchnorm=False))  # sanity: the step moved the model
    assert not torch.allclose(unweighted, flat(single), atol=1e-3)

"""The ``exact`` schedule: every step is a symmetric matching, and one period of mixing steps
multiplies out to the all-``1/p`` matrix for every ``p`` in 2..256 (pure simulation), plus one
run over real gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_world

from gossipgrad._exact import exact_period
from gossipgrad.schedule import plan, rounds_length

SIZES = range(2, 257)


def _step(p: int, step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's partner (itself when it rests) and weight at ``step``, checked to form a
    matching of symmetric pairs that keeps the average."""
    exchanges = [plan(rank, step, p, seed, "exact") for rank in range(p)]
    send = np.array([-1 if ex.send_to is None else ex.send_to for ex in exchanges])
    recv = np.array([-1 if ex.recv_from is None else ex.recv_from for ex in exchanges])
    assert np.array_equal(send, recv), f"p={p} step {step}: exchanges are pairwise"
    ranks, paired = np.arange(p), send >= 0
    partner = np.where(paired, send, ranks)
    weight = np.where(paired, [ex.weight for ex in exchanges], 0.0)
    assert np.all(partner[paired] != ranks[paired]), "no rank is its own partner"
    assert np.all((weight[paired] > 0) & (weight[paired] <= 1)), "weights lie in (0, 1]"
    assert np.array_equal(partner[partner], ranks), (
        f"p={p} step {step}: A sends to B iff B receives from A, one partner each"
    )
    assert np.array_equal(weight[partner], weight), "a pair shares its weight"
    column_sums = (1.0 - weight) + np.bincount(partner, weights=weight, minlength=p)
    np.testing.assert_allclose(column_sums, 1.0, atol=1e-15, err_msg="the average must be kept")
    return partner, weight


def _mixing_matrix(p: int, steps: range, seed: int) -> np.ndarray:
    """The product of the mixing matrices ``W_t`` (``x <- W_t x``) over ``steps``."""
    product = np.eye(p)
    for step in steps:
        partner, weight = _step(p, step, seed)
        product = (1.0 - weight)[:, None] * product + weight[:, None] * product[partner]
    return product


@pytest.mark.parametrize("p", SIZES)
def test_one_period_gives_the_exact_average_and_not_one_step_less(p: int) -> None:
    length = exact_period(p)
    for rnd in (0, 1):  # two consecutive periods: two different labellings
        first, seed = rnd * length, p % 4
        almost = _mixing_matrix(p, range(first, first + length - 1), seed)
        assert np.abs(almost - 1.0 / p).max() > 1e-3, "the period has a superfluous step"
        product = _mixing_matrix(p, range(first + length - 1, first + length), seed) @ almost
        np.testing.assert_allclose(product, 1.0 / p, rtol=0, atol=1e-12 / p)


@pytest.mark.parametrize("p", [3, 5, 6, 7, 12, 100, 255])
def test_exact_for_many_seeds_over_several_periods(p: int) -> None:
    length = exact_period(p)
    rng = np.random.default_rng(p)
    for seed in [*range(6), 2**40 + 3]:
        first = int(rng.integers(0, 1000)) * length
        x = rng.normal(size=(p, 3))
        mean = x.mean(axis=0)
        for rnd in range(3):
            steps = range(first + rnd * length, first + (rnd + 1) * length)
            x = _mixing_matrix(p, steps, seed) @ (x + rnd)  # a new "update" before each period
            np.testing.assert_allclose(x, np.broadcast_to(mean + rnd, x.shape), atol=1e-12)
            mean = mean + rnd


def test_period_table() -> None:
    for a in range(1, 9):
        assert exact_period(2**a) == a, "a power of two is a plain hypercube"
    for p in SIZES:
        lower = math.ceil(math.log2(p))  # an update reaches at most 2^t ranks in t steps
        assert rounds_length(p, "exact") == exact_period(p)
        assert lower <= exact_period(p) <= 2 * lower - 1 or p & (p - 1) == 0, p
    assert [exact_period(p) for p in (3, 5, 6, 7, 9, 12, 255)] == [3, 5, 4, 5, 6, 5, 15]


def test_partners_rotate_from_period_to_period() -> None:
    p, length = 6, exact_period(6)
    met = {plan(0, t, p, 0, "exact").send_to for t in range(40 * length)}
    assert met == {None, 1, 2, 3, 4, 5}
    fixed = {plan(0, t % length, p, 0, "exact").send_to for t in range(40 * length)}
    assert len(fixed) <= length < len(met)


def test_single_rank_and_bad_input() -> None:
    assert plan(0, 5, 1, 3, "exact").send_to is None
    assert plan(0, 5, 1, 3, "exact").recv_from is None
    assert rounds_length(1, "exact") == exact_period(1) == 1
    with pytest.raises(ValueError, match="world_size"):
        exact_period(0)
    with pytest.raises(ValueError, match="rank must be an integer in"):
        plan(5, 0, 5, 0, "exact")


def _gossip_one_period(rank: int, world_size: int) -> list[float]:
    x = torch.arange(4, dtype=torch.float64) * (rank + 1) ** 2
    for step in range(exact_period(world_size)):
        ex = plan(rank, step, world_size, 11, "exact")
        if ex.send_to is None:
            continue
        received = torch.empty_like(x)
        works = [dist.isend(x, ex.send_to), dist.irecv(received, ex.recv_from)]
        for work in works:
            work.wait()
        x = (1.0 - ex.weight) * x + ex.weight * received
    return x.tolist()


def test_gloo_ranks_hold_the_exact_mean_after_one_period() -> None:
    p = 3  # period 3, with a resting rank in every step
    results = np.array(run_world(_gossip_one_period, p))
    expected = np.arange(4) * np.mean([(r + 1) ** 2 for r in range(p)])
    np.testing.assert_allclose(results, np.broadcast_to(expected, results.shape), atol=1e-12)

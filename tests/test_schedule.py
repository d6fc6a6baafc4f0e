"""Properties of the partner schedules, for every world size 1..64 (no processes needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gossipgrad.schedule import SCHEDULES, partners, plan, rounds_length

SIZES = range(1, 65)
POW2 = [1, 2, 4, 8, 16, 32, 64]


def _schedules_for(p: int) -> list[str]:
    names = [s for s in SCHEDULES if s != "exact"]  # the exact schedule has its own tests
    return [s for s in names if s != "hypercube" or p & (p - 1) == 0]


def _recv_sources(p: int, step: int, schedule: str, seed: int = 0) -> np.ndarray:
    return np.array([partners(r, step, p, seed, schedule)[1] for r in range(p)])


@pytest.mark.parametrize("p", SIZES)
def test_one_message_out_and_one_in_and_they_match(p: int) -> None:
    for schedule in _schedules_for(p):
        for step in range(0, 3 * rounds_length(p, schedule) + 5):
            pairs = [partners(r, step, p, 7, schedule) for r in range(p)]
            if p == 1:
                assert pairs == [(None, None)]
                continue
            sends = [s for s, _ in pairs]
            recvs = [r for _, r in pairs]
            assert sorted(sends) == list(range(p)), "every rank receives exactly one message"
            assert sorted(recvs) == list(range(p)), "every rank sends exactly one message"
            for a, (to, _) in enumerate(pairs):
                assert pairs[to][1] == a, f"{a} sends to {to}, so {to} must receive from {a}"
                assert to != a, "no rank is its own partner"


@pytest.mark.parametrize(
    ("p", "schedule"),
    [(p, s) for p in SIZES for s in _schedules_for(p) if s != "ring"],
)
def test_impulse_reaches_every_rank_within_one_round_and_average_is_kept(
    p: int, schedule: str
) -> None:
    length = rounds_length(p, schedule)
    assert length == max(1, math.ceil(math.log2(p))) if p > 1 else length == 1
    for rnd in (0, 3):
        for source in range(p):
            x = np.zeros(p)
            x[source] = 1.0
            for step in range(rnd * length, (rnd + 1) * length):
                if p > 1:
                    x = 0.5 * x + 0.5 * x[_recv_sources(p, step, schedule, seed=3)]
            assert np.all(x > 0), (
                f"impulse at {source} did not reach ranks {np.flatnonzero(x == 0)}"
            )
            assert x.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("p", POW2[1:])
def test_hypercube_gives_the_exact_average_after_log2_p_steps(p: int) -> None:
    rng = np.random.default_rng(p)
    for rnd in range(3):
        x = rng.normal(size=(p, 5))
        mean = x.mean(axis=0)
        for step in range(rnd * int(math.log2(p)), (rnd + 1) * int(math.log2(p))):
            x = 0.5 * x + 0.5 * x[_recv_sources(p, step, "hypercube", seed=rnd)]
        np.testing.assert_allclose(x, np.broadcast_to(mean, x.shape), atol=1e-12)


@pytest.mark.parametrize("p", [5, 8, 12, 16, 33])
def test_rotation_meets_more_partners_than_the_fixed_schedule(p: int) -> None:
    steps = 40 * rounds_length(p)
    for rank in (0, p - 1):
        rotated = {partners(rank, t, p, 0, "dissemination")[0] for t in range(steps)}
        fixed = {partners(rank, t, p, 0, "dissemination-fixed")[0] for t in range(steps)}
        assert len(fixed) <= rounds_length(p)
        assert len(rotated) > len(fixed)


def test_same_inputs_same_answer_and_seed_matters() -> None:
    a = [plan(r, t, 12, seed=1) for r in range(12) for t in range(30)]
    b = [plan(r, t, 12, seed=1) for r in range(12) for t in range(30)]
    c = [plan(r, t, 12, seed=2) for r in range(12) for t in range(30)]
    assert a == b
    assert a != c


def test_ring_is_rank_plus_one() -> None:
    assert partners(3, 17, 5, schedule="ring") == (4, 2)
    assert partners(4, 0, 5, schedule="ring") == (0, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0, "step": 0, "world_size": 0}, "world_size"),
        ({"rank": 4, "step": 0, "world_size": 4}, "rank must be an integer in"),
        ({"rank": 0, "step": -1, "world_size": 4}, "step"),
        ({"rank": 0, "step": 0, "world_size": 6, "schedule": "hypercube"}, "power-of-two"),
        ({"rank": 0, "step": 0, "world_size": 4, "schedule": "star"}, "unknown schedule"),
    ],
)
def test_bad_input_says_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partners(**kwargs)

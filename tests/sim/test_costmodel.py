"""The cost model's limits, its straggler model, and calibration from synthetic measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gossipgrad.sim.costmodel import (
    ALGORITHMS,
    Measurement,
    Network,
    Stragglers,
    Workload,
    calibrate,
    comm_time,
    efficiency,
    fit_latency,
    step_time,
    sweep,
    validate,
)

NET = Network(latency=50e-6, bandwidth=125e6, p2p_bandwidth=80e6, overhead=2e-3)
COMM_BOUND = Workload(compute=0.06, model_bytes=33.6e6)
COMPUTE_BOUND = Workload(compute=0.5, model_bytes=1e6)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_rank_has_no_communication(algorithm: str) -> None:
    assert comm_time(algorithm, 1, NET, 1e9) == 0.0
    assert step_time(algorithm, 1, NET, COMM_BOUND) == COMM_BOUND.compute
    assert efficiency(algorithm, 1, NET, COMM_BOUND) == 1.0


def test_gossip_communication_does_not_depend_on_p() -> None:
    for algorithm in ("gossip-sync", "gossip-overlap"):
        times = [step_time(algorithm, p, NET, COMM_BOUND) for p in (2, 8, 64, 512, 4096)]
        assert max(times) == min(times)
    n = COMM_BOUND.model_bytes
    assert comm_time("gossip-sync", 4096, NET, n) == pytest.approx(NET.latency + n / 80e6)


def test_ring_bandwidth_term_tends_to_two_model_copies() -> None:
    bandwidth_only = Network(latency=0.0, bandwidth=125e6)
    n = 1e8
    limit = 2 * n * bandwidth_only.beta
    times = [comm_time("ring", p, bandwidth_only, n) for p in (2, 16, 4096)]
    assert times[0] == pytest.approx(limit / 2)
    assert times == sorted(times)
    assert times[-1] == pytest.approx(limit, rel=1e-3)
    assert times[-1] < limit


def test_allreduce_formulas() -> None:
    n, p = 1e7, 64
    a, b = NET.latency, NET.beta
    assert comm_time("ring", p, NET, n) == pytest.approx(2 * (p - 1) * a + 2 * (p - 1) / p * n * b)
    assert comm_time("rabenseifner", p, NET, n) == pytest.approx(12 * a + 2 * (p - 1) / p * n * b)
    assert comm_time("tree", p, NET, n) == pytest.approx(12 * (a + n * b))
    # latency dominates small messages: the ring's 2(p-1) rounds lose to log-depth algorithms
    assert comm_time("ring", 4096, NET, 1e3) > comm_time("rabenseifner", 4096, NET, 1e3)


def test_overlap_hides_communication_up_to_the_compute_time() -> None:
    # compute-bound: overlapped gossip costs only the overhead; DDP hides the all-reduce in backward
    assert step_time("gossip-overlap", 8, NET, COMPUTE_BOUND) == pytest.approx(
        COMPUTE_BOUND.compute + NET.overhead
    )
    assert step_time("ddp", 8, NET, COMPUTE_BOUND) == pytest.approx(
        COMPUTE_BOUND.compute + NET.overhead
    )
    # communication-bound: the step is the exchange, not compute + exchange
    sync = step_time("gossip-sync", 8, NET, COMM_BOUND)
    overlap = step_time("gossip-overlap", 8, NET, COMM_BOUND)
    assert sync - overlap == pytest.approx(COMM_BOUND.compute)
    ring = step_time("ring", 8, NET, COMM_BOUND)
    ddp = step_time("ddp", 8, NET, COMM_BOUND)
    assert ring - ddp == pytest.approx(COMM_BOUND.backward_fraction * COMM_BOUND.compute)


def test_stragglers_slow_allreduce_more_as_p_grows_and_gossip_not() -> None:
    for stragglers in (Stragglers("lognormal", 0.3), Stragglers("exponential", 0.5)):
        penalty = {
            a: [
                step_time(a, p, NET, COMM_BOUND, stragglers) - step_time(a, p, NET, COMM_BOUND)
                for p in (2, 8, 64, 512, 4096)
            ]
            for a in ("ring", "gossip-sync")
        }
        ring, gossip = penalty["ring"], penalty["gossip-sync"]
        assert all(x > 0 for x in ring + gossip)
        assert ring == sorted(ring)  # the slowest of p ranks gets slower with p
        assert ring[-1] > 1.2 * ring[-2]  # and keeps growing
        assert gossip[-1] < 1.1 * gossip[-2]  # gossip's penalty levels off
        assert ring[-1] > 3 * gossip[-1]


def test_stragglers_simulation_is_seeded_and_matches_formula_without_spread() -> None:
    s = Stragglers("lognormal", 0.2, seed=3)
    assert step_time("gossip-sync", 64, NET, COMM_BOUND, s) == step_time(
        "gossip-sync", 64, NET, COMM_BOUND, s
    )
    flat = Stragglers("lognormal", 0.0)
    for a in ALGORITHMS:
        assert step_time(a, 64, NET, COMM_BOUND, flat) == pytest.approx(
            step_time(a, 64, NET, COMM_BOUND)
        )


def test_sweep_and_efficiency() -> None:
    ps = [2, 8, 64, 512, 4096]
    times = sweep(ps, NET, COMM_BOUND)
    assert set(times) == set(ALGORITHMS[1:])
    eff = COMM_BOUND.compute / times["ddp"]
    assert np.all(eff <= 1.0) and np.all(np.diff(eff) <= 0)
    assert efficiency("gossip-overlap", 4096, NET, COMM_BOUND) > efficiency(
        "ddp", 4096, NET, COMM_BOUND
    )


def _synthetic(net: Network) -> list[Measurement]:
    points = []
    for p in (2, 3, 4, 6, 8):
        for compute, n in ((0.05, 33.6e6), (0.4, 4e6), (0.01, 1e5)):
            for algorithm in ("ddp", "gossip-sync", "gossip-overlap"):
                work = Workload(compute, n)
                t = step_time(algorithm, p, net, work)
                points.append(Measurement(algorithm, p, t, n, compute))
        for algorithm in ("allreduce", "exchange"):
            t = comm_time(algorithm, p, net, 33.6e6)
            points.append(Measurement(algorithm, p, t, 33.6e6))
    return points


def test_calibration_recovers_known_parameters() -> None:
    truth = Network(latency=2e-3, bandwidth=117e6, p2p_bandwidth=72e6, overhead=4e-3)
    fit = calibrate(_synthetic(truth))
    assert fit.latency == pytest.approx(truth.latency, rel=0.01)
    assert fit.bandwidth == pytest.approx(truth.bandwidth, rel=0.01)
    assert fit.p2p_bandwidth == pytest.approx(truth.p2p_bandwidth, rel=0.01)
    assert fit.overhead == pytest.approx(truth.overhead, rel=0.01)
    assert max(abs(v.error) for v in validate(_synthetic(truth), fit)) < 1e-6


def test_calibration_with_noise_and_fixed_latency() -> None:
    truth = Network(latency=1e-4, bandwidth=117e6, overhead=0.0)
    rng = np.random.default_rng(0)
    noisy = [
        Measurement(m.algorithm, m.p, m.step_time * (1 + 0.02 * rng.standard_normal()), 33.6e6)
        for m in _synthetic(truth)
        if m.algorithm in ("allreduce", "exchange")
    ]
    fit = calibrate(noisy, latency=1e-4)
    assert fit.latency == 1e-4
    assert fit.bandwidth == pytest.approx(truth.bandwidth, rel=0.03)
    errors = [abs(v.error) for v in validate(noisy, fit)]
    assert max(errors) < 0.1


def test_latency_from_small_messages_then_bandwidth_from_large_ones() -> None:
    truth = Network(latency=120e-6, bandwidth=117e6, p2p_bandwidth=72e6, overhead=4e-3)
    small = [
        Measurement(a, p, comm_time(a, p, truth, 4.0), 4.0)
        for a in ("allreduce", "exchange")
        for p in (2, 4, 8)
    ]
    alpha = fit_latency(small)
    assert alpha == pytest.approx(truth.latency, rel=1e-3)
    large = [m for m in _synthetic(truth) if m.model_bytes > 1e6]
    fit = calibrate(large, latency=alpha)
    assert fit.bandwidth == pytest.approx(truth.bandwidth, rel=0.01)
    assert fit.p2p_bandwidth == pytest.approx(truth.p2p_bandwidth, rel=0.01)
    with pytest.raises(ValueError, match="bare operations"):
        fit_latency(large)


def test_calibration_ties_bandwidths_without_p2p_points() -> None:
    truth = Network(latency=1e-4, bandwidth=117e6)
    only_ring = [m for m in _synthetic(truth) if m.algorithm == "allreduce"]
    fit = calibrate(only_ring)
    assert fit.p2p_bandwidth is None
    assert fit.bandwidth == pytest.approx(truth.bandwidth, rel=0.01)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Network(latency=-1.0, bandwidth=1e9), "latency"),
        (lambda: Network(latency=0.0, bandwidth=0.0), "bandwidth"),
        (lambda: Network(latency=0.0, bandwidth=math.nan), "bandwidth"),
        (lambda: Workload(compute=0.1, model_bytes=1e6, backward_fraction=1.5), "backward"),
        (lambda: Stragglers("pareto"), "distribution"),
        (lambda: Stragglers("lognormal", -0.1), "spread"),
        (lambda: step_time("ring", 0, NET, COMM_BOUND), "p .world size."),
        (lambda: step_time("ring", 2.0, NET, COMM_BOUND), "p .world size."),
        (lambda: step_time("allgather", 4, NET, COMM_BOUND), "algorithm"),
        (lambda: Measurement("ring", 4, 0.0, 1e6), "step_time"),
        (lambda: calibrate([]), "at least one"),
        (lambda: calibrate([Measurement("compute", 4, 0.1, 1e6, 0.1)]), "at least one"),
    ],
)
def test_bad_input_is_refused_clearly(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()

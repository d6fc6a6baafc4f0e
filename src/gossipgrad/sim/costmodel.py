"""Analytic cost model of one data-parallel training step: all-reduce against gossip.

The alpha-beta model: sending ``n`` bytes in one message costs ``alpha + n * beta``, with
``alpha`` the per-message latency and ``beta = 1 / bandwidth`` (full duplex: a host sends and
receives at that rate at once). For ``p`` ranks and a model of ``n`` bytes:

- ``ring`` all-reduce: ``2(p-1) alpha + 2(p-1)/p n beta`` (reduce-scatter then all-gather);
- ``rabenseifner`` (recursive halving-doubling): ``2 log2(p) alpha + 2(p-1)/p n beta``;
- ``tree`` (plain binary tree: reduce, then broadcast the whole buffer):
  ``2 log2(p) (alpha + n beta)``;
- ``ddp``: ring all-reduce overlapped with the backward pass, which is ``backward_fraction`` of the
  compute: ``max(compute, (1 - backward_fraction) compute + ring)``;
- ``gossip-sync``: one partner, one message each way, after the step: ``compute + alpha + n beta'``;
- ``gossip-overlap``: the exchange runs during the next step: ``max(compute, alpha + n beta')``.

``beta'`` is the point-to-point rate (``Network.p2p_bandwidth``), which a transport may reach less
well than its collectives. Every training step adds ``Network.overhead`` (copies, mixing, hooks:
the part nothing overlaps). Two bare operations, measured without a model, complete the set for
calibration: ``allreduce`` (the ring formula alone) and ``exchange`` (``alpha + n beta'``).

Stragglers (``Stragglers``): each rank's compute time per step is multiplied by a random factor of
mean 1. An all-reduce waits for the slowest of the ``p`` ranks every step; a gossip rank waits only
for its partners, but delays travel along the partner graph from step to step, so the model
simulates that chain (a max-plus recurrence over the dissemination schedule) by Monte Carlo with a
seeded numpy generator rather than taking one step's "max of two draws".

    net = Network(latency=50e-6, bandwidth=125e6)            # 1 Gbit/s
    work = Workload(compute=0.06, model_bytes=33.6e6)
    step_time("ring", 64, net, work); efficiency("gossip-overlap", 64, net, work)
    net = calibrate(measurements); validate(measurements, net)
    net = calibrate(large, latency=fit_latency(small))   # two-stage: alpha from tiny messages
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

ALLREDUCES: tuple[str, ...] = ("ring", "rabenseifner", "tree")
ALGORITHMS: tuple[str, ...] = (
    "compute",
    *ALLREDUCES,
    "ddp",
    "gossip-sync",
    "gossip-overlap",
)
BARE: tuple[str, ...] = ("allreduce", "exchange")
DISTRIBUTIONS: tuple[str, ...] = ("lognormal", "exponential")
MAX_WORLD = 1 << 20


@dataclass(frozen=True)
class Network:
    """The interconnect, as the alpha-beta model sees it.

    ``latency`` (s per message), ``bandwidth`` (bytes/s each way per host, as collectives reach
    it), ``p2p_bandwidth`` (bytes/s of one isend/irecv pair; ``None``: same as ``bandwidth``),
    ``overhead`` (s per training step that nothing overlaps)."""

    latency: float
    bandwidth: float
    p2p_bandwidth: float | None = None
    overhead: float = 0.0

    def __post_init__(self) -> None:
        _finite("latency", self.latency, low=0.0)
        _finite("bandwidth", self.bandwidth, low=0.0, strict=True)
        if self.p2p_bandwidth is not None:
            _finite("p2p_bandwidth", self.p2p_bandwidth, low=0.0, strict=True)
        _finite("overhead", self.overhead, low=0.0)

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth

    @property
    def p2p_beta(self) -> float:
        return 1.0 / (self.p2p_bandwidth or self.bandwidth)


@dataclass(frozen=True)
class Workload:
    """One rank's step: ``compute`` s of forward + backward + optimizer with no communication,
    ``model_bytes`` to exchange, and the share of compute that is backward (DDP overlaps it)."""

    compute: float
    model_bytes: float
    backward_fraction: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        _finite("compute", self.compute, low=0.0)
        _finite("model_bytes", self.model_bytes, low=0.0)
        _finite("backward_fraction", self.backward_fraction, low=0.0, high=1.0)


@dataclass(frozen=True)
class Stragglers:
    """Per-rank, per-step compute slowdown factors of mean 1 and standard deviation ``spread``.

    ``lognormal``: ``exp(N(mu, s^2))`` with ``mu = -s^2/2``; ``exponential``: a heavier tail,
    ``1 - spread + spread * Exp(1)``. The Monte Carlo runs ``steps`` steps (the first quarter is
    warm-up) from ``numpy.random.default_rng(seed)``."""

    distribution: str = "lognormal"
    spread: float = 0.2
    steps: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}"
            )
        high = 1.0 if self.distribution == "exponential" else math.inf
        _finite("spread", self.spread, low=0.0, high=high)
        if not isinstance(self.steps, int) or self.steps < 8:
            raise ValueError(f"steps must be an integer >= 8, got {self.steps!r}")

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.distribution == "lognormal":
            sigma = math.sqrt(math.log1p(self.spread**2))
            return rng.lognormal(-(sigma**2) / 2, sigma, size=shape)
        return 1.0 - self.spread + self.spread * rng.exponential(1.0, size=shape)


def comm_time(algorithm: str, p: int, net: Network, model_bytes: float) -> float:
    """Seconds of communication for one step of ``algorithm`` (before any overlap)."""
    _check_world(p)
    if algorithm not in (*ALGORITHMS, *BARE):
        raise ValueError(
            f"algorithm must be one of {', '.join((*ALGORITHMS, *BARE))}, got {algorithm!r}"
        )
    if p == 1 or algorithm == "compute":
        return 0.0
    return float(_coefficients(algorithm, p, model_bytes) @ _theta(net)[:3])


def step_time(
    algorithm: str,
    p: int,
    net: Network,
    work: Workload,
    stragglers: Stragglers | None = None,
) -> float:
    """Seconds per training step of ``algorithm`` on ``p`` ranks (the mean, with stragglers)."""
    comm = comm_time(algorithm, p, net, work.model_bytes)
    if algorithm in BARE:
        return comm
    if p == 1 or algorithm == "compute":
        return work.compute  # the slowdown factors have mean 1
    if stragglers is not None and stragglers.spread > 0:
        return _simulate(algorithm, p, net, work, comm, stragglers)
    return _deterministic(algorithm, work, comm) + net.overhead


def efficiency(
    algorithm: str,
    p: int,
    net: Network,
    work: Workload,
    stragglers: Stragglers | None = None,
) -> float:
    """Scaling efficiency: compute time of a step without communication or stragglers, over the
    step time of ``algorithm``."""
    step = step_time(algorithm, p, net, work, stragglers)
    return work.compute / step if step > 0 else 1.0


def sweep(
    ps: Sequence[int],
    net: Network,
    work: Workload,
    algorithms: Sequence[str] = ALGORITHMS[1:],
    stragglers: Stragglers | None = None,
) -> dict[str, np.ndarray]:
    """Step times, ``{algorithm: array over ps}``."""
    return {
        a: np.array([step_time(a, p, net, work, stragglers) for p in ps], dtype=float)
        for a in algorithms
    }


def _deterministic(algorithm: str, work: Workload, comm: float) -> float:
    c = work.compute
    if algorithm in ALLREDUCES or algorithm == "gossip-sync":
        return c + comm
    if algorithm == "ddp":
        return max(c, (1.0 - work.backward_fraction) * c + comm)
    return max(c, comm)  # gossip-overlap


def _simulate(
    algorithm: str, p: int, net: Network, work: Workload, comm: float, s: Stragglers
) -> float:
    """Mean step time with stragglers, over ``s.steps`` steps after a quarter of warm-up."""
    rng = np.random.default_rng(s.seed)
    c = work.compute
    warm = s.steps // 4
    if not algorithm.startswith("gossip"):
        # A collective is a barrier: each step lasts as long as its slowest rank's compute.
        slowest = c * s.draw(rng, (s.steps - warm, p)).max(axis=1).mean()
        exposed = comm if algorithm != "ddp" else max(0.0, comm - work.backward_fraction * c)
        return float(slowest + exposed + net.overhead)
    # Gossip: finish times per rank, chained through the dissemination schedule.
    finish = np.zeros(p)
    ranks = np.arange(p)
    length = max(1, math.ceil(math.log2(p)))
    start = 0.0
    for t in range(s.steps):
        if t == warm:
            start = finish.mean()
        rnd, k = divmod(t, length)
        if k == 0:
            perm = rng.permutation(p)
            inv = np.empty(p, dtype=np.int64)
            inv[perm] = ranks
        src = perm[(inv - (1 << k)) % p]
        dst = perm[(inv + (1 << k)) % p]
        ready = finish + c * s.draw(rng, (p,))
        if algorithm == "gossip-sync":
            # wait for the partner's message, and for the receiver to take ours (large messages
            # do not fit in socket buffers)
            finish = np.maximum(ready, np.maximum(ready[src], ready[dst])) + comm
        else:
            # the snapshot sent at the end of the previous step arrives during this one
            finish = np.maximum(ready, finish[src] + comm)
        finish = finish + net.overhead
    return float((finish.mean() - start) / (s.steps - warm))


# -- calibration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One measured point: ``algorithm`` (one of ``ALGORITHMS`` or ``BARE``) on ``p`` ranks took
    ``step_time`` s per step, where a step without communication took ``compute`` s (0 for the
    bare operations) and the model has ``model_bytes``."""

    algorithm: str
    p: int
    step_time: float
    model_bytes: float
    compute: float = 0.0
    backward_fraction: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        if self.algorithm not in (*ALGORITHMS, *BARE):
            raise ValueError(
                f"algorithm must be one of {', '.join((*ALGORITHMS, *BARE))}, "
                f"got {self.algorithm!r}"
            )
        _check_world(self.p)
        _finite("step_time", self.step_time, low=0.0, strict=True)
        Workload(self.compute, self.model_bytes, self.backward_fraction)  # validates

    @property
    def workload(self) -> Workload:
        return Workload(self.compute, self.model_bytes, self.backward_fraction)


@dataclass(frozen=True)
class Validation:
    """A measured point, the model's prediction for it, and the relative error."""

    measurement: Measurement
    predicted: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measurement.step_time) / self.measurement.step_time


def predict(m: Measurement, net: Network) -> float:
    """The model's step time for a measured point (its own compute time and model size)."""
    return step_time(m.algorithm, m.p, net, m.workload)


def validate(measurements: Sequence[Measurement], net: Network) -> list[Validation]:
    """The relative error of the model at each measured point."""
    return [Validation(m, predict(m, net)) for m in measurements]


def calibrate(
    measurements: Sequence[Measurement],
    latency: float | None = None,
    iterations: int = 20,
) -> Network:
    """Fit latency, bandwidth, point-to-point bandwidth and overhead to measured step times.

    Non-negative least squares on relative errors. Each prediction is linear in
    ``(alpha, beta, beta_p2p, overhead)`` once it is known which side of each ``max`` is active, so
    the fit alternates between choosing sides from the current parameters and solving. Pass
    ``latency`` to fix alpha when the measurements cannot separate it from bandwidth (a single
    message size with only gossip points, say). Without point-to-point measurements the two
    bandwidths are one; likewise without collective ones."""
    ms = [m for m in measurements if m.algorithm != "compute" and m.p > 1]
    if not ms:
        raise ValueError(
            "calibrate needs at least one measurement of a communicating algorithm at p >= 2 "
            f"(one of {', '.join((*ALGORITHMS[1:], *BARE))})"
        )
    if latency is not None:
        _finite("latency", latency, low=0.0)
    comm_bound = np.ones(len(ms), dtype=bool)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(iterations):
        a, b = _system(ms, comm_bound)
        theta = _solve(a, b, latency)
        residual = float(np.sum((a @ theta - b) ** 2))
        if best is None or residual < best[0]:
            best = (residual, theta)
        net = _network(theta)
        new = np.array([_comm_bound(m, net) for m in ms])
        if np.array_equal(new, comm_bound):
            break
        comm_bound = new
    assert best is not None
    return _network(best[1])


def fit_latency(measurements: Sequence[Measurement]) -> float:
    """Latency (alpha) from bare operations on messages small enough that the bandwidth term is
    negligible (a few bytes): the least-squares fit, on relative errors, of ``t = k alpha`` with
    ``k`` the algorithm's number of latency-bound rounds (``2(p - 1)`` for a ring all-reduce, 1 for
    an exchange). Pass the result to ``calibrate(..., latency=...)``, the classic two-stage
    alpha-beta fit: latency from small messages, bandwidth from large ones."""
    ks, ts = [], []
    for m in measurements:
        if m.algorithm not in BARE or m.p < 2:
            raise ValueError(
                f"fit_latency takes bare operations ({', '.join(BARE)}) at p >= 2, "
                f"got {m.algorithm!r} at p={m.p}"
            )
        ks.append(_coefficients(m.algorithm, m.p, m.model_bytes)[0])
        ts.append(m.step_time)
    if not ks:
        raise ValueError("fit_latency needs at least one small-message measurement")
    ratio = np.array(ks) / np.array(ts)
    return float(ratio.sum() / (ratio**2).sum())


def _system(ms: Sequence[Measurement], comm_bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``a @ theta = b`` (divided by the measured time, so the fit is on relative error)."""
    rows, rhs = [], []
    for m, bound in zip(ms, comm_bound, strict=True):
        coef = np.zeros(4)
        const = 0.0
        c = m.compute
        if m.algorithm in BARE:
            coef[:3] = _coefficients(m.algorithm, m.p, m.model_bytes)
        else:
            coef[3] = 1.0
            overlapped = m.algorithm in ("ddp", "gossip-overlap")
            if not overlapped or bound:
                coef[:3] = _coefficients(m.algorithm, m.p, m.model_bytes)
            if m.algorithm == "ddp":
                const = (1.0 - m.backward_fraction) * c if bound else c
            elif m.algorithm == "gossip-overlap":
                const = 0.0 if bound else c
            else:
                const = c
        rows.append(coef / m.step_time)
        rhs.append((m.step_time - const) / m.step_time)
    return np.array(rows), np.array(rhs)


def _solve(a: np.ndarray, b: np.ndarray, latency: float | None) -> np.ndarray:
    """Non-negative least squares over (alpha, beta, beta_p2p, overhead), exact by enumerating
    which parameters are free (4 parameters: at most 15 subsets)."""
    if latency is not None:
        b = b - a[:, 0] * latency
        a = a.copy()
        a[:, 0] = 0.0
    scale = np.linalg.norm(a, axis=0)
    free = np.flatnonzero(scale > 0)
    if not np.isin([1, 2], free).any():
        raise ValueError("calibrate needs measurements whose time depends on the bandwidth")
    a = a / np.where(scale > 0, scale, 1.0)
    best, best_res = np.zeros(4), math.inf
    for mask in range(1, 1 << len(free)):
        cols = free[[bool(mask >> i & 1) for i in range(len(free))]]
        x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        theta = np.zeros(4)
        theta[cols] = x
        res = float(np.sum((a @ theta - b) ** 2))
        if np.all(x >= 0) and res < best_res:
            best, best_res = theta, res
    theta = best / np.where(scale > 0, scale, 1.0)
    if latency is not None:
        theta[0] = latency
    # Only one kind of measurement constrains the bandwidth: the two are one.
    for unused, other in ((1, 2), (2, 1)):
        if scale[unused] == 0:
            theta[unused] = theta[other]
    if theta[1] <= 0 or theta[2] <= 0:
        raise ValueError(
            "calibrate found no positive bandwidth: the measured times do not grow with the bytes "
            "moved; measure a communication-bound setting (a larger model or a slower link)"
        )
    return theta


def _comm_bound(m: Measurement, net: Network) -> bool:
    comm = comm_time(m.algorithm, m.p, net, m.model_bytes)
    if m.algorithm == "ddp":
        return comm > m.backward_fraction * m.compute
    return comm > m.compute


def _coefficients(algorithm: str, p: int, n: float) -> np.ndarray:
    """Communication time as ``coef @ (alpha, beta, beta_p2p)``."""
    log = math.log2(p)
    if algorithm in ("ring", "ddp", "allreduce"):
        return np.array([2 * (p - 1), 2 * (p - 1) / p * n, 0.0])
    if algorithm == "rabenseifner":
        return np.array([2 * log, 2 * (p - 1) / p * n, 0.0])
    if algorithm == "tree":
        return np.array([2 * log, 2 * log * n, 0.0])
    return np.array([1.0, 0.0, n])  # gossip-sync, gossip-overlap, exchange


def _theta(net: Network) -> np.ndarray:
    return np.array([net.latency, net.beta, net.p2p_beta, net.overhead])


def _network(theta: np.ndarray) -> Network:
    net = Network(
        latency=float(theta[0]), bandwidth=float(1.0 / theta[1]), overhead=float(theta[3])
    )
    if not math.isclose(theta[1], theta[2], rel_tol=1e-12):
        net = replace(net, p2p_bandwidth=float(1.0 / theta[2]))
    return net


def _check_world(p: int) -> None:
    if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 1 <= p <= MAX_WORLD:
        raise ValueError(f"p (world size) must be an integer in [1, {MAX_WORLD}], got {p!r}")


def _finite(
    name: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    strict: bool = False,
) -> None:
    ok = isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)
    if ok:
        ok = (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        if high != math.inf:
            bound += f" and <= {high:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")

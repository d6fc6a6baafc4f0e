"""The ``exact`` schedule: after every period the replicas hold the exact average, for any ``p``.

Every step is a matching: paired ranks exchange with each other (``send_to == recv_from``) using
the same weight ``w``, so each pair's sum, and hence the global average, is kept; the other ranks
rest. The construction follows the Base-2 graph of Takezawa et al. (NeurIPS 2023, "Beyond
Exponential Graph"):

1. **Factor** ``p = f_1 * f_2 * ...`` (chosen to minimise the period, see ``_stages``) and write a
   rank's virtual index in mixed radix. Stage ``s`` runs the schedule for ``f_s`` nodes on digit
   ``s``, all other digits fixed: ``f_s``-sized blocks average in parallel, then the next stage
   averages across blocks. Averaging stage after stage gives the average of the whole grid.
2. **Leaf** schedule for ``n`` nodes: ``n = 2^a`` is a hypercube (``a`` steps, ``w = 1/2``).
   Otherwise split ``n`` along its binary digits into groups ``V_0, V_1, ..., V_L`` of sizes
   ``2^e_0 > 2^e_1 > ...``; let ``S_t = V_t ∪ V_{t+1} ∪ ...`` and ``N_t = |S_t|``. Then
   (a) every group averages itself by hypercube (``e_0`` steps); ``V_l`` now holds ``m_l``;
   (b) at merge step ``t = 0, 1, ..., L-1``, every node of ``S_{t+1}`` pairs with its own node
       of ``V_t`` (``N_{t+1} < |V_t|``), with ``w_t = |V_t| / N_t``. By induction, after merge
       ``t`` a node of ``V_l`` (``l > t``) holds ``sum_{s<=t} |V_s| m_s / n + N_{t+1} m_l / n``,
       so after the last merge ``V_L`` holds the global mean; and from merge ``t`` on, ``S_t``
       only mixes inside itself while its sum is ``N_t`` times the global mean;
   (c) after its merge step ``t = l``, group ``V_l`` averages itself again by hypercube: its sum
       is ``N_l - N_{l+1} = |V_l|`` times the mean, so it ends at the global mean. ``V_0``
       finishes last: ``2 e_0 + 1`` steps, and each other group is done by then.

The period is ``log2 p`` for a power of two and at most ``2 ceil(log2 p) - 1`` otherwise (see
``exact_period``; 15 for ``p = 255``, against the ``ceil(log2 p)`` any schedule needs).

With ``seed``, the virtual indices are relabelled by a permutation drawn per period (seeded by
``(seed, period)``, as in ``gossipgrad.schedule``), so partners rotate; exactness holds for any
labelling, hence for every seed.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

from gossipgrad._plan import Exchange, permutation

_REST = Exchange(None, None, 0.0)


def exact_period(world_size: int) -> int:
    """Steps per period of the exact schedule for ``world_size`` ranks (1 for a single rank)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return max(1, _stages(world_size)[0])


def exact_exchange(rank: int, step: int, world_size: int, seed: int = 0) -> Exchange:
    """The exchange of ``rank`` at ``step``: a symmetric pair ``(peer, peer, w)`` or a rest."""
    if world_size == 1:
        return _REST
    rnd, k = divmod(step, exact_period(world_size))
    n, stride, leaf_step = _step_stage(world_size)[k]
    v = _inverse(world_size, seed, rnd)[rank]
    digit = (v // stride) % n
    other, weight = _leaf_table(n)[leaf_step][digit]
    if other is None:
        return _REST
    peer = permutation(world_size, seed, rnd)[v + (other - digit) * stride]
    return Exchange(peer, peer, weight)


@lru_cache(maxsize=64)
def _inverse(world_size: int, seed: int, rnd: int) -> tuple[int, ...]:
    inv = [0] * world_size
    for v, rank in enumerate(permutation(world_size, seed, rnd)):
        inv[rank] = v
    return tuple(inv)


@cache
def _stages(n: int) -> tuple[int, tuple[int, ...]]:
    """``(period, factors)``: the factorisation of ``n`` into leaves with the shortest period."""
    best: tuple[int, tuple[int, ...]] = (_leaf_length(n), (n,))
    for f in range(2, math.isqrt(n) + 1):
        if n % f == 0:
            (len_a, fac_a), (len_b, fac_b) = _stages(f), _stages(n // f)
            if len_a + len_b < best[0]:
                best = (len_a + len_b, fac_a + fac_b)
    return best


@cache
def _step_stage(world_size: int) -> tuple[tuple[int, int, int], ...]:
    """For each step of the period: the leaf size of its stage, the stride of the stage's digit,
    and the step within the leaf schedule."""
    table, stride = [], 1
    for n in _stages(world_size)[1]:
        table += [(n, stride, k) for k in range(_leaf_length(n))]
        stride *= n
    return tuple(table)


def _leaf_length(n: int) -> int:
    top = n.bit_length() - 1
    return top if n & (n - 1) == 0 else 2 * top + 1


@cache
def _leaf_table(n: int) -> tuple[tuple[tuple[int | None, float], ...], ...]:
    """``[k][u]``: partner and weight of node ``u`` at step ``k`` of the ``n``-node leaf."""
    return tuple(tuple(_leaf_exchange(n, u, k) for u in range(n)) for k in range(_leaf_length(n)))


@cache
def _groups(n: int) -> tuple[tuple[int, int], ...]:
    """``(start, exponent)`` of each group of the leaf: one per binary digit of ``n``, largest
    first, laid out contiguously."""
    groups, start = [], 0
    for e in range(n.bit_length() - 1, -1, -1):
        if n >> e & 1:
            groups.append((start, e))
            start += 1 << e
    return tuple(groups)


def _leaf_exchange(n: int, u: int, k: int) -> tuple[int | None, float]:
    """Partner of node ``u`` of an ``n``-node leaf at its step ``k``, and the weight."""
    groups = _groups(n)
    e_top = groups[0][1]
    level = max(i for i, (start, _) in enumerate(groups) if start <= u)
    start, e = groups[level]
    if k < e_top:  # (a) every group averages itself
        return _cube(u, start, e, k)
    t = k - e_top
    if t < level:  # (b) merge t, small side: pair with a node of V_t
        rest_start = groups[t + 1][0]
        return groups[t][0] + (u - rest_start), _merge_weight(n, t)
    if t == level:  # (b) merge t, large side: pair with a node of V_t+1 ∪ V_t+2 ∪ ...
        if level + 1 < len(groups) and u - start < n - groups[level + 1][0]:
            return groups[level + 1][0] + (u - start), _merge_weight(n, t)
        return None, 0.0
    if level == len(groups) - 1:  # the last group already holds the mean after its merges
        return None, 0.0
    return _cube(u, start, e, t - level - 1)  # (c) average the group again


def _cube(u: int, start: int, e: int, dim: int) -> tuple[int | None, float]:
    if dim >= e:
        return None, 0.0
    return start + ((u - start) ^ (1 << dim)), 0.5


def _merge_weight(n: int, t: int) -> float:
    start, e = _groups(n)[t]
    return (1 << e) / (n - start)

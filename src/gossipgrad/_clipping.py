"""Clipping a rank's gradient as DDP clips the average over ranks, without communicating.

Under DDP every rank clips the average gradient ``g_bar = mean_i g_i``; under gossip ``.grad`` is
the rank's own ``g_i``. With ``E||g_i||^2 = ||G||^2 + s^2`` (``G`` the expected gradient, ``s^2``
the noise of one rank's batch), the average has ``E||g_bar||^2 = ||G||^2 + s^2 / p``: the local
norm is larger, so the same threshold clips more often and harder.

``AverageNormEstimate`` separates the two parts from the rank's own history: the noise of
consecutive batches is independent, so ``<g_t, g_{t-1}>`` estimates ``||G||^2`` (while ``G``
moves slowly) and ``||g_t||^2`` estimates ``||G||^2 + s^2``. Both are smoothed (an exponential
average) and the current norm is scaled by ``sqrt((signal + noise / p) / (signal + noise))``,
between ``1 / sqrt(p)`` (pure noise) and 1 (pure signal). It assumes that ranks see different data
(with identical data the average has the local noise, and the estimate is low). It keeps one
copy of the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

SMOOTHING = 0.9  # weight of the past in the exponential averages


class AverageNormEstimate:
    """Estimates ``||mean over p ranks of the gradient||`` from one rank's gradients."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._previous: list[torch.Tensor] | None = None
        self._square = self._cross = 0.0  # smoothed ||g_t||^2 and <g_t, g_{t-1}>
        self._seen = 0

    @torch.no_grad()
    def update(self, grads: Sequence[torch.Tensor]) -> float:
        """Take this step's gradients; return the estimated norm of their average over ranks."""
        square = sum(float(g.double().square().sum()) for g in grads)
        previous = self._previous
        if previous is not None and [g.shape for g in grads] == [g.shape for g in previous]:
            cross = sum(
                float((g.double() * h.to(g.device).double()).sum())
                for g, h in zip(grads, previous, strict=True)
            )
            self._seen += 1
            keep = SMOOTHING if self._seen > 1 else 0.0
            self._square = keep * self._square + (1 - keep) * square
            self._cross = keep * self._cross + (1 - keep) * cross
        self._previous = [g.detach().clone() for g in grads]
        if self._seen == 0 or self._square <= 0:
            return math.sqrt(square)  # no history yet: the local norm
        signal = min(max(self._cross, 0.0), self._square)
        noise = self._square - signal
        ratio = (signal + noise / self.world_size) / self._square
        return math.sqrt(square * ratio)

    def state_dict(self) -> dict[str, Any]:
        """The smoothed moments and the last gradients, for an exact resume."""
        previous = [g.cpu().clone() for g in self._previous or []]
        return {
            "square": self._square,
            "cross": self._cross,
            "seen": self._seen,
            "previous": previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` (the world size stays this estimate's own: the moments
        are one rank's, whatever the number of ranks)."""
        self._square, self._cross = float(state["square"]), float(state["cross"])
        self._seen = int(state["seen"])
        self._previous = [torch.as_tensor(g).clone() for g in state["previous"]] or None

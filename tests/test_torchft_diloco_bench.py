"""benchmarks/_torchft_diloco.py: torchft's DiLoCo, rebuilt between rounds from its saved state
(as benchmarks/peers.py does), goes on exactly as one that was never interrupted. Needs torchft
(the ``bench`` extra); skipped without it."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_world

pytest.importorskip("torchft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

H, STEPS, SPLIT = 4, 12, 6  # the split falls two inner steps after a sync


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(rank: int, splits: list[int]) -> torch.Tensor:
    """Train for ``STEPS`` steps with DiLoCo, rebuilt (module, optimizers, DiLoCo) after every
    step in ``splits``; this rank's flat parameters at the end."""
    from _torchft_diloco import TorchftDiLoCo

    module = _model()
    data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    saved: dict[str, Any] | None = None
    done, index = 0, 0
    for end in [*splits, STEPS]:
        inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        diloco = TorchftDiLoCo(
            [module], inner, sync_every=H, outer=(0.7, 0.9), index=index, name=f"t{index}",
            timeout=timedelta(seconds=60),
        )  # fmt: skip
        if saved is not None:
            inner.load_state_dict(saved["inner"])
            diloco.load_state_dict(saved["diloco"])
        for _ in range(done, end):
            x, y = torch.randn(16, 8, generator=data), torch.randn(16, 4, generator=data)
            torch.nn.functional.mse_loss(module(x), y).backward()
            inner.step()
            inner.zero_grad()
        diloco.finish()
        saved = {"inner": inner.state_dict(), "diloco": diloco.state_dict()}
        diloco.close()
        done, index = end, index + 1
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


def _both(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _train(rank, []), _train(rank, [SPLIT])


def test_a_rebuilt_diloco_goes_on_as_the_uninterrupted_one() -> None:
    results = run_world(_both, 2, timeout=180)
    for whole, rebuilt in results:
        torch.testing.assert_close(rebuilt, whole, rtol=0, atol=1e-6)
    # the last step is a sync: the replicas agree, and they moved from where they started
    (a, _), (b, _) = results
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    start = torch.nn.utils.parameters_to_vector(_model().parameters()).detach()
    assert (a - start).abs().max() > 1e-2

"""The mixing arithmetic alone (no communication): residual form, and its finiteness guard."""

from __future__ import annotations

import pytest
import torch

from gossipgrad.mixing import make_buckets, mix_residual_, pack_


def _setup() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    x = [torch.arange(6.0).view(2, 3), torch.ones(4)]
    bucket = make_buckets(x, cap_bytes=1 << 20)[0]
    pack_(bucket.send, x)
    bucket.recv.copy_(torch.linspace(-1.0, 1.0, 10))
    return x, bucket.send, bucket.recv


def test_residual_mixing_moves_by_half_the_difference() -> None:
    x, sent, received = _setup()
    for t in x:
        t.add_(0.25)  # a local step taken while the exchange was in flight
    want = torch.cat([t.flatten() for t in x]) + 0.5 * (received - sent)
    assert mix_residual_(x, sent.clone(), received, 0.5, require_finite=True)
    assert torch.equal(torch.cat([t.flatten() for t in x]), want)


@pytest.mark.parametrize("poisoned", ["sent", "received"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_difference_leaves_the_replica_unchanged(poisoned: str, value: float) -> None:
    x, sent, received = _setup()
    (sent if poisoned == "sent" else received)[3] = value
    before = [t.clone() for t in x]
    assert not mix_residual_(x, sent, received, 0.5, require_finite=True)
    assert all(torch.equal(a, b) for a, b in zip(x, before, strict=True))

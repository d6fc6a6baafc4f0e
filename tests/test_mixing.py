"""The mixing arithmetic alone (no communication): residual form, and its finiteness guard."""

from __future__ import annotations

import pytest
import torch

from gossipgrad import _quantize, mixing
from gossipgrad.mixing import encode_, make_buckets, mix_residual_, pack_


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


def test_int8_encoding_is_within_half_a_step_and_a_quarter_of_the_bytes() -> None:
    values = torch.randn(100_000) * torch.logspace(-3, 0, 100_000)  # scales vary along the tensor
    encoded = _quantize.encode_(
        torch.empty(_quantize.encoded_size(values.numel()), dtype=torch.int8), values
    )
    decoded = _quantize.decode(encoded, values.numel(), torch.float32)
    blocks = values.abs().reshape(-1, 4).amax(1)  # coarse bound: each block's own max / 254
    assert encoded.numel() < 0.26 * values.numel() * 4
    assert ((decoded - values).abs() <= values.abs().max() / 254 + 1e-12).all()
    assert blocks.numel() > 0
    # residual mixing with int8 payloads keeps the pair's sum exactly
    a, b = torch.randn(1000), torch.randn(1000)
    buckets = [make_buckets([t], 2**20, torch.int8)[0] for t in (a, b)]
    for bucket, t in zip(buckets, (a, b), strict=True):
        encode_(bucket, [t])
    buckets[0].recv.copy_(buckets[1].send)
    buckets[1].recv.copy_(buckets[0].send)
    total = (a + b).double()
    for bucket, t in zip(buckets, (a, b), strict=True):
        assert mix_residual_([t], bucket.send, bucket.recv, 0.5, require_finite=True)
    assert ((a + b).double() - total).abs().max() < 1e-5


@pytest.mark.parametrize("wire", [None, torch.bfloat16, torch.int8])
def test_mixing_equal_replicas_changes_nothing_exactly(wire: torch.dtype | None) -> None:
    # why exchange 0 is not sent (gossipgrad.cadence): at step 0 every replica is the same, so
    # the snapshot sent equals the one received, and x + w (r - s) is x, bit for bit
    x = [torch.randn(3, 5), torch.randn(7)]
    bucket = make_buckets(x, 2**20, wire)[0]
    encode_(bucket, x)
    bucket.recv.copy_(bucket.send)  # the partner's snapshot of the same replica
    for t in x:
        t.add_(torch.randn_like(t))  # the local steps taken while the exchange would travel
    want = [t.clone() for t in x]
    assert mix_residual_(x, bucket.send, bucket.recv, 0.5, require_finite=True)
    assert all(torch.equal(a, b) for a, b in zip(x, want, strict=True))


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_a_compressed_wire_mixes_in_its_buckets_shared_stage_exactly_as_in_a_temporary(
    wire: torch.dtype,
) -> None:
    # the stage is allocated with the buckets (an exchange allocates nothing): one buffer the
    # size of the largest bucket, shared, and the same arithmetic bit for bit
    x = [torch.randn(300), torch.randn(40, 5), torch.randn(100)]
    buckets = make_buckets(x, cap_bytes=1000, wire_dtype=wire, zeroed=True)
    assert [b.indices for b in buckets] == [[0], [1], [2]]
    stages = [b.stage for b in buckets]
    assert all(s is not None and s.dtype == torch.float32 and not s.any() for s in stages)
    assert len({s.untyped_storage().data_ptr() for s in stages if s is not None}) == 1
    assert max(s.untyped_storage().nbytes() for s in stages if s is not None) == 300 * 4
    y = [t.clone() for t in x]
    for b in buckets:
        own_x, own_y = [x[i] for i in b.indices], [y[i] for i in b.indices]
        encode_(b, own_x)
        b.recv.copy_(torch.randn(b.recv.numel()))
        sent = b.send.clone()
        assert mix_residual_(own_x, b.send, b.recv, 0.5, scratch=b.stage)
        assert mix_residual_(own_y, sent, b.recv, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("staged", [True, False])
def test_a_compressed_payload_is_widened_chunk_by_chunk_to_the_same_bits(
    wire: torch.dtype, staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the difference is widened a chunk at a time (fast on CPU): the last chunk is partial, and a
    # NaN in a late chunk still stops the mix
    monkeypatch.setattr(mixing, "_WIDEN_CHUNK", 7)
    x = [torch.randn(30), torch.randn(4, 5)]
    sent, received = torch.randn(50).to(wire), torch.randn(50).to(wire)
    flat = torch.cat([t.flatten() for t in x])
    want = flat - 0.5 * (sent.float() - received.float())
    scratch = torch.zeros(50) if staged else None
    assert mix_residual_(x, sent.clone(), received, 0.5, require_finite=True, scratch=scratch)
    assert torch.equal(torch.cat([t.flatten() for t in x]), want)
    received[45] = float("nan")
    assert not mix_residual_(x, sent, received, 0.5, require_finite=True, scratch=scratch)
    assert torch.equal(torch.cat([t.flatten() for t in x]), want)

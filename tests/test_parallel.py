"""GossipDataParallel on 2-4 gloo ranks: mixing, traffic, overlap, and bad input."""

from __future__ import annotations

import functools
import time
import warnings
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import Recorder, batch, fit, flat, perturb_, toy_model, train_steps
from torch import nn

from gossipgrad import GossipDataParallel, NonFiniteError, PeerError, _quantize
from gossipgrad.mixing import replica_tensors

# --- mixing ---------------------------------------------------------------------------------


def _mixing_keeps_the_average(
    rank: int, world: int, sync: bool, schedule: str, **options: Any
) -> tuple:
    # (without BatchNorm for hypercube: forwards move its statistics, which spoils exactness)
    model = GossipDataParallel(
        toy_model(batchnorm=schedule not in ("hypercube", "exact")),
        sync=sync,
        schedule=schedule,
        **options,
    )
    perturb_(model.module, rank)  # replicas now differ
    before = flat(model.module, buffers=False)  # forwards move BatchNorm's running statistics
    dist.all_reduce(before)
    start = model.consensus_distance()
    x, _ = batch(rank, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr=0: the steps only mix
    for _ in range(5):  # exchanges 1 to 5 leave at the ends of steps 0 to 4 (0 is never sent)
        _one_step(model, opt, x)
    model.flush()  # exchange 5 mixed too: nothing is left in flight
    after = flat(model.module, buffers=False)
    dist.all_reduce(after)
    return (before - after).abs().max().item(), start, model.consensus_distance()


def _one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One training step (with an ``lr=0`` optimizer, only the mixing at its end moves the
    replica: a pure-mixing step)."""
    model(x).sum().backward()
    opt.step()  # the step ends here: what is due is mixed, the next exchange leaves
    opt.zero_grad()


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("sync", [True, False])
def test_mixing_preserves_the_average_and_pulls_replicas_together(world: int, sync: bool) -> None:
    for err, start, end in run_world(_mixing_keeps_the_average, world, sync, "dissemination"):
        assert err < 1e-5 * world
        assert end < 0.2 * start


@pytest.mark.parametrize(("world", "schedule"), [(4, "hypercube"), (3, "exact")])
def test_exact_schedules_reach_the_exact_average(world: int, schedule: str) -> None:
    # exchanges 1 to 5 hold a whole period: hypercube's {2, 3} at p = 4, exact's {3, 4, 5} at
    # p = 3
    for err, start, end in run_world(_mixing_keeps_the_average, world, True, schedule):
        assert err < 1e-5
        assert start > 0.1
        assert end < 1e-6


@pytest.mark.parametrize("wire_dtype", [torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("sync", [True, False])
def test_compressed_payloads_still_keep_the_average(wire_dtype: torch.dtype, sync: bool) -> None:
    fn = functools.partial(_mixing_keeps_the_average, wire_dtype=wire_dtype)
    results = run_world(fn, 3, sync, "dissemination")
    for err, start, end in results:
        assert err < 1e-5 * 3  # float32 round-off only: the rounded payloads cancel out
        assert end < 0.2 * start


def _identical_data(rank: int, world: int, sync: bool, mode: str) -> list[float]:
    model = GossipDataParallel(toy_model(seed=rank), sync=sync, mode=mode)  # broadcast from rank 0
    train_steps(model, 12, rank=0)  # every rank sees the same batches
    everyone = [torch.empty(0)] * world
    dist.all_gather_object(everyone, flat(model.module))
    return [(everyone[0] - e).abs().max().item() for e in everyone]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    ("sync", "mode"), [(True, "params"), (False, "params"), (True, "gradients")]
)
def test_identical_data_keeps_replicas_identical(world: int, sync: bool, mode: str) -> None:
    for diffs in run_world(_identical_data, world, sync, mode):
        assert max(diffs) == 0.0


def _mixed_dtypes(rank: int, world: int) -> tuple[float, float, float]:
    module = nn.Sequential(nn.Linear(4, 4).double())
    module.register_parameter("extra", nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)))
    model = GossipDataParallel(module, sync=True)
    perturb_(module, rank)
    own = flat(module)
    before = own.clone()
    dist.all_reduce(before)
    model.step_ended()  # a step with no optimizer: exchange 1 leaves at its end
    model.flush()  # and is mixed here
    moved = (flat(module) - own).abs().min().item()
    after = flat(module)
    dist.all_reduce(after)
    diff = (before - after).abs()  # the module's own "extra" comes first, then the Linear
    return diff[4:].max().item(), diff[:4].max().item(), moved


def test_several_dtypes_are_mixed_each_in_its_own_precision() -> None:
    for err64, err16, moved in run_world(_mixed_dtypes, 2):
        assert moved > 0, "every value was mixed with the partner's"
        assert err64 < 1e-12
        assert err16 < 0.05  # bfloat16 has 8 bits of mantissa


# --- traffic: one destination, one source, one model's worth of bytes, no collective ----------


def _traffic(
    rank: int, world: int, bucket_cap_mb: float, **options: Any
) -> tuple[list[list[tuple]], int]:
    wrapping: list[tuple] = []
    with Recorder(wrapping):
        model = GossipDataParallel(toy_model(), bucket_cap_mb=bucket_cap_mb, **options)
    # step 0 begins when wrapping; its exchange (exchange 0) is never sent
    assert not [e for e in wrapping if e[0] in ("isend", "irecv")], wrapping
    model_bytes = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    per_step: list[list[tuple]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(8):
        events: list[tuple] = []  # the waits of what step t sends are recorded here too
        with Recorder(events):
            x, y = batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            events.append(("optimizer.step",))
            opt.step()
            opt.zero_grad()
        per_step.append(events)
    model.flush()  # a rank must not exit with its last send in flight
    return per_step, model_bytes


def _sent_in_optimizer_step(events: list[tuple]) -> list[tuple]:
    """The step's messages and collectives, after checking that its forward and backward had
    none (exchanges start and end inside ``optimizer.step()``)."""
    marker = events.index(("optimizer.step",))
    assert events[:marker] == [], events
    return events[marker + 1 :]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("bucket_cap_mb", [25.0, 0.0005])
def test_each_step_sends_one_model_to_one_rank_and_receives_from_one(
    world: int, bucket_cap_mb: float
) -> None:
    for rank, (steps, model_bytes) in enumerate(run_world(_traffic, world, bucket_cap_mb)):
        # each step's end sends one exchange; exchange 0 is never sent (every replica is the
        # same), so step 0 sends nothing before its optimizer step, and exchange 1 there
        for t, step_events in enumerate(steps):
            events = _sent_in_optimizer_step(step_events)
            sends = [e for e in events if e[0] == "isend"]
            recvs = [e for e in events if e[0] == "irecv"]
            assert len({e[1] for e in sends}) == 1, f"rank {rank} step {t}: {sends}"
            assert len({e[1] for e in recvs}) == 1, f"rank {rank} step {t}: {recvs}"
            assert rank not in {e[1] for e in sends + recvs}
            assert sum(e[2] for e in sends) <= 1.05 * model_bytes
            assert sum(e[2] for e in recvs) <= 1.05 * model_bytes
            assert not [e for e in events if e[0] in Recorder.COLLECTIVES]
        if bucket_cap_mb < 0.001:
            assert len([e for e in steps[0] if e[0] == "isend"]) > 1, "small cap: several buckets"


def test_int8_on_the_wire_sends_the_encoding_only() -> None:
    floats = sum(t.numel() for t in replica_tensors(toy_model()))  # one bucket at 25 MiB
    for steps, _ in run_world(functools.partial(_traffic, wire_dtype=torch.int8), 2, 25):
        for events in steps:  # exchange 1 leaves at the end of step 0
            sent = sum(e[2] for e in events if e[0] == "isend")
            assert sent == _quantize.encoded_size(floats)  # 1 byte a value + 4 per 256


def test_bfloat16_on_the_wire_halves_the_bytes_and_streams_keep_one_partner() -> None:
    fn = functools.partial(_traffic, wire_dtype=torch.bfloat16, streams=3)
    for steps, model_bytes in run_world(fn, 3, 0.0001):
        for events in steps:  # exchange 1 leaves at the end of step 0
            sends = [e for e in events if e[0] == "isend"]
            assert len({e[1] for e in sends}) == 1
            assert len({e[1] for e in events if e[0] == "irecv"}) == 1
            assert len(sends) > 3, "several buckets, spread over the streams"
            assert sum(e[2] for e in sends) <= 0.55 * model_bytes


def _order(rank: int, world: int) -> list[tuple]:
    model = GossipDataParallel(toy_model())
    events: list[tuple] = []
    model.module[-1].register_full_backward_hook(lambda *a: events.append(("backward",)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(events):
        for t in range(5):
            events.append(("step", t))
            x, y = batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        model.flush()
    return events


def test_the_exchange_sent_at_the_end_of_step_t_travels_while_step_t_plus_1_computes() -> None:
    for events in run_world(_order, 2):
        kinds = [e[0] for e in events]
        sends = [i for i, k in enumerate(kinds) if k == "isend"]
        backwards = [i for i, k in enumerate(kinds) if k == "backward"]
        recv_waits = [i for i, e in enumerate(events) if e == ("wait", "irecv")]
        steps = [events.index(("step", t)) for t in range(5)]
        # exchange j (1 to 5) leaves at the end of step j - 1 (exchange 0 is never sent) and is
        # mixed at the end of step j (exchange 5: by the flush after the loop)
        assert len(sends) == len(recv_waits) == 5 and len(backwards) == 5
        for j in range(1, 6):
            i = j - 1
            # sent inside step j - 1's optimizer step, after its backward
            assert steps[j - 1] < backwards[j - 1] < sends[i], events
            if j < 5:
                # on the wire during step j's forward and backward, completed only at its
                # optimizer step, before the next exchange leaves
                assert sends[i] < steps[j] < backwards[j] < recv_waits[i] < sends[i + 1], events
            else:
                assert sends[i] < recv_waits[i], events


# --- accuracy against the all-reduce baseline -----------------------------------------------


def test_gossip_accuracy_is_within_one_point_of_allreduce() -> None:
    allreduce = run_world(fit, 4, "allreduce")[0]
    gossip = run_world(fit, 4, "gossip")[0]
    assert allreduce > 0.85, "the task must be learnable for the comparison to mean anything"
    assert abs(gossip - allreduce) <= 0.01, (gossip, allreduce)


# --- world size 1 and no_sync ---------------------------------------------------------------


def _alone(rank: int, world: int) -> list[tuple]:
    model = GossipDataParallel(toy_model())
    events: list[tuple] = []
    with Recorder(events):
        train_steps(model, 3, rank)
        model.average_replicas()
        assert model.consensus_distance() == 0.0
    return events


def test_world_size_one_trains_without_communication() -> None:
    assert run_world(_alone, 1) == [[]]


def _no_sync(rank: int, world: int) -> tuple[list[tuple], list[tuple], int]:
    """Gradient accumulation: two micro-batches in ``no_sync()``, the third outside, then the
    optimizer step (where the step ends and its exchange leaves)."""
    model = GossipDataParallel(toy_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inside: list[tuple] = []
    stepping: list[tuple] = []
    for t in range(3):
        with Recorder(inside), model.no_sync():
            for micro in range(2):
                x, y = batch(rank, 3 * t + micro)
                nn.functional.cross_entropy(model(x), y).backward()
        with Recorder(stepping):
            x, y = batch(rank, 3 * t + 2)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    model.flush()
    return inside, stepping, model.step


def test_no_sync_suppresses_gossip() -> None:
    # no_sync's backwards are silent; the step, and its exchange, come with optimizer.step()
    for inside, stepping, step in run_world(_no_sync, 2):
        assert inside == []
        assert step == 3
        assert len([e for e in stepping if e[0] == "isend"]) == 3, "one exchange a step"


# --- bad input --------------------------------------------------------------------------------


def test_uninitialised_process_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        GossipDataParallel(toy_model())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "weights"}, "mode must be one of"),
        ({"schedule": "star"}, "schedule must be one of"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a finite number > 0"),
        ({"timeout": 5}, "timeout must be a positive"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GossipDataParallel(toy_model(), **kwargs)


def _different_models(rank: int, world: int, how: str) -> str:
    width = 16 if rank == 0 or how != "shape" else 8
    module = nn.Sequential(nn.Linear(6, width), nn.Linear(width, 3))
    if how == "count" and rank == 1:
        module.append(nn.Linear(3, 3))
    if how == "dtype" and rank == 1:
        module.double()
    try:
        GossipDataParallel(module)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    ("how", "detail"),
    [("shape", r"rank 1 has 0.weight \(8, 6\)"), ("count", "rank 1 has 6"), ("dtype", "float64")],
)
def test_replicas_that_differ_across_ranks_are_refused(how: str, detail: str) -> None:
    for message in run_world(_different_models, 2, how):
        assert "replicas differ across ranks" in message
        assert pytest.importorskip("re").search(detail, message), message


def _silent_partner(rank: int, world: int, sync: bool) -> str:
    model = GossipDataParallel(toy_model(), sync=sync, timeout=timedelta(seconds=2))
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:  # alive but never joins a step, until rank 0 is done
        store.wait(["rank 0 done"], timedelta(seconds=50))
        return "waited"
    x, _ = batch(rank, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.monotonic()
    try:
        # exchange 1 leaves at the end of step 0 and is waited for there with sync=True, at the
        # end of step 1 otherwise: time the step that waits
        for _ in range(2):
            started = time.monotonic()
            _one_step(model, opt, x)
    except PeerError as exc:
        assert exc.peer == 1
        return f"{time.monotonic() - started:.1f}s {exc}"
    finally:
        store.set("rank 0 done", "1")
    return "no error"


@pytest.mark.parametrize("sync", [True, False])
def test_a_partner_that_never_answers_is_named_after_the_timeout(sync: bool) -> None:
    message = run_world(_silent_partner, 2, sync)[0]
    assert "rank 1 did not answer within 2 s" in message, message
    # raised after the gossip timeout, long before the process group's own (60 s here)
    assert float(message.split("s ")[0]) < 30


def _nan_from_rank_1(rank: int, world: int, on_nonfinite: str) -> tuple[str, bool]:
    model = GossipDataParallel(
        toy_model(), sync=True, on_nonfinite=on_nonfinite, timeout=timedelta(seconds=3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr=0: the steps only mix
    x, _ = batch(rank, 0)
    _one_step(model, opt, x)  # step 0: exchange 1 leaves, from replicas that are all the same
    if rank == 1:
        with torch.no_grad():
            model.module[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # step 1 mixes exchange 1 and sends the poisoned replica (exchange 2); step 2 mixes it
            _one_step(model, opt, x)
            _one_step(model, opt, x)
        except (NonFiniteError, PeerError) as exc:
            return f"{type(exc).__name__}: {exc}", False
    finite = bool(torch.isfinite(flat(model.module)).all())
    return " | ".join(str(w.message) for w in caught), finite


def test_nan_is_never_mixed_in_silently() -> None:
    (msg0, finite0), (msg1, _) = run_world(_nan_from_rank_1, 2, "skip")
    assert (
        # the first exchange that carries the NaN (the old "gossip step 1": exchange 0 is never
        # sent) is exchange 2 now: it leaves at the end of the step after the poisoning
        "NaN or inf in parameters received from rank 1 at exchange 2 (step 2)" in msg0
        and "skipping" in msg0
    )
    assert finite0, "rank 0 skipped the poisoned exchange"
    assert "NaN or inf in its own parameters" in msg1

    (msg0, _), (msg1, _) = run_world(_nan_from_rank_1, 2, "raise")
    assert msg1.startswith("NonFiniteError: rank 1 found NaN or inf in its own parameters")
    assert msg0.startswith(
        "NonFiniteError: rank 0 found NaN or inf in parameters received from rank 1"
    ), "each rank names where the NaN came from"


def _too_large_for_float16(rank: int, world: int) -> str:
    model = GossipDataParallel(
        toy_model(), sync=True, wire_dtype=torch.float16, timeout=timedelta(seconds=3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr=0: the steps only mix
    x, _ = batch(rank, 0)
    _one_step(model, opt, x)  # exchange 1 leaves, from replicas that are all the same
    if rank == 1:
        with torch.no_grad():
            model.module[0].weight[0, 0] = 1e5  # finite, but inf in float16
    try:
        _one_step(model, opt, x)  # sends the large value (exchange 2)
        _one_step(model, opt, x)  # mixes it
    except NonFiniteError as exc:
        return str(exc)
    return "no error"


def test_a_float16_overflow_names_the_wire_and_the_fix() -> None:
    for message in run_world(_too_large_for_float16, 2):
        assert "beyond float16's range (65504)" in message, message
        assert "wire_dtype=torch.bfloat16" in message


def _resume_state(rank: int, world: int) -> str:
    model = GossipDataParallel(toy_model(), schedule="ring")
    train_steps(model, 3, rank)
    state = model.gossip_state()
    fresh = GossipDataParallel(toy_model(), schedule="ring")
    fresh.load_gossip_state(state)
    assert fresh.step == 3
    other = GossipDataParallel(toy_model(), schedule="dissemination")
    try:
        other.load_gossip_state(state)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_gossip_state_round_trips_and_refuses_another_schedule() -> None:
    assert "schedule='ring'" in run_world(_resume_state, 2)[0]

"""Elastic gossip (``gossipgrad.elastic``): ranks SIGKILLed mid-run, a replacement that joins
from a live peer, a kill while an exchange travels, and the store's host killed.

Each test forks its workers (gloo on loopback) around a ``TCPStore`` hosted by the test process
(or by a process of its own), as a launcher would host it; a worker kills itself with SIGKILL
at a chosen step, so that the kill falls at a known point of the run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401 - the first optimizer imports it: once here, not per fork
import torch.distributed as dist
from torch import nn

from gossipgrad import checkpoint
from gossipgrad.elastic import ElasticGossip, MembershipChange, MembershipError
from gossipgrad.sampler import GossipShuffleSampler
from gossipgrad.train.launch import loopback_store

TIMEOUT = timedelta(seconds=8)
SETTLE = timedelta(seconds=1)  # above a step, even on a loaded machine


# --- the harness --------------------------------------------------------------------------------


def _host(port_file: str) -> None:
    """A process whose only job is to host the store (killed by a test)."""
    with _store_server() as (_, port):
        with open(port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(port_file + ".tmp", port_file)
        time.sleep(600)


def _store_server() -> contextlib.AbstractContextManager[tuple[dist.TCPStore, int]]:
    return loopback_store(30)  # the launcher's own store host


def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))


def _entry(fn: Callable[..., Any], index: int, port: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        out: Any = ("ok", fn(index, port, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(folder, f"result_{index}.pkl"), "wb") as f:
        pickle.dump(out, f)
    os._exit(0)  # no interpreter teardown: a dead peer's groups may be half closed


def _run(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    join_at: int | None = None,
    store_host: bool = False,
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(index, port, *args)`` in ``world_size`` forked workers around a store; with
    ``join_at``, one more worker (index ``world_size``) starts once generation ``join_at`` has
    formed. Returns each worker's result, ``None`` for one that died, or ``("error", text)``."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        if store_host:
            port_file = os.path.join(folder, "port")
            host = ctx.Process(target=_host, args=(port_file,))
            host.start()
            stack.callback(host.kill)
            while not os.path.exists(port_file):
                time.sleep(0.01)
            with open(port_file) as f:
                port = int(f.read())
            args = (*args, host.pid)
        else:
            _, port = stack.enter_context(_store_server())
        store = _client(port)

        def start(index: int) -> mp.process.BaseProcess:
            process = ctx.Process(target=_entry, args=(fn, index, port, folder, args))
            process.start()
            return process

        processes = [start(i) for i in range(world_size)]
        stack.callback(lambda: [p.kill() for p in processes if p.is_alive()])
        deadline = time.monotonic() + timeout
        if join_at is not None:
            while not store.check([f"gossipgrad/elastic/g{join_at}/closed"]):
                assert time.monotonic() < deadline, f"generation {join_at} never formed"
                time.sleep(0.02)
            processes.append(start(world_size))
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, p in enumerate(processes) if p.is_alive()]
        assert not hung, f"workers {hung} still running after {timeout:.0f} s"
        results: list[Any] = []
        for index in range(len(processes)):
            path = os.path.join(folder, f"result_{index}.pkl")
            if not os.path.exists(path):
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            results.append(value if status == "ok" else ("error", value))
        return results


def _ok(results: list[Any], alive: list[int]) -> list[dict[str, Any]]:
    for index in alive:
        value = results[index]
        assert isinstance(value, dict), f"worker {index}: {value}"
    return [results[i] for i in alive]


def _replica(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _mean(replicas: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(ts).mean(0) for ts in zip(*replicas, strict=True)]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --- survivors go on ----------------------------------------------------------------------------


def _mixing_only(
    index: int,
    port: int,
    world: int,
    steps: int,
    kills: dict[int, int],
    in_exchange: bool = False,
) -> Any:
    """Each rank starts from its own random replica and trains with lr = 0, so only gossip
    moves the replicas: the mean over the members is kept exactly from a change on. A rank of
    ``kills`` dies at its step: before computing it, or (``in_exchange``) right after its step
    put a 2 MB replica on the wire in 9 buckets."""
    torch.manual_seed(index)
    width = 724 if in_exchange else 5
    module = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width))
    at_change: dict[int, tuple[MembershipChange, list[torch.Tensor]]] = {}

    def record(change: MembershipChange) -> None:
        at_change[change.generation] = (change, _replica(module))

    elastic = ElasticGossip(
        module,
        _client(port),
        world_size=world,
        rank=index,
        settle=SETTLE,
        on_change=record,
        timeout=TIMEOUT,
        init_sync=False,
        bucket_cap_mb=0.25,
    )
    optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.0)
    elastic.start(optimizer)
    if in_exchange and index in kills:
        optimizer.register_step_post_hook(  # after the wrapper's hook: the exchange has left
            lambda *_: _die() if elastic.step == kills[index] else None
        )
    ended = 0
    while elastic.step < steps:
        if not in_exchange and kills.get(index) == elastic.step:
            _die()
        module(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ended += 1
    elastic.model.average_replicas()
    final = _replica(module)
    out = {"step": elastic.step, "ended": ended, "at_change": at_change, "final": final}
    out |= {"rank": elastic.rank, "world_size": elastic.world_size}
    elastic.close()
    return out


def _check_mean_kept(survivors: list[dict[str, Any]], generation: int) -> None:
    """The survivors' replicas as they stood at ``generation``'s change average to what
    ``average_replicas`` gave at the end, and every survivor holds exactly the same."""
    mean = _mean([out["at_change"][generation][1] for out in survivors])
    for out in survivors:
        for got, want in zip(out["final"], mean, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for got, want in zip(out["final"], survivors[0]["final"], strict=True):
            assert torch.equal(got, want)


def test_survivors_finish_and_keep_their_mean_after_a_sigkill() -> None:
    """4 ranks, rank 3 SIGKILLed at step 6 of 30: the three survivors form generation 1 and
    finish every step; the mean of their replicas as they stood at the change (the exchanges
    in flight dropped unmixed) is what ``average_replicas`` gives at the end (lr = 0: only
    gossip moves the replicas, and it must keep the survivors' mean exactly); every survivor
    holds the same average."""
    results = _run(_mixing_only, 4, 4, 30, {3: 6})
    assert results[3] is None
    survivors = _ok(results, [0, 1, 2])
    for out in survivors:
        assert out["step"] == 30 and out["world_size"] == 3
        assert sorted(out["at_change"]) == [1]
        change = out["at_change"][1][0]
        assert (change.left, change.joined, change.world_size) == (1, 0, 3)
        assert 6 <= change.step <= 8  # where the survivors stood when rank 3 died
        assert out["ended"] >= 30  # no survivor lost a step (one ahead redoes its last)
    assert sorted(out["rank"] for out in survivors) == [0, 1, 2]
    _check_mean_kept(survivors, 1)


def test_kills_while_an_exchange_travels() -> None:
    """4 ranks, each step sending a 2 MB replica in 9 buckets: rank 1 is SIGKILLed right
    after its step 5 put its replica on the wire, rank 3 likewise at step 12. The two
    survivors go through two changes, finish every step, and keep their mean from the last
    change on."""
    results = _run(_mixing_only, 4, 4, 24, {1: 5, 3: 12}, True)
    assert results[1] is None and results[3] is None
    survivors = _ok(results, [0, 2])
    for out in survivors:
        assert out["step"] == 24 and out["world_size"] == 2
        assert sorted(out["at_change"]) == [1, 2]
        assert [c.world_size for c, _ in out["at_change"].values()] == [3, 2]
    _check_mean_kept(survivors, 2)


# --- a replacement joins ------------------------------------------------------------------------


def _with_a_sampler(index: int, port: int, world: int, steps: int, kill: tuple[int, int]) -> Any:
    """Train a small regression with SGD and momentum on a ``GossipShuffleSampler``; rank
    ``kill[0]`` dies at step ``kill[1]``; a replacement (index ``world``) joins. Every member
    trains until ``steps`` and until 10 steps after the join (the same condition everywhere,
    since every member resumes at the same step)."""
    torch.manual_seed(100 + index)
    data = torch.utils.data.TensorDataset(torch.randn(60, 6), torch.randn(60, 2))
    module = nn.Linear(6, 2)
    at_change: dict[int, dict[str, Any]] = {}
    elastic: ElasticGossip | None = None

    def record(change: MembershipChange) -> None:
        assert elastic is not None and elastic._optimizer is not None
        momentum = [s["momentum_buffer"].clone() for s in elastic._optimizer.state.values()]
        at_change[change.generation] = {
            "change": change,
            "replica": _replica(module),
            "momentum": momentum,
            "shard": sampler.shard.clone(),
            "position": sampler.position,
        }

    elastic = ElasticGossip(
        module, _client(port), world_size=world, settle=SETTLE, on_change=record, timeout=TIMEOUT
    )
    optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.05, momentum=0.9)
    sampler = GossipShuffleSampler(data, timeout=TIMEOUT)
    elastic.start(optimizer, sampler=sampler)
    batches = elastic.batches(torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler))
    joined = None
    trained = 0
    while elastic.step < steps or joined is None or elastic.step < joined + 10:
        if (index, elastic.step) == kill:
            _die()
        x, y = next(batches)
        nn.functional.mse_loss(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        trained += 1
        joined = next((c.step for c in elastic.changes if c.joined), None)
        time.sleep(0.02)
    before = _replica(module)
    elastic.model.average_replicas()
    out = {"at_change": at_change, "before": before, "final": _replica(module)}
    out |= {"step": elastic.step, "trained": trained, "epoch": sampler.epoch}
    elastic.close()
    return out


def test_a_replacement_joins_from_a_live_peer() -> None:
    """3 ranks; rank 2 is SIGKILLed at step 5; once the survivors have formed generation 1, a
    new process starts, joins as generation 2, and receives from rank 0 a bit-identical
    replica (parameters and optimizer momentum) and the sampler's position; it trains 10
    steps or more, and every member agrees after ``average_replicas``. At each change the
    members' shards are disjoint and cover the dataset."""
    results = _run(_with_a_sampler, 3, 3, 12, (2, 5), join_at=1)
    assert results[2] is None
    members = _ok(results, [0, 1, 3])
    joiner = members[2]
    assert sorted(joiner["at_change"]) == [2]
    joined = joiner["at_change"][2]
    source = next(out["at_change"][2] for out in members if out["at_change"][2]["change"].rank == 0)
    assert joined["change"].joined == 1 and joined["change"].world_size == 3
    for mine, theirs in zip(joined["replica"], source["replica"], strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(joined["momentum"], source["momentum"], strict=True):
        assert torch.equal(mine, theirs)
    assert joined["position"] == source["position"]
    survivors = [out["at_change"][1]["shard"] for out in members[:2]]
    everyone = [out["at_change"][2]["shard"] for out in members]
    for shards in (survivors, everyone):
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(60))
    assert joiner["trained"] >= 10
    assert not all(
        torch.equal(a, b) for a, b in zip(joiner["before"], joined["replica"], strict=True)
    )
    for out in members:
        assert out["step"] == joiner["step"]
        for got, want in zip(out["final"], joiner["final"], strict=True):
            assert torch.equal(got, want)


# --- the store's host dies ----------------------------------------------------------------------


def _store_dies(index: int, port: int, steps: int, kill: tuple[int, int] | None, host: int) -> Any:
    """Rank 0 kills the process hosting the store at step 4; with ``kill``, that rank dies
    at that step later on."""
    module = nn.Linear(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elastic = ElasticGossip(
            module, _client(port), world_size=3, rank=index, settle=SETTLE, timeout=TIMEOUT
        )
        optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.1)
        elastic.start(optimizer)
        while elastic.step < steps:
            if index == 0 and elastic.step == 4:
                os.kill(host, signal.SIGKILL)
            if (index, elastic.step) == kill:
                _die()
            module(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            time.sleep(0.01)
        elastic.model.average_replicas()
        elastic.close()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return {"step": elastic.step, "warnings": [w for w in said if "elastic store" in w]}


def test_the_store_host_dies() -> None:
    """The process hosting the store is SIGKILLed at step 4: the members train on (each says
    once that the store is gone) and finish. When a rank then dies too, the survivors stop
    with a ``MembershipError`` that names both causes and says how to host the store."""
    results = _run(_store_dies, 3, 20, None, store_host=True)
    for out in _ok(results, [0, 1, 2]):
        assert out["step"] == 20
        assert len(out["warnings"]) == 1 and "store is gone" in out["warnings"][0]
    results = _run(_store_dies, 3, 40, (2, 12), store_host=True)
    assert results[2] is None
    for error in results[:2]:
        assert isinstance(error, tuple) and error[0] == "error"
        assert error[1].startswith(MembershipError.__name__), error[1]
        assert "elastic store is gone" in error[1]
        assert "host the store in a process that outlives the workers" in error[1]
    # the first to see it names rank 2; the other may have seen its partner leave in turn
    assert any("rank 2 has probably died" in error[1] for error in results[:2])


# --- checkpoints --------------------------------------------------------------------------------


def _checkpointed(
    index: int,
    port: int,
    world: int,
    steps: int,
    folder: str,
    save_at: tuple[int, ...],
    resume: str | None,
    kill: tuple[int, int] | None = None,
    dies_writing: int | None = None,
) -> Any:
    """Train a small regression (SGD with momentum, each rank's batches drawn from
    ``(rank, step)``); save a checkpoint at each step of ``save_at``; with ``resume``, load
    that checkpoint first. Rank ``kill[0]`` dies at step ``kill[1]``; rank ``dies_writing``
    dies when it begins writing its files."""
    if index == dies_writing:
        checkpoint._write_rank = lambda *_: _die()  # this forked worker's own module
    torch.manual_seed(100 + index)
    module = nn.Linear(6, 2)
    elastic = ElasticGossip(
        module, _client(port), world_size=world, rank=index, settle=SETTLE, timeout=TIMEOUT
    )
    optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.05, momentum=0.9)
    elastic.start(optimizer)
    loaded = elastic.load_checkpoint(resume) if resume else None
    at_load = (_replica(module), elastic.step)
    saved: dict[int, list[torch.Tensor]] = {}
    while elastic.step < steps:
        if elastic.step in save_at:
            elastic.save_checkpoint(folder, keep=5)
            saved[elastic.step] = _replica(module)
        if kill == (index, elastic.step):
            _die()
        generator = torch.Generator().manual_seed(1000 * elastic.rank + elastic.step)
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 2, generator=generator)
        nn.functional.mse_loss(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    out: dict[str, Any] = {"saved": saved, "at_load": at_load, "final": _replica(module)}
    out |= {"loaded": loaded, "changes": elastic.changes}
    out |= {"rank": elastic.rank, "world_size": elastic.world_size}
    elastic.close()
    return out


def test_a_checkpoint_resumes_exactly_on_as_many_ranks_and_averages_on_fewer() -> None:
    """3 ranks save at step 6 and train to 12. Resumed on 3 ranks, each rank starts from
    exactly its saved replica at step 6 and reaches exactly the replica the uninterrupted run
    had at step 12 (optimizer, engine state and exchange in flight restored too); resumed on
    2 ranks, both start from the exact mean of the 3 saved replicas, at step 6."""
    with tempfile.TemporaryDirectory() as folder:
        first = _ok(_run(_checkpointed, 3, 3, 12, folder, (6,), None), [0, 1, 2])
        path = os.path.join(folder, "step_00000006")
        again = _ok(_run(_checkpointed, 3, 3, 12, folder, (), path), [0, 1, 2])
        for before, after in zip(first, again, strict=True):
            replica, step = after["at_load"]
            assert step == 6 and after["loaded"]["elastic"]["step"] == 6
            for got, want in zip(replica, before["saved"][6], strict=True):
                assert torch.equal(got, want)
            for got, want in zip(after["final"], before["final"], strict=True):
                assert torch.equal(got, want)
        fewer = _ok(_run(_checkpointed, 2, 2, 8, folder, (), path), [0, 1])
        mean = _mean([out["saved"][6] for out in first])
        for out in fewer:
            assert out["at_load"][1] == 6 and out["loaded"]["saved_world_size"] == 3
            for got, want in zip(out["at_load"][0], mean, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_checkpoint_after_a_membership_change() -> None:
    """3 ranks; rank 2 dies at step 3; the two survivors save at step 8 (generation 1, world
    size 2) and go on. Resumed on 3 ranks, every rank starts from the exact mean of the two
    saved replicas, at step 8, and trains to the end."""
    with tempfile.TemporaryDirectory() as folder:
        results = _run(_checkpointed, 3, 3, 10, folder, (8,), None, (2, 3))
        assert results[2] is None
        survivors = _ok(results, [0, 1])
        path = os.path.join(folder, "step_00000008")
        assert survivors[0]["world_size"] == 2
        resumed = _ok(_run(_checkpointed, 3, 3, 12, folder, (), path), [0, 1, 2])
        mean = _mean([out["saved"][8] for out in survivors])
        for out in resumed:
            assert out["loaded"]["elastic"] == out["loaded"]["elastic"] | {
                "generation": 1,
                "world_size": 2,
                "step": 8,
            }
            assert out["at_load"][1] == 8
            for got, want in zip(out["at_load"][0], mean, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_rank_dies_while_a_checkpoint_is_written() -> None:
    """3 ranks save at step 6; rank 2 dies as it begins writing its files. The two others
    see it in the write's collectives, form generation 1 and write checkpoint 6 again, by 2
    ranks; they finish. Resumed on 2 ranks, each starts from exactly its saved replica."""
    with tempfile.TemporaryDirectory() as folder:
        results = _run(_checkpointed, 3, 3, 10, folder, (6,), None, None, 2)
        assert results[2] is None
        survivors = _ok(results, [0, 1])
        for out in survivors:
            assert [(c.generation, c.step, c.world_size) for c in out["changes"]] == [(1, 6, 2)]
        path = os.path.join(folder, "step_00000006")
        assert checkpoint.saved_world_size(path) == 2
        assert checkpoint.list_checkpoints(folder) == [Path(path)]
        resumed = _ok(_run(_checkpointed, 2, 2, 10, folder, (), path), [0, 1])
        for before, after in zip(survivors, resumed, strict=True):
            assert after["at_load"][1] == 6
            for got, want in zip(after["at_load"][0], before["saved"][6], strict=True):
                assert torch.equal(got, want)
            for got, want in zip(after["final"], before["final"], strict=True):
                assert torch.equal(got, want)

"""The harness of ``tests/test_ddp_parity.py``: one training loop (a *scenario*) run as a
single-process reference, under DDP and under gossip, and what every run of it must show.

A scenario is a function ``loop(run)`` written like a user's training loop. It builds its models
with ``run.wrap(module)``, draws data from ``run.batch(t)`` / ``run.data(t)``, learning rates from
``run.lr(value)``, and calls ``run.step_done(...)`` after each optimizer step. ``run_scenario``
runs it several times on every rank of a world:

- **identical data on every rank**, real learning rates: as a plain module (``Local``: the
  single-process run), under DDP (``gossipgrad.wrap(module, "allreduce")``) and under gossip
  (params mode, ``sync=True`` and overlapped; gradients mode where a scenario asks). Every record
  (all parameters and buffers, and the tensors the loop passed to ``step_done``) must equal the
  single-process run's: bit for bit for gossip (mixing identical replicas changes nothing), to
  float round-off for DDP (its all-reduce sums ``g / p``).
- **different data per rank**, every learning rate 0 and the parameters perturbed per rank after
  wrapping, so that only mixing moves them: under DDP and gossip. Under gossip, the mean over
  ranks of every parameter stays the one it had when wrapped, after every step and after the
  final ``flush()``, to float round-off (DDP does not mix; its ``join()`` broadcasts one rank's
  replica). Then, on every wrapper, ``consensus_distance()`` is finite (for params-mode gossip
  less than half its value when wrapped), ``average_replicas()`` makes every rank bit-identical
  (every float parameter and buffer) and ``consensus_distance()`` is then ~0. Records the loop
  marked ``ranks_agree`` must be bit-identical across ranks.

A failure in any run is reported as a line naming the variant and the first difference; ranks are
realigned after each run (a rank that raised leaves its peers to time out: ``TIMEOUT``), and each
run has its own process group, so a broken run never spills into the next.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from _toy import batch
from torch import nn

import gossipgrad

TIMEOUT = timedelta(seconds=8)  # the gossip wrappers' timeout=: what a rank that raised costs
GROUP_TIMEOUT = timedelta(seconds=15)  # each run's process group (DDP, collectives)
SEED = 1234

# variant -> (what a failure line calls it, GossipDataParallel's options; None: not gossip)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "local": ("single process", None),
    "ddp": ("DDP", None),
    "sync": ("gossip sync", {"sync": True}),
    "overlap": ("gossip overlapped", {"sync": False}),
    "gradients": ("gossip gradients mode", {"mode": "gradients"}),
}
SAME_DATA = ("local", "ddp", "sync", "overlap")
MIXING = ("ddp", "sync", "overlap")


class Local(nn.Module):
    """The single-process reference: the same loop on a plain module (state_dict keys prefixed
    ``module.`` like the wrappers'), with every wrapper method a no-op."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def join(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def flush(self) -> None:
        pass

    def average_replicas(self, into: nn.Module | None = None) -> None:
        pass

    def consensus_distance(self) -> float:
        return 0.0


@dataclass
class Record:
    """One snapshot of every model the run wrapped (keys ``"<model>:<name>"``) and of the tensors
    the loop passed to ``step_done`` (keys ``"extra <i>"``)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    label: str
    ranks_agree: bool = False
    mean_moves: bool = False  # every rank loaded the same state before it: a new mean

    def everything(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers, **self.extras}


@dataclass
class Run:
    """What a scenario's loop sees: how to wrap, which data and learning rates to use, where to
    record. ``variant`` is one of ``VARIANTS``."""

    variant: str
    rank: int
    world: int
    same_data: bool
    lr_zero: bool
    group: Any = None
    models: list[nn.Module] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    start_consensus: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _moves: bool = False

    # --- what a loop uses --------------------------------------------------------------------

    @property
    def is_ddp(self) -> bool:
        return self.variant == "ddp"

    @property
    def is_gossip(self) -> bool:
        return VARIANTS[self.variant][1] is not None

    @property
    def name(self) -> str:
        data = "identical data" if self.same_data else "different data per rank"
        lr = ", lr 0" if self.lr_zero else ""
        return f"{VARIANTS[self.variant][0]} ({data}{lr})"

    def wrap(
        self,
        module: nn.Module,
        gossip: dict[str, Any] | None = None,
        via_wrap: bool = False,
        **ddp_keywords: Any,
    ) -> nn.Module:
        """``module`` wrapped for this variant. ``ddp_keywords`` go to every wrapper (DDP's own
        constructor keywords, which GossipDataParallel accepts too), ``gossip`` to the gossip
        wrappers only (and ``timeout`` to DDP's). DDP is ``gossipgrad.wrap(module, "allreduce")``;
        gossip is ``GossipDataParallel``, or ``gossipgrad.wrap(module, "gossip")`` with
        ``via_wrap``. With different data, the parameters are then perturbed per rank so that
        mixing has something to do."""
        gossip = {"timeout": TIMEOUT, **(gossip or {})}
        options = VARIANTS[self.variant][1]
        if self.variant == "local":
            model: nn.Module = Local(module)
        elif self.is_ddp:
            model = gossipgrad.wrap(
                module,
                "allreduce",
                process_group=self.group,
                timeout=gossip["timeout"],
                **ddp_keywords,
            )
        else:
            assert options is not None
            keywords = {**options, **gossip, **ddp_keywords}
            if via_wrap:
                model = gossipgrad.wrap(module, "gossip", process_group=self.group, **keywords)
            else:
                model = gossipgrad.GossipDataParallel(module, process_group=self.group, **keywords)
        self.models.append(model)
        if not self.same_data:
            perturb_parameters_(module, self.rank)
            self.start_consensus.append(model.consensus_distance())
            self.records.append(self._snapshot((), "when wrapped"))
        torch.manual_seed(SEED + len(self.models))  # whatever RNG the wrapper used, data agree
        return model

    def lr(self, value: float) -> float:
        """A learning rate: ``value``, or 0 in the mixing runs (only mixing moves parameters)."""
        return 0.0 if self.lr_zero else value

    def data(self, t: int) -> torch.Generator:
        """A generator for step ``t``'s data: the same on every rank, or one per rank."""
        return torch.Generator().manual_seed(10_000 * self.data_rank + t)

    def batch(self, t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """``_toy.batch``: 8 samples of 6 features and 3 classes, for ``tests/_toy.toy_model``."""
        return batch(self.data_rank, t, dtype)

    @property
    def data_rank(self) -> int:
        return 0 if self.same_data else self.rank

    def step_done(self, *extras: torch.Tensor, ranks_agree: bool = False) -> None:
        """Record every wrapped model (and ``extras``, e.g. losses or outputs) after a step;
        ``ranks_agree``: in the mixing runs, every rank must hold the same values here."""
        self.records.append(self._snapshot(extras, f"step {len(self.steps)}", ranks_agree))

    def mean_moves(self) -> None:
        """Every rank is about to load the same state: the mean over ranks changes here."""
        self._moves = True

    def expect(self, ok: bool, message: str) -> None:
        """A scenario's own check; ``message`` says what went wrong."""
        if not ok:
            self.problems.append(f"{self.name}: {message}")

    @contextlib.contextmanager
    def unchanged(self, model: nn.Module, what: str) -> Iterator[None]:
        """Expect the block (a forward) to leave every parameter of ``model.module`` as it was:
        same values, same version counter (no in-place write at all)."""
        named = list(model.module.named_parameters())
        before = [(p.detach().clone(), p._version) for _, p in named]
        yield
        for (name, p), (value, version) in zip(named, before, strict=True):
            if not torch.equal(p.detach(), value) or p._version != version:
                diff = max_diff(p.detach(), value)
                self.expect(False, f"{what} changed parameter {name} (by {diff:.3g})")
                return

    # --- the harness's side ------------------------------------------------------------------

    @property
    def steps(self) -> list[Record]:
        return [r for r in self.records if r.label.startswith("step")]

    def _snapshot(
        self, extras: tuple[torch.Tensor, ...], label: str, ranks_agree: bool = False
    ) -> Record:
        params, buffers = {}, {}
        for m, model in enumerate(self.models):
            for name, p in model.module.named_parameters():
                params[f"{m}:{name}"] = p.detach().clone()
            for name, b in model.module.named_buffers():
                buffers[f"{m}:{name}"] = b.detach().clone()
        moves, self._moves = self._moves, False
        return Record(
            params,
            buffers,
            {f"extra {i}": e.detach().clone() for i, e in enumerate(extras)},
            label,
            ranks_agree,
            moves,
        )


@torch.no_grad()
def perturb_parameters_(module: nn.Module, rank: int, scale: float = 0.3) -> None:
    """Add rank-dependent noise to every float and complex parameter (not to buffers)."""
    g = torch.Generator().manual_seed(777 + rank)
    for p in module.parameters():
        if p.is_complex():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.complex64).to(p.dtype))
        elif p.is_floating_point():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# --- running a scenario ------------------------------------------------------------------------


@dataclass
class Scenario:
    loop: Callable[[Run], None]
    world: int
    same_data: tuple[str, ...] = SAME_DATA
    mixing: tuple[str, ...] = MIXING


def run_scenario(rank: int, world: int, scenario: Scenario) -> list[str]:
    """Every run of ``scenario`` on this rank; the problems found (empty: it holds)."""
    problems: list[str] = []
    reference: Run | None = None
    for variant in scenario.same_data:
        run = Run(variant, rank, world, same_data=True, lr_zero=False)
        ok = execute(scenario.loop, run)
        problems += run.problems
        if not ok:
            continue
        if variant == "local":
            reference = run
        elif reference is not None:
            problems += compare_to_reference(run, reference)
    for variant in scenario.mixing:
        run = Run(variant, rank, world, same_data=False, lr_zero=True)
        execute(scenario.loop, run, finish=check_mixing)
        problems += run.problems
    return problems


def execute(
    loop: Callable[[Run], None], run: Run, finish: Callable[[Run], list[str]] | None = None
) -> bool:
    """Run ``loop`` on a fresh process group, then (if every rank got through) ``finish``.
    Whether every rank got through both; problems land in ``run.problems``."""
    run.group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    torch.manual_seed(SEED)
    error = guarded(lambda: loop(run))
    if error:
        run.problems.append(f"{run.name}: {error}")
    if not everyone_ok(error is None):
        return False
    if finish is not None:
        found: list[str] = []
        error = guarded(lambda: found.extend(finish(run)))
        run.problems += [f"{run.name}: {p}" for p in found]
        if error:
            run.problems.append(f"{run.name}: {error}")
        if not everyone_ok(error is None):
            return False
    return True


def guarded(fn: Callable[[], Any]) -> str | None:
    """Run ``fn``; ``None``, or what it raised, in one line with where (the deepest frame in
    the tests)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported as a problem of the scenario
        return describe(exc)
    return None


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    here = os.path.dirname(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(here)]
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {text}{where}"


def everyone_ok(ok: bool) -> bool:
    """Whether every rank of the world is ok (a collective on the world group: it realigns the
    ranks after a run, whatever happened in it)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ok)
    return all(everyone)


# --- what the runs must show ---------------------------------------------------------------------

TOLERANCE = {  # DDP against the single-process run: (rtol, atol)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.complex64: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
}


def compare_to_reference(run: Run, reference: Run) -> list[str]:
    """Every record of ``run`` equals ``reference``'s: exactly for gossip, to round-off for DDP."""
    mine, theirs = run.steps, reference.steps
    if len(mine) != len(theirs):
        return [f"{run.name}: recorded {len(mine)} steps, the single-process run {len(theirs)}"]
    for a, b in zip(mine, theirs, strict=True):
        ours, ref = a.everything(), b.everything()
        if ours.keys() != ref.keys():
            return [f"{run.name}: after {a.label}, tensors {sorted(ours)} != {sorted(ref)}"]
        for key, expected in ref.items():
            got = ours[key]
            if not same(got, expected, exact=run.is_gossip):
                return [
                    f"{run.name}: after {a.label}, {key} differs from the single-process run "
                    f"(max |diff| {max_diff(got, expected):.3g})"
                ]
    return []


def same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact or not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    rtol, atol = TOLERANCE.get(a.dtype, (1e-5, 1e-6))
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return (real(a).double() - real(b).double()).abs().max().item() if a.numel() else 0.0


def real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def check_mixing(run: Run) -> list[str]:
    """The end of a mixing run (different data, lr 0): flush, the mean over ranks kept by every
    mix, consensus, then ``average_replicas()`` and bit-identical ranks."""
    problems: list[str] = []
    for model in run.models:
        model.flush()
    run.records.append(run._snapshot((), "the end (after flush)"))
    ends = [model.consensus_distance() for model in run.models]
    everyone: list[Any] = [None] * run.world
    dist.all_gather_object(everyone, run.records, group=run.group)
    if run.is_gossip:  # DDP does not mix (its join() broadcasts one rank's replica)
        problems += mean_is_kept(everyone)
    problems += flagged_records_agree(everyone)
    params_mode = run.variant in ("sync", "overlap")
    for m, (start, end) in enumerate(zip(run.start_consensus, ends, strict=True)):
        if not math.isfinite(end):
            problems.append(f"model {m}: consensus_distance() is {end} at the end")
        elif params_mode and run.world > 1 and not end < 0.5 * start:
            problems.append(
                f"model {m}: mixing did not pull the replicas together (consensus distance "
                f"{start:.3g} when wrapped, {end:.3g} at the end)"
            )
    for model in run.models:
        model.average_replicas()
    after = [model.consensus_distance() for model in run.models]
    final = run._snapshot((), "after average_replicas()")
    dist.all_gather_object(everyone, final, group=run.group)
    problems += ranks_agree(everyone, "after average_replicas()")
    for m, d in enumerate(after):
        if not d < 1e-6:
            problems.append(f"model {m}: consensus_distance() is {d} after average_replicas()")
    return problems


def mean_is_kept(everyone: list[list[Record]]) -> list[str]:
    """The mean over ranks of every float parameter is the same at every record (steps that
    all ranks took, and the end) as when wrapped, but where ``mean_moves`` starts a new one."""
    steps = [[r for r in records if r.label.startswith("step")] for records in everyone]
    common = min(len(s) for s in steps)
    wrapped = [[r for r in records if r.label == "when wrapped"][-1] for records in everyone]
    checkpoints = [[w] for w in wrapped]
    for rank, s in enumerate(steps):
        checkpoints[rank] += s[:common] + [everyone[rank][-1]]  # the end
    baseline: dict[str, torch.Tensor] = {}
    for i in range(len(checkpoints[0])):
        records = [c[i] for c in checkpoints]
        means = {}
        for key, first in records[0].params.items():
            if not is_float(first):
                continue
            stacked = torch.stack([real(r.params[key]).double() for r in records])
            means[key] = (stacked.mean(0), stacked.abs().max().item(), first.dtype)
        if i == 0 or records[0].mean_moves:
            baseline = {k: v[0] for k, v in means.items()}
            continue
        for key, (mean, scale, dtype) in means.items():
            if key not in baseline:  # a model wrapped later
                baseline[key] = mean
                continue
            err = (mean - baseline[key]).abs().max().item() if mean.numel() else 0.0
            if not err <= 2 * EPS.get(dtype, 2.0**-23) * max(scale, 1e-3) * (1 + i):
                return [
                    f"the mean over ranks of {key} moved by {err:.3g} by {records[0].label} "
                    "(mixing must keep it)"
                ]
    return []


def flagged_records_agree(everyone: list[list[Record]]) -> list[str]:
    problems: list[str] = []
    for i, record in enumerate(everyone[0]):
        if record.ranks_agree:
            problems += ranks_agree([records[i] for records in everyone], f"at {record.label}")
    return problems[:1]


def ranks_agree(records: list[Record], where: str) -> list[str]:
    """Every float parameter and buffer bit-identical on every rank."""
    ref = records[0]
    for rank, rec in enumerate(records[1:], start=1):
        for key, value in {**ref.params, **ref.buffers}.items():
            if not is_float(value):
                continue
            other = {**rec.params, **rec.buffers}[key]
            if not torch.equal(other, value):
                return [f"ranks 0 and {rank} differ {where}: {key} by {max_diff(other, value):.3g}"]
    return []


# --- running a world of scenarios and checks ------------------------------------------------------


def run_all(
    rank: int, world: int, scenarios: dict[str, Scenario], checks: dict[str, Callable]
) -> dict[str, tuple[list[str], float]]:
    """Every scenario and check of this world size on this rank: name -> (problems, seconds)."""
    out: dict[str, tuple[list[str], float]] = {}
    for name, scenario in scenarios.items():
        if scenario.world != world:
            continue
        started = time.monotonic()
        out[name] = (run_scenario(rank, world, scenario), time.monotonic() - started)
    for name, (check_world, fn) in checks.items():
        if check_world != world:
            continue
        started = time.monotonic()
        found: list[str] = []
        error = guarded(lambda fn=fn, found=found: found.extend(fn(rank, world)))
        if error:
            found.append(error)
        everyone_ok(error is None)
        out[name] = (found, time.monotonic() - started)
    return out


def fresh_group(timeout: timedelta = GROUP_TIMEOUT) -> Any:
    """A process group of the whole world for one case of a check (collective; it waits on the
    world group first, for ranks still finishing the previous case)."""
    everyone_ok(True)
    return dist.new_group(backend="gloo", timeout=timeout)

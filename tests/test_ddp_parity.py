"""GossipDataParallel against PyTorch's DDP and a single-process run, in the training loops people
write (issue 12: "What was seen" 1-9 and "What held, and must keep holding").

Each ``@scenario`` is one training loop, run by ``tests/_parity.py`` on every rank of a gloo world:

- with identical data on every rank, under DDP and under gossip (params mode, sync and
  overlapped; gradients mode where marked), every step equals the single-process run of the same
  loop (bit for bit for gossip, to round-off for DDP);
- with different data per rank, every learning rate 0 and replicas perturbed per rank, every
  gossip mix keeps the mean over ranks of every parameter, ``consensus_distance()`` is finite on
  every wrapper (and shrinks under params-mode gossip), and ``average_replicas()`` leaves every
  rank bit-identical.

The ``@check``s are the cases a loop cannot express: cache on against cache off, NaN guards,
precision of the average, collectives that some ranks never call. All scenarios and checks of one
world size run in one forked world (``_world``), once per session; each test reads its own part.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _parity import (
    MIXING,
    SAME_DATA,
    TIMEOUT,
    Run,
    Scenario,
    execute,
    fresh_group,
    guarded,
    run_all,
)
from _toy import batch, toy_model
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.utils.checkpoint import checkpoint

import gossipgrad

SCENARIOS: dict[str, Scenario] = {}
CHECKS: dict[str, tuple[int, Callable[[int, int], list[str]]]] = {}
STEPS = 4


def scenario(*worlds: int, cases: tuple[str, ...] = (), gradients: bool = False) -> Callable:
    """Register ``loop(run)`` (or ``loop(run, case)`` for each of ``cases``) to run on each world
    size of ``worlds``; ``gradients``: also under gossip's gradients mode."""

    def register(loop: Callable) -> Callable:
        extra = ("gradients",) if gradients else ()
        for world in worlds:
            for case in cases or (None,):
                name = loop.__name__ + (f"[{case}]" if case else "")
                name += f"[p{world}]" if len(worlds) > 1 else ""
                fn = functools.partial(loop, case=case) if case else loop
                SCENARIOS[name] = Scenario(fn, world, SAME_DATA + extra, MIXING + extra)
        return loop

    return register


def check(world: int) -> Callable:
    """Register ``fn(rank, world) -> problems`` to run on a world of ``world`` ranks."""

    def register(fn: Callable[[int, int], list[str]]) -> Callable:
        CHECKS[fn.__name__] = (world, fn)
        return fn

    return register


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def sgd(model: nn.Module, run: Run, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=run.lr(lr), momentum=0.9)


def train_step(run: Run, model: nn.Module, opt: torch.optim.Optimizer, t: int) -> torch.Tensor:
    x, y = run.batch(t)
    loss = ce(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


# --- small models ------------------------------------------------------------------------------


class CausalAttention(nn.Module):
    """A GPT-style block whose causal mask is a float buffer full of -inf."""

    def __init__(self, vocab: int = 11, d: int = 8, context: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.full((context, context), -math.inf).triu(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        n = idx.shape[1]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + self.mask[:n, :n]
        return self.head(h + att.softmax(-1) @ v)


class WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = toy_model()
        self.unused = nn.Linear(6, 3)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class WithIntegerParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.order = nn.Parameter(torch.tensor([2, 0, 1]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[:, self.order]


class WithComplexParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.rot = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x) * self.rot
        return self.head(torch.cat([z.real, z.imag], dim=-1))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


class InputNormaliser(nn.Module):
    """A float buffer that training forwards change in place (a running mean of the inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))
        self.body = toy_model(batchnorm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.lerp_(x.mean(0), 0.1)
        return self.body(x - self.mean)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


class ConvNet(nn.Module):
    """A channels-last convolution and a parameter that is a transposed (non-contiguous) view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.mix = nn.Parameter(torch.randn(3, 3).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1)) @ self.mix


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx).mean(1))


# --- issue 12, "What was seen" ----------------------------------------------------------------


@scenario(2, cases=("cache_on", "cache_off"))
def autocast_accumulation(run: Run, case: str) -> None:
    """(1) Four micro-batches in one autocast region, the first three in no_sync()."""
    model = run.wrap(toy_model())
    opt = sgd(model, run, lr=0.1)
    for t in range(STEPS):
        losses = []
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=case == "cache_on"):
            for micro in range(4):
                x, y = run.batch(4 * t + micro)
                with model.no_sync() if micro < 3 else contextlib.nullcontext():
                    loss = ce(model(x), y) / 4
                    loss.backward()
                losses.append(loss.detach())
        opt.step()
        opt.zero_grad()
        run.step_done(torch.stack(losses))


@check(2)
def autocast_cache_setting_changes_nothing(rank: int, world: int) -> list[str]:
    """(1) With different data per rank (replicas that really mix, real learning rate), the
    autocast loop gives bit-identical losses and parameters with cache_enabled True and False."""
    problems: list[str] = []
    for variant in MIXING:
        runs = []
        for case in ("cache_on", "cache_off"):
            run = Run(variant, rank, world, same_data=False, lr_zero=False)
            if execute(functools.partial(autocast_accumulation, case=case), run):
                runs.append(run)
            problems += run.problems
        if len(runs) < 2:
            continue
        for on, off in zip(runs[0].steps, runs[1].steps, strict=True):
            theirs = off.everything()
            diff = [k for k, v in on.everything().items() if not torch.equal(v, theirs[k])]
            if diff:
                problems.append(
                    f"{runs[0].name}: after {on.label}, {diff[0]} differs between "
                    "cache_enabled=True and False"
                )
                break
    return problems


@scenario(2, cases=("both_outside", "first_in_no_sync"), gradients=True)
def two_forwards_one_backward(run: Run, case: str) -> None:
    """(2) A siamese / contrastive loss: two forwards, then one backward (both modes)."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        (x1, y1), (x2, y2) = run.batch(2 * t), run.batch(2 * t + 1)
        with model.no_sync() if case == "first_in_no_sync" else contextlib.nullcontext():
            a = model(x1)
        b = model(x2)
        loss = ce(a, y1) + ce(b, y2) + (a - b).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2, gradients=True)
def forwards_never_change_parameters(run: Run) -> None:
    """(1, 2) The contract: a forward may snapshot the parameters and start sending, but changes
    none of them (not even in place with the same values); mixing happens in backward."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        x, y = run.batch(t)
        with run.unchanged(model, f"the training forward of step {t}"):
            out = model(x)
        ce(out, y).backward()
        opt.step()
        opt.zero_grad()
        run.step_done()


@scenario(3, cases=("wrapper", "module"))
def load_state_dict_mid_run(run: Run, case: str) -> None:
    """(3) Every rank loads the same state between two steps (3 ranks): ranks agree after it."""
    model = run.wrap(toy_model(batchnorm=False))
    saved = toy_model(seed=5, batchnorm=False).state_dict()  # the same on every rank
    opt = sgd(model, run)
    for t in range(6):
        if t == 3:
            run.mean_moves()
            if case == "wrapper":
                model.load_state_dict({f"module.{k}": v for k, v in saved.items()})
            else:
                model.module.load_state_dict(saved)
        train_step(run, model, opt, t)
        run.step_done(ranks_agree=t >= 3)


@scenario(3)
def uneven_inputs_join(run: Run) -> None:
    """(4) The last rank has one batch fewer; the loop runs inside model.join(). No rank waits
    for a timeout; then average_replicas() makes every rank bit-identical (the harness)."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    batches = 5 - (run.rank == run.world - 1)
    # DDP divides by the ranks still in, so that its last step matches the single-process run
    join = model.join(divide_by_initial_world_size=False) if run.is_ddp else model.join()
    started = time.monotonic()
    with join:
        for t in range(batches):
            train_step(run, model, opt, t)
            run.step_done()
    elapsed = time.monotonic() - started
    run.expect(
        elapsed < TIMEOUT.total_seconds() / 2,
        f"the loop took {elapsed:.1f} s: a rank waited for a partner that had run out of data",
    )


@scenario(2, cases=("raise", "skip"))
def causal_mask_buffer(run: Run, case: str) -> None:
    """(5) A float buffer full of -inf (a causal mask) is a constant: no NaN from inf - inf,
    with on_nonfinite='raise' (no error) or 'skip' (the replicas still mix)."""
    model = run.wrap(CausalAttention(), gossip={"on_nonfinite": case})
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr(0.01))
    for t in range(STEPS):
        idx = torch.randint(0, 11, (4, 7), generator=run.data(t))
        logits = model(idx[:, :-1])
        loss = ce(logits.reshape(-1, 11), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())
    mask = model.module.mask
    run.expect(torch.equal(mask, CausalAttention().mask), f"the causal mask is now {mask}")


@scenario(2, cases=("GossipDataParallel", "wrap"))
def ddp_keywords_unused_branch(run: Run, case: str) -> None:
    """(6) DDP's constructor keywords, given to GossipDataParallel or to gossipgrad.wrap (and
    through wrap(algo="allreduce") to DDP); an unused branch (DDP needs
    find_unused_parameters=True for it)."""
    model = run.wrap(
        WithUnusedBranch(),
        via_wrap=case == "wrap",
        device_ids=None,
        output_device=None,
        broadcast_buffers=True,
        find_unused_parameters=True,
        gradient_as_bucket_view=True,
        bucket_cap_mb=1,
    )
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2, cases=("static_graph", "broadcast_buffers_off"))
def ddp_keywords(run: Run, case: str) -> None:
    """(6) DDP's static_graph=True, and broadcast_buffers=False (with BatchNorm)."""
    keywords = {"static_graph": True} if case == "static_graph" else {"broadcast_buffers": False}
    model = run.wrap(toy_model(), **keywords)
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def integer_parameter(run: Run) -> None:
    """(7) An integer nn.Parameter (requires_grad=False) stays local and unchanged."""
    model = run.wrap(WithIntegerParameter())
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()
    order = model.module.order
    run.expect(order.dtype == torch.int64 and order.tolist() == [2, 0, 1], f"order is {order}")


@scenario(2)
def complex_parameter(run: Run) -> None:
    """(8) A complex parameter is mixed (as its real view) and averaged."""
    model = run.wrap(WithComplexParameter())
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@check(2)
def nonfinite_replicas_are_seen(rank: int, world: int) -> list[str]:
    """(5, 8) A NaN in a replica (also in the imaginary part of a complex parameter) makes
    consensus_distance() nan on every wrapper, never 0; gossip's guard sees it: raise names where
    it came from, skip keeps the other rank finite."""
    problems: list[str] = []

    def consensus(variant: str, part: str) -> None:
        run = Run(variant, rank, world, same_data=True, lr_zero=False, group=fresh_group())
        model = run.wrap(WithComplexParameter())
        poison_(model.module, rank, part)
        distance = model.consensus_distance()
        if not math.isnan(distance):
            problems.append(
                f"{run.name}: NaN in the {part} part on rank 1, consensus_distance() is {distance}"
            )

    def guard(variant: str, on_nonfinite: str) -> None:
        run = Run(variant, rank, world, same_data=True, lr_zero=False, group=fresh_group())
        model = run.wrap(WithComplexParameter(), gossip={"on_nonfinite": on_nonfinite})
        poison_(model.module, rank, "imag")
        raised = ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # no optimizer: the NaN stays in the imaginary part (the loss is NaN anyway)
                for t in range(2):  # exchange 1 leaves at step 0's end, mixed at step 1's
                    x, y = run.batch(t)
                    ce(model(x), y).backward()
                    model.step_ended()  # a loop without an optimizer ends its steps by hand
                model.flush()  # mixes exchange 2
            except gossipgrad.NonFiniteError as exc:
                raised = str(exc)
        expected = "its own parameters" if rank == 1 else "parameters received from rank 1"
        if on_nonfinite == "raise":
            said = [raised]
        else:  # one warning per exchange (1 and 2), each naming the right source
            said = [str(w.message) for w in caught if "found NaN or inf" in str(w.message)]
            steps = {int(m) for m in re.findall(r"at exchange (\d+)", " ".join(said))}
            said += [] if steps == {1, 2} else [f"warnings for exchanges {sorted(steps)}"]
        wrong = [m for m in said if f"NaN or inf in {expected}" not in m]
        if wrong:
            problems.append(
                f"{run.name}, on_nonfinite={on_nonfinite!r}: NaN only in the imaginary part on "
                f"rank 1, rank {rank} said {wrong[0][:200]!r} (expected 'NaN or inf in "
                f"{expected}')"
            )
        finite = all(bool(torch.isfinite(p).all()) for p in model.module.parameters())
        if on_nonfinite == "skip" and rank == 0 and not finite:
            problems.append(f"{run.name}: on_nonfinite='skip' let rank 1's NaN into rank 0")

    cases = [functools.partial(consensus, v, part) for v in MIXING for part in ("real", "imag")]
    cases += [
        functools.partial(guard, v, how) for v in ("sync", "overlap") for how in ("raise", "skip")
    ]
    for case in cases:
        error = guarded(case)
        if error:
            problems.append(f"{case.func.__name__}{case.args}: {error}")
    return problems


def poison_(module: WithComplexParameter, rank: int, part: str) -> None:
    if rank == 1:
        with torch.no_grad():
            value = complex(0.0, math.nan) if part == "imag" else complex(math.nan, 0.0)
            module.rot[0] = value


@check(3)
def bfloat16_average_accumulates_in_float32(rank: int, world: int) -> list[str]:
    """(8) average_replicas() of a bfloat16 model is the float64 mean of the replicas rounded
    once to bfloat16 (3 ranks: a sum in bfloat16 rounds at every addition)."""
    problems: list[str] = []
    for variant in MIXING:
        run = Run(variant, rank, world, same_data=False, lr_zero=True, group=fresh_group())
        model = run.wrap(toy_model(batchnorm=False).to(torch.bfloat16))  # perturbed per rank
        mine = [p.detach().double() for p in model.module.parameters()]
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        model.average_replicas()
        for (name, p), *replicas in zip(model.module.named_parameters(), *everyone, strict=True):
            exact = torch.stack(replicas).mean(0)
            _, exponent = torch.frexp(exact)
            half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)  # bfloat16: 8 bits
            err = (p.detach().double() - exact).abs()
            if (err > half_ulp).any():
                worst = (err / half_ulp).max().item()
                problems.append(
                    f"{run.name}: average_replicas() of {name} is {worst:.1f} half-ulps of "
                    "bfloat16 from the exact mean (at most 1: accumulate in float32)"
                )
                break
    return problems


@check(3)
def collectives_on_some_ranks_raise_peer_error_in_time(rank: int, world: int) -> list[str]:
    """(9) average_replicas() / consensus_distance() called by ranks 0 and 1 only (rank 2 alive,
    waiting elsewhere): PeerError within the wrapper's timeout, naming rank 2 on some rank."""
    timeout = timedelta(seconds=2)
    calls = [("sync", "average_replicas"), ("overlap", "consensus_distance")]
    calls += [("ddp", "average_replicas"), ("ddp", "consensus_distance")]
    models = []
    for variant, _ in calls:  # every rank wraps and takes a step: an exchange may be in flight
        # the group's own timeout (what the old engine waited for) is longer than the wrapper's
        group = fresh_group(timeout=timedelta(seconds=8))
        run = Run(variant, rank, world, same_data=True, lr_zero=False, group=group)
        model = run.wrap(toy_model(), gossip={"timeout": timeout})
        train_step(run, model, sgd(model, run), 0)
        models.append((run.name, model))
    outcomes = []
    for (name, model), (_, call) in zip(models, calls, strict=True):
        if rank == world - 1:
            break  # straight to the gather below, on another group
        started = time.monotonic()
        try:
            getattr(model, call)()
            said = "returned"
        except Exception as exc:  # noqa: BLE001 - which error, and when, is the finding
            said = f"{type(exc).__name__} after {time.monotonic() - started:.1f} s: {exc}"
        outcomes.append(f"{name}, {call}(): {' '.join(said.split())[:300]}")
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, outcomes)
    if rank != 0:
        return []
    problems = []
    for i in range(len(calls)):
        said = [everyone[r][i] for r in range(world - 1)]
        for r, s in enumerate(said):
            seconds = re.search(r"\(\): PeerError after ([\d.]+) s", s)
            if not seconds:
                problems.append(f"rank {r}: {s}")
            elif float(seconds.group(1)) > timeout.total_seconds() + 2.5:
                problems.append(f"rank {r}, after {seconds.group(1)} s (timeout 2 s): {s}")
        if not any(
            re.search(rf"ranks?\D{{0,6}}{world - 1}\b", s.split("PeerError")[-1]) for s in said
        ):
            problems.append(f"no rank named rank {world - 1} as missing: {said}")
    return problems


# --- issue 12, "What held, and must keep holding" ---------------------------------------------


@scenario(1, 2, 3, 4)
def sgd_momentum_batchnorm(run: Run) -> None:
    """The README's loop (BatchNorm, SGD with momentum), world sizes 1-4; state_dict keys are
    the module's prefixed with 'module.'."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        run.step_done(train_step(run, model, opt, t))
    keys = list(model.state_dict())
    run.expect(keys == [f"module.{k}" for k in model.module.state_dict()], f"keys {keys}")


@scenario(2)
def tied_weights(run: Run) -> None:
    model = run.wrap(TiedLM())
    opt = sgd(model, run, lr=0.1)
    for t in range(STEPS):
        idx = torch.randint(0, 12, (4, 6), generator=run.data(t))
        loss = ce(model(idx[:, :-1]).reshape(-1, 12), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())
    run.expect(model.module.out.weight is model.module.emb.weight, "the tie was broken")


@scenario(2)
def frozen_parameters(run: Run) -> None:
    module = toy_model()
    module[0].requires_grad_(False)
    model = run.wrap(module)
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=run.lr(0.05), momentum=0.9
    )
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def no_sync_accumulation(run: Run) -> None:
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        for micro in range(3):
            x, y = run.batch(3 * t + micro)
            with model.no_sync() if micro < 2 else contextlib.nullcontext():
                (ce(model(x), y) / 3).backward()
        opt.step()
        opt.zero_grad()
        run.step_done()


@scenario(2)
def eval_and_no_grad_between_steps(run: Run) -> None:
    """Evaluation under torch.no_grad() and in eval() mode with grad enabled, a training-mode
    forward under no_grad, and eval()/train() toggles between steps: none is a training step."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    probe, _ = run.batch(1000)
    for t in range(STEPS):
        model.eval()
        with torch.no_grad():
            evaluated = model(probe)
        with_grad = model(probe).detach()
        model.train()
        loss = train_step(run, model, opt, t)
        with torch.no_grad():
            train_mode = model(probe)
        run.step_done(evaluated, with_grad, train_mode, loss)


@scenario(2)
def autocast_each_forward(run: Run) -> None:
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        x, y = run.batch(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = ce(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2, cases=("bfloat16", "float64"))
def model_dtype(run: Run, case: str) -> None:
    dtype = getattr(torch, case)
    model = run.wrap(toy_model().to(dtype))
    opt = sgd(model, run)
    for t in range(STEPS):
        x, y = run.batch(t, dtype)
        loss = ce(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2, cases=("module", "wrapper"))
def torch_compile(run: Run, case: str) -> None:
    """torch.compile of the module (then wrapped) or of the wrapper; aot_eager traces forward
    and backward like inductor does but skips code generation (seconds on CPU)."""
    if case == "module":
        model = run.wrap(torch.compile(toy_model(), backend="aot_eager"))
        fast = model
    else:
        model = run.wrap(toy_model())
        fast = torch.compile(model, backend="aot_eager")
    opt = sgd(model, run)
    for t in range(STEPS):
        x, y = run.batch(t)
        loss = ce(fast(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2)
def lr_scheduler(run: Run) -> None:
    model = run.wrap(toy_model())
    opt = sgd(model, run, lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    for t in range(STEPS):
        train_step(run, model, opt, t)
        schedule.step()
        run.step_done()


@scenario(2)
def per_group_options(run: Run) -> None:
    module = toy_model()
    model = run.wrap(module)
    opt = torch.optim.SGD(
        [
            {"params": module[0].parameters(), "lr": run.lr(0.1), "momentum": 0.9},
            {"params": module[1].parameters(), "lr": run.lr(0.05)},
            {"params": module[3].parameters(), "lr": run.lr(0.02), "weight_decay": 0.01},
        ]
    )
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2, cases=("adam", "adamw", "nesterov"))
def optimizer(run: Run, case: str) -> None:
    model = run.wrap(toy_model())
    params = model.parameters()
    if case == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=run.lr(0.01), amsgrad=True)
    elif case == "adamw":
        opt = torch.optim.AdamW(params, lr=run.lr(0.01), weight_decay=0.1)
    else:
        opt = torch.optim.SGD(params, lr=run.lr(0.05), momentum=0.9, nesterov=True)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def gradient_clipping(run: Run) -> None:
    model = run.wrap(toy_model())
    opt = sgd(model, run, lr=0.1)
    for t in range(STEPS):
        x, y = run.batch(t)
        ce(model(x), y).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        run.step_done(norm)


@scenario(2)
def buffers_changed_in_forward(run: Run) -> None:
    model = run.wrap(InputNormaliser())
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def activation_checkpointing(run: Run) -> None:
    model = run.wrap(Checkpointed())
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def channels_last_and_non_contiguous(run: Run) -> None:
    module = ConvNet().to(memory_format=torch.channels_last)
    model = run.wrap(module)
    opt = sgd(model, run)
    for t in range(STEPS):
        g = run.data(t)
        x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        loss = ce(model(x), torch.randint(0, 3, (4,), generator=g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())
    layout = (
        module.conv.weight.is_contiguous(memory_format=torch.channels_last),
        module.mix.stride(),
    )
    run.expect(layout == (True, (1, 3)), f"the parameters' layout changed: {layout}")


@scenario(2)
def spectral_and_weight_norm(run: Run) -> None:
    module = nn.Sequential(
        spectral_norm(nn.Linear(6, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 3))
    )
    model = run.wrap(module)
    opt = sgd(model, run)
    for t in range(STEPS):
        train_step(run, model, opt, t)
        run.step_done()


@scenario(2)
def sparse_embedding(run: Run) -> None:
    model = run.wrap(Bag())
    opt = torch.optim.SGD(model.parameters(), lr=run.lr(0.1))
    for t in range(STEPS):
        g = run.data(t)
        idx = torch.randint(0, 20, (8, 4), generator=g)
        loss = ce(model(idx), torch.randint(0, 3, (8,), generator=g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2)
def gradient_penalty(run: Run) -> None:
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        x, y = run.batch(t)
        x.requires_grad_(True)
        out = model(x)
        (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = ce(out, y) + 0.1 * grad_x.pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


@scenario(2)
def gan_two_wrapped_models(run: Run) -> None:
    """A DCGAN loop: D(real) + D(G(z).detach()) then D(G(z)) for the generator's step."""
    G = run.wrap(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6)))
    D = run.wrap(nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)))
    opt_g = torch.optim.Adam(G.parameters(), lr=run.lr(1e-3), betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=run.lr(1e-3), betas=(0.5, 0.999))
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)
    for t in range(STEPS):
        g = run.data(t)
        real, z = torch.randn(8, 6, generator=g) + 1, torch.randn(8, 4, generator=g)
        fake = G(z)
        d_loss = bce(D(real), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(fake), ones)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        run.step_done(d_loss.detach(), g_loss.detach())


# --- issue 25: parameters change only where the optimizer changes them -----------------------


class ReentrantCheckpointed(nn.Module):
    """The last block under reentrant activation checkpointing (its input requires grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, self.first(x), use_reentrant=True))


class GrowingCache(nn.Module):
    """HF-style buffers: a non-persistent cache replaced by a bigger one when a longer input
    arrives, and a buffer that is None until the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 3)
        self.register_buffer("cos", torch.ones(2), persistent=False)
        self.register_buffer("center", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.cos.numel() < n:
            cos = torch.cos(torch.arange(n, dtype=x.dtype) / n)
            self.register_buffer("cos", cos, persistent=False)
        if self.center is None:
            self.register_buffer("center", torch.zeros(6))
        if self.training:
            with torch.no_grad():
                self.center.lerp_(x.mean(0), 0.5)
        return self.body(x - self.center) * self.cos[:n, None]


@scenario(2, cases=("retain_graph", "two_forwards", "no_sync_between"), gradients=True)
def two_backward_passes(run: Run, case: str) -> None:
    """Two backwards per step: an extra loss on a retained graph, two forwards each with its
    backward, and a no_sync() forward+backward between a synced forward and its backward."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    for t in range(STEPS):
        (x, y), (x2, y2) = run.batch(t), run.batch(100 + t)
        if case == "retain_graph":
            out = model(x)
            ce(out, y).backward(retain_graph=True)
            (0.1 * out.pow(2).mean()).backward()
        elif case == "two_forwards":
            a, b = model(x), model(x2)
            ce(a, y).backward()
            ce(b, y2).backward()
        else:
            out = model(x)
            with model.no_sync():
                ce(model(x2), y2).backward()
            ce(out, y).backward()
        opt.step()
        opt.zero_grad()
        run.step_done()


@scenario(2)
def reentrant_checkpointing(run: Run) -> None:
    model = run.wrap(ReentrantCheckpointed())
    opt = sgd(model, run)
    for t in range(STEPS):
        run.step_done(train_step(run, model, opt, t))


@scenario(2)
def sam(run: Run) -> None:
    """Sharpness-aware minimisation, the DDP recipe: the first pass in no_sync(), perturb
    p.data, the second pass, restore p.data, then the base optimizer's step."""
    model = run.wrap(toy_model(batchnorm=False))
    base = torch.optim.SGD(model.parameters(), lr=run.lr(0.05), momentum=0.9)
    for t in range(STEPS):
        x, y = run.batch(t)
        with model.no_sync():
            ce(model(x), y).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.stack([p.grad.norm() for p in params]).norm()  # type: ignore[union-attr]
        eps = [0.05 * p.grad / (norm + 1e-12) for p in params]  # type: ignore[operator]
        for p, e in zip(params, eps, strict=True):
            p.data.add_(e)
        base.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        for p, e in zip(params, eps, strict=True):
            p.data.sub_(e)
        base.step()
        base.zero_grad()
        run.step_done(loss.detach())


@scenario(2)
def eval_mode_training(run: Run) -> None:
    """Fine-tuning with frozen BatchNorm statistics: every step in eval() mode."""
    model = run.wrap(toy_model())
    opt = sgd(model, run)
    model.eval()
    for t in range(STEPS):
        run.step_done(train_step(run, model, opt, t))


@scenario(2)
def two_optimizers_disjoint_parameters(run: Run) -> None:
    """Muon + AdamW style: matrices with one optimizer, the rest with another."""
    model = run.wrap(toy_model(batchnorm=False))
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    opt_a = torch.optim.SGD(matrices, lr=run.lr(0.05), momentum=0.9)
    opt_b = torch.optim.AdamW(others, lr=run.lr(0.01))
    for t in range(STEPS):
        x, y = run.batch(t)
        ce(model(x), y).backward()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        run.step_done()


@scenario(2)
def lbfgs_closure(run: Run) -> None:
    """A closure evaluated inside optimizer.step() (LBFGS; Lightning steps this way too)."""
    model = run.wrap(toy_model(batchnorm=False))
    opt = torch.optim.LBFGS(model.parameters(), lr=run.lr(0.5), max_iter=3)
    for t in range(STEPS):
        x, y = run.batch(t)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            return loss

        run.step_done(opt.step(closure).detach())


@scenario(2)
def buffers_created_and_resized_after_wrapping(run: Run) -> None:
    model = run.wrap(GrowingCache())
    opt = sgd(model, run)
    for t, n in enumerate((4, 8, 8, 12, 12)):
        x, y = run.batch(t)
        x, y = x.repeat(2, 1)[:n], y.repeat(2)[:n]
        loss = ce(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.step_done(loss.detach())


def _gossip(rank: int, module: nn.Module, **options: Any) -> gossipgrad.GossipDataParallel:
    return gossipgrad.GossipDataParallel(
        module, process_group=fresh_group(), timeout=TIMEOUT, **options
    )


def _mean(module: nn.Module, group: Any) -> torch.Tensor:
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    dist.all_reduce(flat, group=group)
    return flat / dist.get_world_size(group)


@check(2)
def a_step_skipped_on_one_rank(rank: int, world: int) -> list[str]:
    """A GradScaler that finds inf on rank 1 only (in a middle step, and in the last one): the
    schedule holds (no hang), every mix keeps the mean, replicas still contract."""
    problems: list[str] = []

    def case(sync: bool, skip_at: int) -> None:
        model = _gossip(rank, toy_model(batchnorm=False), sync=sync)
        torch.manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        before, start = _mean(model.module, model.group), model.consensus_distance()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        for t in range(6):
            x, y = batch(rank, t)
            poison = math.inf if (rank == 1 and t == skip_at) else 1.0
            scaler.scale(ce(model(x), y) * poison).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        end = model.consensus_distance()
        drift = (_mean(model.module, model.group) - before).abs().max().item()
        steps = [None] * world
        dist.all_gather_object(steps, model.step, group=model.group)
        where = f"sync={sync}, skipped at step {skip_at} on rank 1"
        if drift > 1e-6:
            problems.append(f"{where}: the mean moved by {drift:.3g}")
        if not end < start / 2:
            problems.append(f"{where}: consensus {start:.3g} -> {end:.3g}")
        if len(set(steps)) != 1:
            problems.append(f"{where}: ranks counted {steps} steps")
        model.close()

    for sync in (False, True):
        for skip_at in (3, 5):
            error = guarded(functools.partial(case, sync, skip_at))
            if error:
                problems.append(f"sync={sync}, skip at {skip_at}: {error}")
    return problems


@check(2)
def tracking_follows_requires_grad(rank: int, world: int) -> list[str]:
    """Identical data, tracking on: a layer frozen mid-run stays exactly where it was (as in
    a single process and under DDP), and the tracker state is in gossip_state()."""
    model = _gossip(rank, toy_model(batchnorm=False), tracking=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    frozen = None
    for t in range(6):
        if t == 3:
            model.module[0].requires_grad_(False)
            frozen = model.module[0].weight.detach().clone()
        x, y = batch(0, t)
        ce(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model.flush()
    assert frozen is not None
    moved = (model.module[0].weight.detach() - frozen).abs().max().item()
    problems = [f"the frozen layer moved by {moved:.3g}"] if moved else []
    if "trackers" not in model.gossip_state():
        problems.append("gossip_state() holds no trackers")
    model.close()
    return problems


@check(2)
def loops_that_cannot_communicate_are_refused(rank: int, world: int) -> list[str]:
    """Manual updates without an optimizer raise within a few steps, naming the fix (and work
    with step_ended()); ZeroRedundancyOptimizer is refused at its first step."""
    problems: list[str] = []
    model = _gossip(rank, toy_model(batchnorm=False))
    said = ""
    for t in range(40):
        x, y = batch(rank, t)
        try:
            ce(model(x), y).backward()
        except RuntimeError as exc:
            said = f"{t}: {exc}"
            break
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad  # type: ignore[operator]
        model.zero_grad()
    if "step_ended()" not in said or int(said.split(":")[0]) > 20:
        problems.append(f"a loop without an optimizer said {said[:200]!r}")
    model.close()

    model = _gossip(rank, toy_model(batchnorm=False))
    start = model.consensus_distance()
    for t in range(6):
        x, y = batch(rank, t)
        ce(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad  # type: ignore[operator]
        model.zero_grad()
        model.step_ended()
    if model.step != 6:
        problems.append(f"step_ended() counted {model.step} steps, not 6")
    model.close()
    del start

    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _gossip(rank, toy_model(batchnorm=False))
    zero = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, process_group=model.group
    )
    x, y = batch(rank, 0)
    ce(model(x), y).backward()
    try:
        zero.step()
        problems.append("ZeroRedundancyOptimizer stepped under gossip")
    except RuntimeError as exc:
        if "ZeroRedundancyOptimizer" not in str(exc):
            problems.append(f"ZeroRedundancyOptimizer: {exc}")
    model.close()
    return problems


@check(2)
def close_leaves_a_plain_module(rank: int, world: int) -> list[str]:
    """close() (and the context manager) removes every hook: afterwards the module trains as a
    plain module, with no communication and no optimizer hook left behind."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    # the keys this model adds (an earlier, unclosed wrapper collected meanwhile may remove its own)
    hooks = set(_global_optimizer_pre_hooks) | set(_global_optimizer_post_hooks)
    module = toy_model(batchnorm=False)
    with _gossip(rank, module) as model:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for t in range(3):
            x, y = batch(rank, t)
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    problems = []
    if (set(_global_optimizer_pre_hooks) | set(_global_optimizer_post_hooks)) - hooks:
        problems.append("optimizer hooks are left after close()")
    left = [n for n, p in module.named_parameters() if p._post_accumulate_grad_hooks]
    if left:
        problems.append(f"gradient hooks are left on {left}")
    before = model.step
    x, y = batch(rank, 9)
    ce(module(x), y).backward()  # rank 1 alone: a closed wrapper must not wait for rank 0
    opt.step()
    if model.step != before:
        problems.append("a step after close() was counted")
    return problems


# --- the tests: one world per size, run once; each test reads its own part --------------------


def _world_main(rank: int, world: int) -> dict[str, tuple[list[str], float]]:
    return run_all(rank, world, SCENARIOS, CHECKS)


@functools.cache
def _world(world: int) -> dict[str, list[str]]:
    """name -> problems (with the ranks that saw each) for every scenario and check of ``world``."""
    per_rank = run_world(_world_main, world, timeout=150)
    out: dict[str, list[str]] = {}
    for name in per_rank[0]:
        seen: dict[str, list[int]] = {}
        for rank, results in enumerate(per_rank):
            for problem in results[name][0]:
                seen.setdefault(problem, []).append(rank)
        out[name] = [f"rank {','.join(map(str, r))}: {p}" for p, r in seen.items()]
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_matches_ddp_and_the_single_process_run(name: str) -> None:
    problems = _world(SCENARIOS[name].world)[name]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CHECKS))
def test_check(name: str) -> None:
    problems = _world(CHECKS[name][0])[name]
    assert not problems, "\n".join(problems)

"""Where a training step ends, seen from torch's own hooks: ``optimizer.step()``.

In a single-process loop and under DDP, parameters change only inside ``optimizer.step()``. The
gossip wrappers keep that: their step ends, and the partner's replica is mixed in, inside the
optimizer's step (torch's global ``register_optimizer_step_pre_hook``/``post_hook``, filtered to
the optimizers that hold this model's parameters, and removed by ``close``). Forwards,
backwards, ``eval()`` or ``train()``, ``no_sync()``, autocast and checkpointing never change a
parameter, so any number of forwards and backwards per step, reentrant checkpointing, SAM's
perturb-and-restore and closures (LBFGS, Lightning) are safe.

A step ends:

- after the outermost ``optimizer.step()`` that leaves every parameter with a gradient stepped
  (several optimizers over disjoint parameters, Muon + AdamW, end one step together; an
  optimizer that wraps another, SAM, ends it once);
- before an optimizer steps a second time in a step that never completed: the parameters that
  had gradients and no optimizer are left out from then on;
- *skipped*, when a backward begins after an earlier backward whose gradients were discarded
  with no optimizer step (``zero_grad()`` in between): a ``GradScaler`` that found inf on this
  rank only. The step still counts (its partners expect its message), but nothing is mixed
  until the next optimizer step.

A loop that updates parameters by hand, with no torch optimizer, would never communicate: after
a few such steps the clock raises an error that says what to do (``step_ended()``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from gossipgrad._setup import WeakHook

# A loop whose backwards never meet an optimizer step: raise after this many skipped steps (a
# GradScaler skips a few at most while its scale settles) or this many backwards.
MANUAL_SKIPS, MANUAL_BACKWARDS = 16, 256


class StepClock:
    """Calls ``on_step_end`` inside ``optimizer.step()`` when a step of ``module`` ends (after
    the update: the parameters may change there), ``on_step_skipped`` when a step ended without
    one (inside a backward: nothing may change), ``on_grad(param)`` when a parameter's gradient
    has accumulated, and ``on_backward_end`` at the end of each backward outside ``no_sync``.
    ``what`` and ``rank`` name the wrapper in errors."""

    def __init__(
        self,
        module: nn.Module,
        *,
        on_step_end: Callable[[], None],
        on_step_skipped: Callable[[], None],
        on_grad: Callable[[torch.Tensor], None] | None = None,
        on_backward_end: Callable[[], None] | None = None,
        what: str = "GossipDataParallel",
        rank: int = 0,
    ) -> None:
        self.module = module
        self.synced = True  # False inside no_sync(): backwards there do not count
        self._on_step_end, self._on_step_skipped = on_step_end, on_step_skipped
        self._on_grad, self._on_backward_end = on_grad, on_backward_end
        self._what, self._rank = what, rank
        self._owned: weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]] = (
            weakref.WeakKeyDictionary()
        )
        self._inside = 0  # nesting depth of this model's optimizer steps now running
        self._stepped: set[int] = set()  # optimizers (ids) that stepped in this step
        self._covered: set[int] = set()  # parameters (ids) that an optimizer stepped
        self._orphans: set[int] = set()  # parameters with gradients and no optimizer
        self._in_backward = False
        self._backward_since_step = False
        self._ever_stepped = False
        self._skips = self._backwards = 0
        self._handles: list[RemovableHandle] = [
            register_optimizer_step_pre_hook(WeakHook(self._pre)),
            register_optimizer_step_post_hook(WeakHook(self._post)),
        ]
        self._handles += [
            p.register_post_accumulate_grad_hook(WeakHook(self._grad_ready))
            for p in module.parameters()
            if p.requires_grad
        ]
        # the global hooks go with the clock, even if close() is never called
        self._finalizer = weakref.finalize(self, _remove, list(self._handles[:2]))

    def close(self) -> None:
        """Remove every hook this clock put on torch and on the module's parameters."""
        _remove(self._handles)
        self._handles = []
        self._finalizer.detach()

    # --- optimizer hooks ----------------------------------------------------------------------

    def _mine(self, optimizer: torch.optim.Optimizer) -> frozenset[int]:
        """The ids of this model's parameters that ``optimizer`` holds (cached per optimizer,
        recomputed when its parameter groups change)."""
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._owned.get(optimizer)
        if cached is None or cached[0] != count:
            ours = {id(p) for p in self.module.parameters()}
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = (count, frozenset(held & ours))
            self._owned[optimizer] = cached
        return cached[1]

    def _pre(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if not self._mine(optimizer):
            return
        _refuse_sharded(optimizer, self._what)
        if self._inside == 0 and id(optimizer) in self._stepped:
            # stepping again in a step that never completed: the parameters still waiting had
            # gradients and no optimizer; leave them out and end the step before this update
            self._orphans |= self._waiting()
            self._end()
        self._inside += 1

    def _post(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        mine = self._mine(optimizer)
        if not mine:
            return
        self._inside = max(0, self._inside - 1)
        self._ever_stepped = True
        self._stepped.add(id(optimizer))
        self._covered |= mine
        self._orphans -= mine
        if self._inside == 0 and not self._waiting():
            self._end()

    def _waiting(self) -> set[int]:
        """Parameters with a gradient that no optimizer has stepped in this step."""
        done = self._covered | self._orphans
        return {
            id(p)
            for p in self.module.parameters()
            if p.requires_grad and p.grad is not None and id(p) not in done
        }

    def end_step(self) -> None:
        """End the step now (``step_ended()``: a loop without a torch optimizer)."""
        self._ever_stepped = True
        self._end()

    def take_unfinished(self) -> bool:
        """Whether a backward of the current step ran and no optimizer step ended the step;
        asked between steps (``flush``), that step's optimizer step was skipped (a
        ``GradScaler`` that found inf in the last step on this rank only)."""
        unfinished = self._backward_since_step and self._inside == 0
        self._backward_since_step = False
        return unfinished

    def _end(self) -> None:
        self._stepped.clear()
        self._covered.clear()
        self._backward_since_step = False
        self._on_step_end()

    # --- autograd hooks -----------------------------------------------------------------------

    def _grad_ready(self, param: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
            if self.synced and self._inside == 0:
                self._backward_began(param)
        if self._on_grad is not None:
            self._on_grad(param)

    def _backward_ended(self) -> None:
        self._in_backward = False
        if self._on_backward_end is not None and self.synced:
            self._on_backward_end()

    def _backward_began(self, param: torch.Tensor) -> None:
        """The first gradient of a backward outside an optimizer step: if an earlier backward
        of this step had its gradients discarded without an optimizer step, that step was
        skipped."""
        discarded = self._backward_since_step and all(
            p.grad is None for p in self.module.parameters() if p.requires_grad and p is not param
        )
        self._backward_since_step = True
        if not self._ever_stepped:
            self._backwards += 1
            self._skips += discarded
            if self._skips >= MANUAL_SKIPS or self._backwards >= MANUAL_BACKWARDS:
                raise RuntimeError(self._manual_loop_message())
        if discarded:
            self._on_step_skipped()

    def _manual_loop_message(self) -> str:
        return (
            f"rank {self._rank}: {self._what} saw {self._backwards} backward passes and no "
            "torch.optim optimizer step over this model's parameters. gossipgrad exchanges "
            "replicas at the end of optimizer.step() (seen through torch's optimizer hooks), "
            "so this loop would train without any communication. Fix: step the parameters "
            "with a torch.optim.Optimizer (any subclass), or, when updating them by hand, call "
            "model.step_ended() after each update"
        )


def _refuse_sharded(optimizer: torch.optim.Optimizer, what: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        raise RuntimeError(
            f"{what} cannot train with ZeroRedundancyOptimizer: it shards the optimizer state "
            "across ranks on the assumption that every rank holds the same replica (DDP), so "
            "under gossip each shard would learn only from its owner's data. Fix: give each "
            "rank a plain optimizer over model.parameters() (gossip keeps every rank's state)"
        )


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()

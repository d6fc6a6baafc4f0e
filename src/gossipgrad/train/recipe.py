"""The training recipe of ``gossipgrad train``: learning-rate schedule with linear warmup, mixed
precision, gradient clipping (label smoothing is in ``models.task_loss``).

    recipe = Recipe(cfg, optimizer, device, steps_per_epoch)   # after the optimizer is restored
    with recipe.autocast():
        loss = ...
    recipe.backward_and_step(loss, module)                      # scaler, clip, step, schedule

The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per training step, whose
factor is ``lr_factor(step, ...)``: linear warmup ``(step + 1) / warmup`` over ``--warmup-epochs``
epochs, then constant, cosine (to 0 at the end of ``--epochs``) or step (x0.1 at 1/2 and 3/4 of
``--epochs``). ``--max-steps`` only stops the run early: it does not reshape the schedule, so a
run stopped and resumed follows the schedule of an uninterrupted one. The scheduler's and the
GradScaler's states are checkpointed (``state_dict``) and resumed exactly; the base learning rate
is always ``--lr`` (a resumed run may change it, like the schedule's other flags).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from gossipgrad.train.config import TrainConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The multiple of ``--lr`` used by training step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))  # step


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse ``--amp fp16`` off CUDA: CPU float16 autocast has no GradScaler and underflows."""
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs a CUDA device (it trains with a GradScaler); on CPU use --amp bf16"
        )


class Recipe:
    """The schedule, autocast and GradScaler of one rank (module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        steps_per_epoch: int,
    ) -> None:
        check_amp(cfg.amp, device)
        self.cfg, self.optimizer, self.device = cfg, optimizer, device
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self.total_steps = cfg.epochs * steps_per_epoch
        for group in optimizer.param_groups:
            group.pop("initial_lr", None)  # a checkpoint's: the base is --lr
            group["lr"] = cfg.lr
        self.scheduler = LambdaLR(optimizer, self.factor)
        self.last_lr: float | None = None
        self.scaler = (
            torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
        )

    def factor(self, step: int) -> float:
        return lr_factor(step, self.cfg.lr_schedule, self.warmup_steps, self.total_steps)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.cfg.amp == "none":
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.cfg.amp]):
            yield

    def backward_and_step(self, loss: torch.Tensor, module: torch.nn.Module) -> None:
        """Backward (scaled for fp16), clip to ``--grad-clip``, optimizer step, schedule step."""
        optimizer, scaler, clip = self.optimizer, self.scaler, self.cfg.grad_clip
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()

    def lr(self) -> float:
        """The learning rate of the last step taken (before any: of the first)."""
        return self.last_lr if self.last_lr is not None else self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue at training step ``step`` from a checkpoint's ``state`` (None: one written
        before the recipe was checkpointed, so only the step is known)."""
        scheduler = self.scheduler
        if state and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        scheduler.last_epoch = step  # the schedule counts training steps
        scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]  # --lr wins
        lrs = [base * self.factor(step) for base in scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() answers
        self.last_lr = None
        if self.scaler is not None and state and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

"""A run's measurements: how they are summed, and where they go (a JSONL file, a live bar,
TensorBoard).

    meter = Meter(device)                            # sums on this rank, training or held-out
    meter.add(loss, output, target)                  # one batch
    totals = meter.reduce()                          # summed over ranks (collective)
    log = MetricsLog(run_dir, algo="gossip", total_steps=500, quiet=False, tensorboard=False)
    log.advance()                                    # one training step done
    log.record({"step": 10, "loss": 0.5, ...})       # one line of metrics.jsonl
    log.close()

Only rank 0 makes one (the records are already reduced over ranks). ``history`` is every record
so far; a resumed run passes the checkpoint's history, and ``metrics.jsonl`` is rewritten from it,
so the file continues exactly where the checkpoint was taken. It is written as a new file renamed
over the old one (``files.open_replacing``): a link planted there is replaced, never written
through. ``read_metrics`` skips a damaged line (a full disk or a crash can leave half a line at
the end) with one warning line.

Divergence guard: a record whose consensus distance is above ``consensus_warn`` (or not finite)
gets a ``"warning"`` entry, and when the distance goes above it (first, or again after falling
back below) one line ``gossipgrad: warning: ...`` with the step and the figure is written to
stderr above the bar. A training loss that turns NaN or inf is recorded as such (``NaN`` in the
JSON lines) and warned about the same way, once per stretch.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gossipgrad.train.files import open_replacing, read_json_lines

METRICS_FILE = "metrics.jsonl"
_BAR_KEYS = {
    "loss": "loss",
    "acc": "acc",
    "consensus": "cons",
    "samples_per_s": "samples/s",
    "test_acc": "test acc",
}


@dataclass(frozen=True)
class Totals:
    """A ``Meter``'s sums over every rank: mean loss and accuracy (None without targets), and
    the number of samples and targets (tokens, for language models)."""

    loss: float | None
    acc: float | None
    samples: int
    targets: int


class Meter:
    """Running sums of a task's loss and accuracy on this rank, for the training records and for
    held-out evaluation alike: loss times targets and correct predictions stay on the device
    (no synchronisation per batch), the counts in Python. ``started`` is the training time at
    which the sums began (for samples per second)."""

    def __init__(self, device: torch.device, started: float = 0.0) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x targets, correct
        self.targets = 0
        self.samples = 0
        self.started = started

    @torch.no_grad()
    def add(self, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
        """One batch: ``loss`` its mean loss, ``output`` the logits, ``target`` the classes."""
        self.sums[0] += loss.detach().double() * target.numel()
        self.sums[1] += (output.argmax(-1) == target).sum()
        self.targets += target.numel()
        self.samples += target.shape[0]

    def reduce(self) -> Totals:
        """The sums over every rank (collective: one all-reduce)."""
        counts = self.sums.new_tensor([self.targets, self.samples])
        sums = torch.cat([self.sums, counts])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        loss, correct, targets, samples = sums.tolist()
        if not targets:
            return Totals(None, None, int(samples), 0)
        return Totals(loss / targets, correct / targets, int(samples), int(targets))

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "targets": self.targets, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.targets, self.samples = int(state["targets"]), int(state["samples"])


class MetricsLog:
    """A JSONL file of records, a tqdm bar with the latest ones, and optionally TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        *,
        algo: str,
        total_steps: int,
        start_step: int = 0,
        history: list[dict[str, Any]] | None = None,
        quiet: bool = False,
        tensorboard: bool = False,
        consensus_warn: float = 0.0,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = list(history or [])
        self._consensus_warn = consensus_warn
        measured = [r["consensus"] for r in self.history if r.get("consensus") is not None]
        self._above = bool(measured) and self._is_above(measured[-1])
        losses = [r["loss"] for r in self.history if r.get("loss") is not None]
        self._loss_bad = bool(losses) and not math.isfinite(losses[-1])
        self._file = open_replacing(run_dir / METRICS_FILE)  # closed in close()
        for record in self.history:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=algo,
            unit="step",
            disable=quiet,
            dynamic_ncols=True,
            leave=True,
        )
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def record(self, record: dict[str, Any]) -> None:
        """Keep ``record`` (step, epoch, time, loss, acc, consensus, samples_per_s, ...)."""
        self._guard_consensus(record)
        self._guard_loss(record)
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        shown = {
            short: _short(record[key])
            for key, short in _BAR_KEYS.items()
            if record.get(key) is not None
        }
        self._bar.set_postfix(shown, refresh=False)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def _guard_consensus(self, record: dict[str, Any]) -> None:
        consensus = record.get("consensus")
        if consensus is None or not self._consensus_warn:
            return
        above = self._is_above(consensus)
        if above:
            record["warning"] = (
                f"consensus distance {consensus:.3g} > --consensus-warn {self._consensus_warn:g}"
            )
        if above and not self._above:
            self._bar.write(
                f"gossipgrad: warning: step {record['step']}: consensus distance {consensus:.3g} "
                f"is above --consensus-warn {self._consensus_warn:g}: the replicas are drifting "
                "apart (lower --lr, or try --sync or --schedule exact)",
                file=sys.stderr,
            )
        self._above = above

    def _guard_loss(self, record: dict[str, Any]) -> None:
        loss = record.get("loss")
        if loss is None:
            return
        bad = not math.isfinite(loss)
        if bad and not self._loss_bad:
            ranks = record.get("nonfinite_ranks")
            where = f" (replicas of ranks {ranks} are not finite)" if ranks else ""
            self._bar.write(
                f"gossipgrad: warning: step {record['step']}: the training loss is {loss}{where}: "
                "training has diverged (lower --lr, or check the data)",
                file=sys.stderr,
            )
        self._loss_bad = bad

    def _is_above(self, consensus: float) -> bool:
        return not math.isfinite(consensus) or consensus > self._consensus_warn

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (none if it is missing); a damaged line is
    skipped with one warning line."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return read_json_lines(path)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)

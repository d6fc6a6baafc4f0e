"""The end-of-run comparison: a side-by-side table, a report image and a JSON summary.

    write_report(Path("runs/x"))   # reads runs/x/<algo>/{summary.json,metrics.jsonl}
    # -> runs/x/report.png, runs/x/summary.json; format_table(...) gives the printed table

The image (matplotlib, Agg backend, no display needed) shows the training loss and accuracy
against step and against wall time for each algorithm, the consensus distance over time, and,
with ``--eval-every``, the held-out accuracy of the replicas' average against training time.

The report covers every algorithm whose run finished in the folder, earlier runs included; a
damaged ``summary.json`` (truncated, or not a run summary) or ``metrics.jsonl`` line of one is
skipped with one warning line (``gossipgrad.train.files``). Every file is written to a temporary
file renamed over the old one: a link planted there is replaced, never written through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gossipgrad.train.files import read_json, write_atomic
from gossipgrad.train.metrics import read_metrics

REPORT_IMAGE = "report.png"
SUMMARY_FILE = "summary.json"
_ORDER = ("gossip", "hierarchical", "allreduce")
_COLORS = {"gossip": "tab:blue", "hierarchical": "tab:green", "allreduce": "tab:orange"}
_LABELS = {"gossip": "gossip", "hierarchical": "hierarchical", "allreduce": "all-reduce"}


# what the table reads from each run's summary
_SUMMARY_NUMBERS = (
    "test_accuracy",
    "test_loss",
    "train_time_s",
    "bytes_per_rank_per_step",
    "consensus_distance",
    "samples_per_s",
    "steps",
    "world_size",
)
_SUMMARY_TEXTS = ("algo", "dataset", "model")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically (a reader never sees half a file, and a link at
    ``path`` is replaced, never written through)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_summaries(out: Path) -> dict[str, dict[str, Any]]:
    """``{algo: summary}`` for every algorithm that has finished in run folder ``out``; a damaged
    summary is skipped with one warning line."""
    found = {}
    for algo in _ORDER:
        path = out / algo / SUMMARY_FILE
        if path.is_file():
            summary = read_json(path, damaged="skip", check=_summary_problem)
            if summary is not None:
                found[algo] = summary
    return found


def _summary_problem(value: Any) -> str | None:
    """What makes ``value`` unusable as a run's summary, or None."""
    if not isinstance(value, dict):
        return "is not a run summary (not a JSON object)"
    bad = [k for k in _SUMMARY_NUMBERS if not _is_number(value.get(k))]
    bad += [k for k in _SUMMARY_TEXTS if not isinstance(value.get(k), str)]
    return f"is not a run summary (no valid {', '.join(bad)})" if bad else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """The comparison table, one column per algorithm."""
    rows: list[tuple[str, Any]] = [
        ("test accuracy (averaged model)", lambda s: f"{s['test_accuracy']:.2%}"),
        ("test loss", lambda s: f"{s['test_loss']:.4f}"),
        ("training time", lambda s: f"{s['train_time_s']:.1f} s"),
        ("bytes sent / rank / step", lambda s: _bytes(s["bytes_per_rank_per_step"])),
        ("messages / rank / step", _messages),
        ("rounds of latency / step", _rounds),
        ("consensus distance (end)", lambda s: f"{s['consensus_distance']:.2e}"),
        ("samples / s", lambda s: f"{s['samples_per_s']:,.0f}"),
        ("steps", lambda s: f"{s['steps']}"),
    ]
    algos = list(summaries)
    cells = [[name] + [fmt(summaries[a]) for a in algos] for name, fmt in rows]
    header = [""] + [_LABELS.get(a, a) for a in algos]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(r, widths) for r in cells]
    first = next(iter(summaries.values()), None)
    if first is not None:
        lines.insert(0, setting(first))
    lines.append(LOOPBACK_NOTE)
    return "\n".join(lines)


LOOPBACK_NOTE = (
    "note: ranks on one machine talk over loopback, so times here measure CPU, not a network;\n"
    "      for links, see benchmarks/network_bench.py (and the messages and rounds above)"
)


def _every(s: dict[str, Any]) -> int:
    config = s.get("config")
    every = config.get("gossip_every") if isinstance(config, dict) else None
    return every if isinstance(every, int) and every > 0 else 1


def _messages(s: dict[str, Any]) -> str:
    """Structural: gossip sends one message to its partner and receives one (per bucket), every
    ``--gossip-every`` steps; a ring all-reduce sends 2(p-1) per bucket."""
    p, algo = s["world_size"], s["algo"]
    if p == 1:
        return "0"
    if algo == "allreduce":
        return f"{2 * (p - 1)} sends + {2 * (p - 1)} recvs"
    every = _every(s)
    per = "1 send + 1 recv"
    return per if every == 1 else f"({per}) / {every}"


def _rounds(s: dict[str, Any]) -> str:
    """Structural: messages that wait on each other per step (ring all-reduce: 2(p-1))."""
    p, algo = s["world_size"], s["algo"]
    if p == 1:
        return "0"
    if algo == "allreduce":
        return f"{2 * (p - 1)} (2(p-1))"
    if algo == "hierarchical":
        return "2(r-1) in a node + 1"
    every = _every(s)
    return "1" if every == 1 else f"1 / {every}"


def setting(summary: dict[str, Any]) -> str:
    """``digits, mlp, 4 ranks``."""
    world = summary["world_size"]
    return f"{summary['dataset']}, {summary['model']}, {world} rank{'' if world == 1 else 's'}"


def write_report(out: Path) -> dict[str, Any]:
    """Write ``report.png`` and ``summary.json`` in run folder ``out``; return the summary."""
    summaries = read_summaries(out)
    if not summaries:
        raise FileNotFoundError(f"no finished run in {str(out)!r} (no <algo>/{SUMMARY_FILE})")
    records = {algo: read_metrics(out / algo) for algo in summaries}
    plot_report(records, summaries, out / REPORT_IMAGE)
    summary = {"runs": summaries, "report": REPORT_IMAGE, "table": format_table(summaries)}
    write_json(out / SUMMARY_FILE, summary)
    return summary


def plot_report(
    records: dict[str, list[dict[str, Any]]], summaries: dict[str, dict[str, Any]], path: Path
) -> None:
    """Loss and accuracy against step and wall time, consensus distance over time, the table."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), layout="constrained")
    panels = [
        (axes[0, 0], "step", "loss", "training loss"),
        (axes[0, 1], "time", "loss", "training loss"),
        (axes[1, 0], "step", "acc", "training accuracy"),
        (axes[1, 1], "time", "acc", "training accuracy"),
    ]
    for ax, x_key, y_key, title in panels:
        for algo, recs in records.items():
            xs, ys = _series(recs, x_key, y_key)
            ax.plot(xs, ys, color=_COLORS.get(algo), label=_LABELS.get(algo, algo), lw=1.6)
        ax.set_title(f"{title} vs {'wall time' if x_key == 'time' else 'step'}")
        ax.set_xlabel("wall time (s)" if x_key == "time" else "step")
        ax.set_ylabel("training loss" if y_key == "loss" else "training accuracy")
        if y_key == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        _legend(ax)
    _plot_held_out(axes[1, 1], records)

    ax = axes[0, 2]
    for algo, recs in records.items():
        xs, ys = _series(recs, "time", "consensus")
        positive = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
        label = _LABELS.get(algo, algo)
        if positive and algo == "allreduce":
            # the parameters are identical; BatchNorm's running statistics are each rank's own
            label += ": parameters identical, BatchNorm running stats per rank"
        if positive:
            ax.plot(*zip(*positive, strict=True), color=_COLORS.get(algo), label=label, lw=1.6)
        elif xs:
            ax.plot([], [], color=_COLORS.get(algo), label=f"{label}: 0 (replicas identical)")
    ax.set_yscale("log")
    ax.set_title("consensus distance ||x_i - mean|| / ||mean||")
    ax.set_xlabel("wall time (s)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)

    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0.0, 0.95, format_table(summaries), family="monospace", fontsize=10, va="top")
    first = next(iter(summaries.values()))
    names = " vs ".join(_LABELS.get(a, a) for a in summaries)
    fig.suptitle(f"gossipgrad: {names} ({setting(first)})", fontsize=14)
    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _plot_held_out(ax: Any, records: dict[str, list[dict[str, Any]]]) -> None:
    """Held-out accuracy of the averaged model (``--eval-every`` records) against training time,
    over the training accuracy."""
    shown = False
    for algo, recs in records.items():
        xs, ys = _series(recs, "time", "test_acc")
        if xs:
            label = f"{_LABELS.get(algo, algo)}: held-out, averaged model"
            ax.plot(xs, ys, color=_COLORS.get(algo), ls="--", marker="o", ms=4, label=label)
            shown = True
    if shown:
        ax.set_title("accuracy vs training time (evaluations excluded)")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("training accuracy (lines), test accuracy (dashed)")
        _legend(ax)


def _legend(ax: Any) -> None:
    """A legend where something is labelled (a short run may have no points yet)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [
        (r[x_key], r[y_key])
        for r in records
        if _is_number(r.get(x_key)) and _is_number(r.get(y_key)) and math.isfinite(r[y_key])
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _row(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

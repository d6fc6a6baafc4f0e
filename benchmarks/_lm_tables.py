"""The tables and plots of benchmarks/lm.py, from its JSON (a list of settings, each with its
runs; see lm.py's docstring for the columns).

    print(tables(settings)); paths = plot(settings, Path("benchmarks/results/lm.json"))
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lm_contenders import parse  # noqa: E402
from peers import _group, _mean_std, _secs, stopped_runs  # noqa: E402

_SAME = 1e-9  # a loss equal to the target reaches it


def time_to_loss(run: dict[str, Any], target: float) -> float | None:
    """The training time of the first evaluation of ``run`` at or below ``target``, or None."""
    return next((e["time"] for e in run["evals"] if e["val_bpc"] <= target + _SAME), None)


def loss_at(run: dict[str, Any], t: float) -> float:
    """``run``'s validation loss at training time ``t``: linear between its evaluations, its
    last one after it finished."""
    evals = run["evals"]
    for a, b in zip(evals, evals[1:], strict=False):
        if a["time"] <= t <= b["time"]:
            w = (t - a["time"]) / (b["time"] - a["time"]) if b["time"] > a["time"] else 1.0
            return a["val_bpc"] + w * (b["val_bpc"] - a["val_bpc"])
    return evals[-1]["val_bpc"] if t >= evals[-1]["time"] else evals[0]["val_bpc"]


def _hits(by: dict[str, list[dict[str, Any]]], target: float) -> dict[str, tuple[float, int]]:
    """Per contender: the mean time to ``target`` over the seeds that reach it, and how many do
    not."""
    hits = {}
    for name, rs in by.items():
        times = [t for r in rs if (t := time_to_loss(r, target)) is not None]
        if times:
            hits[name] = (statistics.mean(times), len(rs) - len(times))
    return hits


def _epoch_losses(rs: list[dict[str, Any]]) -> list[str]:
    """Mean ± std over seeds of the loss after each whole epoch."""
    cells = []
    for epoch in range(1, int(max(e["epoch"] for e in rs[0]["evals"])) + 1):
        values = [e["val_bpc"] for r in rs for e in r["evals"] if e["epoch"] == epoch]
        mean, std = _mean_std(values) if values else (float("nan"), float("nan"))
        cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if len(values) > 1 else ""))
    return cells


def final_loss(rs: list[dict[str, Any]]) -> float:
    """The mean final validation loss of one contender's runs."""
    return statistics.mean(r["final_val_bpc"] for r in rs)


def judged(by: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The contenders run on every seed: the targets compare only these (one left at seed 0
    after the first grid is shown, not judged)."""
    most = max(len(rs) for rs in by.values())
    return {n: rs for n, rs in by.items() if len(rs) == most}


def _best_peer(
    by: dict[str, list[dict[str, Any]]], hits: dict[str, tuple[float, int]]
) -> tuple[str, float] | None:
    """The peer that reaches the target soonest on every seed (else the one with the lowest
    final loss), and its mean finishing time."""
    peers = [n for n in by if parse(n).peer]
    if not peers:
        return None
    full = [n for n in peers if n in hits and hits[n][1] == 0]
    final = {n: final_loss(by[n]) for n in peers}
    best = min(full, key=lambda n: hits[n][0]) if full else min(peers, key=final.get)
    return best, statistics.mean(r["train_time_s"] for r in by[best])


def tables(settings: list[dict[str, Any]]) -> str:
    """A markdown table per setting, and the targets checked on it."""
    out = []
    for g in _group(settings).values():
        s, by = g["setting"], g["by"]
        ddp = by.get("ddp", [])
        target = final_loss(ddp) if ddp else None
        hits = _hits(by, target) if target is not None else {}
        compared = judged(by)
        best = _best_peer(compared, hits)
        base = statistics.mean(r["step_mean_s"] for r in ddp) if ddp else None
        seeds = sorted({r["seed"] for rs in by.values() for r in rs})
        loads = g["loads"] or [float("nan")]
        epochs = int(s["epochs"])
        out.append(
            f"\n{s['hosts']} hosts at {s['rate']}, gpt {s['model_options']} "
            f"({s['params'] / 1e6:.1f}M parameters, {s['model_bytes'] / 1e6:.1f} MB), "
            f"{s['corpus_bytes'] / 1e3:.0f} KB of pytext, batch {s['batch_per_host']} x "
            f"{s['block']} tokens per host, AdamW lr {s['lr']} (warm-up {s['lr_warmup']}, "
            f"cosine), {epochs} epochs of {s['steps_per_epoch']} steps, seeds {seeds}; "
            f"{s['cpus']} CPU cores shared by all hosts, load average {min(loads):.1f}-"
            f"{max(loads):.1f} (mean {statistics.mean(loads):.1f}) over the rounds; torchft "
            f"{s.get('torchft')}; code {', '.join(sorted(set(g['sources'])))}\n"
        )
        goal = f"{target:.3f}" if target is not None else "DDP's loss"
        at = f"{best[0]}'s finish ({_secs(best[1])} s)" if best else "the best peer's finish"
        epoch_cols = " | ".join(f"val bpc, epoch {e + 1}" for e in range(epochs))
        out += [
            f"| contender | seeds | mean step ms | vs DDP | MB/host/step on the link (expected) | "
            f"{epoch_cols} | training time (s) | time to {goal} (s) | vs best peer | "
            f"val bpc at {at} |",
            "|---" * (9 + epochs) + "|",
        ]
        for name, rs in by.items():
            mean = lambda key, rs=rs: statistics.mean(r[key] for r in rs)  # noqa: E731
            vs = f"{base / mean('step_mean_s'):.2f}x" if base else "-"
            hit = _hit(hits, name, len(rs))
            both = best is not None and {name, best[0]} <= set(hits)
            ratio = f"{hits[name][0] / hits[best[0]][0]:.2f}" if both else "-"
            at_best = statistics.mean(loss_at(r, best[1]) for r in rs) if best else float("nan")
            out.append(
                f"| {rs[0]['label']} | {len(rs)} | {mean('step_mean_s') * 1e3:.0f} | {vs} | "
                f"{mean('mb_per_rank_per_step'):.2f} ({mean('expected_mb_per_rank_per_step'):.2f})"
                f" | {' | '.join(_epoch_losses(rs))} | {_secs(mean('train_time_s'))} | {hit} | "
                f"{ratio} | {at_best:.3f} |"
            )
        out += stopped_runs(settings, s)
        out.append(_targets(compared, hits, target, best))
    return "\n".join(out)


def _hit(hits: dict[str, tuple[float, int]], name: str, seeds: int) -> str:
    if name not in hits:
        return "not reached"
    t, missed = hits[name]
    return _secs(t) + (f" ({seeds - missed}/{seeds})" if missed else "")


def _targets(
    by: dict[str, list[dict[str, Any]]],
    hits: dict[str, tuple[float, int]],
    target: float | None,
    best: tuple[str, float] | None,
) -> str:
    """Issue 28's targets on one setting: (a) the best gossipgrad setting reaches DDP's final
    loss in at most 0.8x the best peer's time; (b) its loss at the best peer's finishing time is
    lower than the peer's; (c) it sends at most DiLoCo's bytes per step: the tuned DiLoCo's (the
    one nearest the target, as the best peer is chosen) and the least of any DiLoCo setting's."""
    ours = [n for n in by if parse(n).family == "gossip"]
    if target is None or best is None or not ours:
        return "\ntargets: not decided (no DDP run, no peer or no gossipgrad setting)"
    peer, finish = best
    mb = {n: statistics.mean(r["mb_per_rank_per_step"] for r in rs) for n, rs in by.items()}
    at = {n: statistics.mean(loss_at(r, finish) for r in rs) for n, rs in by.items()}
    full = [n for n in ours if n in hits and hits[n][1] == 0]
    mine = min(full, key=lambda n: hits[n][0]) if full else min(ours, key=at.get)
    lines = [f"\ntarget loss {target:.3f} bits/char (DDP's mean final); best peer: {peer}"]
    if full and peer in hits and hits[peer][1] == 0:
        ratio = hits[mine][0] / hits[peer][0]
        lines.append(
            f"(a) fastest gossipgrad setting to it: {mine}, {_secs(hits[mine][0])} s; {peer}: "
            f"{_secs(hits[peer][0])} s; ratio {ratio:.3f} (target <= 0.80: "
            f"{'met' if ratio <= 0.8 else 'not met'})"
        )
    else:
        who = "no gossipgrad setting" if not full else "no peer"
        lines.append(f"(a) not met: {who} reached the target on every seed")
    lower = at[mine] < at[peer]
    lines.append(
        f"(b) at {peer}'s finish ({_secs(finish)} s): {mine} {at[mine]:.3f}, {peer} "
        f"{at[peer]:.3f} bits/char ({'met' if lower else 'not met'})"
    )
    dilocos = {n: rs for n, rs in by.items() if parse(n).family == "diloco"}
    tuned_diloco = _best_peer(dilocos, hits)
    if tuned_diloco is not None:
        tuned, least = tuned_diloco[0], min(dilocos, key=mb.get)
        lines.append(
            f"(c) {mine} sends {mb[mine]:.2f} MB/host/step; tuned DiLoCo ({tuned}): "
            f"{mb[tuned]:.2f} ({'met' if mb[mine] <= mb[tuned] else 'not met'}); the least of "
            f"any DiLoCo setting ({least}): {mb[least]:.2f} "
            f"({'met' if mb[mine] <= mb[least] else 'not met'})"
        )
        final = {n: final_loss(rs) for n, rs in by.items()}
        cheaper = [n for n in ours if final[n] < final[tuned] and mb[n] <= mb[tuned]]
        lines.append(
            f"    gossipgrad settings ending below {tuned} at no more bytes per step: "
            f"{', '.join(cheaper) or 'none'}"
        )
    return "\n".join(lines)


def plot(settings: list[dict[str, Any]], out: Path) -> list[Path]:
    """A loss-against-time PNG per setting beside ``out`` (``lm_4x100mbit.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    for g in _group(settings).values():
        s, by = g["setting"], g["by"]
        path = out.with_name(f"{out.stem}_{s['hosts']}x{s['rate']}.png")
        if path in paths:
            path = path.with_name(f"{path.stem}_{len(paths)}.png")
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = plt.get_cmap("tab20").colors
        for i, (name, rs) in enumerate(by.items()):
            family = parse(name).family
            style = {  # gossipgrad solid, the peers dashed, DDP black
                "color": "black" if family == "ddp" else colors[i % len(colors)],
                "linestyle": "-" if family in ("gossip", "ddp") else "--",
                "linewidth": 2.0 if family == "gossip" else 1.2,
            }
            for j, r in enumerate(rs):
                times = [e["time"] for e in r["evals"]]
                losses = [e["val_bpc"] for e in r["evals"]]
                ax.plot(times, losses, alpha=0.8, label=None if j else name, **style)
        if "ddp" in by:
            target = final_loss(by["ddp"])
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label="DDP's final")
        later = [e["val_bpc"] for rs in by.values() for r in rs for e in r["evals"] if e["step"]]
        if later:  # the first drop, from about 8 bits, would flatten the rest
            ax.set_ylim(min(later) - 0.05, max(later) + 0.1)
        ax.set(xlabel="training time (s)", ylabel="validation bits per character")
        ax.set_title(f"{s['hosts']} hosts at {s['rate']}, gpt, {s['params']:,} parameters")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths

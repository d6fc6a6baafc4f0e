"""Project all-reduce and gossip to thousands of ranks with the calibrated cost model.

From the emulated-network measurements (benchmarks/network_bench.py writes them):

    python benchmarks/scale_plot.py --out benchmarks/results/scale.png

or from parameters alone (no measurements), e.g. 10 Gbit/s, 34M float32 parameters:

    python benchmarks/scale_plot.py --no-measurements --bandwidth 10gbit --latency 50e-6 \
        --compute 0.1 --model-bytes 136e6

For each link rate in the measurements it fits the latency from the 4-byte operations
(``fit_latency``), then collective and point-to-point bandwidth and per-step overhead from the
model-sized ones (``calibrate``), prints the relative error at every measured point, then the
projected step time and efficiency (compute / step) at p = 2 ... 4096 for ring, Rabenseifner and
binary-tree all-reduce, DDP (ring overlapped with backward), gossip sync and gossip overlapped,
without and with stragglers, and plots efficiency against p.

The projection's compute time is the smallest compute-only step measured at that rate (the least
CPU-contended one: every emulated host shares this machine's cores), unless ``--compute`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gossipgrad.sim.costmodel import (  # noqa: E402
    DISTRIBUTIONS,
    Measurement,
    Network,
    Stragglers,
    Workload,
    calibrate,
    efficiency,
    fit_latency,
    predict,
    step_time,
    validate,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_bench import RESULTS, rate_bytes  # noqa: E402

ALGORITHMS = ("ring", "rabenseifner", "tree", "ddp", "gossip-sync", "gossip-overlap")
TABLE_P = (2, 8, 64, 512, 4096)
PLOT_P = tuple(2**k for k in range(1, 13))
TARGET = 0.15
SMALL = 1024  # bytes: a bare operation this small measures latency only


def measurements(setting: dict) -> list[Measurement]:
    """The cost-model points of one network_bench setting."""
    phases, p, n = setting["phases"], setting["hosts"], setting["model_bytes"]
    points = []
    for name, phase in phases.items():
        algorithm = name.removesuffix("-small")
        if algorithm in ("allreduce", "exchange"):
            points.append(Measurement(algorithm, p, phase["step_s"], phase.get("bytes", n)))
        elif algorithm in ("ddp", "gossip-sync", "gossip-overlap"):
            compute = phase.get("compute_s") or phases.get("compute", {}).get("step_s")
            if compute:  # a training step is modelled from its compute time
                points.append(Measurement(algorithm, p, phase["step_s"], n, compute))
    return points


def validation_table(rate: str, net: Network, points: list[Measurement]) -> tuple[str, float]:
    rows = [
        f"calibrated at {rate}: latency {net.latency * 1e6:.0f} us, collective bandwidth "
        f"{net.bandwidth * 8 / 1e9:.3f} Gbit/s, point-to-point "
        f"{(net.p2p_bandwidth or net.bandwidth) * 8 / 1e9:.3f} Gbit/s, overhead "
        f"{net.overhead * 1e3:.1f} ms/step",
        "",
        "| p | algorithm | bytes | measured ms | model ms | error |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for v in validate(points, net):
        m = v.measurement
        rows.append(
            f"| {m.p} | {m.algorithm} | {m.model_bytes:.3g} | {_ms(m.step_time)} | "
            f"{_ms(v.predicted)} | {100 * v.error:+.1f}% |"
        )
        if 2 <= m.p <= 8 and m.model_bytes > SMALL:
            worst = max(worst, abs(v.error))
    return "\n".join(rows), worst


def projection_table(net: Network, work: Workload, stragglers: Stragglers) -> str:
    head = "| algorithm | stragglers | " + " | ".join(f"p={p}" for p in TABLE_P) + " |"
    rows = [head, "|" + "---|" * (len(TABLE_P) + 2)]
    for name in ALGORITHMS:
        for s in (None, stragglers):
            cells = []
            for p in TABLE_P:
                t = step_time(name, p, net, work, s)
                cells.append(f"{t * 1e3:.0f} ms ({work.compute / t:.2f})")
            label = "none" if s is None else f"{s.distribution} {s.spread:g}"
            rows.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(
    panels: list[tuple[str, Network, Workload, list[Measurement]]],
    stragglers: Stragglers,
    out: Path,
) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 4.5), squeeze=False)
    colors = dict(zip(ALGORITHMS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (title, net, work, points) in zip(axes[0], panels, strict=True):
        for name in ALGORITHMS:
            for s, style in ((None, "-"), (stragglers, ":")):
                eff = [efficiency(name, p, net, work, s) for p in PLOT_P]
                label = name if s is None else None
                ax.plot(PLOT_P, eff, style, color=colors[name], label=label)
            # measured points at their own compute time (hosts share cores, so it varies with p),
            # next to what the calibrated model predicts for them
            measured = [m for m in points if m.algorithm == name]
            if measured:
                x = [m.p for m in measured]
                ax.plot(x, [m.compute / m.step_time for m in measured], "o", color=colors[name])
                model = [m.compute / predict(m, net) for m in measured]
                ax.plot(x, model, "x", color=colors[name], markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("ranks p")
        ax.set_ylabel("efficiency (compute / step)")
        ax.set_title(f"{title}: {_describe(work)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(
        fontsize=8,
        title=(
            f"lines: projection at the title's compute\ndotted: {stragglers.distribution} "
            f"stragglers {stragglers.spread:g}\ndots: measured, x: model,\nat the point's "
            "own compute time"
        ),
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def _from_measurements(args: argparse.Namespace) -> list[tuple[str, Network, Workload, list]]:
    path = Path(args.results)
    if not path.exists():
        raise SystemExit(
            f"{path} not found: run benchmarks/network_bench.py first, or pass --no-measurements "
            "with --bandwidth, --compute and --model-bytes"
        )
    settings = json.loads(path.read_text())
    panels = []
    for rate in sorted({s["rate"] for s in settings}, key=rate_bytes):
        group = [s for s in settings if s["rate"] == rate]
        points = [m for s in group for m in measurements(s)]
        small = [m for m in points if m.model_bytes <= SMALL]
        large = [m for m in points if m.model_bytes > SMALL]
        latency = args.latency if args.latency is not None else None
        if latency is None and small:
            latency = fit_latency(small)  # alpha from tiny messages, the rest from large ones
        net = calibrate(large, latency=latency)
        computes = [m.compute for m in points if m.compute > 0]
        computes += [s["phases"]["compute"]["step_s"] for s in group if "compute" in s["phases"]]
        compute = args.compute or min(computes)
        work = Workload(compute, args.model_bytes or group[0]["model_bytes"])
        for s in group:
            if s.get("exchange_link_fraction", 1.0) < 0.5:
                print(
                    f"note: at {s['hosts']} hosts x {rate} the bare exchange reached only "
                    f"{100 * s['exchange_link_fraction']:.0f}% of the link: the emulation is "
                    "CPU-bound there (hosts share this machine's cores), which the network model "
                    "does not describe"
                )
        text, worst = validation_table(rate, net, points)
        verdict = "within" if worst <= TARGET else "OUTSIDE"
        print(
            f"{text}\n\nworst error at p = 2..8 (model-sized messages): {100 * worst:.1f}% "
            f"({verdict} the 15% target)\n"
        )
        panels.append((rate, net, work, points))
    return panels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", default=str(RESULTS / "network_bench.json"))
    p.add_argument("--no-measurements", action="store_true", help="use the parameters below only")
    p.add_argument("--bandwidth", default="1gbit", help="link rate (1gbit) or bytes/s")
    p.add_argument("--p2p-bandwidth", default=None, help="point-to-point rate (default: the same)")
    p.add_argument("--latency", type=float, default=None, help="seconds per message (fixes it)")
    p.add_argument("--overhead", type=float, default=0.0, help="seconds per step not overlapped")
    p.add_argument("--compute", type=float, default=None, help="compute-only step time, seconds")
    p.add_argument("--model-bytes", type=float, default=None, help="bytes exchanged per step")
    p.add_argument("--stragglers", default="lognormal", choices=DISTRIBUTIONS)
    p.add_argument("--spread", type=float, default=0.2, help="std of the compute slowdown factor")
    p.add_argument("--out", default=str(RESULTS / "scale.png"), help="the plot (PNG)")
    args = p.parse_args(argv)
    stragglers = Stragglers(args.stragglers, args.spread)

    if args.no_measurements:
        if args.compute is None or args.model_bytes is None:
            p.error("--no-measurements needs --compute (seconds) and --model-bytes")
        net = Network(
            latency=args.latency or 0.0,
            bandwidth=_bytes_per_s(args.bandwidth),
            p2p_bandwidth=_bytes_per_s(args.p2p_bandwidth) if args.p2p_bandwidth else None,
            overhead=args.overhead,
        )
        panels = [(args.bandwidth, net, Workload(args.compute, args.model_bytes), [])]
    else:
        panels = _from_measurements(args)

    for title, net, work, _ in panels:
        print(f"projection at {title}, {_describe(work)}; step time (efficiency)\n")
        print(projection_table(net, work, stragglers), "\n")
    plot(panels, stragglers, Path(args.out))
    print(f"wrote {args.out}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.3f}"


def _describe(work: Workload) -> str:
    return f"compute {work.compute * 1e3:.0f} ms/step, model {work.model_bytes / 1e6:.0f} MB"


def _bytes_per_s(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return rate_bytes(text)


if __name__ == "__main__":
    main()

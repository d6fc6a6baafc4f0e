"""MkDocs hooks (``hooks:`` in mkdocs.yml): tables generated from the code and from the results
files the benchmarks write, so that no figure in the docs is typed by hand.

A page writes a marker on a line of its own and the build replaces it with a table:

    <!-- table: options -->          the engine's options (gossipgrad.options.options_markdown)
    <!-- table: job-options -->      gossipgrad train's options (job_options_markdown)
    <!-- table: results pages=benchmarks/ -->        the headline results (the README's table)
    <!-- table: peers hosts=8 rate=1gbit epochs=10 heap=keep -->   benchmarks/peers.py --show
    <!-- table: network file=network_bench.json -->  benchmarks/network_bench.py's table
    <!-- table: time-to-accuracy -->                 benchmarks/time_to_accuracy.py's
    <!-- table: stragglers procs=4 -->               benchmarks/stragglers.py's
    <!-- table: clipping -->                         benchmarks/clipping.py's
    <!-- table: convergence ARGS... -->              benchmarks/virtual_convergence.py ARGS's
    <!-- table: real-convergence -->                 benchmarks/real_convergence.py's
    <!-- table: lm -->                               benchmarks/lm.py --show
    <!-- table: virtual-lm -->                       benchmarks/virtual_lm.py's
    <!-- table: elastic -->                          benchmarks/elastic.py's, per configuration

Each table is made by the benchmark's own table function from its file in benchmarks/results/.
An unknown marker, or a table with no runs, fails the build. ``results_table`` also makes the
README's results table, which tests/test_docs.py keeps equal to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import statistics
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- table: (?P<name>[\w-]+)(?P<args>[^>]*?)\s*-->$", re.MULTILINE)


def _benchmark(name: str) -> Any:
    """A module of benchmarks/ (they import one another by file name)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return __import__(name)


def _json(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _options(args: dict[str, str]) -> str:
    from gossipgrad.options import options_markdown

    return options_markdown()


def _job_options(args: dict[str, str]) -> str:
    from gossipgrad.train.config import job_options_markdown

    return job_options_markdown()


# --- benchmarks ---------------------------------------------------------------------------------


def _peer_settings(args: dict[str, str]) -> list[dict[str, Any]]:
    """The settings of peers.json that ``args`` selects (hosts, rate, epochs, heap=keep|default)."""
    chosen = []
    for s in _json("peers.json"):
        heap = "keep" if s.get("glibc_tunables") else "default"
        values = {"hosts": str(s["hosts"]), "rate": s["rate"], "epochs": str(s["epochs"])}
        values["heap"] = heap
        if all(values[k] == v for k, v in args.items()):
            chosen.append(s)
    return chosen


def _fence_notes(text: str) -> str:
    """``text`` with each run of two or more lines outside a table in a text block, so that the
    lines a benchmark prints under its table stay lines."""
    out: list[str] = []
    run: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line and not line.startswith("|"):
            run.append(line)
            continue
        out += ["```text", *run, "```"] if len(run) > 1 else run
        out.append(line)
        run = []
    return "\n".join(out)


def _peers(args: dict[str, str]) -> str:
    settings = _peer_settings(args)
    if not settings:
        raise ValueError(f"peers.json has no setting {args}")
    commands = []
    for s in settings:
        command = re.sub(r"\S*/(benchmarks/results/)", r"\1", s["command"])  # where it ran
        command = command.replace(" --out benchmarks/results/peers.json", "")  # the default
        if f"python {command}" not in commands:
            commands.append(f"python {command}")
    text = _benchmark("peers").tables(settings)
    text = re.sub(r"; code [^\n]*", "", text)  # the commits measured: in the JSON, not the docs
    return "```bash\n" + "\n".join(commands) + "\n```\n" + _fence_notes(text)


def _network(args: dict[str, str]) -> str:
    return str(_benchmark("network_bench").table(_json(args.get("file", "network_bench.json"))))


def _time_to_accuracy(args: dict[str, str]) -> str:
    tta, result = _benchmark("time_to_accuracy"), _json("time_to_accuracy.json")
    curves = tta.curves(result["runs"])
    return f"{tta.table(result['runs'], result['target_accuracy'])}\n\n```\n{curves}\n```"


def _stragglers(args: dict[str, str]) -> str:
    bench = _benchmark("stragglers")
    order = {name: i for i, name in enumerate(bench.CONTENDERS)}
    rows = [r for r in _json("stragglers.json")["runs"] if str(r["procs"]) == args["procs"]]
    rows.sort(key=lambda r: (bench.SCENARIOS.index(r["scenario"]), order[r["contender"]]))
    first = rows[0]
    staleness = next(r["staleness"] for r in rows if r["staleness"] is not None)
    settings = Namespace(
        epochs=first["epochs"],
        samples=first["samples"],
        batch=first["batch"],
        per_sample_ms=first["per_sample_ms"],
        staleness=staleness,
        random_q=first["random_q"],
    )
    return _fence_notes(bench.tables(rows, settings))


def _clipping(args: dict[str, str]) -> str:
    return str(_benchmark("clipping").table(_json("clipping.json")))


# The command behind benchmarks/results/virtual_convergence.json's main table.
CONVERGENCE = (
    "--data teacher --teacher-samples 60000 --epochs 4 --batch 16 --p 16 64 128 "
    "--settings iid label-skew label-skew:0.25 --variants allreduce overlapped pga tracking "
    "--seeds 0 1 2 --out benchmarks/results/virtual_convergence.json"
)


def _convergence_runs(argv: list[str]) -> tuple[Namespace, list[dict[str, Any]]]:
    """virtual_convergence.py's arguments ``argv`` and the runs of its ``--out`` they select."""
    vc = _benchmark("virtual_convergence")
    args = vc._parse(argv)
    args.out = ROOT / args.out
    stored = vc._load(args.out)
    runs = []
    for seed in args.seeds:
        for partition, shuffle in args.settings:
            for p in args.p:
                for key in args.variants:
                    ident = vc._identity(args, seed, partition, shuffle, p, key)
                    run = next((r for r in stored if vc._same(r, ident)), None)
                    if run is None:
                        raise ValueError(f"{args.out} has no run {ident}")
                    runs.append(run)
    return args, runs


def _command(words: list[str]) -> str:
    """A bash block of ``words``, broken before options into lines of at most 100 characters."""
    lines = [""]
    for word in words:
        if word.startswith("--") and len(lines[-1]) + len(word) > 90:
            lines[-1] += " \\"
            lines.append("   ")
        lines[-1] += (" " if lines[-1] else "") + shlex.quote(word)
    return "```bash\n" + "\n".join(lines) + "\n```\n"


def _convergence(argv: list[str]) -> str:
    """The command and virtual_convergence.py's tables for the runs of ``--out`` it selects."""
    args, runs = _convergence_runs(argv)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _benchmark("virtual_convergence")._print_tables(runs, args)
    command = ["python", "benchmarks/virtual_convergence.py", *argv]
    return _command(command) + printed.getvalue()


def _real_convergence(args: dict[str, str]) -> str:
    return str(_benchmark("real_convergence").table(_json("virtual_convergence_real.json")["runs"]))


def _lm(args: dict[str, str]) -> str:
    """benchmarks/lm.py's tables of lm.json, under the command of each setting."""
    settings = _json("lm.json")
    commands = dict.fromkeys(s["command"] for s in settings)
    text = _benchmark("_lm_tables").tables(settings)
    text = re.sub(r"; code [^\n]*", "", text)  # the commits measured: in the JSON, not the docs
    blocks = "".join(_command(["python", *shlex.split(c)]) for c in commands)
    return blocks + _fence_notes(text)


def _virtual_lm(args: dict[str, str]) -> str:
    """benchmarks/virtual_lm.py's table for each number of replicas of virtual_lm.json."""
    result, bench = _json("virtual_lm.json"), _benchmark("virtual_lm")
    tables = [bench.table(int(p), runs) for p, runs in result["runs"].items()]
    if not tables:
        raise ValueError("virtual_lm.json has no runs")
    return f"```bash\n{result['command']}\n```\n\n" + "\n\n".join(tables)


def _elastic(args: dict[str, str]) -> str:
    """benchmarks/elastic.py's table for each configuration of elastic.json, under its command."""
    bench, out = _benchmark("elastic"), []
    for config in _json("elastic.json")["configs"].values():
        s = config["settings"]
        words = ["python", "benchmarks/elastic.py", "--seeds", *map(str, s["seeds"])]
        for key in ("world", "kills", "steps", "step_ms", "replace_after_s"):
            words += [f"--{key.replace('_', '-')}", str(s[key])]
        words += ["--out", "benchmarks/results/elastic.json"]
        out.append(_command(words) + "\n" + bench.table(config["runs"], s["world"], s["kills"]))
    if not out:
        raise ValueError("elastic.json has no configurations")
    return "\n\n".join(out)


# --- the headline results (index.md and the README) --------------------------------------------


def _versus(ours: float, theirs: float, unit: str, faster: str, slower: str) -> str:
    """``ours`` with how many times less (``faster``) or more (``slower``) it is."""
    ratio = theirs / ours
    how = f"{ratio:.2f}x {faster}" if ratio >= 1 else f"{1 / ratio:.2f}x {slower}"
    return f"{ours:.0f} {unit} ({how})"


def results_rows() -> list[tuple[str, str, str, str]]:
    """(what was measured, gossipgrad, DDP, benchmark page) for the README's results table."""
    tta = _benchmark("time_to_accuracy")
    result = _json("time_to_accuracy.json")
    hit = {r["algo"]: tta.time_to(r, result["target_accuracy"])["time"] for r in result["runs"]}
    rows = [
        (
            f"{result['hosts']} hosts, 1 Gbit/s links, a 34M-parameter MLP: training time to "
            "DDP's final accuracy",
            _versus(hit["gossip"], hit["allreduce"], "s", "sooner", "later"),
            f"{hit['allreduce']:.0f} s",
            "time-to-accuracy.md",
        )
    ]

    peers = _benchmark("peers")
    settings = _peer_settings({"hosts": "8", "rate": "1gbit", "epochs": "10", "heap": "keep"})
    (group,) = peers._group(settings).values()
    target = statistics.mean(r["final_test_acc"] for r in group["by"]["ddp"])
    all_hits = peers._hits(group["by"], target)
    hits = {name: t for name, (t, missed) in all_hits.items() if not missed}
    dilocos = sorted((m, t, n) for n, (t, m) in all_hits.items() if n.startswith("diloco"))
    diloco = "not reached"
    if dilocos:  # the DiLoCo setting that reaches it on the most seeds, and soonest
        missed, t, name = dilocos[0]
        seeds = len(group["by"][name])
        diloco = f"{t:.0f} s" + (f" on {seeds - missed} of {seeds} seeds" if missed else "")
    rows.append(
        (
            "the same with the peers, 3 seeds: time to DDP's accuracy, communicating every 8 steps",
            f"{hits['gossip-k8']:.0f} s (torch's post-local SGD: {hits['localsgd-k8']:.0f} s; "
            f"torchft's best DiLoCo: {diloco})",
            f"{hits['ddp']:.0f} s",
            "peers.md",
        )
    )

    def step_ms(setting: dict[str, Any], phase: str) -> float:
        return float(setting["phases"][phase]["step_s"] * 1e3)

    network = {(s["hosts"], s["rate"]): s for s in _json("network_bench.json")}
    for hosts, rate, words in ((8, "1gbit", "1 Gbit/s"), (2, "10gbit", "10 Gbit/s")):
        s = network[hosts, rate]
        gossip, ddp = step_ms(s, "gossip-overlap"), step_ms(s, "ddp")
        rows.append(
            (
                f"{hosts} hosts, {words} links: time per step",
                _versus(gossip, ddp, "ms", "faster", "slower"),
                f"{ddp:.0f} ms",
                "network.md",
            )
        )

    stragglers = _benchmark("stragglers")
    runs = {
        (r["scenario"], r["contender"]): r
        for r in _json("stragglers.json")["runs"]
        if r["procs"] == 4
    }

    def slowdown(contender: str) -> float:
        steady = runs["none", contender]["steady_epoch_s"]
        return float(stragglers._last_two(runs["slow2", contender]) / steady)

    rows.append(
        (
            "4 ranks, one of them 2x slower: epoch time over no straggler",
            f"{slowdown('gossip-balance'):.2f}x (with `balance=True`)",
            f"{slowdown('ddp'):.2f}x",
            "stragglers.md",
        )
    )

    vc = _benchmark("virtual_convergence")
    gap = vc.gaps(_convergence_runs(shlex.split(CONVERGENCE))[1])
    tracking = gap["sgd", "label-skew", 0.0, 128, "tracking"]
    plain = gap["sgd", "label-skew", 0.0, 128, "overlapped"]
    rows.append(
        (
            "128 replicas, each on its own labels (simulated): accuracy gap to DDP",
            f"{tracking[0]:+.2f} points with `tracking=True` ({plain[0]:+.2f} without)",
            "0 (the reference)",
            "convergence.md",
        )
    )
    rows.append(_lm_row())
    return rows


def _lm_row() -> tuple[str, str, str, str]:
    """The language model at 4 hosts x 100 Mbit/s: the final loss and training time of DDP,
    gossipgrad's best setting and the best DiLoCo, over the contenders run on every seed."""
    lm = _benchmark("_lm_tables")
    settings = [s for s in _json("lm.json") if s["hosts"] == 4 and s["rate"] == "100mbit"]
    (group,) = lm._group(settings).values()
    runs = lm.judged(group["by"])

    def final(name: str) -> str:
        time = statistics.mean(r["train_time_s"] for r in runs[name])
        return f"{lm.final_loss(runs[name]):.3f} in {time:.0f} s"

    def best(family: str) -> str:
        names = [n for n in runs if lm.parse(n).family == family]
        return min(names, key=lambda n: lm.final_loss(runs[n]))

    ours, diloco = best("gossip"), best("diloco")
    seeds = len(runs["ddp"])
    return (
        f"4 hosts, 100 Mbit/s links, a 3.3M-parameter character GPT, {seeds} seeds: validation "
        "bits per character after 2 epochs, and the training time",
        f"{final(ours)} ({lm.parse(ours).label()}; torchft's best DiLoCo: {final(diloco)})",
        final("ddp"),
        "language-model.md",
    )


def results_table(pages: str) -> str:
    """The results table, linking to the benchmark pages under ``pages``."""
    lines = ["| measured | gossipgrad | DDP | details |", "|---|---|---|---|"]
    for what, ours, theirs, page in results_rows():
        title = page.removesuffix(".md").replace("-", " ")
        lines.append(f"| {what} | {ours} | {theirs} | [{title}]({pages}{page}) |")
    return "\n".join(lines)


# --- the hooks ------------------------------------------------------------------------------------

TABLES: dict[str, Callable[[dict[str, str]], str]] = {
    "options": _options,
    "job-options": _job_options,
    "results": lambda args: results_table(args["pages"]),
    "peers": _peers,
    "network": _network,
    "time-to-accuracy": _time_to_accuracy,
    "stragglers": _stragglers,
    "clipping": _clipping,
    "real-convergence": _real_convergence,
    "lm": _lm,
    "virtual-lm": _virtual_lm,
    "elastic": _elastic,
}


def render(name: str, text: str) -> str:
    """The table of one marker (``name`` and the text after it)."""
    words = shlex.split(text)
    if name == "convergence":
        return _convergence(words)
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: convergence, {', '.join(TABLES)}")
    return TABLES[name](dict(w.split("=", 1) for w in words))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        try:
            return render(match["name"], match["args"])
        except Exception as exc:
            raise RuntimeError(f"{page.file.src_uri}: {match[0]}: {exc!r}") from exc

    return MARKER.sub(replace, markdown)


# The plots the benchmarks write in benchmarks/results/, served beside the benchmark pages.
PLOTS = (
    "scale.png",  # benchmarks/scale_plot.py
    "lm_4x100mbit.png",  # benchmarks/lm.py
    "lm_4x1gbit.png",  # benchmarks/lm.py
    "lm_8x100mbit.png",  # benchmarks/lm.py
    "lm_8x1gbit.png",  # benchmarks/lm.py
)


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    """The benchmarks' plots (``PLOTS``), served as benchmarks/NAME."""
    from mkdocs.structure.files import File

    for name in PLOTS:
        plot = RESULTS / name
        files.append(File.generated(config, f"benchmarks/{name}", abs_src_path=str(plot)))
    return files

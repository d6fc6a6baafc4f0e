"""Elastic gossip under a SIGKILL: survivors go on, and a replacement joins from a live peer.

    python benchmarks/elastic.py --seeds 0 1 2 --out benchmarks/results/elastic.json
    python benchmarks/elastic.py --world 8 --kills 2 --out benchmarks/results/elastic.json
    python benchmarks/elastic.py --rows restart --out benchmarks/results/elastic.json  # that row

``--world`` ranks (4) on loopback (forked processes, gloo, one thread each) train the digits
MLP of ``gossipgrad train`` (``gossipgrad.train.elastic_launch.elastic_worker``: SGD lr 0.05,
momentum 0.9, batch 32 per rank, a ``GossipShuffleSampler``) for ``--steps`` steps around a
``TCPStore`` hosted by this process. Each step is paced to ``--step-ms`` (the MLP computes in
about a millisecond; the pace stands for a model whose steps take that long, so that the run
lasts long enough for a replacement to come). Rows, each over ``--seeds``:

- ``uninterrupted``: no failure (the reference accuracy);
- ``gossipgrad elastic``: the last rank SIGKILLs itself at 30% of the steps (with ``--kills 2``,
  the one before it at 50% too); a new process starts ``--replace-after-s`` seconds after each
  kill and joins the running job;
- ``gossipgrad --max-restarts 1 --resume auto`` (``--rows restart``, one kill): the job
  without elasticity (``gossipgrad train``, same flags, a checkpoint every
  ``--checkpoint-every`` steps), the same rank SIGKILLed at the same step; torch elastic
  restarts every worker, which resume from the last checkpoint. Its own uninterrupted run is
  the reference for its accuracy (the job's loop is not the elastic worker's). Its model is
  ``paced_model`` below (the digits MLP, each training forward paced to ``--step-ms``), and a
  restarted worker starts afresh (Python, torch, the job's imports).

``--rows`` picks the rows to run (default: every row of the configuration; the restarted job
with one kill only); the rows not run keep their saved runs in ``--out``.

Each configuration (world size, kills) is kept in ``--out`` beside the others.

Columns: steps lost (work thrown away: none for elastic, since no replica is rolled back; for
the restarted job, the steps since the checkpoint it resumed from, which it computes again
after its first step: 30 steps of 50 ms are 1.5 s more), steps retaken (a survivor one step
ahead when the change came takes that step's number again, its update kept: training resumes
at the fewest steps any survivor had ended), seconds from the kill to the first step a
survivor ends after it (for the restarted job: the first step of a worker started after the
kill), seconds from the replacement's start to the end of its first step, steps the replacement
trained, and the test accuracy of the replicas' exact average at the end (mean and standard
deviation over the seeds). A replacement is forked from this process, which has imported
torch, the dataset's modules and the optimizer's already: its time counts joining the job and
one step, not starting Python and importing torch (a process that starts afresh, as under
``gossipgrad train --elastic``, adds those seconds).

Targets (issue 29): a survivor's first step within the exchange timeout (10 s here) + 5 s, no
survivor step lost, a replacement training within 30 s of its start, final accuracy within one
standard deviation of the uninterrupted runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked ranks must not inherit OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import sklearn.datasets  # noqa: E402, F401 - digits: imported once here, not per rank
import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401 - the first optimizer imports it: once here

from gossipgrad import checkpoint  # noqa: E402
from gossipgrad.elastic import ElasticGossip  # noqa: E402
from gossipgrad.train.config import load_config  # noqa: E402
from gossipgrad.train.elastic_launch import RUN, elastic_worker  # noqa: E402
from gossipgrad.train.launch import loopback_store  # noqa: E402
from gossipgrad.train.models import build_model, default_model  # noqa: E402

KILL_AT = 0.3  # the first kill, as a share of the steps; the next ones 20% apart
PACE = "GOSSIPGRAD_BENCH_PACE"  # paced_model's settings (JSON), for the job's workers


class _Clock:
    """``on_step`` of one worker: paces each step, dies at its step, and notes in its own
    file the wall-clock times the table needs."""

    def __init__(self, notes: Path, step_s: float, die_at: int | None, started: float) -> None:
        self.notes, self.step_s, self.die_at, self.started = notes, step_s, die_at, started
        self.last = time.time()
        self.calls = 0
        self.changes = 0
        self.before = 0  # the step this worker was computing when the change came

    def __call__(self, elastic: ElasticGossip) -> None:
        now = time.time()
        self.calls += 1
        if self.calls == 2:  # the first step of this process has ended
            self._note({"first_step_end": now, "started": self.started, "at": elastic.step})
        if len(elastic.changes) > self.changes:
            change = elastic.changes[-1]
            self.changes = len(elastic.changes)
            again = max(0, self.before + 1 - change.step) if not change.joined else 0
            self._note({"change": change.generation, "step_end": now, "lost": again})
        if elastic.step == self.die_at:
            self._note({"killed": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
        self.before = elastic.step
        time.sleep(max(0.0, self.step_s - (now - self.last)))
        self.last = time.time()

    def _note(self, values: dict[str, Any]) -> None:
        with self.notes.open("a") as f:
            f.write(json.dumps(values) + "\n")


def _worker(args: list[str], out: str, rank: int, address: str, clock: _Clock) -> None:
    torch.set_num_threads(1)
    try:
        elastic_worker(load_config(args), out, rank, address, on_step=clock)
    except BaseException:  # noqa: BLE001 - said here; the table shows what is missing
        traceback.print_exc()
    os._exit(0)


def one_run(seed: int, a: argparse.Namespace, kills: int) -> dict:
    """One run of ``a.world`` ranks, the last ``kills`` of which die (the i-th at
    ``(30 + 20 i)%`` of the steps), each replaced ``a.replace_after_s`` seconds after its
    death; the notes of every process and the final summary."""
    args = ["--algo", "gossip", "--dataset", "digits", "--nproc", str(a.world)]
    args += ["--seed", str(seed), "--max-steps", str(a.steps), "--timeout-s", "10"]
    args += ["--batch-size", "32"]
    victims = {a.world - 1 - i: round((KILL_AT + 0.2 * i) * a.steps) for i in range(kills)}
    context = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as folder, loopback_store(60) as (_, port):
        address = f"127.0.0.1:{port}"

        def start(index: int) -> Any:
            notes = Path(folder) / f"notes{index}.jsonl"
            clock = _Clock(notes, a.step_ms / 1000, victims.get(index), time.time())
            process = context.Process(
                target=_worker, args=(args, folder, index % a.world, address, clock)
            )
            process.start()
            return process

        began = time.time()
        processes = [start(r) for r in range(a.world)]
        replace_at: dict[int, float] = {}  # victim -> when its replacement starts
        while len(processes) < a.world + kills and any(p.is_alive() for p in processes):
            for victim in victims:
                if victim not in replace_at and not processes[victim].is_alive():
                    killed = _read(Path(folder) / f"notes{victim}.jsonl")[-1]["killed"]
                    replace_at[victim] = killed + a.replace_after_s
            due = sum(1 for when in replace_at.values() if when <= time.time())
            while len(processes) - a.world < due:
                processes.append(start(len(processes)))
            time.sleep(0.05)
        for process in processes:
            process.join()
        notes = [_read(Path(folder) / f"notes{i}.jsonl") for i in range(len(processes))]
        summary_file = Path(folder) / RUN / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    wall = time.time() - began
    return {"seed": seed, "kills": kills, "notes": notes, "summary": summary, "wall_s": wall}


def paced_model(info: Any) -> torch.nn.Module:
    """``--model benchmarks/elastic.py:paced_model``: the dataset's default model, each
    training forward paced to the step time of ``$GOSSIPGRAD_BENCH_PACE``; rank ``victim``
    SIGKILLs itself before its forward of step ``kill`` (once in the job: a flag file), and
    each worker notes its start and the end of its first step in the notes folder."""
    module = build_model(default_model(info), info)
    pace = os.environ.get(PACE)
    if pace is not None:
        module.register_forward_pre_hook(_Pace(json.loads(pace)))
    return module


class _Pace:
    def __init__(self, pace: dict[str, Any]) -> None:
        self.pace, self.calls = pace, 0
        self.born = self.last = time.time()
        self.notes = Path(pace["notes"]) / f"notes{os.getpid()}.jsonl"

    def __call__(self, module: torch.nn.Module, _: Any) -> None:
        if not module.training:
            return
        now = time.time()
        self.calls += 1
        if self.calls == 2:
            self._note({"first_step_end": now, "started": self.born})
        victim = int(os.environ.get("RANK", "-1")) == self.pace["victim"]
        if victim and self.calls == self.pace["kill"] + 1 and self._claim():
            self._note({"killed": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(max(0.0, self.pace["step_s"] - (now - self.last)))
        self.last = time.time()

    def _claim(self) -> bool:
        try:
            os.close(os.open(Path(self.pace["notes"]) / "killed", os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def _note(self, values: dict[str, Any]) -> None:
        with self.notes.open("a") as f:
            f.write(json.dumps(values) + "\n")


def restart_run(seed: int, a: argparse.Namespace, kills: int) -> dict:
    """The job without elasticity (``gossipgrad train``), ``--max-restarts 1 --resume auto``
    and a checkpoint every ``a.checkpoint_every`` steps; with ``kills``, its last rank dies at
    30% of the steps and torch elastic restarts every worker from the last checkpoint."""
    kill_at = round(KILL_AT * a.steps)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "gossipgrad.train.cli", "train", "--algo", "gossip"]
        command += ["--dataset", "digits", "--nproc", str(a.world), "--seed", str(seed)]
        command += ["--max-steps", str(a.steps), "--epochs", "1000"]  # the steps end it
        command += ["--timeout-s", "10", "--batch-size", "32"]
        command += ["--checkpoint-every", str(a.checkpoint_every), "--max-restarts", "1"]
        command += ["--resume", "auto", "--out", str(Path(folder) / "out")]
        command += ["--model", f"{Path(__file__).resolve()}:paced_model"]
        victim = a.world - 1 if kills else -1
        pace = {"notes": folder, "step_s": a.step_ms / 1000, "victim": victim, "kill": kill_at}
        began = time.time()
        done = subprocess.run(
            command, env=os.environ | {PACE: json.dumps(pace)}, capture_output=True, text=True
        )
        wall = time.time() - began
        if done.returncode != 0:
            print(done.stderr[-3000:], flush=True)
        notes = [_read(path) for path in sorted(Path(folder).glob("notes*.jsonl"))]
        summary_file = Path(folder) / "out" / "gossip" / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    resumed = (summary or {}).get("resumed_from")
    run = {"row": "restart", "seed": seed, "kills": kills, "notes": notes, "summary": summary}
    run |= {"wall_s": wall, "kill_step": kill_at if kills else None}
    run["checkpoint_every"] = a.checkpoint_every
    run["resumed_step"] = checkpoint.step_of(resumed) if resumed else None
    return run


def restart_measures(run: dict) -> dict[str, Any]:
    """The restarted job's columns: the steps since the checkpoint it resumed from, and the
    seconds from the kill to the end of the first step of a worker started after it."""
    summary = run["summary"] or {}
    out: dict[str, Any] = {"accuracy": summary.get("test_accuracy"), "steps": summary.get("steps")}
    notes = [n for each in run["notes"] for n in each]
    killed = next((n["killed"] for n in notes if "killed" in n), None)
    if not run["kills"]:
        return out
    out["killed"] = killed is not None  # False: the job ended before the kill's step
    if killed is None:
        return out
    if run["resumed_step"] is not None:
        out["steps_lost"] = run["kill_step"] - run["resumed_step"]
    later = [n["first_step_end"] for n in notes if "started" in n and n["started"] > killed]
    out["kill_to_step_s"] = min(later) - killed if later else None
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def measures(run: dict, world: int) -> dict[str, Any]:
    """The table's columns for one run: per kill, the survivors' first step end after it and
    the steps they took again; per replacement, its first step end after its start."""
    summary = run["summary"] or {}
    out: dict[str, Any] = {"accuracy": summary.get("accuracy"), "steps": summary.get("steps")}
    if not run["kills"]:
        return out
    notes = run["notes"]
    victims = range(world - run["kills"], world)
    survivors = [n for i in range(world) if i not in victims for n in notes[i]]
    changes = [n for n in survivors if "change" in n]
    after, again = [], []
    for victim in victims:
        killed = next(n["killed"] for n in notes[victim] if "killed" in n)
        later = [n for n in changes if n["step_end"] > killed]
        first = min(later, key=lambda n: n["step_end"], default=None)
        if first is not None:
            after.append(first["step_end"] - killed)
            again += [n["lost"] for n in later if n["change"] == first["change"]]
    out["kill_to_step_s"] = max(after, default=None)
    out["steps_retaken"] = max(again, default=None)
    firsts = [[n for n in notes[i] if "first_step_end" in n] for i in range(world, len(notes))]
    if firsts and all(firsts):
        trains = [first[0] for first in firsts]
        out["replacement_trains_s"] = max(t["first_step_end"] - t["started"] for t in trains)
        out["replacement_steps"] = min((summary.get("steps") or 0) - t["at"] for t in trains)
    return out


def table(runs: list[dict], world: int, kills: int) -> str:
    rows = []
    every = {r["checkpoint_every"] for r in runs if "checkpoint_every" in r}
    restarted = f"checkpoint every {'/'.join(map(str, sorted(every)))} steps"
    named = (
        ("elastic", 0, "uninterrupted (elastic worker)"),
        ("elastic", kills, f"gossipgrad elastic, {kills} kill(s)"),
        ("restart", 0, "uninterrupted (gossipgrad train)"),
        ("restart", 1, f"gossipgrad --max-restarts 1 --resume auto, {restarted}"),
    )
    for row, count, name in named:
        chosen = [r for r in runs if r.get("row", "elastic") == row and r["kills"] == count]
        if not chosen:
            continue
        if row == "restart":
            got = [restart_measures(r) for r in chosen]
        else:
            got = [measures(r, world) for r in chosen]
        acc = [m["accuracy"] for m in got if m["accuracy"] is not None]

        def mean(key: str, digits: int = 1, got: list = got) -> str:
            values = [m[key] for m in got if m.get(key) is not None]
            return f"{statistics.mean(values):.{digits}f}" if values else "-"

        spread = f"{statistics.mean(acc):.4f} ± {statistics.pstdev(acc):.4f}" if acc else "-"
        lost = mean("steps_lost") if row == "restart" else ("0" if count else "-")
        rows.append(
            f"| {name} | {lost} | {mean('steps_retaken')} | {mean('kill_to_step_s', 2)} | "
            f"{mean('replacement_trains_s', 2)} | {mean('replacement_steps', 0)} | {spread} |"
        )
    seeds = len({r["seed"] for r in runs})
    head = (
        f"{world} ranks, {seeds} seeds\n\n"
        "| run | steps lost | steps retaken | s kill → next survivor step | "
        "s replacement start → trains | replacement steps | final accuracy (mean ± sd) |\n"
        "|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--kills", type=int, default=1)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--replace-after-s", type=float, default=10.0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--rows", nargs="+", choices=["elastic", "restart"])
    parser.add_argument("--out", default="benchmarks/results/elastic.json")
    a = parser.parse_args()
    if a.rows is None:  # every row this configuration has
        a.rows = ["elastic", "restart"] if a.kills == 1 else ["elastic"]
    if "restart" in a.rows and a.kills != 1:
        parser.error("--rows restart takes one kill (--kills 1)")
    torch.set_num_threads(1)
    runs = []
    for seed in a.seeds:
        for kills in (0, a.kills):
            if "elastic" in a.rows:
                run = one_run(seed, a, kills)
                print(f"seed {seed}, {kills} kill(s): {measures(run, a.world)}", flush=True)
                runs.append(run)
            if "restart" in a.rows:
                run = restart_run(seed, a, kills)
                got = restart_measures(run)
                print(f"seed {seed}, {kills} kill(s), restarted job: {got}", flush=True)
                runs.append(run)
    out = Path(a.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    configs = saved.get("configs", {})  # one entry per world size and number of kills
    key = f"{a.world} ranks, {a.kills} kills"
    before = configs.get(key, {})
    kept = [r for r in before.get("runs", []) if r.get("row", "elastic") not in a.rows]
    runs = kept + runs
    names = ("seeds", "world", "kills", "steps", "step_ms", "replace_after_s")
    settings = {k: getattr(a, k) for k in names} | {"first_kill_at": KILL_AT}
    if "seeds" in before.get("settings", {}):  # the seeds of every row, run now or before
        settings["seeds"] = sorted(set(before["settings"]["seeds"]) | set(a.seeds))
    text = table(runs, a.world, a.kills)
    configs[key] = {"settings": settings, "runs": runs, "table": text}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"configs": configs}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()

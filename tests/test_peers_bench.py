"""benchmarks/peers.py: contender names and expected bytes; a smoke test of its --quick mode on a
real emulated cluster (2 network namespaces with rate-limited links), every contender for 2
epochs of 6 steps on a small model. The smoke test needs root and `ip netns` (skipped otherwise,
and when another netcluster keeps the lock); its DiLoCo contender needs torchft."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "peers.py"
sys.path.insert(0, str(SCRIPT.parent))

from peers import DEFAULT_CONTENDERS, KEEP_HEAP, expected_bytes, parse, tables  # noqa: E402


def _netns_works() -> bool:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


netcluster = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not _netns_works(),
    reason="needs root and network namespaces (ip netns) for benchmarks/netcluster.sh",
)

EXTRA = ["gossip-k2-fp16-pga4"]  # an exact average and a compressed wire within 12 steps
if importlib.util.find_spec("torchft") is not None:
    EXTRA.append("diloco-h4-outer1m0.5")  # its state crosses a round two steps after a sync


def test_diloco_names_and_bytes() -> None:
    d, tuned = parse("diloco-h8"), parse("diloco-h32-outer1m0.5")
    assert (d.family, d.period, d.outer, d.peer) == ("diloco", 8, (0.7, 0.9), True)
    assert (tuned.period, tuned.outer) == (32, (1.0, 0.5))
    assert tuned.label() == "DiLoCo (torchft), H = 32, outer Nesterov lr 1.0 m 0.5"
    for bad in ("diloco-h0", "diloco", "diloco-h8-outer"):
        with pytest.raises(ValueError, match="unknown contender"):
            parse(bad)
    shapes, ring = [[10, 10]], 2 * 3 / 4  # 4 hosts; a sync after steps 8 and 16 of 20
    assert expected_bytes(d, shapes, 4, 20) == pytest.approx(ring * 400 * 2 / 20)
    assert expected_bytes(parse("localsgd-k8"), shapes, 4, 20) == pytest.approx(
        ring * 400 * math.ceil(20 / 8) / 20
    )  # torch's averager also averages at step 0


@netcluster
def test_quick_run_every_contender(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    contenders = [*DEFAULT_CONTENDERS, *EXTRA]
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--lock-wait", "120"]
    cmd += ["--state-dir", str(tmp_path / "state"), "--timeout", "240"]
    done = subprocess.run(
        [*cmd, "--contenders", *contenders], capture_output=True, text=True, timeout=300
    )
    if done.returncode == 3:
        pytest.skip("another netcluster kept /tmp/netcluster.lock")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (setting,) = json.loads(out.read_text())
    assert setting["hosts"] == 2 and setting["exit"] == 0
    assert os.path.basename(setting["gossipgrad_file"]) == "__init__.py"
    assert setting["glibc_tunables"] == KEEP_HEAP  # --keep-heap is the default
    runs = {r["contender"]: r for r in setting["runs"]}
    assert sorted(runs) == sorted(contenders)
    for name, run in runs.items():
        assert run["error"] is None, (name, run["error"])
        assert run["steps"] == 12 and [e["epoch"] for e in run["evals"]] == [1, 2]
        assert 0.0 <= run["final_test_acc"] <= 1.0
        assert run["step_median_s"] > 0 and run["train_time_s"] > 0
        assert all(x["direct_reclaim_stalls"] >= 0 for x in run["rounds"])
        expected, measured = run["expected_mb_per_rank_per_step"], run["mb_per_rank_per_step"]
        if name == "local":
            assert measured < 0.005, measured  # nothing but the launcher's store traffic
        else:  # counted on the link: the payload plus TCP/IP headers and ACKs
            assert 0.95 * expected < measured < 1.25 * expected, (name, measured, expected)
    mb = {n: r["mb_per_rank_per_step"] for n, r in runs.items()}
    assert mb["gossip-k8"] < mb["gossip-k4"] < mb["gossip"]
    assert mb["gossip-k8-bf16"] < 0.6 * mb["gossip-k8"]
    text = tables([setting])
    assert "| DDP |" in text and "target accuracy" in text
    assert "glibc malloc keeping freed memory" in text
    # runs under glibc's default allocator are another setting: a table of their own
    both = tables([setting, {**setting, "glibc_tunables": ""}])
    assert both.count("2 hosts at 1gbit") == 2 and "glibc malloc defaults" in both

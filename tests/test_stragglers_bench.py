"""Smoke test of benchmarks/stragglers.py: its --quick mode (2 forked gloo ranks, 2 short epochs,
no straggler and one rank 2x slower), every contender whose API this checkout has."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "stragglers.py"
sys.path.insert(0, str(SCRIPT.parent))

from stragglers import CONTENDERS, available  # noqa: E402


def test_quick_run_every_available_contender(tmp_path: Path) -> None:
    out = tmp_path / "stragglers.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--timeout", "120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    missing = available()
    expected = [c for c in CONTENDERS if c not in missing]
    assert "ddp" in expected and "gossip" in expected
    for name in missing:
        assert f"skipped {name}:" in done.stdout
    assert "| p | scenario | contender |" in done.stdout
    assert "p=2 one 2x straggler (steady): best gossip epoch / no-straggler epoch =" in done.stdout
    assert "p=2 one 2x straggler (last 2 epochs):" in done.stdout
    assert "projected step ms" in done.stdout

    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "benchmarks/stragglers.py"
    assert sorted(doc["skipped"]) == sorted(missing)
    runs = {(r["scenario"], r["contender"]): r for r in doc["runs"]}
    assert sorted(runs) == sorted((s, c) for s in ("none", "slow2") for c in expected)
    for (scenario, name), r in runs.items():
        assert r["procs"] == 2 and len(r["epoch_s"]) == 2, (scenario, name)
        assert all(t > 0 for t in r["epoch_s"]) and r["steady_epoch_s"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert math.isfinite(r["consensus"]) and r["consensus"] >= 0
        assert r["steps"] > 0 and sum(r["last_epoch_samples"]) > 0
    # (no timing assertion: the quick epochs are too short for the emulated sleep to dominate)

"""The pure parts of benchmarks/lm.py (the language-model benchmark against DDP, local SGD and
torchft's DiLoCo): contender names, expected bytes, the schedule, fragments, and the tables and
plot from a small JSON. Nothing here needs root, a netcluster or torchft."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _lm_contenders import expected_bytes, fragments, lr_factor, parse  # noqa: E402
from _lm_tables import loss_at, plot, tables, time_to_loss  # noqa: E402
from lm import _eval_points, main  # noqa: E402


def test_parse_names() -> None:
    assert parse("ddp").family == "ddp" and not parse("ddp").peer  # its loss is the target
    assert parse("localsgd-k8").peer and parse("sdiloco-h8").peer
    assert parse("localsgd-k8").period == 8
    d = parse("diloco-h32")
    assert (d.family, d.period, d.fragments, d.delay, d.alpha, d.outer) == (
        "diloco", 32, 1, 0, 0.0, (0.7, 0.9)
    )  # fmt: skip
    s = parse("sdiloco-h8")
    assert (s.fragments, s.delay, s.alpha) == (2, 1, 0.5)  # the streaming defaults
    s = parse("sdiloco-h32-f4-t2-a0.25-outer0.5m0.8")
    assert (s.period, s.fragments, s.delay, s.alpha, s.outer) == (32, 4, 2, 0.25, (0.5, 0.8))
    g = parse("gossip-k8-bf16-outer0.7m0.9")
    assert g.family == "gossip" and not g.peer
    assert dict(g.gossip) == {
        "gossip_every": 8, "wire_dtype": "bfloat16", "outer_lr": 0.7, "outer_momentum": 0.9
    }  # fmt: skip
    plain = parse("gossip-k8")
    assert dict(plain.gossip) == {"gossip_every": 8} and plain.outer is None
    assert "outer Nesterov lr 0.7 m 0.9" in g.label() and "every 8 steps" in g.label()
    assert parse("sdiloco-h8").label().startswith("streaming DiLoCo (torchft), H = 8")


BAD = ["diloco", "sdiloco-h8-f3", "sdiloco-h8-f2-t4", "diloco-h8-a2", "gossip-k8-outer", "x"]


@pytest.mark.parametrize("name", BAD)
def test_parse_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="contender|H must be"):
        parse(name)


def test_expected_bytes() -> None:
    ring = 2 * 3 / 4  # 4 hosts
    assert expected_bytes(parse("ddp"), [100], 4, 16) == pytest.approx(ring * 400)
    assert expected_bytes(parse("localsgd-k8"), [100], 4, 16) == pytest.approx(ring * 400 / 8)
    assert expected_bytes(parse("diloco-h8"), [100], 4, 20) == pytest.approx(ring * 800 / 20)
    # streaming, 2 fragments: one synchronised every 4 steps, fragment 0 first
    assert expected_bytes(parse("sdiloco-h8"), [100, 60], 4, 12) == pytest.approx(
        ring * 4 * (100 + 60 + 100) / 12
    )
    plain, outer = parse("gossip-k8"), parse("gossip-k8-outer0.7m0.9")
    assert expected_bytes(outer, [100], 4, 16) == expected_bytes(plain, [100], 4, 16) == 50.0
    assert expected_bytes(parse("ddp"), [100], 1, 16) == 0.0


def test_lr_schedule_and_eval_points() -> None:
    assert [lr_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [lr_factor(s, 4, 100) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] == pytest.approx(0.1) and lr_factor(500, 4, 100) == pytest.approx(0.1)
    assert _eval_points(87, 4) == [22, 44, 65, 87]
    assert _eval_points(3, 4) == [1, 2, 3]


def test_fragments_cover_every_parameter_once() -> None:
    from gossipgrad.train.data import DatasetInfo
    from gossipgrad.train.models import build_model

    info = DatasetInfo("pytext", "lm", (16,), 256)
    model = build_model("gpt", info, n_layer=4, n_head=2, d_model=16)
    parts = fragments(model, 2)
    ids = [id(p) for part in parts for p in part.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert id(model.tokens.weight) in {id(p) for p in parts[0].parameters()}
    assert id(model.head.weight) in {id(p) for p in parts[1].parameters()}
    with pytest.raises(ValueError, match="do not split"):
        fragments(model, 3)


def _run(name: str, times: list[float], losses: list[float], mb: float) -> dict:
    evals = [{"epoch": i / 2, "step": 4 * i, "time": t, "val_bpc": v}
             for i, (t, v) in enumerate(zip(times, losses, strict=True))]  # fmt: skip
    return {
        "contender": name, "label": parse(name).label(), "seed": 0, "evals": evals,
        "steps": 16, "train_time_s": times[-1], "step_mean_s": times[-1] / 16,
        "mb_per_rank_per_step": mb, "expected_mb_per_rank_per_step": mb,
        "final_val_bpc": losses[-1], "error": None, "rounds": [{"load_average_1min": 1.5}],
    }  # fmt: skip


def _setting() -> dict:
    runs = [
        _run("ddp", [0, 10, 20, 30, 40], [8, 5, 4, 3.5, 3.0], 20.0),
        _run("diloco-h8", [0, 4, 8, 12, 16], [8, 5.5, 4.5, 3.8, 3.2], 2.4),
        _run("localsgd-k8", [0, 3, 6, 9, 12], [8, 5, 4, 3.4, 2.9], 3.6),
        _run("gossip-k8", [0, 2, 4, 6, 8], [8, 5, 4, 3.3, 3.1], 1.6),
        _run("gossip-k8-outer0.7m0.9", [0, 2, 4, 6, 8], [8, 4.5, 3.5, 3.0, 2.8], 1.6),
    ]
    return {
        "hosts": 4, "rate": "100mbit", "epochs": 2, "model_options": {"n_layer": 4},
        "batch_per_host": 16, "block": 64, "params": 3_307_264, "model_bytes": 13_229_056,
        "corpus_bytes": 400_000, "lr": 0.003, "lr_warmup": 16, "steps_per_epoch": 8, "cpus": 2,
        "torchft": "0.2.0", "glibc_tunables": "", "commit": "abc", "runs": runs,
    }  # fmt: skip


def test_time_to_loss_and_loss_at() -> None:
    run = _setting()["runs"][0]
    assert time_to_loss(run, 3.0) == 40 and time_to_loss(run, 3.5) == 30
    assert time_to_loss(run, 2.0) is None
    assert loss_at(run, 15) == pytest.approx(4.5) and loss_at(run, 100) == 3.0


def test_tables_and_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setting = _setting()
    text = tables([setting])
    assert "4 hosts at 100mbit" in text and "time to 3.000 (s)" in text
    # localsgd-k8 reaches 3.0 at 12 s: the best peer; gossip with the outer step at 6 s
    assert "best peer: localsgd-k8" in text and "val bpc at localsgd-k8's finish (12 s)" in text
    ddp = "| DDP | 1 | 2500 | 1.00x | 20.00 (20.00) | 4.000 | 3.000 | 40 | 40 | 3.33 | 4.800 |"
    assert ddp in text
    expected = [
        "| gossipgrad, every 8 steps | 1 | 500 | 5.00x | 1.60 (1.60) | 4.000 | 3.100 | 8.00 | "
        "not reached | - | 3.100 |",
        "(a) fastest gossipgrad setting to it: gossip-k8-outer0.7m0.9, 6.00 s; localsgd-k8: 12 s;"
        " ratio 0.500 (target <= 0.80: met)",
        "(b) at localsgd-k8's finish (12 s): gossip-k8-outer0.7m0.9 2.800, localsgd-k8 2.900 "
        "bits/char (met)",
        "(c) gossip-k8-outer0.7m0.9 sends 1.60 MB/host/step; tuned DiLoCo (diloco-h8): 2.40 "
        "(met); the least of any DiLoCo setting (diloco-h8): 2.40 (met)",
        "gossipgrad settings ending below diloco-h8 at no more bytes per step: gossip-k8, "
        "gossip-k8-outer0.7m0.9",
    ]
    for line in expected:
        assert line in text, line
    # without the outer step no gossip setting gets there: (a) not met
    setting["runs"] = [r for r in setting["runs"] if "outer" not in r["contender"]]
    assert "(a) not met: no gossipgrad setting reached the target" in tables([setting])

    out = tmp_path / "lm.json"
    out.write_text(json.dumps([_setting()]))
    (png,) = plot([_setting()], out)
    assert png == tmp_path / "lm_4x100mbit.png" and png.stat().st_size > 1000
    main(["--show", "--out", str(out)])
    assert "best peer: localsgd-k8" in capsys.readouterr().out
    assert math.isclose(json.loads(out.read_text())[0]["runs"][0]["final_val_bpc"], 3.0)


def test_only_contenders_run_on_every_seed_are_judged() -> None:
    setting = _setting()
    again = [{**r, "seed": 1} for r in setting["runs"] if "outer" not in r["contender"]]
    setting["runs"] += again  # the outer setting has seed 0 only: shown, not judged
    text = tables([setting])
    assert "| gossipgrad, every 8 steps, outer Nesterov lr 0.7 m 0.9 | 1 |" in text
    assert "| gossipgrad, every 8 steps | 2 |" in text and "seeds [0, 1]" in text
    assert "(a) not met: no gossipgrad setting reached the target" in text

"""The package's layers and what may import what (README "Development"):

- the library core (``gossipgrad/*.py``) imports neither the training job (``gossipgrad.train``)
  nor the simulator (``gossipgrad.sim``);
- the simulator imports no engine and nothing that communicates;
- ``import gossipgrad`` loads nothing beyond what ``import torch`` loads.

Imports are read from the source (every ``import`` statement, also those inside functions).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gossipgrad

PACKAGE = Path(gossipgrad.__file__).parent
# Modules of the core that communicate or wrap a model: the simulator must stay off them.
ENGINE = {
    "gossipgrad.gossip",
    "gossipgrad.allreduce",
    "gossipgrad.hierarchical",
    "gossipgrad.engines",
    "gossipgrad._p2p",
    "gossipgrad._shard",
    "gossipgrad.sampler",
    "gossipgrad.collectives",
    "gossipgrad.checkpoint",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "gossipgrad" or n.startswith("gossipgrad.")}


def _layer(module: str) -> str:
    if module.startswith("gossipgrad.train"):
        return "train"
    if module.startswith("gossipgrad.sim"):
        return "sim"
    return "core"


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "core"))
def test_core_imports_neither_the_job_nor_the_simulator(module: str) -> None:
    bad = sorted(n for n in MODULES[module] if _layer(n) != "core")
    assert not bad, f"{module} (library core) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "sim"))
def test_the_simulator_imports_no_engine(module: str) -> None:
    bad = sorted(n for n in MODULES[module] if _layer(n) == "train" or n in ENGINE)
    assert not bad, f"{module} (simulator) imports {bad}"


def test_the_walk_sees_every_layer() -> None:
    assert {_layer(m) for m in MODULES} == {"core", "sim", "train"}
    assert "gossipgrad.gossip" in MODULES["gossipgrad.engines"]  # the walk reads the imports


def test_every_public_name_resolves() -> None:
    assert sorted(gossipgrad.__all__) == sorted(gossipgrad._EXPORTS)
    for name in gossipgrad.__all__:  # imported on first use (PEP 562)
        assert getattr(gossipgrad, name) is not None, name


def test_import_gossipgrad_loads_nothing_beyond_torch() -> None:
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import gossipgrad\n"
        "extra = sorted(m for m in set(sys.modules) - before if m.split('.')[0] != 'gossipgrad')\n"
        "print(extra)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

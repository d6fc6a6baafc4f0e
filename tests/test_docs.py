"""The documentation: the site builds in strict mode, every code block is an example the tests
run, every public name has a reference entry, and the README stays short and in step with the
results files and CI. No page carries history (commit hashes, the machine a figure came from,
goals that are not stated beside their check): that belongs in CHANGELOG.md.
"""

from __future__ import annotations

import ast
import functools
import html
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import gossipgrad

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
BUILD_TIMEOUT_S = 300

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
INCLUDE = re.compile(r'^-+8<-+\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
SECTION = re.compile(r"^\s*#\s*-+8<-+\s*\[(?P<edge>start|end):(?P<name>[\w-]+)\]\s*$")
PYTHON = {"python", "py", "python3", "pycon"}
RESULTS_TABLE = re.compile(r"<!-- results:[^\n]*-->\n(?P<table>.*?)\n<!-- /results -->", re.S)

COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
THIS_MACHINE = re.compile(r"\bthis (VM|machine)\b", re.I)
TARGET_CLAIM = re.compile(r"\btargets?\b.*(\bmet\b|<=|>=|\bat (most|least)\b|\bmissed\b)", re.I)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


@functools.cache
def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced Python block of a markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if opening is None:
            continue
        start, body = i, []
        fence, indent = opening["fence"], opening["indent"]
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i].removeprefix(indent))
            i += 1
        i += 1
        if opening["info"].lower() in PYTHON:
            blocks.append((start, "\n".join(body)))
    return blocks


def sections(path: Path) -> dict[str, str]:
    """The marked sections of a file under examples/ (``# --8<-- [start:NAME]`` to ``[end:]``),
    dedented as the docs include them, and the whole file (key ``""``) without the markers."""
    found: dict[str, list[str]] = {"": []}
    open_names: list[str] = []
    for line in path.read_text().splitlines():
        marker = SECTION.match(line)
        if marker is None:
            for name in ["", *open_names]:
                found[name].append(line)
        elif marker["edge"] == "start":
            open_names.append(marker["name"])
            found[marker["name"]] = []
        elif marker["name"] in open_names:
            open_names.remove(marker["name"])
    return {name: textwrap.dedent("\n".join(body)).strip("\n") for name, body in found.items()}


def _include_error(line: str) -> str | None:
    """Why an include line does not name a section of a file under examples/, or None."""
    include = INCLUDE.match(line.strip())
    if include is None:
        return "not an include"
    path = ROOT / include["path"]
    if not include["path"].startswith("examples/") or not path.is_file():
        return f"{include['path']} is not a file under examples/"
    if include["section"] and include["section"] not in sections(path):
        return f"{include['path']} has no section {include['section']!r}"
    return None


def test_every_python_block_is_an_example_or_an_exact_copy_of_one() -> None:
    """Each Python block of the docs is included from examples/ (which CI runs); the README,
    which GitHub shows without includes, holds exact copies of a file or section there."""
    copies = {
        text for path in EXAMPLES.rglob("*.py") for text in sections(path).values() if text.strip()
    }
    bad = []
    for page in _pages():
        for line, code in python_blocks(page.read_text()):
            lines = [x for x in code.splitlines() if x.strip()]
            where = f"{page.relative_to(ROOT)}:{line}"
            if lines and all(INCLUDE.match(x.strip()) for x in lines):
                bad += [f"{where}: {e}" for x in lines if (e := _include_error(x))]
            elif code.strip("\n") not in copies:
                bad.append(f"{where}: neither an include of examples/ nor an exact copy of one")
    assert not bad, "\n".join(bad)


def test_every_include_names_an_existing_example_and_section() -> None:
    bad = []
    for page in _pages():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if "--8<--" in line and (error := _include_error(line)):
                bad.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()}: {error}")
    assert not bad, "\n".join(bad)


def test_the_readme_is_a_few_screens() -> None:
    assert len(README.read_text().splitlines()) <= 300


def test_the_readme_results_table_is_made_from_the_results_files() -> None:
    found = RESULTS_TABLE.search(README.read_text())
    assert found, "README.md: no <!-- results: ... --> table"
    expected = _hooks().results_table("docs/benchmarks/")
    assert found["table"] == expected, (
        "README.md's results table differs from the results files; paste this in its place:\n"
        + expected
    )


def test_the_readme_use_it_like_ddp_script_is_the_example() -> None:
    readme = README.read_text()
    script = sections(EXAMPLES / "ddp_style.py")[""]
    assert any(code.strip("\n") == script for _, code in python_blocks(readme))


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    """.ci/run is the README's install (pip's arguments word for word), then its test command."""
    readme = README.read_text()
    (install,) = [x for x in readme.splitlines() if x.startswith("pip install torch==")]
    ci = [x.split("#")[0].strip() for x in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [x for x in ci if x and not x.startswith(("set ", "cd "))]
    for part in install.split("&&"):
        if part.strip().startswith("pip install"):
            words = part.strip().removeprefix("pip install").strip()
            assert f"python -m pip install -q {words}" in commands, part
    tests = re.search(r"and run the tests[^\n]*\n\n```bash\n(?P<command>[^\n]+)\n```", readme)
    assert tests, "README.md: no test command after 'and run the tests'"
    assert commands[-1] == tests["command"]


def _public_names() -> list[str]:
    lightning = ast.parse((ROOT / "src" / "gossipgrad" / "lightning.py").read_text())
    (value,) = [
        node.value
        for node in lightning.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__"
    ]
    names = ast.literal_eval(value)
    return [f"gossipgrad.{n}" for n in gossipgrad.__all__] + [
        f"gossipgrad.lightning.{n}" for n in names
    ]


def test_every_public_name_has_a_reference_entry() -> None:
    entries = {
        match
        for page in (DOCS / "reference").glob("*.md")
        for match in re.findall(r"^::: (\S+)\s*$", page.read_text(), re.M)
    }
    missing = [name for name in _public_names() if name not in entries]
    assert not missing, f"no ::: entry under docs/reference/ for {missing}"


def _history(text: str) -> list[str]:
    """What a page must not say: commit hashes, 'this VM', goals with no definition beside."""
    found = [f"commit hash {m[0]}" for m in COMMIT.finditer(text)]
    found += [f"'{m[0]}'" for m in THIS_MACHINE.finditer(text)]
    if "Targets." not in text:  # a page that checks goals states them in a "Targets." paragraph
        found += [f"undefined target: {m[0]!r}" for m in TARGET_CLAIM.finditer(text)]
    return found


def test_no_markdown_page_carries_history() -> None:
    bad = [
        f"{page.relative_to(ROOT)}: {problem}"
        for page in _pages()
        for problem in _history(page.read_text().replace("**Targets.**", "Targets."))
    ]
    assert not bad, "\n".join(bad)


def test_the_readme_links_to_files_that_exist() -> None:
    links = re.findall(r"\]\((?!https?:|#)([^)\s#]+)", README.read_text())
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


# --- the built site ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: ``mkdocs build --strict``."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-6000:]}"
    return out


def _article(page: Path) -> str:
    """The text of a built page's content (not the theme around it)."""
    text = page.read_text()
    start, end = text.find("<article"), text.find("</article>")
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", text[start:end], flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def test_the_site_builds_in_strict_mode_with_every_page(site: Path) -> None:
    built = {p.parent.relative_to(site) for p in site.rglob("index.html")}
    for page in DOCS.rglob("*.md"):
        name = page.relative_to(DOCS).with_suffix("")
        folder = name.parent if name.name == "index" else name
        assert folder in built, f"{page.relative_to(ROOT)} was not built"


def test_no_built_page_carries_history(site: Path) -> None:
    """The generated tables and the API reference included."""
    bad = [
        f"{page.relative_to(site)}: {problem}"
        for page in sorted(site.rglob("index.html"))
        if "<article" in page.read_text()
        for problem in _history(_article(page))
    ]
    assert not bad, "\n".join(bad)


def test_the_benchmark_pages_show_their_tables(site: Path) -> None:
    for page in (site / "benchmarks").glob("*/index.html"):
        text = page.read_text()
        assert "<table>" in text, f"{page.relative_to(site)}: no table"
        assert "<!-- table:" not in text, f"{page.relative_to(site)}: a marker left unrendered"

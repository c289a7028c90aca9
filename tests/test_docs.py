"""The documentation holds: the site builds with strict link and anchor checks, every measurement in
benchmarks/RESULTS.md names the command that reproduces it, and the README's links resolve."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
COMMAND = re.compile(r"`((?:python|bash) (benchmarks/[\w./-]+)[^`]*|pstage [^`]+|make [^`]+)`")
PLACEHOLDER = re.compile(r"\b[A-Z]{3,}\b")  # SETTING, RUN, NAME: each row fills it in
CODE = re.compile(r"`([^`]+)`")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc write it (for the plain headings used here)."""
    return re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line) for line in path.read_text().splitlines() if line.startswith("#")}


def facemask_settings() -> set[str]:
    """The setting names benchmarks/facemask.py accepts (its SETTINGS dict), read without importing it."""
    tree = ast.parse((ROOT / "benchmarks" / "facemask.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SETTINGS":
            return {key.value for key in node.value.keys}
    raise AssertionError("benchmarks/facemask.py has no SETTINGS")


def tables(path: Path) -> list[tuple[str, list[str], list[list[str]]]]:
    """Each Markdown table of a results file: the Reproduce line above it in its section, header, rows."""
    found, reproduce, table = [], "", None
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("## "):
            reproduce = ""
        elif line.startswith("Reproduce:"):
            reproduce = line
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if table is None:
                table = (reproduce, cells, [])
                found.append(table)
            elif not set(line) <= set("|-: "):
                table[2].append(cells)
        else:
            table = None
    return found


def check_results(path: Path) -> int:
    """Every table of ``path`` sits below a ``Reproduce: `command``` line of its section naming a
    script that exists; where the command takes a placeholder (SETTING, RUN), each row names its
    value, and a facemask setting must be one of benchmarks/facemask.py's. Returns the tables checked."""
    settings = facemask_settings()
    found = tables(path)
    for reproduce, header, rows in found:
        command = COMMAND.search(reproduce)
        assert command, f"the table '{' | '.join(header)}' has no 'Reproduce: `command`' line above it"
        script = command[2]
        assert script is None or (ROOT / script).is_file(), f"{script} does not exist"
        for row in rows:
            if PLACEHOLDER.search(command[1]):  # the command takes each row's setting, run or flags
                assert CODE.search(row[0]), f"row '{row[0]}' names no setting for `{command[1]}`"
            if header[0] == "setting" and "facemask.py" in reproduce:
                name = CODE.match(row[0])
                assert name and name[1] in settings, f"'{row[0]}' is no setting of benchmarks/facemask.py"
    return len(found)


def test_every_results_table_names_the_command_that_reproduces_it():
    assert check_results(RESULTS) >= 12


def test_results_rows_without_a_command_fail_the_check(tmp_path):
    """The check can fail: a table with no Reproduce line, a setting the script lacks, a row naming none."""
    broken = tmp_path / "RESULTS.md"
    broken.write_text("## A\n\n| setting | CV |\n| --- | --- |\n| `default-15m` | 0.7 |\n")
    with pytest.raises(AssertionError, match="no 'Reproduce"):
        check_results(broken)
    reproduce = "## A\n\nReproduce: `python benchmarks/facemask.py --data D --only SETTING`\n\n"
    broken.write_text(reproduce + "| setting | CV |\n| --- | --- |\n| `no-such-setting` | 0.7 |\n")
    with pytest.raises(AssertionError, match="no setting of benchmarks/facemask.py"):
        check_results(broken)
    broken.write_text(reproduce + "| setting | CV |\n| --- | --- |\n| the defaults | 0.7 |\n")
    with pytest.raises(AssertionError, match="names no setting"):
        check_results(broken)
    broken.write_text(reproduce + "| setting | CV |\n| --- | --- |\n| `default-15m` (15 minutes) | 0.7 |\n")
    assert check_results(broken) == 1


def test_readme_is_a_few_screens_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#([\w-]+))?\)", text)
    assert len(links) >= 10
    for target, anchor in links:
        if "://" in target:
            continue
        path = ROOT / target
        assert path.exists(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"README links to {target}#{anchor}, which has no such heading"


def mkdocs_build(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",  # not with --quiet: it hides the warnings strict mode counts
            "-f",
            str(root / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner about its successor
    )


@pytest.fixture(scope="module")
def mkdocs() -> None:
    if not (importlib.util.find_spec("mkdocs") and importlib.util.find_spec("material")):
        if os.environ.get("PSTAGE_REQUIRE_DOCS"):
            pytest.fail("PSTAGE_REQUIRE_DOCS is set but mkdocs-material is not installed (pip install '.[docs]')")
        pytest.skip("mkdocs-material not installed (pip install '.[docs]')")


def test_docs_site_builds_strict_with_the_generated_pages(mkdocs, tmp_path):
    done = mkdocs_build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    config = (tmp_path / "site" / "config" / "index.html").read_text()
    assert "data.image_size" in config and "tune.heartbeat_grace" in config  # the reference, from the schema
    assert 'href="../results/#image-size"' in config  # the help's RESULTS.md anchors, as checked links
    results = (tmp_path / "site" / "results" / "index.html").read_text()
    assert "Reproduce:" in results
    training = (tmp_path / "site" / "training" / "index.html").read_text()
    assert 'href="../results/#tta"' in training  # repository links point at the generated pages


def test_a_broken_anchor_fails_the_docs_build(mkdocs, tmp_path):
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(RESULTS, copy / "benchmarks")
    (copy / "src").symlink_to(ROOT / "src")
    page = copy / "docs" / "persons.md"
    page.write_text(page.read_text() + "\nSee [nowhere](../benchmarks/RESULTS.md#no-such-anchor).\n")
    done = mkdocs_build(copy, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-anchor" in done.stderr + done.stdout

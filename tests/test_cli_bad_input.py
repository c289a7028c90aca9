"""Bad input everywhere: every ``pstage`` command driven with malformed arguments (hypothesis).

Each example is a command line with one culprit (an unknown or ill-typed KEY=VALUE, a broken config
file, a missing path, a wrong name or choice). Every one must end the same way: exit 2, a single
``error:`` line that names the culprit, no traceback, and nothing written in the working folder.
typer's CliRunner runs the commands in-process, so the ~30 examples per command take seconds.
Values that typer itself rejects (``--trials abc``, an unknown option, a missing argument) are one
``error:`` line too: exit 2, the option named, no traceback, no usage block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pstage.cli import app

COMMANDS = (
    "train",
    "predict",
    "board",
    "ensemble",
    "eda",
    "report",
    "demo",
    "tune",
    "config",
    "export",
    "serve",
    "distill",
)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Known keys with values they refuse (the culprit is the key). Names picked from a registry
# (model.head, loss.name, log.loggers, ...) are checked by each command after its inputs, not here.
BAD_VALUES = {
    "train.epochs": ["0", "-3", "abc", "1.5", "[1]"],
    "train.batch_size": ["0", "x"],
    "optim.lr": ["0", "-1", "fast"],
    "split.folds": ["1", "100", "five"],
    "data.image_size": ["[1,2,3]", "[4,4]", "big", "[a,b]"],
    "train.precision": ["9", "half"],
    "tune.heartbeat_grace": ["1", "-5"],
    "tune.sampler": ["grid"],
    "tta.scales": ["[]", "[9.0]"],
}
word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
SECTIONS = ("data", "split", "model", "loss", "optim", "train", "augment", "tta", "log", "tune")


@st.composite
def bad_override(draw: st.DrawFn) -> tuple[str, str]:
    """(KEY=VALUE, culprit): an unknown key, a refused value, or no '=' at all."""
    kind = draw(st.sampled_from(["unknown", "value", "no_equals"]))
    if kind == "unknown":
        key = f"{draw(st.sampled_from(SECTIONS))}.{draw(word)}x"  # no config key ends in x... checked below
        return f"{key}={draw(word)}", key
    if kind == "value":
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        return f"{key}={draw(st.sampled_from(BAD_VALUES[key]))}", key
    text = draw(word)
    return text, text


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working folder with broken config files; the tests run inside it and check it stays unchanged."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "syntax.yaml").write_text("train:\n  epochs: [1, 2\n")
    (root / "list.yaml").write_text("- train\n- model\n")
    (root / "unknown.yaml").write_text("train:\n  epochz: 3\n")
    (root / "typed.yaml").write_text("optim:\n  lr: fast\n")
    (root / "a_file").write_text("not a folder\n")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(cwd)


BAD_CONFIGS = {
    "syntax.yaml": "syntax.yaml",
    "list.yaml": "list.yaml",
    "unknown.yaml": "epochz",
    "typed.yaml": "optim.lr",
}


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _check(sandbox: Path, args: list[str], culprit: str | tuple[str, ...]) -> None:
    """Exit 2, one error line naming the culprit (or one of them), no traceback, nothing written."""
    before = _snapshot(sandbox)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    shown = f"pstage {' '.join(args)} -> exit {result.exit_code}\n{result.output}"
    assert result.exit_code == 2, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    culprits = (culprit,) if isinstance(culprit, str) else culprit
    assert any(c in lines[0] for c in culprits), f"culprit {culprit!r} not named: {shown}"
    assert _snapshot(sandbox) == before, f"something was written: {shown}"


missing = word.map(lambda w: f"no_such_{w}")
override_commands = st.sampled_from(["train", "tune", "config"])


@SETTINGS
@given(
    command=override_commands,
    bad=bad_override(),
    extra=st.lists(st.sampled_from(["train.epochs=1", "model.name=resnet18"]), max_size=2),
)
def test_bad_overrides_are_one_line_naming_the_key(sandbox, command, bad, extra):
    override, culprit = bad
    args = {"distill": ["distill", "teacher_run", "--runs", "."], "tune": ["tune", "--trials", "1"]}.get(
        command, [command]
    )
    if command == "distill":  # the teacher is looked up first: give one that exists
        _teacher(sandbox)
    _check(sandbox, [*args, *extra, override], culprit)


@SETTINGS
@given(command=st.sampled_from(["train", "tune", "config", "eda"]), name=st.sampled_from(sorted(BAD_CONFIGS)))
def test_bad_config_files_are_one_line_naming_the_file_or_key(sandbox, command, name):
    args = [command, "--config", name]
    if command == "eda":
        args += ["--data", "a_file"]
    _check(sandbox, args, BAD_CONFIGS[name])


@SETTINGS
@given(command=st.sampled_from(COMMANDS), name=missing, which=st.integers(0, 3))
def test_missing_paths_and_names_are_one_line_naming_them(sandbox, command, name, which):
    """Each command given a run, data folder, config or runs folder that does not exist."""
    cases = {
        "train": [
            ["train", "--data", name],
            ["train", "--config", f"{name}.yaml"],
            ["train", "--data", name, "train.epochs=1"],
        ],
        "predict": [["predict", name], ["predict", name, "--tta"]],
        "board": [["board", "--runs", name], ["board", "--runs", ".", "--runs", name]],
        "ensemble": [["ensemble", name, f"{name}2"], ["ensemble", name, f"{name}2", "--method", "mean"]],
        "eda": [["eda", "--data", name], ["eda", "--data", name, "--out", "x.html"]],
        "report": [["report", name], ["report", name, "--audit"]],
        "demo": [["demo", "--out", f"a_file/{name}"], ["demo", "--quick", "--out", "a_file"]],
        "tune": [["tune", "--trials", "1", "--data", name], ["tune", "--show", "--config", f"{name}.yaml"]],
        "config": [["config", "--config", f"{name}.yaml"]],
        "export": [["export", name], ["export", name, "--int8"]],
        "serve": [["serve", name], ["serve", name, "--port", "8123"]],
        "distill": [["distill", name], ["distill", name, "model.name=resnet18"]],
    }[command]
    args = cases[which % len(cases)]
    culprit = "a_file" if command == "demo" else name
    _check(sandbox, args, culprit)


CHOICES = [
    (["board", "--runs", ".", "--sort"], "--sort"),
    (["ensemble", "r1", "r2", "--method"], ("--method", "'r1'")),  # two culprits: either may answer first
    (["tune", "--trials", "1", "--backend"], "--backend"),
    (["tune", "--trials", "1", "--data", ".", "tune.space={optim.lr: [0.1, 0.01]}", "--storage"], "--storage"),
    (["export", "teacher_run", "--runs", ".", "--format"], "--format"),
    (["serve", "teacher_run", "--runs", ".", "--backend"], "--backend"),
]


@SETTINGS
@given(case=st.sampled_from(CHOICES), value=word.map(lambda w: f"zz{w}"))
def test_unknown_choices_are_one_line_naming_the_option(sandbox, case, value):
    args, option = case
    _teacher(sandbox)
    _check(sandbox, [*args, value], option)


@SETTINGS
@given(
    case=st.sampled_from([["tune", "--trials"], ["tune", "--timeout"], ["ensemble", "a", "b", "--rounds"],
                          ["serve", "x", "--port"], ["serve", "x", "--max-batch"], ["distill", "x", "--alpha"]]),
    value=st.sampled_from(["abc", "1.5.2", "", "--", "1e", "NaNx"]),
)  # fmt: skip
def test_ill_typed_options_exit_2_naming_the_option(sandbox, case, value):
    result = CliRunner().invoke(app, [*case, value], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None)
    assert case[-1] in result.output or "Missing" in result.output or "No such option" in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output


@pytest.mark.parametrize(
    ("args", "culprit"),
    [(["train", "--bogus"], "--bogus"), (["ensemble"], "RUN"), (["frob"], "frob"), (["board", "--sort"], "--sort")],
)
def test_usage_errors_are_one_line(args, culprit):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], result.output


def _teacher(sandbox: Path) -> None:
    """A run folder that is not finished (its run.json says running): commands must refuse it."""
    run = sandbox / "teacher_run"
    if not run.exists():
        run.mkdir()
        (run / "run.json").write_text('{"name": "teacher_run", "status": "running"}\n')

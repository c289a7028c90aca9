"""``pstage board``: finished runs from several folders, sorting, filtering, HTML, broken folders."""

import json
import re

import numpy as np

import pstage
from tests.conftest import run_cli
from tests.test_ensembling import constructed_members, write_run


def team_folders(tmp_path):
    """My runs and a teammate's, plus every kind of unfinished or broken run folder."""
    mine, theirs = tmp_path / "runs", tmp_path / "team"
    members = constructed_members()
    write_run(mine, "A", members["A"])
    write_run(mine, "C-noise", members["C"])
    write_run(theirs, "B", members["B"])
    info = json.loads((theirs / "B" / "run.json").read_text())
    info.update(user="teammate", image_size=[128, 96], epochs=7, tta={"cv": {"macro_f1": 0.5}})
    (theirs / "B" / "run.json").write_text(json.dumps(info))
    write_run(mine, "still-running", members["A"], status="running")
    (mine / "broken").mkdir()
    (mine / "broken" / "run.json").write_text('{"name": "broken", "status": "do')
    (mine / "no-record" / "fold_0").mkdir(parents=True)
    write_run(mine, "lost-oof", members["A"])
    (mine / "lost-oof" / "oof.csv").unlink()
    (mine / "mlartifacts").mkdir()  # not a run: ignored silently
    return mine, theirs


def test_board_lists_done_runs_best_first_and_skips_the_rest(tmp_path):
    mine, theirs = team_folders(tmp_path)
    board = pstage.board([mine, theirs])
    assert board.runs["name"].tolist() == ["A", "C-noise", "B"]
    assert np.all(np.diff(board.runs["cv"]) <= 0)
    reasons = {p.split("/")[-1]: why for p, why in board.skipped}
    assert reasons == {
        "broken": "run.json is not valid JSON (line 1); a crashed copy?",
        "lost-oof": "oof.csv is missing",
        "no-record": "no run.json (started but never recorded)",
        "still-running": "status running",
    }
    assert pstage.board([mine, theirs], sort="name").runs["name"].tolist() == ["A", "B", "C-noise"]
    assert pstage.board([mine, theirs], sort="-cv").runs["name"].tolist() == ["B", "C-noise", "A"]
    assert pstage.board([mine, theirs], contains="TEAMMATE").runs["name"].tolist() == ["B"]


def test_board_cli_and_html(tmp_path):
    mine, theirs = team_folders(tmp_path)
    page = tmp_path / "board.html"
    out = run_cli("board", "--runs", str(mine), "--runs", str(theirs), "--html", str(page), "--sort", "user")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 finished run(s)" in out.stdout and "teammate" in out.stdout and "128x96" in out.stdout
    assert "CV with TTA" in out.stdout and "0.5000" in out.stdout
    assert "skipped" in out.stdout and "status running" in out.stdout
    html = page.read_text()
    assert html.count("<tr>") == 4 and "teammate" in html and "oof.csv is missing" in html
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # self-contained: nothing from the network
    bad = run_cli("board", "--runs", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "--runs" in bad.stderr and "no such folder" in bad.stderr
    bad = run_cli("board", "--runs", str(mine), "--sort", "speed")
    assert bad.returncode == 2 and "--sort speed: expected one of cv" in bad.stderr

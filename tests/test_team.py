"""The team loop: ensembles over the folds members share, the shake-up estimate, the public-leaderboard log.

Most runs here are written by hand on a person-grouped split (tests.test_store.make_run: 30
persons x 7 photos, 3 folds), so every expected number is computed by hand in the test; one
real tiny training proves that the command the "no shared fold" line prints really continues a
run; one real `mlflow server` carries `pstage lb` to a teammate's board; Chromium checks the page.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import pstage
from pstage.core.errors import ConfigError, RunError
from pstage.core.metrics import cv_scores, fold_macro_f1
from pstage.core.shakeup import cv_interval, win_probability
from pstage.core.tasks import mask_task
from pstage.report.board import board_rows
from pstage.runs.public_lb import log_score
from tests.conftest import FAST, run_cli
from tests.test_store import Server, as_user, machine, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split():
    """30 persons x 7 photos in 3 person-grouped folds, with mask-task targets."""
    rng = np.random.default_rng(0)
    photos = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    rows = [(f"p{p:03d}/{photo}", f"p{p:03d}", p % 3) for p in range(30) for photo in photos]
    folds = pd.DataFrame(rows, columns=["image_id", "group", "fold"])
    person = {g: rng.integers(0, 6) for g in folds["group"].unique()}
    mask = (
        folds["image_id"].str.split("/").str[1].map(lambda s: 0 if s.startswith("mask") else (1 if "inc" in s else 2))
    )
    return folds, pd.Series(mask * 6 + folds["group"].map(person), name="target")


def partial_run(runs: Path, name: str, split, seed: int, keep: list[int], user: str = "u") -> Path:
    """A finished run that trained only folds ``keep`` of the split: its OOF, CV and folds_trained say so."""
    folds, targets = split
    run = make_run(runs, name, user, folds, targets, seed)
    oof = pd.read_csv(run / "oof.csv", dtype={"image_id": str})
    oof = oof[oof["fold"].isin(keep)].reset_index(drop=True)
    oof.to_csv(run / "oof.csv", index=False, float_format="%.6g")
    info = json.loads((run / "run.json").read_text())
    info.update(cv=cv_scores(oof, mask_task()), folds_trained=keep)
    (run / "run.json").write_text(json.dumps(info, indent=2))
    return run


def probs_of(run: Path, table: str = "oof") -> pd.DataFrame:
    return pd.read_csv(run / f"{table}.csv", dtype={"image_id": str}).set_index("image_id")


# --- 1. ensembles over the folds members share -------------------------------------------------


@pytest.fixture
def partial(tmp_path, split):
    """Runs that trained folds {0}, {0,1} and {0,1,2} of one split."""
    for name, seed, keep in (("a", 1, [0]), ("b", 2, [0, 1]), ("c", 3, [0, 1, 2])):
        partial_run(tmp_path, name, split, seed, keep)
    return tmp_path


def test_partial_fold_ensemble_is_fitted_and_scored_on_the_shared_fold(partial, split):
    folds, targets = split
    on_fold0 = folds.loc[folds["fold"] == 0, "image_id"]
    y = targets[folds["fold"] == 0].to_numpy()
    member = {n: probs_of(partial / n).loc[on_fold0].filter(like="p_").to_numpy() for n in "abc"}

    mean = pstage.ensemble(["a", "b", "c"], method="mean", name="mean", runs_dir=partial)
    by_hand = f1_score(y, sum(member.values()).argmax(1), average="macro")  # scikit-learn on fold 0 only
    assert mean.cv["macro_f1"] == pytest.approx(by_hand, abs=1e-12)
    assert mean.folds == [0] and mean.split_folds == 3 and mean.persons == 10 and mean.images == 70
    assert mean.members_folds == {"a": [0], "b": [0, 1], "c": [0, 1, 2]}
    for n in "abc":  # members are compared on the same fold, not on their own CVs
        assert mean.members_cv[n] == pytest.approx(f1_score(y, member[n].argmax(1), average="macro"))
    info = json.loads((partial / "mean" / "run.json").read_text())
    assert info["folds_trained"] == [0] and info["ensemble"]["folds"] == [0]
    assert info["ensemble"]["persons"] == 10 and info["ensemble"]["images"] == 70
    assert [m["folds"] for m in info["ensemble"]["members"]] == [[0], [0, 1], [0, 1, 2]]
    oof = probs_of(partial / "mean")
    assert sorted(oof.index) == sorted(on_fold0) and (oof["fold"] == 0).all()
    tests = [probs_of(partial / n, "test").filter(like="p_").to_numpy() for n in "abc"]  # blended whole
    assert np.allclose(probs_of(partial / "mean", "test").filter(like="p_").to_numpy(), np.mean(tests, 0), atol=1e-5)
    low, high = info["cv"]["interval"]["low"], info["cv"]["interval"]["high"]
    assert low <= info["cv"]["macro_f1"] <= high and info["cv"]["interval"]["persons"] == 10

    hill = pstage.ensemble(["a", "b", "c"], method="hill", name="hill", runs_dir=partial, rounds=10)
    w = np.array([hill.weights[n] for n in "abc"])
    blend = sum(wi * member[n] for wi, n in zip(w, "abc", strict=True))
    assert hill.cv["macro_f1"] == pytest.approx(f1_score(y, blend.argmax(1), average="macro"), abs=1e-12)
    assert hill.cv["macro_f1"] >= max(hill.members_cv.values())  # hill keeps the best prefix
    assert 0 <= hill.nested_cv <= 1  # nested over 5 groups of the fold's persons: one fold cannot leave itself out
    stack = pstage.ensemble(["a", "b", "c"], method="stack", name="stack", runs_dir=partial)
    assert stack.cv["macro_f1"] == pytest.approx(stack.nested_cv) and len(probs_of(partial / "stack")) == 70

    out = run_cli("ensemble", "a", "b", "c", "--runs", str(partial), "--name", "cli", "--method", "mean")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fitted and scored on fold 0 of 3 (10 persons, 70 images)" in out.stdout
    assert "CV on fold 0" in out.stdout and "P(beats best)" in out.stdout
    assert re.search(r"shake-up: on a leaderboard of 2 persons \(test images / 7\)", out.stdout), out.stdout


def test_all_shared_folds_keep_the_old_scores(tmp_path, split):
    """Members that trained every fold: the score is the usual CV over every fold (nested over folds)."""
    for name, seed in (("a", 1), ("b", 2)):
        partial_run(tmp_path, name, split, seed, [0, 1, 2])
    folds, targets = split
    result = pstage.ensemble(["a", "b"], method="mean", name="m", runs_dir=tmp_path)
    probs = sum(probs_of(tmp_path / n).loc[folds["image_id"]].filter(like="p_").to_numpy() for n in "ab")
    assert result.cv["macro_f1"] == pytest.approx(fold_macro_f1(targets.to_numpy(), probs, folds["fold"].to_numpy()))
    assert result.folds == [0, 1, 2] and result.images == 210 and result.persons == 30
    assert result.members_cv == pytest.approx(result.members_own_cv)


def test_no_shared_fold_is_one_line_whose_command_continues_the_run(demo_root, tmp_path):
    """A real run trained fold 0; two runs trained fold 1: the line names every member's folds and the
    command that adds fold 1 to the first; running that command makes the ensemble work on fold 1."""
    from pstage.config import load_config
    from pstage.data.sources import load_source

    runs = tmp_path / "runs"
    quick = [*FAST, "train.progress=none", "persons.group=off", "log.loggers=[]"]
    pstage.train(data=demo_root, runs=runs, name="a", overrides=[*quick, "train.folds=[0]"])
    split = pd.read_csv(runs / "a" / "folds.csv", dtype={"image_id": str, "group": str})
    train = load_source(load_config(runs / "a" / "config.yaml").data).train.set_index("image_id")
    for name, seed in (("b", 1), ("c", 2)):  # fold 1 only, written by hand on a's split
        run = partial_run(runs, name, (split, train.loc[split["image_id"], "target"].reset_index(drop=True)), seed, [1])
        shutil.copyfile(runs / "a" / "test.csv", run / "test.csv")  # the same test images as a's
    with pytest.raises(RunError, match=r"no fold was trained by every member \(a: fold 0; b: fold 1; c: fold 1\)"):
        pstage.ensemble(["a", "b", "c"], runs_dir=runs)
    out = run_cli("ensemble", "a", "b", "c", "--runs", str(runs), cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "then ensemble again: " in out.stderr, out.stderr
    command = out.stderr.split("then ensemble again: ", 1)[1].strip()
    assert command.startswith("pstage train --config ") and command.endswith("--name a train.folds=[1]"), command
    assert not list(runs.glob("ens-*"))
    done = subprocess.run(
        [sys.executable, "-m", *shlex.split(command)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((runs / "a" / "run.json").read_text())["folds_trained"] == [0, 1]
    result = pstage.ensemble(["a", "b", "c"], method="mean", runs_dir=runs, name="ens")
    assert result.folds == [1] and result.members_folds["a"] == [0, 1]


# --- 2. the shake-up estimate ------------------------------------------------------------------


def population(rng: np.random.Generator, persons: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask-task persons whose 7 photos share gender and age, and a model that gets a person's gender
    and age right or wrong for all 7 photos at once (so photos of one person are far from independent)."""
    gender, age = rng.integers(0, 2, persons), rng.choice(3, persons, p=[0.5, 0.35, 0.15])
    mask = np.tile([0, 0, 0, 0, 0, 1, 2], persons)
    who = np.repeat(np.arange(persons), 7)
    targets = mask * 6 + np.repeat(gender * 3 + age, 7)
    right = rng.random(persons) < 0.6
    guess = np.where(right, gender * 3 + age, (1 - gender) * 3 + rng.integers(0, 3, persons))
    masks = np.where(rng.random(7 * persons) < 0.95, mask, rng.integers(0, 3, 7 * persons))
    probs = np.full((len(targets), 18), 0.01)
    probs[np.arange(len(targets)), masks * 6 + np.repeat(guess, 7)] = 1.0
    return targets, probs, who


def test_the_person_bootstrap_interval_covers_the_truth_and_an_image_bootstrap_does_not():
    """Simulation: the model's macro F1 on 60,000 persons is the truth; 100 CVs on 300 fresh persons
    (3 folds) each get a 95% interval. Resampling persons covers the truth about 95% of the time;
    resampling photos as if independent (the mistake the person unit prevents) covers it far less."""
    rng = np.random.default_rng(0)
    t, p, _ = population(rng, 60_000)
    truth = fold_macro_f1(t, p, np.zeros(len(t), dtype=int))
    by_person, by_image = [], []
    for rep in range(100):
        t, p, who = population(rng, 300)
        by_person.append(cv_interval(t, p, who % 3, who, draws=400, seed=rep))
        if rep < 40:
            by_image.append(cv_interval(t, p, who % 3, np.arange(len(t)), draws=400, seed=rep))
    coverage = np.mean([i.low <= truth <= i.high for i in by_person])
    naive = np.mean([i.low <= truth <= i.high for i in by_image])
    assert 0.88 <= coverage <= 0.99, coverage
    assert naive < 0.75, naive
    assert all(i.persons == 300 and i.low <= i.score <= i.high for i in by_person)


def test_win_probability_is_paired_and_symmetric():
    rng = np.random.default_rng(1)
    t, p, who = population(rng, 200)
    worse = p.copy()
    flip = np.repeat(rng.random(200) < 0.3, 7)  # 30% of persons: the wrong class on every photo
    worse[flip] = np.roll(worse[flip], 1, axis=1)
    assert win_probability(t, p, p, who, 100) == 0.5  # a run against itself: every draw a tie
    ab, ba = win_probability(t, p, worse, who, 100), win_probability(t, worse, p, who, 100)
    assert ab == pytest.approx(1 - ba) and ab > 0.99
    near, pick = p.copy(), np.repeat(rng.random(200) < 0.05, 7)
    near[pick] = worse[pick]  # wrong where `worse` is, for a few persons only
    small, large = win_probability(t, near, p, who, 20), win_probability(t, near, p, who, 2000)
    assert large <= small <= 0.5  # a larger leaderboard leaves the slightly worse run less chance


def test_board_shakeup_columns_are_cached_and_follow_the_tables(tmp_path, split, monkeypatch):
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        partial_run(tmp_path, name, split, seed, [0, 1, 2])
    board = pstage.board([tmp_path], shakeup=True, top=1)
    runs = board.runs.set_index("name")
    best, second, third = runs.index
    assert board.shakeup["best"] == best and board.shakeup["leaderboard"] == 2  # 12 test images / 7
    assert (
        runs["cv_low"].notna().all() and (runs["cv_low"] <= runs["cv"]).all() and (runs["cv"] <= runs["cv_high"]).all()
    )
    assert 0 <= runs.loc[second, "p_beats_best"] <= 1 and pd.isna(runs.loc[third, "p_beats_best"])  # --top 1
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "pstage" / "shakeup.json"
    assert cache.is_file()
    entries = json.loads(cache.read_text())
    again = pstage.board([tmp_path], shakeup=True, top=1, lb_persons=600).runs.set_index("name")
    assert again["cv_low"].tolist() == runs["cv_low"].tolist()
    assert len(json.loads(cache.read_text())) == len(entries) + 1  # only the new leaderboard size was computed
    oof = pd.read_csv(tmp_path / second / "oof.csv")  # changed tables: a fresh interval
    oof.loc[oof.index[:70], [f"p_{k}" for k in range(18)]] = 1 / 18
    oof.to_csv(tmp_path / second / "oof.csv", index=False)
    changed = pstage.board([tmp_path], shakeup=True).runs.set_index("name")
    assert changed.loc[second, "cv_low"] != runs.loc[second, "cv_low"]
    out = run_cli("board", "--runs", str(tmp_path), "--shakeup", "--lb-persons", "600")
    assert out.returncode == 0 and "P(beats best)" in out.stdout and "95% interval" in out.stdout
    assert "leaderboard of 600 persons (--lb-persons)" in out.stdout
    titles, _ = board_rows(pstage.board([tmp_path]))
    assert "P(beats best)" not in titles and "95% interval" not in titles  # the plain board reads run.json only
    with pytest.raises(ConfigError, match="--lb-persons 0: expected the leaderboard's size"):
        pstage.board([tmp_path], shakeup=True, lb_persons=0)


# --- 3. the public-leaderboard log, 4. the team's page ----------------------------------------


def test_lb_logs_public_scores_and_refuses_bad_input(tmp_path, split):
    run = partial_run(tmp_path, "a", split, 1, [0, 1, 2])
    partial_run(tmp_path, "b", split, 2, [0, 1, 2])
    out = run_cli("lb", "a", "0.7012", "--runs", str(tmp_path), "--note", "first try")
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"a: public 0\.7012 \(CV 0\.\d{4}, [+-]0\.\d{4}\) logged as score 1 of submission\.csv", out.stdout
    )
    refused = run_cli("lb", "a", "abc", "--runs", str(tmp_path))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: SCORE 'abc': expected the public leaderboard's macro F1, a number from 0 to 1 (e.g. 0.7421)"
    ]
    for bad in ("1.2", "nan", "-0.1", "inf", ""):
        with pytest.raises(ConfigError, match=f"SCORE '{bad}': expected"):
            log_score("a", bad, runs_dir=tmp_path)
    with pytest.raises(RunError, match="submission_tta.csv is missing"):
        log_score("a", 0.7, runs_dir=tmp_path, tta=True)
    log_score("b", 0.66, runs_dir=tmp_path)
    log_score("a", "0.72", runs_dir=tmp_path, note="fold 2 added")
    info = pstage.load_run(run).info
    assert [e.score for e in info.leaderboard] == [0.7012, 0.72] and info.leaderboard[0].note == "first try"
    entry = info.leaderboard[0]
    assert entry.cv == pytest.approx(info.score) and entry.file == "submission.csv" and entry.user
    assert entry.submission == hashlib.sha256((run / "submission.csv").read_bytes()).hexdigest()[:16]
    board = pstage.board([tmp_path])
    assert board.runs.set_index("name").loc["a", "public"] == 0.72 and len(board.submissions) == 3
    assert board.submissions["current"].tolist() == [True, True, True]
    (run / "submission.csv").write_text("ImageID,ans\n")  # a later, different submission
    assert pstage.board([tmp_path]).submissions.set_index("run").loc["a", "current"].tolist() == [False, False]
    (run / ".pstage-store.json").write_text("{}")  # a teammate's run, pulled from the store
    with pytest.raises(
        RunError, match=r"u/a is u's run, pulled from the team store: .* ask u to run: pstage lb a 0.7 --store URI"
    ):
        log_score("a", 0.7, runs_dir=tmp_path)
    assert len(pstage.load_run(run).info.leaderboard) == 2  # nothing written


def _browser(page_path: Path) -> dict:
    """Open the page in Chromium: console errors, the plot's pixels, and the run column before/after a sort click."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_path.as_uri(), wait_until="load")
            runs = (
                "() => [...document.querySelector('table.sortable').tBodies[0].rows].map(r => r.cells[1].textContent)"
            )
            before = page.evaluate(runs)
            header = page.locator("table.sortable").first.locator("th", has_text="run").first
            header.click()
            ascending = page.evaluate(runs)
            header.click()
            descending = page.evaluate(runs)
            plot = page.evaluate(
                """() => [...document.images].map(img => {
                    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                    const d = g.getImageData(0, 0, c.width || 1, c.height || 1).data; let s = 0, s2 = 0;
                    for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
                    const n = d.length / 4, m = s / n;
                    return {alt: img.alt, ok: img.complete && img.naturalWidth > 0, std: Math.sqrt(Math.max(0, s2 / n - m * m))};
                })"""
            )
            width = page.evaluate("document.documentElement.scrollWidth")
        finally:
            browser.close()
    return {"problems": problems, "before": before, "up": ascending, "down": descending, "plot": plot, "width": width}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill()


def test_lb_round_trips_through_the_store_to_the_teams_page(server, split, tmp_path):
    """ana logs a public score with --store; ben, on an empty machine, sees it on `board --store --html`
    (the CV-vs-public plot, the shake-up column), cannot log scores for her run, and the MLflow run has it."""
    import mlflow

    from pstage.runs.store import publish

    ana, ben = tmp_path / "ana", tmp_path / "ben"
    ben.mkdir()
    with as_user("ana"):
        publish(partial_run(ana / "runs", "r1", split, 1, [0, 1], user="ana"), server.uri)
        publish(partial_run(ana / "runs", "r2", split, 2, [0], user="ana"), server.uri)
        pstage.ensemble(["r1", "r2"], method="mean", name="team", runs_dir=ana / "runs", store=server.uri)
    out = run_cli("lb", "r1", "0.61", "--store", server.uri, "--note", "2 folds", cwd=ana, env=machine("ana"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "published ana/r1 (1 file(s) uploaded)" in out.stdout  # run.json only
    with as_user("ana"):
        for run, score in (("r2", 0.58), ("team", 0.64)):
            assert log_score(run, score, runs_dir=ana / "runs", store=server.uri).published
    client = mlflow.tracking.MlflowClient(tracking_uri=server.uri)
    ids = [e.experiment_id for e in client.search_experiments(filter_string="name LIKE 'pstage-%'")]
    (r1,) = client.search_runs(ids, filter_string="tags.`pstage.name` = 'r1'")
    assert r1.data.metrics["public_lb_macro_f1"] == 0.61
    tag = json.loads(r1.data.tags["pstage.info"])
    assert tag["leaderboard"][0]["score"] == 0.61 and tag["folds_trained"] == [0, 1]
    assert tag["cv"]["interval"]["low"] <= tag["cv"]["macro_f1"] <= tag["cv"]["interval"]["high"]

    page = ben / "team.html"
    out = run_cli("board", "--store", server.uri, "--html", str(page), cwd=ben, env=machine("ben"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ana/team" in out.stdout and "public LB" in out.stdout and "P(beats best)" in out.stdout
    html = page.read_text()
    assert "CV vs public leaderboard" in html and "Fit over 3 submission(s)" in html
    assert html.count("<tr>") == 1 + 3 + 1 + 3  # the runs table and the submissions table
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # self-contained
    pulled = ben / "runs" / "ana" / "r1"
    assert (pulled / "oof.csv").is_file()  # the shake-up pulled the top runs' tables
    assert pstage.load_run(pulled).info.leaderboard[0].score == 0.61  # run.json on the store carries the log
    with as_user("ben"), pytest.raises(RunError, match=f"ask ana to run: pstage lb r1 0.7 --store {server.uri}"):
        log_score("ana/r1", 0.7, runs_dir=ben / "runs", store=server.uri)
    if CHROMIUM:
        seen = _browser(page)
        assert seen["problems"] == [], seen["problems"]
        assert seen["up"] == sorted(seen["before"]) and seen["down"] == sorted(seen["before"], reverse=True)
        (plot,) = seen["plot"]
        assert plot["ok"] and plot["std"] > 1 and "CV vs public" in plot["alt"]
        assert seen["width"] <= 1400
    elif os.environ.get("PSTAGE_REQUIRE_BROWSER"):
        pytest.fail("PSTAGE_REQUIRE_BROWSER is set but chromium is not installed")


# --- the benchmark, on tiny generated runs -----------------------------------------------------


def test_shakeup_benchmark_on_generated_runs(tmp_path, split):
    """benchmarks/shakeup.py: eval persons recovered from build.py's photo names, every number present."""
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for k in range(40):
        face = faces / f"{20 + k}_{k % 2}_0_2017{k:04d}.jpg.chip.jpg"
        face.write_bytes(b"")
        for stem in ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"):
            mask = 0 if stem.startswith("mask") else 1 if stem.startswith("inc") else 2
            rows.append((hashlib.sha1(f"{face}/{stem}".encode()).hexdigest() + ".jpg", mask * 6 + (k % 2) * 3 + k % 3))
    truth = pd.DataFrame(rows, columns=["ImageID", "ans"]).sample(frac=1, random_state=0)
    truth.to_csv(tmp_path / "eval_labels.csv", index=False)
    runs = tmp_path / "runs"
    for name, seed, noise in (("good", 1, 0.1), ("fair", 2, 0.4), ("poor", 3, 0.8)):
        run = partial_run(runs, name, split, seed, [0, 1, 2])
        wrong = rng.random(len(truth)) < noise
        ans = np.where(wrong, rng.integers(0, 18, len(truth)), truth["ans"])
        pd.DataFrame({"ImageID": truth["ImageID"], "ans": ans}).to_csv(run / "submission.csv", index=False)
    pstage.ensemble(["good", "fair"], method="mean", name="ens", runs_dir=runs)
    shutil.copyfile(runs / "good" / "submission.csv", runs / "ens" / "submission.csv")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "shakeup.py"), "--truth", str(tmp_path / "eval_labels.csv"),
         "--runs", str(runs), "--faces", str(faces), "--draws", "300"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "4 runs; eval: 280 images, 40 persons" in text
    assert text.count("| good |") == 1 and "| ens | ensemble | 0,1,2 |" in text
    assert re.search(r"over 300 draws of 40 eval persons, the best-CV run is the best on eval in \d+%", text)
    assert "of 6 pairs of runs, the higher CV has the higher eval score in" in text
    assert "ensemble ens (folds 0,1,2): eval" in text and "vs its best member on eval good" in text

"""EDA page, run report, label audit and relabel: their sections on generated data, checked in Chromium.

The browser check loads each page in headless Chromium (Debian's package; `.ci/run` installs it
and sets PSTAGE_REQUIRE_BROWSER=1 so a missing browser fails there instead of skipping).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pstage.core.errors import DataError
from tests.conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def eda_data(demo_root, tmp_path_factory):
    """The demo data with a planted duplicate across persons and one incomplete person folder."""
    root = Path(shutil.copytree(demo_root, tmp_path_factory.mktemp("eda") / "data"))
    people = sorted((root / "train" / "images").iterdir())
    first, second = (next(p.glob("normal.*")) for p in people[:2])
    second.unlink()
    shutil.copyfile(first, second.with_suffix(first.suffix))  # person 2's "normal" photo is person 1's
    next(people[2].glob("mask3.*")).unlink()
    return root, f"{people[0].name}/normal", f"{people[1].name}/normal", people[2]


@pytest.fixture(scope="module")
def eda_page(eda_data, tmp_path_factory):
    root = eda_data[0]
    out = tmp_path_factory.mktemp("eda-page") / "eda.html"
    result = run_cli("eda", "--data", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_eda_sections(eda_data, eda_page):
    _, dup_a, dup_b, incomplete = eda_data
    out, result = eda_page
    html = out.read_text()
    for heading in (
        "Counts per class and per task",
        "Persons: gender x age, age histogram",
        "Images per person",
        "Image sizes and formats",
        "Samples per class",
        "Near-duplicates across persons",
        "Face crop",
    ):
        assert f">{heading}</h2>" in html
    assert "1 pair(s) of near-identical photos" in html and dup_a in html and dup_b in html
    assert f"{incomplete}: missing mask3" in html and "1 person folder(s) do not hold exactly 7 photos" in html
    assert "alt='age histogram'" in html and html.count("data:image/png;base64") >= 5
    assert "1 near-duplicate pair(s) across persons" in result.stdout and "face found in" in result.stdout


@pytest.fixture(scope="module")
def noisy_run(learned, tmp_path_factory):
    """A copy of the learned run whose labels were deliberately corrupted: 12 photos' mask, 2 persons' gender.

    Corrupted where the model is sure of the truth (a label error on a clear photo), so a good
    audit can find them; the model's OOF probabilities come from folds that never saw the image.
    """
    source, _ = learned
    run = Path(shutil.copytree(source, tmp_path_factory.mktemp("noisy") / "noisy"))
    oof = pd.read_csv(run / "oof.csv", dtype={"image_id": str})
    probs = oof.filter(like="p_").to_numpy()
    targets = oof["target"].to_numpy().copy()
    mask_p = np.stack([probs[:, m * 6 : m * 6 + 6].sum(1) for m in range(3)], 1)
    sure = np.flatnonzero(mask_p[np.arange(len(targets)), targets // 6] > 0.9)
    flipped_images = np.random.default_rng(0).choice(sure, size=12, replace=False)
    targets[flipped_images] = (targets[flipped_images] + 6) % 18  # another mask state
    persons = oof["image_id"].str.split("/").str[0].to_numpy()
    gender_p = np.stack([probs[:, [c for c in range(18) if c // 3 % 2 == g]].sum(1) for g in range(2)], 1)
    sure_people = [
        p
        for p in sorted(set(persons))
        if gender_p[persons == p, targets[persons == p][0] // 3 % 2].mean() > 0.8
        and not set(np.flatnonzero(persons == p)) & set(flipped_images)
    ]
    flipped_people = sure_people[:2]
    for person in flipped_people:
        rows = persons == person
        targets[rows] += np.where(targets[rows] // 3 % 2 == 0, 3, -3)
    oof["target"] = targets
    oof.to_csv(run / "oof.csv", index=False)
    info = json.loads((run / "run.json").read_text())
    info["name"] = "noisy"
    (run / "run.json").write_text(json.dumps(info))
    return run, set(oof["image_id"].iloc[flipped_images]), flipped_people


@pytest.fixture(scope="module")
def noisy_report(noisy_run):
    run, _, _ = noisy_run
    result = run_cli("report", str(run), "--audit")
    assert result.returncode == 0, result.stderr[-2000:]
    return run / "report.html", result


def test_report_sections(noisy_report):
    page, result = noisy_report
    html = page.read_text()
    for heading in (
        "CV per fold",
        "Learning curves",
        "Confusion matrices",
        "Per-class F1 and support",
        "Most confident OOF mistakes, with Grad-CAM",
        "Label-issue audit",
    ):
        assert f">{heading}</h2>" in html
    assert html.count("<img class='fig'") >= 5  # curves + 18x18 + mask/gender/age matrices
    assert "true: " in html and "pred: " in html and "no spatial feature map" not in html
    assert "report in" in result.stdout and "suspect image(s)" in result.stdout


def test_grad_cam_looks_somewhere(learned):
    import torch

    from pstage.models.checkpoint import load_fold_module
    from pstage.report.pictures import training_images
    from pstage.report.report import grad_cam
    from pstage.runs.rundir import Run

    run = Run(learned[0])
    images, rows = training_images(run)
    module = load_fold_module(run.path / "fold_0" / "best.ckpt")
    pixels = np.stack([images[rows.iloc[i]] for i in range(4)])
    predicted = module(torch.from_numpy(pixels)).argmax(1).tolist()
    heat = grad_cam(module, pixels, predicted)  # where the evidence for what it predicts came from
    assert heat.shape == (4, 64, 48) and heat.min() >= 0 and np.allclose(heat.max((1, 2)), 1, atol=1e-5)
    assert (heat.std((1, 2)) > 0.01).all()  # a map with structure, not a constant


def test_audit_finds_the_corrupted_labels(noisy_run, noisy_report):
    run, flipped_images, flipped_people = noisy_run
    suspects = pd.read_csv(run / "audit" / "suspects.csv")
    top = suspects.head(24)
    assert top["image_id"].isin(flipped_images).mean() >= 0.25  # chance: 12 / 840 = 1.4%
    persons = pd.read_csv(run / "audit" / "persons.csv", keep_default_na=False)
    flagged = persons[persons["suggestion"].str.contains("gender")]["person"].head(10).tolist()
    assert set(flipped_people) <= set(flagged)  # 2 of 120 persons: chance of both in 10 ~ 0.6%
    corrections = pd.read_csv(run / "audit" / "corrections.csv", dtype=str, keep_default_na=False)
    assert set(flipped_people) <= set(corrections["person"])
    assert set(corrections["mask"]) - {""} <= {"wear", "incorrect", "not_wear"}


def test_relabel_writes_an_override_that_training_reads(learned, learn_root, tmp_path):
    from pstage.config import load_config
    from pstage.data.sources import load_source

    run, _ = learned
    before = (learn_root / "train" / "train.csv").read_text()
    person = sorted((learn_root / "train" / "images").iterdir())[0].name
    base = load_source(load_config(run / "config.yaml").data)
    gender = base.train.loc[base.train["group"] == person, "gender"].iloc[0]
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(
        f"person,image_id,gender,age,mask,note\n{person},,{['female', 'male'][gender]},61,,checked by hand\n,{person}/mask1,,,not_wear,\n"
    )
    out = run_cli("report", str(run), "--relabel", str(fixes))
    assert out.returncode == 0, out.stderr[-2000:]
    override = run / "audit" / "relabel.csv"
    assert "2 correction(s) checked" in out.stdout and f"data.relabel={override}" in out.stdout
    cfg = load_config(run / "config.yaml", [f"data.relabel={override}"])
    train = load_source(cfg.data).train.set_index("image_id")
    rows = train[train["group"] == person]
    assert (rows["gender"] == 1 - gender).all() and (rows["age"] == 61).all() and (rows["age_bucket"] == 2).all()
    assert train.loc[f"{person}/mask1", "mask"] == 2 and (rows.drop(f"{person}/mask1")["mask"] != 2).sum() >= 5
    assert (learn_root / "train" / "train.csv").read_text() == before  # the data is never edited
    fixes.write_text("person,gender\nnobody,male\n")
    bad = run_cli("report", str(run), "--relabel", str(fixes))
    assert bad.returncode == 2 and "row 2: person 'nobody' is not in the training data" in bad.stderr
    with pytest.raises(DataError, match="gender 'x' is not male or female"):
        fixes.write_text(f"person,gender\n{person},x\n")
        load_source(load_config(run / "config.yaml", [f"data.relabel={fixes}"]).data)


def _browser_check(page_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})  # a laptop screen
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_path.as_uri(), wait_until="load")
            stats = page.evaluate(
                """() => [...document.images].map(img => {
                    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                    const d = g.getImageData(0, 0, c.width || 1, c.height || 1).data; let s = 0, s2 = 0;
                    for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
                    const n = d.length / 4, mean = s / n;
                    return {ok: img.complete && img.naturalWidth > 0, std: Math.sqrt(Math.max(0, s2 / n - mean * mean))};
                })"""
            )
            width = page.evaluate("document.documentElement.scrollWidth")
        finally:
            browser.close()
    assert problems == [], problems
    assert stats and all(s["ok"] for s in stats), f"{page_path}: images that did not load"
    assert all(s["std"] > 1 for s in stats), f"{page_path}: blank images"
    assert width <= 1400, f"{page_path}: {width}px wide, too wide for a laptop screen"


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PSTAGE_REQUIRE_BROWSER"), reason="no chromium (apt-get install chromium)"
)
def test_pages_render_in_a_real_browser(eda_page, noisy_report, tmp_path):
    assert CHROMIUM, "PSTAGE_REQUIRE_BROWSER is set but chromium is not installed"
    _browser_check(eda_page[0])
    _browser_check(noisy_report[0])


def test_eda_reports_the_face_detector_and_its_hit_rate(eda_page):
    out, result = eda_page
    html = out.read_text()
    assert "The face detector <b>retinaface</b> (data.face_detector) finds a face in <b>" in html
    assert "By mask state: wear <b>" in html and "incorrect <b>" in html and "not_wear <b>" in html
    assert "data.face_crop=auto, so true here" in html
    assert "of sampled photos by retinaface" in result.stdout

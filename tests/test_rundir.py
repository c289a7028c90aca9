"""``RunInfo`` and ``RunDir``: run.json typed, the folder's folds and outputs, and runs written by older pstage.

tests/data/legacy holds two runs and their hill ensemble written by commit e3ee71b (before the
restructure; text files only, no checkpoints). Everything here is hand-built or copied: no training.
"""

import json
import shutil
from pathlib import Path

import pytest

import pstage
from pstage.core.errors import RunError
from pstage.runs.rundir import RunDir, RunInfo, RunInfoError, fold_id

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture
def legacy(tmp_path):
    """A writable copy of the legacy runs; the ensemble's recorded member paths point nowhere (a moved folder)."""
    runs = tmp_path / "runs"
    shutil.copytree(LEGACY, runs, ignore=shutil.ignore_patterns("README"))
    info = json.loads((runs / "legacy-ens" / "run.json").read_text())
    for member in info["ensemble"]["members"]:
        member["path"] = str(tmp_path / "elsewhere" / member["run"])
    (runs / "legacy-ens" / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return runs


def test_legacy_run_loads_typed_and_round_trips():
    run = RunDir(LEGACY / "legacy-a")
    info = run.info
    assert (info.name, info.kind, info.status, info.done) == ("legacy-a", "run", "done", True)
    assert info.score == pytest.approx(0.0038314, abs=1e-6) and info.cv.per_task.keys() == {"mask", "gender", "age"}
    assert [f.fold for f in info.cv.folds] == [0, 1] and info.cv.folds[0].images == 56
    assert info.as_task().num_classes == 18 == len(info.classes)
    assert (info.user, info.pstage_version, info.image_size) == ("root", "0.1.0", [32, 24])
    assert info.submission_format is None  # e3ee71b did not record it ...
    assert run.submission_format == "competition"  # ... so the submission.csv header tells it
    assert run.folds() == [0, 1] and run.checkpoints() == {}  # metrics.json kept, checkpoints not
    assert run.fold_metrics(1)["fold"] == 1
    assert run.load_config().model.name == "test_resnet"
    assert len(run.table("oof")) == 112 and run.table("nothing") is None
    # unknown keys survive and a record written back is the file it was read from
    assert info["folds_trained"] == [0, 1] and info.get("resolved")["precision"] == "bf16-mixed"
    assert info.record() == json.loads(run.info_file.read_text())


def test_legacy_ensemble_finds_moved_members_by_name(legacy):
    ens = RunDir(legacy / "legacy-ens")
    assert ens.info.kind == "ensemble" and ens.info.ensemble.method == "hill"
    assert [m.run for m in ens.info.members] == ["legacy-a", "legacy-b"]
    assert sum(m.weight for m in ens.info.members) == pytest.approx(1.0)
    # moved together with its members: found beside the ensemble, whatever --runs says
    assert [leaf.path for leaf in ens.leaves(legacy / "nowhere")] == [legacy / "legacy-a", legacy / "legacy-b"]
    assert [leaf.path for leaf in ens.leaves(legacy)] == [legacy / "legacy-a", legacy / "legacy-b"]
    alone = legacy.parent / "alone"  # moved without them: found by name under --runs, or one clear error
    shutil.copytree(legacy / "legacy-ens", alone / "legacy-ens")
    with pytest.raises(RunError, match="member legacy-a not found at .*elsewhere.* nor under"):
        RunDir(alone / "legacy-ens").leaves(legacy / "nowhere")
    assert [leaf.path for leaf in RunDir(alone / "legacy-ens").leaves(legacy)] == [
        legacy / "legacy-a",
        legacy / "legacy-b",
    ]
    assert ens.folds() == [] and RunDir(legacy / "legacy-a").leaves() == [RunDir(legacy / "legacy-a")]


def test_legacy_runs_on_the_board_and_in_a_new_ensemble(legacy):
    board = pstage.board(legacy)
    assert board.skipped == []
    assert set(board.runs["name"]) == {"legacy-a", "legacy-b", "legacy-ens"}
    assert board.runs.set_index("name")["kind"].to_dict() == {
        "legacy-a": "train",
        "legacy-b": "train",
        "legacy-ens": "ensemble",
    }
    result = pstage.ensemble(["legacy-a", "legacy-b"], method="mean", name="again", runs_dir=legacy)
    again = RunDir(result.path)
    assert again.info.submission_format == "competition"  # told by the old runs' submission.csv, now recorded
    assert again.output("submission").read_text().startswith("ImageID,ans\n")
    assert again.info.kind == "ensemble" and again.info.score == pytest.approx(result.cv["macro_f1"])
    assert [leaf.path.name for leaf in again.leaves(legacy)] == ["legacy-a", "legacy-b"]


def test_legacy_run_without_checkpoints_refuses_export_in_one_line(legacy):
    from pstage.deploy.export import plan_export

    with pytest.raises(RunError, match=r"legacy-a: no finished fold model \(fold_\*/best.ckpt\) to export"):
        plan_export("legacy-a", legacy)


def test_public_load_run_keeps_dict_style_reads():
    run = pstage.load_run("legacy-b", LEGACY)
    assert run.name == "legacy-b" and run.status == "done"
    assert run.info["cv"]["macro_f1"] == run.info.score == run.cv.macro_f1
    assert run.info.get("no-such-key", 7) == 7 and "cv" in run.info
    assert run.config()["model"]["name"] == "test_resnet"
    assert repr(run).startswith("Run('legacy-b', status='done', cv=0.0094")


def test_folds_and_checkpoints_from_the_folder(tmp_path):
    run = RunDir(tmp_path)
    for name, files in {
        "fold_0": ["metrics.json", "best.ckpt", "last.ckpt"],
        "fold_1": ["best.ckpt"],  # unfinished: no metrics.json
        "fold_2": ["metrics.json"],  # finished, its best.ckpt gone
        "fold_10": ["metrics.json", "best.ckpt"],
        "fold_x": ["metrics.json"],  # not a fold folder
        "final": ["metrics.json"],
    }.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("{}")
    assert run.folds() == [0, 2, 10]  # numeric order, finished only
    assert run.checkpoints() == {0: tmp_path / "fold_0" / "best.ckpt", 10: tmp_path / "fold_10" / "best.ckpt"}
    assert list(run.checkpoints("last.ckpt")) == [0] and run.final_done()
    assert [fold_id(p) for p in ("fold_3", "runs/r/fold_12/best.ckpt", "final", "fold_x")] == [3, 12, None, None]


def test_write_info_validates_and_update_keeps_other_keys(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_info() and run.name == tmp_path.name
    run.write_info({"name": "r", "status": "running", "custom": {"a": 1}})
    with run.lock():
        run.update_info(status="done", cv={"macro_f1": 0.5, "folds": [{"fold": 0, "macro_f1": 0.5}]})
    saved = json.loads(run.info_file.read_text())
    assert saved == {
        "name": "r",
        "status": "done",
        "custom": {"a": 1},
        "cv": {"macro_f1": 0.5, "folds": [{"fold": 0, "macro_f1": 0.5}]},
    }
    before = run.info_file.read_text()
    with pytest.raises(RunInfoError, match=r"run.json is not a run record \(status: "):
        run.write_info({"name": "r", "status": "finished"})
    with pytest.raises(RunInfoError, match=r"run.json is not a run record \(kind: "):
        run.update_info(kind="experiment")
    assert run.info_file.read_text() == before  # a refused record never reaches the file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert RunInfo().updated(kind="trial", trial={"study": "s", "number": 3}).record() == {
        "kind": "trial",
        "trial": {"study": "s", "number": 3},
    }


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"name": "x", "status": "do', "run.json is not valid JSON (line 1); a crashed copy?"),
        ("[1, 2]", "run.json is not a run record"),
        ('{"cv": {"macro_f1": "high"}}', "run.json is not a run record (cv.macro_f1: "),
    ],
)
def test_unreadable_records_are_one_line(tmp_path, content, reason):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RunInfoError) as caught:
        RunDir(tmp_path).read_info()
    assert caught.value.reason.startswith(reason) and str(caught.value).startswith(f"{tmp_path}: ")
    with pytest.raises(RunInfoError, match="no run.json"):
        RunDir(tmp_path / "missing").read_info()

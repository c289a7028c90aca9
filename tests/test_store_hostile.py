"""A hostile publisher on a real `mlflow server`: a team store must not be able to hurt whoever pulls from it.

The publisher writes to the server directly with MlflowClient, bypassing pstage: crafted tags
(``pstage.user``/``pstage.name`` that climb out of runs/, an absolute user, a ``mlflow.runName`` of
``../../x``), crafted ``pstage-manifest.json`` entries (``..``, absolute, backslashes, files pstage
never publishes, malformed checksums), crafted run.json / config.yaml, an artifact that is a folder,
and a fold checkpoint whose pickle would create a marker file. Every pull of such a run is refused:
exit 2, exactly one ``error:`` line naming the run (its MLflow id) and the path or name, no
traceback, and nothing written anywhere in a sentinel tree that holds the victim's runs folder.
The CLI runs in-process (typer's CliRunner), so the many refusals cost seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pstage.cli import app
from tests.ship_runs import ship_runs
from tests.test_store import Server, make_run

mlflow = pytest.importorskip("mlflow")

USER = "mal"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-hostile"))
    try:  # down even if it never came up
        srv.start()
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, bytes]:
    """The files of a well-formed hand-written run (tests.test_store.make_run), the publisher's raw material."""
    rng = np.random.default_rng(0)
    photos = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    rows = [(f"p{p:03d}/{photo}", f"p{p:03d}", p % 3) for p in range(12) for photo in photos]
    folds = pd.DataFrame(rows, columns=["image_id", "group", "fold"])
    targets = pd.Series(rng.integers(0, 18, len(folds)), name="target")
    run = make_run(tmp_path_factory.mktemp("base"), "base", USER, folds, targets, seed=0)
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def publish_crafted(
    server: Server,
    base: dict[str, bytes],
    name: str,
    *,
    user: str = USER,
    info: dict[str, Any] | None = None,
    files: dict[str, bytes | None] | None = None,
    entries: dict[str, Any] | None = None,
    manifest: dict[str, Any] | bytes | None = None,
    tags: dict[str, str] | None = None,
    folders: dict[str, bytes] | None = None,
) -> tuple[str, str]:
    """Publish a run as a hostile publisher would: straight to the server, every field chosen.

    ``info`` updates run.json, ``files`` replaces (None: drops) artifacts, ``entries`` adds or
    replaces manifest entries without uploading anything, ``manifest`` replaces the whole manifest
    (a dict, or raw bytes), ``tags`` overrides tags, ``folders`` uploads ``{folder: bytes}`` as a
    folder holding one file where a file is expected. Returns (MLflow run id, pstage uid).
    """
    from pstage.runs.store import _digest, board_info

    client = mlflow.tracking.MlflowClient(tracking_uri=server.uri)
    found = client.get_experiment_by_name("pstage-mask-hostile")
    experiment = found.experiment_id if found else client.create_experiment("pstage-mask-hostile")
    uid = uuid.uuid4().hex[:16]
    record = {**json.loads(base["run.json"]), "name": name, "user": user, "uid": uid, **(info or {})}
    content: dict[str, bytes | None] = {**base, "run.json": json.dumps(record).encode(), **(files or {})}
    content = {rel: data for rel, data in content.items() if data is not None}
    listed = {rel: _entry(data) for rel, data in content.items()}
    listed.update({folder: _entry(data) for folder, data in (folders or {}).items()})
    listed.update(entries or {})
    body = (
        manifest
        if manifest is not None
        else {"uid": uid, "name": f"{user}/{name}", "checkpoints": True, "files": listed}
    )
    all_tags = {
        "mlflow.runName": f"{user}/{name}",
        "pstage.uid": uid,
        "pstage.user": user,
        "pstage.name": name,
        "pstage.kind": "train",
        "pstage.checkpoints": "true",
        "pstage.info": json.dumps(board_info(record)),
        **(tags or {}),
    }
    run_id = client.create_run(experiment, tags=all_tags).info.run_id
    staging = server.root / "staging" / run_id
    for rel, data in content.items():
        local = staging / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        parent = str(Path(rel).parent)
        client.log_artifact(run_id, str(local), artifact_path=None if parent == "." else parent)
    for folder, data in (folders or {}).items():
        local = staging / "folders" / "inside.txt"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), artifact_path=folder)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    (staging / "pstage-manifest.json").write_bytes(raw)
    client.log_artifact(run_id, str(staging / "pstage-manifest.json"))
    client.set_tag(run_id, "pstage.published", _digest(body) if isinstance(body, dict) else "0123456789abcdef")
    return run_id, uid


@pytest.fixture
def victim(tmp_path) -> Path:
    """A teammate's machine: a sentinel tree (home/.bashrc, etc/cron.d) around the working folder ``work``."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("# the victim's shell\n")
    (tmp_path / "etc" / "cron.d").mkdir(parents=True)
    (tmp_path / "etc" / "cron.d" / "keep").write_text("# a system file\n")
    (tmp_path / "work").mkdir()
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes (folders: 'dir')."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def cli(victim: Path, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300", "USER": "vic", "LOGNAME": "vic"})


def refused(victim: Path, server: Server, ref: str, run_id: str, culprit: str, *extra: str) -> str:
    """`pstage pull REF`: exit 2, one error line naming the run and the culprit, no traceback, nothing written."""
    before = tree(victim)
    result = cli(victim, "pull", ref, "--store", server.uri, "--runs", str(victim / "work" / "runs"), *extra)
    shown = f"pull {ref} -> exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == 2, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert run_id in lines[0] and culprit in lines[0], shown
    assert tree(victim) == before, f"something was written: {shown}"
    return lines[0]


# --- names from tags ---------------------------------------------------------------------------


def test_a_crafted_but_well_formed_run_pulls_into_its_folder(server, base, victim):
    """The control: the same crafting, with plain names, pulls; a hostile mlflow.runName is ignored."""
    _, uid = publish_crafted(server, base, "fine", tags={"mlflow.runName": "../../../../home/escaped"})
    before = {k: v for k, v in tree(victim).items() if not k.startswith("work")}
    result = cli(victim, "pull", f"{USER}/fine", "--store", server.uri, "--runs", str(victim / "work" / "runs"))
    assert result.exit_code == 0, result.output
    run = victim / "work" / "runs" / USER / "fine"
    assert json.loads((run / "run.json").read_text())["uid"] == uid
    assert (run / "oof.csv").read_bytes() == base["oof.csv"]
    assert {k: v for k, v in tree(victim).items() if not k.startswith("work")} == before
    assert not (victim / "home" / "escaped").exists()


@pytest.mark.parametrize(
    ("user", "name", "culprit"),
    [
        ("..", "..", "'..'"),  # runs/../.. : the folder above the working folder
        (USER, "../../../home", "'../../../home'"),
        (USER, ".bashrc", "'.bashrc'"),  # hidden, and a dot-led name
        (USER, "a\nb", "'a\\nb'"),  # a new line would make two error lines
    ],
)
def test_names_that_are_no_plain_folder_name_are_refused(server, base, victim, user, name, culprit):
    run_id, uid = publish_crafted(server, base, name, user=user)
    refused(victim, server, uid, run_id, culprit)


def test_an_absolute_user_is_refused(server, base, victim):
    """pathlib drops everything before an absolute part: runs / '/etc/cron.d' / 'x' is /etc/cron.d/x."""
    user = str(victim / "etc" / "cron.d")
    run_id, uid = publish_crafted(server, base, "x", user=user)
    refused(victim, server, uid, run_id, repr(user))


# --- the manifest ------------------------------------------------------------------------------


def _bad_path_cases(victim: Path) -> list[tuple[str, str]]:
    return [
        ("../../../../home/.bashrc", "'../../../../home/.bashrc'"),
        (str(victim / "etc" / "cron.d" / "x"), repr(str(victim / "etc" / "cron.d" / "x"))),
        ("fold_0/../../../../../home/.bashrc", "'fold_0/../../../../../home/.bashrc'"),
        ("export/../../../../home/.bashrc", "'export/../../../../home/.bashrc'"),
        ("..\\..\\..\\x", "'..\\\\..\\\\..\\\\x'"),
        ("./oof.csv", "'./oof.csv'"),
        ("fold_0//best.ckpt", "'fold_0//best.ckpt'"),
        ("notes/run.sh", "'notes/run.sh'"),  # plain, but not a file pstage publishes
        ("x/fold_0/best.ckpt", "'x/fold_0/best.ckpt'"),  # a published pattern one folder down
    ]


def test_manifest_paths_outside_the_run_or_not_published_are_refused(server, base, victim):
    for index, (path, culprit) in enumerate(_bad_path_cases(victim)):
        run_id, uid = publish_crafted(server, base, f"path{index}", entries={path: _entry(b"#!/bin/sh\n")})
        line = refused(victim, server, uid, run_id, culprit)
        assert "nothing was written" in line


@pytest.mark.parametrize(
    ("entry", "culprit"),
    [
        ({"sha256": "00", "size": 3}, "has no sha256 digest"),
        ({"sha256": "a" * 64, "size": -1}, "has no file size"),
        ({"sha256": "a" * 64, "size": "3"}, "has no file size"),
        ("abc", "is not a checksum record"),
    ],
)
def test_malformed_checksum_records_are_refused(server, base, victim, entry, culprit):
    run_id, uid = publish_crafted(server, base, "sums", entries={"oof.csv": entry})
    line = refused(victim, server, uid, run_id, culprit)
    assert "'oof.csv'" in line


def test_a_manifest_that_is_not_json_or_names_another_run_is_refused(server, base, victim):
    run_id, uid = publish_crafted(server, base, "nojson", manifest=b"{not json")
    refused(victim, server, uid, run_id, "pstage-manifest.json is not one JSON file")
    run_id, uid = publish_crafted(server, base, "other", manifest={"uid": "x", "name": "ana/r1", "files": {}})
    refused(victim, server, uid, run_id, "pstage-manifest.json")


def test_an_artifact_that_is_a_folder_is_refused(server, base, victim):
    """The manifest says oof.csv; the server answers a folder oof.csv/ holding a file."""
    run_id, uid = publish_crafted(server, base, "folder", files={"oof.csv": None}, folders={"oof.csv": b"x"})
    refused(victim, server, uid, run_id, "oof.csv did not download as one regular file")


# --- run.json and config.yaml --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "files", "culprit"),
    [
        ({"status": "owned"}, None, "run.json is not a run record (status"),
        ({"name": "someone-else"}, None, "run.json names another run"),
        ({"uid": "0" * 16}, None, "run.json names another run"),
        (
            {"kind": "ensemble", "ensemble": {"method": "mean", "members": [{"run": "../../../home", "weight": 1.0}]}},
            None,
            "member '../../../home'",
        ),
        (None, {"run.json": b"[1, 2"}, "run.json is not JSON"),
        (None, {"config.yaml": b"model:\n  no_such_key: 1\n"}, "config.yaml is not a valid config"),
        (None, {"config.yaml": b"model: [unclosed\n"}, "config.yaml is not a valid config"),
    ],
)
def test_invalid_run_json_or_config_is_refused_before_any_folder_exists(server, base, victim, info, files, culprit):
    name = f"rec{uuid.uuid4().hex[:6]}"
    run_id, uid = publish_crafted(server, base, name, info=info, files=files)  # tags keep their own uid
    refused(victim, server, uid, run_id, culprit)
    assert not (victim / "work" / "runs").exists()


def test_a_hostile_info_tag_never_breaks_or_injects_into_the_board(server, base, victim):
    """A model name with markup, a script tag and a terminal escape; a pstage.info that is not JSON."""
    publish_crafted(
        server, base, "shown", info={"model": "[red]x[/] <script>alert(1)</script> \x1b]52;c;cHduZWQ=\x07\x1b[2J"}
    )
    run_id, uid = publish_crafted(server, base, "broken", tags={"pstage.info": "{not json"})
    page_file = victim / "board.html"
    result = cli(victim, "board", "--store", server.uri, "--runs", str(victim / "work"), "--html", str(page_file))
    assert result.exit_code == 0, result.output
    assert f"{USER}/shown" in result.stdout and "\x1b" not in result.stdout and "[red]x[/]" in result.stdout
    page = page_file.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"{USER}/broken" not in result.stdout  # not a usable run: left off the board
    refused(victim, server, uid, run_id, "its pstage.info tag is not a JSON object")


# --- a checkpoint that would run code -----------------------------------------------------------


class Marker:
    """Unpickling this runs code: it creates the marker file (what an attacker's payload would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.path!r}, 'w').write('owned')",))


@pytest.fixture(scope="module")
def poisoned(demo_root, tmp_path_factory) -> tuple[Path, Path]:
    """mal's copy of a real tiny run (tests.ship_runs 'a'), its fold checkpoints laced with a Marker.

    Returns (the run folder, the marker file that must never appear).
    """
    import torch

    runs = tmp_path_factory.mktemp("mal-runs")
    run = Path(shutil.copytree(ship_runs(demo_root, tmp_path_factory) / "a", runs / "laced"))
    marker = tmp_path_factory.mktemp("marker") / "owned"
    for checkpoint in sorted(run.glob("fold_*/best.ckpt")):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # pstage's own: tensors only
        state["payload"] = Marker(marker)
        torch.save(state, checkpoint)
    info = json.loads((run / "run.json").read_text())
    info.update(name="laced", user=USER, uid=uuid.uuid4().hex[:16])
    (run / "run.json").write_text(json.dumps(info))
    return run, marker


def test_pstage_checkpoints_load_without_unpickling(demo_root, tmp_path_factory):
    """Today's best.ckpt (Lightning save_weights_only) holds only tensors and plain containers."""
    import torch

    from pstage.models.checkpoint import load_fold_module

    run = ship_runs(demo_root, tmp_path_factory) / "a"
    for checkpoint in sorted(run.glob("fold_*/best.ckpt")):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert isinstance(state["hyper_parameters"]["config"], dict)
        assert not load_fold_module(checkpoint).training


def test_a_pulled_checkpoint_that_would_run_code_is_refused(server, poisoned, demo_root, tmp_path):
    from pstage.runs.store import publish

    run, marker = poisoned
    publish(run, server.uri, runs_dir=run.parent, checkpoints=True)  # pstage itself can carry the payload
    runs = tmp_path / "runs"
    for extra in ((), ("--trust",)):  # --trust never applies to a pulled run
        result = cli(
            tmp_path, "predict", f"{USER}/laced", "--store", server.uri, "--runs", str(runs),
            "--data", str(demo_root), "--out", str(tmp_path / "p.csv"), *extra,
        )  # fmt: skip
        shown = f"exit {result.exit_code}\n{result.output}"
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("pulled ")]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), shown
        assert "fold_0/best.ckpt: holds a pickled exec" in lines[0] and "pulled from a team store" in lines[0]
        assert "Traceback" not in result.output and not marker.exists(), shown
    assert (runs / USER / "laced" / "fold_0" / "best.ckpt").exists()  # pulled (checksums match) but never loaded
    assert not (tmp_path / "p.csv").exists()


def test_trust_loads_a_local_pickled_checkpoint_and_only_with_trust(poisoned, demo_root, tmp_path):
    """The publisher's own, local copy: refused by default (one line naming --trust); --trust loads it."""
    import pstage
    from pstage.core.errors import RunError

    run, marker = poisoned
    local = Path(shutil.copytree(run, tmp_path / "mine"))
    for sidecar in local.glob(".pstage-store.json"):
        sidecar.unlink()
    result = cli(tmp_path, "predict", str(local), "--data", str(demo_root), "--out", str(tmp_path / "p.csv"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "pass --trust" in lines[0], result.output
    assert not marker.exists()
    with pytest.raises(RunError, match="pass --trust"):
        pstage.predict(local, demo_root, out=tmp_path / "p.csv")
    assert not marker.exists()
    done = pstage.predict(local, demo_root, out=tmp_path / "p.csv", trust=True)
    assert done.path.exists() and marker.exists()  # the pickle ran: that is what --trust means

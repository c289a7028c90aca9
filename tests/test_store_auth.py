"""A login-protected team store: a real `mlflow server --app-name basic-auth`.

The server is set up as docs/team.md tells a team that keeps MLflow's ``default_permission = READ``:
teammates are created and granted EDIT on the competition's experiment through MLflow's own auth
API. Teammates with a login and EDIT publish into one experiment and pull each other's runs; a
teammate with only READ can board and pull but not publish; without a login, or with a wrong
password, push, pull and board stop with one line (exit 2); a publish the server refuses (EDIT
taken away) leaves the last complete publication as it was, nothing half-published.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from pstage.cli import app
from tests.test_store import Server, as_user, make_run, published

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (pip install 'pstage[trackers]')")
from mlflow.server import get_app_client  # noqa: E402 - only once mlflow is known to be there

ADMIN_PASSWORD = secrets.token_urlsafe(16)
PASSWORDS = {user: f"{user}-{secrets.token_urlsafe(12)}" for user in ("ana", "ben", "cy")}
LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@contextlib.contextmanager
def login(user: str):
    """In-process calls with this teammate's login in MLflow's environment variables."""
    saved = {k: os.environ.pop(k, None) for k in LOGIN}
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = PASSWORDS.get(user, ADMIN_PASSWORD)
    try:
        yield
    finally:
        for key in LOGIN:
            os.environ.pop(key, None)
            if saved[key] is not None:
                os.environ[key] = saved[key]


def grant(experiment_id: str, user: str, permission: str | None) -> None:
    """What the store's admin does (docs/team.md): give ``user`` ``permission`` on the experiment (None: take it back)."""
    with login("admin"):
        admin = get_app_client("basic-auth", tracking_uri=os.environ["PSTAGE_TEST_AUTH_STORE"])
        if not hasattr(admin, "grant_user_permission"):  # MLflow 2's names
            admin.delete_experiment_permission(experiment_id, user)
            if permission is not None:
                admin.create_experiment_permission(experiment_id, user, permission)
        elif permission is None:
            admin.revoke_user_permission(user, "experiment", experiment_id)
        else:
            admin.grant_user_permission(user, "experiment", experiment_id, permission)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The team's login-protected server (MLflow's defaults: READ for every login), ana, ben and cy created."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"  # else every request re-hashes the password (seconds on a busy box)
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    srv = Server(root, ("--app-name", "basic-auth"), env)
    try:  # the server goes down even if setting it up fails half-way
        srv.start()
        os.environ["PSTAGE_TEST_AUTH_STORE"] = srv.uri
        with login("admin"):
            admin = get_app_client("basic-auth", tracking_uri=srv.uri)
            for user, password in PASSWORDS.items():
                admin.create_user(user, password)
        yield srv
    finally:
        os.environ.pop("PSTAGE_TEST_AUTH_STORE", None)
        srv.kill()


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.Series]:
    photos = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    rows = [(f"p{p:03d}/{photo}", f"p{p:03d}", p % 3) for p in range(12) for photo in photos]
    folds = pd.DataFrame(rows, columns=["image_id", "group", "fold"])
    return folds, pd.Series([i % 18 for i in range(len(folds))], name="target")


@pytest.fixture(scope="module")
def shared(server, split, tmp_path_factory) -> tuple[Path, str]:
    """ana publishes r1 (creating the competition's experiment); the admin grants ben EDIT on it; ben publishes r2."""
    from pstage.runs.store import publish

    root = tmp_path_factory.mktemp("team-auth")
    with login("ana"), as_user("ana"):
        publish(make_run(root / "ana", "r1", "ana", *split, seed=1), server.uri)
    (r1,) = published_as(server, "r1", "ana")
    grant(r1.info.experiment_id, "ben", "EDIT")
    with login("ben"), as_user("ben"):
        publish(make_run(root / "ben", "r2", "ben", *split, seed=2), server.uri)
    return root, r1.info.experiment_id


def published_as(server: Server, name: str, owner: str) -> list[Any]:
    """The store's runs ``owner/name``, looked up with the admin's login."""
    with login("admin"):
        return published(server, name, owner)


def invoke(*args: str, user: str | None, password: str | None = None) -> Any:
    """The CLI in-process with this login (None: no login at all)."""
    env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password, "MLFLOW_TRACKING_TOKEN": None}
    if user is not None and password is None:
        env["MLFLOW_TRACKING_PASSWORD"] = PASSWORDS[user]
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300", "USER": user or "nobody", **env})


def one_line(result: Any, culprit: str) -> str:
    """Exit 2 and exactly one ``error:`` line holding ``culprit``, no traceback."""
    shown = f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, shown
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], shown
    return lines[0]


def test_teammates_with_a_login_publish_into_one_experiment_and_pull(server, shared, tmp_path):
    from pstage.runs.store import pull

    root, experiment = shared
    (r1,), (r2,) = published_as(server, "r1", "ana"), published_as(server, "r2", "ben")
    assert r1.info.experiment_id == r2.info.experiment_id == experiment  # ben wrote into ana's experiment
    assert r1.data.tags["pstage.published"] and r2.data.tags["pstage.published"]
    with login("ben"):
        path, fetched = pull("ana/r1", server.uri, tmp_path / "ben")
    assert path == tmp_path / "ben" / "ana" / "r1" and fetched >= 5
    assert (path / "oof.csv").read_bytes() == (root / "ana" / "r1" / "oof.csv").read_bytes()
    # cy has a login but no EDIT: she sees the board and pulls, like any teammate
    board = invoke("board", "--store", server.uri, "--runs", str(tmp_path), user="cy")
    assert board.exit_code == 0 and "ana/r1" in board.stdout and "ben/r2" in board.stdout, board.output
    got = invoke("pull", "ben/r2", "--store", server.uri, "--runs", str(tmp_path / "cy"), user="cy")
    assert got.exit_code == 0 and (tmp_path / "cy" / "ben" / "r2" / "run.json").exists(), got.output


@pytest.mark.parametrize(
    ("user", "password", "culprit"),
    [
        (None, None, "it needs a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ("ana", "not-her-password", "wrong username or password for ana"),
    ],
)
def test_push_pull_and_board_without_a_valid_login_stop_with_one_line(
    server, shared, split, tmp_path, user, password, culprit
):
    new = make_run(tmp_path / "runs", "r3", "ana", *split, seed=3)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for args in (
        ("push", str(new)),
        ("pull", "ben/r2", "--runs", str(tmp_path / "pulled")),
        ("board", "--runs", str(tmp_path / "runs")),
    ):
        line = one_line(invoke(*args, "--store", server.uri, user=user, password=password), culprit)
        assert "refused access (HTTP 401)" in line and "not-her-password" not in line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing pulled, nothing written
    assert published_as(server, "r3", "ana") == []  # nothing published


def test_a_publish_the_server_refuses_leaves_nothing_half_published(server, shared, split, tmp_path):
    """cy (READ) cannot publish at all; ben's re-publish after the admin took EDIT back is refused,
    and teammates still get r4 exactly as first published."""
    from pstage.runs.store import publish, pull

    _, experiment = shared
    make_run(tmp_path / "cy", "r5", "cy", *split, seed=5)
    line = one_line(invoke("push", "r5", "--runs", str(tmp_path / "cy"), "--store", server.uri, user="cy"), "HTTP 403")
    assert "publishing cy/r5 stopped" in line and "user cy may not do this there" in line
    assert published_as(server, "r5", "cy") == []  # not even created
    with login("ben"), as_user("ben"):
        first = publish(make_run(tmp_path / "ben", "r4", "ben", *split, seed=4), server.uri)
    (stored,) = published_as(server, "r4", "ben")
    digest = stored.data.tags["pstage.published"]
    grant(experiment, "ben", None)  # back to the default: READ
    try:
        (tmp_path / "ben" / "r4" / "report.html").write_text("<!doctype html><title>r4</title><p>changed</p>")
        line = one_line(
            invoke("push", "r4", "--runs", str(tmp_path / "ben"), "--store", server.uri, user="ben"), "HTTP 403"
        )
        assert "publishing ben/r4 stopped" in line
    finally:
        grant(experiment, "ben", "EDIT")
    (again,) = published_as(server, "r4", "ben")
    assert again.info.run_id == first.run_id and again.data.tags["pstage.published"] == digest
    with login("ana"):
        path, _ = pull("ben/r4", server.uri, tmp_path / "ana")
    assert (path / "oof.csv").exists() and not (path / "report.html").exists()  # the first, complete publication

"""The team store: run directories published to an MLflow tracking server, listed, and pulled back.

A published run is one MLflow run, found again by the pstage run uid (``pstage.uid`` tag), in one
experiment per competition (``pstage-<task>-<data fingerprint>``: every run trained on the same
images lands in it, whoever trained it). run.json becomes params (the resolved config), metrics
(CV, per fold, per task: columns in the MLflow UI) and tags (user, host, git sha, kind, split
fingerprint); the run's files become artifacts. ``pstage-manifest.json`` (sha256 + size of every
file) is uploaded after the last artifact and only then is the ``pstage.published`` tag set to its
digest, so teammates never see half a run: a publish killed half-way leaves the run unpublished
and ``pstage push`` completes it. Re-publishing the same files is a no-op; changed files are
uploaded again into the same MLflow run.

Pulled runs land in ``<runs>/<user>/<name>`` (two teammates' ``r18`` stay apart as ``ana/r18`` and
``ben/r18``), each file checked against the manifest, run.json written last; a pull that stops
half-way keeps the files it verified and fetches only the rest next time; pulling a run that is
already there and unchanged downloads nothing but the manifest.

Nothing from a store is trusted: whoever can publish writes the tags and the manifest. Before a
pull writes anything, the user and run names must be plain single path parts, every manifest entry
one of the relative paths pstage itself publishes (no ``..``, no absolute path, no link), with a
well-formed sha256 and size; run.json and config.yaml are validated like user input (and must name
the run the tags name) before the run folder is created. Each download must come back as one
regular file where it was asked for. Anything else is refused with one line naming the run and the
path, and nothing is written. (Checkpoints are loaded with ``weights_only``: models/checkpoint.py.)

MLflow is imported inside the functions that talk to the server: it is heavy, and ``pstage
--help`` and the board of a local folder must not pay for it.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pstage.core.console import first_line
from pstage.core.errors import ConfigError, PstageError, RunError
from pstage.core.io import read_json, sha256_file, write_json
from pstage.runs.info import RunInfo, RunInfoError, parse_run_info
from pstage.runs.rundir import PULLED, RUN_FILE, RunDir, resolve_run
from pstage.runs.shakeup import with_interval

STORE_ENV = "PSTAGE_STORE"
MANIFEST = "pstage-manifest.json"
EXPERIMENT_PREFIX = "pstage-"
# Files a teammate needs to see, compare and ensemble a run (smallest first); run.json goes last.
OUTPUTS = (
    "config.yaml",
    "folds.csv",
    "oof.csv",
    "test.csv",
    "submission.csv",
    "weights.csv",
    "oof_tta.csv",
    "test_tta.csv",
    "submission_tta.csv",
    "report.html",
)
SIDE_FILES = ("fold_*/metrics.json", "fold_*/history.jsonl", "final/metrics.json", "export/*")
CHECKPOINTS = ("fold_*/best.ckpt", "final/*.ckpt")
CONFIG_FILE = "config.yaml"
# A user or run name becomes a folder under runs/: one plain path part (letters of any script,
# digits, space _ . - + @ =), starting with a letter, digit or _, so nothing climbs (..), hides or
# names another folder.
# Hand-written: no library checks "one safe path component" for a name a server hands us.
_PLAIN = re.compile(r"\w[\w .+@=-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UID = re.compile(r"[\w.-]{1,64}")
MAX_RECORD_BYTES = 16 << 20  # run.json and config.yaml are validated in memory: a few KB in practice


class StoreError(PstageError):
    """The store cannot be reached, is not an MLflow server, or does not hold what was asked."""


@dataclass
class Published:
    """What ``publish`` did: the MLflow run it wrote and how many files it uploaded (0: unchanged)."""

    name: str
    uid: str
    run_id: str
    experiment: str
    uploaded: int
    unchanged: bool
    url: str


@dataclass
class StoredRun:
    """A run on the store: its qualified name (user/name), uid, MLflow ids and board fields."""

    qualified: str
    uid: str
    run_id: str
    experiment_id: str
    info: dict[str, Any]
    published: str
    checkpoints: bool
    tags: dict[str, str] = field(default_factory=dict)
    problem: str | None = None  # why a pull refuses it (a name or tag no pstage would publish)


# --- the address -------------------------------------------------------------------------------


def store_uri(uri: str | None) -> str | None:
    """Check a store address (``http(s)://host[:port][/prefix]``) before any work; None stays None."""
    if uri is None or not str(uri).strip():
        return None
    uri = str(uri).strip().rstrip("/")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(
            f"--store {masked(uri)}: expected the address of an MLflow tracking server, http(s)://HOST:PORT "
            f"(start one with: mlflow server --host 127.0.0.1 --port 5000)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise StoreError(f"--store {masked(uri)}: the port is not a number") from None
    return uri


def masked(uri: str) -> str:
    """The address with any password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def _login_headers(uri: str) -> tuple[str, dict[str, str]]:
    """The address without user:password@, and the Authorization header MLflow's client would send.

    MLflow reads MLFLOW_TRACKING_TOKEN (Bearer) or MLFLOW_TRACKING_USERNAME/PASSWORD (Basic);
    requests also takes a login from the address. The probe below uses urllib, so it adds them itself.
    """
    parts = urllib.parse.urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.unquote(parts.username or "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or urllib.parse.unquote(parts.password or "")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return bare, {"Authorization": f"Bearer {token}"}
    if user:
        return bare, {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return bare, {}


def login_user(uri: str) -> str | None:
    """Who the store is asked to let in (MLFLOW_TRACKING_USERNAME, else the address's user), if anyone."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.urlsplit(uri).username or None


def _refused(uri: str, code: int) -> StoreError:
    """A 401/403 from the store as one line that says what to set or whom to ask."""
    user = login_user(uri)
    if code == 401 and not user and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        why = "it needs a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    elif code == 401:
        why = f"wrong username or password for {user or 'the token in MLFLOW_TRACKING_TOKEN'}; check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    else:
        why = f"user {user or '?'} may not do this there; ask whoever runs the store for access (README: Working as a team)"
    return StoreError(f"store {masked(uri)} refused access (HTTP {code}): {why}")


def _ping(uri: str, timeout: float = 30.0) -> None:
    """One cheap request that tells an unreachable server, a refused login, or one that is not MLflow, in one line.

    A dead port answers at once; the timeout is for a login-protected server, which hashes the
    password of every request it has not cached (measured: 5-12 s on a busy 2-core machine).
    """
    bare, headers = _login_headers(uri)
    probe = urllib.request.Request(f"{bare}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as reply:  # noqa: S310 - the scheme is checked
            body = json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _refused(uri, exc.code) from None
        raise StoreError(
            f"store {masked(uri)} answers HTTP {exc.code} but is not an MLflow tracking server; check the address"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"store {masked(uri)} is unreachable ({reason}); is `mlflow server` running there?") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(
            f"store {masked(uri)} answers, but not as an MLflow tracking server; check the address"
        ) from None
    if not isinstance(body, dict):
        raise StoreError(f"store {masked(uri)} answers, but not as an MLflow tracking server; check the address")


def _client(uri: str) -> Any:
    """An MlflowClient for a reachable store, with few, short retries (a dead server fails fast)."""
    _ping(uri)
    # A handful of quick retries instead of MLflow's default minutes of backoff: a store that is down
    # must not hold a finished training hostage. Users may still raise them through the same env vars.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print our own line
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient  # heavy: only when a store is used

    return MlflowClient(tracking_uri=uri)


def _failure(uri: str, what: str, exc: BaseException) -> StoreError:
    """An MLflow or network exception as one line (first line of its message, URI masked)."""
    code = getattr(exc, "get_http_status_code", lambda: None)()
    if code in (401, 403):  # e.g. a teammate with READ permission publishing into the team's experiment
        refused = _refused(uri, code)
        return StoreError(f"{what} stopped: {refused}")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = "".join(ch if ch.isprintable() else "?" for ch in text)  # a server's words: no terminal escapes
    if len(text) > 200:
        text = text[:200] + "..."
    return StoreError(f"store {masked(uri)}: {what} failed ({type(exc).__name__}: {text})")


def _errors() -> tuple[type[BaseException], ...]:
    """The exception types a store conversation can raise (MLflow's and the network's)."""
    from mlflow.exceptions import MlflowException  # heavy: only when a store is used
    from requests.exceptions import RequestException  # optional extra [trackers]: requests comes with mlflow

    return (MlflowException, RequestException, OSError)


# --- identity and fingerprints -----------------------------------------------------------------


def run_uid(info: dict[str, Any]) -> str:
    """The stable id of a run: run.json's ``uid`` if it has one, else a hash of who made it, where, when.

    ``created`` survives resuming and re-training a run, and a pulled copy keeps the run.json, so
    every copy of a run has the same uid and re-publishing it updates one MLflow run.
    """
    if info.get("uid"):
        return str(info["uid"])
    key = "\0".join(str(info.get(k, "")) for k in ("user", "host", "created", "name", "kind"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def qualified_name(info: dict[str, Any]) -> str:
    """``user/name``: what a teammate types to pull or ensemble a run."""
    return f"{info.get('user') or 'unknown'}/{info.get('name')}"


def plain_name(value: Any) -> bool:
    """Whether ``value`` can be a folder name under runs/ as it is: one plain path part (see _PLAIN)."""
    return isinstance(value, str) and _PLAIN.fullmatch(value) is not None


def _shown(value: Any) -> str:
    """A value from a store, quoted for a message: control characters escaped, so it stays one line."""
    return repr(value) if isinstance(value, str) else repr(type(value).__name__)


def _name_problem(user: Any, name: Any) -> str | None:
    """Why ``user``/``name`` cannot be a run folder under runs/, or None."""
    for what, value in (("user", user), ("run name", name)):
        if not plain_name(value):
            return (
                f"its {what} {_shown(value)} is not a plain name (letters, digits, space and _ . - + @ =, "
                "not starting with a dot or space, at most 100 characters)"
            )
    return None


def _member_problem(ref: Any) -> str | None:
    """Why an ensemble member reference (``name`` or ``user/name``) is not a plain run reference, or None."""
    parts = ref.split("/") if isinstance(ref, str) else [ref]
    if len(parts) > 2 or not all(plain_name(part) for part in parts):
        return f"its member {_shown(ref)} is not a run name or user/name"
    return None


def _publishable_name(info: dict[str, Any], run_dir: Path) -> None:
    """Refuse to publish a run whose user or name teammates could not pull (their pull would refuse it)."""
    problem = _name_problem(str(info.get("user") or "unknown"), str(info.get("name")))
    for member in (info.get("ensemble") or {}).get("members") or []:
        problem = problem or _member_problem(member.get("run"))
    if problem:
        raise StoreError(f"{run_dir}: cannot publish: {problem}; rename the run (its name in {RUN_FILE}) or set $USER")


def fingerprints(run_dir: Path, info: dict[str, Any]) -> tuple[str, str]:
    """(data, split) fingerprints from folds.csv: the training images (+ classes), and their folds.

    Runs on the same competition data share the data fingerprint (one MLflow experiment) whatever
    their split; runs that can be ensembled share the split fingerprint too.
    """
    import pandas as pd  # pandas is already loaded by any command that gets here

    folds = pd.read_csv(run_dir / "folds.csv", dtype={"image_id": str})[["image_id", "fold"]]
    folds = folds.sort_values("image_id", kind="stable")
    classes = "\0".join(map(str, info.get("classes") or []))
    data = hashlib.sha256(("\0".join(folds["image_id"]) + "\1" + classes).encode()).hexdigest()[:10]
    split = hashlib.sha256(folds.to_csv(index=False).encode()).hexdigest()[:10]
    return data, split


def experiment_name(info: dict[str, Any], data_fingerprint: str) -> str:
    task = (info.get("task") or {}).get("name") or "runs"
    return f"{EXPERIMENT_PREFIX}{task}-{data_fingerprint}"


# --- what is published -------------------------------------------------------------------------


def publishable_files(run_dir: Path, checkpoints: bool = False) -> list[str]:
    """Relative paths to upload, small first, checkpoints (if asked) after, run.json last."""
    files = [name for name in OUTPUTS if (run_dir / name).is_file()]
    for pattern in SIDE_FILES + (CHECKPOINTS if checkpoints else ()):
        found = (p.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern) if p.is_file())
        files += sorted(rel for rel in found if all(map(plain_name, rel.split("/"))))  # what a pull accepts
    return [*files, RUN_FILE]


def _manifest(run_dir: Path, files: list[str], info: dict[str, Any], checkpoints: bool) -> dict[str, Any]:
    entries = {rel: {"sha256": sha256_file(run_dir / rel), "size": (run_dir / rel).stat().st_size} for rel in files}
    return {"uid": run_uid(info), "name": qualified_name(info), "checkpoints": checkpoints, "files": entries}


def _digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            out[f"{prefix}{key}"] = text if len(text) <= 500 else text[:497] + "..."
    return out


def _metrics(info: dict[str, Any]) -> dict[str, list[tuple[float, int]]]:
    """run.json's scores as MLflow metrics: CV, per task, per fold (also as one stepped series)."""
    cv = info.get("cv") or {}
    metrics: dict[str, list[tuple[float, int]]] = {}

    def put(key: str, value: Any, step: int = 0) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.setdefault(key, []).append((float(value), step))

    for key in ("macro_f1", "macro_f1_std", "oof_macro_f1", "accuracy"):
        put(f"cv_{key}", cv.get(key))
    for task, value in (cv.get("per_task") or {}).items():
        put(f"cv_{task}", value)
    for fold in cv.get("folds") or []:
        put(f"fold_{fold.get('fold')}_macro_f1", fold.get("macro_f1"))
        put("fold_macro_f1", fold.get("macro_f1"), int(fold.get("fold", 0)))
    put("cv_tta_macro_f1", ((info.get("tta") or {}).get("cv") or {}).get("macro_f1"))
    put("nested_cv_macro_f1", (info.get("ensemble") or {}).get("nested_cv_macro_f1"))
    put("duration_s", info.get("duration_s"))
    for step, entry in enumerate(info.get("leaderboard") or []):  # the public scores, as one stepped series
        put("public_lb_macro_f1", entry.get("score"), step)
    return metrics


BOARD_KEYS = (
    "name", "kind", "status", "user", "host", "model", "image_size", "epochs", "created", "duration_s", "folds_trained",
)  # fmt: skip
LEADERBOARD_IN_TAG = 12  # the newest public scores the tag carries (an MLflow tag holds 8,000 characters)


def board_info(info: dict[str, Any]) -> dict[str, Any]:
    """The part of run.json the board shows, small enough for one MLflow tag."""
    cv = info.get("cv") or {}
    out = {k: info[k] for k in BOARD_KEYS if k in info}
    out["cv"] = {k: cv[k] for k in ("macro_f1", "macro_f1_std", "per_task", "interval") if k in cv}
    if info.get("leaderboard"):
        out["leaderboard"] = [
            {**entry, "note": str(entry.get("note") or "")[:80]} for entry in info["leaderboard"][-LEADERBOARD_IN_TAG:]
        ]
    tta = (info.get("tta") or {}).get("cv") or {}
    if "macro_f1" in tta:
        out["tta"] = {"cv": {"macro_f1": tta["macro_f1"]}}
    return out


def _tags(run_dir: Path, info: dict[str, Any], data_fp: str, split_fp: str, checkpoints: bool) -> dict[str, str]:
    qualified = qualified_name(info)
    tags = {
        "mlflow.runName": qualified,
        "mlflow.user": str(info.get("user") or "unknown"),
        "mlflow.note.content": (
            f"pstage {info.get('kind', 'train')} run **{qualified}** ({info.get('model')}) trained on "
            f"{info.get('host')}. Use it anywhere: `pstage pull {qualified} --store URI`, or "
            f"`pstage ensemble {qualified} OTHER --store URI`."
        ),
        "mlflow.source.name": f"pstage {info.get('kind', 'train')}",
        "mlflow.source.type": "LOCAL",
        "pstage.uid": run_uid(info),
        "pstage.name": str(info.get("name")),
        "pstage.user": str(info.get("user") or "unknown"),
        "pstage.host": str(info.get("host") or ""),
        "pstage.git_sha": str(info.get("git_sha") or ""),
        "pstage.kind": str(info.get("kind", "train")),
        "pstage.model": str(info.get("model") or ""),
        "pstage.split": split_fp,
        "pstage.data": data_fp,
        "pstage.checkpoints": "true" if checkpoints else "false",
        "pstage.info": json.dumps(board_info(with_interval(RunDir(run_dir), info))),
    }
    if info.get("git_sha"):
        tags["mlflow.source.git.commit"] = str(info["git_sha"])
    members = (info.get("ensemble") or {}).get("members") or []
    if members:
        tags["pstage.members"] = ",".join(str(m.get("run")) for m in members)
    return tags


# --- publish -----------------------------------------------------------------------------------


def publish(
    run: str | Path,
    uri: str,
    *,
    runs_dir: str | Path = "runs",
    checkpoints: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Published:
    """Publish a finished run directory to the store (idempotent; marked published only when complete)."""
    uri = store_uri(uri) or ""
    run_dir = resolve_run(run, runs_dir)
    typed = RunDir(run_dir).read_info()
    if not typed.done:
        raise RunError(f"{run_dir}: run is {typed.status}; only finished runs are published (finish it first)")
    info = typed.record()  # the record as written: it becomes the store's params, metrics and tags
    _publishable_name(info, run_dir)
    if not (run_dir / "folds.csv").is_file():
        raise RunError(f"{run_dir}: folds.csv is missing; a run without its split cannot be shared")
    files = publishable_files(run_dir, checkpoints)
    manifest = _manifest(run_dir, files, info, checkpoints)
    digest = _digest(manifest)
    client = _client(uri)
    for member in _own_members(RunDir(run_dir), runs_dir):  # first: never an ensemble without its members
        publish(member.path, uri, runs_dir=runs_dir, checkpoints=checkpoints, progress=progress)
    try:
        return _publish(client, uri, run_dir, info, files, manifest, digest, checkpoints, progress)
    except _errors() as exc:
        raise _failure(uri, f"publishing {qualified_name(info)}", exc) from None


def _own_members(run: RunDir, runs_dir: str | Path) -> list[RunDir]:
    """An ensemble's members made on this machine (not pulled from a store), found locally.

    They are published before the ensemble, so a teammate who sees the ensemble can pull its
    members too (export, serve, distill need them); pulled members are on the store already.
    """
    if run.info.kind != "ensemble":
        return []
    found = []
    for record in run.info.members:
        try:
            member = run.member(record, runs_dir)
        except RunError:
            continue  # gone from this machine: the ensemble's own tables are still worth sharing
        if not (member.path / PULLED).is_file() and member.read_info().done:
            found.append(member)
    return found


# MLflow 3's UI opens an experiment on its GenAI pages unless told it holds model training runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: Any, name: str, data_fp: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        for key, value in EXPERIMENT_TAGS.items():
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    note = f"pstage runs on one competition's data (fingerprint {data_fp} of the training images and classes)"
    return client.create_experiment(name, tags={"pstage.data": data_fp, "mlflow.note.content": note, **EXPERIMENT_TAGS})


def _publish(
    client: Any,
    uri: str,
    run_dir: Path,
    info: dict[str, Any],
    files: list[str],
    manifest: dict[str, Any],
    digest: str,
    checkpoints: bool,
    progress: Callable[[str], None] | None,
) -> Published:
    from mlflow.entities import Metric, Param, RunTag  # heavy: only when a store is used

    data_fp, split_fp = fingerprints(run_dir, info)
    experiment = experiment_name(info, data_fp)
    uid = run_uid(info)
    existing = _find_uid(client, uid)
    tags = _tags(run_dir, info, data_fp, split_fp, checkpoints)
    if existing is not None and existing.data.tags.get("pstage.published") == digest:
        return Published(qualified_name(info), uid, existing.info.run_id, experiment, 0, True, _url(uri, existing))
    previous: dict[str, Any] = {}
    if existing is None:
        run = client.create_run(_experiment_id(client, experiment, data_fp), run_name=tags["mlflow.runName"], tags=tags)
    else:
        run = existing
        found = _remote_manifest(client, run.info.run_id)
        previous = found if isinstance(found, dict) else {}  # none or unusable: upload everything
    run_id = run.info.run_id
    client.set_tag(run_id, "pstage.published", "")  # unpublished until the manifest has landed
    params = _flat(yaml_config(run_dir))
    params = {k: v for k, v in params.items() if k not in run.data.params}  # MLflow params never change
    param_list = [Param(k[:250], v) for k, v in params.items()]
    for start in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[start : start + 100])
    now_ms = int(time.time() * 1000)
    metric_list = [Metric(k, v, now_ms, step) for k, values in _metrics(info).items() for v, step in values]
    client.log_batch(run_id, metrics=metric_list, tags=[RunTag(k, v) for k, v in tags.items()])
    uploaded = 0
    old_files = previous.get("files") or {}
    for rel in files:
        if old_files.get(rel) == manifest["files"][rel]:
            continue  # already on the store with these exact bytes
        parent = str(Path(rel).parent)
        client.log_artifact(run_id, str(run_dir / rel), artifact_path=None if parent == "." else parent)
        uploaded += 1
        if progress:
            progress(rel)
    with tempfile.TemporaryDirectory(prefix="pstage-publish-") as tmp:
        write_json(Path(tmp) / MANIFEST, manifest)
        client.log_artifact(run_id, str(Path(tmp) / MANIFEST))
    client.set_tag(run_id, "pstage.published", digest)  # last: now teammates see it
    client.set_terminated(run_id, "FINISHED")
    return Published(qualified_name(info), uid, run_id, experiment, uploaded, False, _url(uri, client.get_run(run_id)))


def yaml_config(run_dir: Path) -> dict[str, Any]:
    import yaml  # already loaded by any command that gets here

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text()) or {}
    return values if isinstance(values, dict) else {}


def _url(uri: str, run: Any) -> str:
    return f"{masked(uri)}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


NOT_A_MANIFEST = "not a manifest"  # what _remote_manifest answers for a file that is no manifest at all


def _remote_manifest(client: Any, run_id: str) -> Any:
    """The run's manifest as parsed JSON; None when it cannot be fetched (none yet: a first publish
    was interrupted), NOT_A_MANIFEST when the server answers something that is no JSON file."""
    with tempfile.TemporaryDirectory(prefix="pstage-manifest-") as tmp:
        try:
            path = _download(client, run_id, MANIFEST, Path(tmp))
        except StoreError:
            return NOT_A_MANIFEST
        except Exception:  # noqa: BLE001 - no manifest yet (first publish was interrupted): upload everything
            return None
        try:
            return json.loads(path.read_bytes())
        except (ValueError, RecursionError):
            return NOT_A_MANIFEST


def _download(client: Any, run_id: str, rel: str, into: Path) -> Path:
    """The artifact ``rel`` downloaded into the empty folder ``into``: exactly one regular file.

    MLflow places a nested artifact by its last part (``fold_0/best.ckpt`` -> ``into/best.ckpt``)
    and writes what the server lists; a hostile server could answer a folder or other paths for
    ``rel``. Anything but the one plain file asked for is a StoreError (``into`` is a scratch
    folder the caller throws away).
    """
    got = Path(os.path.abspath(client.download_artifacts(run_id, rel, str(into))))
    allowed = {Path(os.path.abspath(into / rel)), Path(os.path.abspath(into / Path(rel).name))}
    entries = [Path(root) / n for root, dirs, files in os.walk(into) for n in dirs + files]
    links = [e for e in entries if e.is_symlink()]
    files = [Path(os.path.abspath(e)) for e in entries if stat.S_ISREG(e.lstat().st_mode)]
    if got not in allowed or links or files != [got]:
        raise StoreError(
            f"{rel} did not download as one regular file (the server answered a folder, a link or other paths)"
        )
    return got


# --- list and find -----------------------------------------------------------------------------


def _experiment_ids(client: Any) -> list[str]:
    found = client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'", max_results=1000)
    return [e.experiment_id for e in found]


def _search(client: Any, filter_string: str) -> list[Any]:
    ids = _experiment_ids(client)
    if not ids:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _find_uid(client: Any, uid: str) -> Any | None:
    found = _search(client, f"tags.`pstage.uid` = '{uid}'")
    return found[0] if found else None


def _stored(run: Any) -> StoredRun:
    """A run of the store as pstage sees it; a name or tag no pstage would publish sets ``problem``.

    The name comes from the ``pstage.user`` and ``pstage.name`` tags (never from ``mlflow.runName``,
    which anyone can set to ``../../x``); the board fields from ``pstage.info``, with the tags' user
    and name, so what the board shows is what a pull would use.
    """
    tags = dict(run.data.tags)
    user, name = tags.get("pstage.user", ""), tags.get("pstage.name", "")
    problem = _name_problem(user, name)
    try:
        info = json.loads(tags.get("pstage.info") or "{}")
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        info, problem = {}, problem or "its pstage.info tag is not a JSON object"
    uid = tags.get("pstage.uid", "")
    if not _UID.fullmatch(uid):
        problem = problem or f"its pstage.uid tag {_shown(uid)} is not a run uid"
    return StoredRun(
        qualified=f"{user}/{name}",
        uid=uid,
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        info={**info, "user": user, "name": name},
        published=tags.get("pstage.published", ""),
        checkpoints=tags.get("pstage.checkpoints") == "true",
        tags=tags,
        problem=problem,
    )


def _every_run(uri: str) -> list[StoredRun]:
    """Every run on the store with a ``pstage.uid`` tag, refusable ones included (``problem`` says why)."""
    client = _client(uri)
    try:
        return [_stored(r) for r in _search(client, "tags.`pstage.uid` LIKE '%'")]
    except _errors() as exc:
        raise _failure(uri, "listing runs", exc) from None


def list_runs(uri: str, *, published_only: bool = True) -> list[StoredRun]:
    """Every run on the store (published ones only, unless asked), newest first.

    Runs a pull would refuse (a name that is no plain folder name, a malformed tag) are left out:
    the board never shows what no teammate can use.
    """
    uri = store_uri(uri) or ""
    return [r for r in _every_run(uri) if r.problem is None and (r.published or not published_only)]


def _match(ref: str, runs: list[StoredRun]) -> list[StoredRun]:
    if "/" in ref:
        return [r for r in runs if r.qualified == ref]
    return [r for r in runs if r.info.get("name") == ref or r.uid == ref or r.tags.get("pstage.name") == ref]


def _label(stored: StoredRun) -> str:
    """The run's user/name for a message: as is when it is a plain name, else quoted (one line, escapes shown)."""
    return stored.qualified if _name_problem(*stored.qualified.split("/", 1)) is None else _shown(stored.qualified)


def _refuse(stored: StoredRun, why: str) -> StoreError:
    """The one line that refuses a run from the store: which run (name and MLflow id), why, and that nothing was written."""
    return StoreError(
        f"refused to pull {_label(stored)} (MLflow run {stored.run_id}): {why}; nothing was written "
        "(pstage never publishes such a run: ask whoever published it, or the store's admin)"
    )


def find(uri: str, ref: str) -> StoredRun:
    """The published run ``ref`` names: ``user/name``, a plain name if only one user has it, or a uid."""
    uri = store_uri(uri) or ""
    every = _every_run(uri)
    found = _match(ref, [r for r in every if r.published])
    if found and all(r.problem for r in found):
        raise _refuse(found[0], str(found[0].problem))
    every = [r for r in every if r.problem is None]  # as on the board: refusable runs never shadow usable ones
    found = [r for r in found if r.problem is None]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = sorted({r.qualified for r in found})
        if len(names) > 1:
            raise StoreError(f"run '{ref}' is published by several users ({', '.join(names)}); name one of them")
        raise StoreError(
            f"run '{ref}' is published {len(found)} times (different machines); use its uid: "
            + ", ".join(r.uid for r in found)
        )
    unfinished = _match(ref, every)
    if unfinished:
        who = unfinished[0]
        raise StoreError(
            f"run '{who.qualified}' is on store {masked(uri)} but its publishing never completed; "
            f"ask {who.info.get('user', 'its owner')} to run: pstage push {who.info.get('name', ref)} --store URI"
        )
    names = sorted({r.qualified for r in every if r.published})
    hint = (
        f" (published: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else " (it holds no runs)"
    )
    raise StoreError(f"run '{ref}' is not on store {masked(uri)}{hint}")


# --- pull --------------------------------------------------------------------------------------


def pull(
    ref: str,
    uri: str,
    runs_dir: str | Path = "runs",
    *,
    checkpoints: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, int]:
    """Copy a published run into ``runs_dir/<user>/<name>``; returns (folder, files downloaded).

    Every name, path, run.json and config.yaml is validated before anything is written (a refusal
    writes nothing); every file is checked against the published sha256 before it takes its place;
    files already there with the right checksum are kept (resume, cache); run.json is written last.
    """
    uri = store_uri(uri) or ""
    stored = find(uri, ref)
    checkpoints = checkpoints and stored.info.get("kind") != "ensemble"  # its members hold the fold models
    if checkpoints and not stored.checkpoints:
        raise StoreError(
            f"{stored.qualified} was published without its fold checkpoints, which this needs; ask "
            f"{stored.info.get('user', 'its owner')} to run: pstage push {stored.info.get('name')} --store URI --with-checkpoints"
        )
    owner = Path(runs_dir).expanduser() / stored.info["user"]
    if (owner / RUN_FILE).is_file():
        raise StoreError(
            f"{owner} is a run of this machine, so {stored.qualified} cannot be pulled into it; "
            f"rename or move {owner} and pull again"
        )
    dest = owner / stored.info["name"]
    sidecar = dest / PULLED
    if (dest / RUN_FILE).is_file():
        local_uid = run_uid(RunDir(dest).read_info().record())
        if local_uid != stored.uid:
            raise StoreError(
                f"{dest} holds another run (uid {local_uid}, the store's is {stored.uid}); move it away and pull again"
            )
        if sidecar.is_file():
            mark = read_json(sidecar)
            if mark.get("digest") == stored.published and (not checkpoints or mark.get("checkpoints")):
                return dest.resolve(), 0  # cached: this exact publication is already here
    client = _client(uri)
    try:
        return _pull(client, uri, stored, dest, checkpoints, progress)
    except _errors() as exc:
        raise _failure(uri, f"pulling {stored.qualified}", exc) from None


def _is_published_path(rel: str) -> bool:
    """Whether ``rel`` is a path pstage publishes: run.json, an output, a side file or a checkpoint.

    Matched part by part (``fold_*/best.ckpt`` is two parts, so ``a/fold_0/best.ckpt`` is not one).
    """
    parts = rel.split("/")
    patterns = (RUN_FILE, *OUTPUTS, *SIDE_FILES, *CHECKPOINTS)
    return any(
        len(pattern.split("/")) == len(parts)
        and all(fnmatch.fnmatchcase(part, p) for part, p in zip(parts, pattern.split("/"), strict=True))
        for pattern in patterns
    )


def _path_problem(rel: Any) -> str | None:
    """Why a manifest entry cannot be written under the run folder, or None.

    Relative, normalised (no ``.``, ``..``, empty or dot-led parts, no backslash), plain parts, and
    one of the paths pstage publishes: absolute paths, ``../../.bashrc`` and ``fold_0/../../x`` all fail.
    """
    if not isinstance(rel, str) or not rel:
        return f"manifest entry {_shown(rel)} is not a file path"
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or not all(plain_name(part) for part in parts):
        return f"manifest path {_shown(rel)} is not a plain relative path inside the run folder"
    if not _is_published_path(rel):
        return f"manifest path {_shown(rel)} is not a file pstage publishes"
    return None


def _entry_problem(rel: str, entry: Any) -> str | None:
    """Why a manifest entry's checksum fields are malformed (a 64-hex sha256 and a byte count), or None."""
    if not isinstance(entry, dict):
        return f"manifest entry {_shown(rel)} is not a checksum record"
    digest, size = entry.get("sha256"), entry.get("size")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return f"manifest entry {_shown(rel)} has no sha256 digest"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"manifest entry {_shown(rel)} has no file size"
    if rel in (RUN_FILE, CONFIG_FILE) and size > MAX_RECORD_BYTES:
        return f"manifest entry {_shown(rel)} is {size} bytes; pstage's are a few KB"
    return None


def _checked_manifest(stored: StoredRun, manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's files, every path and checksum record validated; anything else refuses the run."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or RUN_FILE not in files:
        raise _refuse(stored, f"{MANIFEST} is not a pstage manifest (no files, or no {RUN_FILE})")
    if manifest.get("uid") != stored.uid or manifest.get("name") != stored.qualified:
        raise _refuse(stored, f"{MANIFEST} names another run ({_shown(manifest.get('name'))})")
    for rel, entry in files.items():
        problem = _path_problem(rel) or _entry_problem(rel, entry)
        if problem:
            raise _refuse(stored, problem)
    return files


def _checked_records(stored: StoredRun, files: dict[str, Path]) -> RunInfo:
    """run.json (and config.yaml, if published), downloaded to ``files``, validated like user input.

    run.json must be a run record naming the run the store's tags name (same user, name and uid:
    later stages build paths and member references from it); config.yaml must be a valid config.
    """
    # the config layer is below runs; imported here only for its cost (pydantic models of every section)
    from pstage.config import load_run_config

    try:
        info = parse_run_info(json.loads(files[RUN_FILE].read_bytes()), Path(stored.qualified))
    except (ValueError, RecursionError, RunInfoError) as exc:
        reason = exc.reason if isinstance(exc, RunInfoError) else f"{RUN_FILE} is not JSON"
        raise _refuse(stored, reason) from None
    record = info.record()
    if (
        (info.user or "unknown") != stored.info["user"]
        or info.name != stored.info["name"]
        or run_uid(record) != stored.uid
    ):
        raise _refuse(
            stored, f"{RUN_FILE} names another run ({_shown(qualified_name(record))}, uid {_shown(run_uid(record))})"
        )
    for member in info.members:
        problem = _member_problem(member.run)
        if problem:
            raise _refuse(stored, f"{RUN_FILE}: {problem}")
    if CONFIG_FILE in files:
        try:
            load_run_config(files[CONFIG_FILE])
        except ConfigError as exc:
            raise _refuse(stored, f"{CONFIG_FILE} is not a valid config ({exc})") from None
    return info


def _fetch(client: Any, stored: StoredRun, rel: str, entry: dict[str, Any], into: Path) -> Path:
    """One manifest file downloaded into the empty folder ``into`` and checked: one regular file, its sha256 and size."""
    try:
        got = _download(client, stored.run_id, rel, into)
    except StoreError as exc:
        raise _refuse(stored, str(exc)) from None
    if got.stat().st_size != entry["size"] or sha256_file(got) != entry["sha256"]:
        raise StoreError(
            f"{stored.qualified}: {rel} downloaded with the wrong checksum (the store changed or the copy broke); pull again"
        )
    return got


def _verified(path: Path, entry: dict[str, Any]) -> bool:
    """Whether ``path`` is a file with the manifest entry's size and sha256 (kept on a resumed pull)."""
    return path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def _place(source: Path, target: Path) -> None:
    """Move a verified file to ``target`` atomically (a rename; across file systems a copy beside it, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:  # another file system: never half a file at target all the same
        temporary = target.with_name(f".{target.name}.pull")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


def _scratch_root(dest: Path) -> Path:
    """The nearest existing folder above ``dest``: downloads wait there (same disk as the run, as a rule)
    in a temporary folder that is removed after, so a refused pull leaves nothing behind."""
    folder = dest.absolute().parent
    while not folder.is_dir():
        folder = folder.parent
    return folder


def _pull(
    client: Any,
    uri: str,
    stored: StoredRun,
    dest: Path,
    checkpoints: bool,
    progress: Callable[[str], None] | None,
) -> tuple[Path, int]:
    """Download, verify and place a published run (see ``pull``); returns (folder, files that changed).

    Files are downloaded into a scratch folder and the run folder is written only once every one
    passed: a refused pull (a bad name, path or record, a folder or link for a file, a wrong
    checksum) writes nothing. A pull cut off by the network keeps the files it verified (in the run
    folder, without run.json) and fetches only the rest next time.
    """
    manifest = _remote_manifest(client, stored.run_id)
    if manifest is NOT_A_MANIFEST:
        raise _refuse(stored, f"its {MANIFEST} is not one JSON file")
    if manifest is None or _digest(manifest) != stored.published:
        raise StoreError(f"{stored.qualified} is being re-published right now; pull again in a moment")
    entries = _checked_manifest(stored, manifest)
    records = [rel for rel in (CONFIG_FILE, RUN_FILE) if rel in entries]
    others = [rel for rel in entries if rel not in records]
    others = [rel for rel in others if checkpoints or not any(Path(rel).match(p) for p in CHECKPOINTS)]
    staged: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".pstage-pull-", dir=_scratch_root(dest)) as tmp:
        scratch = Path(tmp)
        for index, rel in enumerate(records):  # validated before anything else is fetched
            staged[rel] = _fetch(client, stored, rel, entries[rel], _fresh(scratch, index))
        _checked_records(stored, staged)
        try:
            for index, rel in enumerate(others, start=len(records)):
                if not _verified(dest / rel, entries[rel]):  # else already here (a resumed pull)
                    staged[rel] = _fetch(client, stored, rel, entries[rel], _fresh(scratch, index))
        except _errors():  # the network, not a refusal: keep what was verified for the next pull
            _keep(dest, {rel: path for rel, path in staged.items() if rel not in records}, entries, progress)
            raise
        fetched = _keep(dest, {rel: path for rel, path in staged.items() if rel != RUN_FILE}, entries, progress)
        write_json(
            dest / PULLED,
            {"store": masked(uri), "uid": stored.uid, "digest": stored.published, "checkpoints": checkpoints},
        )
        _place(staged[RUN_FILE], dest / RUN_FILE)  # last: now it is a run
        if progress:
            progress(RUN_FILE)
    return dest.resolve(), fetched + 1


def _fresh(scratch: Path, index: int) -> Path:
    """An empty folder for one download (so nothing else can be in it)."""
    folder = scratch / str(index)
    folder.mkdir()
    return folder


def _keep(
    dest: Path, staged: dict[str, Path], entries: dict[str, dict[str, Any]], progress: Callable[[str], None] | None
) -> int:
    """Move verified files into the run folder, run.json removed first (it marks a complete run);
    returns how many files changed there."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / RUN_FILE).unlink(missing_ok=True)
    changed = 0
    for rel, path in staged.items():
        if _verified(dest / rel, entries[rel]):
            continue  # the same bytes are there already (config.yaml on a resumed pull)
        _place(path, dest / rel)
        changed += 1
        if progress:
            progress(rel)
    return changed


def say_stderr(line: str) -> None:
    """The default voice of on-demand pulls and publishing: one plain line on stderr (stdout stays the result)."""
    print(line, file=sys.stderr, flush=True)


def locate(
    run: str | Path,
    runs_dir: str | Path,
    uri: str | None,
    *,
    checkpoints: bool = False,
    say: Callable[[str], None] | None = say_stderr,
) -> str:
    """A run for a command: the local folder if there is one, else pulled from the store on demand.

    With a store, an ensemble's members (recursively) are pulled too when they are not local, so
    ``export``, ``serve``, ``predict`` and ``distill`` of a teammate's ensemble work from an empty
    runs folder; ``checkpoints`` fetches the fold models of every run that takes part.
    """
    uri = store_uri(uri)
    run = str(run)
    try:
        path = resolve_run(run, runs_dir)
    except RunError:
        if not uri:
            raise
        path = _pull_on_demand(run, runs_dir, uri, checkpoints, say)
    else:
        pulled_without = checkpoints and (path / PULLED).is_file() and not any(path.glob("fold_*/best.ckpt"))
        if pulled_without and uri and RunDir(path).read_info().kind != "ensemble":
            # a pulled copy without its fold models: fetch them into it
            path = _pull_on_demand(qualified_name(RunDir(path).info.record()), runs_dir, uri, checkpoints, say)
    if uri:
        _members_on_demand(RunDir(path), runs_dir, uri, checkpoints, say)
    return str(path)


def _pull_on_demand(
    ref: str, runs_dir: str | Path, uri: str, checkpoints: bool, say: Callable[[str], None] | None
) -> Path:
    path, fetched = pull(ref, uri, runs_dir, checkpoints=checkpoints)
    if say:
        say(f"pulled {ref} from the store -> {path}" + ("" if fetched else " (cached)"))
    return path


def _members_on_demand(
    run: RunDir, runs_dir: str | Path, uri: str, checkpoints: bool, say: Callable[[str], None] | None
) -> None:
    """Pull an ensemble's members that are not local (or lack their fold models), recursively.

    A member recorded by a bare name is the ensemble owner's own run: on the store it is
    ``<owner>/<name>``, pulled beside the ensemble, where ``RunDir.member`` looks for it.
    """
    info = run.read_info()
    if info.kind != "ensemble" or info.ensemble is None:
        return
    owner = info.user or "unknown"
    for record in info.ensemble.members:
        # hill climbing may weigh a member 0: export and serve skip it, so its fold models are not needed
        needs_models = checkpoints and (info.ensemble.stacker is not None or record.weight > 0)
        try:
            member = run.member(record, runs_dir)
        except RunError:
            ref = record.run if "/" in record.run else f"{owner}/{record.run}"
            member = RunDir(_pull_on_demand(ref, runs_dir, uri, needs_models, say))
        else:
            if needs_models and (member.path / PULLED).is_file() and not any(member.path.glob("fold_*/best.ckpt")):
                if member.read_info().kind != "ensemble":
                    ref = qualified_name(member.info.record())
                    member = RunDir(_pull_on_demand(ref, runs_dir, uri, needs_models, say))
        _members_on_demand(member, runs_dir, uri, needs_models, say)


def publish_after(
    path: str | Path,
    uri: str | None,
    *,
    checkpoints: bool = False,
    runs_dir: str | Path = "runs",
    say: Callable[[str], None] | None = say_stderr,
) -> Published | None:
    """Publish a run a command just finished; a store that is down is one warning line, never a failure.

    What ``train``, ``ensemble``, ``tune`` and ``distill`` (API and CLI alike) do with ``store=``.
    Returns what was published, or None (no store, or the store failed: the run is kept locally).
    """
    uri = store_uri(uri)
    if not uri:
        return None
    try:
        done = publish(path, uri, runs_dir=runs_dir, checkpoints=checkpoints)
    except Exception as exc:  # noqa: BLE001 - whatever the store or the network did, the finished run stays
        reason = str(exc) if isinstance(exc, PstageError) else first_line(exc)
        if say:
            say(
                f"not published: {reason}; the run is kept locally, publish it later: "
                f"pstage push {path} --store {masked(uri)}"
            )
        return None
    what = "unchanged" if done.unchanged else f"{done.uploaded} file(s) uploaded"
    print(f"published {done.name} ({what}) -> {done.url}", flush=True)
    return done


def republish(path: str | Path, uri: str | None, *, runs_dir: str | Path = "runs") -> Published | None:
    """Publish a run again after its run.json changed (``pstage lb``), as it was published before:
    with its fold checkpoints if the store holds them. A store that is down is one warning line."""
    uri = store_uri(uri)
    if not uri:
        return None
    checkpoints = False
    try:
        existing = _find_uid(_client(uri), run_uid(RunDir(resolve_run(path, runs_dir)).read_info().record()))
        checkpoints = existing is not None and existing.data.tags.get("pstage.checkpoints") == "true"
    except StoreError:
        pass  # publish_after says the store is down, in its one line
    except _errors() as exc:
        say_stderr(f"warning: {_failure(uri, 'looking the run up', exc)}")
    return publish_after(path, uri, checkpoints=checkpoints, runs_dir=runs_dir)

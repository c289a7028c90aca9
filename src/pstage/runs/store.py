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

MLflow is imported inside the functions that talk to the server: it is heavy, and ``pstage
--help`` and the board of a local folder must not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from pstage.core.errors import PstageError, RunError
from pstage.core.io import read_json, sha256_file, write_json
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


def _ping(uri: str, timeout: float = 10.0) -> None:
    """One cheap request that tells an unreachable server, or one that is not MLflow, in one line."""
    probe = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as reply:  # noqa: S310 - the scheme is checked
            body = json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise StoreError(
                f"store {masked(uri)} refused access (HTTP {exc.code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise StoreError(
            f"store {masked(uri)} answers HTTP {exc.code} but is not an MLflow tracking server; check the address"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"store {masked(uri)} is unreachable ({reason}); is `mlflow server` running there?") from None
    except json.JSONDecodeError:
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
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
        files += sorted(str(p.relative_to(run_dir)) for p in run_dir.glob(pattern) if p.is_file())
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
        previous = _remote_manifest(client, run.info.run_id) or {}
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


def _remote_manifest(client: Any, run_id: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="pstage-manifest-") as tmp:
        try:
            path = client.download_artifacts(run_id, MANIFEST, tmp)
        except Exception:  # noqa: BLE001 - no manifest yet (first publish was interrupted): upload everything
            return None
        return read_json(path)


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
    tags = run.data.tags
    info = json.loads(tags.get("pstage.info") or "{}")
    return StoredRun(
        qualified=tags.get("mlflow.runName") or f"{tags.get('pstage.user')}/{tags.get('pstage.name')}",
        uid=tags.get("pstage.uid", ""),
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        info=info,
        published=tags.get("pstage.published", ""),
        checkpoints=tags.get("pstage.checkpoints") == "true",
        tags=dict(tags),
    )


def list_runs(uri: str, *, published_only: bool = True) -> list[StoredRun]:
    """Every run on the store (published ones only, unless asked), newest first."""
    uri = store_uri(uri) or ""
    client = _client(uri)
    try:
        runs = [_stored(r) for r in _search(client, "tags.`pstage.uid` LIKE '%'")]
    except _errors() as exc:
        raise _failure(uri, "listing runs", exc) from None
    return [r for r in runs if r.published or not published_only]


def _match(ref: str, runs: list[StoredRun]) -> list[StoredRun]:
    if "/" in ref:
        return [r for r in runs if r.qualified == ref]
    return [r for r in runs if r.info.get("name") == ref or r.uid == ref or r.tags.get("pstage.name") == ref]


def find(uri: str, ref: str) -> StoredRun:
    """The published run ``ref`` names: ``user/name``, a plain name if only one user has it, or a uid."""
    every = list_runs(uri, published_only=False)
    found = _match(ref, [r for r in every if r.published])
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

    Every file is checked against the published sha256 before it takes its place; files already
    there with the right checksum are kept (resume, cache); run.json is written last.
    """
    uri = store_uri(uri) or ""
    stored = find(uri, ref)
    checkpoints = checkpoints and stored.info.get("kind") != "ensemble"  # its members hold the fold models
    if checkpoints and not stored.checkpoints:
        raise StoreError(
            f"{stored.qualified} was published without its fold checkpoints, which this needs; ask "
            f"{stored.info.get('user', 'its owner')} to run: pstage push {stored.info.get('name')} --store URI --with-checkpoints"
        )
    dest = Path(runs_dir).expanduser() / stored.qualified
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


def _pull(
    client: Any,
    uri: str,
    stored: StoredRun,
    dest: Path,
    checkpoints: bool,
    progress: Callable[[str], None] | None,
) -> tuple[Path, int]:
    manifest = _remote_manifest(client, stored.run_id)
    if manifest is None or _digest(manifest) != stored.published:
        raise StoreError(f"{stored.qualified} is being re-published right now; pull again in a moment")
    entries: dict[str, dict[str, Any]] = manifest["files"]
    wanted = [rel for rel in entries if checkpoints or not any(Path(rel).match(p) for p in CHECKPOINTS)]
    wanted = [rel for rel in wanted if rel != RUN_FILE] + [RUN_FILE]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / RUN_FILE).unlink(missing_ok=True)  # not a run until every file is verified (so run.json comes last)
    partial = dest / ".pull"
    fetched = 0
    for rel in wanted:
        target, entry = dest / rel, entries[rel]
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        got = Path(client.download_artifacts(stored.run_id, rel, str(partial)))
        if got.stat().st_size != entry["size"] or sha256_file(got) != entry["sha256"]:
            raise StoreError(
                f"{stored.qualified}: {rel} downloaded with the wrong checksum (the store changed or the copy broke); pull again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == RUN_FILE:
            write_json(
                dest / PULLED,
                {"store": masked(uri), "uid": stored.uid, "digest": stored.published, "checkpoints": checkpoints},
            )
        os.replace(got, target)
        fetched += 1
        if progress:
            progress(rel)
    shutil.rmtree(partial, ignore_errors=True)
    return dest.resolve(), fetched


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

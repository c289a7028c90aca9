"""``pstage board``: every finished run of one or more run folders (yours, a teammate's), best CV first.

Reads only run.json files, so a board of hundreds of runs is instant and a broken or unfinished
run is listed under "skipped" with its reason instead of stopping the board.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from pstage.core.errors import ConfigError, PstageError
from pstage.core.io import sha256_file, write_text
from pstage.core.shakeup import DRAWS
from pstage.runs.info import parse_run_info
from pstage.runs.rundir import RUN_FILE, RunDir, RunInfo, RunInfoError
from pstage.runs.shakeup import beats, leaderboard_size, read_oof, run_interval, test_images
from pstage.runs.store import list_runs, masked, pull, run_uid, store_uri

# Sort keys: column and whether bigger comes first.
SORTS = {
    "cv": ("cv", True),
    "mask": ("mask", True),
    "gender": ("gender", True),
    "age": ("age", True),
    "tta": ("cv_tta", True),
    "created": ("created", True),
    "duration": ("duration_s", False),
    "name": ("name", False),
    "model": ("model", False),
    "user": ("user", False),
}


COLUMNS = [
    "name", "kind", "user", "host", "model", "size", "epochs", "folds", "cv", "cv_std", "cv_low", "cv_high",
    "p_beats_best", "mask", "gender", "age", "cv_tta", "public", "public_n", "created", "duration_s", "path",
]  # fmt: skip
SUBMISSION_COLUMNS = ["run", "user", "at", "cv", "score", "file", "current", "note"]
TOP = 5  # --shakeup: P(beats the best) for this many runs after the best


@dataclass
class Board:
    """Finished runs as a DataFrame (one row each, sorted) and the run folders that were skipped, with why.

    ``submissions``: every public-leaderboard score logged with ``pstage lb`` (one row each);
    ``shakeup``: with ``shakeup=True``, the leaderboard the win probabilities are for
    (``best``, ``leaderboard`` size, its ``unit``, ``draws``).
    """

    runs: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    submissions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SUBMISSION_COLUMNS))
    shakeup: dict[str, Any] | None = None


def _row(run_dir: Path, info: RunInfo) -> dict[str, Any]:
    cv = info.cv
    assert cv is not None and cv.macro_f1 is not None  # _problem let only scored runs through
    per = cv.per_task
    size = info.image_size
    tta = info.tta.cv if info.tta is not None and info.tta.cv is not None else None
    folds = info.folds_trained or [f.fold for f in cv.folds]
    public = info.leaderboard or []
    interval = cv.interval
    return {
        "name": info.name or run_dir.name,
        "kind": "train" if info.kind == "run" else info.kind,  # the board's word for a training run
        "user": info.user or "?",
        "host": info.host or "?",
        "model": info.model or "?",
        "size": "x".join(map(str, size)) if size else "-",
        "epochs": info.epochs,
        "folds": ",".join(map(str, folds)),
        "cv": float(cv.macro_f1),
        "cv_std": float("nan") if cv.macro_f1_std is None else float(cv.macro_f1_std),
        "cv_low": interval.low if interval is not None else None,
        "cv_high": interval.high if interval is not None else None,
        "p_beats_best": None,
        "mask": per.get("mask"),
        "gender": per.get("gender"),
        "age": per.get("age"),
        "cv_tta": tta.macro_f1 if tta is not None else None,
        "public": public[-1].score if public else None,
        "public_n": len(public),
        "created": info.created or "",
        "duration_s": float(info.duration_s or 0.0),
        "path": str(run_dir),
    }


def _problem(run_dir: Path) -> tuple[RunInfo | None, str | None]:
    """(info, None) for a finished run, else (None, why it is not on the board)."""
    try:
        info = RunDir(run_dir).read_info()
    except RunInfoError as exc:
        return None, exc.reason
    if not info.done:
        return None, f"status {info.status}" + (f": {info.error}" if info.error else "")
    if info.score is None:
        return None, f"{RUN_FILE} has no CV score"
    if not RunDir(run_dir).output("oof").exists():
        return None, "oof.csv is missing"
    return info, None


@dataclass
class _Listed:
    """A board row's run: a local folder, or a published run (``qualified``) on the store."""

    info: RunInfo
    run: RunDir | None
    qualified: str | None = None


def _store_rows(store: str, local_uids: set[str]) -> list[tuple[dict[str, Any], _Listed]]:
    """The team store's published runs as board rows (named user/name), minus those listed locally."""
    rows = []
    for stored in list_runs(store):
        try:
            info = parse_run_info(stored.info, Path(stored.qualified))
        except RunInfoError:
            continue  # not a run record: nothing to list
        if stored.uid in local_uids or info.score is None:
            continue
        row = _row(Path(stored.qualified), info)
        row.update(name=stored.qualified, path=f"{masked(store)} {stored.qualified}")
        rows.append((row, _Listed(info, None, stored.qualified)))
    return rows


def load_board(
    runs: Sequence[str | Path] | str | Path | None = None,
    *,
    contains: str | None = None,
    sort: str = "cv",
    store: str | None = None,
    shakeup: bool = False,
    lb_persons: int | None = None,
    top: int = TOP,
) -> Board:
    """Collect the finished runs of ``runs`` folders (and of the team ``store``, an MLflow server).

    ``runs`` defaults to ./runs; with a ``store``, to ./runs only if there is one (a teammate's
    machine with no runs of its own still sees the team's). ``contains`` filters by substring of
    name, model or user. A run both local and published is listed once, as the local folder.
    ``shakeup`` adds each run's CV interval over persons and, for the ``top`` runs after the best
    by CV, P(it beats the best) on a leaderboard of ``lb_persons`` (default: the test set's size);
    published runs those need are pulled (tables only) into the first ``runs`` folder.
    """
    store = store_uri(store)  # a malformed address answers before the folders are read
    if runs is None:
        runs = ["runs"] if Path("runs").is_dir() or not store else []
    folders = [runs] if isinstance(runs, str | Path) else list(runs)
    if sort.lstrip("-") not in SORTS:
        raise ConfigError(f"--sort {sort}: expected one of {', '.join(SORTS)}")
    if lb_persons is not None and lb_persons < 1:
        raise ConfigError(f"--lb-persons {lb_persons}: expected the leaderboard's size, at least 1 person")
    if top < 0:
        raise ConfigError(f"--top {top}: expected 0 or more runs")
    rows: list[tuple[dict[str, Any], _Listed]] = []
    skipped, uids = [], set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"--runs {folder}: no such folder; pass a folder of runs (default ./runs)")
        for run_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not RunDir(run_dir).has_info():
                if any(run_dir.glob("fold_*")) or (run_dir / "config.yaml").exists():
                    skipped.append((str(run_dir), f"no {RUN_FILE} (started but never recorded)"))
                continue  # not a run at all (e.g. mlartifacts, a tune folder)
            info, problem = _problem(run_dir)
            if problem:
                skipped.append((str(run_dir), problem))
            else:
                rows.append((_row(run_dir, info), _Listed(info, RunDir(run_dir))))
                uids.add(run_uid(info.record()))
    if store:
        rows += _store_rows(store, uids)
    frame = pd.DataFrame([row for row, _ in rows], columns=COLUMNS)
    listed = [entry for _, entry in rows]
    if contains:
        needle = contains.lower()
        hay = frame["name"] + " " + frame["model"] + " " + frame["user"]
        keep = hay.str.lower().str.contains(needle, regex=False).to_numpy()
        frame, listed = frame[keep].reset_index(drop=True), [e for e, k in zip(listed, keep, strict=True) if k]
    summary = None
    if shakeup and len(frame):
        pull_into = Path(folders[0]) if folders else Path("runs")
        summary = _add_shakeup(frame, listed, lb_persons, top, store, pull_into, skipped)
    submissions = _submissions(frame, listed)
    column, descending = SORTS[sort.lstrip("-")]
    if sort.startswith("-"):
        descending = not descending
    frame = frame.sort_values(column, ascending=not descending, kind="stable", na_position="last")
    return Board(frame.reset_index(drop=True), skipped, submissions, summary)


def _submissions(frame: pd.DataFrame, listed: list[_Listed]) -> pd.DataFrame:
    """Every logged public-leaderboard score of the listed runs, oldest first."""
    out = []
    for name, entry in zip(frame["name"], listed, strict=True):
        for score in entry.info.leaderboard or []:
            current = None
            if entry.run is not None and score.submission and score.file:
                path = entry.run.path / score.file
                current = path.is_file() and sha256_file(path)[:16] == score.submission
            out.append([name, score.user, score.at, score.cv, score.score, score.file, current, score.note])
    table = pd.DataFrame(out, columns=SUBMISSION_COLUMNS)
    return table.sort_values("at", kind="stable").reset_index(drop=True)


def _add_shakeup(
    frame: pd.DataFrame,
    listed: list[_Listed],
    lb_persons: int | None,
    top: int,
    store: str | None,
    pull_into: Path,
    skipped: list[tuple[str, str]],
) -> dict[str, Any] | None:
    """Fill cv_low/cv_high of every run whose tables are here (or whose record has them), and
    p_beats_best of the ``top`` runs after the best by CV (pulling published ones' tables).

    A published run whose tables cannot be pulled (the store refuses or fails) keeps its row without
    these columns and is named in ``skipped`` with the reason; without the best run's tables there is
    no shake-up (None)."""
    for i, entry in enumerate(listed):
        if pd.isna(frame.at[i, "cv_low"]) and entry.run is not None:
            found = run_interval(entry.run)
            if found is not None:
                frame.at[i, "cv_low"], frame.at[i, "cv_high"] = found.low, found.high
    order = frame["cv"].to_numpy().argsort(kind="stable")[::-1]
    best_i = int(order[0])
    best = _local(listed[best_i], store, pull_into, skipped)
    if best is None:
        return None
    size = (lb_persons, "persons (--lb-persons)") if lb_persons else None
    size = size or leaderboard_size(best.info, test_images(best))
    if size is None:  # no test set: a leaderboard as large as the best run's OOF
        oof = read_oof(best)
        size = (len(np.unique(oof.persons)) if oof is not None else 1, "persons (no test set: the OOF's)")
    frame.at[best_i, "p_beats_best"] = float("nan")
    for i in map(int, order[1 : top + 1]):
        run = _local(listed[i], store, pull_into, skipped)
        if run is None:
            continue
        if pd.isna(frame.at[i, "cv_low"]):
            found = run_interval(run)
            if found is not None:
                frame.at[i, "cv_low"], frame.at[i, "cv_high"] = found.low, found.high
        frame.at[i, "p_beats_best"] = beats(run, best, size[0])
    shown = min(top, len(frame) - 1)
    return {"best": frame.at[best_i, "name"], "leaderboard": size[0], "unit": size[1], "draws": DRAWS, "top": shown}


def _local(entry: _Listed, store: str | None, pull_into: Path, skipped: list[tuple[str, str]]) -> RunDir | None:
    """The run's folder: its own, or (a published run) its tables pulled into ``pull_into/<user>/<name>``;
    None, with the reason added to ``skipped``, when the store will not give them."""
    if entry.run is not None:
        return entry.run
    assert store is not None and entry.qualified is not None  # store rows exist only with a store
    try:
        path, _ = pull(entry.qualified, store, pull_into)
    except PstageError as exc:
        skipped.append((entry.qualified, f"no shake-up: {exc}"))
        return None
    entry.run = RunDir(path)
    return entry.run


def _age(created: str) -> str:
    try:
        return dt.datetime.fromisoformat(created).strftime("%m-%d %H:%M")
    except (TypeError, ValueError):
        return "?"


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _interval(row: Any) -> str:
    return "-" if row.cv_low is None or pd.isna(row.cv_low) else f"{row.cv_low:.3f}–{row.cv_high:.3f}"


def _chance(row: Any, board: Board) -> str:
    if board.shakeup is not None and row.name == board.shakeup["best"]:
        return "best"
    return "" if row.p_beats_best is None or pd.isna(row.p_beats_best) else f"{row.p_beats_best:.2f}"


def _public(row: Any) -> str:
    if row.public is None or pd.isna(row.public):
        return "-"
    return f"{row.public:.4f}" + (f" ({int(row.public_n)})" if row.public_n > 1 else "")


def board_rows(board: Board, extra: dict[str, dict[str, str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Column titles and text cells shared by the console table and the HTML page."""
    extra = extra or {}
    extra_columns = sorted({c for cells in extra.values() for c in cells})
    runs = board.runs
    has_kind = bool(len(runs)) and (runs["kind"] != "train").any()
    has_interval = runs["cv_low"].notna().any()
    has_public = runs["public"].notna().any()
    has_tta = runs["cv_tta"].notna().any()
    titles = ["#", "run"] + (["kind"] if has_kind else []) + ["user", "model", "size", "epochs", "folds"]
    titles += ["CV macro F1"] + (["95% interval"] if has_interval else [])
    titles += ["P(beats best)"] if board.shakeup is not None else []
    titles += ["mask", "gender", "age"]
    titles += (["CV with TTA"] if has_tta else []) + (["public LB"] if has_public else [])
    titles += extra_columns + ["created", "time"]
    cells = []
    for rank, row in enumerate(runs.itertuples(), start=1):
        line = [str(rank), row.name] + ([row.kind] if has_kind else []) + [row.user, row.model, row.size]
        line += ["-" if row.epochs is None or pd.isna(row.epochs) else str(int(row.epochs)), row.folds or "-"]
        line += [f"{row.cv:.4f} ± {row.cv_std:.3f}"] + ([_interval(row)] if has_interval else [])
        line += [_chance(row, board)] if board.shakeup is not None else []
        line += [_f(row.mask), _f(row.gender), _f(row.age)]
        line += ([_f(row.cv_tta, 4)] if has_tta else []) + ([_public(row)] if has_public else [])
        line += [extra.get(row.name, {}).get(c, "") for c in extra_columns]
        line += [_age(row.created), f"{row.duration_s:.0f}s"]
        cells.append(line)
    return titles, cells


def shakeup_line(board: Board) -> str | None:
    """What the shake-up columns mean, in one sentence (console and page)."""
    if board.shakeup is None:
        return None
    shake = board.shakeup
    return (
        f"95% interval: the CV's bootstrap over persons (whole persons resampled within each fold, "
        f"{shake['draws']:,} draws). P(beats best): the chance each of the {shake['top']} runs after "
        f"{shake['best']} (the best CV) scores above it on a leaderboard of {shake['leaderboard']:,} {shake['unit']}, "
        "paired bootstrap over the OOF persons both predicted."
    )


def board_table(board: Board, title: str = "board", extra: dict[str, dict[str, str]] | None = None) -> Table:
    """The board as a rich table (``extra``: more cells per run name, e.g. the demo's hidden-test score)."""
    titles, cells = board_rows(board, extra)
    table = Table(title=f"{title}: {len(cells)} finished run(s)", title_justify="left")
    left = ("run", "kind", "user", "model", "size", "created")
    for column in titles:
        table.add_column(column, justify="left" if column in left else "right", no_wrap=column.startswith("CV"))
    for line in cells:
        table.add_row(*map(_text, line))
    return table


def _text(cell: str) -> str:
    """A cell as plain text: run names, models and hosts may come from a store or a teammate's folder,
    so no rich markup and no control characters (a terminal escape sequence in a model name)."""
    return escape("".join(ch if ch.isprintable() else "?" for ch in cell))


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1340px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .5rem;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}
td.l,th.l{text-align:left}
tr:hover td{background:#f8fbff}
.note{color:#555;max-width:70rem}.skipped{color:#777;margin-top:1.5rem}
img.fig{max-width:100%;height:auto}
"""
# Click a column title to sort by it: a few lines of inline script keep the page self-contained.
# Numbers sort as numbers (before text such as "-"), a cell's data-v (e.g. an ISO date) before its text.
_JS = """
document.querySelectorAll('table.sortable th').forEach((th,i)=>th.addEventListener('click',()=>{
 const tb=th.closest('table').tBodies[0],rows=[...tb.rows],asc=th.dataset.asc!=='1';
 th.closest('tr').querySelectorAll('th').forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
 th.dataset.asc=asc?'1':'0';th.classList.add(asc?'sorted-asc':'sorted-desc');
 const key=r=>{const c=r.cells[i],t=c.dataset.v??c.textContent,n=parseFloat(t);return c.dataset.v===undefined&&!isNaN(n)?n:t};
 const cmp=(x,y)=>{const nx=typeof x==='number',ny=typeof y==='number';
  if(nx&&ny)return x-y;if(nx!==ny)return nx?-1:1;return String(x).localeCompare(String(y))};
 rows.sort((a,b)=>cmp(key(a),key(b))*(asc?1:-1));rows.forEach(r=>tb.appendChild(r))}));
"""


_LEFT = ("run", "kind", "user", "model", "file", "note")  # text columns, left-aligned


def _table_html(titles: list[str], cells: list[list[str]], keys: dict[str, list[str]] | None = None) -> str:
    """A sortable HTML table; ``keys``: per column title, sort keys that differ from the text (dates)."""
    keys = keys or {}
    head = "".join(f"<th{' class=l' if t in _LEFT else ''}>{html.escape(t)}</th>" for t in titles)

    def cell(title: str, text: str, row: int) -> str:
        key = keys.get(title)
        attr = f" data-v='{html.escape(key[row])}'" if key is not None else ""
        return f"<td{attr}{' class=l' if title in _LEFT else ''}>{html.escape(text)}</td>"

    body = "".join(
        "<tr>" + "".join(cell(t, c, r) for t, c in zip(titles, line, strict=True)) + "</tr>"
        for r, line in enumerate(cells)
    )
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def public_fit(submissions: pd.DataFrame) -> dict[str, float] | None:
    """Least-squares line public = intercept + slope x CV over the logged submissions (None under 2 distinct CVs)."""
    points = submissions.dropna(subset=["cv", "score"])
    if points["cv"].nunique() < 2:
        return None
    slope, intercept = np.polyfit(points["cv"].to_numpy(float), points["score"].to_numpy(float), 1)
    r = float(np.corrcoef(points["cv"], points["score"])[0, 1])
    return {"slope": float(slope), "intercept": float(intercept), "r": r, "n": len(points)}


def _public_section(board: Board) -> str:
    """CV vs public score of every logged submission, with the fit line and y = x, and the log as a table."""
    subs = board.submissions
    if subs.empty:
        return (
            "<h2>Public leaderboard</h2><p class='note'>No public score logged yet: after uploading a run's "
            "submission.csv, record its score with <code>pstage lb RUN SCORE</code> (with --store, the team sees it).</p>"
        )
    from pstage.report.pages import figure, new_figure  # deferred: matplotlib (and OpenCV) only for a page with a plot

    fig, ax = new_figure(6.5, 4.2)
    points = subs.dropna(subset=["cv", "score"])
    for user, part in points.groupby(points["user"].fillna("?")):
        ax.scatter(part["cv"], part["score"], s=36, label=str(user), zorder=3)
    lo = float(min(points["cv"].min(), points["score"].min())) - 0.01 if len(points) else 0.0
    hi = float(max(points["cv"].max(), points["score"].max())) + 0.01 if len(points) else 1.0
    ax.plot([lo, hi], [lo, hi], ls="--", c="#999", lw=1, label="public = CV")
    fit = public_fit(subs)
    if fit is not None:
        xs = np.array([points["cv"].min(), points["cv"].max()])
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, c="#c33", lw=1.5, label=f"fit (slope {fit['slope']:.2f})")
    ax.set_xlabel("CV macro F1 of the scored submission")
    ax.set_ylabel("public leaderboard macro F1")
    ax.set_title("CV vs public leaderboard, every logged submission")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    plot = figure(fig, "CV vs public leaderboard score of every logged submission")
    if fit is None:
        reading = "Log submissions of at least two different CVs to fit a line."
    else:
        reading = (
            f"Fit over {fit['n']} submission(s): public = {fit['intercept']:.3f} + {fit['slope']:.2f} x CV "
            f"(correlation {fit['r']:.2f}). Public scores that follow CV (slope near 1, points along the dashed "
            "line) mean the public board and the CV agree; public scores that climb while CV does not (a flat "
            "or negative slope, later points drifting up and left) mean the public board is being fitted, not "
            "the task: pick the final submissions by CV."
        )
    titles = ["run", "user", "logged", "CV", "public", "file", "current", "note"]
    cells = [
        [
            str(r.run),
            r.user if isinstance(r.user, str) else "?",
            _age(r.at),
            _f(r.cv, 4),
            f"{r.score:.4f}",
            str(r.file or "-"),
            "-" if r.current is None or pd.isna(r.current) else ("yes" if r.current else "changed since"),
            r.note if isinstance(r.note, str) else "",
        ]
        for r in subs.itertuples()
    ]
    table = _table_html(titles, cells, {"logged": [str(a) for a in subs["at"]]})
    return f"<h2>Public leaderboard</h2>{plot}<p class='note'>{html.escape(reading)}</p>{table}"


def board_html(board: Board, path: str | Path, title: str = "pstage board") -> Path:
    """Write the board as one self-contained HTML page (no scripts or styles from the network): the
    runs (sortable), the shake-up columns when computed, and the public-leaderboard log with its plot."""
    titles, cells = board_rows(board)
    table = _table_html(titles, cells, {"created": list(board.runs["created"].astype(str))})
    skipped = "".join(f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in board.skipped)
    shake = shakeup_line(board)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(cells)} finished run(s), best CV first; click a column to sort. "
        f"Generated {dt.datetime.now():%Y-%m-%d %H:%M}.</p>{table}"
        + (f"<p class='note'>{html.escape(shake)}</p>" if shake else "")
        + _public_section(board)
        + (f"<div class='skipped'><h2>Skipped</h2><ul>{skipped}</ul></div>" if skipped else "")
        + f"<script>{_JS}</script></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, page)
    return path

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

import pandas as pd
from rich.markup import escape
from rich.table import Table

from pstage.core.errors import ConfigError
from pstage.core.io import write_text
from pstage.runs.info import parse_run_info
from pstage.runs.rundir import RUN_FILE, RunDir, RunInfo, RunInfoError
from pstage.runs.store import list_runs, masked, run_uid, store_uri

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
    "name", "kind", "user", "host", "model", "size", "epochs", "cv", "cv_std",
    "mask", "gender", "age", "cv_tta", "created", "duration_s", "path",
]  # fmt: skip


@dataclass
class Board:
    """Finished runs as a DataFrame (one row each, sorted) and the run folders that were skipped, with why."""

    runs: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _row(run_dir: Path, info: RunInfo) -> dict[str, Any]:
    cv = info.cv
    assert cv is not None and cv.macro_f1 is not None  # _problem let only scored runs through
    per = cv.per_task
    size = info.image_size
    tta = info.tta.cv if info.tta is not None and info.tta.cv is not None else None
    return {
        "name": info.name or run_dir.name,
        "kind": "train" if info.kind == "run" else info.kind,  # the board's word for a training run
        "user": info.user or "?",
        "host": info.host or "?",
        "model": info.model or "?",
        "size": "x".join(map(str, size)) if size else "-",
        "epochs": info.epochs,
        "cv": float(cv.macro_f1),
        "cv_std": float("nan") if cv.macro_f1_std is None else float(cv.macro_f1_std),
        "mask": per.get("mask"),
        "gender": per.get("gender"),
        "age": per.get("age"),
        "cv_tta": tta.macro_f1 if tta is not None else None,
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


def _store_rows(store: str, local_uids: set[str]) -> list[dict[str, Any]]:
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
        rows.append(row)
    return rows


def load_board(
    runs: Sequence[str | Path] | str | Path | None = None,
    *,
    contains: str | None = None,
    sort: str = "cv",
    store: str | None = None,
) -> Board:
    """Collect the finished runs of ``runs`` folders (and of the team ``store``, an MLflow server).

    ``runs`` defaults to ./runs; with a ``store``, to ./runs only if there is one (a teammate's
    machine with no runs of its own still sees the team's). ``contains`` filters by substring of
    name, model or user. A run both local and published is listed once, as the local folder.
    """
    store = store_uri(store)  # a malformed address answers before the folders are read
    if runs is None:
        runs = ["runs"] if Path("runs").is_dir() or not store else []
    folders = [runs] if isinstance(runs, str | Path) else list(runs)
    if sort.lstrip("-") not in SORTS:
        raise ConfigError(f"--sort {sort}: expected one of {', '.join(SORTS)}")
    rows, skipped, uids = [], [], set()
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
                rows.append(_row(run_dir, info))
                uids.add(run_uid(info.record()))
    if store:
        rows += _store_rows(store, uids)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if contains:
        needle = contains.lower()
        hay = frame["name"] + " " + frame["model"] + " " + frame["user"]
        frame = frame[hay.str.lower().str.contains(needle, regex=False)]
    column, descending = SORTS[sort.lstrip("-")]
    if sort.startswith("-"):
        descending = not descending
    frame = frame.sort_values(column, ascending=not descending, kind="stable", na_position="last")
    return Board(frame.reset_index(drop=True), skipped)


def _age(created: str) -> str:
    try:
        return dt.datetime.fromisoformat(created).strftime("%m-%d %H:%M")
    except (TypeError, ValueError):
        return "?"


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def board_rows(board: Board, extra: dict[str, dict[str, str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Column titles and text cells shared by the console table and the HTML page."""
    extra = extra or {}
    extra_columns = sorted({c for cells in extra.values() for c in cells})
    titles = ["#", "run", "user", "model", "size", "epochs", "CV macro F1"]
    titles += ["mask", "gender", "age"]
    has_tta = board.runs["cv_tta"].notna().any()
    titles += (["CV with TTA"] if has_tta else []) + extra_columns + ["created", "time"]
    cells = []
    for rank, row in enumerate(board.runs.itertuples(), start=1):
        line = [str(rank), row.name, row.user, row.model, row.size]
        line += ["-" if row.epochs is None or pd.isna(row.epochs) else str(int(row.epochs))]
        line += [f"{row.cv:.4f} ± {row.cv_std:.3f}", _f(row.mask), _f(row.gender), _f(row.age)]
        line += [_f(row.cv_tta, 4)] if has_tta else []
        line += [extra.get(row.name, {}).get(c, "") for c in extra_columns]
        line += [_age(row.created), f"{row.duration_s:.0f}s"]
        cells.append(line)
    return titles, cells


def board_table(board: Board, title: str = "board", extra: dict[str, dict[str, str]] | None = None) -> Table:
    """The board as a rich table (``extra``: more cells per run name, e.g. the demo's hidden-test score)."""
    titles, cells = board_rows(board, extra)
    table = Table(title=f"{title}: {len(cells)} finished run(s)", title_justify="left")
    for column in titles:
        table.add_column(column, justify="left" if column in ("run", "user", "model", "size", "created") else "right")
    for line in cells:
        table.add_row(*map(_text, line))
    return table


def _text(cell: str) -> str:
    """A cell as plain text: run names, models and hosts may come from a store or a teammate's folder,
    so no rich markup and no control characters (a terminal escape sequence in a model name)."""
    return escape("".join(ch if ch.isprintable() else "?" for ch in cell))


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .6rem;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
td:nth-child(2),td.l{text-align:left}
tr:hover td{background:#f8fbff}
.skipped{color:#777;margin-top:1.5rem}
"""
# Click a column title to sort by it: a few lines of inline script keep the page self-contained.
_JS = """
document.querySelectorAll('th').forEach((th,i)=>th.addEventListener('click',()=>{
 const tb=th.closest('table').tBodies[0],rows=[...tb.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 const key=r=>{const t=r.cells[i].textContent,n=parseFloat(t);return isNaN(n)?t:n};
 rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(asc?1:-1)});rows.forEach(r=>tb.appendChild(r))}));
"""


def board_html(board: Board, path: str | Path, title: str = "pstage board") -> Path:
    """Write the board as one self-contained HTML page (no scripts or styles from the network)."""
    titles, cells = board_rows(board)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in titles)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    skipped = "".join(f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in board.skipped)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(cells)} finished run(s), best CV first; click a column to sort. "
        f"Generated {dt.datetime.now():%Y-%m-%d %H:%M}.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + (f"<div class='skipped'><h2>Skipped</h2><ul>{skipped}</ul></div>" if skipped else "")
        + f"<script>{_JS}</script></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, page)
    return path

"""A throw-away PostgreSQL server for tests: Debian's binaries, a temp cluster on a free port.

``initdb`` + ``pg_ctl`` in a temporary folder, trust authentication for user ``postgres``, listening
on 127.0.0.1 only. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user (created by Debian's package) or ``nobody``. Missing binaries are a test
failure with the install command, never a skip: `.ci/run` installs the package.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port


def pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server tool (PATH, else Debian's /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None)
    if found is None:
        pytest.fail(
            f"PostgreSQL server binaries not found ({tool}): apt-get install postgresql (the CI script .ci/run does)",
            pytrace=False,
        )
    return found


def _as_server_user() -> tuple[dict, pwd.struct_passwd | None]:
    """subprocess kwargs that drop root to the postgres (or nobody) user; nothing when not root."""
    if os.getuid() != 0:
        return {}, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return {"preexec_fn": drop}, user


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster; yield its URL (postgresql://postgres@127.0.0.1:PORT/postgres); stop and delete it."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    kwargs, user = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="pstage-pg-"))  # not under pytest's tmp (0700 root)
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    run = {"capture_output": True, "text": True, "env": env, "timeout": 120, **kwargs}
    out = subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], **run)
    if out.returncode:
        pytest.fail(f"initdb failed: {out.stderr[-2000:]}", pytrace=False)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    out = subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], **run)
    if out.returncode:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {out.stderr[-1000:]} {log[-2000:]}", pytrace=False)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)

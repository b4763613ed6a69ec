"""A throwaway PostgreSQL server for tests: the distribution's own binaries (Debian's
`postgresql` package; `make test` installs it where it can), a fresh cluster in a temporary
folder, listening on a free loopback port, stopped and removed afterwards.

PostgreSQL refuses to run as root: when the tests run as root the cluster belongs to the
`postgres` user the package creates, and its commands run through `runuser`."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def find_binaries() -> Path | None:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/N/bin), or the PATH's."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def why_unavailable() -> str | None:
    """None when a server can be started here, else the reason (the tests skip with it)."""
    if find_binaries() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is missing: pip install 'psycopg[binary]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server():
    """Yields a SQLAlchemy URL of a database on a fresh server; stops it on exit."""
    bin_dir = find_binaries()
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
    data = root / "data"
    user = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(bin_dir / args[0]), *args[1:]]
        if as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    started = False
    try:
        run("initdb", "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        result = run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()} {log[-2000:]}")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", user, "slmops")
        deadline = time.monotonic() + 30
        while run("pg_isready", "-h", "127.0.0.1", "-p", str(port), check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL is not accepting connections after 30 s")
            time.sleep(0.2)
        yield f"postgresql://{user}@127.0.0.1:{port}/slmops"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)

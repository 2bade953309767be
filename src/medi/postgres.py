"""A local PostgreSQL server on 127.0.0.1 for `make mlflow-server`, sweeps of one machine and the tests.

The server binaries are those of the pinned `pgserver` wheel (PostgreSQL 16, installed by `make setup`, so a
clean clone needs nothing else); this module only runs them: `initdb` once per data folder (trust
authentication for the `postgres` role, which is why it listens on 127.0.0.1 alone), `pg_ctl start` on a
given port, and a database created if missing. PostgreSQL refuses to run as root, so under root (CI, a
container) the server runs as the unprivileged `nobody`, which owns the data folder.

    python -m medi.postgres start --data .postgres --port 5433 --database mlflow   # prints the URL
    python -m medi.postgres stop --data .postgres
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from medi.errors import MediError

HOST, ROLE = "127.0.0.1", "postgres"
RUN_AS = "nobody"                        # the user the server runs as when we are root


def bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise MediError("the pgserver wheel (PostgreSQL binaries) is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise MediError(f"no PostgreSQL binaries in {path}; reinstall the pgserver wheel (`make setup`)")
    return path


def _as_server_user() -> dict:
    """subprocess arguments that run a command as the server's user (`nobody` when we are root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": _pw().pw_uid, "group": _pw().pw_gid, "extra_groups": []}


def _pw():
    import pwd

    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        raise MediError(f"running as root, PostgreSQL needs the unprivileged user '{RUN_AS}', which does not exist") from None


def _run(tool: str, *args: str, timeout: int = 120) -> str:
    out = subprocess.run([str(bin_dir() / tool), *args], capture_output=True, text=True, timeout=timeout,
                         cwd="/", **_as_server_user())
    if out.returncode != 0:
        raise MediError(f"{tool} {' '.join(args)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout


def url(port: int, database: str) -> str:
    """The SQLAlchemy URL of a database of this server (`postgresql://` uses the pinned psycopg 3 driver)."""
    return f"postgresql://{ROLE}@{HOST}:{port}/{database}"


def running(data: Path) -> bool:
    return (data / "postmaster.pid").exists() and subprocess.run(
        [str(bin_dir() / "pg_ctl"), "status", "-D", str(data)], capture_output=True, **_as_server_user()).returncode == 0


def start(data: str | Path, port: int, database: str) -> str:
    """Initialise `data` if new, start the server on 127.0.0.1:`port` unless it runs, create `database` if
    missing; return its URL. A server that cannot start is an error carrying its log."""
    data = Path(data).resolve()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(data, _pw().pw_uid, _pw().pw_gid)
        data.chmod(0o700)
        _run("initdb", "-D", str(data), "-U", ROLE, "--auth=trust", "--encoding=UTF8", "--locale=C")
    if not running(data):
        log = data / "server.log"
        try:
            _run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(log),
                 "-o", f"-h {HOST} -p {port} -k {data}")
        except MediError as exc:
            tail = log.read_text()[-2000:] if log.exists() else "(no log)"
            raise MediError(f"PostgreSQL in {data} did not start on {HOST}:{port}: {exc}\n{tail}") from None
    _create_database(port, database)
    return url(port, database)


def _create_database(port: int, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=HOST, port=port, user=ROLE, dbname="postgres", connect_timeout=10, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def stop(data: str | Path, remove: bool = False) -> None:
    """Stop the server of `data` (fast shutdown) if it runs; `remove` deletes the folder afterwards."""
    data = Path(data).resolve()
    if (data / "PG_VERSION").exists() and running(data):
        _run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(data))
    if remove:
        shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medi.postgres", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("--data", required=True, help="the server's data folder (created on first start)")
    ap.add_argument("--port", type=int, default=5433)
    ap.add_argument("--database", default="medi", help="database created if missing (start)")
    args = ap.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.data, args.port, args.database))
        else:
            stop(args.data)
    except MediError as exc:
        print(f"medi.postgres: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

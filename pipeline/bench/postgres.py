"""A private PostgreSQL server (Debian's ``postgresql``, installed by ``bootstrap.sh``) on loopback,
for the tests (the ``postgres`` fixture of tests/conftest.py) and ``skydiff bench history``.

:class:`PostgresServer` makes a private cluster with ``initdb`` in a temporary folder, starts it
with ``pg_ctl`` on 127.0.0.1 and a free port (its Unix socket inside that folder, so it never
meets a system cluster), with password authentication (scram-sha-256) for one user, and stops
and removes it at the end.  PostgreSQL refuses to run as root: as root, the cluster belongs to
the ``postgres`` account Debian's package creates, and its programs run through ``runuser``.
:meth:`PostgresServer.new_database` gives each test a database of its own.  Nothing here is
specific to the code under test, which only speaks to the server through its URL.  Only for
tests and benchmarks: production points ``[history] url`` at its own server.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

START_TIMEOUT_S = 60
USER = "skydiff"


def postgres_bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``: Debian keeps them in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL's initdb is not installed: run `bash bootstrap.sh setup` (it installs "
                           "Debian's postgresql package)")
    return Path(initdb).resolve().parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One private PostgreSQL cluster on ``host`` (127.0.0.1 by default; another local address
    such as a test cluster's bridge lets clients on that network in); :attr:`url` reaches its
    ``skydiff`` database."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="skydiff-postgres-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = secrets.token_hex(12)
        self._runas: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, but there is no 'postgres' account to run PostgreSQL as "
                                   "(Debian's postgresql package creates it)") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._runas = ["runuser", "-u", "postgres", "--"]

    def url(self, database: str = USER, password: str | None = None, port: int | None = None) -> str:
        """``postgresql://`` URL of ``database`` (with another password or port to test failures)."""
        return (f"postgresql://{USER}:{self.password if password is None else password}"
                f"@{self.host}:{self.port if port is None else port}/{database}")

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        proc = subprocess.run([*self._runas, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr or proc.stdout}")

    def start(self) -> "PostgresServer":
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._runas:
            owner = pwd.getpwnam("postgres")
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        pwfile.unlink()
        if self.host != "127.0.0.1":
            # initdb lets in loopback clients only; the listening address's own subnet too.
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet scram-sha-256\n")
        options = (f"-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start")
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {USER}")
        return self

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

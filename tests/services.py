"""Real Redis and PostgreSQL servers for the tests, on free loopback ports in temporary folders.

`make test` installs Debian's `redis-server` and `postgresql` when they are missing (the Makefile's
`services` step); these helpers never skip a test: a missing binary fails it with what to install.
PostgreSQL refuses to run as root, so as root its commands run as the `postgres` user (runuser).
Both servers require a password, so the destinations' secret fields are exercised for real.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_PASSWORD = "redis-test-password"
POSTGRES_USER = "refinery"
POSTGRES_PASSWORD = "postgres-test-password"


class ServiceMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port} within {timeout} s.\n{tail}")


@dataclass
class RedisServer:
    binary: str
    folder: Path
    port: int = field(default_factory=free_port)
    password: str = REDIS_PASSWORD
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        log = self.folder / "redis.log"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--requirepass", self.password, "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 20, "redis-server", log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def start_redis(folder: Path) -> RedisServer:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        raise ServiceMissing(
            "redis-server is not installed, and the Redis destination tests need a real one. "
            "Run `make test` (its services step installs Debian's redis-server) or `apt-get install redis-server`."
        )
    return RedisServer(binary, folder).start()


def postgres_bindir() -> Path:
    """Where initdb/pg_ctl live: $REFINERY_PG_BIN, else Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = [os.environ.get("REFINERY_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    for folder in candidates:
        if folder and os.access(os.path.join(folder, "initdb"), os.X_OK) and os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
            return Path(folder)
    raise ServiceMissing(
        "PostgreSQL's server binaries (initdb, pg_ctl) are not installed, and the PostgreSQL destination tests "
        "need a real server. Run `make test` (its services step installs Debian's postgresql) or "
        "`apt-get install postgresql`, or set REFINERY_PG_BIN to the folder holding initdb."
    )


@dataclass
class PostgresServer:
    bindir: Path
    folder: Path           # owned by the server's user
    port: int = field(default_factory=free_port)
    user: str = POSTGRES_USER
    password: str = POSTGRES_PASSWORD
    dbname: str = "postgres"

    @property
    def _as_server_user(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def _run(self, *args: str) -> None:
        cmd = [*self._as_server_user, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{tail}")

    def init(self) -> PostgresServer:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-E", "UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        return self

    def start(self) -> PostgresServer:
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")
        _wait_for_port(self.port, 30, "postgres", self.log)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")


def start_postgres() -> PostgresServer:
    """Init a cluster in a fresh folder under /tmp (pytest's own temp folders are private to root,
    which the postgres user cannot enter) and start it."""
    bindir = postgres_bindir()
    folder = Path(tempfile.mkdtemp(prefix="refinery-pg-"))
    server = PostgresServer(bindir, folder)
    server._chown(folder)
    try:
        return server.init().start()
    except BaseException:
        server.remove()
        raise
